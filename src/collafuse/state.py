"""Atomic, pickle-free persistence of party states and checkpoints.

States hold tensors and plain Python values only; they are loaded with
``torch.load(weights_only=True)``, which refuses arbitrary pickled objects. Every write goes to a
temporary file in the same folder first and is renamed into place, so a crash never leaves a
half-written checkpoint behind.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch


class StateError(ValueError):
    """A checkpoint or state file that is missing or unreadable (one-line reason)."""


def save_state(state: dict, path: str | Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def load_state(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise StateError(f"{path}: no such state file")
    try:
        return torch.load(path, weights_only=True)
    except Exception as err:  # torch raises many types for a damaged file
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise StateError(f"{path}: not a readable CollaFuse state ({first_line})") from None
