"""Cost per party, the cut-ratio sweep end to end (tiny preset) and the report's verdicts."""

import json
import math

import numpy as np
import pytest

from collafuse.config import ConfigError, load_config
from collafuse.engines.local import run_training
from collafuse.evaluation.costs import CostMeter
from collafuse.evaluation.report import FIGURES, REPORT, findings
from collafuse.evaluation.layout import cut_dir
from collafuse.evaluation.sweep import cut_config, run_sweep
from collafuse.metering import SERVER, client_party, totals

from conftest import tiny_overrides


@pytest.mark.slow
def test_client_flop_share_falls_as_cut_ratio_falls(tiny_config, tmp_path):
    """The paper's Hypothesis 2c: the smaller c, the less of the work the client does."""
    shares = []
    for c in (0.8, 0.5, 0.2):
        meter = CostMeter(energy=False)
        cfg = tiny_config(**{"diffusion.cut_ratio": c, "train.steps": 4})
        run = run_training(cfg, tmp_path / f"{c}", progress=False, meter=meter)
        rows = meter.rows()
        assert {(r["party"], r["phase"]) for r in rows} >= {
            ("client:DU", "diffusion"), ("client:DU", "training"), ("server", "training"),
            ("server", "sampling"), ("client:DU", "sampling")}
        client = sum(totals(rows, client_party(cid), ("diffusion", "training"))["flops"]
                     for cid in run.clients)
        server = totals(rows, SERVER, ("training",))["flops"]
        shares.append(client / (client + server))
        summary = json.loads((tmp_path / f"{c}" / "summary.json").read_text())
        assert summary["bytes"]["DU"]["sent"] == totals(rows, "client:DU")["bytes_sent"] > 0
    assert shares[0] > shares[1] > shares[2] > 0


def _sweep_config(**extra):
    values = {
        "sweep.cut_ratios": "[0.0, 0.5]",
        "evaluation.num_samples": 4,
        "evaluation.kid_subsets": 3,
        "evaluation.kid_subset_size": 4,
        "evaluation.max_real_images": 8,
        "evaluation.trajectory_steps": 4,
        "sample.num_samples": 2,
        "data.client_holdout_fraction": 0.2,
        **extra,
    }
    return load_config(None, tiny_overrides(**values))


@pytest.mark.slow  # trains and scores KID at two cut ratios
def test_sweep_end_to_end_resumes_where_it_stopped(tmp_path):
    cfg = _sweep_config()
    out = tmp_path / "sweep"
    first = run_sweep(cfg, out, progress=False, max_cut_ratios=1)
    assert [r["cut_ratio"] for r in first] == [0.0, 0.0]
    done = cut_dir(out, 0.0)
    stamps = {name: (done / name).stat().st_mtime_ns for name in
              ("checkpoint.pt", "summary.json", "evaluation.json")}
    # Interrupt the second cut ratio inside its training, too.
    run_training(cut_config(cfg, 0.5), cut_dir(out, 0.5), stop_after_round=2, progress=False)

    rows = run_sweep(cfg, out, progress=False)

    assert stamps == {name: (done / name).stat().st_mtime_ns for name in stamps}
    rounds = [json.loads(ln)["round"]
              for ln in (cut_dir(out, 0.5) / "metrics.jsonl").read_text().splitlines()]
    assert rounds == list(range(1, 7))
    assert [(r["cut_ratio"], r["client"]) for r in rows] == [
        (0.0, "DU"), (0.0, "HT"), (0.5, "DU"), (0.5, "HT")]
    for name in ("results.csv", "results.json", REPORT, *FIGURES.values()):
        assert (out / name).is_file(), name
    assert json.loads((out / "results.json").read_text()) == rows
    assert len((out / "results.csv").read_text().splitlines()) == 5
    numeric = ["kid_train", "kid_holdout", "kid_train_std", "disclosure_mse",
               "disclosure_kid", "disclosure_x0_nn_mse", "disclosure_x0_nn_mse_baseline",
               "disclosure_memorisation_nearer_train",
               "disclosure_memorisation_baseline_nearer_train",
               "disclosure_memorisation_copy_fraction", "client_flops", "server_flops",
               "client_energy_kwh", "client_seconds", "client_bytes_sent"]
    for row in rows:
        assert row["protocol"] == "shared-noise"
        assert all(math.isfinite(row[k]) for k in numeric), row
    zero, half = rows[0], rows[2]
    assert zero["cut_index"] == 0 and half["cut_index"] == 10
    assert zero["client_flops"] == 0 and zero["client_flop_share"] == 0
    assert half["client_flop_share"] > 0 and half["client_bytes_sent"] < zero["client_bytes_sent"]
    report = (out / REPORT).read_text()
    assert "shared-noise" in report and "estimate" in report and "Privacy audit" in report
    assert "copy the clients' images" in report


def _synthetic_rows(kid, mse, energy):
    cs = [0.0, 0.2, 0.4, 0.6, 0.8, 1.0]
    return [dict(cut_ratio=c, cut_index=round(100 * c), num_timesteps=100, client=cid,
                 kid_train=k, kid_holdout=k, disclosure_mse=m,
                 client_energy_kwh=e, client_flops=e * 1e12)
            for c, k, m, e in zip(cs, kid, mse, energy) for cid in ("A", "B")]


def test_findings_say_whether_the_paper_is_supported():
    paper_like = findings(_synthetic_rows(kid=[0.05, 0.04, 0.03, 0.02, 0.04, 0.09],
                                          mse=[0.087, 1.0, 1.02, 1.05, 1.06, 1.07],
                                          energy=[0.0, 1.0, 2.0, 3.0, 4.0, 5.0]))
    assert all("Supported" in line for line in paper_like), paper_like
    contrary = findings(_synthetic_rows(kid=[0.06, 0.05, 0.04, 0.03, 0.02, 0.01],
                                        mse=[0.5, 0.4, 0.3, 0.2, 0.1, 0.05],
                                        energy=[5.0, 4.0, 3.0, 2.0, 1.0, 0.0]))
    assert all("Not supported" in line for line in contrary), contrary
    assert "cannot be checked" in findings(_synthetic_rows([1], [1], [1]))[0]


@pytest.mark.parametrize("path", ["configs/sweep.toml", "configs/paper.toml"])
def test_shipped_sweep_configs_load(path):
    from conftest import REPO

    cfg = load_config(REPO / path)
    assert cfg.sweep.cut_ratios == pytest.approx([0.0, 0.2, 0.4, 0.6, 0.8, 1.0])
    assert np.isfinite(cfg.train.lr)


@pytest.mark.slow
def test_train_here_evaluate_elsewhere(tmp_path, monkeypatch):
    """--train-only trains and evaluates nothing; --evaluate-only evaluates finished runs,
    wherever they ran (run.device is no part of a run's identity), and trains nothing."""
    import collafuse.evaluation.report as report
    import collafuse.evaluation.sweep as sweep

    evaluated = []
    monkeypatch.setattr(sweep, "evaluate_cut", lambda cfg, run_dir, cache, progress:
                        evaluated.append((cfg.run.device, run_dir.name)) or [])
    monkeypatch.setattr(report, "write_report", lambda out: None)
    cfg = _sweep_config(**{"run.device": '"cpu"'})
    out = tmp_path / "sweep"
    with pytest.raises(ConfigError, match="no finished training run"):
        run_sweep(cfg, out, progress=False, train=False)
    run_sweep(cfg, out, progress=False, evaluate=False)
    assert evaluated == [] and not (out / "results.json").exists()
    stamps = [(cut_dir(out, c) / "checkpoint.pt").stat().st_mtime_ns for c in (0.0, 0.5)]
    elsewhere = _sweep_config(**{"run.device": '"auto"'})
    run_sweep(elsewhere, out, progress=False, train=False)
    assert evaluated == [("auto", "c=0"), ("auto", "c=0.5")]
    assert stamps == [(cut_dir(out, c) / "checkpoint.pt").stat().st_mtime_ns for c in (0.0, 0.5)]
    with pytest.raises(ConfigError, match="another config"):
        run_sweep(_sweep_config(**{"train.lr": 0.01}), out, progress=False, train=False)
