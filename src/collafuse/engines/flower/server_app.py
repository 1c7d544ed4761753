"""CollaFuse ServerApp: a thin Flower adapter over ``collafuse.server.Server``.

Run config (``[tool.flwr.app.config]`` in pyproject.toml, override with ``flwr run -c``):
``task`` ("train" or "ping"), ``run-dir`` (absolute path of the server's run folder),
``min-nodes``, ``node-wait-timeout`` and ``round-timeout`` (seconds).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from flwr.app import Context, Message
from flwr.serverapp import Grid, ServerApp

from . import transport
from .common import atomic_write_json, info, wait_for_nodes, warn

app = ServerApp()


def _rc(context: Context, key: str, default):
    return context.run_config.get(key, default)


def ping(grid: Grid, context: Context) -> dict:
    """Send a small array to every node and check the doubled echo."""
    run_dir = Path(str(_rc(context, "run-dir", "runs/flower")))
    min_nodes = int(_rc(context, "min-nodes", 1))
    nodes = wait_for_nodes(grid, min_nodes, float(_rc(context, "node-wait-timeout", 60.0)))
    info("ping: %d node(s) connected: %s", len(nodes), nodes)
    payload = [{"x": np.arange(6, dtype=np.float32).reshape(2, 3)}, {"kind": np.array("ping")}]
    out = [
        Message(content=transport.pack(payload, {"round": 0}), dst_node_id=n, message_type="query.ping")
        for n in nodes
    ]
    replies = grid.send_and_receive(out, timeout=float(_rc(context, "round-timeout", 120.0)))
    result: dict = {"nodes": nodes, "replies": {}}
    for r in replies:
        src = r.metadata.src_node_id
        if r.has_error():
            warn("ping: node %s failed: %s", src, r.error.reason)
            continue
        arrays, meta = transport.unpack(r.content)
        ok = np.array_equal(arrays[0]["x"], payload[0]["x"] * 2) and str(arrays[1]["kind"]) == "ping"
        result["replies"][str(meta["client-id"])] = {"node-id": src, "ok": bool(ok), "data-path": meta["data-path"]}
    atomic_write_json(run_dir / "ping.json", result)
    info("ping: %d/%d replies ok", sum(v["ok"] for v in result["replies"].values()), len(nodes))
    return result


@app.main()
def main(grid: Grid, context: Context) -> None:
    task = str(_rc(context, "task", "train"))
    if task == "ping":
        ping(grid, context)
    else:
        raise ValueError(f"run config task={task!r}: expected 'train' or 'ping'")
