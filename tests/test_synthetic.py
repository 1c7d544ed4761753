"""Synthetic data a hospital can use: `collafuse sample --export` and `collafuse evaluate`."""

import csv
import json

import numpy as np
import pytest

from collafuse.cli import main
from collafuse.config import load_config
from collafuse.data import load_images
from collafuse.engines.local import config_hash, run_training
from collafuse.evaluation.kid import inception_features, kid, kid_bootstrap_interval
from conftest import DEFAULT_DATA, tiny_overrides

CONDITIONAL = {"model.condition": '"both"', "model.classes": '["no-tumour", "tumour"]',
               "train.steps": 2}


pytestmark = pytest.mark.slow  # trains runs to export; Inception features for evaluate


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A tiny conditional run and a tiny unconditional one, trained two rounds each."""
    root = tmp_path_factory.mktemp("runs")
    for name, extra in (("conditional", CONDITIONAL), ("plain", {"train.steps": 2})):
        values = tiny_overrides(**extra, **{"run.device": '"cpu"', "sample.num_samples": 2})
        run_training(load_config(None, values), root / name, progress=False)
    return root


def read_manifest(folder):
    with open(folder / "manifest.csv", newline="") as f:
        return list(csv.DictReader(f))


def test_export_round_trip_with_classes(runs, tmp_path, capsys):
    out = tmp_path / "export"
    assert main(["sample", str(runs / "conditional"), "-n", "3", "--export", str(out),
                 "--batch-size", "2", "--seed", "3"]) == 0
    rows = read_manifest(out)
    assert len(rows) == 6 and len(list(out.rglob("*.png"))) == 6  # 3 per client, 2 clients
    assert {r["client"] for r in rows} == {"DU", "HT"}
    # labels_for: equal blocks of each class; batches of 2 use seeds 3, 4
    assert [r["class"] for r in rows if r["client"] == "DU"] == ["no-tumour"] * 2 + ["tumour"]
    assert [int(r["seed"]) for r in rows if r["client"] == "HT"] == [3, 3, 4]
    cfg = load_config(runs / "conditional" / "config.toml")
    assert {(r["sampler"], r["calls"], r["config_hash"]) for r in rows} == {
        ("ddpm", "20", config_hash(cfg))}
    for r in rows:
        assert r["file"] == f"{r['client']}/{r['class']}/{r['file'].split('/')[-1]}"
        assert (out / r["file"]).is_file()
    assert "layout site/class" in capsys.readouterr().out
    # the folder reads back with `data prepare` (auto layout: site/class)
    assert main(["data", "prepare", str(out), str(tmp_path / "back.npz"), "--size", "16"]) == 0
    back = load_images(tmp_path / "back.npz")
    by_file = {r["file"]: r for r in rows}
    assert len(back) == 6 and set(back.meta["label"]) == {"no-tumour", "tumour"}
    for file, site, label in zip(back.meta["file"], back.meta["site"], back.meta["label"]):
        assert (by_file[file]["client"], by_file[file]["class"]) == (site, label)
    assert main(["sample", str(runs / "conditional"), "-n", "1", "--export", str(out)]) == 2


def test_export_unconditional_has_no_class_level(runs, tmp_path):
    out = tmp_path / "export"
    assert main(["sample", str(runs / "plain"), "-n", "2", "--export", str(out)]) == 0
    rows = read_manifest(out)
    assert sorted(r["file"] for r in rows) == ["DU/0.png", "DU/1.png", "HT/0.png", "HT/1.png"]
    assert {r["class"] for r in rows} == {""}
    back = load_images(out, layout="site")
    assert sorted(back.meta["site"].tolist()) == ["DU", "DU", "HT", "HT"]
    # the exported PNGs are the very images the run generates for that seed and batch
    from collafuse.data import to_uint8
    from collafuse.engines.local import load_run
    run = load_run(runs / "plain", device="cpu")
    images, _ = run.sample("HT", 2, 0)
    exported = load_images(out / "HT", layout="flat")
    order = np.argsort([int(f.split(".")[0]) for f in exported.meta["file"]])
    assert np.array_equal(exported.images[order], to_uint8(images))


@pytest.fixture(scope="module")
def slices(tmp_path_factory):
    """Informative slices of the bundled data by hospital, written as npz files."""
    data = np.load(DEFAULT_DATA)
    images, site = data["images"], data["site"]
    keep = images.reshape(len(images), -1).max(1) > 0  # all-black slices copy one another
    root = tmp_path_factory.mktemp("sets")
    paths = {}
    for name, pick in {"train": site == "DU", "real": site == "CS", "fg": site == "FG"}.items():
        chosen = images[pick & keep]
        chosen = chosen if name == "train" else chosen[:: max(1, len(chosen) // 24)][:24]
        paths[name] = root / f"{name}.npz"
        np.savez(paths[name], images=chosen)
    paths["planted"] = root / "planted.npz"  # real training slices posing as samples
    np.savez(paths["planted"], images=np.load(paths["train"])["images"][::80][:24])
    paths["cache"] = root / "cache"
    return paths


def evaluate(slices, samples, tmp_path, *extra):
    out = tmp_path / "result.json"
    assert main(["evaluate", str(slices[samples]), "--real", str(slices["real"]),
                 "--train", str(slices["train"]), "--json", str(out),
                 "--cache", str(slices["cache"]), *extra]) == 0
    return json.loads(out.read_text())


def test_evaluate_finds_planted_copies_and_not_new_images(slices, tmp_path, capsys):
    planted = evaluate(slices, "planted", tmp_path)
    assert planted["near_copies"] >= 0.9
    assert planted["near_copies_baseline"] <= 0.1
    other = evaluate(slices, "fg", tmp_path)  # another hospital's slices: new images
    assert abs(other["near_copies"] - other["near_copies_baseline"]) <= 0.1
    for key in ("kid", "kid_ci_low", "kid_ci_high", "near_copies", "near_copies_baseline"):
        assert isinstance(other[key], float)
    assert other["kid_ci_low"] <= other["kid"] <= other["kid_ci_high"]
    assert "near-copies of TRAIN" in capsys.readouterr().out


def test_evaluate_kid_is_the_sweeps_kid(slices, tmp_path):
    """The same figures the sweep computes (evaluation/sweep.py: kid with the config's subsets
    and the run seed, kid_bootstrap_interval) on features computed here afresh, uncached."""
    result = evaluate(slices, "fg", tmp_path, "--seed", "0")
    gen = inception_features(np.load(slices["fg"])["images"])
    real = inception_features(np.load(slices["real"])["images"])
    ev = load_config(None).evaluation
    assert result["kid"] == kid(gen, real, num_subsets=ev.kid_subsets,
                                subset_size=ev.kid_subset_size, seed=0)[0]
    assert (result["kid_ci_low"], result["kid_ci_high"]) == kid_bootstrap_interval(gen, real, seed=0)


def test_evaluate_bad_input_is_one_line(slices, tmp_path, capsys):
    bad = tmp_path / "bad.npz"
    bad.write_bytes(b"not a zip")
    assert main(["evaluate", str(bad), "--real", str(slices["real"])]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("collafuse: error:") and "bad.npz" in err and "\n" not in err
    assert main(["evaluate", str(tmp_path / "missing"), "--real", str(slices["real"])]) == 2
    assert "no such file or folder" in capsys.readouterr().err
