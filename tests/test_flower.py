"""The Flower engine: simulation engine, equivalence with in-process, malformed messages, faults."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("flwr")

from flower_harness import ROOT, Deployment  # noqa: E402

from collafuse.config import load_config  # noqa: E402
from collafuse.data import save_images  # noqa: E402
from collafuse.engines.flower import transport  # noqa: E402
from collafuse.engines.flower.server_app import RejectedReply, accept_reply  # noqa: E402
from collafuse.engines.local import run_training  # noqa: E402
from collafuse.factory import load_client_data, make_client, make_server  # noqa: E402
from collafuse.messages import encode  # noqa: E402


def tiny_config(tmp: Path, **extra: str) -> Path:
    """Tiny preset, 2 clients, 2 rounds of 1 batch; the run config file's path."""
    text = f'''
[data]
path = "{ROOT}/data/lgg_flair_32.npz"
intensity = "none"
clients = ["DU", "HT"]
max_images_per_client = 16
[diffusion]
num_timesteps = 20
cut_ratio = 0.6
[model]
preset = "tiny"
[train]
protocol = "{extra.get("protocol", "shared-noise")}"
batch_size = 8
steps = {extra.get("steps", 2)}
batches_per_round = 1
[sample]
num_samples = 4
'''
    path = tmp / "tiny.toml"
    path.write_text(text)
    return path


def assert_same_models(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-6), k


# ----------------------------------------------------------------------- malformed messages
def _server_and_reply(tmp_path, protocol="shared-noise"):
    cfg = load_config(tiny_config(tmp_path, protocol=protocol))
    parts, _ = load_client_data(cfg)
    server = make_server(cfg)
    client = make_client(cfg, "DU", parts["DU"])
    msgs = [encode(m) for m in client.train_round(2)]
    return cfg, server, msgs


def _tamper(arrays: dict, key: str, fn) -> dict:
    out = dict(arrays)
    out[key] = fn(out[key])
    return out


@pytest.mark.parametrize("what", ["nan", "shape", "dtype", "protocol", "timestep", "count", "round"])
def test_malformed_reply_rejected_before_model(tmp_path, what):
    cfg, server, msgs = _server_and_reply(tmp_path)
    before = {k: v.clone() for k, v in server.model.state_dict().items()}
    good_cid, good, _ = accept_reply(server, transport.pack(msgs, {"client-id": "DU", "round": 1}), 1, 2)
    assert good_cid == "DU" and len(good) == 2
    bad = list(msgs)
    meta = {"client-id": "DU", "round": 1}
    k = 2
    if what == "nan":
        bad[1] = _tamper(bad[1], "x_t", lambda x: np.where(np.arange(x.size).reshape(x.shape) == 0, np.nan, x).astype(np.float32))
    elif what == "shape":
        bad[0] = _tamper(bad[0], "x_t", lambda x: x[:, :, :-1])
    elif what == "dtype":
        bad[0] = _tamper(bad[0], "eps", lambda x: x.astype(np.float64))
    elif what == "protocol":  # a noisy-data message sent to a shared-noise server
        _, _, other = _server_and_reply(tmp_path / "nd", protocol="noisy-data") if (tmp_path / "nd").mkdir() is None else None
        bad[0] = other[0]
    elif what == "timestep":
        bad[0] = _tamper(bad[0], "t", lambda t: np.zeros_like(t))
    elif what == "count":
        bad = bad[:1]
    elif what == "round":
        meta["round"] = 7
    if what == "timestep" and len(msgs[0]["t"]) == 0:
        pytest.skip("no server-owned sample in this batch")
    with pytest.raises(RejectedReply) as err:
        accept_reply(server, transport.pack(bad, meta), 1, k)
    assert str(err.value)  # one-line reason for the log
    after = server.model.state_dict()
    for key in before:
        assert torch.equal(before[key], after[key])


# ----------------------------------------------------------------------- simulation engine
def test_simulation_engine_matches_in_process(tmp_path):
    cfg_path = tiny_config(tmp_path)
    cfg = load_config(cfg_path)
    local = run_training(cfg, tmp_path / "local", progress=False)

    run_dir = tmp_path / "sim-run"
    with Deployment(tmp_path / "dep", ROOT) as dep:
        dep.start_superlink(simulation=True)
        res = dep.run({"task": "train", "config": str(cfg_path), "run-dir": str(run_dir), "min-nodes": 2,
                       "sim-clients": "DU,HT", "sim-state-dir": str(tmp_path / "sim-state")},
                      federation_config={"num-supernodes": 2}, timeout=240)
        assert res.returncode == 0, res.stdout
    assert json.loads((run_dir / "progress.json").read_text())["round"] == 2, res.stdout
    server = torch.load(run_dir / "server.pt", weights_only=True)
    assert_same_models(local.server.model.state_dict(), server["model"])
    for cid, client in local.clients.items():
        state = torch.load(tmp_path / "sim-state" / cid / "client.pt", weights_only=True)
        assert_same_models(client.model.state_dict(), state["model"])


# ----------------------------------------------------------------------- a node dies mid-run
def test_node_killed_mid_run_round_goes_on_and_both_resume(tmp_path):
    """HT dies after round 1: round 2 goes on with DU alone (logged). Then the server is
    restarted with one more round and HT comes back: both resume from their disk state."""
    import threading

    cfg_path = tiny_config(tmp_path, steps=3)
    cfg = load_config(cfg_path)
    parts, _ = load_client_data(cfg)
    node_cfg = {}
    for cid, part in parts.items():
        save_images(part, tmp_path / f"{cid}.npz")
        node_cfg[cid] = {"client-id": cid, "data-path": str(tmp_path / f"{cid}.npz"),
                         "state-dir": str(tmp_path / f"state-{cid}")}
    run_dir = tmp_path / "run"
    rc = {"task": "train", "config": str(cfg_path), "run-dir": str(run_dir), "min-nodes": 2,
          "round-timeout": 15.0}
    with Deployment(tmp_path / "dep", ROOT) as dep:
        dep.start_superlink()
        for cid in parts:
            dep.add_supernode(cid, node_cfg[cid])

        def killer():
            deadline = time.monotonic() + 200
            while time.monotonic() < deadline:
                p = run_dir / "progress.json"
                if p.is_file() and json.loads(p.read_text())["round"] >= 1:
                    dep.kill("HT")
                    return
                time.sleep(0.2)

        th = threading.Thread(target=killer, daemon=True)
        th.start()
        res = dep.run({**rc, "rounds": 2}, timeout=200)
        th.join(5)
        assert res.returncode == 0, res.stdout
        assert "going on without it" in res.stdout
        assert json.loads((tmp_path / "state-HT" / "progress.json").read_text())["round"] == 1

        # HT comes back (same state-dir), the server restarts on the same run-dir
        dep.add_supernode("HT", node_cfg["HT"])
        res2 = dep.run({**rc, "rounds": 3}, timeout=200)
        assert res2.returncode == 0, res2.stdout
        assert "resuming" in res2.stdout
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [x["round"] for x in lines] == [1, 2, 3]
    assert lines[0]["clients"] == ["DU", "HT"]
    assert lines[1]["clients"] == ["DU"] and "HT" in lines[1]["problems"]
    assert lines[2]["clients"] == ["DU", "HT"]
    for cid, steps in (("DU", 3), ("HT", 2)):
        progress = json.loads((tmp_path / f"state-{cid}" / "progress.json").read_text())
        assert progress["round"] == 3 and progress["client-steps"] == steps
    assert torch.load(run_dir / "server.pt", weights_only=True)["steps"] == 3
