"""The one path every node reply takes before the ServerApp uses anything of it.

A reply is hostile until checked. :func:`read_reply` turns a Flower reply into (arrays,
metadata) or raises :class:`RejectedReply` with a one-line reason, whatever the reply holds
(an error, a foreign record layout, extra or missing keys, wrong types, NaN, oversized arrays);
:func:`accept_hello`, :func:`accept_train`, :func:`accept_sample` and
:func:`accept_evaluation` add what each kind must
satisfy (the client the node is bound to, the round asked, the count, the CollaFuse messages as
the Server checks them). No exception of any other type leaves these functions, so a reply can
cost a node its contribution to a round, never the run.

A node that declines a request by its own policy answers a refusal (``refused``: the reason),
raised here as :class:`Refusal`.
"""

from __future__ import annotations

import math
from typing import Any

from flwr.app import Message

from ...evaluation.federated import FIGURES
from . import transport

# what each reply's metadata holds, exactly (no other key is accepted)
HELLO = {"client-id": str, "num-images": int, "round": int, "code-digest": str}
TRAIN = {"client-id": str, "round": int, "client-loss": float}
SAMPLE = {"client-id": str, "num-images": int, "png": str, "npz": str}
EVALUATION = {"client-id": str, "num-samples": int, "num-train": int, "num-holdout": int,
              **{figure: float for figure in FIGURES}}
REFUSAL = {"client-id": str, "refused": str}
SCHEMAS = {"hello": HELLO, "train": TRAIN, "sample": SAMPLE, "evaluate": EVALUATION}
# what a figure can be (wider than any honest value): KID of Inception features, fractions,
# mean squared distances of images in [-1, 1]
FIGURE_BOUNDS = {"kid": (-10.0, 100.0), "samples_near_copies": (0.0, 1.0), "mse": (0.0, 4.0)}

MAX_TEXT = 512  # characters of any string a node sends (ids, file names, reasons)
MAX_INT = 2**31 - 1
MAX_HEADER_BYTES = 4096  # a CollaFuse message's JSON header


class RejectedReply(ValueError):
    """A node's reply that must not reach the model or the run's results (one-line reason)."""


class Refusal(RejectedReply):
    """The node declined the request by its own policy (the reason is the node's)."""


def one_line(text: Any, limit: int = 300) -> str:
    """Text from a node made safe for one log line (no newlines or control characters)."""
    s = "".join(c if c.isprintable() else "?" for c in str(text))
    return s if len(s) <= limit else s[:limit] + "..."


def read_reply(reply: Message, kind: str, max_messages: int = 0,
               max_array_bytes: int = MAX_HEADER_BYTES) -> tuple[list[dict], dict]:
    """(arrays, metadata) of a reply of ``kind`` ("hello", "train", "sample")."""
    try:
        return _read(reply, kind, max_messages, max_array_bytes)
    except RejectedReply:
        raise
    except Exception as err:  # anything a hostile reply provokes ends here, as a rejection
        raise RejectedReply(f"unreadable reply ({type(err).__name__}: {one_line(err)})") from None


def _read(reply: Message, kind: str, max_messages: int, max_array_bytes: int):
    if reply.has_error():
        raise RejectedReply(f"error {reply.error.code}: {one_line(reply.error.reason)}")
    try:
        arrays, meta = transport.unpack(reply.content, max_messages, max_array_bytes)
    except transport.TransportError as err:
        raise RejectedReply(f"malformed record: {one_line(err)}") from None
    if "refused" in meta:
        check_meta(meta, REFUSAL)
        raise Refusal(f"client {meta['client-id']} refused: {one_line(meta['refused'])}")
    check_meta(meta, SCHEMAS[kind])
    return arrays, meta


def check_meta(meta: dict, schema: dict[str, type]) -> None:
    """Exactly the keys of ``schema``, each of its type: finite floats, non-negative ints below
    2**31 (booleans are not numbers here), printable strings of at most MAX_TEXT characters."""
    extra, missing = sorted(set(meta) - set(schema)), sorted(set(schema) - set(meta))
    if extra or missing:
        raise RejectedReply(f"metadata keys: extra {one_line(extra)}, missing {missing}")
    for key, kind in schema.items():
        value = meta[key]
        if kind is float:
            ok = (isinstance(value, (int, float)) and not isinstance(value, bool)
                  and math.isfinite(value))
        elif kind is int:
            ok = isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= MAX_INT
        else:
            ok = isinstance(value, str) and 0 < len(value) <= MAX_TEXT and value.isprintable()
        if not ok:
            raise RejectedReply(f"metadata {key!r}: {one_line(repr(value), 80)} is not a valid "
                                f"{kind.__name__}")


def accept_hello(reply: Message, claimed_ok, code_digest: str) -> dict:
    """A hello reply's metadata. ``claimed_ok(client_id)`` raises RejectedReply unless this node
    may serve that client (the identity binding); a node running other CollaFuse code than the
    server's is refused, since the two would not speak the same protocol."""
    _, meta = read_reply(reply, "hello")
    claimed_ok(meta["client-id"])
    if meta["num-images"] < 1:
        raise RejectedReply(f"client {meta['client-id']}: holds no images")
    if meta["code-digest"] != code_digest:
        raise RejectedReply(f"client {meta['client-id']}: runs CollaFuse code "
                            f"{meta['code-digest'][:12]}, the server {code_digest[:12]}; "
                            "install the same CollaFuse version on both")
    return meta


def accept_train(server, reply: Message, client_id: str, round_: int, num_batches: int,
                 batch_size: int) -> tuple[list, float]:
    """A train reply of ``client_id`` for ``round_``: its K CollaFuse messages, each checked by
    the Server (protocol, shape, dtype, finite values, timesteps, cut) and holding at most
    ``batch_size`` images, and the client's loss."""
    from ...messages import decode

    image_bytes = batch_size * math.prod(server.image_shape) * 4
    arrays, meta = read_reply(reply, "train", num_batches, max(image_bytes, MAX_HEADER_BYTES))
    if meta["client-id"] != client_id:
        raise RejectedReply(f"node of client {client_id} answers as client "
                            f"{one_line(meta['client-id'], 40)}")
    if meta["round"] != round_:
        raise RejectedReply(f"client {client_id}: reply for round {meta['round']}, expected {round_}")
    if len(arrays) != num_batches:
        raise RejectedReply(f"client {client_id}: {len(arrays)} messages, expected {num_batches}")
    msgs = []
    for i, a in enumerate(arrays):
        try:
            m = decode(a)
            if m.client_id != client_id:
                raise RejectedReply(f"says client {one_line(m.client_id, 40)}")
            if m.batch_size > batch_size:
                raise RejectedReply(f"{m.batch_size} images, at most {batch_size}")
            server.check(m)
        except Exception as err:  # MessageError, and whatever else a crafted header provokes
            raise RejectedReply(f"client {client_id}, message {i}: {one_line(err)}") from None
        msgs.append(m)
    return msgs, float(meta["client-loss"])


def accept_sample(reply: Message, client_id: str, num_images: int) -> dict:
    """A sample reply: the names of the files in which the node stored ``num_images`` finished
    images, and their count. A path is refused: the server's records name clients and counts,
    never where a node keeps its files (docs/design.md section 7)."""
    meta = _counted_reply(reply, "sample", client_id, "num-images", num_images)
    for key in ("png", "npz"):
        if not _file_name(meta[key]):
            raise RejectedReply(f"client {client_id}: {key} {one_line(meta[key], 80)} is not a "
                                "file name (a node reports names, never paths)")
    return {"num-images": meta["num-images"], "png": meta["png"], "npz": meta["npz"]}


def _file_name(text: str) -> bool:
    return "/" not in text and "\\" not in text and ":" not in text and text not in (".", "..")


def accept_evaluation(reply: Message, client_id: str, num_samples: int) -> dict[str, float | int]:
    """An evaluation reply: numbers only (no array: max_messages 0), exactly EVALUATION's keys,
    each figure finite and within FIGURE_BOUNDS, for ``num_samples`` samples."""
    meta = _counted_reply(reply, "evaluate", client_id, "num-samples", num_samples)
    for figure in FIGURES:
        low, high = next(b for key, b in FIGURE_BOUNDS.items() if key in figure)
        if not low <= meta[figure] <= high:
            raise RejectedReply(f"client {client_id}: {figure} = {meta[figure]!r} outside "
                                f"[{low:g}, {high:g}]")
    return {key: meta[key] for key in EVALUATION if key != "client-id"}


def _counted_reply(reply: Message, kind: str, client_id: str, count_key: str, count: int) -> dict:
    """The metadata of a reply of ``kind`` that is ``client_id``'s and holds ``count`` images."""
    _, meta = read_reply(reply, kind)
    if meta["client-id"] != client_id:
        raise RejectedReply(f"node of client {client_id} answers as client "
                            f"{one_line(meta['client-id'], 40)}")
    if meta[count_key] != count:
        raise RejectedReply(f"client {client_id}: {kind} reply for {meta[count_key]} images, "
                            f"asked for {count}")
    return meta
