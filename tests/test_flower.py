"""The Flower engine: malformed replies, and the simulation engine against the in-process engine.

The real deployment (faults, resume, TLS) is in test_flower_deploy.py."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("flwr")

from flower_harness import ROOT, Deployment  # noqa: E402

from collafuse.config import load_config  # noqa: E402
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
clients = {extra.get("clients", '["DU", "HT"]')}
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
        assert torch.allclose(a[k], b[k], atol=1e-6), (k, float((a[k] - b[k]).abs().max()))


# ----------------------------------------------------------------------- malformed messages
@pytest.fixture(scope="module")
def server_and_replies(tmp_path_factory):
    """A shared-noise server, two encoded shared-noise replies of DU and one noisy-data reply."""
    out = {}
    for protocol in ("shared-noise", "noisy-data"):
        tmp = tmp_path_factory.mktemp(protocol)
        cfg = load_config(tiny_config(tmp, protocol=protocol))
        parts = load_client_data(cfg).clients
        client = make_client(cfg, "DU", parts["DU"], secret=bytes(32))
        out[protocol] = [encode(m) for m in client.train_round(2)]
        if protocol == "shared-noise":
            server = make_server(cfg)
    return server, out["shared-noise"], out["noisy-data"]


def _tamper(arrays: dict, key: str, fn) -> dict:
    out = dict(arrays)
    out[key] = fn(out[key])
    return out


@pytest.mark.parametrize("what", ["nan", "shape", "dtype", "protocol", "timestep", "count", "round"])
def test_malformed_reply_rejected_before_model(server_and_replies, what):
    server, msgs, other = server_and_replies
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
        bad[0] = other[0]
    elif what == "timestep":
        bad[0] = _tamper(bad[0], "t", lambda t: np.zeros_like(t))
    elif what == "count":
        bad = bad[:1]
    elif what == "round":
        meta["round"] = 7
    if what in ("nan", "timestep") and len(bad[1 if what == "nan" else 0]["t"]) == 0:
        pytest.skip("no server-owned sample in this batch")
    with pytest.raises(RejectedReply) as err:
        accept_reply(server, transport.pack(bad, meta), 1, k)
    assert str(err.value) and "\n" not in str(err.value)  # one-line reason for the log
    after = server.model.state_dict()
    for key in before:
        assert torch.equal(before[key], after[key])
    assert server.steps == 0


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
