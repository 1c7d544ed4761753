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
import shutil
import signal
import subprocess
import threading
import time

import numpy as np
import pytest

pytest.importorskip("flwr")

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


def _client_progress(tmp_path, cid):
    return json.loads((tmp_path / f"state-{cid}" / "progress.json").read_text())


def test_deploy_rounds_inference_equivalence_faults_and_resume(tmp_path):
    """SuperLink + two SuperNodes (insecure loopback), tiny preset, noisy-data protocol.

    Run 1: two rounds and one split inference; models equal the in-process engine's.
    Run 2 (the server restarted on the same run-dir, 4 rounds): it resumes after round 2;
    HT is killed as round 3's request reaches it, round 3 goes on with DU alone (logged); HT's
    SuperNode comes back with the same state-dir and round 4 has both, HT resuming from disk.
    """
    cfg_path = tiny_config(tmp_path, protocol="noisy-data")
    cfg = load_config(cfg_path)
    node_cfg = _hospitals(tmp_path, cfg)
    run_dir = tmp_path / "run"
    rc = {"task": "train", "config": str(cfg_path), "run-dir": str(run_dir), "min-nodes": 2,
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
        assert_same_models(local.server.model.state_dict(),
                           torch.load(run_dir / "server.pt", weights_only=True)["model"])
        for cid, client in local.clients.items():
            state = torch.load(tmp_path / f"state-{cid}" / "client.pt", weights_only=True)
            assert_same_models(client.model.state_dict(), state["model"])
            assert _client_progress(tmp_path, cid)["client-steps"] == 2

        # --- run 2: restarted server resumes; a node dies mid-run and comes back
        def kill_then_restart():
            deadline = time.monotonic() + 250
            while time.monotonic() < deadline:
                # HT's third train message is round 3's (run 1 sent two): it dies receiving it
                if dep.tail("HT", 10**6).count("Receiving: train message") >= 3:
                    # the node's processes are killed (SIGTERM: the SuperNode leaves the
                    # SuperLink as it dies, so the server hears of it at once instead of
                    # after round-timeout, which must stay generous for slow machines)
                    dep.kill("HT", signal.SIGTERM)
                    dep.add_supernode("HT", node_cfg["HT"])  # same state-dir: resumes from disk
                    return
                time.sleep(0.05)

        th = threading.Thread(target=kill_then_restart, daemon=True)
        th.start()
        res2 = dep.run({**rc, "rounds": 4}, timeout=300)
        th.join(5)
        assert res2.returncode == 0, res2.stdout
    out = res2.stdout
    assert "resuming" in out and "after round 2" in out
    assert "going on without it" in out
    assert "client HT is back on node" in out
    lines = _metrics(run_dir)
    assert [x["round"] for x in lines] == [1, 2, 3, 4]
    assert all(x["clients"] == ["DU", "HT"] for x in lines[:2])
    assert lines[2]["clients"] == ["DU"] and "HT" in lines[2]["problems"]
    assert lines[3]["clients"] == ["DU", "HT"]
    assert all(x["bytes"]["DU"] > 0 for x in lines)
    for cid, steps in (("DU", 4), ("HT", 3)):  # HT's 3rd step came from its saved state
        progress = _client_progress(tmp_path, cid)
        assert progress["round"] == 4 and progress["client-steps"] == steps
    assert torch.load(run_dir / "server.pt", weights_only=True)["steps"] == 4


def test_tls_supernode_auth_three_hospitals(tmp_path):
    """docs/deployment.md on loopback: certificates from make_certs.sh, a SuperLink with TLS and
    SuperNode authentication, three registered hospitals, one round (split inference is
    checked in the insecure run above); a SuperNode whose key was never registered is refused."""
    certs = make_certs(tmp_path / "certs", n=3)
    cfg_path = tiny_config(tmp_path, clients='["DU", "HT", "FG"]', steps=1)
    node_cfg = _hospitals(tmp_path, load_config(cfg_path))
    run_dir = tmp_path / "run"
    with Deployment(tmp_path / "dep", ROOT, certs=certs, node_auth=True) as dep:
        dep.start_superlink()
        for i, cid in enumerate(node_cfg):
            dep.add_supernode(cid, node_cfg[cid], auth_key=certs / f"supernode-{i + 1}")
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
        res = dep.run({"task": "train", "config": str(cfg_path), "run-dir": str(run_dir),
                       "min-nodes": 3, "round-timeout": 180.0}, timeout=240)
        assert res.returncode == 0, res.stdout
        rogue.popen.wait(timeout=60)
        assert rogue.popen.returncode != 0
        assert "Failed to activate SuperNode" in dep.tail("rogue", 60)
    result = json.loads((run_dir / "flower-result.json").read_text())
    assert result["rounds"] == 1 and result["clients"] == ["DU", "HT", "FG"]
    assert _metrics(run_dir)[0]["clients"] == ["DU", "HT", "FG"]
    for cid in ("DU", "HT", "FG"):
        assert _client_progress(tmp_path, cid) == {"round": 1, "client-steps": 1}
    assert (run_dir / "server.pt").is_file()
    assert not (tmp_path / "rogue-state").exists()
