"""Cost meters at the bottom of the stack, so that parties and engines can report what they spend.

A meter has the API of :class:`collafuse.evaluation.costs.CostMeter`: ``measure(party, phase)``
(a context manager around work) and ``add_bytes(party, sent, received, phase)``, plus
``rows()`` and ``restore(rows)`` (so a resumed run keeps counting where it stopped).
Parties are named ``client:<id>`` and ``server``; phases are ``diffusion``, ``training`` and
``sampling``. The full meter (FLOPs, energy) lives in the evaluation layer; these two are the
defaults: :class:`NullMeter` for a party on its own, :class:`WallMeter` (seconds and bytes) for
an engine that needs its summary.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager

SERVER = "server"


def client_party(client_id: str) -> str:
    """The meter's name for a client."""
    return f"client:{client_id}"


class NullMeter:
    """Measures nothing; a Party's default, so a party without an engine costs nothing extra."""

    @contextmanager
    def measure(self, party: str, phase: str, count_flops: bool = True,
                flops_key: tuple | None = None) -> Iterator[None]:
        yield

    def add_bytes(self, party: str, sent: int = 0, received: int = 0,
                  phase: str = "communication") -> None:
        pass

    def rows(self) -> list[dict]:
        return []

    def restore(self, rows: list[dict]) -> None:
        pass


class WallMeter:
    """Wall seconds and bytes per (party, phase); rows like CostMeter's, without FLOPs, energy."""

    def __init__(self):
        self._rows: dict[tuple[str, str], dict] = {}

    def _row(self, party: str, phase: str) -> dict:
        return self._rows.setdefault((party, phase), {
            "party": party, "phase": phase, "flops": None, "seconds": 0.0, "bytes_sent": 0,
            "bytes_received": 0, "energy_kwh": None})

    @contextmanager
    def measure(self, party: str, phase: str, count_flops: bool = True,
                flops_key: tuple | None = None) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self._row(party, phase)["seconds"] += time.perf_counter() - start

    def add_bytes(self, party: str, sent: int = 0, received: int = 0,
                  phase: str = "communication") -> None:
        row = self._row(party, phase)
        row["bytes_sent"] += int(sent)
        row["bytes_received"] += int(received)

    def rows(self) -> list[dict]:
        return [dict(row) for row in self._rows.values()]

    def restore(self, rows: list[dict]) -> None:
        self._rows = {(r["party"], r["phase"]): dict(r) for r in rows}


def totals(rows: list[dict], party: str, phases: tuple[str, ...] | None = None) -> dict:
    """Sum one party's rows (over the given phases, or all); None stays None where never counted."""
    picked = [r for r in rows if r["party"] == party and (phases is None or r["phase"] in phases)]
    out = {}
    for key in ("flops", "seconds", "bytes_sent", "bytes_received", "energy_kwh"):
        values = [r[key] for r in picked if r[key] is not None]
        out[key] = sum(values) if values else (0 if key.startswith("bytes") else None)
    return out
