"""Learning-rate schedules: the factor each party's base learning rate is multiplied by.

A pure function of the party's step count, so a resumed run continues the schedule exactly
from its checkpointed step count, with nothing else to save.
"""

from __future__ import annotations

import math

from .choices import LR_SCHEDULES


def lr_factor(step: int, total_steps: int, schedule: str = "constant",
              warmup_steps: int = 0) -> float:
    """The factor of the base learning rate for the optimiser step after ``step`` steps taken.

    Linear warm-up over the first ``warmup_steps`` steps ((step + 1) / warmup_steps, so the
    first step is not wasted at 0), then ``constant`` (1) or ``cosine``: half a cosine from 1
    down to 0 over the remaining steps up to ``total_steps`` (Loshchilov & Hutter 2017, SGDR
    without restarts), 0 after them.
    """
    if schedule not in LR_SCHEDULES:
        raise ValueError(f"train.lr_schedule: expected one of {list(LR_SCHEDULES)}, "
                         f"got {schedule!r}")
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return 0.5 * (1.0 + math.cos(math.pi * progress))
