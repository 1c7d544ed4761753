"""Test-side access to the loopback Flower deployment harness (scripts/flower/harness.py)."""

from __future__ import annotations

import importlib.util
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("collafuse_flower_harness", ROOT / "scripts" / "flower" / "harness.py")
harness = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = harness
_spec.loader.exec_module(harness)

Deployment = harness.Deployment
free_port = harness.free_port
kv_string = harness.kv_string


def make_certs(out: Path, n: int = 2) -> Path:
    """Run scripts/flower/make_certs.sh into ``out``; returns ``out``."""
    if shutil.which("openssl") is None:
        import pytest

        pytest.skip("openssl not installed")
    subprocess.run(["bash", str(ROOT / "scripts" / "flower" / "make_certs.sh"), str(out), str(n)],
                   check=True, capture_output=True, timeout=120)
    return out
