"""Evaluation primitives: KID on FID Inception features, disclosure metrics, cost meter."""

import socket
from pathlib import Path

import numpy as np
import pytest
import torch

from collafuse.evaluation import costs, disclosure, kid

REPO = Path(__file__).resolve().parents[1]
DATA_CANDIDATES = [REPO / "data/lgg_flair_32.npz", REPO.parent / "shared/data/lgg-mri/lgg_flair_128.npz"]
N_PER_SET = 30


def _real_slices() -> dict[str, np.ndarray]:
    path = next((p for p in DATA_CANDIDATES if p.is_file()), None)
    if path is None:
        pytest.skip("no LGG slices found (data/lgg_flair_32.npz or shared lgg_flair_128.npz)")
    with np.load(path) as d:
        images, site = d["images"], d["site"]
    rng = np.random.default_rng(0)
    sets = {}
    for name, hospital in (("du", "DU"), ("du2", "DU"), ("ht", "HT")):
        idx = np.flatnonzero(site == hospital)
        sets[name] = images[rng.choice(idx, N_PER_SET, replace=False)]
    return sets


@pytest.fixture(scope="module")
def features():
    sets = _real_slices()
    sets["noise"] = np.random.default_rng(1).integers(0, 256, (N_PER_SET, 32, 32), dtype=np.uint8)
    return {name: kid.inception_features(images) for name, images in sets.items()}


# --- KID -------------------------------------------------------------------------------------

def test_inception_returns_pool_features():
    images = np.random.default_rng(0).integers(0, 256, (3, 20, 24, 3), dtype=np.uint8)
    feats = kid.inception_features(images, batch_size=2)
    assert feats.shape == (3, 2048) and feats.dtype == np.float64
    # pool3 follows a ReLU: non-negative, and not all zero.
    assert feats.min() >= 0 and feats.mean() > 0.05
    gray = kid.inception_features(images[..., 0])
    rgb = kid.inception_features(np.repeat(images[..., :1], 3, axis=-1))
    np.testing.assert_allclose(gray, rgb, rtol=1e-5, atol=1e-5)
    assert kid.load_inception() is kid.load_inception()


def test_inception_rejects_float_images():
    with pytest.raises(ValueError, match="uint8"):
        kid.inception_features(np.zeros((2, 8, 8), dtype=np.float32))


def test_kid_self_small_noise_large_hospitals_between(features):
    self_mean, _ = kid.kid(features["du"], features["du"], num_subsets=50, subset_size=20)
    noise_mean, _ = kid.kid(features["du"], features["noise"], num_subsets=50, subset_size=20)
    same_site, _ = kid.kid(features["du"], features["du2"], num_subsets=50, subset_size=20)
    other_site, _ = kid.kid(features["du"], features["ht"], num_subsets=50, subset_size=20)
    # Measured (30 slices, subsets of 20): self -0.017, DU vs DU 0.006, DU vs HT -0.002,
    # real vs noise 0.56. With the same rows in both sets the unbiased estimator is O(1/m)
    # negative, so "about 0" means within a few 1/m.
    assert abs(self_mean) < 0.04
    assert noise_mean > 0.3 and noise_mean > 10 * abs(self_mean)
    for between in (same_site, other_site):
        assert abs(between) < noise_mean / 10


def test_kid_seed_determinism(features):
    a, b = features["du"], features["ht"]
    assert kid.kid(a, b, num_subsets=10, subset_size=15, seed=3) == kid.kid(a, b, num_subsets=10, subset_size=15, seed=3)
    assert kid.kid(a, b, num_subsets=10, subset_size=15, seed=3) != kid.kid(a, b, num_subsets=10, subset_size=15, seed=4)


def _mmd2_loop(x, y):
    def k(u, v):
        return (u @ v / len(u) + 1) ** 3
    m = len(x)
    within = sum(k(x[i], x[j]) + k(y[i], y[j]) for i in range(m) for j in range(m) if i != j)
    cross = sum(k(x[i], y[j]) for i in range(m) for j in range(m))
    return within / (m * (m - 1)) - 2 * cross / m ** 2


def test_kid_matches_unbiased_mmd_loop():
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(7, 5)), rng.normal(0.5, 1.0, size=(7, 5))
    # subset_size = whole set: every subset is a permutation, so each equals the plain estimate.
    mean, std = kid.kid(x, y, num_subsets=3, subset_size=100)
    assert mean == pytest.approx(_mmd2_loop(x, y), rel=1e-10)
    assert std == pytest.approx(0.0, abs=1e-12)


def test_kid_same_distribution_near_zero_shifted_distribution_positive():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(400, 16)), rng.normal(size=(400, 16))
    same, same_std = kid.kid(a, b, num_subsets=20, subset_size=200)
    shifted, _ = kid.kid(a, b + 0.5, num_subsets=20, subset_size=200)
    assert abs(same) < 0.02 and same_std < 0.05
    assert shifted > 0.1


def test_kid_needs_two_rows():
    with pytest.raises(ValueError, match="at least 2"):
        kid.kid(np.zeros((1, 4)), np.zeros((5, 4)))


def test_feature_cache_roundtrip(tmp_path, monkeypatch):
    images = np.random.default_rng(0).integers(0, 256, (2, 16, 16), dtype=np.uint8)
    first = kid.cached_features(images, tmp_path / "cache")
    files = list((tmp_path / "cache").iterdir())
    assert len(files) == 1 and files[0].suffix == ".npy"

    def fail(*args, **kwargs):
        raise AssertionError("cache miss")

    monkeypatch.setattr(kid, "inception_features", fail)
    second = kid.cached_features(images, tmp_path / "cache")
    np.testing.assert_array_equal(first, second)
    assert len(list((tmp_path / "cache").iterdir())) == 1


# --- disclosure ------------------------------------------------------------------------------

def test_mean_pairwise_mse_equals_brute_force():
    rng = np.random.default_rng(0)
    a, b = rng.uniform(-1, 1, (5, 1, 4, 3)), rng.uniform(-1, 1, (7, 1, 4, 3))
    brute = np.mean([np.mean((ai - bj) ** 2) for ai in a for bj in b])
    assert disclosure.mean_pairwise_mse(a, b) == pytest.approx(brute, rel=1e-12)


def test_nearest_neighbour_mse():
    rng = np.random.default_rng(0)
    a = rng.uniform(-1, 1, (40, 1, 8, 8)).astype(np.float32)
    b = rng.uniform(-1, 1, (30, 1, 8, 8))
    np.testing.assert_array_equal(disclosure.nearest_neighbour_mse(a, a), np.zeros(40))
    brute = np.array([min(np.mean((ai - bj) ** 2) for bj in b) for ai in a.astype(np.float64)])
    np.testing.assert_allclose(disclosure.nearest_neighbour_mse(a, b), brute, rtol=1e-12)
    assert disclosure.mean_nearest_neighbour_mse(a, b) == pytest.approx(brute.mean())


def test_psnr_and_ssim_identity():
    x = np.random.default_rng(0).uniform(-1, 1, (3, 3, 16, 16))
    assert np.all(np.isinf(disclosure.psnr(x, x)))
    np.testing.assert_allclose(disclosure.ssim(x, x), 1.0, atol=1e-12)
    np.testing.assert_allclose(disclosure.ssim(x[:, 0], x[:, 0]), 1.0, atol=1e-12)


def test_psnr_known_value():
    x = np.zeros((1, 4, 4))
    # MSE 0.01 with data range 2: 10 log10(4 / 0.01) = 26.02 dB.
    assert disclosure.psnr(x + 0.1, x)[0] == pytest.approx(10 * np.log10(400))


def test_ssim_constant_images_closed_form():
    # Constant images: both variances and the covariance vanish, so
    # SSIM = (2 a b + C1) / (a^2 + b^2 + C1), with C1 = (0.01 * 2)^2.
    a, b, c1 = 0.3, -0.2, (0.01 * 2) ** 2
    x, y = np.full((1, 20, 20), a), np.full((1, 20, 20), b)
    assert disclosure.ssim(x, y)[0] == pytest.approx((2 * a * b + c1) / (a * a + b * b + c1))


def test_ssim_decreases_with_noise_and_is_symmetric():
    rng = np.random.default_rng(0)
    x = np.tanh(np.cumsum(rng.normal(size=(2, 1, 32, 32)), axis=-1) / 4)
    noise = rng.normal(size=x.shape)
    values = [disclosure.ssim(np.clip(x + s * noise, -1, 1), x).mean() for s in (0.0, 0.05, 0.1, 0.3, 1.0)]
    assert all(u > v for u, v in zip(values, values[1:]))
    y = np.clip(x + 0.2 * noise, -1, 1)
    np.testing.assert_allclose(disclosure.ssim(x, y), disclosure.ssim(y, x), rtol=1e-12)


def test_ssim_small_images_shrink_window():
    rng = np.random.default_rng(0)
    x = rng.uniform(-1, 1, (2, 3, 5, 7))
    assert disclosure.ssim(x, x) == pytest.approx(1.0)
    y = rng.uniform(-1, 1, x.shape)
    assert np.all(disclosure.ssim(x, y) < 0.5)
    # A single pixel: the window shrinks to 1x1 and SSIM reduces to the luminance term.
    c1 = (0.01 * 2) ** 2
    expected = (2 * x * y + c1) / (x * x + y * y + c1)
    assert disclosure.ssim(x[:, :, :1, :1], y[:, :, :1, :1]) == pytest.approx(expected[:, :, 0, 0].mean(axis=1))


def test_ssim_matches_skimage():
    metrics = pytest.importorskip("skimage.metrics")
    rng = np.random.default_rng(0)
    x, y = rng.uniform(-1, 1, (1, 32, 32)), rng.uniform(-1, 1, (1, 32, 32))
    ref = metrics.structural_similarity(x[0], y[0], data_range=2.0, gaussian_weights=True,
                                        sigma=1.5, use_sample_covariance=False)
    assert disclosure.ssim(x, y)[0] == pytest.approx(ref, abs=1e-6)


# --- costs -----------------------------------------------------------------------------------

def test_count_flops_linear():
    layer = torch.nn.Linear(16, 8)
    x = torch.randn(4, 16)
    out, flops = costs.count_flops(layer, x)
    assert out.shape == (4, 8)
    assert flops == 2 * 16 * 8 * 4


def test_count_flops_includes_backward():
    layer = torch.nn.Linear(16, 8)
    x = torch.randn(4, 16)
    _, flops = costs.count_flops(lambda: layer(x).sum().backward())
    # x needs no gradient, so backward is one matmul (the weight gradient) as large as forward.
    assert flops == 2 * (2 * 16 * 8 * 4)


def test_cost_meter_without_energy():
    meter = costs.CostMeter(energy=False)
    layer = torch.nn.Linear(16, 8)
    with meter.measure("client:DU", "training"):
        layer(torch.randn(4, 16))
    with meter.measure("client:DU", "training"):
        layer(torch.randn(4, 16))
    meter.add_bytes("client:DU", sent=100, received=10)
    meter.add_bytes("server", received=100, phase="training")
    rows = {(r["party"], r["phase"]): r for r in meter.rows()}
    assert rows[("client:DU", "training")]["flops"] == 2 * 2 * 16 * 8 * 4
    assert rows[("client:DU", "training")]["seconds"] > 0
    assert rows[("client:DU", "training")]["energy_kwh"] is None
    assert rows[("client:DU", "communication")]["bytes_sent"] == 100
    assert rows[("server", "training")]["bytes_received"] == 100
    assert meter.energy_is_estimate is None
    with pytest.raises(RuntimeError, match="nest"):
        with meter.measure("a", "b"), meter.measure("a", "b"):
            pass


def test_cost_meter_energy_offline(monkeypatch):
    # codecarbon swallows exceptions, so record connection attempts rather than rely on errors.
    attempts = []

    def blocked(*args, **kwargs):
        attempts.append(args)
        raise OSError("network blocked by test")

    monkeypatch.setattr(socket.socket, "connect", blocked)
    monkeypatch.setattr(socket, "getaddrinfo", blocked)
    meter = costs.CostMeter(energy=True)
    a = torch.randn(256, 256)
    with meter.measure("server", "sampling"):
        for _ in range(50):
            a = torch.tanh(a @ a)
    (row,) = meter.rows()
    assert row["party"] == "server" and row["phase"] == "sampling"
    assert row["flops"] == 50 * 2 * 256 ** 3
    assert row["energy_kwh"] > 0
    assert isinstance(meter.energy_is_estimate, bool)
    assert meter.energy_sources
    assert attempts == []
