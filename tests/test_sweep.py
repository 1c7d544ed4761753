"""Cost per party, the cut-ratio sweep end to end (tiny preset) and the report's verdicts."""

import csv
import json
import math
import shutil

import numpy as np
import pytest

from collafuse.config import ConfigError, load_config
from collafuse.engines.local import run_training
from collafuse.evaluation.costs import CostMeter
from collafuse.evaluation.report import FIGURES, REPORT
from collafuse.evaluation.layout import run_dir
from collafuse.evaluation.sweep import run_config, run_sweep, sweep_plan
from collafuse.metering import SERVER, client_party, totals

from conftest import DEFAULT_DATA, tiny_overrides


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


def test_flops_keys_count_what_counting_every_block_counts(tiny_config, tmp_path):
    """The parties' FLOP keys (CostMeter.measure's flops_key) name all that fixes a block's
    FLOPs: a run metered with them counts what a meter counting every block counts."""
    secrets = {cid: bytes([i]) * 32 for i, cid in enumerate(("DU", "HT"))}
    flops = []
    for name, meter in (("keyed", CostMeter(energy=False)),
                        ("every", CostMeter(energy=False, reuse_flops=False))):
        cfg = tiny_config(**{"diffusion.cut_ratio": 0.5, "train.steps": 6,
                             "train.local_steps": 2, "train.local_batch_size": 3})
        run_training(cfg, tmp_path / name, progress=False, meter=meter, secrets=secrets)
        flops.append({(r["party"], r["phase"]): r["flops"] for r in meter.rows()})
    assert flops[0] == flops[1] and flops[0][("server", "training")] > 0
    assert flops[0][("client:DU", "training")] > 0


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


def _rounds(folder):
    return [json.loads(ln)["round"]
            for ln in (folder / "metrics.jsonl").read_text().splitlines()]


GRID = {"sweep.protocols": '["shared-noise", "noisy-data"]', "sweep.seeds": "[0, 1]",
        "sweep.grid": '[{protocol = "noisy-data", cut_ratios = [0.5, 1.0]}]'}


@pytest.mark.slow  # trains and scores KID at two cut ratios, two seeds, two protocols
def test_sweep_over_seeds_and_protocols_writes_its_rows_and_resumes(tmp_path, capsys):
    """2 seeds x 2 cut ratios under both protocols (noisy-data's cut ratios from a
    [[sweep.grid]] entry): a row per (protocol, c, seed, client), each seed its own run;
    an interrupted sweep keeps finished runs and resumes the begun one."""
    cfg = _sweep_config(**GRID)
    plan = sweep_plan(cfg)
    assert [(s.protocol, s.cut_ratio, s.seed) for s in plan] == [
        ("shared-noise", 0.0, 0), ("shared-noise", 0.5, 0),
        ("noisy-data", 0.5, 0), ("noisy-data", 1.0, 0),
        ("shared-noise", 0.0, 1), ("shared-noise", 0.5, 1),
        ("noisy-data", 0.5, 1), ("noisy-data", 1.0, 1)]
    out = tmp_path / "sweep"
    first = run_sweep(cfg, out, progress=False, max_runs=3)
    assert [(r["protocol"], r["cut_ratio"], r["seed"]) for r in first[::2]] == [
        ("shared-noise", 0.0, 0), ("shared-noise", 0.5, 0), ("noisy-data", 0.5, 0)]
    done = [run_dir(out, *key) for key in (("shared-noise", 0.0, 0), ("noisy-data", 0.5, 0))]
    stamps = {(d, name): (d / name).stat().st_mtime_ns for d in done
              for name in ("checkpoint.pt", "summary.json", "evaluation.json")}
    # Interrupt the fourth run inside its training, too.
    begun = run_dir(out, "noisy-data", 1.0, 0)
    run_training(run_config(cfg, plan[3]), begun, stop_after_round=2, progress=False)
    # Read before it ends: the finished runs alone, the others named at the top of the report.
    assert len(run_sweep(cfg, out, progress=False, train=False)) == 6
    partial = (out / REPORT).read_text()
    assert "A partial sweep:** 5 planned runs" in partial and "noisy-data c=1 seed=0" in partial

    rows = run_sweep(cfg, out, progress=True)

    printed = capsys.readouterr().out
    assert "8 runs in the plan; 5 trainings to run (1 resumed)" in printed, printed
    assert "projected wall time" in printed and "5 runs to evaluate" in printed
    assert stamps == {key: (key[0] / key[1]).stat().st_mtime_ns for key in stamps}
    assert _rounds(begun) == list(range(1, 7))
    assert [(r["protocol"], r["cut_ratio"], r["seed"], r["client"]) for r in rows] == [
        (s.protocol, s.cut_ratio, s.seed, cid) for s in plan for cid in ("DU", "HT")]
    for spec in plan:  # each seed its own run: its own run.seed, weights and losses
        folder = run_dir(out, spec.protocol, spec.cut_ratio, spec.seed)
        run_cfg = load_config(folder / "config.toml")
        assert (run_cfg.run.seed, run_cfg.train.protocol, run_cfg.diffusion.cut_ratio) == (
            spec.seed, spec.protocol, spec.cut_ratio)
    by_key = {(r["protocol"], r["cut_ratio"], r["seed"], r["client"]): r for r in rows}
    for protocol, c in (("shared-noise", 0.5), ("noisy-data", 0.5), ("noisy-data", 1.0)):
        seed0 = run_dir(out, protocol, c, 0) / "metrics.jsonl"
        seed1 = run_dir(out, protocol, c, 1) / "metrics.jsonl"
        assert seed0.read_text() != seed1.read_text(), (protocol, c)
        assert by_key[(protocol, c, 0, "DU")]["kid_holdout"] != by_key[(protocol, c, 1, "DU")][
            "kid_holdout"]
    for name in ("results.csv", "results.json", REPORT, *FIGURES.values()):
        assert (out / name).is_file(), name
    assert "partial sweep" not in (out / REPORT).read_text()
    assert json.loads((out / "results.json").read_text()) == rows
    with open(out / "results.csv") as f:
        table = list(csv.DictReader(f))
    assert len(table) == 16 and {"seed", "protocol", "kid_holdout", "disclosure_mse"} <= set(
        table[0])
    assert [(t["protocol"], t["seed"]) for t in table[:2]] == [("shared-noise", "0")] * 2
    numeric = ["kid_train", "kid_holdout", "kid_train_std", "disclosure_mse",
               "disclosure_kid", "disclosure_x0_nn_mse", "disclosure_x0_nn_mse_baseline",
               "disclosure_memorisation_nearer_train",
               "disclosure_memorisation_baseline_nearer_train",
               "disclosure_memorisation_copy_fraction", "client_flops", "server_flops",
               "client_energy_kwh", "client_seconds", "client_bytes_sent"]
    for row in rows[:4]:
        assert all(math.isfinite(row[k]) for k in numeric), row
        assert 0.0 <= row["samples_near_copies"] <= 1.0 and row["samples_nn_mse_train"] > 0
    assert {"samples_near_copies", "samples_near_copies_baseline"} <= set(table[0])
    zero, half = by_key[("shared-noise", 0.0, 1, "DU")], by_key[("shared-noise", 0.5, 1, "DU")]
    assert zero["cut_index"] == 0 and half["cut_index"] == 10
    assert zero["client_flops"] == 0 and zero["client_flop_share"] == 0
    assert half["client_flop_share"] > 0 and half["client_bytes_sent"] < zero["client_bytes_sent"]
    # each client's sampling costs are its own: the server denoises as many samples for HT as
    # for DU, so a meter that kept counting across clients would show HT twice DU's FLOPs
    half_ht = by_key[("shared-noise", 0.5, 1, "HT")]
    assert half["server_sampling_flops"] == half_ht["server_sampling_flops"] > 0
    assert half["client_sampling_flops"] == half_ht["client_sampling_flops"] > 0
    report = (out / REPORT).read_text()
    assert "shared-noise" in report and "estimate" in report and "Privacy audit" in report
    assert "copy the clients' images" in report and "t-intervals over training seeds" in report
    assert "What hiding the noise costs" in report and "| 0.5 | 0, 1 |" in report

    # As committed (results/sweep-cpu, .gitignore): each run's rows and logs without its
    # weights or secrets. The sweep continues from it without retraining or re-evaluating;
    # other evaluation settings need the weights, and say so.
    for spec in plan:
        folder = run_dir(out, spec.protocol, spec.cut_ratio, spec.seed)
        (folder / "checkpoint.pt").unlink()
        shutil.rmtree(folder / "client-secrets")
    assert run_sweep(cfg, out, progress=False) == rows
    other = _sweep_config(**{**GRID, "evaluation.num_samples": 5})
    with pytest.raises(ConfigError, match="no checkpoint here"):
        run_sweep(other, out, progress=False)


@pytest.mark.slow  # trains two runs
def test_each_training_seed_is_its_own_run(tmp_path):
    """Seeds 0 and 1 of one (protocol, c): two folders, each with its run.seed, different
    initial weights and training draws (so different losses), the same recipe otherwise."""
    cfg = _sweep_config(**{"sweep.cut_ratios": "[0.5]", "sweep.seeds": "[0, 1]"})
    run_sweep(cfg, tmp_path, progress=False, evaluate=False)
    folders = [run_dir(tmp_path, "shared-noise", 0.5, k) for k in (0, 1)]
    configs = [load_config(f / "config.toml") for f in folders]
    assert [c.run.seed for c in configs] == [0, 1]
    configs[1].run.seed = 0
    assert configs[0].identity() == configs[1].identity()
    logs = [(f / "metrics.jsonl").read_text() for f in folders]
    assert logs[0] != logs[1]
    assert (folders[0] / "checkpoint.pt").read_bytes() != (folders[1] / "checkpoint.pt").read_bytes()


@pytest.mark.parametrize("path", ["configs/sweep.toml", "configs/paper.toml"])
def test_shipped_sweep_configs_load(path):
    from conftest import REPO

    cfg = load_config(REPO / path)
    assert cfg.sweep.cut_ratios == pytest.approx([0.0, 0.2, 0.4, 0.6, 0.8, 1.0])
    assert np.isfinite(cfg.train.lr)


def test_sweep_config_trains_the_default_runs_recipe_over_the_issues_grid():
    """configs/sweep.toml: the quickstart's data, model, training and sampler; shared-noise at
    six c with three seeds, noisy-data at the four inner c with one."""
    from conftest import REPO

    sweep, quick = load_config(REPO / "configs/sweep.toml"), load_config(
        REPO / "configs/quickstart.toml")
    for section in ("data", "model", "train", "sample"):
        assert getattr(sweep, section) == getattr(quick, section), section
    assert sweep.diffusion.num_timesteps == quick.diffusion.num_timesteps
    plan = sweep_plan(sweep)
    shared = [s for s in plan if s.protocol == "shared-noise"]
    noisy = [s for s in plan if s.protocol == "noisy-data"]
    assert sorted({s.cut_ratio for s in shared}) == pytest.approx([0, 0.2, 0.4, 0.6, 0.8, 1])
    assert {s.seed for s in shared} == {0, 1, 2} and len(shared) == 18
    assert sorted({s.cut_ratio for s in noisy}) == pytest.approx([0.2, 0.4, 0.6, 0.8])
    assert {s.seed for s in noisy} == {0} and len(noisy) == 4


def test_seeds_option_replaces_every_protocols_seeds():
    from collafuse.evaluation.sweep import with_seeds

    cfg = _sweep_config(**{"sweep.protocols": '["shared-noise", "noisy-data"]',
                           "sweep.grid": '[{protocol = "noisy-data", seeds = [0]}]'})
    plan = sweep_plan(with_seeds(cfg, [3, 4]))
    assert {(s.protocol, s.seed) for s in plan} == {
        (p, k) for p in ("shared-noise", "noisy-data") for k in (3, 4)}
    assert {s.seed for s in sweep_plan(cfg)} == {0}  # sweep.seeds = [] means run.seed


@pytest.mark.parametrize("grid, message", [
    ('[{protocol = "noisy-data"}]', "sweep.grid\\[0\\].protocol: expected one of sweep.protocols"),
    ('[{protocol = "shared-noise", cuts = [0.5]}]', "sweep.grid\\[0\\].cuts: unknown key"),
    ('[{protocol = "shared-noise", cut_ratios = [1.5]}]', "cut_ratios: expected numbers in"),
    ('[{protocol = "shared-noise", seeds = [1, 1]}]', "seeds: expected distinct integers"),
])
def test_bad_sweep_grid_is_a_one_line_error(grid, message):
    with pytest.raises(ConfigError, match=message):
        _sweep_config(**{"sweep.grid": grid})


def test_sweep_cli_rejects_bad_seeds(capsys):
    from collafuse.cli import main
    from conftest import REPO

    for seeds in ("0,x", "1,1"):
        with pytest.raises(SystemExit) as exit_:
            main(["sweep", str(REPO / "configs/sweep.toml"), "--seeds", seeds])
        assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "--seeds: expected integers separated by commas" in err and "distinct" in err


@pytest.mark.slow
def test_train_here_evaluate_elsewhere(tmp_path, monkeypatch):
    """--train-only trains and evaluates nothing; --evaluate-only evaluates finished runs,
    wherever they ran (run.device is no part of a run's identity), and trains nothing; on a
    partial sweep it evaluates the finished runs and names the others in the report."""
    import collafuse.evaluation.report as report
    import collafuse.evaluation.sweep as sweep

    evaluated = []
    monkeypatch.setattr(sweep, "evaluate_run", lambda cfg, spec, folder, cache, bar:
                        evaluated.append((cfg.run.device, folder.name)) or [])
    reported = []
    monkeypatch.setattr(report, "write_report",
                        lambda out, untrained=(): reported.append(list(untrained)))
    cfg = _sweep_config(**{"run.device": '"cpu"'})
    out = tmp_path / "sweep"
    with pytest.raises(ConfigError, match="no finished training run"):
        run_sweep(cfg, out, progress=False, train=False)
    run_sweep(cfg, out, progress=False, evaluate=False, max_runs=1)
    assert evaluated == [] and not (out / "results.json").exists()
    run_sweep(cfg, out, progress=False, train=False)
    assert evaluated == [("cpu", "c=0-seed=0")]
    assert reported == [["shared-noise c=0.5 seed=0"]]
    evaluated.clear()
    reported.clear()
    run_sweep(cfg, out, progress=False, evaluate=False)
    folders = [run_dir(out, "shared-noise", c, 0) for c in (0.0, 0.5)]
    stamps = [(f / "checkpoint.pt").stat().st_mtime_ns for f in folders]
    elsewhere = _sweep_config(**{"run.device": '"auto"'})
    run_sweep(elsewhere, out, progress=False, train=False)
    assert evaluated == [("auto", "c=0-seed=0"), ("auto", "c=0.5-seed=0")]
    assert reported == [[]]
    assert stamps == [(f / "checkpoint.pt").stat().st_mtime_ns for f in folders]
    with pytest.raises(ConfigError, match="another config"):
        run_sweep(_sweep_config(**{"train.lr": 0.01}), out, progress=False, train=False)


def test_sample_copies_columns_find_planted_copies():
    """The sweep's copy columns (issue 22): a client's own training slices offered as its
    samples are all near-copies; another hospital's slices score about as its held-out
    patients' real slices do (the baseline)."""
    from collafuse.data import ImageSet, to_model
    from collafuse.evaluation.sweep import sample_copies

    data = np.load(DEFAULT_DATA)
    images, site = data["images"], data["site"]
    informative = images.reshape(len(images), -1).max(1) > 0  # black slices copy each other
    du = images[(site == "DU") & informative]
    train, held = to_model(du[:1200]), ImageSet(du[1200:])
    planted = sample_copies(train[::10], train, held)
    assert planted["samples_near_copies"] == 1.0 and planted["samples_nn_mse_train"] < 1e-4
    other = sample_copies(to_model(images[(site == "FG") & informative][:200]), train, held)
    assert abs(other["samples_near_copies"] - other["samples_near_copies_baseline"]) <= 0.1
    assert other["samples_nn_mse_train"] > 0 and other["samples_nn_mse_holdout"] > 0
    assert sample_copies(train[:5], train, None)["samples_near_copies_baseline"] is None
