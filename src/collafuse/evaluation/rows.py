"""A sweep's result rows (one per run and client, as results.json holds them) grouped and
reduced: by protocol, cut ratio, client and training seed. The report's tables and the
figures (:mod:`.plotting`) both read the rows through these."""

from __future__ import annotations

import numpy as np

PAPER_PROTOCOL = "shared-noise"


def main_protocol(rows: list[dict]) -> str:
    """The protocol the figures and per-cut tables show: the paper's where it ran."""
    protocols = list(dict.fromkeys(r["protocol"] for r in rows))
    return PAPER_PROTOCOL if PAPER_PROTOCOL in protocols else protocols[0]


def protocol_rows(rows: list[dict], protocol: str | None = None) -> list[dict]:
    protocol = protocol or main_protocol(rows)
    return [r for r in rows if r["protocol"] == protocol]


def seeds_of(rows: list[dict]) -> list[int]:
    return sorted({r.get("seed", 0) for r in rows})


def seed_table(rows: list[dict], key: str, reduce=np.mean) -> dict[float, dict[int, float]]:
    """{c: {seed: value}} of one protocol's rows, the value ``reduce`` over that seed's clients
    (the unit the intervals of :mod:`.intervals` are taken over)."""
    table: dict[float, dict[int, list]] = {}
    for r in rows:
        if r.get(key) is not None and np.isfinite(r[key]):
            table.setdefault(r["cut_ratio"], {}).setdefault(r.get("seed", 0), []).append(r[key])
    return {c: {k: float(reduce(v)) for k, v in sorted(by_seed.items())}
            for c, by_seed in sorted(table.items())}


def cut_ratios(rows: list[dict]) -> list[float]:
    return sorted({r["cut_ratio"] for r in rows})


def clients(rows: list[dict]) -> list[str]:
    return list(dict.fromkeys(r["client"] for r in rows))


def by_cut(rows: list[dict], key: str, reduce=np.mean) -> np.ndarray:
    """One value per cut ratio: ``reduce`` over the clients' rows (NaN where none is known)."""
    out = []
    for c in cut_ratios(rows):
        values = [r[key] for r in rows if r["cut_ratio"] == c and r.get(key) is not None]
        out.append(float(reduce(values)) if values else float("nan"))
    return np.array(out)


def per_client(rows: list[dict], key: str) -> dict[str, np.ndarray]:
    """Per client, one value per cut ratio: the mean over seeds (NaN where none)."""
    cs = cut_ratios(rows)
    return {cid: np.array([mean_of([r[key] for r in rows if r["client"] == cid
                                  and r["cut_ratio"] == c]) for c in cs])
            for cid in clients(rows)}


def mean_of(values) -> float:
    values = [as_number(v) for v in values]
    values = [v for v in values if np.isfinite(v)]
    return float(np.mean(values)) if values else float("nan")


def as_number(value) -> float:
    return float("nan") if value is None else float(value)
