"""End to end through the in-process engine: tiny preset, two real hospitals, a few rounds."""

import json

import numpy as np
import pytest
import torch

from collafuse.config import ConfigError
from collafuse.engines.local import SECRETS, load_run, run_training
from collafuse.state import StateError, load_state

RUN_FILES = ["config.toml", "checkpoint.pt", "metrics.jsonl", "summary.json",
             "samples/DU.png", "samples/DU.npz", "samples/HT.png", "samples/HT.npz",
             "samples/DU-real-vs-generated.png", "samples/HT-real-vs-generated.png"]


@pytest.mark.slow
@pytest.mark.parametrize("protocol", ["shared-noise", "noisy-data"])
def test_loss_falls_and_run_folder_is_complete(tiny_config, tmp_path, protocol):
    cfg = tiny_config(**{"train.steps": 30, "train.protocol": f'"{protocol}"',
                         "train.checkpoint_every": 10})
    run = run_training(cfg, tmp_path / "run", progress=False)
    lines = [json.loads(x) for x in (tmp_path / "run/metrics.jsonl").read_text().splitlines()]
    assert [x["round"] for x in lines] == list(range(1, 31))
    server = [x["server_loss"] for x in lines]
    assert np.mean(server[-5:]) < 0.8 * np.mean(server[:5])
    for cid in ("DU", "HT"):
        losses = [x[f"client_loss/{cid}"] for x in lines]
        assert np.mean(losses[-5:]) < 0.8 * np.mean(losses[:5])
    for name in RUN_FILES:
        assert (tmp_path / "run" / name).is_file(), name
    samples = np.load(tmp_path / "run/samples/DU.npz")
    assert samples["images"].shape == (4, 16, 16) and samples["images"].dtype == np.uint8
    assert samples["handover"].shape == (4, 1, 16, 16)
    from PIL import Image  # real | generated: two 2x2 grids of 16x16 images enlarged 6x, 8 px gap
    assert Image.open(tmp_path / "run/samples/DU-real-vs-generated.png").size == (2 * 198 + 8, 198)
    summary = json.loads((tmp_path / "run/summary.json").read_text())
    assert summary["protocol"] == protocol and summary["cut_index"] == 10
    assert summary["bytes"]["DU"]["sent"] > 0 and summary["bytes"]["server"]["received"] > 0
    assert run.server.steps > 0


def test_resume_equals_uninterrupted(tiny_config, tmp_path):
    cfg = tiny_config(**{"train.protocol": '"noisy-data"', "train.ema_decay": 0.9})
    run_training(cfg, tmp_path / "cut", stop_after_round=3, progress=False)
    assert not (tmp_path / "cut/summary.json").exists()
    # the uninterrupted twin gets the same client secrets; the resumed run reads them from disk
    secrets = {cid: (tmp_path / "cut" / SECRETS / f"{cid}.key").read_bytes()
               for cid in ("DU", "HT")}
    full = run_training(cfg, tmp_path / "full", progress=False, secrets=secrets)
    resumed = run_training(cfg, tmp_path / "cut", resume=True, progress=False)
    a, b = full.state_dict(), resumed.state_dict()
    for party_a, party_b in [(a["server"], b["server"])] + [
            (a["clients"][c], b["clients"][c]) for c in a["clients"]]:
        assert party_a["ema"]["updates"] == party_b["ema"]["updates"] > 0
        for key, weights_a, weights_b in [("model", party_a["model"], party_b["model"]),
                                          ("ema", party_a["ema"]["model"], party_b["ema"]["model"])]:
            for name, tensor in weights_a.items():
                assert torch.equal(tensor, weights_b[name]), (key, name)
    assert (tmp_path / "full/metrics.jsonl").read_text() == \
        (tmp_path / "cut/metrics.jsonl").read_text()
    assert np.array_equal(np.load(tmp_path / "full/samples/DU.npz")["images"],
                          np.load(tmp_path / "cut/samples/DU.npz")["images"])


def test_client_secrets_are_random_private_files_never_in_what_is_shared(tiny_config, tmp_path):
    """Same config and seed, two runs: different secrets, so different noisy-data views; each
    secret sits in its own owner-only file, in neither the config nor the checkpoint."""
    cfg = tiny_config(**{"train.protocol": '"noisy-data"', "train.steps": 1})
    runs = [run_training(cfg, tmp_path / name, progress=False) for name in ("a", "b")]
    assert not torch.equal(runs[0].clients["DU"].views, runs[1].clients["DU"].views)
    for name in ("a", "b"):
        key = tmp_path / name / SECRETS / "DU.key"
        secret = key.read_bytes()
        assert len(secret) == 32 and key.stat().st_mode & 0o777 == 0o600
        for shared in ("config.toml", "checkpoint.pt", "summary.json"):
            assert secret not in (tmp_path / name / shared).read_bytes()
    again = load_run(tmp_path / "a")  # the audit and the sweep rebuild the same views
    assert torch.equal(again.clients["DU"].views, runs[0].clients["DU"].views)


@pytest.mark.parametrize("cut_ratio, server_steps", [(0.0, 6), (1.0, 0)])
def test_extreme_cut_ratios_leave_one_side_idle(tiny_config, tmp_path, cut_ratio, server_steps):
    run = run_training(tiny_config(**{"diffusion.cut_ratio": cut_ratio}), tmp_path / "r",
                       progress=False)
    assert run.server.steps == server_steps
    client_trained = [c.last_loss is not None for c in run.clients.values()]
    assert all(client_trained) == (cut_ratio == 1.0)


def test_run_folder_is_not_overwritten_and_resume_needs_same_config(tiny_config, tmp_path):
    cfg = tiny_config()
    run_training(cfg, tmp_path / "r", stop_after_round=2, progress=False)
    with pytest.raises(ConfigError, match="not empty"):
        run_training(cfg, tmp_path / "r", progress=False)
    with pytest.raises(ConfigError, match="another config"):
        run_training(tiny_config(**{"train.lr": 0.01}), tmp_path / "r", resume=True,
                     progress=False)


def test_sampling_from_a_run_folder(tiny_config, tmp_path):
    run_training(tiny_config(), tmp_path / "r", progress=False)
    run = load_run(tmp_path / "r")
    images, handover = run.sample("HT", 2, seed=3)
    assert images.shape == (2, 1, 16, 16) and handover.shape == (2, 1, 16, 16)


def test_corrupt_checkpoint_is_a_one_line_error(tmp_path):
    bad = tmp_path / "checkpoint.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(StateError, match="checkpoint.pt") as err:
        load_state(bad)
    assert "\n" not in str(err.value)
