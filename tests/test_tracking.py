"""TensorBoard events (collafuse.tracking) in the run folders of both engines, read back with
tensorboard's own EventAccumulator."""

import json
from pathlib import Path

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from collafuse.engines.local import run_training
from collafuse.tracking import EVENTS_DIR, SWEEP_EVENTS, log_sweep_rows


def events(folder: Path) -> EventAccumulator:
    acc = EventAccumulator(str(folder), size_guidance={"scalars": 0, "images": 0})
    acc.Reload()
    return acc


def scalars(acc: EventAccumulator, tag: str) -> dict[int, float]:
    return {e.step: e.value for e in acc.Scalars(tag)}


@pytest.mark.slow  # trains, crashes and resumes a run
def test_in_process_run_tracks_every_party_and_samples(tiny_config, tmp_path):
    cfg = tiny_config(**{"train.sample_every": 2, "train.steps": 5, "train.log_every": 1})
    run_training(cfg, tmp_path / "r", progress=False, stop_after_round=2)
    saved = (tmp_path / "r/checkpoint.pt").read_bytes()
    run_training(cfg, tmp_path / "r", resume=True, progress=False, stop_after_round=3)
    # a crash after round 3 was logged but before its checkpoint: the resumed run redoes it
    (tmp_path / "r/checkpoint.pt").write_bytes(saved)
    run = run_training(cfg, tmp_path / "r", resume=True, progress=False)
    acc = events(tmp_path / "r" / EVENTS_DIR)
    lines = [json.loads(x) for x in (tmp_path / "r/metrics.jsonl").read_text().splitlines()]
    logged = {"loss/server": [x["server_loss"] for x in lines],
              **{f"loss/client:{c}": [x[f"client_loss/{c}"] for x in lines] for c in run.clients}}
    for tag, values in logged.items():  # every round once, resumed or not, as in metrics.jsonl
        assert [e.step for e in acc.Scalars(tag)] == [1, 2, 3, 4, 5], tag
        assert scalars(acc, tag) == pytest.approx(dict(enumerate(values, 1)), rel=1e-6), tag
    for cid in run.clients:
        assert scalars(acc, f"lr/client:{cid}") == pytest.approx({r: 1e-3 for r in range(1, 6)})
        sent = scalars(acc, f"bytes/client:{cid}")
        assert sorted(sent) == [1, 2, 3, 4, 5] and all(v > 0 for v in sent.values())
        # every 2 rounds, and the final samples at round 5
        assert [e.step for e in acc.Images(f"samples/{cid}")] == [2, 4, 5]
    assert sum(sent.values()) <= run.party_totals()[cid]["bytes_sent"]


@pytest.mark.slow  # trains two runs
def test_sampling_for_tensorboard_leaves_training_unchanged(tiny_config, tmp_path):
    base = {"train.steps": 4, "train.log_every": 1}
    run_training(tiny_config(**base), tmp_path / "plain", progress=False)
    run_training(tiny_config(**base, **{"train.sample_every": 1}), tmp_path / "sampled",
                 progress=False)
    assert (tmp_path / "plain/metrics.jsonl").read_text() == \
        (tmp_path / "sampled/metrics.jsonl").read_text()
    a, b = (torch.load(tmp_path / f / "checkpoint.pt", weights_only=True)["server"]["model"]
            for f in ("plain", "sampled"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_sweep_rows_become_scalars_over_the_cut_ratio(tmp_path):
    rows = [{"protocol": "shared-noise", "client": cid, "cut_ratio": c, "kid_holdout": k,
             "kid_train": k / 2, "disclosure_mse": 1.0 - c, "disclosure_kid": None}
            for cid in ("DU", "HT") for c, k in ((0.0, 0.05), (0.6, 0.02), (1.0, 0.09))]
    log_sweep_rows(tmp_path, rows)
    log_sweep_rows(tmp_path, rows)  # a rerun replaces the events, it does not add to them
    acc = events(tmp_path / EVENTS_DIR / SWEEP_EVENTS / "shared-noise")
    assert scalars(acc, "kid_holdout/DU") == pytest.approx({0: 0.05, 60: 0.02, 100: 0.09})
    assert scalars(acc, "disclosure_mse/HT") == pytest.approx({0: 1.0, 60: 0.4, 100: 0.0})
    assert "disclosure_kid/DU" not in acc.Tags()["scalars"]  # not measured: no point


@pytest.mark.flower  # a Flower simulation
def test_flower_simulation_tracks_every_party_and_exports_its_server(tmp_path):
    pytest.importorskip("flwr")
    from flower_harness import ROOT, Deployment
    from test_flower import tiny_config

    from collafuse.export import export_run
    from collafuse.pipeline import CollaFusePipeline

    run_dir = tmp_path / "sim-run"
    with Deployment(tmp_path / "dep", ROOT) as dep:
        dep.start_superlink(simulation=True)
        res = dep.run({"task": "train", "config": str(tiny_config(tmp_path)),
                       "run-dir": str(run_dir), "min-nodes": 2, "sim-clients": "DU,HT",
                       "identity": "node-report"},
                      federation_config={"num-supernodes": 2}, timeout=240)
        assert res.returncode == 0, res.stdout
    acc = events(run_dir / EVENTS_DIR)
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert scalars(acc, "loss/server") == pytest.approx(
        {x["round"]: x["server_loss"] for x in lines}, rel=1e-6)
    for cid in ("DU", "HT"):
        assert scalars(acc, f"loss/client:{cid}") == pytest.approx(
            {x["round"]: x["client_loss"][cid] for x in lines}, rel=1e-6)
        assert scalars(acc, f"bytes/client:{cid}") == {x["round"]: x["bytes"][cid] for x in lines}
    assert sorted(scalars(acc, "lr/server")) == [1, 2]
    assert [e.step for e in acc.Images("handover/s=12")] == [2]  # the server's own hand-overs
    assert not any(t.startswith("samples/") for t in acc.Tags()["images"])
    # the Flower server's run folder exports its server part, which samples hand-overs
    info = export_run(run_dir, tmp_path / "out")
    assert set(info["clients"]) == {"DU", "HT"} and not (tmp_path / "out/clients").exists()
    assert CollaFusePipeline.from_pretrained(tmp_path / "out").handover("HT", 2).x.shape == \
        (2, 1, 32, 32)
