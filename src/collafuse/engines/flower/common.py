"""Small helpers shared by the CollaFuse ServerApp and ClientApp (no CollaFuse logic)."""

from __future__ import annotations

import json
import time
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


def wait_for_nodes(grid: Any, min_nodes: int, timeout: float, poll: float = 0.5) -> list[int]:
    """Wait until at least ``min_nodes`` SuperNodes are connected (or ``timeout`` passes).

    Returns the sorted node ids that are connected when the wait ends (may be fewer than
    ``min_nodes`` on timeout; the caller decides what to do).
    """
    deadline = time.monotonic() + timeout
    nodes: list[int] = []
    while True:
        nodes = sorted(int(n) for n in grid.get_node_ids())
        if len(nodes) >= min_nodes or time.monotonic() >= deadline:
            return nodes
        time.sleep(poll)


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
