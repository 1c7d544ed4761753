"""Split sampling is one ordinary DDPM chain run on two machines (docs/design.md section 2).

The noise predictor here is exact: for data x0 ~ N(m, v) per pixel, E[eps | x_t] =
b_t (x_t - a_t m) / (a_t^2 v + b_t^2) with a_t = sqrt(abar_t), b_t = sqrt(1 - abar_t). With it
every sampler step is linear-Gaussian, so the law of the output is known in closed form.
"""

import types

import pytest
import torch

from collafuse.client import Client
from collafuse.diffusion import cut_index, make_scheduler
from collafuse.messages import SampleRequest
from collafuse.party import Recipe
from collafuse.server import Server

T, MEAN, VAR = 100, 0.1, 0.09
SHAPE = (1, 4, 4)
N = 5000  # samples; 80,000 independent pixel values


class GaussianEps(torch.nn.Module):
    """The exact noise predictor of Gaussian data, shaped like a diffusers UNet's output."""

    def __init__(self, scheduler):
        super().__init__()
        self.abar = scheduler.alphas_cumprod
        self.unused = torch.nn.Parameter(torch.zeros(1))  # parties build an optimiser

    def forward(self, x, t):
        abar = self.abar[t].view(-1, 1, 1, 1)
        a, b = abar.sqrt(), (1 - abar).sqrt()
        return types.SimpleNamespace(sample=b * (x - a * MEAN) / (a * a * VAR + b * b))


class GaussianV(GaussianEps):
    """The exact v = sqrt(abar) eps - sqrt(1 - abar) x0 predictor of the same data:
    a_t E[eps | x_t] - b_t E[x0 | x_t], with
    E[x0 | x_t] = m + a_t VAR (x_t - a_t m) / (a_t^2 VAR + b_t^2)."""

    def forward(self, x, t):
        abar = self.abar[t].view(-1, 1, 1, 1)
        a, b = abar.sqrt(), (1 - abar).sqrt()
        eps = b * (x - a * MEAN) / (a * a * VAR + b * b)
        x0 = MEAN + a * VAR * (x - a * MEAN) / (a * a * VAR + b * b)
        return types.SimpleNamespace(sample=a * eps - b * x0)


def split_parties(cut_ratio, prediction="epsilon"):
    scheduler = make_scheduler(T)
    cut = cut_index(cut_ratio, T)
    images = torch.zeros(2, *SHAPE)  # unused: nothing is trained here
    model = GaussianV if prediction == "v" else GaussianEps
    recipe = Recipe(prediction=prediction)
    client = Client("A", images, model(scheduler), scheduler, cut, "shared-noise", 2, 1e-3,
                    seed=11, secret=bytes(32), recipe=recipe)
    server = Server(model(scheduler), scheduler, cut, "shared-noise", SHAPE, 1e-3, seed=12,
                    recipe=recipe)
    return server, client


def split_sample(cut_ratio, seed=0, prediction="epsilon"):
    """Samples, the server's x_T and the client's first-step noise z (None when s = 0)."""
    server, client = split_parties(cut_ratio, prediction)
    seen = {}

    def record(t, x):
        seen.setdefault(t, x.clone())

    partial = server.generate(SampleRequest("A", N, seed), on_step=record)
    x_T = seen[T]
    out = client.finish_samples(partial, seed, on_step=record)
    s = server.cut
    z = None
    if s > 1:  # recover the noise of the client's first step (t = s-1) from what it produced
        mean, std = _step_mean_and_std(server.scheduler, partial.x, s - 1)
        z = (seen[s - 1] - mean) / std
    return out, x_T, z


def _step_mean_and_std(scheduler, x, t):
    """The DDPM step's posterior mean and std (Ho et al. 2020, eqs. 6-7), written out here
    independently of diffusers, for the exact predictor."""
    abar = scheduler.alphas_cumprod
    abar_t, abar_prev = abar[t], abar[t - 1] if t > 0 else torch.tensor(1.0)
    beta = 1 - abar_t / abar_prev
    a, b = abar_t.sqrt(), (1 - abar_t).sqrt()
    eps = b * (x - a * MEAN) / (a * a * VAR + b * b)
    x0 = ((x - b * eps) / a).clamp(-1, 1)
    mean = (abar_prev.sqrt() * beta * x0 + (1 - beta).sqrt() * (1 - abar_prev) * x) / (1 - abar_t)
    std = ((1 - abar_prev) / (1 - abar_t) * beta).sqrt()
    return mean, std


def chain_law():
    """Mean and variance of the output of the whole T-step chain from N(0, 1), exactly: each
    step maps (m, v) linearly because the exact predictor is linear in x."""
    scheduler = make_scheduler(T)
    m, v = torch.tensor(0.0, dtype=torch.float64), torch.tensor(1.0, dtype=torch.float64)
    for t in range(T - 1, -1, -1):
        mean0, std = _step_mean_and_std(scheduler, torch.tensor(0.0), t)
        mean1, _ = _step_mean_and_std(scheduler, torch.tensor(1.0), t)
        slope = float(mean1 - mean0)
        m, v = slope * m + float(mean0), slope ** 2 * v + float(std) ** 2
    return float(m), float(v)


@pytest.mark.parametrize("cut_ratio", [0.0, 0.4, 1.0])
def test_split_sampler_gives_the_data_law(cut_ratio):
    out, _, _ = split_sample(cut_ratio)
    mean, var = out.mean().item(), out.var().item()
    chain_mean, chain_var = chain_law()
    # The exact law of a 100-step ancestral DDPM chain (beta-tilde variances) sits 10% under
    # the data's variance; the sampler must reproduce that law to Monte Carlo precision (the
    # std of a variance estimate from 80,000 values is 0.5%) ...
    assert abs(mean - chain_mean) < 0.005 and abs(var / chain_var - 1) < 0.02, (mean, var)
    # ... and so lie within the stated tolerance of the data's own mean and variance.
    assert abs(mean - MEAN) < 0.01 and abs(var / VAR - 1) < 0.12, (mean, var)


def test_v_prediction_parties_sample_the_same_law():
    """Parties whose models output v (model.prediction = "v") run the same chain."""
    out, _, _ = split_sample(0.4, prediction="v")
    chain_mean, chain_var = chain_law()
    assert abs(out.mean().item() - chain_mean) < 0.005, out.mean()
    assert abs(out.var().item() / chain_var - 1) < 0.02, out.var()


@pytest.mark.parametrize("cut_ratio", [0.4, 1.0])
def test_client_noise_is_independent_of_the_servers(cut_ratio):
    _, x_T, z = split_sample(cut_ratio)
    assert abs(z.std().item() - 1) < 0.02  # it is the step's standard normal noise ...
    corr = torch.corrcoef(torch.stack([z.flatten(), x_T.flatten()]))[0, 1].item()
    assert abs(corr) < 0.03, corr  # ... and none of the server's x_T (80,000 pairs: 4 sigma)


def test_sample_seeds_make_samples_reproducible_and_distinct():
    a, _, _ = split_sample(0.4, seed=3)
    b, _, _ = split_sample(0.4, seed=3)
    c, _, _ = split_sample(0.4, seed=4)
    assert torch.equal(a, b) and not torch.equal(a, c)


# ----------------------------------------------------------------------- fewer steps (DDIM)
@pytest.mark.parametrize("cut,steps", [(60, 10), (60, 20), (0, 10), (100, 10), (1, 2), (99, 5),
                                       (60, 100), (60, 0)])
def test_sampling_plan_makes_exactly_n_calls_and_splits_at_the_cut(cut, steps):
    from collafuse.diffusion import sampling_plan

    server_part, client_part = sampling_plan(cut, T, steps)
    assert len(server_part) + len(client_part) == (steps or T)
    assert all(t >= cut for t in server_part) and all(t < cut for t in client_part)
    if cut < T:  # the server starts from pure noise at T-1 and owns at least one call
        assert server_part[0] == T - 1 and len(server_part) >= 1
    if cut > 0:  # the client starts at the hand-over level s-1 and ends at t = 0
        assert client_part[0] == cut - 1 and client_part[-1] == 0
    for part in (server_part, client_part):
        assert part == sorted(set(part), reverse=True)


class Counting(GaussianEps):
    calls = 0

    def forward(self, x, t):
        Counting.calls += 1
        return super().forward(x, t)


@pytest.mark.parametrize("sampler,steps,expected", [("ddim", 0, (40, 60)), ("ddim", 10, (4, 6)),
                                                    ("ddpm", 20, (8, 12)), ("ddpm", 0, (40, 60))])
def test_parties_make_the_planned_calls(sampler, steps, expected):
    scheduler = make_scheduler(T)
    cut = cut_index(0.6, T)
    client = Client("A", torch.zeros(2, *SHAPE), Counting(scheduler), scheduler, cut,
                    "shared-noise", 2, 1e-3, seed=11, secret=bytes(32))
    server = Server(Counting(scheduler), scheduler, cut, "shared-noise", SHAPE, 1e-3, seed=12)
    Counting.calls = 0
    partial = server.generate(client.request_samples(3, 0, sampler, steps))
    assert (Counting.calls, partial.cut, partial.sampler, partial.steps) == \
        (expected[0], cut, sampler, steps)
    Counting.calls = 0
    out = client.finish_samples(partial, 0)
    assert Counting.calls == expected[1] and out.shape == (3, *SHAPE)


def test_ddim_in_few_steps_reaches_the_data_law():
    """With the exact predictor, deterministic DDIM split at c = 0.6 gives samples of the data's
    mean; their variance falls short as calls get fewer (measured: 0.085 with all 100 calls,
    0.071 with 20, 0.054 with 10; the data's is 0.09), as DDIM's discretisation does. The same
    request twice gives the same images."""
    server, client = split_parties(0.6)
    for steps, tolerance in ((0, 0.1), (20, 0.25)):
        out = client.finish_samples(server.generate(client.request_samples(N, 0, "ddim", steps)), 0)
        assert abs(out.mean().item() - MEAN) < 0.01
        assert abs(out.var().item() / VAR - 1) < tolerance, steps
    again = client.finish_samples(server.generate(client.request_samples(N, 0, "ddim", 20)), 5)
    assert torch.equal(out, again)  # no noise is drawn after x_T: the client's seed is moot
