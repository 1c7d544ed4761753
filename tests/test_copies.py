"""The near-copy ratio test (evaluation/metrics.py) on real slices of the bundled data."""

import numpy as np
import pytest

from collafuse.evaluation.metrics import (THRESHOLD, as_rows, near_copies, near_copy_ratios,
                                         nearest_neighbours)

from conftest import DEFAULT_DATA


@pytest.fixture(scope="module")
def slices():
    data = np.load(DEFAULT_DATA)
    images, site = data["images"], data["site"]
    informative = images.reshape(len(images), -1).max(1) > 0  # all-black slices copy each other
    return {s: images[(site == s) & informative] for s in ("DU", "FG", "CS")}


def test_distances_match_brute_force():
    rng = np.random.default_rng(0)
    q, r = rng.integers(0, 256, (37, 8, 8), dtype=np.uint8), rng.integers(0, 256, (90, 8, 8), dtype=np.uint8)
    brute = np.linalg.norm(as_rows(q).numpy()[:, None] - as_rows(r).numpy()[None], axis=2)
    d2, index = nearest_neighbours(q, r, k=5, block=8)  # several blocks
    np.testing.assert_allclose(d2.sqrt().numpy(), np.sort(brute, 1)[:, :5], rtol=1e-9, atol=1e-9)
    np.testing.assert_array_equal(index.numpy(), np.argsort(brute, 1, kind="stable")[:, :5])
    # uint8 images are measured in [-1, 1]: one step of 255 levels is 2.0
    d2, _ = nearest_neighbours(np.zeros((1, 1, 1), np.uint8), np.full((1, 1, 1), 255, np.uint8))
    assert d2[0, 0] == 4.0


def test_planted_copies_are_found_and_new_images_are_not(slices):
    train = slices["DU"]
    planted = near_copies(train[::7], train, baseline=slices["CS"])
    assert planted.fraction == 1.0  # every query sits on a training image: ratio 0
    assert planted.baseline_fraction <= 0.02  # another hospital's slices are new images
    # a copy with a little noise (a grey level) is still singled out by its nearest image
    rng = np.random.default_rng(0)
    noisy = np.clip(train[::7].astype(int) + rng.integers(-1, 2, train[::7].shape), 0, 255).astype(np.uint8)
    assert near_copies(noisy, train).fraction >= 0.9


def test_ratio_is_near_one_for_new_images_and_threshold_is_the_papers(slices):
    ratios = near_copy_ratios(slices["FG"], slices["DU"])
    assert 0.6 < np.median(ratios) < 1.0
    assert np.all((ratios >= 0) & (ratios <= 1))
    assert THRESHOLD == pytest.approx(0.5 / 3)


def test_features_and_validation():
    rng = np.random.default_rng(1)
    feats = rng.normal(size=(60, 16))
    result = near_copies(feats[:10], feats[10:], baseline=feats[:10] + 0.0)
    assert result.fraction == result.baseline_fraction  # the same rows give the same answer
    assert result.neighbours == 50
    with pytest.raises(ValueError, match="differ in size"):
        near_copy_ratios(feats[:, :8], feats)
    with pytest.raises(ValueError, match="non-empty"):
        near_copy_ratios(feats[:0], feats)
