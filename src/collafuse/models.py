"""Noise-prediction UNets: one factory, named presets.

Client and server models come from the same factory (the paper gives every party the same
architecture); they are plain diffusers ``UNet2DModel``s that know nothing of schedules or cuts.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from diffusers import UNet2DModel


@dataclass(frozen=True)
class Preset:
    block_out_channels: tuple[int, ...]
    layers_per_block: int
    attention_at_lowest: bool
    norm_num_groups: int
    note: str


PRESETS = {
    "tiny": Preset((16, 32), 1, False, 8, "tests: seconds on a CPU, any size divisible by 2"),
    "small": Preset((32, 64, 64), 2, True, 8, "CPU runs at 32x32 or 64x64, about 1.6 M parameters"),
    # small with its two upper levels at half width: 1.0 M parameters, a round in 55% of the
    # time at 32x32 (docs/quality.md, second study)
    "narrow": Preset((16, 32, 64), 2, True, 8, "32x32 on 2 CPU cores"),
    # narrow with one ResNet layer per level and no attention: 0.64 M parameters, a quickstart
    # round in 60% of narrow's time for about the same KID per round (docs/quality.md, fourth
    # study): on 2 cores more steps of a smaller model win
    "lean": Preset((16, 32, 64), 1, False, 8, "the quickstart: 32x32 on 2 CPU cores"),
    # The paper's UNet: base width 16, multipliers 1, 2, 4, 8, attention at the lowest
    # resolution, about 2.4 M parameters at 128x128 (this one has 2.7 M).
    "paper": Preset((16, 32, 64, 128), 1, True, 8, "the paper's setting, 128x128, for a GPU"),
}


def make_unet(preset: str, image_size: int, channels: int = 1, num_classes: int = 0) -> UNet2DModel:
    """Build the noise predictor eps_hat(x_t, t) of one party, or eps_hat(x_t, t, y) with
    ``num_classes`` > 0: a class embedding added to the time embedding, whose extra last row
    (index ``num_classes``) is the "no label" of classifier-free guidance."""
    if preset not in PRESETS:
        raise ValueError(f"model.preset: expected one of {sorted(PRESETS)}, got {preset!r}")
    p = PRESETS[preset]
    levels = len(p.block_out_channels)
    if image_size % 2 ** (levels - 1):
        raise ValueError(f"data.image_size: preset {preset!r} needs a multiple of "
                         f"{2 ** (levels - 1)}, got {image_size}")
    lowest = "AttnDownBlock2D" if p.attention_at_lowest else "DownBlock2D"
    return UNet2DModel(
        sample_size=image_size,
        in_channels=channels,
        out_channels=channels,
        block_out_channels=p.block_out_channels,
        layers_per_block=p.layers_per_block,
        down_block_types=("DownBlock2D",) * (levels - 1) + (lowest,),
        up_block_types=(lowest.replace("Down", "Up"),) + ("UpBlock2D",) * (levels - 1),
        norm_num_groups=p.norm_num_groups,
        attention_head_dim=8,
        num_class_embeds=num_classes + 1 if num_classes else None,
    )


def predict_noise(model: UNet2DModel, x_t: torch.Tensor, t: torch.Tensor,
                  labels: torch.Tensor | None = None) -> torch.Tensor:
    """eps_hat(x_t, t[, y]): the one call every party makes to its model (``labels``: class
    indices, for a conditional model only)."""
    if labels is None:
        return model(x_t, t).sample
    return model(x_t, t, class_labels=labels).sample


class EMA:
    """Exponential moving average of a model's weights, used for sampling when enabled.

    The decay warms up as min(decay, (1 + n) / (10 + n)) after n updates (as diffusers'
    EMAModel does): a fixed 0.995 would still give the random initial weights 37% of the
    average after 200 steps, which is a whole CPU run.
    """

    def __init__(self, model: torch.nn.Module, decay: float):
        if not 0.0 < decay < 1.0:
            raise ValueError(f"train.ema_decay: expected a number in (0, 1), got {decay}")
        self.decay = decay
        self.updates = 0
        self.model = copy.deepcopy(model).requires_grad_(False)

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        decay = min(self.decay, (1 + self.updates) / (10 + self.updates))
        # one fused call instead of one per parameter tensor (the same lerp, bit for bit)
        torch._foreach_lerp_(list(self.model.parameters()), list(model.parameters()), 1.0 - decay)
        self.updates += 1

    def state_dict(self) -> dict:
        return {"model": self.model.state_dict(), "updates": self.updates}

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.updates = state["updates"]
