"""Privacy audit: the attacks do what they claim, the accounting matches closed forms."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import DEFAULT_DATA

from collafuse.data import to_model
from collafuse.diffusion import add_noise, handover_view, make_scheduler
from collafuse.privacy import accounting, attacks
from collafuse.messages import decode, encode
from collafuse.models import make_unet, predict_noise
from collafuse.protocols import server_message
from collafuse.server import Server


@pytest.fixture(scope="module")
def mri():
    """Real brain MRI slices of the bundled data set, the 400 brightest (least empty), shuffled."""
    images = np.load(DEFAULT_DATA)["images"]
    bright = np.argsort(images.reshape(len(images), -1).mean(axis=1))[::-1][:400]
    return to_model(images[np.random.default_rng(0).permutation(bright)])


def sent(protocol, images, cut, seed=0, num_timesteps=100):
    """A message as a client builds and sends it, after encoding and decoding."""
    scheduler = make_scheduler(num_timesteps)
    g = torch.Generator().manual_seed(seed)
    t = torch.randint(cut, num_timesteps, (len(images),), generator=g)
    eps = torch.randn(images.shape, generator=g)
    views = handover_view(scheduler, images, torch.randn(images.shape, generator=g), cut)
    msg = server_message(protocol, "A", add_noise(scheduler, images, eps, t), t, eps, views, cut)
    return scheduler, decode(encode(msg))


@pytest.mark.parametrize("cut", [1, 60, 99])
def test_shared_noise_messages_give_the_images_back_to_float_precision(mri, cut):
    scheduler, msg = sent("shared-noise", mri[:64], cut)
    score = attacks.scores(attacks.reconstruct_shared_noise(scheduler, msg.x_t, msg.t, msg.eps),
                           mri[:64])
    assert score["mse"] < 1e-8 and score["psnr"] > 60 and score["ssim"] > 0.9999


@pytest.mark.parametrize("cut", [60, 80])
def test_noisy_data_views_do_not_give_the_images_back(mri, cut):
    scheduler, msg = sent("noisy-data", mri[:64], cut)
    score = attacks.scores(attacks.view_estimate(scheduler, msg.views, cut), mri[:64])
    assert score["psnr"] < 12 and score["ssim"] < 0.3


def test_averaging_fresh_noise_converges_to_the_image(mri):
    rows = attacks.averaging_attack(make_scheduler(100), mri[:32], 60,
                                    torch.Generator().manual_seed(0))
    mse = [r["mse"] for r in rows]
    assert [r["k"] for r in rows] == [1, 2, 4, 8, 16, 32, 64]
    assert mse == sorted(mse, reverse=True) and len(set(mse)) == len(mse)
    assert rows[-1]["psnr"] > rows[0]["psnr"] + 10
    # Without clipping the error would be b^2 / (a^2 k); clipping only lowers it.
    assert rows[-1]["mse"] <= 1.1 * rows[-1]["mse_theory"]


def test_tweedie_with_an_ideal_model_beats_the_raw_view(mri):
    """The denoising attack is only as good as the model: with the true noise as 'model' it is
    exact, and the re-noised view estimate stays finite and in range."""
    scheduler, msg = sent("shared-noise", mri[:16], 60)
    oracle = lambda x, t: msg.eps
    assert attacks.scores(attacks.tweedie_estimate(oracle, scheduler, msg.x_t, msg.t),
                          mri[:16])["mse"] < 1e-8
    _, views = sent("noisy-data", mri[:16], 60)
    zero = lambda x, t: torch.zeros_like(x)
    est = attacks.tweedie_from_view(zero, scheduler, views.views, 60,
                                    torch.Generator().manual_seed(0), num_draws=2)
    assert est.shape == mri[:16].shape and float(est.abs().max()) <= 1.0


def test_auc_and_tpr_are_rank_based():
    assert attacks.roc_auc([3, 4, 5], [0, 1, 2]) == 1.0
    assert attacks.roc_auc([0, 1, 2], [3, 4, 5]) == 0.0
    assert attacks.roc_auc([1, 1], [1, 1]) == 0.5  # ties count one half
    assert attacks.roc_auc([2, 0], [1]) == 0.5
    neg = np.arange(100.0)
    # at 1% FPR one non-member (the largest, 99) may be flagged: threshold 98
    assert attacks.tpr_at_fpr([98.5, 99.5, 50.0, 200.0], neg, 0.01) == 0.75


def membership(net, scheduler, members, nonmembers, cut, num_draws=2):
    model = lambda x, t: predict_noise(net, x, t)
    steps = attacks.score_timesteps(cut, scheduler.config.num_train_timesteps)
    return attacks.membership_attack(
        attacks.membership_losses(model, scheduler, members, steps, num_draws=num_draws),
        attacks.membership_losses(model, scheduler, nonmembers, steps, num_draws=num_draws))


def test_membership_is_a_coin_flip_for_an_untrained_model(mri):
    torch.manual_seed(0)
    small = F.avg_pool2d(mri[:128], 2)
    mia = membership(make_unet("tiny", 16), make_scheduler(10), small[:64], small[64:], cut=1)
    assert 0.35 <= mia["auc"] <= 0.65


def test_membership_is_clear_for_a_model_overfit_to_a_few_images(mri):
    num_timesteps, cut = 10, 1
    small = F.avg_pool2d(mri[:12], 2)
    members, nonmembers = small[:6], small[6:]
    torch.manual_seed(0)
    server = Server(make_unet("tiny", 16), make_scheduler(num_timesteps), cut, "shared-noise",
                    (1, 16, 16), lr=5e-3, seed=0)
    g = torch.Generator().manual_seed(1)
    x0 = members.repeat(4, 1, 1, 1)
    for _ in range(150):
        t = torch.randint(cut, num_timesteps, (len(x0),), generator=g)
        eps = torch.randn(x0.shape, generator=g)
        x_t = add_noise(server.scheduler, x0, eps, t)
        server.train_step([server_message("shared-noise", "A", x_t, t, eps, None, cut)])
    mia = membership(server.model, server.scheduler, members, nonmembers, cut, num_draws=4)
    assert mia["auc"] > 0.8 and mia["member_loss"] < mia["nonmember_loss"]


def test_memorisation_finds_copies_of_training_images(mri):
    train, holdout = mri[:20], mri[20:40]
    copies = attacks.memorisation(train[:10] * 0.5, train, holdout, scale=0.5)
    assert copies["frac_nearer_train"] == 1.0 and copies["nn_mse_train"] < 1e-12
    fresh = attacks.memorisation(mri[40:60], train, holdout)
    assert 0.0 < fresh["frac_nearer_train"] < 1.0
    with pytest.raises(ValueError, match="same size"):
        attacks.memorisation(train, train, holdout[:5])


def test_analytic_gaussian_matches_its_formula_by_hand():
    # Balle & Wang 2018, Thm 8 at eps = 1, sigma = 2, Delta = 1:
    # Phi(1/4 - 2) - e Phi(-1/4 - 2) = Phi(-1.75) - e Phi(-2.25)
    by_hand = 0.040059156863817 - math.e * 0.012224472655045
    assert accounting.analytic_gaussian_delta(1.0, 2.0, 1.0) == pytest.approx(by_hand, rel=1e-9)
    eps = accounting.analytic_gaussian_epsilon(by_hand, 2.0, 1.0)
    assert eps == pytest.approx(1.0, rel=1e-6)


@pytest.mark.parametrize("sigma", [5.0, 10.0, 40.0])
def test_analytic_epsilon_never_exceeds_the_classic_bound(sigma):
    delta = 1e-5
    classic = accounting.classic_gaussian_epsilon(delta, sigma, 1.0)
    assert classic < 1  # where the classic bound holds
    assert 0 < accounting.analytic_gaussian_epsilon(delta, sigma, 1.0) <= classic


def test_view_accounting_per_cut():
    scheduler = make_scheduler(100)
    d = 32 * 32
    a, b = attacks.handover_signal(scheduler, 60)
    acc = accounting.view_privacy(scheduler, 60, d)
    assert acc["snr"] == pytest.approx(a * a / (b * b))
    assert acc["snr_db"] == pytest.approx(10 * math.log10(a * a / (b * b)))
    assert acc["epsilon_pixel"] == pytest.approx(
        accounting.analytic_gaussian_epsilon(1e-5, b, 2 * a))
    assert acc["epsilon_image"] > acc["epsilon_pixel"]
    # more server steps (a lower cut) = a cleaner view = a larger epsilon
    eps = [accounting.view_privacy(scheduler, s, d)["epsilon_pixel"] for s in (20, 40, 60, 80)]
    assert eps == sorted(eps, reverse=True)
    assert math.isinf(accounting.view_privacy(scheduler, 0, d)["epsilon_image"])
    assert accounting.view_privacy(scheduler, 100, d)["epsilon_image"] == 0.0
    shared = accounting.protocol_privacy("shared-noise", scheduler, 60, d)
    assert math.isinf(shared["epsilon_image"]) and math.isinf(shared["epsilon_pixel"])
    assert "infinite" in accounting.explain("shared-noise", 60, 100, shared)


def test_audit_command_on_a_sweep_folder(tmp_path, tiny_config):
    from collafuse.cli import main
    from collafuse.engines.local import run_training
    from collafuse.privacy.audit import load_privacy_rows

    run_training(tiny_config(**{"train.protocol": '"noisy-data"'}), tmp_path / "c=0.5",
                 progress=False)
    assert main(["audit", str(tmp_path), "--num-images", "8"]) == 0
    rows = load_privacy_rows(tmp_path)
    assert {(r["client"], r["protocol"], r["trained"]) for r in rows} == {
        (c, p, p == "noisy-data") for c in ("DU", "HT") for p in ("shared-noise", "noisy-data")}
    for r in rows:
        if r["protocol"] == "shared-noise":
            assert r["a_psnr"] > 60 and math.isinf(r["epsilon_image"])
        else:
            assert r["a_psnr"] < 20 and 0 < r["epsilon_pixel"] < math.inf
            assert r["c_psnr_k64"] > r["c_psnr_k1"] and 0 <= r["d_auc"] <= 1
    assert "| 0.5 | 10 | noisy-data | trained |" in (tmp_path / "privacy.md").read_text()
    assert (tmp_path / "privacy.csv").read_text().startswith("run,cut_ratio")
    assert main(["audit", str(tmp_path / "nothing")]) == 2

    from collafuse.privacy.audit import TRADEOFF_FIGURE, tradeoff_markdown
    results = [{"protocol": "noisy-data", "cut_ratio": 0.5, "client": c, "kid_train": 0.1,
                "kid_holdout": 0.2} for c in ("DU", "HT")]
    table = tradeoff_markdown(rows, results, tmp_path)
    assert "| 0.5 | noisy-data | trained | 0.1 | 0.2 |" in table
    assert "| 0.5 | shared-noise | counterfactual | - | - |" in table
    assert (tmp_path / TRADEOFF_FIGURE).stat().st_size > 0
