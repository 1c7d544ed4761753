"""Atomic, pickle-free persistence: party states, checkpoints and every file a run writes.

States hold tensors and plain Python values only; they are loaded with
``torch.load(weights_only=True)``, which refuses arbitrary pickled objects. Every write goes to a
temporary file in the same folder first and is renamed into place, so a crash never leaves a
half-written checkpoint, table or image behind. This module imports nothing from collafuse, so
every layer may use it.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np


class StateError(ValueError):
    """A checkpoint or state file that is missing or unreadable (one-line reason)."""


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """A temporary file beside ``path`` that replaces it only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_text(path: str | Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def save_npz(path: str | Path, **arrays) -> None:
    """Compressed npz; a file object keeps numpy from appending ".npz" to the temporary name."""
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.savez_compressed(f, **arrays)


def load_or_create_secret(path: str | Path, nbytes: int = 32) -> bytes:
    """A party's secret: read from ``path``, or made from os.urandom on first use and written
    there readable by its owner alone. Never derived from anything another party knows."""
    path = Path(path)
    if path.is_file():
        secret = path.read_bytes()
        if len(secret) != nbytes:
            raise StateError(f"{path}: expected a {nbytes}-byte secret, found {len(secret)} bytes")
        return secret
    secret = os.urandom(nbytes)
    with atomic_path(path) as tmp:  # mkstemp makes it owner-only (0600) before a byte is in it
        tmp.write_bytes(secret)
    return secret


def save_state(state: dict, path: str | Path) -> None:
    import torch  # here, not above: a Flower node's hello must not pay for importing torch

    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def load_state(path: str | Path) -> dict:
    import torch

    path = Path(path)
    if not path.is_file():
        raise StateError(f"{path}: no such state file")
    try:
        # map_location: a state saved with device tensors loads on a machine without that device
        return torch.load(path, weights_only=True, map_location="cpu")
    except Exception as err:  # torch raises many types for a damaged file
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise StateError(f"{path}: not a readable CollaFuse state ({first_line})") from None
