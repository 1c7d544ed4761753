"""Small helpers shared by the CollaFuse ServerApp and ClientApp (no CollaFuse logic)."""

from __future__ import annotations

import functools
import hashlib
import json
from logging import INFO, WARNING
from pathlib import Path
from typing import Any

from flwr.common import log

from ...state import write_text

LOG_PREFIX = "[collafuse] "


def info(msg: str, *args: Any) -> None:
    log(INFO, LOG_PREFIX + msg, *args)


def warn(msg: str, *args: Any) -> None:
    log(WARNING, LOG_PREFIX + msg, *args)


@functools.cache  # the sources do not change while a process runs
def code_digest() -> str:
    """sha256 over the CollaFuse package's Python sources (path and bytes of each file).

    Server and nodes compare theirs before a run: a node runs its own installed CollaFuse
    (Flower puts only the app bundle's root on the path), so two versions would otherwise
    speak different protocols without noticing. A hospital may pin it (``code-sha256``)."""
    root = Path(__file__).resolve().parents[2]  # the collafuse package
    h = hashlib.sha256()
    for path in sorted(root.rglob("*.py")):
        h.update(path.relative_to(root).as_posix().encode() + b"\0")
        h.update(path.read_bytes() + b"\0")
    return h.hexdigest()


def write_json(path: Path, obj: Any) -> None:
    write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def node_setting(node_config: dict[str, Any], key: str, default: Any = None) -> Any:
    """Read a ``--node-config`` key (kebab-case), raising a clear error if it is required."""
    if key in node_config:
        return node_config[key]
    if default is None:
        raise KeyError(
            f"node_config has no {key!r}; start the SuperNode with "
            f"--node-config \"{key}='...'\" (got keys {sorted(node_config)})"
        )
    return default
