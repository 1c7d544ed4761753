"""The CollaFuse ClientApp on a node, called as Flower calls it (a Message and a Context):
the hospital's policy, exactly-once rounds, checks of the server's requests, a light hello."""

from __future__ import annotations

import subprocess
import sys
import time

import numpy as np
import pytest

pytest.importorskip("flwr")

from flwr.app import Context, Message, Metadata, RecordDict  # noqa: E402
from test_flower import tiny_config  # noqa: E402

from collafuse.config import ClientConfig, load_config  # noqa: E402
from collafuse.data import save_images  # noqa: E402
from collafuse.engines.flower import client_app, transport  # noqa: E402
from collafuse.engines.flower.client_app import RequestError  # noqa: E402
from collafuse.engines.flower.common import code_digest  # noqa: E402
from collafuse.factory import load_client_data  # noqa: E402
from collafuse.state import load_state  # noqa: E402


@pytest.fixture
def node(tmp_path):
    """DU's node: its images on its disk and its node_config; returns (node_config, cfg text)."""
    cfg = load_config(tiny_config(tmp_path, protocol="noisy-data"))
    save_images(load_client_data(cfg).clients["DU"], tmp_path / "DU.npz")
    nc = {"client-id": "DU", "data-path": str(tmp_path / "DU.npz"), "state-dir": str(tmp_path / "state")}
    return nc, cfg


def request(message_type: str, cfg, digest: str | None = None, **meta) -> Message:
    meta = {"config-toml": cfg.to_toml(), "code-digest": digest or code_digest(), **meta}
    return Message(content=transport.pack([], meta),
                   metadata=Metadata(run_id=1, message_id=f"m{time.monotonic_ns()}", src_node_id=0,
                                     dst_node_id=5, reply_to_message_id="", group_id="1",
                                     created_at=time.time(), ttl=60.0, message_type=message_type))


def call(nc: dict, msg: Message) -> dict:
    """Run the ClientApp on ``msg``; the reply's metadata (arrays under "arrays")."""
    context = Context(run_id=1, node_id=5, node_config=nc, state=RecordDict(), run_config={})
    arrays, meta = transport.unpack(client_app.app(message=msg, context=context).content)
    return {**meta, "arrays": arrays}


def train(nc, cfg, rnd, k=1):
    return call(nc, request("train", cfg, round=rnd, batches=k))


def test_policy_refuses_before_training(node, tmp_path):
    nc, cfg = node
    strict = {**nc, "allow-protocols": "noisy-data", "min-cut-ratio": 0.4,
              "max-images-per-round": 16, "serve-sampling": "false"}
    shared = load_config(tiny_config(tmp_path, protocol="shared-noise"))
    low_cut = load_config(tiny_config(tmp_path, protocol="noisy-data"))
    low_cut.diffusion.cut_ratio = 0.0
    for asked, why in ((shared, "protocol 'shared-noise' not allowed"),
                       (low_cut, "cut ratio 0.0 below this node's minimum 0.4")):
        reply = train(strict, asked, 1)
        assert reply["refused"].startswith(why) and reply["arrays"] == []
    assert "images per round" in train(strict, cfg, 1, k=3)["refused"]  # 3 x 8 > 16
    own_cut = load_config(tiny_config(tmp_path, protocol="noisy-data"))
    own_cut.clients = {"DU": ClientConfig(cut_ratio=0.2)}  # the run's c is 0.6, DU's own 0.2
    assert train(strict, own_cut, 1)["refused"].startswith("cut ratio 0.2 below")
    assert not (tmp_path / "state" / "client.pt").exists()  # nothing was trained or stored
    assert "images" not in " ".join(p.name for p in (tmp_path / "state").glob("*"))
    reply = train(strict, cfg, 1, k=2)  # within the policy: trains
    assert "refused" not in reply and len(reply["arrays"]) == 2
    sample = request("query.sample", cfg, seed=0)
    assert call(strict, sample)["refused"] == "this node does not serve sampling requests"


def test_code_mismatch_and_pin_are_refused(node):
    nc, cfg = node
    assert "the server runs CollaFuse code" in call(nc, request("query.hello", cfg, "0" * 64, round=0))["refused"]
    pinned = {**nc, "code-sha256": "f" * 64}
    assert "its policy pins ffffffffffff" in call(pinned, request("query.hello", cfg, round=0))["refused"]
    ok = call({**nc, "code-sha256": code_digest()}, request("query.hello", cfg, round=0))
    assert ok["client-id"] == "DU" and ok["num-images"] == 16


def test_round_asked_again_is_answered_not_retrained(node, tmp_path):
    nc, cfg = node
    state_file = tmp_path / "state" / "client.pt"
    first = train(nc, cfg, 1)
    steps = load_state(state_file)["client"]["steps"]
    again = train(nc, cfg, 1)  # a lost reply, a restarted server: the same answer
    assert load_state(state_file)["client"]["steps"] == steps == 1
    for a, b in zip(first["arrays"], again["arrays"]):
        assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
    assert again["client-loss"] == first["client-loss"]
    second = train(nc, cfg, 2)
    assert train(nc, cfg, 1)["round"] == 1  # the round before the last is still kept
    assert load_state(state_file)["client"]["steps"] == 2
    assert train(nc, cfg, 2)["arrays"][0]["header"].tobytes() == second["arrays"][0]["header"].tobytes()
    train(nc, cfg, 4)  # a node that missed round 3 trains on
    with pytest.raises(RequestError, match="round 1 asked"):
        train(nc, cfg, 1)
    assert load_state(state_file)["round"] == 4 and load_state(state_file)["client"]["steps"] == 3


@pytest.mark.parametrize("bad", [
    {"views": 1}, {"round": "1"}, {"round": True}, {"round": -1}, {"batches": 0},
    {"batches": 10**9}, {"code-digest": 5},
])
def test_malformed_requests_are_refused(node, bad):
    nc, cfg = node
    meta = {"round": 1, "batches": 1, **bad}
    with pytest.raises(RequestError):
        call(nc, request("train", cfg, **meta))
    with pytest.raises(RequestError, match="malformed request"):
        call(nc, Message(content=RecordDict(), metadata=request("train", cfg).metadata))


def test_another_config_on_the_same_state_is_refused(node, tmp_path):
    nc, cfg = node
    train(nc, cfg, 1)
    other = load_config(tiny_config(tmp_path, protocol="noisy-data"))
    other.train.lr = 0.5
    with pytest.raises(Exception, match="belongs to a run with another config"):
        train(nc, other, 2)


def test_hello_reads_the_cache_without_torch(node):
    nc, cfg = node
    assert call(nc, request("query.hello", cfg, round=0))["num-images"] == 16  # makes the cache
    # a fresh process, as the SuperNode starts one per message; the request is built there
    code = f"""
import sys, time
from flwr.app import Context, Message, Metadata, RecordDict
from collafuse.engines.flower import client_app, transport
from collafuse.engines.flower.common import code_digest
meta = {{"config-toml": {cfg.to_toml()!r}, "code-digest": code_digest(), "round": 0}}
msg = Message(content=transport.pack([], meta), metadata=Metadata(
    run_id=1, message_id="m", src_node_id=0, dst_node_id=5, reply_to_message_id="", group_id="",
    created_at=time.time(), ttl=60.0, message_type="query.hello"))
ctx = Context(run_id=1, node_id=5, node_config={nc!r}, state=RecordDict(), run_config={{}})
client_app.app(message=msg, context=ctx)
print(sorted(m for m in ("torch", "diffusers") if m in sys.modules))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "[]"


@pytest.fixture
def patient_folder(tmp_path):
    """A hospital's image folder of 4 patients (one folder each) of 10 images."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for p in range(4):
        (tmp_path / "scans" / f"P{p}").mkdir(parents=True)
        for i in range(10):
            Image.fromarray(rng.integers(0, 255, (32, 32), dtype=np.uint8)).save(
                tmp_path / "scans" / f"P{p}" / f"{i}.png")
    return tmp_path / "scans"


def test_node_reads_its_data_as_the_factory_does(tmp_path, patient_folder):
    """data.layout reaches the node (patients held out whole need the patient level), and the
    node's training and held-out images are the factory's."""
    from collafuse.factory import load_node_data

    cfg = load_config(tiny_config(tmp_path, data='layout = "patient"\nclient_holdout_fraction = 0.25\nmin_images_per_client = 8'))
    nc = {"client-id": "DU", "data-path": str(patient_folder), "state-dir": str(tmp_path / "state")}
    assert call(nc, request("query.hello", cfg, round=0))["num-images"] == 16  # capped
    train, held = load_node_data(cfg, "DU", patient_folder)
    cached = np.load(tmp_path / "state" / "images.npz"), np.load(tmp_path / "state" / "holdout.npz")
    assert np.array_equal(cached[0]["images"], train.images)
    assert np.array_equal(cached[1]["images"], held.images) and len(held) == 10
    assert not set(cached[0]["patient"]) & set(cached[1]["patient"])


def test_node_applies_the_minimum_to_its_own_data(tmp_path, patient_folder):
    from collafuse.data import DataError

    cfg = load_config(tiny_config(tmp_path, data='min_images_per_client = 64'))
    nc = {"client-id": "DU", "data-path": str(patient_folder), "state-dir": str(tmp_path / "state")}
    with pytest.raises(DataError, match="client DU has 40 training images, fewer than the minimum "
                                        "of 64: give node DU more images"):
        call(nc, request("query.hello", cfg, round=0))


def evaluate_request(cfg, n: int = 4) -> Message:
    """A query.evaluate request carrying the server's n hand-overs for DU."""
    from collafuse.factory import make_server
    from collafuse.messages import SampleRequest, encode

    partial = make_server(cfg).generate(SampleRequest(client_id="DU", num_samples=n, seed=0))
    msg = request("query.evaluate", cfg, seed=0)
    return Message(content=transport.pack([encode(partial)], transport.unpack(msg.content)[1]),
                   metadata=msg.metadata)


EVALUATION_SECTION = "[evaluation]\nmax_real_images = 8\nkid_subsets = 10\n"  # Inception on few


@pytest.mark.slow  # Inception on 20 images
def test_evaluation_reply_is_numbers_only_and_passes_the_server_check(tmp_path):
    from collafuse.engines.flower.replies import EVALUATION, accept_evaluation
    from test_flower import reply

    cfg = load_config(tiny_config(tmp_path, data="client_holdout_fraction = 0.3\n"
                                                 "min_images_per_client = 8",
                                  sections=EVALUATION_SECTION))
    nc = {"client-id": "DU", "data-path": "partition", "state-dir": str(tmp_path / "state")}
    ctx = Context(run_id=1, node_id=5, node_config=nc, state=RecordDict(),
                  run_config={"sim-clients": "DU"})
    answer = client_app.app(message=evaluate_request(cfg), context=ctx).content
    arrays, meta = transport.unpack(answer)
    assert arrays == [] and set(meta) == set(EVALUATION)  # no image-shaped array, no other key
    assert all(isinstance(v, (int, float, str)) for v in meta.values())
    assert meta["num-samples"] == 4 and meta["num-holdout"] >= 2
    figures = accept_evaluation(reply([], meta, "query.evaluate"), "DU", 4)
    assert figures["kid_holdout_ci_low"] <= figures["kid_holdout"] <= figures["kid_holdout_ci_high"]
    assert 0 <= figures["samples_near_copies"] <= 1


def test_evaluation_policy_refuses(node):
    nc, cfg = node
    refused = call({**nc, "serve-evaluation": "no"}, evaluate_request(cfg))
    assert refused["refused"] == "this node does not serve evaluation requests"
    assert refused["arrays"] == []
