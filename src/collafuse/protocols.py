"""The two training protocols (docs/design.md section 3): what a client sends, the server's loss.

``shared-noise`` is the paper's: the client sends (x_t, t, eps) for every image whose drawn t
the server owns, and the server regresses eps. ``noisy-data`` never shows the server any noise:
each image goes out as one fixed view y at the hand-over level s-1; the server re-noises y with
its own eta to a level t >= s and minimises ||(b_t / sigma_t) eps_hat - eta||^2, whose minimiser
is the usual noise predictor of the marginal p_t (Tweedie; Daras et al. 2024).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler

from .choices import PROTOCOLS
from .diffusion import add_noise, renoise_coefficients
from .messages import Message, NoisedBatch, NoisyViews

# per-sample loss weights of the levels t, e.g. diffusion.loss_weights with its settings bound
Weighting = Callable[[torch.Tensor], torch.Tensor]


def check_protocol(protocol: str) -> str:
    if protocol not in PROTOCOLS:
        raise ValueError(f"train.protocol: expected one of {list(PROTOCOLS)}, got {protocol!r}")
    return protocol


def server_message(protocol: str, client_id: str, x_t: torch.Tensor, t: torch.Tensor,
                   eps: torch.Tensor, views: torch.Tensor, cut: int,
                   labels: torch.Tensor | None = None) -> Message:
    """What a client sends for the images of a batch whose t the server owns.

    ``views`` are those images' fixed hand-over views (only noisy-data sends them); ``labels``
    their classes, where the server's model is conditional too (model.condition = "both").
    """
    if protocol == "shared-noise":
        return NoisedBatch(client_id=client_id, x_t=x_t, t=t, eps=eps, labels=labels)
    return NoisyViews(client_id=client_id, views=views, cut=cut, labels=labels)


def server_loss(protocol: str, model_eps, scheduler: DDPMScheduler,
                messages: list[Message], generator: torch.Generator,
                noise_generator: torch.Generator | None = None,
                weighting: Weighting | None = None) -> torch.Tensor:
    """The server's loss on the union of the clients' messages of one batch index.

    ``model_eps(x_t, t)`` is the shared model's noise prediction. noisy-data draws t from
    ``generator`` (on the host) uniformly over each view's server range [s_i, T), s_i the cut
    its client made it for, and eta from ``noise_generator`` (default: the same one), on the
    views' device. ``weighting(t)`` gives per-sample loss weights (None: the plain mean).
    """
    if protocol == "shared-noise":
        x_t = torch.cat([m.x_t for m in messages])
        t = torch.cat([m.t for m in messages])
        eps = torch.cat([m.eps for m in messages])
        return _mse(model_eps(x_t, t), eps, t, weighting)
    y = torch.cat([m.views for m in messages])
    num_timesteps = scheduler.config.num_train_timesteps
    cuts = {m.cut for m in messages}
    if len(cuts) == 1:  # one cut for all: the draw every single-cut run has always made
        cut = cuts.pop()
        t = torch.randint(cut, num_timesteps, (y.shape[0],), generator=generator)
    else:  # clients with cuts of their own: t_i uniform over [s_i, T) per row
        cut = torch.cat([torch.full((m.views.shape[0],), m.cut) for m in messages])
        t = cut + (torch.rand(y.shape[0], generator=generator) * (num_timesteps - cut)).long()
    eta = torch.randn(y.shape, generator=generator if noise_generator is None else noise_generator,
                      device=y.device)
    a, b, sigma = (c.view(-1, 1, 1, 1).to(y.device, non_blocking=True)
                   for c in renoise_coefficients(scheduler, t, cut))
    x_t = a * y + b * eta
    return _mse((b / sigma) * model_eps(x_t, t), eta, t, weighting)


def local_loss(model_eps, scheduler: DDPMScheduler, x0: torch.Tensor, t: torch.Tensor,
               eps: torch.Tensor, weighting: Weighting | None = None) -> torch.Tensor:
    """The standard DDPM loss ||eps_hat(x_t, t) - eps||^2 (Ho et al. 2020, eq. 14), each
    sample weighted by ``weighting(t)`` where given."""
    return _mse(model_eps(add_noise(scheduler, x0, eps, t), t), eps, t, weighting)


def _mse(prediction: torch.Tensor, target: torch.Tensor, t: torch.Tensor,
         weighting: Weighting | None) -> torch.Tensor:
    """The mean squared error; with ``weighting``, the mean over samples of each sample's
    weight times its own mean squared error (without, exactly F.mse_loss as always)."""
    if weighting is None:
        return F.mse_loss(prediction, target)
    per_sample = (prediction - target).pow(2).flatten(1).mean(1)
    return (weighting(t).to(per_sample.device, per_sample.dtype) * per_sample).mean()
