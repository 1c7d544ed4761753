"""The Flower engine: malformed replies, and the simulation engine against the in-process engine.

The real deployment (faults, resume, TLS) is in test_flower_deploy.py."""

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
from collafuse.engines.flower import transport  # noqa: E402
from collafuse.engines.flower.replies import RejectedReply, accept_train  # noqa: E402
from collafuse.engines.local import run_training  # noqa: E402
from collafuse.factory import load_client_data, make_client, make_server  # noqa: E402
from collafuse.messages import encode  # noqa: E402
from flwr.app import Message, Metadata  # noqa: E402


def tiny_config(tmp: Path, **extra: str) -> Path:
    """Tiny preset, 2 clients, 2 rounds of 1 batch; the run config file's path."""
    text = f'''
[data]
path = "{ROOT}/data/lgg_flair_32.npz"
intensity = "none"
clients = {extra.get("clients", '["DU", "HT"]')}
max_images_per_client = 16
{extra.get("data", "min_images_per_client = 8")}
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
{extra.get("sections", "")}
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


def reply(msgs, meta, message_type: str = "train") -> Message:
    """A node's reply as the ServerApp receives it (metadata as the SuperLink fills it)."""
    return Message(content=transport.pack(msgs, meta),
                   metadata=Metadata(run_id=1, message_id="", src_node_id=7, dst_node_id=0,
                                     reply_to_message_id="asked", group_id="1",
                                     created_at=time.time(), ttl=60.0, message_type=message_type))


@pytest.mark.parametrize("what", ["nan", "shape", "dtype", "protocol", "timestep", "count", "round"])
def test_malformed_reply_rejected_before_model(server_and_replies, what):
    server, msgs, other = server_and_replies
    before = {k: v.clone() for k, v in server.model.state_dict().items()}
    meta = {"client-id": "DU", "round": 1, "client-loss": 0.5}
    good, loss = accept_train(server, reply(msgs, meta), "DU", 1, 2, batch_size=8)
    assert len(good) == 2 and loss == 0.5
    bad = list(msgs)
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
        accept_train(server, reply(bad, meta), "DU", 1, k, batch_size=8)
    assert str(err.value) and "\n" not in str(err.value)  # one-line reason for the log
    after = server.model.state_dict()
    for key in before:
        assert torch.equal(before[key], after[key])
    assert server.steps == 0


# ----------------------------------------------------------------------- simulation engine
@pytest.mark.flower
@pytest.mark.parametrize("sections", ["", "[clients.HT]\ncut_ratio = 0.3\n"],
                         ids=["one-cut", "own-cut"])
def test_simulation_engine_matches_in_process(tmp_path, sections):
    cfg_path = tiny_config(tmp_path, sections=sections)
    cfg = load_config(cfg_path)
    local = run_training(cfg, tmp_path / "local", progress=False)

    run_dir = tmp_path / "sim-run"
    with Deployment(tmp_path / "dep", ROOT) as dep:
        dep.start_superlink(simulation=True)
        res = dep.run({"task": "train", "config": str(cfg_path), "run-dir": str(run_dir), "min-nodes": 2,
                       "sim-clients": "DU,HT", "identity": "node-report", "sample-n": 2},
                      federation_config={"num-supernodes": 2}, timeout=240)
        assert res.returncode == 0, res.stdout
    # split inference: with its own cut HT gets a hand-over of its own (a batch per cut)
    assert res.stdout.count("sampling: generating") == (2 if sections else 1)
    assert set(json.loads((run_dir / "flower-result.json").read_text())["samples"]) == {"DU", "HT"}
    server = torch.load(run_dir / "server.pt", weights_only=True)
    assert server["progress"]["round"] == 2, res.stdout
    assert_same_models(local.server.model.state_dict(), server["server"]["model"])
    for cid, client in local.clients.items():  # node state defaults to <run-dir>/sim-nodes/<id>
        state = torch.load(run_dir / "sim-nodes" / cid / "client.pt", weights_only=True)
        assert state["round"] == 2
        assert_same_models(client.model.state_dict(), state["client"]["model"])


@pytest.mark.flower
def test_hostile_node_fuzz_run_finishes_with_honest_work_intact(tmp_path):
    """A third node (FG, tests/hostile_app) answers each round with another of 27 malformed or
    hostile replies and a malformed sampling reply. The run finishes; every round trains on DU
    and HT alone, so the server equals the in-process server of DU and HT."""
    from hostile_app.hostile_client_app import ATTACKS

    rounds = len(ATTACKS)
    cfg_path = tiny_config(tmp_path, clients='["DU", "HT", "FG"]', steps=rounds)
    (tmp_path / "honest").mkdir()
    honest_cfg = load_config(tiny_config(tmp_path / "honest", clients='["DU", "HT"]', steps=rounds))
    local = run_training(honest_cfg, tmp_path / "local", progress=False)
    run_dir = tmp_path / "run"
    with Deployment(tmp_path / "dep", ROOT / "tests" / "hostile_app") as dep:
        dep.start_superlink(simulation=True)
        res = dep.run({"config": str(cfg_path), "run-dir": str(run_dir), "sim-clients": "DU,HT,FG",
                       "sample-n": 2}, federation_config={"num-supernodes": 3}, timeout=600)
    assert res.returncode == 0, res.stdout
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert len(lines) == rounds
    for line in lines:
        assert line["clients"] == ["DU", "HT"], line
        assert set(line["problems"]) == {"FG"} and "\n" not in line["problems"]["FG"]
        assert set(line["client_loss"]) == {"DU", "HT"}
    assert len({line["problems"]["FG"] for line in lines}) == rounds  # each attack its own reason
    server = torch.load(run_dir / "server.pt", weights_only=True)
    assert server["progress"]["round"] == rounds and server["server"]["steps"] == rounds
    assert_same_models(local.server.model.state_dict(), server["server"]["model"])
    result = json.loads((run_dir / "flower-result.json").read_text())
    assert set(result["samples"]) == {"DU", "HT"}
    assert "sampling: node" in res.stdout and "client FG" in res.stdout


def test_identity_binding(tmp_path):
    """registered-name: a node serves only the client named at its registration; node-report:
    its word, but never a client another connected node serves, nor one the run lacks."""
    from flwr.proto.node_pb2 import NodeInfo

    from collafuse.engines.flower.server_app import Roster

    cfg = load_config(tiny_config(tmp_path))
    nodes = {1: NodeInfo(node_id=1, name="DU"), 2: NodeInfo(node_id=2, name="HT"), 3: NodeInfo(node_id=3)}
    strict = Roster(cfg, cfg.to_toml(), "registered-name", 10.0)
    strict._may_serve(nodes, 1, "DU")
    for node, cid, why in ((1, "HT", "registered as 'DU', claims client 'HT'"),
                           (3, "HT", "registered without a name"), (2, "XX", "not one of the run's")):
        with pytest.raises(RejectedReply, match=why):
            strict._may_serve(nodes, node, cid)
    loose = Roster(cfg, cfg.to_toml(), "node-report", 10.0)
    loose._may_serve(nodes, 3, "HT")
    loose.node_of["HT"] = 2
    with pytest.raises(RejectedReply, match="which node 2 serves"):
        loose._may_serve(nodes, 3, "HT")
    del nodes[2]  # HT's old node is gone (offline): a restarted node may take over
    loose._may_serve(nodes, 3, "HT")


def test_resume_keeps_batches_per_round(tmp_path):
    """The server's state and progress are one file; a resume with another K is refused."""
    from collafuse.engines.flower.server_app import Settings, resume, save

    cfg = load_config(tiny_config(tmp_path))
    rc = {"run-dir": str(tmp_path / "run"), "batches-per-round": 2}
    server = make_server(cfg)
    progress = resume(server, Settings.of(rc, cfg), cfg.to_toml())
    assert progress == {"round": 0, "batches-per-round": 2}
    save(server, {**progress, "round": 3}, tmp_path / "run")
    assert resume(make_server(cfg), Settings.of(rc, cfg), cfg.to_toml())["round"] == 3
    with pytest.raises(ValueError, match="batches-per-round=2, asked for 1"):
        resume(make_server(cfg), Settings.of({**rc, "batches-per-round": 1}, cfg), cfg.to_toml())
    with pytest.raises(ValueError, match="another config"):
        other = load_config(tiny_config(tmp_path, protocol="noisy-data"))
        resume(make_server(other), Settings.of(rc, other), other.to_toml())
    with pytest.raises(ValueError, match="identity"):
        Settings.of({**rc, "identity": "trust-me"}, cfg)


def test_sample_reply_keeps_names_and_counts_never_paths():
    """What the server keeps of a hospital's samples: file names and the count (docs/design.md
    section 7); a reply naming a path is rejected, so no node's path reaches flower-result.json."""
    from collafuse.engines.flower.replies import accept_sample

    meta = {"client-id": "DU", "num-images": 4, "png": "DU.png", "npz": "DU.npz"}
    assert accept_sample(reply([], meta, "query.sample"), "DU", 4) == {
        "num-images": 4, "png": "DU.png", "npz": "DU.npz"}
    for bad in ("/srv/hospital/DU/samples/DU.png", "samples/DU.png", "..", "C:\\DU\\DU.png",
                "C:DU.png"):
        with pytest.raises(RejectedReply, match="is not a file name"):
            accept_sample(reply([], {**meta, "png": bad}, "query.sample"), "DU", 4)


def test_node_bindings_are_recorded_for_the_operator(tmp_path, capsys):
    """The ServerApp writes which registered name each node id has and which client it serves
    (flower-nodes.json); `collafuse flower nodes RUN_DIR` shows it."""
    from flwr.proto.node_pb2 import NodeInfo

    from collafuse.cli import main
    from collafuse.engines.flower.common import code_digest
    from collafuse.engines.flower.server_app import NODES, Roster

    cfg = load_config(tiny_config(tmp_path))
    roster = Roster(cfg, cfg.to_toml(), "registered-name", 10.0, record=tmp_path / "run" / NODES)
    roster.registry = {11: NodeInfo(node_id=11, name="DU"), 12: NodeInfo(node_id=12, name="HT")}
    hello = {"num-images": 16, "round": 0, "code-digest": code_digest()}
    roster._consider(11, reply([], {"client-id": "DU", **hello}, "query.hello"), roster.registry)
    roster._consider(12, reply([], {"client-id": "DU", **hello}, "query.hello"), roster.registry)
    record = json.loads((tmp_path / "run" / NODES).read_text())
    assert record["identity"] == "registered-name"
    du, ht = record["nodes"]
    assert (du["node-id"], du["registered-name"], du["client"], du["refused"]) == (11, "DU", "DU", None)
    assert (ht["node-id"], ht["registered-name"], ht["client"]) == (12, "HT", None)
    assert "registered as 'HT', claims client 'DU'" in ht["refused"]
    assert main(["flower", "nodes", str(tmp_path / "run")]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[1].split()[:3] == ["node", "id", "registered"]
    assert out[2].split()[:3] == ["11", "DU", "DU"] and out[3].split()[:3] == ["12", "HT", "-"]
    assert main(["flower", "nodes", str(tmp_path / "nowhere")]) == 2
    assert "no such file" in capsys.readouterr().err
