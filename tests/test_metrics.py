"""Evaluation primitives: KID on FID Inception features, disclosure metrics, cost meter."""

import socket
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from skimage.metrics import structural_similarity

from collafuse.evaluation import costs, kid, metrics

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


@pytest.mark.slow  # the features fixture: Inception on four sets of real slices
def test_kid_self_small_noise_large_hospitals_between(features):
    self_mean, _ = kid.kid(features["du"], features["du"], num_subsets=50, subset_size=20)
    noise_mean, _ = kid.kid(features["du"], features["noise"], num_subsets=50, subset_size=20)
    same_site, _ = kid.kid(features["du"], features["du2"], num_subsets=50, subset_size=20)
    other_site, _ = kid.kid(features["du"], features["ht"], num_subsets=50, subset_size=20)
    # Measured (30 slices, subsets of 20, clean-fid preprocessing): self -0.020, DU vs DU 0.004,
    # DU vs HT 0.005, real vs noise 0.50. With the same rows in both sets the unbiased estimator
    # is O(1/m) negative, so "about 0" means within a few 1/m.
    assert abs(self_mean) < 0.04
    assert noise_mean > 0.3 and noise_mean > 10 * abs(self_mean)
    for between in (same_site, other_site):
        assert abs(between) < noise_mean / 10


@pytest.mark.slow
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


# --- parity with clean-fid (the package itself, not a re-implementation) ---------------------

@pytest.fixture(scope="module")
def cleanfid_fid():
    """cleanfid.fid, imported with a stub torchvision (not installed: it would replace our CPU torch).

    Only kernel_distance is called; torchvision is needed at import time by cleanfid.utils
    (transforms.ToTensor, used in ResizeDataset) and cleanfid.inception_pytorch (base classes).
    """
    tv = types.ModuleType("torchvision")
    tv.transforms = types.ModuleType("torchvision.transforms")
    tv.models = types.ModuleType("torchvision.models")
    tv.models.inception = types.ModuleType("torchvision.models.inception")
    for name in ("InceptionA", "InceptionC", "InceptionE"):
        setattr(tv.models.inception, name, torch.nn.Module)
    before = set(sys.modules)
    with pytest.MonkeyPatch.context() as mp:
        for mod in (tv, tv.transforms, tv.models, tv.models.inception):
            mp.setitem(sys.modules, mod.__name__, mod)
        from cleanfid import fid
        yield fid
        # forget the cleanfid modules imported against the stub, so nothing later sees them
        for name in sorted(set(sys.modules) - before):
            if name.split(".")[0] == "cleanfid":
                del sys.modules[name]
                parent, _, child = name.rpartition(".")
                if parent in sys.modules:
                    vars(sys.modules[parent]).pop(child, None)


@pytest.mark.parametrize("shape", [(4, 32, 32), (5, 64, 48), (2, 40, 40, 3), (1, 299, 299)])
def test_model_input_matches_cleanfid_clean_mode(shape):
    from cleanfid.resize import build_resizer
    images = np.random.default_rng(sum(shape)).integers(0, 256, shape, dtype=np.uint8)
    ours = kid._to_model_input(images, "cpu")
    assert ours.dtype == torch.float32 and ours.shape == (shape[0], 3, 299, 299)
    # clean-fid's pipeline for an image file: PIL .convert("RGB") (gray -> 3 equal channels),
    # the "clean" resizer, ToTensor on float32 (HWC -> CHW, no scaling), then (x - 128) / 128.
    resize = build_resizer("clean")
    for image, got in zip(images, ours):
        rgb = np.asarray(Image.fromarray(image).convert("RGB"))
        ref = (torch.from_numpy(resize(rgb).transpose(2, 0, 1).copy()) - 128) / 128
        torch.testing.assert_close(got, ref, rtol=0, atol=0)  # bit-identical
        if image.ndim == 2:
            # the claim behind resizing gray once: clean-fid's three channels come out equal
            assert torch.equal(ref[0], ref[1]) and torch.equal(ref[0], ref[2])


@pytest.mark.parametrize("sizes, subset_size, dtype", [
    ((50, 40), 20, np.float64),    # subsets smaller than both sets
    ((30, 25), 100, np.float64),   # subset_size larger than both: clamped to the smaller set
    ((12, 30), 1000, np.float64),  # unequal sets, a the smaller one
    ((60, 60), 60, np.float32),    # float32 features, as clean-fid's own pipeline passes them
])
def test_kid_equals_cleanfid_kernel_distance(cleanfid_fid, sizes, subset_size, dtype):
    rng = np.random.default_rng(len(sizes) + subset_size)
    a = rng.normal(size=(sizes[0], 64)).astype(dtype)
    b = rng.normal(0.2, 1.1, size=(sizes[1], 64)).astype(dtype)
    for seed in (0, 11):
        np.random.seed(seed)
        ref = cleanfid_fid.kernel_distance(a, b, num_subsets=20, max_subset_size=subset_size)
        mean, std = kid.kid(a, b, num_subsets=20, subset_size=subset_size, seed=seed)
        assert mean == ref  # same draws, same float operations: bit-identical
        assert std >= 0


def test_resampled_mmd2_matches_brute_force():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(6, 4)), rng.normal(0.3, 1.0, size=(5, 4))
    # identity resample (every row once) is the plain unbiased estimate
    ones = kid._resampled_mmd2(a, b, np.ones((1, 6)), np.ones((1, 5)))
    assert ones[0] == pytest.approx(_mmd2_loop_unequal(a, b), rel=1e-12)
    # resamples with repeated rows: pairs of copies of one row are left out of the within sums
    ia, ib = rng.integers(0, 6, (3, 6)), rng.integers(0, 5, (3, 5))
    ca = np.stack([np.bincount(i, minlength=6) for i in ia]).astype(float)
    cb = np.stack([np.bincount(i, minlength=5) for i in ib]).astype(float)
    got = kid._resampled_mmd2(a, b, ca, cb)
    for g, i, j in zip(got, ia, ib):
        assert g == pytest.approx(_mmd2_loop_unequal(a[i], b[j], ia=i, ib=j), rel=1e-12)


def _mmd2_loop_unequal(x, y, ia=None, ib=None):
    """Unbiased MMD^2 by loops; within pairs skip equal labels (row indices of the originals)."""
    ia = np.arange(len(x)) if ia is None else ia
    ib = np.arange(len(y)) if ib is None else ib

    def k(u, v):
        return (u @ v / len(u) + 1) ** 3

    def within(z, labels):
        terms = [k(z[i], z[j]) for i in range(len(z)) for j in range(len(z)) if labels[i] != labels[j]]
        return sum(terms) / len(terms)

    cross = np.mean([k(u, v) for u in x for v in y])
    return within(x, ia) + within(y, ib) - 2 * cross


def test_kid_bootstrap_interval():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(80, 32)), rng.normal(size=(60, 32))
    low, high = kid.kid_bootstrap_interval(a, b, num_boot=200, seed=1)
    point, _ = kid.kid(a, b, num_subsets=1, subset_size=1000)
    # Same distribution: the interval holds 0 and the estimate, roughly centred on it.
    assert low < 0 < high and low < point < high
    assert abs((low + high) / 2 - point) < (high - low) / 4
    assert kid.kid_bootstrap_interval(a, b, num_boot=200, seed=1) == (low, high)
    assert kid.kid_bootstrap_interval(a, b, num_boot=200, seed=2) != (low, high)
    narrow = kid.kid_bootstrap_interval(a, b, num_boot=200, level=0.5, seed=1)
    assert low < narrow[0] < narrow[1] < high
    # A shift of 0.5 per dimension: clearly different sets, the interval excludes 0.
    shifted_low, shifted_high = kid.kid_bootstrap_interval(a, b + 0.5, num_boot=200, seed=1)
    shifted, _ = kid.kid(a, b + 0.5, num_subsets=1, subset_size=1000)
    assert 0 < shifted_low < shifted < shifted_high


# --- disclosure ------------------------------------------------------------------------------

def test_mean_pairwise_mse_equals_brute_force():
    rng = np.random.default_rng(0)
    a, b = rng.uniform(-1, 1, (5, 1, 4, 3)), rng.uniform(-1, 1, (7, 1, 4, 3))
    brute = np.mean([np.mean((ai - bj) ** 2) for ai in a for bj in b])
    assert metrics.mean_pairwise_mse(a, b) == pytest.approx(brute, rel=1e-12)


def test_nearest_neighbour_mse():
    rng = np.random.default_rng(0)
    a = rng.uniform(-1, 1, (40, 1, 8, 8)).astype(np.float32)
    b = rng.uniform(-1, 1, (30, 1, 8, 8))
    np.testing.assert_array_equal(metrics.nearest_neighbour_mse(a, a), np.zeros(40))
    brute = np.array([min(np.mean((ai - bj) ** 2) for bj in b) for ai in a.astype(np.float64)])
    np.testing.assert_allclose(metrics.nearest_neighbour_mse(a, b), brute, rtol=1e-12)
    assert metrics.mean_nearest_neighbour_mse(a, b) == pytest.approx(brute.mean())


def test_psnr_and_ssim_identity():
    x = np.random.default_rng(0).uniform(-1, 1, (3, 3, 16, 16))
    assert np.all(np.isinf(metrics.psnr(x, x)))
    np.testing.assert_allclose(metrics.ssim(x, x), 1.0, atol=1e-12)
    np.testing.assert_allclose(metrics.ssim(x[:, 0], x[:, 0]), 1.0, atol=1e-12)


def test_psnr_known_value():
    x = np.zeros((1, 4, 4))
    # MSE 0.01 with data range 2: 10 log10(4 / 0.01) = 26.02 dB.
    assert metrics.psnr(x + 0.1, x)[0] == pytest.approx(10 * np.log10(400))


def test_ssim_constant_images_closed_form():
    # Constant images: both variances and the covariance vanish, so
    # SSIM = (2 a b + C1) / (a^2 + b^2 + C1), with C1 = (0.01 * 2)^2.
    a, b, c1 = 0.3, -0.2, (0.01 * 2) ** 2
    x, y = np.full((1, 20, 20), a), np.full((1, 20, 20), b)
    assert metrics.ssim(x, y)[0] == pytest.approx((2 * a * b + c1) / (a * a + b * b + c1))


def test_ssim_decreases_with_noise_and_is_symmetric():
    rng = np.random.default_rng(0)
    x = np.tanh(np.cumsum(rng.normal(size=(2, 1, 32, 32)), axis=-1) / 4)
    noise = rng.normal(size=x.shape)
    values = [metrics.ssim(np.clip(x + s * noise, -1, 1), x).mean() for s in (0.0, 0.05, 0.1, 0.3, 1.0)]
    assert all(u > v for u, v in zip(values, values[1:]))
    y = np.clip(x + 0.2 * noise, -1, 1)
    np.testing.assert_allclose(metrics.ssim(x, y), metrics.ssim(y, x), rtol=1e-12)


def test_ssim_small_images_shrink_window():
    rng = np.random.default_rng(0)
    x = rng.uniform(-1, 1, (2, 3, 5, 7))
    assert metrics.ssim(x, x) == pytest.approx(1.0)
    y = rng.uniform(-1, 1, x.shape)
    assert np.all(metrics.ssim(x, y) < 0.5)
    # A single pixel: the window shrinks to 1x1 and SSIM reduces to the luminance term.
    c1 = (0.01 * 2) ** 2
    expected = (2 * x * y + c1) / (x * x + y * y + c1)
    assert metrics.ssim(x[:, :, :1, :1], y[:, :, :1, :1]) == pytest.approx(expected[:, :, 0, 0].mean(axis=1))


def test_ssim_matches_skimage():
    rng = np.random.default_rng(0)
    x, y = rng.uniform(-1, 1, (1, 32, 32)), rng.uniform(-1, 1, (1, 32, 32))
    ref = structural_similarity(x[0], y[0], data_range=2.0, gaussian_weights=True,
                                        sigma=1.5, use_sample_covariance=False)
    assert metrics.ssim(x, y)[0] == pytest.approx(ref, abs=1e-6)


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


def test_cost_meter_counts_a_flops_key_once():
    meter = costs.CostMeter(energy=False)
    layer = torch.nn.Linear(16, 8)
    for rows in (4, 4, 6):
        with meter.measure("client:DU", "training", flops_key=(rows,)):
            layer(torch.randn(rows, 16))
    # a key names what fixes the FLOPs; a block under a known key adds the first one's count
    # without counting, so a block that breaks that promise is not noticed:
    with meter.measure("client:DU", "training", flops_key=(4,)):
        layer(torch.randn(100, 16))
    with meter.measure("client:DU", "training", flops_key=(4,), count_flops=False):
        layer(torch.randn(4, 16))
    training = next(r for r in meter.rows() if r["phase"] == "training")
    assert training["flops"] == 2 * 16 * 8 * (4 + 4 + 6 + 4)


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


def test_memorisation_flags_planted_copies_that_the_papers_measure_does_not_see():
    """Real DU slices split by patient into training, reference, probe and 'generated' sets.
    Replacing 10% of the generated set by exact training copies must raise the fraction nearer
    to training above its no-copy baseline; the paper's mean pairwise MSE barely moves."""
    from collafuse.data import load_images, split_holdout, to_model

    images = load_images(REPO / "data" / "lgg_flair_32.npz", image_size=32, channels=1)
    du = images.subset(np.flatnonzero(images.meta["site"] == "DU"))
    train, rest = split_holdout(du, holdout_fraction=0.4, seed=0)
    reference, rest = split_holdout(rest, holdout_fraction=0.66, seed=0)
    probe, novel = split_holdout(rest, holdout_fraction=0.5, seed=0)
    train, reference, probe, novel = (to_model(s.images).numpy()
                                      for s in (train, reference, probe, novel))
    clean = metrics.memorisation(novel, train, reference, probe)
    rng = np.random.default_rng(0)
    planted = novel.copy()
    slots = rng.choice(len(novel), len(novel) // 10, replace=False)
    planted[slots] = train[rng.choice(len(train), len(slots), replace=False)]
    copied = metrics.memorisation(planted, train, reference, probe)

    # new images of the hospital sit near the baseline and are rarely "copies" ...
    assert abs(clean["nearer_train"] - clean["baseline_nearer_train"]) < 0.15, clean
    assert clean["copy_fraction"] <= clean["baseline_copy_fraction"] + 0.03, clean
    # ... 10% exact copies show up as about 10% copies, beyond the baseline, and lower the ratio
    assert copied["copy_fraction"] - clean["copy_fraction"] > 0.07, (clean, copied)
    assert copied["copy_fraction"] - copied["baseline_copy_fraction"] > 0.05, copied
    assert copied["nearer_train"] > clean["nearer_train"], (clean, copied)
    assert copied["distance_ratio"] < clean["distance_ratio"], (clean, copied)
    paper_clean = metrics.mean_pairwise_mse(novel, train)
    paper_copied = metrics.mean_pairwise_mse(planted, train)
    assert abs(paper_copied / paper_clean - 1) < 0.05, (paper_clean, paper_copied)
