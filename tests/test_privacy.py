"""Privacy audit: the attacks do what they claim, the accounting matches closed forms."""

import csv
import json
import math
import os
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import DEFAULT_DATA

from collafuse.data import ImageSet, to_model
from collafuse.diffusion import (add_noise, handover_view, make_scheduler, tweedie_estimate,
                                 tweedie_from_view)
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


def test_tweedie_with_the_true_noise_as_model_is_exact(mri):
    scheduler, msg = sent("shared-noise", mri[:16], 60)
    oracle = lambda x, t: msg.eps
    assert attacks.scores(tweedie_estimate(oracle, scheduler, msg.x_t, msg.t),
                          mri[:16])["mse"] < 1e-8


@pytest.mark.parametrize("num_timesteps,cut", [(20, 4), (100, 60)])
def test_tweedie_with_the_bayes_optimal_model_beats_the_raw_view_by_the_expected_gap(
        num_timesteps, cut):
    """x0 ~ N(m, v) per pixel: E[eps | x_t] = sigma_t (x_t - alpha_t m) / (alpha_t^2 v + sigma_t^2)
    (alpha_t = sqrt(abar_t), sigma_t = sqrt(1 - abar_t)), so the model's quality is known.

    Re-noising y = a x0 + b xi to x_s = a_s y + b_s eta (a_s a = alpha_s, a_s^2 b^2 + b_s^2 =
    sigma_s^2) and taking Tweedie x^ = m + k (x_s - alpha_s m), k = alpha_s v / (alpha_s^2 v +
    sigma_s^2), averaged over K draws of eta, has MSE
    (1 - k alpha_s)^2 v + k^2 (a_s^2 b^2 + b_s^2 / K).
    The raw view estimate clip(y / a) has MSE E[(clip(x0 + (b / a) z) - x0)^2] (by Monte Carlo).
    Not a law for every cut: re-noising costs b_s^2, and at s = 1 of T = 20 the raw view wins.
    """
    m, v, draws, scheduler = 0.3, 0.25 ** 2, 8, make_scheduler(num_timesteps)
    abar = scheduler.alphas_cumprod.double()

    def bayes_eps(x_t, t):
        alpha, sigma = abar[t].sqrt().view(-1, 1, 1, 1), (1 - abar[t]).sqrt().view(-1, 1, 1, 1)
        return (sigma * (x_t - alpha * m) / (alpha ** 2 * v + sigma ** 2)).float()

    g = torch.Generator().manual_seed(0)
    x0 = m + v ** 0.5 * torch.randn((256, 1, 32, 32), generator=g)
    a, b = float(abar[cut - 1].sqrt()), float((1 - abar[cut - 1]).sqrt())
    views = a * x0 + b * torch.randn(x0.shape, generator=g)
    tweedie = tweedie_from_view(bayes_eps, scheduler, views, cut, g, num_draws=draws)
    raw = attacks.view_estimate(scheduler, views, cut)

    alpha2, sigma2 = float(abar[cut]), float(1 - abar[cut])
    k = alpha2 ** 0.5 * v / (alpha2 * v + sigma2)
    a_s2 = float(abar[cut] / abar[cut - 1])
    mse_tweedie = (1 - k * alpha2 ** 0.5) ** 2 * v + k ** 2 * (a_s2 * b * b + (1 - a_s2) / draws)
    rng = np.random.default_rng(1)
    x = m + v ** 0.5 * rng.standard_normal(4_000_000)
    mse_raw = float(np.mean((np.clip(x + b / a * rng.standard_normal(len(x)), -1, 1) - x) ** 2))
    gap_db = 10 * math.log10(mse_raw / mse_tweedie)
    assert gap_db > 1.5  # the claim has teeth at both cuts
    measured_tweedie = attacks.scores(tweedie, x0)["mse"]
    measured_raw = attacks.scores(raw, x0)["mse"]
    assert measured_tweedie == pytest.approx(mse_tweedie, rel=0.02)
    assert measured_raw == pytest.approx(mse_raw, rel=0.02)
    assert 10 * math.log10(measured_raw / measured_tweedie) == pytest.approx(gap_db, abs=0.15)


def legacy_views(scheduler, images, cut, seed):
    """Views as the old client made them: xi for all its images at once, in image order, from
    torch.Generator().manual_seed(party_seed(cfg, "client:<id>") + 1)."""
    xi = torch.randn(images.shape, generator=torch.Generator().manual_seed(seed))
    return handover_view(scheduler, images, xi, cut)


@pytest.mark.parametrize("cut", [20, 60, 90])
def test_seed_replay_undoes_views_whose_noise_came_from_the_config(mri, tiny_config, cut):
    from collafuse.factory import party_seed
    from collafuse.privacy.audit import replay_seeds

    cfg, scheduler, images = tiny_config(), make_scheduler(100), mri[:48]
    seeds = replay_seeds(cfg)
    received = torch.randperm(len(images), generator=torch.Generator().manual_seed(0))[:16]
    views = legacy_views(scheduler, images, cut, party_seed(cfg, "client:HT") + 1)[received]
    secret = int.from_bytes(os.urandom(8), "little")
    secret_views = legacy_views(scheduler, images, cut, secret)[received]
    plain = attacks.scores(attacks.view_estimate(scheduler, secret_views, cut), images[received])
    # tol = inf: the high-frequency-energy test alone must decide, without the range check
    for tol in (1e-3, math.inf):
        estimate, found = attacks.seed_replay(scheduler, views, cut, len(images), seeds, tol)
        assert bool(found.all()) and attacks.scores(estimate, images[received])["psnr"] > 60
        estimate, found = attacks.seed_replay(scheduler, secret_views, cut, len(images), seeds,
                                              tol)
        assert not bool(found.any())
        assert attacks.scores(estimate, images[received])["psnr"] <= plain["psnr"] + 1


@pytest.mark.parametrize("share,claimed", [(0.9, True), (0.6, False)])
def test_seed_replay_claims_a_seed_only_if_it_removes_over_half_the_noise(mri, share, claimed):
    """xi = c xi_seed + sqrt(1 - c^2) z leaves residual noise of variance (1 - c)^2 + 1 - c^2
    = 2 - 2c after subtracting xi_seed: less than half of y's (1) only for c > 3/4."""
    scheduler, images, cut = make_scheduler(100), mri[:32], 60
    xi_seed = torch.randn(images.shape, generator=torch.Generator().manual_seed(7))
    z = torch.randn(images.shape, generator=torch.Generator().manual_seed(8))
    views = handover_view(scheduler, images, share * xi_seed + (1 - share ** 2) ** 0.5 * z, cut)
    _, found = attacks.seed_replay(scheduler, views, cut, len(images), [7], tol=math.inf)
    assert bool(found.all()) if claimed else not bool(found.any())


def test_replay_seeds_are_what_the_config_gives_away(tiny_config):
    from collafuse.factory import party_seed
    from collafuse.privacy.audit import replay_seeds

    cfg = tiny_config()
    seeds = replay_seeds(cfg, offsets=range(0, 2))
    # run seed 0, server, server:init, client:DU(:init), client:HT(:init); + 0 and + 1 each
    expected = {0, 1}
    for name in ("server", "server:init", "client:DU", "client:DU:init", "client:HT",
                 "client:HT:init"):
        expected |= {party_seed(cfg, name), party_seed(cfg, name) + 1}
    assert set(seeds) == expected and seeds == sorted(seeds)


def test_mean_image_baseline_and_gains(mri):
    targets, reference = mri[:8], mri[8:40]
    mse = float(((targets.double() - reference.double().mean(0)) ** 2).mean())
    base = attacks.mean_image_baseline(targets, reference)
    assert base["mse"] == pytest.approx(mse, rel=1e-9)
    per_image = ((targets.double() - reference.double().mean(0)) ** 2).flatten(1).mean(1)
    assert base["psnr"] == pytest.approx(float((10 * torch.log10(4 / per_image)).mean()))
    assert attacks.mean_image_baseline(mri[:1], mri[:1])["psnr"] == math.inf

    from collafuse.privacy.audit import gains
    row = {"base_psnr": 20.0, "a_psnr": 25.0, "b_psnr": 18.0, "c_psnr_k64": 30.0, "b_ssim": 0.3}
    assert gains(row) == {"a_gain_db": 5.0, "b_gain_db": -2.0, "c_gain_db_k64": 10.0}


def test_nonmembers_are_same_hospital_patients_where_the_run_has_them():
    from collafuse.privacy.audit import SAME_HOSPITAL, nonmember_set

    own, other = (ImageSet(np.full((n, 4, 4), n, np.uint8)) for n in (3, 5))
    cfg = SimpleNamespace(data=SimpleNamespace(holdout_sites=["CS"]))
    run = SimpleNamespace(cfg=cfg, holdout=other,
                          client_holdout={"DU": own, "HT": ImageSet(np.zeros((0, 4, 4), np.uint8))})
    assert nonmember_set(run, "DU") == (own, SAME_HOSPITAL)
    assert nonmember_set(run, "HT") == (other, "other hospitals")
    legacy_run = SimpleNamespace(cfg=cfg, holdout=other)
    assert nonmember_set(legacy_run, "DU") == (other, "other hospitals")


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


@pytest.mark.slow  # 150 training steps
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


def _analytic_epsilon_by_hand(delta, sigma, sensitivity):
    """Balle & Wang 2018, Thm 8, written out with scipy.stats.norm and solved with brentq:
    delta(eps) = Phi(r/2 - eps/r) - e^eps Phi(-r/2 - eps/r), r = sensitivity / sigma."""
    from scipy.optimize import brentq
    from scipy.stats import norm

    r = sensitivity / sigma

    def excess(eps):
        return norm.cdf(r / 2 - eps / r) - math.exp(eps + norm.logcdf(-r / 2 - eps / r)) - delta

    return brentq(excess, 0.0, 1e6, xtol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("cut", [20, 60, 90])
def test_view_accounting_matches_closed_forms_computed_apart(cut):
    from scipy.stats import norm

    scheduler, d, delta = make_scheduler(100), 32 * 32, 1e-5
    abar = float(scheduler.alphas_cumprod[cut - 1])  # the view is at level s - 1
    a, b = math.sqrt(abar), math.sqrt(1 - abar)
    acc = accounting.view_privacy(scheduler, cut, d, delta)
    assert acc["snr_db"] == pytest.approx(10 * math.log10(abar / (1 - abar)), rel=1e-9)
    assert acc["epsilon_pixel"] == pytest.approx(_analytic_epsilon_by_hand(delta, b, 2 * a),
                                                 rel=1e-6)
    assert acc["epsilon_image"] == pytest.approx(
        _analytic_epsilon_by_hand(delta, b, 2 * a * math.sqrt(d)), rel=1e-6)
    mu = 2 * a * math.sqrt(d) / b
    assert acc["max_tpr_at_1pct_image"] == pytest.approx(norm.cdf(norm.ppf(0.01) + mu), rel=1e-9)


def test_view_accounting_edges_and_order():
    scheduler, d = make_scheduler(100), 32 * 32
    # more server steps (a lower cut) = a cleaner view = a larger epsilon
    eps = [accounting.view_privacy(scheduler, s, d)["epsilon_image"] for s in (20, 40, 60, 80)]
    assert eps == sorted(eps, reverse=True)
    assert math.isinf(accounting.view_privacy(scheduler, 0, d)["epsilon_image"])
    assert accounting.view_privacy(scheduler, 100, d)["epsilon_image"] == 0.0
    shared = accounting.protocol_privacy("shared-noise", scheduler, 60, d)
    assert math.isinf(shared["epsilon_image"]) and math.isinf(shared["epsilon_pixel"])
    assert "infinite" in accounting.explain("shared-noise", 60, 100, shared)
    noisy = accounting.explain("noisy-data", 60, 100, accounting.view_privacy(scheduler, 60, d))
    assert "no guarantee about an image" in noisy and "secret" in noisy


@pytest.mark.parametrize("client_holdout", ["0.0", "0.3"])
def test_calibration_reference_holds_no_patient_of_any_client(tmp_path, tiny_config,
                                                              client_holdout):
    """The reference models train on patients no client has, as members or as its own
    held-out non-members (a reference that saw the members reads calibration as no signal;
    one that saw the non-members reads it backwards)."""
    from collafuse.engines.local import load_run, run_training
    from collafuse.factory import load_client_data
    from collafuse.privacy import membership as mia
    from collafuse.privacy.membership_audit import _reference_split

    run_training(tiny_config(**{"data.client_holdout_fraction": client_holdout}),
                 tmp_path / "run", progress=False)
    run = load_run(tmp_path / "run")
    reference, _ = _reference_split(run, seed=0)
    assert len(reference) > 0
    for cid, part in load_client_data(run.cfg).clients.items():
        assert not mia.shared_patients(reference, part)
        if float(client_holdout) > 0:
            assert not mia.shared_patients(reference, run.client_holdout[cid])


@pytest.mark.slow
def test_audit_command_on_a_sweep_folder(tmp_path, tiny_config):
    from collafuse.cli import main
    from collafuse.engines.local import run_training
    from collafuse.privacy.audit import load_privacy_rows

    run_training(tiny_config(**{"train.protocol": '"noisy-data"'}), tmp_path / "c=0.5",
                 progress=False)
    assert main(["audit", str(tmp_path), "--num-images", "8", "--reference-rounds", "2",
                 "--reference-models", "2"]) == 0
    rows = load_privacy_rows(tmp_path)
    member_rows = json.loads((tmp_path / "membership.json").read_text())["rows"]
    attacks_seen = {(r["client"], r["target"], r["attack"]) for r in member_rows}
    for client in ("DU", "HT"):
        for target in ("server", "client"):  # c = 0.5: both own levels, SecMI included
            for attack in ("loss", "secmi", "pia", "loss-cal", "secmi-cal", "pia-cal"):
                assert (client, target, attack) in attacks_seen
        assert {(client, "none", "blind"), (client, "samples", "nearest generated")} <= \
            attacks_seen
    assert {r["reference_models"] for r in member_rows} == {2}
    scores = list(csv.DictReader(open(tmp_path / "membership-scores.csv")))
    for r in member_rows:
        assert 0 <= r["auc_lo"] <= r["auc"] <= r["auc_hi"] <= 1
        # every row's per-image scores are written, members and non-members apart, and the
        # flagged member slices by patient add up to its TPR at 1% FPR
        mine = [s for s in scores if (s["client"], s["target"], s["attack"]) ==
                (r["client"], r["target"], r["attack"])]
        assert sum(s["member"] == "1" for s in mine) == r["num_members"]
        assert sum(s["member"] == "0" for s in mine) == r["num_nonmembers"]
        assert all(s["patient"] for s in mine)
        pos = [float(s["score"]) for s in mine if s["member"] == "1"]
        neg = [float(s["score"]) for s in mine if s["member"] == "0"]
        assert attacks.tpr_at_fpr(pos, neg) == pytest.approx(r["tpr_1"])
        assert 0 <= r["flagged_patients"] <= r["member_patients"]
        assert (r["flagged_patients"] > 0) == (r["tpr_1"] > 0) == bool(r["top_flagged"])
        assert r["over_blind"] == pytest.approx(r["tpr_1"] - next(
            b["tpr_1"] for b in member_rows if b["client"] == r["client"]
            and b["attack"] == "blind"))
    assert {(r["client"], r["protocol"], r["trained"]) for r in rows} == {
        (c, p, p == "noisy-data") for c in ("DU", "HT") for p in ("shared-noise", "noisy-data")}
    from collafuse.privacy.audit import R_NOT_NEEDED, SAME_HOSPITAL
    for r in rows:
        assert 0 < r["base_psnr"] < 40 and r["nonmembers"] in (SAME_HOSPITAL, "other hospitals")
        assert r["a_gain_db"] == pytest.approx(r["a_psnr"] - r["base_psnr"])
        if r["protocol"] == "shared-noise":
            assert r["a_psnr"] > 60 and math.isinf(r["epsilon_image"])
            assert r["r_method"] == R_NOT_NEEDED and math.isnan(r.get("r_psnr", math.nan))
        else:
            assert r["a_psnr"] < 20 and 0 < r["epsilon_pixel"] < math.inf
            assert r["c_psnr_k64"] > r["c_psnr_k1"] and 0 <= r["d_auc"] <= 1
            assert r["c_gain_db_k64"] == pytest.approx(r["c_psnr_k64"] - r["base_psnr"])
            # the client's views come from its secret: nothing to replay
            assert r["r_recovered"] == 0.0 and r["r_gain_db"] < 20
    md = (tmp_path / "privacy.md").read_text()
    assert "| 0.5 | 10 | noisy-data | trained |" in md
    assert "(untrained " in md and "n/a: exact from eps" in md
    assert "## Membership inference (matched non-members, blind baseline)" in md
    assert "Which patients the strongest attack flags at 1% FPR" in md
    assert (tmp_path / "privacy.csv").read_text().startswith("run,cut_ratio")
    assert main(["audit", str(tmp_path / "nothing")]) == 2

    from collafuse.privacy.audit import TRADEOFF_FIGURE, tradeoff_markdown
    results = [{"protocol": "noisy-data", "cut_ratio": 0.5, "client": c, "kid_train": 0.1,
                "kid_holdout": 0.2} for c in ("DU", "HT")]
    table = tradeoff_markdown(rows, results, tmp_path)
    assert "| 0.5 | noisy-data | trained | 0.1 | 0.2 |" in table and "(untrained " in table
    assert "| 0.5 | shared-noise | counterfactual | - | - |" in table
    assert (tmp_path / TRADEOFF_FIGURE).stat().st_size > 0

    # A sweep whose runs were audited one by one (their weights are not kept): the report
    # gathers each run folder's privacy.json and membership.json into one table.
    from collafuse.evaluation.report import privacy_section
    from collafuse.privacy.membership_audit import strongest
    for name in ("privacy.json", "membership.json"):
        (tmp_path / "c=0.5" / name).write_text((tmp_path / name).read_text())
    (tmp_path / "privacy.md").unlink()
    section = privacy_section(tmp_path)
    assert section.startswith("## Privacy audit") and "### Audits of the sweep's runs" in section
    line = next(ln for ln in section.splitlines() if ln.startswith("| noisy-data | 0.5 | 0 |"))
    a_gain = np.mean([r["a_gain_db"] for r in rows if r["protocol"] == "noisy-data"])
    assert f"| {a_gain:+.3g} |" in line
    best = {s["target"]: s for s in strongest(member_rows)}
    cells = line.strip("| ").split(" | ")
    for target, cell in zip(("server", "client", "samples"), cells[-3:]):
        s = best[target]
        assert cell.startswith(f"{s['attack']} {100 * s['over_blind']:+.1f} pt (TPR "
                               f"{100 * s['tpr_1']:.1f}%") and f"AUC {s['auc']:.2f})" in cell


def test_reference_pairs_each_have_their_own_seed(tiny_config):
    from collafuse.factory import load_client_data
    from collafuse.privacy.membership_audit import train_reference, train_references

    cfg = tiny_config()
    cid, images = next(iter(load_client_data(cfg).clients.items()))
    pairs = train_references(cfg, images, 2, cid, count=2)
    single = train_reference(cfg, images, 2, cid)

    def weights(party):
        return torch.cat([p.detach().flatten() for p in party.model.parameters()])
    # the first pair is the single reference of before (the run's seed); the second differs,
    # server and client, or averaging would average one model with itself
    assert torch.equal(weights(pairs[0][1]), weights(single[1]))
    assert not torch.equal(weights(pairs[0][1]), weights(pairs[1][1]))
    assert not torch.equal(weights(pairs[0][0]), weights(pairs[1][0]))


@pytest.mark.slow
def test_audit_attacks_what_a_hospital_exports(tmp_path, tiny_config):
    """`collafuse audit --export --samples`: the exported client models give the in-run
    client's figures exactly (same weights), the published samples their own rows."""
    from collafuse.cli import main
    from collafuse.engines.local import run_training

    run_training(tiny_config(), tmp_path / "run", progress=False)
    assert main(["export", str(tmp_path / "run"), str(tmp_path / "export")]) == 0
    assert main(["sample", str(tmp_path / "run"), "-n", "8", "--export",
                 str(tmp_path / "samples")]) == 0
    assert main(["audit", str(tmp_path / "run"), "-n", "8", "--reference-rounds", "0",
                 "--export", str(tmp_path / "export"), "--samples",
                 str(tmp_path / "samples")]) == 0
    rows = json.loads((tmp_path / "run" / "membership.json").read_text())["rows"]
    by = {(r["client"], r["target"], r["attack"]): r for r in rows}
    for client in ("DU", "HT"):
        for attack in ("loss", "secmi", "pia"):
            exported, in_run = by[client, "client (exported)", attack], by[client, "client", attack]
            assert exported["auc"] == in_run["auc"] and exported["tpr_1"] == in_run["tpr_1"]
        published = by[client, "samples (published)", "nearest generated"]
        assert published["levels"] == "8 generated images" and 0 <= published["auc"] <= 1
    assert main(["audit", str(tmp_path / "run"), "--export", str(tmp_path / "nothing")]) == 2
