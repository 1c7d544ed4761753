"""Pack CollaFuse messages into Flower records and back.

A CollaFuse message crosses the wire as a ``dict[str, np.ndarray]`` (what
``collafuse.messages.encode`` returns; ``collafuse.messages.decode`` turns it back into a
typed message). A Flower message carries a ``RecordDict``. This module maps a *list* of
such array dicts onto one ``RecordDict``:

- one ``ArrayRecord`` per CollaFuse message, under the keys ``msg-0``, ``msg-1``, ...;
- one ``ConfigRecord`` under ``collafuse`` with the count, a format version and any plain
  metadata the caller adds (numbers, strings, booleans).

Arrays travel as ``np.save`` bytes with ``allow_pickle=False`` (Flower's ``Array``), so
nothing pickled crosses the wire; object arrays are refused when packing and unpacking.
Anything that does not match this layout raises :class:`TransportError` with a one-line
reason; nothing of a malformed record is returned.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, RecordDict

META_KEY = "collafuse"
MSG_PREFIX = "msg-"
FORMAT_VERSION = 1

_SCALAR = (bool, int, float, str, bytes)


class TransportError(ValueError):
    """A Flower record does not hold a well-formed list of CollaFuse messages."""


def msg_key(i: int) -> str:
    return f"{MSG_PREFIX}{i}"


def _check_array(where: str, name: str, arr: Any) -> np.ndarray:
    if not isinstance(arr, np.ndarray):
        raise TransportError(f"{where}: field {name!r} is {type(arr).__name__}, expected numpy.ndarray")
    if arr.dtype.hasobject:
        raise TransportError(f"{where}: field {name!r} has object dtype (would need pickle)")
    return arr


def pack(
    messages: Sequence[Mapping[str, np.ndarray]],
    meta: Mapping[str, Any] | None = None,
) -> RecordDict:
    """Pack a list of encoded CollaFuse messages (array dicts) into a ``RecordDict``."""
    records: dict[str, Any] = {}
    for i, arrays in enumerate(messages):
        where = f"message {i}"
        if not isinstance(arrays, Mapping):
            raise TransportError(f"{where}: expected a dict of arrays, got {type(arrays).__name__}")
        array_dict = {}
        for name, arr in arrays.items():
            if not isinstance(name, str) or not name:
                raise TransportError(f"{where}: field names must be non-empty strings, got {name!r}")
            arr = _check_array(where, name, arr)
            array_dict[name] = Array(arr if arr.flags.c_contiguous else arr.copy(order="C"))
        records[msg_key(i)] = ArrayRecord(array_dict=array_dict, keep_input=True)

    cfg: dict[str, Any] = {}
    for k, v in (meta or {}).items():
        if k in ("count", "format"):
            raise TransportError(f"metadata key {k!r} is reserved")
        if not isinstance(v, _SCALAR) and not (
            isinstance(v, list) and all(isinstance(x, _SCALAR) for x in v)
        ):
            raise TransportError(f"metadata {k!r}: {type(v).__name__} is not a plain scalar or list")
        cfg[k] = v
    cfg["count"] = len(messages)
    cfg["format"] = FORMAT_VERSION
    records[META_KEY] = ConfigRecord(cfg)
    return RecordDict(records)


def unpack(content: RecordDict, max_count: int | None = None,
           max_array_bytes: int | None = None) -> tuple[list[dict[str, np.ndarray]], dict[str, Any]]:
    """Inverse of :func:`pack`: return ``(list of array dicts, metadata)``.

    Raises :class:`TransportError` if the record layout is not exactly what
    :func:`pack` writes (missing/extra records, wrong count, object arrays, ...), or if it
    holds more than ``max_count`` messages or an array of more than ``max_array_bytes``
    (checked before any array is read).
    """
    if not isinstance(content, RecordDict):
        raise TransportError(f"content is a {type(content).__name__}, expected RecordDict")
    if META_KEY not in content:
        raise TransportError(f"record has no {META_KEY!r} config record")
    meta_rec = content[META_KEY]
    if not isinstance(meta_rec, ConfigRecord):
        raise TransportError(f"{META_KEY!r} is a {type(meta_rec).__name__}, expected ConfigRecord")
    meta = dict(meta_rec)
    fmt = meta.pop("format", None)
    if fmt != FORMAT_VERSION:
        raise TransportError(f"unsupported transport format {fmt!r}, expected {FORMAT_VERSION}")
    count = meta.pop("count", None)
    if not isinstance(count, int) or isinstance(count, bool) or count < 0:
        raise TransportError(f"bad message count {count!r}")
    if max_count is not None and count > max_count:
        raise TransportError(f"{count} messages, at most {max_count} expected")

    expected = {msg_key(i) for i in range(count)} | {META_KEY}
    present = set(content.keys())
    if present != expected:
        extra = sorted(present - expected)
        missing = sorted(expected - present)
        raise TransportError(f"record keys do not match count={count}: extra={extra} missing={missing}")

    out: list[dict[str, np.ndarray]] = []
    for i in range(count):
        rec = content[msg_key(i)]
        if not isinstance(rec, ArrayRecord):
            raise TransportError(f"{msg_key(i)} is a {type(rec).__name__}, expected ArrayRecord")
        arrays: dict[str, np.ndarray] = {}
        for name, arr in rec.items():
            if max_array_bytes is not None and len(arr.data) > max_array_bytes:
                raise TransportError(f"{msg_key(i)}: field {name!r} holds {len(arr.data)} bytes, "
                                     f"at most {max_array_bytes} expected")
            try:
                nd = arr.numpy()
            except Exception as err:  # np.load(allow_pickle=False) refuses object arrays
                raise TransportError(f"{msg_key(i)}: field {name!r} cannot be read: {err}") from err
            arrays[name] = _check_array(msg_key(i), name, nd)
        out.append(arrays)
    return out, meta


def nbytes(messages: Sequence[Mapping[str, np.ndarray]]) -> int:
    """Payload size in bytes of a list of encoded messages (array data only)."""
    return int(sum(a.nbytes for m in messages for a in m.values()))
