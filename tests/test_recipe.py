"""The training recipe's options: lr warm-up and cosine decay, Min-SNR loss weighting,
v-prediction, the client's extra steps on its own levels."""

import math

import pytest
import torch
from conftest import record_server_traffic

from collafuse.config import ConfigError
from collafuse.engines.local import SECRETS, Run, run_training
from collafuse.optim import lr_factor


def test_lr_factor_warms_up_linearly_then_follows_half_a_cosine():
    total, warmup = 100, 10
    assert [lr_factor(s, total, "cosine", warmup) for s in range(3)] == [0.1, 0.2, 0.3]
    assert lr_factor(9, total, "cosine", warmup) == 1.0
    assert lr_factor(10, total, "cosine", warmup) == 1.0  # the decay starts at the top
    assert lr_factor(55, total, "cosine", warmup) == pytest.approx(0.5)  # half way down
    assert lr_factor(100, total, "cosine", warmup) == pytest.approx(0.0, abs=1e-12)
    assert lr_factor(130, total, "cosine", warmup) == pytest.approx(0.0, abs=1e-12)
    for s in range(11, 100):  # strictly falling
        assert lr_factor(s, total, "cosine", warmup) < lr_factor(s - 1, total, "cosine", warmup)
    assert [lr_factor(s, total) for s in (0, 50, 200)] == [1.0, 1.0, 1.0]
    assert lr_factor(4, total, "constant", 5) == 1.0 and lr_factor(3, total, "constant", 5) == 0.8
    with pytest.raises(ValueError, match="lr_schedule"):
        lr_factor(0, total, "linear")


def test_every_party_steps_with_the_scheduled_lr(tiny_config):
    steps, warmup, lr = 8, 2, 1e-3
    cfg = tiny_config(**{"train.steps": steps, "train.lr": lr, "train.lr_schedule": '"cosine"',
                         "train.lr_warmup_steps": warmup})
    run = Run(cfg)
    parties = [run.server, *run.clients.values()]
    seen = {id(p): [] for p in parties}
    for party in parties:  # record the lr each optimiser step runs with
        party.optimizer.register_step_pre_hook(
            lambda opt, args, kwargs, key=id(party): seen[key].append(opt.param_groups[0]["lr"]))
    for _ in range(steps):
        run.train_round()
    # the lr of the step after k of the party's batches, written out from the schedule
    expected = [lr * (k + 1) / warmup if k < warmup
                else lr * 0.5 * (1 + math.cos(math.pi * (k - warmup) / (steps - warmup)))
                for k in range(steps + 1)]
    for client in run.clients.values():
        assert seen[id(client)] and seen[id(client)] == pytest.approx(expected[:len(seen[id(client)])])
    # the server counts its steps from 1 (it counts a step before taking it)
    assert seen[id(run.server)] == pytest.approx(expected[1:steps + 1])


def test_defaults_keep_the_constant_lr_and_plain_loss(tiny_config):
    run = Run(tiny_config())
    for party in [run.server, *run.clients.values()]:
        assert not party.recipe.schedules_lr and party.loss_weights is None
        assert party.prediction == "epsilon"


def test_v_prediction_reaches_every_party(tiny_config):
    """model.prediction = "v": every party reads its model's output as v and weights its loss
    as the MSE of v (1 / abar_t in eps space)."""
    run = Run(tiny_config(**{"model.prediction": '"v"'}))
    t = torch.arange(run.server.num_timesteps)
    for party in [run.server, *run.clients.values()]:
        assert party.prediction == "v"
        assert torch.allclose(party.loss_weights(t), 1 / party.scheduler.alphas_cumprod)
    run.train_round()
    assert all(torch.isfinite(torch.tensor(p.last_loss)) for p in [run.server, *run.clients.values()])


def _record_model_calls(party) -> list[tuple[int, torch.Tensor]]:
    """(batch size, t) of every training call of the party's model, as it happens."""
    calls = []
    party.model.register_forward_pre_hook(
        lambda module, args: calls.append((args[0].shape[0], args[1].clone()))
        if torch.is_grad_enabled() else None)
    return calls


def test_local_steps_train_the_client_on_its_own_levels_and_send_nothing_more(tiny_config):
    """train.local_steps = 3: after each batch's step every client takes two more, each on
    local_batch_size images with t below its cut; the server receives the paper's round's
    messages, bit for bit, and nothing else."""
    paper, local = (Run(tiny_config(**extra), secrets={"DU": b"d" * 32, "HT": b"h" * 32})
                    for extra in ({}, {"train.local_steps": 3, "train.local_batch_size": 5}))
    calls = {cid: _record_model_calls(c) for cid, c in local.clients.items()}
    received = {id(run): record_server_traffic(run) for run in (paper, local)}
    paper.train_round()
    local.train_round()
    for cid, client in local.clients.items():
        assert client.optimizer.state_dict()["state"][0]["step"] == 3  # three steps in round 1
        (_, t_first), *extra = calls[cid]
        assert int(t_first.max()) < client.cut
        assert [size for size, _ in extra] == [5, 5]
        assert all(int(t.max()) < client.cut for _, t in extra)
    # round 1's messages are built before the extra steps: the paper's round's, bit for bit
    assert len(received[id(local)]) == len(received[id(paper)]) == 2
    for ours, theirs in zip(received[id(local)], received[id(paper)]):
        assert ours.tensors.keys() == theirs.tensors.keys()
        assert all(torch.equal(x, theirs.tensors[k]) for k, x in ours.tensors.items())
    # and the extra steps did train the client
    assert any(not torch.equal(t, paper.clients["DU"].model.state_dict()[n])
               for n, t in local.clients["DU"].model.state_dict().items())


def test_local_steps_at_c_0_train_nothing(tiny_config):
    """A client that owns no level (c = 0) has no extra step to take."""
    run = Run(tiny_config(**{"diffusion.cut_ratio": 0.0, "train.local_steps": 3}))
    run.train_round()
    assert all(not c.optimizer.state_dict()["state"] for c in run.clients.values())


@pytest.mark.slow
def test_resume_with_the_recipe_equals_uninterrupted(tiny_config, tmp_path):
    cfg = tiny_config(**{"train.lr_schedule": '"cosine"', "train.lr_warmup_steps": 2,
                         "train.loss_weighting": '"min-snr"', "train.ema_decay": 0.9,
                         "model.prediction": '"v"', "train.local_steps": 2,
                         "train.local_batch_size": 5})
    run_training(cfg, tmp_path / "cut", stop_after_round=3, progress=False)
    secrets = {cid: (tmp_path / "cut" / SECRETS / f"{cid}.key").read_bytes()
               for cid in ("DU", "HT")}
    full = run_training(cfg, tmp_path / "full", progress=False, secrets=secrets)
    resumed = run_training(cfg, tmp_path / "cut", resume=True, progress=False)
    a, b = full.state_dict(), resumed.state_dict()
    for name, tensor in a["server"]["model"].items():
        assert torch.equal(tensor, b["server"]["model"][name]), name
    for name, tensor in a["clients"]["DU"]["model"].items():
        assert torch.equal(tensor, b["clients"]["DU"]["model"][name]), name
    # and the recipe did change the training: a plain run ends elsewhere
    plain = run_training(tiny_config(**{"train.ema_decay": 0.9}), tmp_path / "plain",
                         progress=False, secrets=secrets).state_dict()
    assert any(not torch.equal(t, plain["server"]["model"][n])
               for n, t in a["server"]["model"].items())


@pytest.mark.parametrize("key, value", [
    ("train.lr_schedule", '"linear"'), ("train.lr_warmup_steps", -1),
    ("train.loss_weighting", '"snr"'), ("train.min_snr_gamma", 0), ("model.prediction", '"x0"'),
    ("train.local_steps", 0), ("train.local_batch_size", -1), ("train.local_steps", 1.5)])
def test_bad_recipe_values_are_one_line_errors(tiny_config, key, value):
    with pytest.raises(ConfigError, match=key):
        tiny_config(**{key: value})


def test_cosine_decay_needs_a_step_count(tiny_config):
    with pytest.raises(ConfigError, match="lr_schedule"):
        tiny_config(**{"train.lr_schedule": '"cosine"', "train.epochs": 2})


def test_parties_are_built_with_their_recipe_and_meter(tiny_config):
    """The factory hands each party its recipe and meter at construction (nothing is set on a
    built party afterwards); one config gives every party the same recipe."""
    from collafuse import factory
    from collafuse.metering import WallMeter
    from collafuse.party import Recipe

    cfg = tiny_config(**{"model.prediction": '"v"', "train.loss_weighting": '"min-snr"',
                         "train.lr_schedule": '"cosine"', "train.lr_warmup_steps": 3})
    meter = WallMeter()
    cid, images = next(iter(factory.load_client_data(cfg).clients.items()))
    parties = [factory.make_server(cfg, meter=meter),
               factory.make_client(cfg, cid, images, bytes(32), meter=meter)]
    expected = Recipe(prediction="v", loss_weighting="min-snr",
                      min_snr_gamma=cfg.train.min_snr_gamma, lr_schedule="cosine",
                      lr_warmup_steps=3, total_steps=cfg.train.steps)
    for party in parties:
        assert party.meter is meter and party.recipe == expected
        t = torch.arange(party.num_timesteps)
        assert torch.allclose(party.loss_weights(t), (party.scheduler.alphas_cumprod
                              / (1 - party.scheduler.alphas_cumprod)).clamp(
                                  max=cfg.train.min_snr_gamma)
                              / (party.scheduler.alphas_cumprod
                                 / (1 - party.scheduler.alphas_cumprod)))
    assert not hasattr(factory, "with_recipe")
