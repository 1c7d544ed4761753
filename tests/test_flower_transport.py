"""Flower transport: pack/unpack of CollaFuse messages (the loopback round trips are in
test_flower_deploy.py)."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("flwr")

from flwr.app import ArrayRecord, ConfigRecord, RecordDict  # noqa: E402

from collafuse.engines.flower import transport  # noqa: E402


def _msgs():
    return [
        {"x": np.random.default_rng(0).standard_normal((3, 1, 8, 8)).astype(np.float32)[:, :, ::2],
         "t": np.arange(3, dtype=np.int64), "kind": np.array("noised")},
        {"v": np.zeros(4, np.float16), "flag": np.array([True, False])},
    ]


def test_pack_unpack_roundtrip():
    msgs = _msgs()
    rd = transport.pack(msgs, {"round": 2, "client-id": "A"})
    assert set(rd.keys()) == {"msg-0", "msg-1", "collafuse"}
    out, meta = transport.unpack(rd)
    assert meta == {"round": 2, "client-id": "A"}
    assert len(out) == 2
    for a, b in zip(msgs, out):
        assert a.keys() == b.keys()
        for k in a:
            assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape
            np.testing.assert_array_equal(a[k], b[k])
    assert transport.nbytes(msgs) == sum(v.nbytes for m in msgs for v in m.values())


def test_pack_empty_list():
    out, meta = transport.unpack(transport.pack([]))
    assert out == [] and meta == {}


@pytest.mark.parametrize("bad", [
    [{"x": np.array([object()], dtype=object)}],
    [{"x": [1, 2]}],
    ["not a dict"],
])
def test_pack_rejects_bad_input(bad):
    with pytest.raises(transport.TransportError):
        transport.pack(bad)


def test_unpack_rejects_bad_layout():
    rd = transport.pack(_msgs())
    # count says 3 but only 2 messages
    rd["collafuse"] = ConfigRecord({"count": 3, "format": 1})
    with pytest.raises(transport.TransportError, match="count=3"):
        transport.unpack(rd)
    rd2 = transport.pack(_msgs())
    rd2["extra"] = ArrayRecord()
    with pytest.raises(transport.TransportError, match="extra"):
        transport.unpack(rd2)
    with pytest.raises(transport.TransportError, match="no 'collafuse'"):
        transport.unpack(RecordDict({"msg-0": ArrayRecord()}))
    rd3 = transport.pack(_msgs())
    rd3["collafuse"] = ConfigRecord({"count": 2, "format": 99})
    with pytest.raises(transport.TransportError, match="format"):
        transport.unpack(rd3)
