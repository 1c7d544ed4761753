"""Every command on bad and odd input: exit status 2 and one line on stderr, never a traceback;
and a folder of mixed-size images in class subfolders prepares, inspects and trains."""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from collafuse.cli import main

from conftest import DEFAULT_DATA, REPO

TINY_RUN = [  # the tiny preset on an image folder: trains in a few seconds
    "model.preset=tiny", "data.image_size=16", "diffusion.num_timesteps=10", "train.steps=2",
    "train.batch_size=4", "sample.num_samples=2", "data.partition=iid", "data.holdout_sites=[]",
    "data.min_images_per_client=2",  # the folder holds 18 images for 3 clients
]


def sets(*overrides: str) -> list[str]:
    return [arg for item in overrides for arg in ("--set", item)]


def mri_folder(root: Path, per_class: int = 6) -> Path:
    """What a new user downloads: JPEGs of mixed sizes (and modes) in class subfolders, with a
    stray non-image file and macOS debris."""
    rng = np.random.default_rng(0)
    for label in ("glioma", "meningioma", "no_tumor"):
        (root / label).mkdir(parents=True)
        for i in range(per_class):
            h, w = rng.integers(20, 70, 2)
            pixels = rng.integers(0, 256, (h, w) if i % 3 else (h, w, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / label / f"{label}_{i}.jpg")
    (root / "README.txt").write_text("Brain MRI, 3 classes")
    (root / "glioma/._glioma_0.jpg").write_bytes(b"\x00\x05\x16\x07 resource fork")
    return root


@pytest.fixture(scope="module")
def bad_inputs(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("bad")
    (root / "empty").mkdir()
    (root / "notes.txt").write_text("not an image")
    (root / "corrupt.npz").write_bytes(b"PK\x03\x04 truncated zip")
    (root / "broken").mkdir()
    (root / "broken/scan.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a JPEG")
    (root / "not-a-run").mkdir()
    (root / "not-a-run/notes.txt").write_text("hello")
    (root / "bad-checkpoint").mkdir()
    from collafuse.config import load_config

    cfg = load_config(None, [f'data.path="{DEFAULT_DATA}"', *TINY_RUN, "data.partition=site",
                             'data.clients=["DU"]'])
    (root / "bad-checkpoint/config.toml").write_text(cfg.to_toml())
    (root / "bad-checkpoint/checkpoint.pt").write_bytes(b"not a checkpoint")
    (root / "bad.toml").write_text("[train\nsteps = ")
    mri_folder(root / "mri")
    return root


QUICKSTART = str(REPO / "configs/quickstart.toml")

# (command line with {d} for the bad-inputs folder, a word the one error line must contain).
# Each command once as a real process (the entry point, imports, argparse); the other cases
# in-process through main(), which is the same code without the seconds of a fresh import.
IN_A_PROCESS = {
    "train: missing config": (["train", "{d}/missing.toml"], "no such config file"),
    "train: image folder, default partition by site": (
        ["train", QUICKSTART, *sets("data.path={d}/mri")], "needs a site per image"),
    "sweep: unknown key": (["sweep", QUICKSTART, "--set", "sweep.cuts=[0.5]"], "unknown key"),
    "sample: not a run folder": (["sample", "{d}/not-a-run"], "config.toml"),
    "audit: empty folder": (["audit", "{d}/empty"], "empty"),
    "prepare: corrupt image": (["data", "prepare", "{d}/broken", "{d}/o.npz"],
                               "scan.jpg: not a readable image"),
    "prepare: usage error": (["data", "prepare", "{d}/mri"], "the following arguments are required"),
    "inspect: non-image file": (["data", "inspect", "{d}/notes.txt"], "unsupported file type"),
}
IN_PROCESS = {
    "train: config not TOML": (["train", "{d}/bad.toml"], "not valid TOML"),
    "train: bad --set": (["train", QUICKSTART, "--set", "train.steps=ten"], "train.steps"),
    "train: data is a text file": (["train", QUICKSTART, *sets("data.path={d}/notes.txt")],
                                   "unsupported file type"),
    "train: corrupt npz": (["train", QUICKSTART, *sets("data.path={d}/corrupt.npz")],
                           "not a readable .npz"),
    "sample: damaged checkpoint": (["sample", "{d}/bad-checkpoint"], "checkpoint.pt"),
    "sample: one step": (["sample", "{d}/bad-checkpoint", "--steps", "1"], "--steps"),
    "audit: bad -n": (["audit", "{d}/not-a-run", "-n", "0"], "--num-images"),
    "audit: no reference": (["audit", "{d}/not-a-run", "--reference-models", "0"],
                            "--reference-models"),
    "prepare: missing source": (["data", "prepare", "{d}/nothing", "{d}/o.npz"], "no such file"),
    "prepare: empty folder": (["data", "prepare", "{d}/empty", "{d}/o.npz"], "no readable images"),
    "prepare: output not .npz": (["data", "prepare", "{d}/mri", "{d}/o.png"], "expected a .npz"),
    "prepare: bad --size": (["data", "prepare", "{d}/mri", "{d}/o.npz", "--size", "0"],
                            "image_size must be a positive int"),
    "inspect: layout too deep": (["data", "inspect", "{d}/mri", "--layout", "site/class"],
                                 "expects every image at least 2 folder(s)"),
    "inspect: unknown layout": (["data", "inspect", "{d}/mri", "--layout", "hospital"],
                                "layout 'hospital'"),
    "inspect: layout for an npz": (["data", "inspect", "{d}/corrupt.npz", "--layout", "site"],
                                   "applies to folders of images only"),
}


def assert_one_line_error(status: int, stderr: str, expected: str, folder: Path) -> None:
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert status == 2, stderr
    assert "Traceback" not in stderr
    assert len(lines) == 1, stderr
    assert "error:" in lines[0] and "internal error" not in lines[0], lines[0]
    assert expected in lines[0], lines[0]
    assert not (folder / "runs").exists()  # nothing written on bad input


@pytest.mark.slow  # a fresh Python process per case, each importing torch (about 6 CPU-s)
@pytest.mark.parametrize("name", list(IN_A_PROCESS))
def test_bad_input_is_one_line(name, bad_inputs):
    argv, expected = IN_A_PROCESS[name]
    argv = [a.replace("{d}", str(bad_inputs)) for a in argv]
    env = {**os.environ, "COLLAFUSE_TRACEBACK": ""}
    done = subprocess.run([sys.executable, "-m", "collafuse.cli", *argv], cwd=bad_inputs,
                          capture_output=True, text=True, timeout=120, env=env)
    assert_one_line_error(done.returncode, done.stderr, expected, bad_inputs)


@pytest.mark.parametrize("name", list(IN_PROCESS))
def test_bad_input_is_one_line_in_process(name, bad_inputs, capsys, monkeypatch):
    argv, expected = IN_PROCESS[name]
    monkeypatch.chdir(bad_inputs)
    status = main([a.replace("{d}", str(bad_inputs)) for a in argv])
    assert_one_line_error(status, capsys.readouterr().err, expected, bad_inputs)


def test_unexpected_errors_are_one_line_too(monkeypatch, capsys):
    import collafuse.cli as cli

    def boom(args):
        raise RuntimeError("first\n  second")

    monkeypatch.setattr(cli, "_data_prepare", boom)
    assert main(["data", "prepare", "x", "y.npz"]) == 1
    assert capsys.readouterr().err.strip().splitlines() == [
        "collafuse: internal error: RuntimeError: first; second (set COLLAFUSE_TRACEBACK=1 to see where)"]


def test_mixed_size_folder_prepares_and_inspects(tmp_path, capsys):
    folder = mri_folder(tmp_path / "mri")
    assert main(["data", "prepare", str(folder), str(tmp_path / "mri.npz"), "--size", "32"]) == 0
    out = capsys.readouterr().out
    assert "18 images of 32x32" in out and "layout class (auto:" in out
    with np.load(tmp_path / "mri.npz") as npz:
        assert npz["images"].shape == (18, 32, 32)
        assert npz["file"][0] == "glioma/glioma_0.jpg" and set(npz["label"]) == {
            "glioma", "meningioma", "no_tumor"}
    assert main(["data", "inspect", str(folder), "--preview", str(tmp_path / "p.png")]) == 0
    out = capsys.readouterr().out
    assert "layout class (auto:" in out
    sizes = {Image.open(f).size for f in folder.glob("*/[!.]*.jpg")}
    widths, heights = sorted(w for w, _ in sizes), sorted(h for _, h in sizes)
    assert (f"sizes: {len(sizes)} different, width {widths[0]}-{widths[-1]} px, height "
            f"{heights[0]}-{heights[-1]} px") in out
    assert "(64, 64), center-cropped and resized to 64x64" in out
    assert "label: 3 distinct (glioma 6, meningioma 6, no_tumor 6)" in out
    assert "patient: none; each image counts as its own patient" in out
    assert Image.open(tmp_path / "p.png").size == (8 * 66 + 2, 3 * 66 + 2)
    assert main(["data", "inspect", str(folder), "--layout", "site", "--size", "16"]) == 0
    assert "site: 3 distinct (glioma 6," in capsys.readouterr().out


@pytest.mark.parametrize("holdout", [[], ["data.holdout_fraction=0.2"]])
def test_train_on_an_image_folder(holdout, tmp_path, capsys):
    folder = mri_folder(tmp_path / "mri")
    out = tmp_path / "run"
    argv = ["train", QUICKSTART, "--out", str(out), *sets(f"data.path={folder}", *TINY_RUN, *holdout)]
    assert main(argv) == 0, capsys.readouterr().err
    # quickstart.toml also holds out a fifth of each client's patients: here single images
    assert "each image counts as its own patient" in capsys.readouterr().err
    for cid in ("client0", "client1", "client2"):
        assert (out / "samples" / f"{cid}.png").is_file()


def test_config_layout_reaches_the_loader(tmp_path, capsys):
    folder = mri_folder(tmp_path / "mri")
    argv = ["data", "inspect", str(folder), "--size", "16", "--config", QUICKSTART,
            *sets("data.layout=site", 'data.clients=["glioma", "no_tumor"]', "data.holdout_sites=[]",
                  "data.min_images_per_client=2")]
    assert main(argv) == 0, capsys.readouterr().err
    out = capsys.readouterr().out
    assert "client glioma: " in out and "client no_tumor: " in out
