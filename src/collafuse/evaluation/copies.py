"""Near-copies of training images: the nearest-neighbour ratio test of Carlini et al. 2023.

Carlini, Hayes, Nasr et al. 2023, "Extracting training data from diffusion models" (section 5.1,
their CIFAR-10 study) call a generated image x^ a copy of its nearest training image x when

    l(x^, x) = d(x^, x) / (alpha * mean_{y in S} d(x^, y))  <=  delta,

S the n training images nearest to x^ (x among them), d the Euclidean distance, n = 50,
alpha = 0.5. The calibration asks "is the nearest image much nearer than the next ones?": a
sample that sits on one training image scores near 0; one that lies between training images,
as a new image of the same kind does, scores near 1 / alpha. We work with the uncalibrated
ratio

    ratio = d_1 / mean(d_1 .. d_n)      in [0, 1],

and call a query a near-copy when ratio <= alpha * delta. delta = 1/3 is our reading of the
paper's threshold (it is a parameter: ``threshold`` = alpha * delta = 1/6 by default).

A fraction of near-copies means little on its own (two slices of one patient can be alike),
so it is always reported beside its baseline: the same statistic for real images that were
not trained on, of the same kind (docs/design.md section 7).

Distances are taken in pixel space, on images in [-1, 1] (uint8 inputs are mapped there with
x / 127.5 - 1), flattened; or on any (N, d) feature rows you pass (``as_rows`` is the one place
images become rows). Pure torch, in float64 blocks of queries, so 300 queries against 2,000
training images of 32x32 take about a second on a busy CPU.

API: ``near_copy_ratios(queries, reference)`` -> per-query ratios;
``near_copies(samples, train, baseline=None)`` -> a NearCopies summary (fractions and ratios).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

NEIGHBOURS = 50  # n: Carlini et al.'s size of the neighbourhood S
ALPHA = 0.5  # alpha: their calibration factor
DELTA = 1 / 3  # delta: their threshold on the calibrated distance (our reading of the paper)
THRESHOLD = ALPHA * DELTA  # the same test on the uncalibrated ratio d_1 / mean(d_1..d_n)


def as_rows(images: np.ndarray | torch.Tensor) -> torch.Tensor:
    """(N, ...) images or feature rows -> (N, d) float64 rows; uint8 images go to [-1, 1] first."""
    x = torch.as_tensor(np.asarray(images))
    if x.ndim < 2 or len(x) == 0:
        raise ValueError(f"near-copy test expects a non-empty (N, ...) array, got shape {tuple(x.shape)}")
    if x.dtype == torch.uint8:
        x = x.double() / 127.5 - 1.0  # the model's [-1, 1] convention (docs/design.md section 5)
    return x.reshape(len(x), -1).double()


def nearest_distances(queries, reference, n: int = NEIGHBOURS,
                      block: int = 256) -> torch.Tensor:
    """(Q, k) Euclidean distances of each query to its k = min(n, R) nearest reference rows, ascending."""
    q, r = as_rows(queries), as_rows(reference)
    if q.shape[1] != r.shape[1]:
        raise ValueError(f"queries and reference differ in size: {tuple(q.shape[1:])} vs {tuple(r.shape[1:])}")
    k = min(n, len(r))
    r_sq = (r * r).sum(1)
    out = []
    for i in range(0, len(q), block):  # a (block, R) distance matrix at a time
        qb = q[i:i + block]
        # |q - r|^2 = |q|^2 + |r|^2 - 2 q.r, clamped: rounding can make an exact copy's slightly < 0
        d2 = ((qb * qb).sum(1, keepdim=True) + r_sq - 2.0 * qb @ r.T).clamp_min_(0.0)
        out.append(torch.topk(d2, k, dim=1, largest=False, sorted=True).values.sqrt_())
    return torch.cat(out)


def near_copy_ratios(queries, reference, n: int = NEIGHBOURS) -> np.ndarray:
    """Per query: distance to its nearest reference row over the mean distance to its n nearest.

    0 for an exact copy; near 1 when the nearest neighbour is no nearer than the next n - 1.
    A query whose n nearest are all at distance 0 (copied into the reference n times) gets 0.
    """
    d = nearest_distances(queries, reference, n)
    mean = d.mean(1)
    ratio = torch.where(mean > 0, d[:, 0] / mean.clamp_min(torch.finfo(d.dtype).tiny), 0.0)
    return ratio.numpy()


@dataclass(frozen=True)
class NearCopies:
    """The copy check of a sample set against training images, beside its baseline."""

    fraction: float  # share of samples with ratio <= threshold
    ratios: np.ndarray  # per-sample ratio d_1 / mean(d_1..d_n)
    threshold: float
    neighbours: int
    baseline_fraction: float | None = None  # the same share for real images not trained on
    baseline_ratios: np.ndarray | None = None


def near_copies(samples, train, baseline=None, n: int = NEIGHBOURS,
                threshold: float = THRESHOLD) -> NearCopies:
    """Near-copy fraction of ``samples`` against ``train`` and, given ``baseline`` (real images
    of the same kind that ``train`` does not hold), the same fraction for those: the level a
    sample set that copies nothing is expected to reach."""
    ratios = near_copy_ratios(samples, train, n)
    base = None if baseline is None else near_copy_ratios(baseline, train, n)
    return NearCopies(
        fraction=float((ratios <= threshold).mean()), ratios=ratios, threshold=threshold,
        neighbours=min(n, len(train)),
        baseline_fraction=None if base is None else float((base <= threshold).mean()),
        baseline_ratios=base)
