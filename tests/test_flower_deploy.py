"""Real Flower deployment on loopback: flower-superlink + flower-supernode + flwr run.

These tests start real processes (SuperLink, SuperNodes, SuperExec, ServerApp and
ClientApp subprocesses) on 127.0.0.1 with free ports; every process is killed at the end.
Each ClientApp message is a fresh process that imports torch and diffusers (seconds), so the
checks share runs: one insecure deployment covers two rounds, inference, equivalence with the
in-process engine, a node killed mid-run, its return, and a restarted server; one TLS run with
SuperNode authentication follows docs/deployment.md.
"""

from __future__ import annotations

import json
import re
import shutil
import signal
import ssl
import subprocess
import threading
import time

import httpx
import numpy as np
import pytest

pytest.importorskip("flwr")
pytestmark = pytest.mark.flower  # a SuperLink, SuperNodes and ServerApps on loopback

import torch  # noqa: E402
from flower_harness import ROOT, Deployment, make_certs  # noqa: E402
from test_flower import assert_same_models, tiny_config  # noqa: E402

from collafuse.config import load_config  # noqa: E402
from collafuse.data import save_images  # noqa: E402
from collafuse.engines.local import run_training  # noqa: E402
from collafuse.factory import load_client_data  # noqa: E402


def _hospitals(tmp_path, cfg):
    """Each hospital's own images on its own disk, and its --node-config."""
    parts = load_client_data(cfg).clients
    node_cfg = {}
    for cid, part in parts.items():
        save_images(part, tmp_path / f"{cid}.npz")
        node_cfg[cid] = {"client-id": cid, "data-path": str(tmp_path / f"{cid}.npz"),
                         "state-dir": str(tmp_path / f"state-{cid}")}
    return node_cfg


def _metrics(run_dir):
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _node_state(tmp_path, cid):
    """What a node saved: its client's state, the last round it trained, its kept replies."""
    return torch.load(tmp_path / f"state-{cid}" / "client.pt", weights_only=True)


def _server_state(run_dir):
    return torch.load(run_dir / "server.pt", weights_only=True)


def _wait_for(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(what)
        time.sleep(0.05)


def test_deploy_rounds_inference_equivalence_faults_and_resume(tmp_path):
    """SuperLink + two SuperNodes (insecure loopback), tiny preset, noisy-data protocol.

    Run 1: two rounds and one split inference; models equal the in-process engine's.
    Run 2 (the server restarted on the same run-dir, 7 rounds): it resumes after round 2;
    HT's SuperNode is SIGKILLed as round 3's request reaches it and started again with the same
    state-dir: round 3 goes on with DU alone (logged), and HT is back, resuming from its disk,
    once the SuperLink has marked its killed node offline (about a minute). The ServerApp is
    SIGKILLed once the first round HT served again is saved, while the next round's requests
    are out. Run 3 (the same command again): resumes there; the nodes answer the next round
    from their stored replies, so no node trains a round twice. Run 4 (task='sample') only
    samples.
    """
    cfg_path = tiny_config(tmp_path, protocol="noisy-data")
    cfg = load_config(cfg_path)
    node_cfg = _hospitals(tmp_path, cfg)
    run_dir = tmp_path / "run"
    rc = {"task": "train", "config": str(cfg_path), "run-dir": str(run_dir), "min-nodes": 2,
          "identity": "node-report",  # insecure loopback: no registered names to bind to
          "round-timeout": 180.0}  # generous: a loaded 2-core CI machine is slow
    with Deployment(tmp_path / "dep", ROOT) as dep:
        dep.start_superlink()
        for cid in node_cfg:
            dep.add_supernode(cid, node_cfg[cid])
        res = dep.run({**rc, "sample-n": 4}, timeout=240)
        assert res.returncode == 0, res.stdout

        # --- run 1: two rounds, inference, outputs, same models as in-process
        result = json.loads((run_dir / "flower-result.json").read_text())
        assert result["rounds"] == 2 and result["clients"] == ["DU", "HT"]
        for cid in node_cfg:
            out = tmp_path / f"state-{cid}" / "samples"
            assert (out / f"{cid}.png").stat().st_size > 0
            with np.load(out / f"{cid}.npz") as z:
                assert z["images"].shape[0] == 4 and z["images"].dtype == np.uint8
            assert result["samples"][cid]["num-images"] == 4
        # each node made its secret on its own disk; the in-process twin gets the same ones
        secrets = {cid: (tmp_path / f"state-{cid}" / f"{cid}.key").read_bytes() for cid in node_cfg}
        local = run_training(cfg, tmp_path / "local", progress=False, secrets=secrets)
        assert_same_models(local.server.model.state_dict(), _server_state(run_dir)["server"]["model"])
        for cid, client in local.clients.items():
            state = _node_state(tmp_path, cid)
            assert_same_models(client.model.state_dict(), state["client"]["model"])
            assert state["round"] == 2 and state["client"]["steps"] == 2

        # --- run 2: restarted server resumes; a node is SIGKILLed mid-round and comes back;
        # then the server is SIGKILLed after saving the first round HT served again
        killed_after = []

        def faults():
            # HT's third train message is round 3's (run 1 sent two): it dies receiving it
            _wait_for(lambda: dep.tail("HT", 10**6).count("Receiving: train message") >= 3, 250,
                      "round 3 never reached HT")
            dep.kill("HT", signal.SIGKILL)
            dep.add_supernode("HT", node_cfg["HT"])  # same state-dir: resumes from disk
            _wait_for(lambda: "client HT is back on node" in dep.tail("flwr-run", 10**6), 300,
                      "HT never came back")
            # the round line is logged once the round is saved and the next is out
            done = re.compile(r"round (\d)/7: 2/2 clients")
            _wait_for(lambda: done.search(dep.tail("flwr-run", 10**6)), 300, "no round with HT")
            assert dep.kill_app("flwr-serverapp") >= 1
            killed_after.append(int(done.search(dep.tail("flwr-run", 10**6)).group(1)))
            dep.kill("flwr-run")

        th = threading.Thread(target=faults, daemon=True)
        th.start()
        try:
            dep.run({**rc, "rounds": 7}, timeout=600)
        except TimeoutError:
            pass  # the CLI may wait for a run whose ServerApp is gone; it was killed with it
        th.join(5)
        out2 = dep.tail("flwr-run", 10**6)
        saved = _server_state(run_dir)["progress"]["round"]
        assert killed_after and saved == killed_after[0] < 7, out2

        # --- run 3: the same command; the round after is answered from the nodes' stored replies
        res3 = dep.run({**rc, "rounds": 7}, timeout=300)
        assert res3.returncode == 0, res3.stdout
        resent = dep.tail("DU", 10**6).count("asked again; resending the stored reply")

        # --- sampling only, from the saved server: the samples of run 1 stay in the result
        res4 = dep.run({**rc, "task": "sample", "sample-n": 2}, timeout=300)
        assert res4.returncode == 0, res4.stdout
        result = json.loads((run_dir / "flower-result.json").read_text())
        assert result["rounds"] == 7 and set(result["samples"]) == {"DU", "HT"}
        assert all(result["samples"][c]["num-images"] == 2 for c in ("DU", "HT"))
    assert "resuming" in out2 and "after round 2" in out2
    assert "left out of this round" in out2
    assert f"after round {saved}" in res3.stdout
    assert resent >= 1
    lines = _metrics(run_dir)
    assert [x["round"] for x in lines] == list(range(1, 8))
    assert all(x["clients"] == ["DU", "HT"] for x in lines[:2])
    assert lines[2]["clients"] == ["DU"] and "HT" in lines[2]["problems"]
    assert lines[saved - 1]["clients"] == ["DU", "HT"] and lines[-1]["clients"] == ["DU", "HT"]
    assert all(x["bytes"]["DU"] > 0 and "DU" in x["client_loss"] for x in lines)
    ht_rounds = sum("HT" in x["clients"] for x in lines)
    for cid, steps in (("DU", 7), ("HT", ht_rounds)):  # exactly once: one step per round served
        state = _node_state(tmp_path, cid)
        assert state["round"] == 7 and state["client"]["steps"] == steps
    assert _server_state(run_dir)["server"]["steps"] == 7


def test_tls_supernode_auth_three_hospitals(tmp_path):
    """docs/deployment.md on loopback: certificates from make_certs.sh, a SuperLink with TLS and
    SuperNode authentication behind the fleet gateway (hospitals reach the Fleet API only; the
    operator's CLI reaches the SuperLink itself), three registered hospitals, one round (split
    inference is checked in the insecure run above).

    Identity: FG's SuperNode first starts claiming to be HT (its registered name is FG): it is
    refused and the run waits, since min-nodes counts verified hospitals; started again as FG
    with the same key (so the same node id) it is greeted again and trains. A SuperNode whose
    key was never registered is refused by the SuperLink."""
    certs = make_certs(tmp_path / "certs", n=3)
    cfg_path = tiny_config(tmp_path, clients='["DU", "HT", "FG"]', steps=1)
    node_cfg = _hospitals(tmp_path, load_config(cfg_path))
    run_dir = tmp_path / "run"
    with Deployment(tmp_path / "dep", ROOT, certs=certs, node_auth=True) as dep:
        dep.start_superlink()
        gateway = dep.start_gateway()
        for i, cid in enumerate(("DU", "HT")):
            dep.add_supernode(cid, node_cfg[cid], auth_key=certs / f"supernode-{i + 1}")
        dep.add_supernode("FG", {**node_cfg["FG"], "client-id": "HT"}, auth_key=certs / "supernode-3")
        listing = dep.flwr("supernode", "list", "loop", "--format", "json").stdout
        assert listing.count("registered") + listing.count("online") >= 3, listing
        # a SuperNode whose key was never registered must not get in
        if shutil.which("ssh-keygen"):
            subprocess.run(["ssh-keygen", "-q", "-t", "ecdsa", "-b", "384", "-N", "", "-f",
                            str(tmp_path / "rogue")], check=True)
        else:
            make_certs(tmp_path / "rogue-certs", n=1)
            shutil.copy(tmp_path / "rogue-certs" / "supernode-1", tmp_path / "rogue")
        rogue = dep.add_supernode("rogue", {"client-id": "X", "data-path": "/x",
                                            "state-dir": str(tmp_path / "rogue-state")},
                                  auth_key=tmp_path / "rogue", register=False, max_retries=1)

        def impostor_then_honest():
            _wait_for(lambda: "claims client 'HT': refused" in dep.tail("flwr-run", 10**6), 200,
                      "the impostor was not refused")
            # SIGTERM: a node that leaves cleanly is offline at once and may come back with its
            # key; after a SIGKILL the SuperLink refuses the key until the heartbeat expires
            dep.kill("FG", signal.SIGTERM)
            dep.add_supernode("FG", node_cfg["FG"], auth_key=certs / "supernode-3", register=False)

        th = threading.Thread(target=impostor_then_honest, daemon=True)
        th.start()
        res = dep.run({"task": "train", "config": str(cfg_path), "run-dir": str(run_dir),
                       "min-nodes": 3, "node-wait-timeout": 200.0, "round-timeout": 180.0},
                      timeout=300)
        th.join(5)
        assert res.returncode == 0, res.stdout
        rogue.popen.wait(timeout=60)
        assert rogue.popen.returncode != 0
        assert "Failed to activate SuperNode" in dep.tail("rogue", 60)
        # the operator's door is shut on the hospitals' side: the CLI through the gateway fails
        with open(dep.cli_home / "config.toml", "a") as f:
            f.write(f'\n[superlink.gateway]\naddress = "127.0.0.1:{gateway}"\n'
                    f'root-certificates = "{certs / "ca.crt"}"\n')
        for args in (("supernode", "list", "gateway"), ("ls", "gateway")):
            refused = dep.flwr(*args, check=False)
            assert refused.returncode != 0, refused.stdout
        assert dep.flwr("ls", "loop").returncode == 0  # and open on the server machine
        verify = ssl.create_default_context(cafile=str(certs / "ca.crt"))
        for path in ("/v1/control/list-runs", "/v1/runtime/get-nodes", "/v1/fleet/../control/list-runs"):
            r = httpx.post(f"https://127.0.0.1:{gateway}{path}", content=b"", verify=verify, timeout=10)
            assert r.status_code == 403, (path, r.status_code)
    assert "registered as 'FG', claims client 'HT': refused" in res.stdout
    result = json.loads((run_dir / "flower-result.json").read_text())
    assert result["rounds"] == 1 and result["clients"] == ["DU", "HT", "FG"]
    assert _metrics(run_dir)[0]["clients"] == ["DU", "HT", "FG"]
    for cid in ("DU", "HT", "FG"):
        state = _node_state(tmp_path, cid)
        assert state["round"] == 1 and state["client"]["steps"] == 1
    assert _server_state(run_dir)["progress"]["round"] == 1
    assert not (tmp_path / "rogue-state").exists()
