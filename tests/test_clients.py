"""Clients with their own cut ratio and UNet preset ([clients.<id>]), tiny runs on real data."""

import json

import pytest
import torch

from collafuse.config import ConfigError, from_dict, load_config
from collafuse.diffusion import cut_index, renoise_coefficients
from collafuse.engines.local import run_training
from collafuse.messages import MessageError, NoisedBatch, NoisyViews
from collafuse.protocols import server_loss
from conftest import tiny_overrides

SECRETS = {"DU": bytes(range(32)), "HT": bytes(range(1, 33))}


def test_config_sections_round_trip_and_errors():
    cfg = load_config(None, tiny_overrides() + ["clients.DU.cut_ratio=0.2",
                                                "clients.HT.preset='small'"])
    assert (cfg.cut_ratio("DU"), cfg.cut_ratio("HT")) == (0.2, 0.5)
    assert (cfg.preset("DU"), cfg.preset("HT")) == ("tiny", "small")
    import tomllib
    assert from_dict(tomllib.loads(cfg.to_toml())).to_dict() == cfg.to_dict()
    plain = load_config(None, tiny_overrides())
    assert "[clients." not in plain.to_toml() and "clients" not in plain.to_dict()
    for bad, why in ((["clients.XX.cut_ratio=0.2"], "not one of data.clients"),
                     (["clients.DU.cut_ratio=1.5"], r"expected a number in \[0, 1\]"),
                     (["clients.DU.preset='huge'"], "clients.DU.preset: expected 'tiny', .* got 'huge'"),
                     (["clients.DU.depth=3"], "unknown key"),
                     (["clients.DU=0.2"], "expected clients.<id>.<key>=value")):
        with pytest.raises(ConfigError, match=why):
            load_config(None, tiny_overrides() + bad)


@pytest.mark.parametrize("protocol", ["shared-noise", "noisy-data"])
def test_equal_settings_reproduce_the_run_bit_for_bit(tmp_path, protocol):
    base = tiny_overrides(**{"train.protocol": f'"{protocol}"'})
    plain = run_training(load_config(None, base), tmp_path / "plain", progress=False,
                         secrets=SECRETS)
    same = run_training(load_config(None, base + ["clients.DU.cut_ratio=0.5",
                                                  "clients.HT.preset='tiny'"]),
                        tmp_path / "same", progress=False, secrets=SECRETS)
    for a, b in [(plain.server, same.server), *[(plain.clients[c], same.clients[c]) for c in SECRETS]]:
        for name, tensor in a.model.state_dict().items():
            assert torch.equal(tensor, b.model.state_dict()[name]), name


@pytest.mark.slow
@pytest.mark.parametrize("protocol", ["shared-noise", "noisy-data"])
def test_each_client_trains_and_samples_at_its_own_cut(tmp_path, protocol):
    cfg = load_config(None, tiny_overrides(**{"train.protocol": f'"{protocol}"'})
                      + ["clients.DU.cut_ratio=0.2", "clients.HT.cut_ratio=0.8",
                         "clients.HT.preset='small'"])
    run = run_training(cfg, tmp_path / "run", progress=False, secrets=SECRETS)
    du, ht, server = run.clients["DU"], run.clients["HT"], run.server
    assert (du.cut, ht.cut) == (cut_index(0.2, 20), cut_index(0.8, 20)) == (4, 16)
    assert server.cut_of("DU") == 4 and server.cut_of("HT") == 16 and server.cut == 10
    size = {c: sum(p.numel() for p in run.clients[c].model.parameters()) for c in SECRETS}
    assert size["HT"] > 2 * size["DU"]  # HT's own, larger UNet
    assert server.steps > 0 and du.steps == ht.steps == 6
    for cid, cut in (("DU", 4), ("HT", 16)):  # the server hands each client over at its cut
        _, handover = run.sample(cid, 2, seed=0)
        assert server.generate(du.request_samples(2)).cut == 4
        assert server.generate(ht.request_samples(2)).cut == 16
        assert handover.shape == (2, 1, 16, 16)
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["clients"]["HT"]["cut_index"] == 16 and summary["clients"]["HT"]["preset"] == "small"
    # the server checks each client's messages against that client's own range
    x = torch.zeros(1, 1, 16, 16)
    if protocol == "shared-noise":
        server.check(NoisedBatch(client_id="DU", x_t=x, t=torch.tensor([5]), eps=x))
        with pytest.raises(MessageError, match=r"range \[16, 20\)"):
            server.check(NoisedBatch(client_id="HT", x_t=x, t=torch.tensor([5]), eps=x))
    else:
        server.check(NoisyViews(client_id="DU", views=x, cut=4))
        with pytest.raises(MessageError, match="made for cut index 4, the server uses 16"):
            server.check(NoisyViews(client_id="HT", views=x, cut=4))


def test_noisy_data_server_draws_each_views_level_from_its_own_range():
    """Mixed cuts: t of each view in [s_i, T), and the re-noising uses each view's own s_i."""
    from collafuse.diffusion import make_scheduler

    scheduler = make_scheduler(20)
    seen = {}

    def model_eps(x_t, t):
        seen["t"] = t.clone()
        return torch.zeros_like(x_t)

    msgs = [NoisyViews(client_id="DU", views=torch.zeros(400, 1, 4, 4), cut=4),
            NoisyViews(client_id="HT", views=torch.zeros(400, 1, 4, 4), cut=16)]
    server_loss("noisy-data", model_eps, scheduler, msgs, torch.Generator().manual_seed(0))
    t_du, t_ht = seen["t"][:400], seen["t"][400:]
    assert t_du.min() == 4 and t_du.max() == 19 and t_ht.min() == 16 and t_ht.max() == 19
    cut = torch.tensor([4, 16, 0])
    t = torch.tensor([10, 17, 3])
    rows = renoise_coefficients(scheduler, t, cut)
    for i in range(3):
        one = renoise_coefficients(scheduler, t[i:i + 1], int(cut[i]))
        for a, b in zip(rows, one):
            assert torch.allclose(a[i], b[0])
