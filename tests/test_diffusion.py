"""The diffusion math: the cut, ownership, add_noise and the split sampling loop."""

import pytest
import torch

from collafuse.diffusion import (add_noise, client_timesteps, cut_index, denoise,
                                 eps_from_output, handover_view, loss_weights, make_scheduler,
                                 renoise_coefficients, server_owns, server_timesteps)


@pytest.mark.parametrize("c, T, s", [
    (0.0, 100, 0), (1.0, 100, 100), (0.6, 100, 60), (0.2, 100, 20),
    (0.25, 10, 3),   # 2.5 rounds half up
    (0.35, 10, 4),   # 3.5 rounds half up
    (0.35, 100, 35),  # 0.35 * 100 = 35.00000000000001 in floats
    (0.29, 100, 29),  # 0.29 * 100 = 28.999999999999996 in floats
    (0.5, 1, 1), (0.49, 1, 0),
])
def test_cut_index(c, T, s):
    assert cut_index(c, T) == s


@pytest.mark.parametrize("c", [-0.01, 1.01, float("nan")])
def test_cut_ratio_outside_unit_interval_is_an_error(c):
    with pytest.raises(ValueError, match="cut_ratio"):
        cut_index(c, 100)


@pytest.mark.parametrize("s", [0, 1, 37, 99, 100])
def test_ownership_partitions_all_timesteps(s):
    T = 100
    t = torch.arange(T)
    server, client = server_owns(t, s), ~server_owns(t, s)
    assert int(server.sum()) + int(client.sum()) == T
    assert t[client].tolist() == list(range(s))
    assert sorted(server_timesteps(s, T) + client_timesteps(s)) == list(range(T))
    assert server_timesteps(s, T) == sorted(t[server].tolist(), reverse=True)


def test_add_noise_matches_diffusers():
    scheduler = make_scheduler(100)
    g = torch.Generator().manual_seed(0)
    x0 = torch.rand(8, 1, 4, 4, generator=g) * 2 - 1
    eps = torch.randn(8, 1, 4, 4, generator=g)
    t = torch.randint(0, 100, (8,), generator=g)
    torch.testing.assert_close(add_noise(scheduler, x0, eps, t), scheduler.add_noise(x0, eps, t))


def _toy_model(x, t):
    # any deterministic function of (x, t) will do to compare samplers
    return torch.tanh(x) * (t.view(-1, 1, 1, 1).float() / 100.0)


def test_denoise_full_range_matches_diffusers_loop():
    scheduler = make_scheduler(50)
    x = torch.randn(3, 1, 4, 4, generator=torch.Generator().manual_seed(1))
    ours = denoise(_toy_model, scheduler, x, server_timesteps(0, 50),
                   torch.Generator().manual_seed(2))
    reference = make_scheduler(50)
    reference.set_timesteps(50)
    g, y = torch.Generator().manual_seed(2), x
    for t in reference.timesteps:
        y = reference.step(_toy_model(y, torch.full((3,), int(t))), t, y, generator=g).prev_sample
    torch.testing.assert_close(ours, y)


def test_empty_range_is_identity():
    scheduler = make_scheduler(10)
    x = torch.randn(2, 1, 4, 4)
    assert torch.equal(denoise(_toy_model, scheduler, x, server_timesteps(10, 10)), x)
    assert torch.equal(denoise(_toy_model, scheduler, x, client_timesteps(0)), x)


@pytest.mark.parametrize("s", [1, 2, 30, 99, 100])
def test_handover_view_is_add_noise_at_level_s_minus_1(s):
    """The view sits at the hand-over level s-1, exactly (an s vs s-1 slip changes abar)."""
    scheduler = make_scheduler(100)
    g = torch.Generator().manual_seed(s)
    x0, xi = torch.rand(4, 1, 3, 3, generator=g) * 2 - 1, torch.randn(4, 1, 3, 3, generator=g)
    expected = add_noise(scheduler, x0, xi, torch.full((4,), s - 1))
    torch.testing.assert_close(handover_view(scheduler, x0, xi, s), expected, rtol=0, atol=1e-6)
    if s < 100:  # the level s itself would be a different view
        assert not torch.allclose(handover_view(scheduler, x0, xi, s),
                                  add_noise(scheduler, x0, xi, torch.full((4,), s)))


@pytest.mark.parametrize("s, t", [(1, 1), (30, 30), (30, 31), (30, 70), (0, 5), (60, 99)])
def test_renoised_view_has_the_marginal_of_add_noise(s, t):
    """x_t = a_t y + b_t eta with y = sqrt(abar_{s-1}) x0 + sqrt(1 - abar_{s-1}) xi is
    sqrt(abar_t) x0 + noise of variance 1 - abar_t, exactly: the coefficients of x0 and of the
    noise are read off handover_view itself, not re-derived."""
    scheduler = make_scheduler(100)
    one = torch.ones(1, 1, 1, 1)
    signal = handover_view(scheduler, one, 0 * one, s).item()  # coefficient of x0 in y
    noise = handover_view(scheduler, 0 * one, one, s).item()  # coefficient of xi in y
    a, b, sigma = (v.item() for v in renoise_coefficients(scheduler, torch.tensor([t]), s))
    abar_t = scheduler.alphas_cumprod[t].item()
    assert a * signal == pytest.approx(abar_t ** 0.5, rel=1e-5)
    assert (a * noise) ** 2 + b ** 2 == pytest.approx(1 - abar_t, rel=1e-4)
    assert sigma == pytest.approx((1 - abar_t) ** 0.5, rel=1e-5)


def test_renoise_rejects_client_timesteps_and_handles_s_zero():
    scheduler = make_scheduler(10)
    with pytest.raises(ValueError, match=">= s"):
        renoise_coefficients(scheduler, torch.tensor([2]), 3)
    a, b, sigma = renoise_coefficients(scheduler, torch.tensor([4]), 0)
    torch.testing.assert_close(b, sigma)  # s = 0: the view is x0 itself, plain forward noising
    x0 = torch.rand(2, 1, 2, 2)
    assert torch.equal(handover_view(scheduler, x0, torch.randn(2, 1, 2, 2), 0), x0)


def _cosine_abar(T):
    """abar_t of the cosine schedule written out from Nichol & Dhariwal 2021 (eq. 17, betas
    capped at 0.999 as diffusers does), independently of the scheduler."""
    import math

    f = [math.cos((i / T + 0.008) / 1.008 * math.pi / 2) ** 2 for i in range(T + 1)]
    abar, out = 1.0, []
    for i in range(T):
        abar *= 1 - min(1 - f[i + 1] / f[i], 0.999)
        out.append(abar)
    return out


@pytest.mark.parametrize("gamma", [1.0, 5.0])
def test_min_snr_weights_are_min_snr_gamma_over_snr(gamma):
    T = 100
    t = torch.arange(T)
    weights = loss_weights(make_scheduler(T), t, "min-snr", gamma)
    expected = [min(a / (1 - a), gamma) / (a / (1 - a)) for a in _cosine_abar(T)]
    assert torch.allclose(weights.double(), torch.tensor(expected, dtype=torch.float64),
                          rtol=1e-4, atol=0)
    # the nearly clean levels are weighted down, the noisy ones keep weight 1
    assert weights[0] < 0.01 and weights[-1] == 1.0 and weights[50] == 1.0
    assert torch.equal(loss_weights(make_scheduler(T), t), torch.ones(T))


def test_v_prediction_gives_eps_and_its_loss_is_the_v_mse():
    """v = sqrt(abar) eps - sqrt(1 - abar) x0 (Salimans & Ho 2022), written out here: the exact v
    gives back the exact eps at every level, the last included (abar_99 = 2.4e-7), and the
    uniform v weights turn the eps-space error into the MSE of v."""
    T = 100
    scheduler = make_scheduler(T)
    g = torch.Generator().manual_seed(0)
    t = torch.tensor([0, 1, 30, 60, 90, 98, 99, 99])
    x0 = torch.rand(len(t), 1, 4, 4, generator=g) * 2 - 1
    eps = torch.randn(x0.shape, generator=g)
    abar = torch.tensor(_cosine_abar(T), dtype=torch.float32)[t].view(-1, 1, 1, 1)
    v = abar.sqrt() * eps - (1 - abar).sqrt() * x0
    x_t = add_noise(scheduler, x0, eps, t)
    assert torch.allclose(eps_from_output(scheduler, v, x_t, t, "v"), eps, atol=1e-5)
    assert torch.equal(eps_from_output(scheduler, v, x_t, t), v)  # epsilon: the output itself
    v_hat = v + 0.1 * torch.randn(v.shape, generator=g)
    eps_error = (eps_from_output(scheduler, v_hat, x_t, t, "v") - eps).pow(2).flatten(1).mean(1)
    weights = loss_weights(scheduler, t, prediction="v")
    # rtol 1e-2: at t = 99 eps_hat - eps is 5e-4 times v's error, so float32 keeps 3 digits
    assert torch.allclose(weights * eps_error, (v_hat - v).pow(2).flatten(1).mean(1), rtol=1e-2)
    # Min-SNR means the same eps-space weights for both predictions
    assert torch.equal(loss_weights(scheduler, t, "min-snr", prediction="v"),
                       loss_weights(scheduler, t, "min-snr"))
    with pytest.raises(ValueError, match="model.prediction"):
        eps_from_output(scheduler, v, x_t, t, "x0")


def test_unknown_loss_weighting_is_an_error():
    with pytest.raises(ValueError, match="loss_weighting"):
        loss_weights(make_scheduler(10), torch.arange(10), "snr")
