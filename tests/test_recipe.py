"""The training recipe's options: lr warm-up and cosine decay, Min-SNR loss weighting,
v-prediction."""

import math

import pytest
import torch

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
        assert party.lr_at is None and party.loss_weighting is None
        assert party.prediction == "epsilon"


def test_v_prediction_reaches_every_party(tiny_config):
    """model.prediction = "v": every party reads its model's output as v and weights its loss
    as the MSE of v (1 / abar_t in eps space)."""
    run = Run(tiny_config(**{"model.prediction": '"v"'}))
    t = torch.arange(run.server.num_timesteps)
    for party in [run.server, *run.clients.values()]:
        assert party.prediction == "v"
        assert torch.allclose(party.loss_weighting(t), 1 / party.scheduler.alphas_cumprod)
    run.train_round()
    assert all(torch.isfinite(torch.tensor(p.last_loss)) for p in [run.server, *run.clients.values()])


def test_resume_with_the_recipe_equals_uninterrupted(tiny_config, tmp_path):
    cfg = tiny_config(**{"train.lr_schedule": '"cosine"', "train.lr_warmup_steps": 2,
                         "train.loss_weighting": '"min-snr"', "train.ema_decay": 0.9,
                         "model.prediction": '"v"'})
    run_training(cfg, tmp_path / "cut", stop_after_round=3, progress=False)
    secrets = {cid: (tmp_path / "cut" / SECRETS / f"{cid}.key").read_bytes()
               for cid in ("DU", "HT")}
    full = run_training(cfg, tmp_path / "full", progress=False, secrets=secrets)
    resumed = run_training(cfg, tmp_path / "cut", resume=True, progress=False)
    a, b = full.state_dict(), resumed.state_dict()
    for name, tensor in a["server"]["model"].items():
        assert torch.equal(tensor, b["server"]["model"][name]), name
    # and the recipe did change the training: a plain run ends elsewhere
    plain = run_training(tiny_config(**{"train.ema_decay": 0.9}), tmp_path / "plain",
                         progress=False, secrets=secrets).state_dict()
    assert any(not torch.equal(t, plain["server"]["model"][n])
               for n, t in a["server"]["model"].items())


@pytest.mark.parametrize("key, value", [
    ("train.lr_schedule", '"linear"'), ("train.lr_warmup_steps", -1),
    ("train.loss_weighting", '"snr"'), ("train.min_snr_gamma", 0), ("model.prediction", '"x0"')])
def test_bad_recipe_values_are_one_line_errors(tiny_config, key, value):
    with pytest.raises(ConfigError, match=key):
        tiny_config(**{key: value})


def test_cosine_decay_needs_a_step_count(tiny_config):
    with pytest.raises(ConfigError, match="lr_schedule"):
        tiny_config(**{"train.lr_schedule": '"cosine"', "train.epochs": 2})
