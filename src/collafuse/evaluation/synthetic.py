"""Evaluate a set of synthetic images where the real ones live (``collafuse evaluate``).

A hospital runs this on its own node, with its own images: KID of the samples against real
images of the kind it wants (clean-fid KID on the FID Inception features, exactly the sweep's
``kid`` and ``kid_bootstrap_interval``), and, given the images the model was trained on, the
near-copy check of ``copies.py`` beside its baseline (the same check for the real images,
which the model never saw). Only numbers leave (docs/design.md section 7).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from ..data import DataError, load_images
from .kid import cached_features, kid, kid_bootstrap_interval
from .metrics import near_copies


def default_cache_dir() -> Path:
    """Where Inception features of image sets are kept between runs: $XDG_CACHE_HOME (or
    ~/.cache)/collafuse/inception; keyed by the images' bytes, so a changed set is recomputed."""
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "collafuse" / "inception"


def load_image_set(path: str | Path, image_size: int | None = None, channels: int = 1,
                   layout: str = "auto") -> np.ndarray:
    """uint8 images of an npz or image folder (any loader source), center-cropped and resized
    to ``image_size`` as ``collafuse data prepare`` does (None: as they are)."""
    images = load_images(path, image_size=image_size, channels=channels, layout=layout).images
    if len(images) < 2:
        raise DataError(f"{path}: expected at least 2 images, found {len(images)}")
    return images


def evaluate_image_sets(samples: np.ndarray, real: np.ndarray, train: np.ndarray | None = None,
                        cache_dir: Path | None = None, num_subsets: int = 100,
                        subset_size: int = 1000, seed: int = 0, progress: bool = False,
                        device: str = "cpu") -> dict:
    """KID of ``samples`` against ``real`` (mean over subsets, their std, 95% bootstrap
    interval) and, given ``train``, the near-copy fraction of the samples against it and of
    ``real`` against it (the baseline). uint8 arrays; ``samples`` and ``train`` of one size."""
    gen = cached_features(samples, cache_dir, progress=progress, device=device)
    ref = cached_features(real, cache_dir, progress=progress, device=device)
    mean, std = kid(gen, ref, num_subsets=num_subsets, subset_size=subset_size, seed=seed)
    low, high = kid_bootstrap_interval(gen, ref, seed=seed)
    result = {"kid": mean, "kid_std": std, "kid_ci_low": low, "kid_ci_high": high,
              "num_samples": len(samples), "num_real": len(real)}
    if train is not None:
        for name, images in (("SAMPLES", samples), ("REAL", real)):
            if images.shape[1:] != train.shape[1:]:
                raise DataError(f"near-copy check: {name} images are {images.shape[1:]}, TRAIN "
                                f"images {train.shape[1:]}; give one --size")
        copies = near_copies(samples, train, baseline=real)
        result.update({
            "near_copies": copies.fraction,
            "near_copies_baseline": copies.baseline_fraction,
            "near_copies_count": int((copies.ratios <= copies.threshold).sum()),
            "near_copies_baseline_count": int((copies.baseline_ratios <= copies.threshold).sum()),
            "near_copy_ratio_median": float(np.median(copies.ratios)),
            "near_copy_ratio_median_baseline": float(np.median(copies.baseline_ratios)),
            "near_copy_threshold": copies.threshold,
            "near_copy_neighbours": copies.neighbours,
            "num_train": len(train),
        })
    return result


def summary_lines(result: dict) -> list[str]:
    """What ``collafuse evaluate`` prints: one line per figure."""
    lines = [f"KID {result['kid']:.4f} (95% CI {result['kid_ci_low']:.4f} to "
             f"{result['kid_ci_high']:.4f}; std over subsets {result['kid_std']:.4f}) of "
             f"{result['num_samples']} samples against {result['num_real']} real images"]
    if "near_copies" in result:
        lines.append(
            f"near-copies of TRAIN ({result['num_train']} images): samples "
            f"{result['near_copies']:.3f} ({result['near_copies_count']}), real baseline "
            f"{result['near_copies_baseline']:.3f} ({result['near_copies_baseline_count']}); "
            f"ratio d1 / mean of {result['near_copy_neighbours']} nearest <= "
            f"{result['near_copy_threshold']:.3f}, median {result['near_copy_ratio_median']:.3f}"
            f" (real {result['near_copy_ratio_median_baseline']:.3f})")
    return lines
