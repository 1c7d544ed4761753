"""What an honest-but-curious server can recover: attacks as pure functions on tensors.

Each attack takes only what the server really has: the messages it received (x_t, t, eps under
shared-noise; one view y at the hand-over level s-1 under noisy-data), its own model and the
public schedule. Images are float32 NCHW in [-1, 1]; scores come from
:mod:`collafuse.evaluation.metrics` (PSNR and SSIM with data range 2, pixel MSE).

- (a) :func:`reconstruct_shared_noise`: x0 = (x_t - sqrt(1 - abar_t) eps) / sqrt(abar_t), exact;
  :func:`view_estimate`: the best the server can do from a noisy-data view alone.
- (b) :func:`collafuse.diffusion.tweedie_estimate`, :func:`~collafuse.diffusion.tweedie_from_view`:
  the server's model as a denoiser (the audit's attack b; next to the math they invert).
- (c) :func:`averaging_attack`: views with fresh noise every epoch, averaged over k epochs.
- (r) :func:`seed_replay`: views whose noise xi came from a seed the server can derive (the
  run's config) are undone exactly by regenerating xi from candidate seeds.
- (d) :func:`membership_losses`, :func:`roc_auc`, :func:`tpr_at_fpr`: loss-based membership.
- (e) :func:`memorisation`: nearest-neighbour distances of the server's samples.

Every reconstruction figure has a trivial baseline beside it, :func:`mean_image_baseline`:
guess the mean image of non-member reference images for every target, no message needed. An
attack is reported as its gain over that guess (PSNR difference in dB); a negative gain means
the attack tells the server less than a guess made without any message.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from diffusers import DDPMScheduler

from ..diffusion import Denoiser, add_noise, handover_view
from ..evaluation.metrics import nearest_neighbour_mse, psnr, ssim



def _abar(scheduler: DDPMScheduler, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """abar_t from the scheduler's own alphas_cumprod, shaped to broadcast over NCHW."""
    return scheduler.alphas_cumprod[t].to(like.dtype).view(-1, *([1] * (like.dim() - 1)))


def handover_signal(scheduler: DDPMScheduler, cut: int) -> tuple[float, float]:
    """(a, b) of the hand-over view y = a x0 + b xi: a = sqrt(abar_{s-1}), b = sqrt(1 - abar_{s-1}).

    s = 0 gives (1, 0): the "view" is the clean image.
    """
    abar = float(scheduler.alphas_cumprod[cut - 1]) if cut > 0 else 1.0
    return abar ** 0.5, (1.0 - abar) ** 0.5


def scores(x_hat: torch.Tensor, x0: torch.Tensor) -> dict[str, float]:
    """Mean pixel MSE, PSNR (dB) and SSIM of estimates against the true images.

    PSNR is the mean over images; an exact reconstruction has PSNR = inf.
    """
    x, ref = x_hat.detach().double().numpy(), x0.detach().double().numpy()
    return {"mse": float(np.mean((x - ref) ** 2)), "psnr": float(np.mean(psnr(x, ref))),
            "ssim": float(np.mean(ssim(x, ref)))}


def mean_image_baseline(targets: torch.Tensor, reference: torch.Tensor) -> dict[str, float]:
    """Scores of the trivial guess: the mean of the ``reference`` images for every target.

    The reference images are non-members (hold-out patients), so the guess uses nothing the
    client sent; any attack worth reporting must beat it.
    """
    if len(reference) == 0:
        raise ValueError("mean_image_baseline: no reference images")
    guess = reference.double().mean(dim=0, keepdim=True).expand_as(targets)
    return scores(guess, targets)


# (a) Exact reconstruction -------------------------------------------------------------------

def reconstruct_shared_noise(scheduler: DDPMScheduler, x_t: torch.Tensor, t: torch.Tensor,
                             eps: torch.Tensor) -> torch.Tensor:
    """x0 = (x_t - sqrt(1 - abar_t) eps) / sqrt(abar_t): add_noise inverted, nothing estimated."""
    abar = _abar(scheduler, t, x_t)
    return (x_t - (1.0 - abar).sqrt() * eps) / abar.sqrt()


def view_estimate(scheduler: DDPMScheduler, views: torch.Tensor, cut: int) -> torch.Tensor:
    """The server's estimate from a noisy-data view alone: y / sqrt(abar_{s-1}), clipped to [-1, 1].

    y / a = x0 + (b / a) xi is the unbiased (maximum-likelihood) estimate of x0 under the
    Gaussian view; clipping to the known pixel range can only bring it closer to x0.
    """
    a, _ = handover_signal(scheduler, cut)
    return (views / a).clamp(-1.0, 1.0)


# (b) Denoising with the server's own model: collafuse.diffusion.tweedie_estimate and
# tweedie_from_view (next to the math they invert; the sweep uses them too)


# (c) Averaging attack ------------------------------------------------------------------------

def averaging_attack(scheduler: DDPMScheduler, x0: torch.Tensor, cut: int,
                     generator: torch.Generator,
                     ks: Sequence[int] = (1, 2, 4, 8, 16, 32, 64)) -> list[dict]:
    """Views with a fresh xi every epoch, averaged by the server over k epochs.

    mean_k(y) / a = x0 + (b / a) mean_k(xi), so the error falls as b^2 / (a^2 k) (before
    clipping): one returned row per k with the measured MSE, PSNR and SSIM and this theory.
    This is why noisy-data draws xi once per image and keeps it.
    """
    a, b = handover_signal(scheduler, cut)
    total = torch.zeros_like(x0)
    rows, drawn = [], 0
    for k in sorted(ks):
        while drawn < k:
            total += handover_view(scheduler, x0, torch.randn(x0.shape, generator=generator), cut)
            drawn += 1
        estimate = (total / k / a).clamp(-1.0, 1.0)
        rows.append({"k": k, **scores(estimate, x0), "mse_theory": b * b / (a * a * k)})
    return rows


# (r) Seed replay -----------------------------------------------------------------------------

def _differences(x: torch.Tensor) -> torch.Tensor:
    """(N, m) horizontal and vertical first differences D x of NCHW images, as float32 rows."""
    x = x.float()
    return torch.cat([x.diff(dim=-1).flatten(1), x.diff(dim=-2).flatten(1)], dim=1)


def seed_replay(scheduler: DDPMScheduler, views: torch.Tensor, cut: int, num_images: int,
                seeds: Sequence[int], tol: float = 1e-3) -> tuple[torch.Tensor, torch.Tensor]:
    """Undo views y = a x0 + b xi whose xi the server can regenerate from a candidate seed.

    For each seed the server draws xi' = randn((N, C, H, W)) from
    ``torch.Generator().manual_seed(seed)`` (all N client images at once, in image order, as
    the noise would have been drawn) and, for every view and every row j, the estimate
    x_j = (y - b xi'_j) / a. It knows neither x0 nor which image a view came from. It keeps the
    row whose x_j has the least high-frequency energy ||D x_j||^2 (D: first differences), one
    matrix product per seed since
    ||D(y - b xi'_j)||^2 = ||Dy||^2 - 2b <Dy, D xi'_j> + b^2 ||D xi'_j||^2.

    Decision, with m differences per image (E ||D xi||^2 = 2m for white noise): the right row
    removes the noise, ||D(y - b xi)||^2 = ||Dy||^2 - b^2 ||D xi||^2 - 2ab <Dx0, D xi>, about
    2 b^2 m below ||Dy||^2; a wrong row adds independent noise, about 2 b^2 m above. A row is
    accepted if it lies more than b^2 m below ||Dy||^2 (halfway) and its estimate stays in
    [-1 - tol, 1 + tol] (the pixel range). Otherwise the view keeps :func:`view_estimate`.

    Returns the estimates (N_views, C, H, W) and a bool mask of the views undone.
    """
    fallback = view_estimate(scheduler, views, cut)
    found = torch.zeros(len(views), dtype=torch.bool)
    a, b = handover_signal(scheduler, cut)
    if b == 0.0 or len(views) == 0:
        return fallback, found
    dy = _differences(views)
    best = torch.full((len(views),), -b * b * dy.shape[1])
    estimate = fallback.clone()
    for seed in seeds:
        generator = torch.Generator().manual_seed(seed)
        xi = torch.randn((num_images, *views.shape[1:]), generator=generator)
        dxi = _differences(xi)
        drop = b * b * (dxi * dxi).sum(dim=1) - 2.0 * b * (dy @ dxi.T)  # (views, N)
        value, row = drop.min(dim=1)
        candidate = (views - b * xi[row]) / a
        in_range = candidate.flatten(1).abs().amax(dim=1) <= 1.0 + tol
        better = in_range & (value < best)
        best = torch.where(better, value, best)
        estimate[better] = candidate[better].clamp(-1.0, 1.0)
        found |= better
    return estimate, found


# (d) Membership inference -------------------------------------------------------------------

def score_timesteps(cut: int, num_timesteps: int, count: int = 8) -> list[int]:
    """Up to ``count`` server timesteps t >= s, evenly spaced from s (empty when s = T)."""
    if cut >= num_timesteps:
        return []
    return sorted({round(v) for v in np.linspace(cut, num_timesteps - 1, count).tolist()})


@torch.no_grad()
def membership_losses(model: Denoiser, scheduler: DDPMScheduler, images: torch.Tensor,
                      timesteps: Sequence[int], seed: int = 0, num_draws: int = 2,
                      batch_size: int = 256) -> np.ndarray:
    """(N,) per-image denoising loss ||eps_hat(x_t, t) - eps||^2, averaged over the timesteps
    and ``num_draws`` noise draws.

    The noise draws depend only on ``seed`` and the image's position, so two image sets of the
    same size are scored with the same noise (common random numbers). A model that memorised
    an image denoises it better: low loss suggests "member".
    """
    if not timesteps:
        raise ValueError("membership_losses: no server timesteps to score (s = T)")
    generator = torch.Generator().manual_seed(seed)
    losses = torch.zeros(len(images), dtype=torch.float64)
    for _ in range(num_draws):
        for step in timesteps:
            eps = torch.randn(images.shape, generator=generator)
            for i in range(0, len(images), batch_size):
                x0, e = images[i:i + batch_size], eps[i:i + batch_size]
                t = torch.full((len(x0),), step, dtype=torch.long)
                err = (model(add_noise(scheduler, x0, e, t), t) - e) ** 2
                losses[i:i + batch_size] += err.flatten(1).mean(dim=1).double()
    return (losses / (num_draws * len(timesteps))).numpy()


def _ranks(values: np.ndarray) -> np.ndarray:
    """1-based ranks with ties given their average rank."""
    order = np.argsort(values, kind="mergesort")
    ranks = np.empty(len(values))
    ranks[order] = np.arange(1, len(values) + 1)
    sorted_values = values[order]
    _, first, counts = np.unique(sorted_values, return_index=True, return_counts=True)
    for start, count in zip(first, counts):
        if count > 1:
            ranks[order[start:start + count]] = start + (count + 1) / 2
    return ranks


def roc_auc(member_scores, nonmember_scores) -> float:
    """ROC AUC = P(member score > non-member score) + P(tie) / 2, via the Mann-Whitney U:
    AUC = (R_members - n1 (n1 + 1) / 2) / (n1 n0), R the rank sum of the members."""
    pos, neg = np.asarray(member_scores, float), np.asarray(nonmember_scores, float)
    if len(pos) == 0 or len(neg) == 0:
        raise ValueError("roc_auc: need at least one member and one non-member score")
    ranks = _ranks(np.concatenate([pos, neg]))
    return float((ranks[:len(pos)].sum() - len(pos) * (len(pos) + 1) / 2) / (len(pos) * len(neg)))


def fpr_threshold(nonmember_scores, fpr: float = 0.01) -> float:
    """The lowest threshold that flags (score > threshold) at most ``fpr`` of non-members:
    with n0 non-members at most floor(fpr n0) may exceed it, so it is the
    (floor(fpr n0) + 1)-th largest non-member score."""
    neg = np.sort(np.asarray(nonmember_scores, float))[::-1]
    if len(neg) == 0:
        raise ValueError("fpr_threshold: need at least one non-member score")
    allowed = int(np.floor(fpr * len(neg)))
    return float(neg[allowed]) if allowed < len(neg) else -np.inf


def tpr_at_fpr(member_scores, nonmember_scores, fpr: float = 0.01) -> float:
    """The largest true-positive rate at a threshold that flags at most ``fpr`` of non-members
    (:func:`fpr_threshold`)."""
    pos = np.asarray(member_scores, float)
    if len(pos) == 0 or len(nonmember_scores) == 0:
        raise ValueError("tpr_at_fpr: need at least one member and one non-member score")
    return float(np.mean(pos > fpr_threshold(nonmember_scores, fpr)))


def membership_attack(member_losses, nonmember_losses, fpr: float = 0.01) -> dict[str, float]:
    """AUC and TPR at ``fpr`` of the attack "lower loss means member" (score = -loss)."""
    pos, neg = -np.asarray(member_losses, float), -np.asarray(nonmember_losses, float)
    return {"auc": roc_auc(pos, neg), "tpr_at_fpr": tpr_at_fpr(pos, neg, fpr),
            "member_loss": float(np.mean(member_losses)),
            "nonmember_loss": float(np.mean(nonmember_losses))}


# (e) Memorisation ---------------------------------------------------------------------------

def memorisation(samples: torch.Tensor, train: torch.Tensor, holdout: torch.Tensor,
                 scale: float = 1.0) -> dict[str, float]:
    """Are the server's samples nearer to training images than to hold-out images?

    ``train`` and ``holdout`` must be the same size (nearest-neighbour distances shrink with
    the size of the set searched). The server's hand-over x_{s-1} = a x0 + b z carries noise,
    so the reference images are compared at the same signal scale a (``scale``):
    E||x_{s-1} - a x||^2 = a^2 ||x0 - x||^2 + b^2 d is smallest at the x the sample came from.
    """
    if len(train) != len(holdout):
        raise ValueError(f"memorisation: train and hold-out sets must be the same size, "
                         f"got {len(train)} and {len(holdout)}")
    x = samples.double().numpy()
    to_train = nearest_neighbour_mse(x, scale * train.double().numpy())
    to_holdout = nearest_neighbour_mse(x, scale * holdout.double().numpy())
    return {"nn_mse_train": float(to_train.mean()), "nn_mse_holdout": float(to_holdout.mean()),
            "frac_nearer_train": float(np.mean(to_train < to_holdout))}
