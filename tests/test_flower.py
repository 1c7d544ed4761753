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


# ----------------------------------------------------------------------- federated evaluation
def honest_evaluation(cid: str = "DU") -> dict:
    from collafuse.evaluation.federated import FIGURES

    return {"client-id": cid, "num-samples": 4, "num-train": 16, "num-holdout": 9,
            **{f: 0.25 for f in FIGURES}}


@pytest.mark.parametrize("attack", ["nan-kid", "extra-key", "huge-string", "samples", "bounds",
                                    "missing"])
def test_hostile_evaluation_reply_rejected_with_logged_reason(tmp_path, attack, caplog):
    """evaluation_rows keeps the honest node's row and leaves the hostile one out, logging why
    on one line; nothing of the hostile reply reaches the rows."""
    from collafuse.engines.flower.server_app import evaluation_rows

    cfg = load_config(tiny_config(tmp_path))
    meta, samples = honest_evaluation("HT"), []
    if attack == "nan-kid":
        meta["kid_holdout"] = float("nan")
    elif attack == "extra-key":
        meta["images"] = "attached"
    elif attack == "huge-string":
        meta["client-id"] = "HT" + "x" * 10**6
    elif attack == "samples":  # the finished samples themselves sent back
        samples = [{"images": np.zeros((4, 1, 32, 32), np.float32)}]
    elif attack == "bounds":
        meta["samples_near_copies"] = 7.0
    elif attack == "missing":
        del meta["kid_train"]
    replies = {1: reply([], honest_evaluation("DU"), "query.evaluate"),
               2: reply(samples, meta, "query.evaluate")}
    caplog.set_level("WARNING", logger="flwr")
    rows = evaluation_rows(cfg, make_server(cfg), replies, {}, {1: "DU", 2: "HT"}, 4)
    assert [r["client"] for r in rows] == ["DU"] and rows[0]["kid_holdout"] == 0.25
    logged = [r.getMessage() for r in caplog.records if "client HT" in r.getMessage()]
    assert len(logged) == 1 and "left out" in logged[0] and "\n" not in logged[0]
    assert len(logged[0]) < 1000


@pytest.mark.flower
@pytest.mark.slow  # Inception on each node
def test_federated_evaluation_on_the_simulation_engine(tmp_path):
    """evaluate-n after training, then task='evaluate' on the saved run: every hospital's
    numbers reach results.csv / report.md in the sweep's columns; its samples stay home."""
    import csv

    from collafuse.evaluation.federated import FIGURES

    cfg_path = tiny_config(tmp_path, data="client_holdout_fraction = 0.3\nmin_images_per_client = 8",
                           sections="[evaluation]\nmax_real_images = 8\nkid_subsets = 10\n")
    run_dir = tmp_path / "run"
    settings = {"config": str(cfg_path), "run-dir": str(run_dir), "min-nodes": 2,
                "sim-clients": "DU,HT", "identity": "node-report"}
    with Deployment(tmp_path / "dep", ROOT) as dep:
        dep.start_superlink(simulation=True)
        trained = dep.run({**settings, "task": "train", "evaluate-n": 4},
                          federation_config={"num-supernodes": 2}, timeout=400)
        assert trained.returncode == 0 and (run_dir / "results.csv").is_file(), trained.stdout
        first = (run_dir / "results.csv").read_text()
        again = dep.run({**settings, "task": "evaluate", "evaluate-n": 4},
                        federation_config={"num-supernodes": 2}, timeout=400)
        assert again.returncode == 0, again.stdout
    rows = list(csv.DictReader((run_dir / "results.csv").open()))
    assert [r["client"] for r in rows] == ["DU", "HT"]
    assert set(FIGURES) <= set(rows[0]) and all(float(r["kid_holdout"]) == float(r["kid_holdout"])
                                                  for r in rows)
    assert first == (run_dir / "results.csv").read_text()  # same server, seed and nodes
    report = (run_dir / "report.md").read_text()
    assert "| DU |" in report and "| HT |" in report
    result = json.loads((run_dir / "flower-result.json").read_text())
    assert result["evaluated"] == {"DU": 4, "HT": 4}
    assert not list(run_dir.glob("*.npz")) and not list(run_dir.glob("*.png"))
    assert "evaluation: 2/2 clients evaluated" in again.stdout


# ----------------------------------------------------------------------- conditional runs
def two_class_config(tmp: Path, condition: str) -> Path:
    """Two hospitals, two classes (bright left or right half), 8x8; model.condition given."""
    rng = np.random.default_rng(0)
    x = np.full((96, 8, 8), 30.0)
    x[:, :, :4] = 220.0
    x[48:] = x[48:, :, ::-1]
    label = np.array(["left"] * 48 + ["right"] * 48)
    site = np.array((["S1"] * 24 + ["S2"] * 24) * 2)
    images = np.clip(x + rng.normal(0, 12, x.shape), 0, 255).astype(np.uint8)
    np.savez(tmp / "two.npz", images=images, site=site, label=label)
    path = tmp / "two.toml"
    path.write_text(f'''
[data]
path = "{tmp / "two.npz"}"
image_size = 8
clients = ["S1", "S2"]
holdout_sites = []
min_images_per_client = 8
[diffusion]
num_timesteps = 20
cut_ratio = 0.5
[model]
preset = "tiny"
condition = "{condition}"
classes = ["left", "right"]
[train]
batch_size = 8
steps = 2
batches_per_round = 1
[sample]
num_samples = 4
guidance_scale = 2.0
''')
    return path


@pytest.mark.flower
# "both" only: labels cross the simulation engine's messages; the loopback deployment test
# (test_flower_deploy) runs both placements, so "client" here would repeat a Ray simulation
@pytest.mark.parametrize("condition", ["both"])
def test_conditional_run_on_the_simulation_engine(tmp_path, condition):
    """Labels travel as in-process (the same models), in the replies each node sent (kept in
    its state to answer a repeated round)."""
    cfg_path = two_class_config(tmp_path, condition)
    local = run_training(load_config(cfg_path), tmp_path / "local", progress=False)
    run_dir = tmp_path / "run"
    with Deployment(tmp_path / "dep", ROOT) as dep:
        dep.start_superlink(simulation=True)
        res = dep.run({"task": "train", "config": str(cfg_path), "run-dir": str(run_dir),
                       "min-nodes": 2, "sim-clients": "S1,S2", "identity": "node-report",
                       "sample-n": 4}, federation_config={"num-supernodes": 2}, timeout=300)
    assert res.returncode == 0, res.stdout
    server = torch.load(run_dir / "server.pt", weights_only=True)
    assert_same_models(local.server.model.state_dict(), server["server"]["model"])
    for cid, client in local.clients.items():
        state = torch.load(run_dir / "sim-nodes" / cid / "client.pt", weights_only=True)
        assert_same_models(client.model.state_dict(), state["client"]["model"])
        sent = [m for reply in state["replies"].values() for m in reply]
        assert sent and all(("labels" in m) == (condition == "both") for m in sent)
        samples = np.load(run_dir / "sim-nodes" / cid / "samples" / f"{cid}.npz")
        assert samples["labels"].tolist() == ["left", "left", "right", "right"]
