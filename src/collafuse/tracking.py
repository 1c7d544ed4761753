"""TensorBoard event files in a run folder: ``tensorboard --logdir runs`` shows every run.

Both engines write through :class:`Tracker` (``<run folder>/tensorboard/``), one step per
round: ``loss/<party>`` (parties named as in the cost tables: ``server``, ``client:<id>``),
``lr/<party>``, ``bytes/<party>`` (what the party sent the server that round) and, every
``train.sample_every`` rounds and at the end, ``samples/<id>`` grids. The Flower server knows
the clients' losses and bytes from their replies but never their images: its grids are its own
hand-overs, ``handover/s=<cut>``. The sweep adds its KID rows (:func:`log_sweep_rows`).

The writer is torch's ``SummaryWriter`` over the ``tensorboard`` package; nothing here reads
events back or draws anything.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .data.transforms import grid_array

EVENTS_DIR = "tensorboard"
SWEEP_EVENTS = "sweep"  # under the sweep folder's tensorboard/
# sweep rows drawn over the cut ratio (step = round(100 c)): what the paper's Figure 3 plots
SWEEP_SCALARS = ("kid_holdout", "kid_train", "disclosure_mse", "disclosure_kid")


class Tracker:
    """TensorBoard events in the folder ``log_dir``. ``resume_round`` > 0: events a crashed
    writer left after that round are dropped (``purge_step``), since the resumed run redoes
    them."""

    def __init__(self, log_dir: str | Path, resume_round: int = 0):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(log_dir),
                                    purge_step=resume_round + 1 if resume_round else None)

    @classmethod
    def of_run(cls, run_dir: str | Path, resume_round: int = 0) -> Tracker:
        """The tracker of a run folder: its events in ``<run_dir>/tensorboard/``."""
        return cls(Path(run_dir) / EVENTS_DIR, resume_round)

    def __enter__(self) -> Tracker:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def scalars(self, group: str, values: dict[str, float | int | None], step: int) -> None:
        """``group/<name>`` for each value that exists (a party that has not trained has None)."""
        for name, value in values.items():
            if value is not None:
                self.writer.add_scalar(f"{group}/{name}", value, step)

    def grid(self, tag: str, images_uint8: np.ndarray, step: int) -> None:
        """uint8 images (N,H,W) or (N,H,W,3) as one square grid (the PNG grids' layout)."""
        nrow = int(np.ceil(np.sqrt(len(images_uint8))))
        grid = grid_array(images_uint8, nrow)
        self.writer.add_image(tag, grid, step, dataformats="HW" if grid.ndim == 2 else "HWC")

    def close(self) -> None:
        self.writer.close()


def log_sweep_rows(out: str | Path, rows: list[dict]) -> None:
    """The sweep's result rows as scalars ``<column>/<client>`` over step = round(100 c), one
    events folder per protocol. Written afresh each time (the rows are the whole record)."""
    folder = Path(out) / EVENTS_DIR / SWEEP_EVENTS
    if folder.is_dir():
        for old in folder.rglob("events.out.tfevents.*"):
            old.unlink()
    for protocol in sorted({r["protocol"] for r in rows}):
        with Tracker(folder / protocol) as tracker:
            for row in (r for r in rows if r["protocol"] == protocol):
                for column in SWEEP_SCALARS:
                    tracker.scalars(column, {row["client"]: row.get(column)},
                                    round(100 * row["cut_ratio"]))
