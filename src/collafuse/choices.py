"""The names a config field may take, each list written once.

The config checks (collafuse.config), the CLI's choices, the parts that act on a name (the
diffusion math, the model factory, the data loaders and partitions, the protocols) and the
Flower node's policy all read them from here. This module imports nothing, so every layer
may use it, and a ClientApp that only says hello imports no torch to check a config.
"""

from __future__ import annotations

from dataclasses import dataclass

PROTOCOLS = ("shared-noise", "noisy-data")  # train.protocol (collafuse.protocols)
SAMPLERS = ("ddpm", "ddim")  # sample.sampler: ancestral, or deterministic (Song et al. 2021)
PREDICTIONS = ("epsilon", "v")  # model.prediction (collafuse.diffusion.eps_from_output)
LOSS_WEIGHTINGS = ("uniform", "min-snr")  # train.loss_weighting (collafuse.diffusion.loss_weights)
LR_SCHEDULES = ("constant", "cosine")  # train.lr_schedule (collafuse.optim.lr_factor)
CONDITIONS = ("none", "both", "client")  # model.condition: where the class label goes
CHANNELS = (1, 3)  # data.channels: grayscale or RGB
INTENSITIES = ("none", "percentile")  # data.intensity (collafuse.data.normalise_intensity)
PARTITIONS = ("site", "label", "patient", "iid", "dirichlet")  # data.partition
DIRICHLET_BY = ("site", "label")  # data.dirichlet_by: what a "dirichlet" partition skews over
# data.layout's folder-level words -> the image field each fills (skip: a level not read)
LAYOUT_LEVELS = {"site": "site", "class": "label", "label": "label", "patient": "patient",
                 "skip": None}


@dataclass(frozen=True)
class Preset:
    """A UNet size (collafuse.models.make_unet builds it)."""

    block_out_channels: tuple[int, ...]
    layers_per_block: int
    attention_at_lowest: bool
    norm_num_groups: int
    note: str


# model.preset and clients.<id>.preset
PRESETS = {
    "tiny": Preset((16, 32), 1, False, 8, "tests: seconds on a CPU, any size divisible by 2"),
    "small": Preset((32, 64, 64), 2, True, 8, "CPU runs at 32x32 or 64x64, about 1.6 M parameters"),
    # small with its two upper levels at half width: 1.0 M parameters, a round in 55% of the
    # time at 32x32 (README, "Sample quality of the default run")
    "narrow": Preset((16, 32, 64), 2, True, 8, "32x32 on 2 CPU cores"),
    # narrow with one ResNet layer per level and no attention: 0.64 M parameters, a quickstart
    # round in 60% of narrow's time for about the same KID per round (README, "Sample quality
    # of the default run"): on 2 cores more steps of a smaller model win
    "lean": Preset((16, 32, 64), 1, False, 8, "the quickstart: 32x32 on 2 CPU cores"),
    # The paper's UNet: base width 16, multipliers 1, 2, 4, 8, attention at the lowest
    # resolution, about 2.4 M parameters at 128x128 (this one has 2.7 M).
    "paper": Preset((16, 32, 64, 128), 1, True, 8, "the paper's setting, 128x128, for a GPU"),
}


def expected(names) -> str:
    """'a', 'b' or 'c': the names as a one-line error lists them."""
    quoted = [repr(n) for n in names]
    return quoted[0] if len(quoted) == 1 else ", ".join(quoted[:-1]) + " or " + quoted[-1]
