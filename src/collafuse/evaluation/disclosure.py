"""How much of a client's images a party's data discloses: pixel distances and similarity.

Pure functions on float arrays in [-1, 1] with shape (N, ...). The paper (Zipperling et al.
2024) reports the mean pixel MSE over all pairs (server image at the cut, client real image).
That measure depends only on the two sets' means and second moments (see
:func:`mean_pairwise_mse`), so it cannot see copying: exact copies of the training images score
worse than their mean image repeated. :func:`memorisation` is the copy-sensitive measure: how
much nearer the server's images lie to the client's training images than to held-out images of
the same hospital (in the style of Carlini et al. 2023), beside a baseline with no copies.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

_NN_CHUNK = 512


def _flat(x, name: str) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    if x.ndim < 2 or len(x) == 0:
        raise ValueError(f"{name} must have shape (N, ...) with N >= 1, got {x.shape}")
    return x.reshape(len(x), -1)


def _same_dim(a: np.ndarray, b: np.ndarray) -> None:
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"images differ in size: {a.shape[1]} vs {b.shape[1]} values per image")


def mean_pairwise_mse(a, b) -> float:
    """mean over all pairs (i, j) of MSE(a_i, b_j), in closed form.

    mean_ij ||a_i - b_j||^2 / D = mean_i ||a_i||^2 / D + mean_j ||b_j||^2 / D
                                  - 2 (a_bar . b_bar) / D,
    because the cross term mean_ij a_i . b_j factorises into a_bar . b_bar (a_bar = mean_i a_i).
    """
    a, b = _flat(a, "a"), _flat(b, "b")
    _same_dim(a, b)
    d = a.shape[1]
    cross = a.mean(axis=0) @ b.mean(axis=0)
    return float(np.mean(a * a) + np.mean(b * b) - 2.0 * cross / d)


def nearest_neighbour_mse(a, b) -> np.ndarray:
    """(N,) float64: for each a_i, min_j MSE(a_i, b_j)."""
    a, b = _flat(a, "a"), _flat(b, "b")
    _same_dim(a, b)
    ta, tb = torch.from_numpy(a).float(), torch.from_numpy(b).float()
    b_sq = (tb * tb).sum(dim=1)
    nearest = torch.empty(len(ta), dtype=torch.long)
    # Search with float32 matmul (fast), in chunks so N x M distances never sit in memory at once.
    for i in range(0, len(ta), _NN_CHUNK):
        chunk = ta[i:i + _NN_CHUNK]
        dist = (chunk * chunk).sum(dim=1, keepdim=True) + b_sq - 2.0 * chunk @ tb.T
        nearest[i:i + _NN_CHUNK] = dist.argmin(dim=1)
    # Recompute the chosen pairs exactly in float64: ||a||^2 + ||b||^2 - 2ab cancels badly in
    # float32, and an image against itself must give exactly 0.
    return np.mean((a - b[nearest.numpy()]) ** 2, axis=1)


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
