"""The diffusion math of CollaFuse: schedule, cut, noising and the split sampling loop.

One timestep convention everywhere (docs/design.md section 2, the diffusers convention):
t = 0 .. T-1, ``alphas_cumprod[t]`` = abar_t, ``add_noise(x0, eps, t)`` =
sqrt(abar_t) x0 + sqrt(1 - abar_t) eps, and ``scheduler.step(eps_hat, t, x_t)`` gives x_{t-1}.
With the cut index s = round(c * T) the client owns t < s and the server owns t >= s.

Everything here is a pure function over tensors; no model lives in this module except as an
argument of :func:`denoise`, and nothing else in the package re-derives a schedule or a cut.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from diffusers import DDPMScheduler

from .choices import LOSS_WEIGHTINGS, PREDICTIONS, SAMPLERS

Denoiser = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def make_scheduler(num_timesteps: int = 100) -> DDPMScheduler:
    """The cosine schedule of Nichol & Dhariwal 2021 (diffusers ``squaredcos_cap_v2``)."""
    if num_timesteps < 1:
        raise ValueError(f"num_timesteps: expected an integer >= 1, got {num_timesteps}")
    return DDPMScheduler(num_train_timesteps=num_timesteps, beta_schedule="squaredcos_cap_v2")


def cut_index(cut_ratio: float, num_timesteps: int) -> int:
    """s = round(c * T), rounding halves up (c * T = 2.5 gives 3, not Python's banker's 2).

    The client owns the s low-noise steps t < s, the server the T - s steps t >= s; c = 1 is
    all local (s = T), c = 0 all on the server (s = 0). The tiny epsilon keeps products like
    0.35 * 100 = 34.99999... from rounding the wrong way.
    """
    if not 0.0 <= cut_ratio <= 1.0 or math.isnan(cut_ratio):
        raise ValueError(f"cut_ratio: expected a number in [0, 1], got {cut_ratio}")
    return min(num_timesteps, math.floor(cut_ratio * num_timesteps + 0.5 + 1e-9))


def server_owns(t: torch.Tensor, cut: int) -> torch.Tensor:
    """Boolean mask of the timesteps the server owns (t >= s)."""
    return t >= cut


def server_timesteps(cut: int, num_timesteps: int) -> list[int]:
    """The generation steps the server runs, in order: T-1 down to s (empty when s = T)."""
    return list(range(num_timesteps - 1, cut - 1, -1))


def client_timesteps(cut: int) -> list[int]:
    """The generation steps a client runs, in order: s-1 down to 0 (empty when s = 0)."""
    return list(range(cut - 1, -1, -1))


def sampling_plan(cut: int, num_timesteps: int, steps: int = 0) -> tuple[list[int], list[int]]:
    """(server's timesteps, client's timesteps) of a sampler of ``steps`` model calls (0: all T).

    With fewer than T calls the chain still splits at the same noise level: the server's steps
    are spread evenly over [s, T) from T-1 and end at level s-1, the hand-over of the full
    chain; the client's over [0, s) from s-1. The calls are shared in proportion to the two
    ranges, at least one for a party that owns steps, so there are exactly ``steps`` of them.
    """
    full = server_timesteps(cut, num_timesteps), client_timesteps(cut)
    if steps <= 0 or steps >= num_timesteps:
        return full
    owners = (num_timesteps - cut > 0) + (cut > 0)
    if steps < owners:
        raise ValueError(f"sample.steps: {steps} call(s) cannot serve both parties; use >= 2")
    n_server = min(num_timesteps - cut, max(num_timesteps > cut,
                                            round(steps * (num_timesteps - cut) / num_timesteps)))
    n_server = min(n_server, steps - (cut > 0))
    return _spread(full[0], n_server), _spread(full[1], steps - n_server)


def _spread(timesteps: list[int], n: int) -> list[int]:
    """n of the descending ``timesteps``, evenly spaced, the first and the last included."""
    if n >= len(timesteps):
        return timesteps
    if n <= 1:
        return timesteps[:n]
    return [timesteps[round(i * (len(timesteps) - 1) / (n - 1))] for i in range(n)]


def _per_sample(values: torch.Tensor, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Gather values[t] where t lives and shape it to broadcast over a NCHW batch like ``like``.

    With t on the host (as parties draw it) the gather runs there and only its result goes to
    the device, without waiting for the device's queue."""
    out = values.to(t.device)[t].to(like.device, like.dtype, non_blocking=t.device.type == "cpu")
    return out.view(-1, *([1] * (like.dim() - 1)))


def add_noise(scheduler: DDPMScheduler, x0: torch.Tensor, eps: torch.Tensor,
              t: torch.Tensor) -> torch.Tensor:
    """x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps (Ho et al. 2020, eq. 4)."""
    abar = _per_sample(scheduler.alphas_cumprod, t, x0)
    return abar.sqrt() * x0 + (1.0 - abar).sqrt() * eps


def x0_from_eps(scheduler: DDPMScheduler, x_t: torch.Tensor, eps_hat: torch.Tensor,
                t: torch.Tensor) -> torch.Tensor:
    """x0_hat = (x_t - sqrt(1 - abar_t) eps_hat) / sqrt(abar_t), add_noise solved for x0 (Ho et
    al. 2020, eq. 15), unclipped; with the Bayes-optimal eps_hat it is Tweedie's E[x0 | x_t]."""
    abar = _per_sample(scheduler.alphas_cumprod, t, x_t)
    return (x_t - (1.0 - abar).sqrt() * eps_hat) / abar.sqrt()


def ddim_move(scheduler: DDPMScheduler, x_t: torch.Tensor, eps_hat: torch.Tensor,
              t: torch.Tensor, t_to: torch.Tensor) -> torch.Tensor:
    """The deterministic DDIM update (Song et al. 2021, eq. 12 with sigma = 0) from level t to
    level t_to, either way: add_noise(x0_hat, eps_hat, t_to). Up (t_to > t) it is the DDIM
    inversion step; down, the DDIM sampling step, unclipped so that the two invert each other
    where eps_hat does not change."""
    return add_noise(scheduler, x0_from_eps(scheduler, x_t, eps_hat, t), eps_hat, t_to)


def eps_from_output(scheduler: DDPMScheduler, output: torch.Tensor, x_t: torch.Tensor,
                    t: torch.Tensor, prediction: str = "epsilon") -> torch.Tensor:
    """eps_hat from a model's output: the output itself for ``epsilon``; for ``v`` (Salimans &
    Ho 2022, section 4) the model predicts v = sqrt(abar_t) eps - sqrt(1 - abar_t) x0, and
    eps_hat = sqrt(abar_t) v_hat + sqrt(1 - abar_t) x_t.

    Why v: at the noisiest levels abar_t -> 0 (cosine schedule: abar_99 = 2.4e-7 at T = 100),
    x0_hat = (x_t - sqrt(1 - abar_t) eps_hat) / sqrt(abar_t) multiplies an eps-model's error
    by up to 2000, and the clip of x0_hat to [-1, 1] turns that into a bias towards grey; a
    v-model's x0_hat = sqrt(abar_t) x_t - sqrt(1 - abar_t) v_hat stays bounded there.
    """
    _check_prediction(prediction)
    if prediction == "epsilon":
        return output
    abar = _per_sample(scheduler.alphas_cumprod, t, output)
    return abar.sqrt() * output + (1.0 - abar).sqrt() * x_t


def _check_prediction(prediction: str) -> None:
    if prediction not in PREDICTIONS:
        raise ValueError(f"model.prediction: expected one of {list(PREDICTIONS)}, "
                         f"got {prediction!r}")


def snr(scheduler: DDPMScheduler, t: torch.Tensor) -> torch.Tensor:
    """The signal-to-noise ratio abar_t / (1 - abar_t) of the levels t (1-D, float32)."""
    abar = scheduler.alphas_cumprod[t]
    return abar / (1.0 - abar)


def loss_weights(scheduler: DDPMScheduler, t: torch.Tensor, weighting: str = "uniform",
                 gamma: float = 5.0, prediction: str = "epsilon") -> torch.Tensor:
    """Per-sample weights of the loss on eps_hat at the levels t (1-D, on t's device); every
    party's loss is written on eps_hat, whatever its model outputs (:func:`eps_from_output`).

    ``uniform``: the plain MSE of what the model predicts: 1 for ``epsilon`` (Ho et al.
    2020's simple loss); 1 / abar_t for ``v``, since eps_hat - eps = sqrt(abar_t) (v_hat - v)
    makes ||v_hat - v||^2 = ||eps_hat - eps||^2 / abar_t. ``min-snr``: min(SNR_t, gamma) /
    SNR_t, the Min-SNR-gamma weighting of Hang et al. 2023 ("Efficient Diffusion Training via
    Min-SNR Weighting Strategy", eq. 9 written for eps-prediction): the nearly clean levels, whose
    easy, large-gradient steps otherwise dominate and conflict with the rest, are weighted
    down to gamma / SNR_t; levels noisier than SNR_t = gamma keep weight 1. The same weights
    serve ``v``: the paper's v form min(SNR_t, gamma) / (SNR_t + 1) on ||v_hat - v||^2 is
    this one on ||eps_hat - eps||^2.
    """
    if weighting not in LOSS_WEIGHTINGS:
        raise ValueError(f"train.loss_weighting: expected one of {list(LOSS_WEIGHTINGS)}, "
                         f"got {weighting!r}")
    _check_prediction(prediction)
    if weighting == "uniform" and prediction == "epsilon":
        return torch.ones(t.shape, dtype=torch.float32, device=t.device)
    if weighting == "uniform":
        return (1.0 / scheduler.alphas_cumprod[t.cpu()]).to(t.device)
    if not gamma > 0:
        raise ValueError(f"train.min_snr_gamma: expected a positive number, got {gamma}")
    ratio = snr(scheduler, t.cpu())
    return (ratio.clamp(max=gamma) / ratio).to(t.device)


def _abar_before_cut(scheduler: DDPMScheduler, cut: int | torch.Tensor) -> torch.Tensor:
    """abar_{s-1}, the signal level of the hand-over; 1 for s = 0 (the clean image). ``cut``
    may be one s per row (clients with cuts of their own)."""
    if isinstance(cut, torch.Tensor):
        abar = scheduler.alphas_cumprod[(cut - 1).clamp(min=0)]
        return torch.where(cut > 0, abar, torch.ones_like(abar))
    return scheduler.alphas_cumprod[cut - 1] if cut > 0 else torch.tensor(1.0)


def handover_view(scheduler: DDPMScheduler, x0: torch.Tensor, xi: torch.Tensor,
                  cut: int) -> torch.Tensor:
    """The noisy-data protocol's view y = add_noise(x0, xi, s-1); with s = 0 it is x0 itself."""
    abar = _abar_before_cut(scheduler, cut).to(x0.dtype)
    return abar.sqrt() * x0 + (1.0 - abar).sqrt() * xi


def renoise_coefficients(scheduler: DDPMScheduler, t: torch.Tensor,
                         cut: int | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(a_t, b_t, sigma_t) for re-noising a hand-over view y to a level t >= s.

    x_t = a_t y + b_t eta with a_t = sqrt(abar_t / abar_{s-1}), b_t = sqrt(1 - abar_t / abar_{s-1})
    has exactly the marginal of add_noise(x0, ., t) (docs/design.md section 3); sigma_t = sqrt(1 - abar_t).
    Returned as 1-D tensors over the batch. ``cut`` is s, or one s per row.
    """
    if bool((t < cut).any()):
        raise ValueError(f"renoise_coefficients: timesteps must be >= s = {cut}")
    abar = scheduler.alphas_cumprod[t]
    ratio = abar / _abar_before_cut(scheduler, cut)
    return ratio.sqrt(), (1.0 - ratio).sqrt(), (1.0 - abar).sqrt()


@torch.no_grad()
def tweedie_estimate(model: Denoiser, scheduler: DDPMScheduler, x_t: torch.Tensor,
                     t: torch.Tensor) -> torch.Tensor:
    """One-step Tweedie estimate E[x0 | x_t] = (x_t - sqrt(1 - abar_t) eps_hat(x_t, t)) / sqrt(abar_t),
    clipped to [-1, 1] (Efron 2011; Ho et al. 2020, eq. 15)."""
    return x0_from_eps(scheduler, x_t, model(x_t, t), t).clamp(-1.0, 1.0)


@torch.no_grad()
def tweedie_from_view(model: Denoiser, scheduler: DDPMScheduler, views: torch.Tensor, cut: int,
                      generator: torch.Generator, num_draws: int = 8) -> torch.Tensor:
    """The server's model applied to a noisy-data view: re-noise y to t = s, Tweedie, average.

    The server's model is trained only on t >= s, so rather than run it at t = s-1 (outside
    its range) the server re-noises y with its own eta exactly as in training,
    x_s = a_s y + b_s eta (docs/design.md section 3; b_s^2 = beta_s is small), and takes the Tweedie
    estimate E[x0 | x_s]. Averaging over eta gives E[E[x0 | x_s] | y], which by Jensen has no
    larger error than one draw: the most the server can get from y with its model in one step.
    Re-noising adds noise of variance b_s^2, so at the lowest cuts (s = 1 of T = 20, even with
    the Bayes-optimal model) the plain y / sqrt(abar_{s-1}) does better
    (:func:`collafuse.privacy.attacks.view_estimate`); the audit reports both.
    With s = 0 the view is already the clean image and is returned as is.
    """
    if cut == 0:
        return views.clone()
    t = torch.full((len(views),), cut, dtype=torch.long)
    a, b, _ = (c.view(-1, 1, 1, 1) for c in renoise_coefficients(scheduler, t, cut))
    total = torch.zeros_like(views)
    for _ in range(num_draws):
        eta = torch.randn(views.shape, generator=generator)
        total += tweedie_estimate(model, scheduler, a * views + b * eta, t)
    return total / num_draws


def guided_noise(eps_cond: torch.Tensor, eps_uncond: torch.Tensor,
                 guidance_scale: float) -> torch.Tensor:
    """Classifier-free guidance (Ho & Salimans 2022, eq. 6 with w = guidance_scale - 1):
    eps_uncond + guidance_scale (eps_cond - eps_uncond). 1 is the conditional model alone,
    0 the unconditional one, larger values push samples further towards their class."""
    return eps_uncond + guidance_scale * (eps_cond - eps_uncond)


StepHook = Callable[[int, torch.Tensor], None]


def denoise(model: Denoiser, scheduler: DDPMScheduler, x: torch.Tensor,
            timesteps: Sequence[int], generator: torch.Generator | None = None,
            on_step: StepHook | None = None) -> torch.Tensor:
    """Run the ancestral DDPM sampler over exactly the given (descending) timesteps.

    Starting from x = x_{timesteps[0]} it returns x_{timesteps[-1] - 1} (the clean image when the
    last step is t = 0). An empty range returns x unchanged, so the server with s = T hands over
    pure noise and a client with s = 0 has nothing to do. ``model(x, t)`` predicts eps; the step
    noises come from ``generator``, which must be the running party's own (docs/design.md section 2:
    a stream shared between the two halves would correlate them). ``on_step(t, x)`` sees x after
    the step at t (x_{t-1}), for recording a trajectory.
    """
    for t in timesteps:
        t_batch = torch.full((x.shape[0],), t, dtype=torch.long, device=x.device)
        eps_hat = model(x, t_batch)
        x = scheduler.step(eps_hat, t, x, generator=generator).prev_sample
        if on_step is not None:
            on_step(t, x)
    return x


def denoise_skipping(model: Denoiser, scheduler: DDPMScheduler, x: torch.Tensor,
                     timesteps: Sequence[int], end: int, eta: float,
                     generator: torch.Generator | None = None,
                     on_step: StepHook | None = None) -> torch.Tensor:
    """The generalised DDIM update (Song et al. 2021, eq. 12) from each of the descending
    ``timesteps`` to the next, and from the last to level ``end`` (-1: the clean image).

    x_prev = sqrt(abar_prev) x0_hat + sqrt(1 - abar_prev - sigma^2) eps_hat + sigma z, with
    sigma = eta sqrt((1 - abar_prev) / (1 - abar_t)) sqrt(1 - abar_t / abar_prev): eta = 0 is
    DDIM, eta = 1 the DDPM posterior over the skipped levels. x0_hat is clipped to [-1, 1] as
    the DDPM scheduler does. ``on_step(t, x)`` as in :func:`denoise`.
    """
    abar = scheduler.alphas_cumprod
    for i, t in enumerate(timesteps):
        prev = timesteps[i + 1] if i + 1 < len(timesteps) else end
        a_t = abar[t].to(x.device)
        a_prev = _abar_before_cut(scheduler, prev + 1).to(x.device)  # 1 at prev = -1
        t_batch = torch.full((x.shape[0],), t, dtype=torch.long, device=x.device)
        eps_hat = model(x, t_batch)
        x0_hat = ((x - (1 - a_t).sqrt() * eps_hat) / a_t.sqrt()).clamp(-1.0, 1.0)
        sigma = eta * ((1 - a_prev) / (1 - a_t)).sqrt() * (1 - a_t / a_prev).sqrt()
        x = a_prev.sqrt() * x0_hat + (1 - a_prev - sigma ** 2).clamp(min=0).sqrt() * eps_hat
        if eta > 0:
            x = x + sigma * torch.randn(x.shape, generator=generator, device=x.device)
        if on_step is not None:
            on_step(t, x)
    return x


def sample_steps(model: Denoiser, scheduler: DDPMScheduler, x: torch.Tensor,
                 timesteps: Sequence[int], end: int, sampler: str,
                 generator: torch.Generator | None = None,
                 on_step: StepHook | None = None) -> torch.Tensor:
    """One party's half of a sampler, from timesteps[0] down to level ``end``: the DDPM chain
    step by step where it visits every level (the loop every run has used), else
    :func:`denoise_skipping` (eta 1 for ddpm, 0 for ddim)."""
    if sampler not in SAMPLERS:
        raise ValueError(f"sampler: expected one of {list(SAMPLERS)}, got {sampler!r}")
    every_level = all(a - b == 1 for a, b in zip(timesteps, [*timesteps[1:], end]))
    if sampler == "ddpm" and every_level:
        return denoise(model, scheduler, x, timesteps, generator, on_step)
    return denoise_skipping(model, scheduler, x, timesteps, end,
                            1.0 if sampler == "ddpm" else 0.0, generator, on_step)
