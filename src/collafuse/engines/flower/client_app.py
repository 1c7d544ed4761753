"""CollaFuse ClientApp: a thin Flower adapter over ``collafuse.client.Client``.

Message types handled:

- ``query.ping``: transport smoke test; echoes the arrays back doubled and names the node.

``node_config`` keys (set with ``flower-supernode --node-config``):
``client-id`` (str), ``data-path`` (the node's images), ``state-dir`` (node-local folder
for the Client's persistent state), optional ``out-dir`` (default ``<state-dir>/out``).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from . import transport
from .common import atomic_write_json, info, node_setting

app = ClientApp()


@app.query("ping")
def ping(msg: Message, context: Context) -> Message:
    arrays, meta = transport.unpack(msg.content)
    nc = context.node_config
    client_id = str(node_setting(nc, "client-id"))
    state_dir = Path(str(node_setting(nc, "state-dir")))
    reply = [{k: (v * 2 if np.issubdtype(v.dtype, np.number) else v) for k, v in a.items()} for a in arrays]
    atomic_write_json(state_dir / "ping.json", {"client-id": client_id, "meta": meta, "n": len(arrays)})
    info("ping from server handled by %s (%d messages)", client_id, len(arrays))
    out = transport.pack(reply, {"client-id": client_id, "data-path": str(nc.get("data-path", ""))})
    return Message(content=out, reply_to=msg)
