"""The Gaussian toy of docs/design.md section 3: both protocols' loss minimisers are the optimal
noise predictor, whose closed form is known when x0 ~ N(m, v)."""

import functools

import pytest
import torch

from collafuse.diffusion import (add_noise, eps_from_output, handover_view, loss_weights,
                                 make_scheduler, renoise_coefficients)
from collafuse.messages import NoisedBatch, NoisyViews
from collafuse.protocols import local_loss, server_loss

T, CUT, MEAN, VAR, N = 10, 4, 0.3, 0.2, 100_000


def optimal_eps(scheduler, t):
    """E[eps | x_t] = sqrt(1 - abar) (x_t - sqrt(abar) m) / (abar v + 1 - abar): slope, intercept."""
    abar = scheduler.alphas_cumprod[t].double()
    slope = (1 - abar).sqrt() / (abar * VAR + 1 - abar)
    return slope, -slope * abar.sqrt() * MEAN


class PerTimestepLinear(torch.nn.Module):
    """eps_hat(x_t, t) = alpha[t] x_t + beta[t]: rich enough to hold the optimum exactly."""

    def __init__(self):
        super().__init__()
        self.alpha = torch.nn.Parameter(torch.zeros(T))
        self.beta = torch.nn.Parameter(torch.zeros(T))

    def forward(self, x, t):
        return self.alpha[t].view(-1, 1, 1, 1) * x + self.beta[t].view(-1, 1, 1, 1)


def fit(loss_fn):
    """Minimise a quadratic loss exactly enough with L-BFGS (a least-squares fit)."""
    model = PerTimestepLinear()
    opt = torch.optim.LBFGS(model.parameters(), lr=1, max_iter=200, tolerance_grad=1e-12,
                            tolerance_change=1e-14, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = loss_fn(model)
        loss.backward()
        return loss

    opt.step(closure)
    return model


def draw_x0(g):
    return MEAN + VAR ** 0.5 * torch.randn(N, 1, 1, 1, generator=g)


def toy_message(protocol, scheduler):
    """One message of N toy images, as a client of ``protocol`` sends it at the cut CUT."""
    g = torch.Generator().manual_seed(0)
    x0 = draw_x0(g)
    if protocol == "shared-noise":
        t = torch.randint(CUT, T, (N,), generator=g)
        eps = torch.randn(x0.shape, generator=g)
        return NoisedBatch(client_id="toy", x_t=add_noise(scheduler, x0, eps, t), t=t, eps=eps)
    view = handover_view(scheduler, x0, torch.randn(x0.shape, generator=g), CUT)
    return NoisyViews(client_id="toy", views=view, cut=CUT)


@pytest.mark.parametrize("protocol", ["shared-noise", "noisy-data"])
def test_both_protocols_fit_the_optimal_noise_predictor(protocol):
    scheduler = make_scheduler(T)
    msg = toy_message(protocol, scheduler)
    # a fixed generator per call keeps the server's own draws (t, eta) the same in every
    # evaluation, so the loss is one fixed quadratic
    model = fit(lambda m: server_loss(protocol, m, scheduler, [msg],
                                      torch.Generator().manual_seed(1)))
    for t in range(CUT, T):
        assert excess_risk(model, scheduler, t) < 1e-3, t
    assert excess_risk(PerTimestepLinear(), scheduler, T - 1) > 0.5  # the zero model fails


def excess_risk(model, scheduler, t) -> float:
    """E[(eps_hat - eps*)^2] over x_t's own law, relative to Var(eps*(x_t)): 0 at the optimum,
    1 for the zero model, at every t (an absolute tolerance would let a near-zero intercept
    pass untrained at the last step)."""
    slope, intercept = optimal_eps(scheduler, t)
    abar = scheduler.alphas_cumprod[t].double()
    mean, var = abar.sqrt() * MEAN, abar * VAR + 1 - abar  # x_t's law
    d_slope = model.alpha[t].double() - slope
    d_icpt = model.beta[t].double() - intercept
    excess = d_slope ** 2 * (var + mean ** 2) + 2 * d_slope * d_icpt * mean + d_icpt ** 2
    return float((excess / (slope ** 2 * var)).detach())


def test_noisy_data_without_the_weighting_misses_the_optimum():
    """The check can fail: an unweighted regression of eta (not (b/sigma) eps_hat) is off."""
    scheduler = make_scheduler(T)
    g = torch.Generator().manual_seed(0)
    x0 = draw_x0(g)
    view = handover_view(scheduler, x0, torch.randn(x0.shape, generator=g), CUT)

    def unweighted(m):
        gen = torch.Generator().manual_seed(1)
        t = torch.randint(CUT, T, (N,), generator=gen)
        eta = torch.randn(view.shape, generator=gen)
        a, b, _ = (c.view(-1, 1, 1, 1) for c in renoise_coefficients(scheduler, t, CUT))
        return ((m(a * view + b * eta, t) - eta) ** 2).mean()

    model = fit(unweighted)
    slope, _ = optimal_eps(scheduler, CUT)
    assert abs(model.alpha[CUT].item() - slope.item()) > 0.1


@pytest.mark.parametrize("protocol", ["shared-noise", "noisy-data"])
def test_min_snr_weighting_keeps_the_optimal_noise_predictor(protocol):
    """Min-SNR weights each level by a constant: the per-level minimiser is unchanged."""
    scheduler = make_scheduler(T)
    msg = toy_message(protocol, scheduler)
    weighting = functools.partial(loss_weights, scheduler, weighting="min-snr", gamma=0.3)
    assert float(weighting(torch.arange(T))[CUT]) < 0.5  # the weights differ over the levels
    model = fit(lambda m: server_loss(protocol, m, scheduler, [msg],
                                      torch.Generator().manual_seed(1), weighting=weighting))
    for t in range(CUT, T):
        assert excess_risk(model, scheduler, t) < 1e-3, t


@pytest.mark.parametrize("protocol", ["shared-noise", "noisy-data"])
def test_v_prediction_fits_the_optimal_noise_predictor(protocol):
    """A model that outputs v, read as eps_hat = sqrt(abar) v_hat + sqrt(1 - abar) x_t and
    trained with the v loss weights, is the same optimal noise predictor."""
    scheduler = make_scheduler(T)
    msg = toy_message(protocol, scheduler)
    weighting = functools.partial(loss_weights, scheduler, prediction="v")
    model = fit(lambda m: server_loss(
        protocol, lambda x, t: eps_from_output(scheduler, m(x, t), x, t, "v"), scheduler, [msg],
        torch.Generator().manual_seed(1), weighting=weighting))
    implied = PerTimestepLinear()  # eps_hat = (a alpha + b) x_t + a beta
    abar = scheduler.alphas_cumprod
    with torch.no_grad():
        implied.alpha.copy_(abar.sqrt() * model.alpha + (1 - abar).sqrt())
        implied.beta.copy_(abar.sqrt() * model.beta)
    for t in range(CUT, T):
        assert excess_risk(implied, scheduler, t) < 1e-3, t
    assert excess_risk(model, scheduler, T - 1) > 0.5  # read as eps, the v-model is far off


def test_weighted_losses_are_the_weighted_mean_of_per_sample_errors():
    scheduler = make_scheduler(T)
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(6, 1, 4, 4, generator=g), torch.randn(6, 1, 4, 4, generator=g)
    t = torch.tensor([0, 1, 2, 5, 8, 9])
    model = PerTimestepLinear()
    torch.nn.init.normal_(model.alpha, generator=g)
    weights = torch.tensor([0.1, 0.2, 0.3, 1.0, 2.0, 3.0])
    def weighting(s):
        return weights[torch.searchsorted(t, s)]

    x_t = add_noise(scheduler, x0, eps, t)
    errors = ((model(x_t, t) - eps) ** 2).mean(dim=(1, 2, 3))
    expected = (weights * errors).mean()
    assert torch.allclose(local_loss(model, scheduler, x0, t, eps, weighting), expected)
    msg = NoisedBatch(client_id="toy", x_t=x_t, t=t, eps=eps)
    assert torch.allclose(server_loss("shared-noise", model, scheduler, [msg], g,
                                      weighting=weighting), expected)
    # unweighted: the plain mean, which the weighted one is not here
    plain = local_loss(model, scheduler, x0, t, eps)
    assert torch.allclose(plain, errors.mean()) and not torch.allclose(plain, expected)
