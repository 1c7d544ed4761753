"""Where a sweep folder keeps what: one run folder per cut ratio and the files beside it.

Both the sweep (which writes them) and the report (which reads them) import these names from
here, so neither module imports the other.
"""

from __future__ import annotations

from pathlib import Path

RESULTS = "results"  # results.csv and results.json, one row per cut ratio and client
EVALUATION = "evaluation.json"  # a cut ratio's evaluated rows, kept for reruns
TRAJECTORY = "trajectory.npz"  # a cut ratio's Figure 2 frames


def cut_dir(out: str | Path, cut_ratio: float) -> Path:
    """The run folder of one cut ratio inside a sweep folder."""
    return Path(out) / f"c={cut_ratio:g}"
