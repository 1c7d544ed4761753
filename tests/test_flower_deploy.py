"""Real Flower deployment on loopback: flower-superlink + flower-supernode + flwr run.

These tests start real processes (SuperLink, SuperNodes, SuperExec, ServerApp and
ClientApp subprocesses) on 127.0.0.1 with free ports; every process is killed at the end.
"""

from __future__ import annotations

import json
import subprocess

import pytest

pytest.importorskip("flwr")

from flower_harness import ROOT, Deployment, make_certs  # noqa: E402


def test_tls_and_supernode_auth_ping(tmp_path):
    """TLS + SuperNode authentication: registered nodes are served, an unregistered one is refused."""
    certs = make_certs(tmp_path / "certs", n=2)
    run_dir = tmp_path / "run"
    with Deployment(tmp_path / "dep", ROOT, certs=certs, node_auth=True) as dep:
        dep.start_superlink()
        for i in range(2):
            dep.add_supernode(f"node{i}", {"client-id": f"H{i}", "data-path": f"/data/{i}",
                                           "state-dir": str(tmp_path / f"state{i}")},
                              auth_key=certs / f"supernode-{i + 1}")
        listing = dep.flwr("supernode", "list", "loop", "--format", "json").stdout
        assert listing.count("registered") + listing.count("online") >= 2, listing
        # a SuperNode whose key was never registered must not get in
        subprocess.run(["ssh-keygen", "-q", "-t", "ecdsa", "-b", "384", "-N", "", "-f",
                        str(tmp_path / "rogue")], check=True)
        rogue = dep.add_supernode("rogue", {"client-id": "X", "data-path": "/x",
                                            "state-dir": str(tmp_path / "rogue-state")},
                                  auth_key=tmp_path / "rogue", register=False, max_retries=1)
        res = dep.run({"task": "ping", "run-dir": str(run_dir), "min-nodes": 2}, timeout=120)
        assert res.returncode == 0, res.stdout
        rogue.popen.wait(timeout=60)
        assert rogue.popen.returncode != 0
        assert "Failed to activate SuperNode" in dep.tail("rogue", 60)
    result = json.loads((run_dir / "ping.json").read_text())
    assert set(result["replies"]) == {"H0", "H1"}
    assert all(r["ok"] for r in result["replies"].values())
    assert not (tmp_path / "rogue-state").exists()


def test_deploy_two_rounds_inference_and_same_as_in_process(tmp_path):
    """SuperLink + two SuperNodes (insecure loopback), tiny preset, two rounds, one split
    inference; models equal the in-process engine's under the same seed and config."""
    import torch
    from test_flower import assert_same_models, tiny_config

    from collafuse.config import load_config
    from collafuse.data import save_images
    from collafuse.engines.local import run_training
    from collafuse.factory import load_client_data

    cfg_path = tiny_config(tmp_path)
    cfg = load_config(cfg_path)
    parts, _ = load_client_data(cfg)
    for cid, part in parts.items():  # each hospital's own data on its own disk
        save_images(part, tmp_path / f"{cid}.npz")
    run_dir = tmp_path / "run"
    with Deployment(tmp_path / "dep", ROOT) as dep:
        dep.start_superlink()
        for cid in parts:
            dep.add_supernode(cid, {"client-id": cid, "data-path": str(tmp_path / f"{cid}.npz"),
                                    "state-dir": str(tmp_path / f"state-{cid}")})
        res = dep.run({"task": "train", "config": str(cfg_path), "run-dir": str(run_dir),
                       "min-nodes": 2, "sample-n": 4}, timeout=240)
        assert res.returncode == 0, res.stdout
    result = json.loads((run_dir / "flower-result.json").read_text())
    assert result["rounds"] == 2 and result["clients"] == ["DU", "HT"]
    for cid in parts:
        out = tmp_path / f"state-{cid}" / "samples"
        assert (out / f"{cid}.png").stat().st_size > 0
        import numpy as np

        with np.load(out / f"{cid}.npz") as z:
            assert z["images"].shape[0] == 4 and z["images"].dtype == np.uint8
        assert result["samples"][cid]["num-images"] == 4
    local = run_training(cfg, tmp_path / "local", progress=False)
    assert_same_models(local.server.model.state_dict(),
                       torch.load(run_dir / "server.pt", weights_only=True)["model"])
    for cid, client in local.clients.items():
        state = torch.load(tmp_path / f"state-{cid}" / "client.pt", weights_only=True)
        assert_same_models(client.model.state_dict(), state["model"])
