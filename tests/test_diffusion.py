"""The diffusion math: the cut, ownership, add_noise and the split sampling loop."""

import pytest
import torch

from collafuse.diffusion import (add_noise, client_timesteps, cut_index, denoise,
                                 handover_view, make_scheduler, renoise_coefficients,
                                 server_owns, server_timesteps)


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


def test_split_sampling_chains_server_and_client_ranges():
    """Server steps then client steps with one generator equal the single chain, for every s."""
    scheduler = make_scheduler(20)
    x = torch.randn(2, 1, 4, 4, generator=torch.Generator().manual_seed(3))
    full = denoise(_toy_model, scheduler, x, list(range(19, -1, -1)),
                   torch.Generator().manual_seed(4))
    for s in (0, 1, 7, 19, 20):
        g = torch.Generator().manual_seed(4)
        handover = denoise(_toy_model, scheduler, x, server_timesteps(s, 20), g)
        torch.testing.assert_close(denoise(_toy_model, scheduler, handover, client_timesteps(s), g),
                                   full)


def test_empty_range_is_identity():
    scheduler = make_scheduler(10)
    x = torch.randn(2, 1, 4, 4)
    assert torch.equal(denoise(_toy_model, scheduler, x, server_timesteps(10, 10)), x)
    assert torch.equal(denoise(_toy_model, scheduler, x, client_timesteps(0)), x)


def test_renoised_view_has_the_marginal_of_add_noise():
    """x_t = a_t y + b_t eta with y at level s-1 has mean sqrt(abar_t) x0, variance 1 - abar_t."""
    scheduler = make_scheduler(100)
    s, t = 30, 70
    n = 200_000
    g = torch.Generator().manual_seed(0)
    x0 = torch.full((n, 1, 1, 1), 0.5)
    y = handover_view(scheduler, x0, torch.randn(x0.shape, generator=g), s)
    a, b, sigma = renoise_coefficients(scheduler, torch.full((n,), t), s)
    x_t = a.view(-1, 1, 1, 1) * y + b.view(-1, 1, 1, 1) * torch.randn(x0.shape, generator=g)
    abar = scheduler.alphas_cumprod[t]
    assert abs(x_t.mean().item() - 0.5 * abar.sqrt().item()) < 0.01
    assert abs(x_t.var().item() - (1 - abar).item()) < 0.01
    assert torch.allclose(sigma, (1 - abar).sqrt())


def test_renoise_rejects_client_timesteps_and_handles_s_zero():
    scheduler = make_scheduler(10)
    with pytest.raises(ValueError, match=">= s"):
        renoise_coefficients(scheduler, torch.tensor([2]), 3)
    a, b, sigma = renoise_coefficients(scheduler, torch.tensor([4]), 0)
    torch.testing.assert_close(b, sigma)  # s = 0: the view is x0 itself, plain forward noising
    x0 = torch.rand(2, 1, 2, 2)
    assert torch.equal(handover_view(scheduler, x0, torch.randn(2, 1, 2, 2), 0), x0)
