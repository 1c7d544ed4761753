"""Small helpers shared by the CollaFuse ServerApp and ClientApp: logging, the code digest, the
run's config as the server sends it, node settings."""

from __future__ import annotations

import functools
import hashlib
import json
import tomllib
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


def config_from_text(text: str):
    """The run's config from the TOML text the server sends with every request."""
    from ...config import from_dict

    return from_dict(tomllib.loads(text), source="config sent by the server")


def sample_labels(cfg, n: int):
    """The classes of a hospital's ``n`` samples, as server and node both read them from the
    run's config (sample.label, or every class in equal blocks); None if unconditional."""
    from ...client import class_labels

    return class_labels(cfg.model.classes, cfg.model.condition != "none", n, cfg.sample.label)
