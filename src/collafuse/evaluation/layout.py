"""Where a sweep folder keeps what: one run folder per protocol, cut ratio and training seed
(``<protocol>/c=<c>-seed=<seed>/``, two levels down, where ``collafuse audit`` looks) and the
files beside them.

Both the sweep (which writes them) and the report (which reads them) import these names from
here, so neither module imports the other.
"""

from __future__ import annotations

from pathlib import Path

RESULTS = "results"  # results.csv and results.json, one row per run and client
EVALUATION = "evaluation.json"  # a run's evaluated rows, kept for reruns
TRAJECTORY = "trajectory.npz"  # a run's Figure 2 frames


def run_dir(out: str | Path, protocol: str, cut_ratio: float, seed: int) -> Path:
    """The run folder of one protocol, cut ratio and training seed inside a sweep folder."""
    return Path(out) / protocol / f"c={cut_ratio:g}-seed={seed}"
