"""Image metrics on float images in [-1, 1] (uint8 images are mapped there first): what a
set of images discloses about another, and whether samples copy training images.

One nearest-neighbour search (:func:`nearest_neighbours`) serves every distance here.

Disclosure. The paper (Zipperling et al. 2024) reports the mean pixel MSE over all pairs
(server image at the cut, client real image). That measure depends only on the two sets' means
and second moments (see :func:`mean_pairwise_mse`), so it cannot see copying: exact copies of
the training images score worse than their mean image repeated. :func:`memorisation` is the
copy-sensitive measure: how much nearer the server's images lie to the client's training images
than to held-out images of the same hospital (in the style of Carlini et al. 2023), beside a
baseline with no copies. :func:`psnr` and :func:`ssim` compare images pairwise (the attacks).

Near-copies. Carlini, Hayes, Nasr et al. 2023, "Extracting training data from diffusion models"
(section 5.1, their CIFAR-10 study) call a generated image x^ a copy of its nearest training
image x when

    l(x^, x) = d(x^, x) / (alpha * mean_{y in S} d(x^, y))  <=  delta,

S the n training images nearest to x^ (x among them), d the Euclidean distance, n = 50,
alpha = 0.5. The calibration asks "is the nearest image much nearer than the next ones?": a
sample that sits on one training image scores near 0; one that lies between training images,
as a new image of the same kind does, scores near 1 / alpha. We work with the uncalibrated
ratio

    ratio = d_1 / mean(d_1 .. d_n)      in [0, 1],

and call a query a near-copy when ratio <= alpha * delta. delta = 1/3 is our reading of the
paper's threshold (it is a parameter: ``threshold`` = alpha * delta = 1/6 by default).

The two copy statistics answer different questions, and the sweep reports both:
:func:`memorisation` compares a sample's nearest training image with its nearest held-out
image of the hospital (needs held-out patients); :func:`near_copies` compares a sample's
nearest training image with its next ones (needs only the training images). A fraction of
either means little on its own (two slices of one patient can be alike), so it is always
reported beside its baseline: the same statistic for real images that were not trained on, of
the same kind (docs/design.md section 7).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

NEIGHBOURS = 50  # n: Carlini et al.'s size of the neighbourhood S
ALPHA = 0.5  # alpha: their calibration factor
DELTA = 1 / 3  # delta: their threshold on the calibrated distance (our reading of the paper)
THRESHOLD = ALPHA * DELTA  # the same test on the uncalibrated ratio d_1 / mean(d_1..d_n)


def as_rows(images: np.ndarray | torch.Tensor, name: str = "images") -> torch.Tensor:
    """(N, ...) images or feature rows -> (N, d) float64 rows; uint8 images go to [-1, 1] first."""
    x = torch.as_tensor(np.asarray(images))
    if x.ndim < 2 or len(x) == 0:
        raise ValueError(f"{name}: expected a non-empty (N, ...) array, got shape {tuple(x.shape)}")
    if x.dtype == torch.uint8:
        x = x.double() / 127.5 - 1.0  # the model's [-1, 1] convention (docs/design.md section 5)
    return x.reshape(len(x), -1).double()


def _pair_of_rows(queries, reference) -> tuple[torch.Tensor, torch.Tensor]:
    q, r = as_rows(queries, "queries"), as_rows(reference, "reference")
    if q.shape[1] != r.shape[1]:
        raise ValueError(f"images differ in size: {q.shape[1]} vs {r.shape[1]} values per image")
    return q, r


def nearest_neighbours(queries, reference, k: int = 1,
                       block: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """The k = min(k, R) nearest reference rows of each query: (Q, k) squared Euclidean
    distances, ascending, and (Q, k) their indices into ``reference``.

    Searched in float64 blocks of ``block`` queries, so Q x R distances never sit in memory at
    once. The
    nearest one is then recomputed as a plain sum of squares: ||q||^2 + ||r||^2 - 2 q.r cancels
    badly, and an image against itself must give exactly 0.
    """
    q, r = _pair_of_rows(queries, reference)
    k = min(k, len(r))
    r_sq = (r * r).sum(1)
    dists, index = [], []
    for i in range(0, len(q), block):
        qb = q[i:i + block]
        d2 = ((qb * qb).sum(1, keepdim=True) + r_sq - 2.0 * qb @ r.T).clamp_min_(0.0)
        top = torch.topk(d2, k, dim=1, largest=False, sorted=True)
        dists.append(top.values)
        index.append(top.indices)
    d2, idx = torch.cat(dists), torch.cat(index)
    d2[:, 0] = ((q - r[idx[:, 0]]) ** 2).sum(1)
    return d2, idx


# ---------------------------------------------------------------- disclosure


def mean_pairwise_mse(a, b) -> float:
    """mean over all pairs (i, j) of MSE(a_i, b_j), in closed form.

    mean_ij ||a_i - b_j||^2 / D = mean_i ||a_i||^2 / D + mean_j ||b_j||^2 / D
                                  - 2 (a_bar . b_bar) / D,
    because the cross term mean_ij a_i . b_j factorises into a_bar . b_bar (a_bar = mean_i a_i).
    """
    a, b = _pair_of_rows(a, b)
    d = a.shape[1]
    cross = a.mean(dim=0) @ b.mean(dim=0)
    return float((a * a).mean() + (b * b).mean() - 2.0 * cross / d)


def nearest_neighbour_mse(a, b) -> np.ndarray:
    """(N,) float64: for each a_i, min_j MSE(a_i, b_j)."""
    d2, _ = nearest_neighbours(a, b)
    return (d2[:, 0] / int(np.prod(np.shape(a)[1:]))).numpy()


def mean_nearest_neighbour_mse(a, b) -> float:
    """Mean over a of the nearest-neighbour MSE to b."""
    return float(nearest_neighbour_mse(a, b).mean())


# Nearest-neighbour distances are RMS pixel differences in [-1, 1]; the floor keeps the ratio of
# two exact matches (blank slices match blank slices of every patient) at 1 instead of 0 / 0.
_DISTANCE_FLOOR = 1e-6
# A sample three times nearer to some training image than to any held-out image counts as a
# copy (a ratio threshold as in Carlini et al. 2023 and Somepalli et al. 2023).
COPY_RATIO = 1 / 3


def memorisation(samples, train, reference, probe) -> dict:
    """Copy-sensitive disclosure of ``samples`` about the ``train`` images.

    For each sample x: d_train(x), d_ref(x) = nearest-neighbour distances (RMS per pixel) to the
    training images and to ``reference``, held-out patients of the same hospital; ratio =
    d_train / d_ref (0 for an exact copy). Reported: ``nearer_train``, the fraction with
    d_train < d_ref; ``distance_ratio``, the median ratio; ``copy_fraction``, the fraction with
    ratio < 1/3. Training holds more images than the reference, so even new images of the
    hospital lean towards it; the ``baseline_*`` figures are the same statistics for ``probe``,
    other held-out patients of the hospital, which copy nothing by construction. Memorisation
    shows as a fraction above its baseline, or a ratio below it.
    """
    out = {}
    for prefix, x in (("", samples), ("baseline_", probe)):
        d_train = np.sqrt(nearest_neighbour_mse(x, train)) + _DISTANCE_FLOOR
        ratio = d_train / (np.sqrt(nearest_neighbour_mse(x, reference)) + _DISTANCE_FLOOR)
        out[f"{prefix}nearer_train"] = float(np.mean(ratio < 1))
        out[f"{prefix}distance_ratio"] = float(np.median(ratio))
        out[f"{prefix}copy_fraction"] = float(np.mean(ratio < COPY_RATIO))
    return out


def _paired(x, ref) -> tuple[np.ndarray, np.ndarray]:
    x, ref = np.asarray(x, dtype=np.float64), np.asarray(ref, dtype=np.float64)
    if x.shape != ref.shape or x.ndim < 2:
        raise ValueError(f"x and ref must have the same shape (N, ...), got {x.shape} and {ref.shape}")
    return x, ref


def psnr(x, ref, data_range: float = 2.0) -> np.ndarray:
    """(N,) peak signal-to-noise ratio in dB per image; inf where x_i == ref_i."""
    x, ref = _paired(x, ref)
    mse = ((x - ref) ** 2).reshape(len(x), -1).mean(axis=1)
    with np.errstate(divide="ignore"):
        return 10.0 * np.log10(data_range ** 2 / mse)


def _gaussian_window(size: int, sigma: float) -> torch.Tensor:
    g = torch.exp(-((torch.arange(size, dtype=torch.float64) - (size - 1) / 2) ** 2) / (2 * sigma ** 2))
    g = g / g.sum()
    return torch.outer(g, g)


def ssim(x, ref, data_range: float = 2.0, win_size: int = 11, sigma: float = 1.5) -> np.ndarray:
    """(N,) structural similarity per image (Wang et al. 2004), mean over channels and pixels.

    Images (N, H, W) or (N, C, H, W); Gaussian window (11, sigma 1.5), K1 = 0.01, K2 = 0.03,
    statistics over the 'valid' positions only (as Wang et al.'s reference code). Images smaller
    than the window get the largest odd window that fits.
    """
    x, ref = _paired(x, ref)
    if x.ndim == 3:
        x, ref = x[:, None], ref[:, None]
    if x.ndim != 4:
        raise ValueError(f"ssim expects (N, H, W) or (N, C, H, W), got {x.shape}")
    c = x.shape[1]
    size = min(win_size, x.shape[2], x.shape[3])
    size -= 1 - size % 2
    window = _gaussian_window(size, sigma).expand(c, 1, size, size).contiguous()

    def filt(t: torch.Tensor) -> torch.Tensor:
        return F.conv2d(t, window, groups=c)

    tx, ty = torch.from_numpy(x), torch.from_numpy(ref)
    mu_x, mu_y = filt(tx), filt(ty)
    var_x = filt(tx * tx) - mu_x ** 2
    var_y = filt(ty * ty) - mu_y ** 2
    cov = filt(tx * ty) - mu_x * mu_y
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    s = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x ** 2 + mu_y ** 2 + c1) * (var_x + var_y + c2))
    return s.mean(dim=(1, 2, 3)).numpy()


# ---------------------------------------------------------------- near-copies


def near_copy_ratios(queries, reference, n: int = NEIGHBOURS) -> np.ndarray:
    """Per query: distance to its nearest reference row over the mean distance to its n nearest.

    0 for an exact copy; near 1 when the nearest neighbour is no nearer than the next n - 1.
    A query whose n nearest are all at distance 0 (copied into the reference n times) gets 0.
    """
    d = nearest_neighbours(queries, reference, n)[0].sqrt()
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
