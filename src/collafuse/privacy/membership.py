"""Membership inference against diffusion models, judged against a blind baseline.

Attacks (pure functions of an eps predictor ``model(x_t, t)``, the public schedule and images):

- loss: :func:`collafuse.privacy.attacks.membership_losses`, ||eps_hat(x_t, t) - eps||^2
  over random eps (the classic loss threshold).
- PIA (Kong et al., ICLR 2024, "An efficient membership inference attack for the diffusion
  model by proximal initialization"): the model's own eps at the lowest level it owns, on the
  noise-free point, is taken as the noise that puts x0 on the model's deterministic path
  (:func:`proximal_noise`); x_t = add_noise(x0, eps0, t) and the error is the l4 norm of
  eps_hat(x_t, t) - eps0 (to the 4th power). Two queries. The paper queries t0 = 0; a party owns only its
  levels, so t0 is the lowest one it owns (0 for a client, s for the server).
- SecMI (Duan et al., ICML 2023, "Are diffusion models vulnerable to membership inference
  attacks?"): the step-wise posterior estimation error. x_t by a deterministic DDIM inversion
  from x0 (one jump from the proximal point, as above), one DDIM step up to t + k and one
  back down, and the error ||x_t' - x_t||^2 at t (its "t-error"). Three queries.
- calibrated variants (:func:`calibrated`), in the manner of LiRA (Carlini et al., S&P 2022)
  with one reference model: log(error under the reference) - log(error under the target), the
  reference being the same architecture and recipe trained on images of no target patient.
- sample-based (:func:`sample_distance_scores`): nearest-neighbour distance of each image to a
  published set of generated images.

An attack's claim is read against two controls: the same attack on the untrained model (the
members and non-members must already be alike) and :func:`blind_scores`, a classifier telling
members from non-members from the images alone (Das et al. 2024, "Blind baselines beat
membership inference attacks for foundation models"). :func:`match_nonmembers` makes the two
sets alike on what needs no model: slice position in the volume, tumour or not, and the blind
baseline's intensity and texture statistics.

Every attack scores "larger means member"; :func:`report` gives AUC and TPR at 1% and 0.1%
FPR with bootstrap intervals.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from diffusers import DDPMScheduler

from ..data import ImageSet, to_model
from ..diffusion import Denoiser, add_noise, ddim_move
from ..evaluation.metrics import nearest_neighbour_mse
from .attacks import fpr_threshold, membership_losses, roc_auc, score_timesteps, tpr_at_fpr

FPRS = (0.01, 0.001)
ATTACKS = ("loss", "secmi", "pia")


@dataclass(frozen=True)
class AttackLevels:
    """Where the attacks query a model whose levels are [lo, hi): the proximal query at
    ``proximal`` (= lo), the error read at ``attack``, SecMI's step up to ``attack + interval``
    (interval 0: the party owns one level, SecMI does not apply)."""

    lo: int
    hi: int
    proximal: int
    attack: int
    interval: int


def attack_levels(lo: int, hi: int, num_timesteps: int) -> AttackLevels | None:
    """The levels of the attacks on a party owning [lo, hi); None if it owns none.

    The lowest owned level is the proximal one (PIA's t0 = 0 where the party owns it). The
    error is read 10% of T above it: PIA's and SecMI's best levels (t = 200 and 100 of a linear
    T = 1000) sit where the image is still clear but the denoiser must know it; SecMI's step is
    2% of T (its 10 of 1000 gave a one-level step here). Both are clipped into the range.
    """
    if hi <= lo:
        return None
    interval = min(max(1, round(0.02 * num_timesteps)), hi - 1 - lo)
    attack = max(lo, min(lo + max(1, round(0.1 * num_timesteps)), hi - 1 - interval))
    return AttackLevels(lo, hi, lo, attack, interval)


def _batched(fn, images: torch.Tensor, batch_size: int) -> np.ndarray:
    return torch.cat([fn(images[i:i + batch_size])
                      for i in range(0, len(images), batch_size)]).double().numpy()


def _levels(level: int, like: torch.Tensor) -> torch.Tensor:
    return torch.full((len(like),), level, dtype=torch.long)


@torch.no_grad()
def proximal_noise(model: Denoiser, scheduler: DDPMScheduler, x0: torch.Tensor,
                   level: int) -> torch.Tensor:
    """eps0 = eps_hat(sqrt(abar_t0) x0, t0): the model's noise at the noise-free point of level
    t0 (PIA's "proximal initialisation"; at t0 = 0, sqrt(abar_0) x0 ~ x0 as in the paper)."""
    t = _levels(level, x0)
    return model(add_noise(scheduler, x0, torch.zeros_like(x0), t), t)


def _mean_square(x: torch.Tensor) -> torch.Tensor:
    return x.pow(2).flatten(1).mean(dim=1)


@torch.no_grad()
def pia_errors(model: Denoiser, scheduler: DDPMScheduler, images: torch.Tensor,
               levels: AttackLevels, batch_size: int = 256) -> np.ndarray:
    """(N,) PIA errors mean(|eps_hat(x_t, t) - eps0|^4) with x_t = add_noise(x0, eps0, t);
    small for an image the model has memorised (its path through x0 is the model's own).

    The l4 norm (one of the l_p norms Kong et al. compare), raised to the 4th power, which ranks
    alike; chosen by measurement: on an earlier trained planted model (tests/test_membership.py
    at T = 20, 600 steps) it gave AUC 0.826 where the squared l2 norm gave 0.819 and the l1 norm
    0.787, and it was ahead of l2 at every checkpoint measured."""
    def errors(x0):
        eps0 = proximal_noise(model, scheduler, x0, levels.proximal)
        t = _levels(levels.attack, x0)
        return (model(add_noise(scheduler, x0, eps0, t), t) - eps0).abs().pow(4) \
            .flatten(1).mean(dim=1)
    return _batched(errors, images, batch_size)


@torch.no_grad()
def secmi_errors(model: Denoiser, scheduler: DDPMScheduler, images: torch.Tensor,
                 levels: AttackLevels, batch_size: int = 256) -> np.ndarray:
    """(N,) SecMI t-errors ||x_t' - x_t||^2: x_t the deterministic inversion of x0 to t, x_t'
    after one DDIM step up to t + k and one back (Duan et al. 2023, eq. 8). Raises if the party
    owns a single level (no step to take)."""
    if levels.interval < 1:
        raise ValueError(f"secmi_errors: the party owns one level ({levels.lo}); SecMI needs two")

    def errors(x0):
        t, up = _levels(levels.attack, x0), _levels(levels.attack + levels.interval, x0)
        x_t = add_noise(scheduler, x0, proximal_noise(model, scheduler, x0, levels.proximal), t)
        x_up = ddim_move(scheduler, x_t, model(x_t, t), t, up)
        x_back = ddim_move(scheduler, x_up, model(x_up, up), up, t)
        return _mean_square(x_back - x_t)
    return _batched(errors, images, batch_size)


def loss_errors(model: Denoiser, scheduler: DDPMScheduler, images: torch.Tensor,
                levels: AttackLevels, seed: int = 0) -> np.ndarray:
    """(N,) the loss attack's per-image denoising loss over 8 levels spread over [lo, hi)."""
    return membership_losses(model, scheduler, images, score_timesteps(levels.lo, levels.hi),
                             seed)


def attack_errors(name: str, model: Denoiser, scheduler: DDPMScheduler, images: torch.Tensor,
                  levels: AttackLevels, seed: int = 0) -> np.ndarray:
    """(N,) errors of attack ``name`` (one of ATTACKS); small means member."""
    if name == "loss":
        return loss_errors(model, scheduler, images, levels, seed)
    if name == "secmi":
        return secmi_errors(model, scheduler, images, levels)
    if name == "pia":
        return pia_errors(model, scheduler, images, levels)
    raise ValueError(f"attack: expected one of {list(ATTACKS)}, got {name!r}")


def calibrated(target_errors, reference_errors, floor: float = 1e-12) -> np.ndarray:
    """log(reference error) - log(target error): how much better the target model does on an
    image than a model that never saw it (larger means member). The log makes it a ratio, so
    images that are hard for every model (bright, detailed) lose their advantage. With several
    references (``reference_errors`` of shape (K, N)) their mean log error: one reference's
    own training noise moves single images' scores, and averaging K steadies them."""
    target = np.maximum(np.asarray(target_errors, float), floor)
    reference = np.maximum(np.atleast_2d(np.asarray(reference_errors, float)), floor)
    return np.log(reference).mean(axis=0) - np.log(target)


def sample_distance_scores(samples: torch.Tensor, images: torch.Tensor) -> np.ndarray:
    """(N,) minus each image's nearest-neighbour MSE to the generated ``samples``: a published
    sample set that copies training images sits nearer to them (larger means member)."""
    return -nearest_neighbour_mse(images.double().numpy(), samples.double().numpy())


# ------------------------------------------------------------------------- ROC and intervals

def report(member_scores, nonmember_scores, num_boot: int = 200, seed: int = 0,
           level: float = 0.95) -> dict[str, float]:
    """AUC and TPR at 1% and 0.1% FPR (key ``tpr_1``, ``tpr_0.1``), each with a percentile
    bootstrap interval (``_lo``, ``_hi``): members and non-members resampled apart, ``num_boot``
    times. With fewer than 1000 non-members "0.1% FPR" allows no false positive at all."""
    pos, neg = np.asarray(member_scores, float), np.asarray(nonmember_scores, float)

    def stats(p, n):
        return [roc_auc(p, n), *(tpr_at_fpr(p, n, f) for f in FPRS)]
    names = ["auc", *(f"tpr_{100 * f:g}" for f in FPRS)]
    rng = np.random.default_rng(seed)
    boot = np.array([stats(rng.choice(pos, len(pos)), rng.choice(neg, len(neg)))
                     for _ in range(num_boot)])
    lo, hi = np.quantile(boot, [(1 - level) / 2, (1 + level) / 2], axis=0)
    out = {}
    for i, (name, value) in enumerate(zip(names, stats(pos, neg))):
        out.update({name: value, f"{name}_lo": float(lo[i]), f"{name}_hi": float(hi[i])})
    return out


def flagged_by_patient(member_scores, nonmember_scores, member_patients,
                       fpr: float = 0.01) -> list[tuple[str, int, int]]:
    """(patient, flagged slices, slices) of each member patient, most flagged first: a slice is
    flagged where its score exceeds the threshold of TPR at ``fpr`` FPR
    (:func:`collafuse.privacy.attacks.fpr_threshold`). Tells a TPR made of a few patients
    exposed wholly from one spread thinly over many."""
    flagged = np.asarray(member_scores, float) > fpr_threshold(nonmember_scores, fpr)
    patients = np.asarray(member_patients).astype(str)
    out = [(str(p), int(flagged[patients == p].sum()), int((patients == p).sum()))
           for p in np.unique(patients)]
    return sorted(out, key=lambda r: (-r[1], r[0]))


# ------------------------------------------------------------------------- blind baseline

BLIND_FEATURES = (*(f"intensity bin {k}" for k in range(8)), "mean intensity",
                  "intensity std", "foreground fraction", "horizontal texture",
                  "vertical texture")


def blind_features(images: torch.Tensor) -> torch.Tensor:
    """(N, 13) global features, named by BLIND_FEATURES, anyone can compute without a model: an 8-bin intensity
    histogram, the mean, the standard deviation, the fraction of non-background pixels and the
    mean absolute horizontal and vertical differences (texture).

    No layout features (the image pooled to a grid): members and non-members are different
    patients, and with layout a classifier cross-validated over slices learns to recognise the
    patients whose other slices it trained on (on matched DU sets, AUC 0.82 with a 4x4 layout
    against 0.48 without), which no attack on a new image can do.
    """
    x = images.double().mean(dim=1, keepdim=True)  # channels averaged
    flat = x.flatten(1)
    edges = torch.linspace(-1.0, 1.0, 9, dtype=torch.float64)[1:-1]
    bins = torch.bucketize(flat, edges)
    hist = torch.stack([(bins == b).double().mean(dim=1) for b in range(8)], dim=1)
    texture = torch.stack([x.diff(dim=-1).abs().flatten(1).mean(1),
                           x.diff(dim=-2).abs().flatten(1).mean(1)], dim=1)
    return torch.cat([hist, flat.mean(1, keepdim=True), flat.std(1, keepdim=True),
                      (flat > -0.95).double().mean(1, keepdim=True), texture], dim=1)


def _logistic_fit(x: torch.Tensor, y: torch.Tensor, l2: float) -> torch.Tensor:
    """Weights (with a bias last) of an L2-penalised logistic regression, by L-BFGS."""
    w = torch.zeros(x.shape[1] + 1, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w], max_iter=200, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        logits = x @ w[:-1] + w[-1]
        loss = torch.nn.functional.binary_cross_entropy_with_logits(logits, y)
        loss = loss + l2 * w[:-1].pow(2).sum()
        loss.backward()
        return loss
    opt.step(closure)
    return w.detach()


def blind_scores(member_images: torch.Tensor, nonmember_images: torch.Tensor, folds: int = 5,
                 seed: int = 0, l2: float = 1e-2) -> tuple[np.ndarray, np.ndarray]:
    """Out-of-fold member scores (logits) of a logistic regression on :func:`blind_features`,
    cross-validated over ``folds`` folds stratified by label: (member scores, non-member scores).

    No model is queried: whatever this separates, members and non-members differ in by
    themselves, and a model attack's claim counts only beyond it.
    """
    x = blind_features(torch.cat([member_images, nonmember_images]))
    y = torch.cat([torch.ones(len(member_images)), torch.zeros(len(nonmember_images))]).double()
    rng = np.random.default_rng(seed)
    fold = np.empty(len(y), dtype=int)
    for label in (1.0, 0.0):
        rows = np.flatnonzero(y.numpy() == label)
        fold[rng.permutation(rows)] = np.arange(len(rows)) % folds
    scores = np.empty(len(y))
    for k in range(folds):
        train, test = torch.from_numpy(fold != k), torch.from_numpy(fold == k)
        mean, std = x[train].mean(0), x[train].std(0).clamp(min=1e-8)
        w = _logistic_fit((x[train] - mean) / std, y[train], l2)
        scores[test.numpy()] = (((x[test] - mean) / std) @ w[:-1] + w[-1]).numpy()
    return scores[:len(member_images)], scores[len(member_images):]


# ------------------------------------------------------------------------- matching

MATCH_FEATURES = ("slice position", "tumour", *BLIND_FEATURES)
FOREGROUND = MATCH_FEATURES.index("foreground fraction")


def slice_positions(images: ImageSet) -> np.ndarray:
    """(N,) relative slice position in its patient's volume: 0 at the first slice, 1 at the
    last; 0.5 without slice metadata."""
    position = np.full(len(images), 0.5)
    if "slice_index" in images.meta and "patient" in images.meta:
        index, patient = images.meta["slice_index"].astype(float), images.meta["patient"]
        for p in np.unique(patient):
            rows = patient == p
            lo, hi = index[rows].min(), index[rows].max()
            position[rows] = (index[rows] - lo) / max(hi - lo, 1.0)
    return position


def matching_features(images: ImageSet) -> np.ndarray:
    """(N, 15), named by MATCH_FEATURES: the slice position (:func:`slice_positions`), tumour
    or not (0 without the field) and the blind baseline's image statistics
    (:func:`blind_features`)."""
    tumour = (images.meta["tumor_pixels"] > 0).astype(float) if "tumor_pixels" in images.meta \
        else np.zeros(len(images))
    return np.concatenate([slice_positions(images)[:, None], tumour[:, None],
                           blind_features(to_model(images.images)).numpy()], axis=1)


def match_nonmembers(members: ImageSet, candidates: ImageSet, num_pairs: int, seed: int = 0,
                     caliper: float = 0.25, max_uses: int = 2) -> tuple[np.ndarray, np.ndarray]:
    """(member rows, non-member rows) of up to ``num_pairs`` matched pairs.

    Each member, in random order, takes the nearest candidate with the same tumour status that
    has been taken fewer than ``max_uses`` times, by the root mean square difference of the
    other :func:`matching_features` standardised by the candidates' spread, if it lies within
    ``caliper`` (in those units); otherwise the member is left out.

    Why these choices: matching on the blind baseline's own statistics removes what it can
    see (an attack is judged by how far it beats it, so what matching leaves is what counts);
    a hospital's held-out fifth is a few patients (FG: 3, 135 slices), and with each candidate
    used once and members first drawn from as many patients as the candidates, 4 of FG's
    members found a partner (quickstart split, 0.25 over four statistics); letting a candidate
    serve two members and drawing members from all patients keeps 45 (DU and HT: 128 of 128),
    with the blind baseline at AUC 0.46-0.56. A candidate used twice appears twice among the
    non-members: the ROC weighs it twice, and the bootstrap interval is a little too narrow.
    """
    rng = np.random.default_rng(seed)
    fm, fc = matching_features(members), matching_features(candidates)
    tumour, rest = fm[:, 1], [k for k in range(fm.shape[1]) if k != 1]
    fm, fc_rest = fm[:, rest], fc[:, rest]
    scale = fc_rest.std(0)
    scale[scale == 0] = 1.0
    uses = np.zeros(len(candidates), dtype=int)
    pairs = []
    for i in rng.permutation(len(members)):
        free = np.flatnonzero((uses < max_uses) & (fc[:, 1] == tumour[i]))
        if len(free) == 0:
            continue
        dist = np.sqrt((((fc_rest[free] - fm[i]) / scale) ** 2).mean(1))
        j = int(np.argmin(dist))
        if dist[j] <= caliper:
            uses[free[j]] += 1
            pairs.append((i, free[j]))
            if len(pairs) == num_pairs:
                break
    if not pairs:
        return np.array([], dtype=int), np.array([], dtype=int)
    m, n = np.array(pairs).T
    return m, n


def shared_patients(a: ImageSet, b: ImageSet) -> set:
    """The patients in both sets (none without patient metadata): a calibration reference
    trained on a member's patient reads that member's membership backwards."""
    if "patient" not in a.meta or "patient" not in b.meta:
        return set()
    return set(np.intersect1d(a.meta["patient"], b.meta["patient"]).tolist())


def random_nonmembers(members: ImageSet, candidates: ImageSet, num_pairs: int,
                      seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Unmatched sets, as the audit drew them before: random members, random candidates."""
    rng = np.random.default_rng(seed)
    n = min(num_pairs, len(members), len(candidates))
    return rng.permutation(len(members))[:n], rng.permutation(len(candidates))[:n]
