"""A hostile hospital for the fuzz test: simulated node 2 (client FG) trains honestly, then
replaces its reply of round r by attack r (one per round, in ATTACKS' order); its sampling
reply is malformed too. Nodes 0 and 1 are the honest CollaFuse ClientApp."""

from __future__ import annotations

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp

from collafuse.engines.flower import client_app as honest
from collafuse.engines.flower import transport

HOSTILE_PARTITION = 2


def _meta(**changes):
    def attack(arrays, meta):
        meta = {**meta, **changes}
        return transport.pack(arrays, {k: v for k, v in meta.items() if v is not None})
    return attack


def _drop(key):
    def attack(arrays, meta):
        return transport.pack(arrays, {k: v for k, v in meta.items() if k != key})
    return attack


def _array(name, fn, which=0):
    def attack(arrays, meta):
        arrays = [dict(a) for a in arrays]
        arrays[which][name] = fn(arrays[which][name])
        return transport.pack(arrays, meta)
    return attack


def _header(text: bytes):
    return _array("header", lambda h: np.frombuffer(text, dtype=np.uint8).copy())


def _raw(fn):
    """An attack on the record layout itself (what transport.pack would never write)."""
    def attack(arrays, meta):
        records = transport.pack(arrays, meta)
        return fn(records)
    return attack


def _extra_record(records):
    records["intruder"] = ConfigRecord({"x": 1})
    return records


def _huge_count(records):
    records[transport.META_KEY]["count"] = 10**9
    return records


def _config_as_array(records):
    records[transport.META_KEY] = ArrayRecord({"x": Array(np.zeros(3, np.float32))})
    return records


def _no_meta(records):
    del records[transport.META_KEY]
    return records


def _raise(arrays, meta):
    raise RuntimeError("hostile node crashes on purpose")


def _poison(value):
    return lambda x: np.full_like(x, value)


ATTACKS = [
    _raise,                                                          # 1 error reply
    _meta(views=1.0),                                                # 2 extra header key
    _drop("client-loss"),                                            # 3 missing key
    _meta(**{"client-loss": float("nan")}),                          # 4 NaN metadata
    _meta(**{"client-loss": "low"}),                                 # 5 wrong type
    lambda a, m: _meta(round=m["round"] - 1)(a, m),                  # 6 stale round
    lambda a, m: _meta(round=m["round"] + 1)(a, m),                  # 7 future round
    _meta(**{"client-id": "DU"}),                                    # 8 another node's id
    lambda a, m: transport.pack(a[:0], m),                           # 9 too few messages
    lambda a, m: transport.pack(a + a, m),                           # 10 too many messages
    _array("x_t", _poison(np.nan)),                                  # 11 NaN images
    _array("eps", _poison(np.inf)),                                  # 12 Inf noise
    _array("x_t", lambda x: x[:, :, :-1]),                           # 13 wrong shape
    _array("x_t", lambda x: x.astype(np.float64)),                   # 14 wrong dtype
    _array("t", lambda t: t.astype(np.float32)),                     # 15 float timesteps
    _array("t", np.zeros_like),                                      # 16 client-owned timesteps
    _array("x_t", lambda x: np.zeros((4096, *x.shape[1:]), x.dtype)),  # 17 oversized array
    _header(b'{"kind": "noisy-views", "client_id": "FG", "cut": 12}'),  # 18 other protocol
    _header(b'{"kind": "noised-batch", "client_id": "DU"}'),          # 19 message says DU
    _header(b"\xff\xfe not json"),                                   # 20 unreadable header
    _header(b'{"kind": "noised-batch", "client_id": "FG", "x": 1}'),  # 21 unknown field
    _raw(_extra_record),                                             # 22 extra record
    _raw(_huge_count),                                               # 23 huge count
    _raw(_config_as_array),                                          # 24 metadata of wrong type
    _raw(_no_meta),                                                  # 25 no metadata at all
    _meta(round=True),                                               # 26 boolean round
    _meta(**{"client-id": "FG" * 1000}),                             # 27 oversized string
]

app = ClientApp()


def _hostile(context: Context) -> bool:
    return int(context.node_config.get("partition-id", -1)) == HOSTILE_PARTITION


@app.query("hello")
def hello(msg: Message, context: Context) -> Message:
    return honest.hello(msg, context)


@app.train()
def train(msg: Message, context: Context) -> Message:
    out = honest.train(msg, context)
    if not _hostile(context):
        return out
    arrays, meta = transport.unpack(out.content)
    attack = ATTACKS[(meta["round"] - 1) % len(ATTACKS)]
    return Message(content=attack(arrays, meta), reply_to=msg)


@app.query("sample")
def sample(msg: Message, context: Context) -> Message:
    out = honest.sample(msg, context)
    if not _hostile(context):
        return out
    return Message(content=RecordDict({transport.META_KEY: ConfigRecord(
        {"count": 0, "format": transport.FORMAT_VERSION, "client-id": "FG", "num-images": 10**12,
         "png": "/etc/passwd", "npz": "x"})}), reply_to=msg)
