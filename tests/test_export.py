"""collafuse export and collafuse.pipeline: the exported models sample what the run samples.

Bit for bit on the CPU: the pipeline chains the exported UNets through the run's own Server and
client half (Server.generate, client.finish_chain), each party with its own stream.
"""

import json

import numpy as np
import pytest
import torch
from diffusers import DDPMScheduler, UNet2DModel

from collafuse.cli import main
from collafuse.data import to_uint8
from collafuse.diffusion import make_scheduler
from collafuse.engines.local import SECRETS, load_run, run_training
from collafuse.export import export_run
from collafuse.factory import make_server
from collafuse.messages import SampleRequest
from collafuse.pipeline import CollaFusePipeline, ExportError

# a second client with a cut and a UNet of its own; EMA weights; v-prediction; a skipping sampler
HETEROGENEOUS = {"train.ema_decay": 0.9, "model.prediction": '"v"', "sample.steps": 8,
                 "clients.HT.cut_ratio": 0.3, "clients.HT.preset": '"lean"',
                 "train.steps": 4}


pytestmark = pytest.mark.slow  # every test trains a run first (module fixture or its own)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A finished tiny run and its export."""
    from conftest import tiny_overrides
    from collafuse.config import load_config

    root = tmp_path_factory.mktemp("export")
    cfg = load_config(None, tiny_overrides(**HETEROGENEOUS))
    run_training(cfg, root / "run", progress=False)
    export_run(root / "run", root / "out")
    return root / "run", root / "out"


def test_pipeline_samples_equal_the_runs_split_sampling(exported):
    run_dir, out = exported
    run = load_run(run_dir)
    pipe = CollaFusePipeline.from_pretrained(out)
    assert pipe.clients == ["DU", "HT"]
    for cid in pipe.clients:
        images, handover = run.sample(cid, 3, seed=11)
        assert torch.equal(pipe(cid, 3, seed=11), images), cid
        assert torch.equal(pipe.handover(cid, 3, seed=11).x, handover), cid
        # another seed gives other images (the seed reaches both halves)
        assert not torch.equal(pipe(cid, 3, seed=12), images)
        # the defaults are the run's sample section: the grids `collafuse train` wrote
        with np.load(run_dir / "samples" / f"{cid}.npz") as saved:
            assert np.array_equal(to_uint8(pipe(cid)), saved["images"])


def test_each_unet_loads_alone_with_diffusers(exported):
    run_dir, out = exported
    state = torch.load(run_dir / "checkpoint.pt", weights_only=True)
    parties = {"server": state["server"], **{f"clients/{c}": s for c, s in state["clients"].items()}}
    for folder, party in parties.items():
        assert (out / folder / "diffusion_pytorch_model.safetensors").is_file()
        unet = UNet2DModel.from_pretrained(out / folder, low_cpu_mem_usage=False)
        ema = party["ema"]["model"]  # sampling runs the EMA weights, so they are exported
        for name, value in unet.state_dict().items():
            assert torch.equal(value, ema[name]), (folder, name)
        assert not all(torch.equal(ema[n], party["model"][n]) for n in ema)
    lean = UNet2DModel.from_pretrained(out / "clients/HT", low_cpu_mem_usage=False)
    assert lean.config.layers_per_block == 1  # HT's own preset
    scheduler = DDPMScheduler.from_pretrained(out / "scheduler")
    assert scheduler.config.beta_schedule == "squaredcos_cap_v2"
    assert scheduler.config.prediction_type == "v_prediction"
    assert torch.equal(scheduler.alphas_cumprod, make_scheduler(20).alphas_cumprod)
    info = json.loads((out / "collafuse.json").read_text())
    assert {c: v["cut_index"] for c, v in info["clients"].items()} == {"DU": 10, "HT": 6}
    assert info["weights"] == "ema" and info["prediction"] == "v"


def test_no_secret_and_no_image_in_the_export(exported):
    run_dir, out = exported
    exported_bytes = b"".join(p.read_bytes() for p in out.rglob("*") if p.is_file())
    for key in (run_dir / SECRETS).iterdir():
        assert key.read_bytes() not in exported_bytes
    names = {p.name for p in out.rglob("*")}
    assert not names & {"checkpoint.pt", "config.toml", "samples", SECRETS}
    assert "secret" not in (out / "collafuse.json").read_text()


def test_model_card_names_data_protocol_and_quality(exported, tmp_path):
    run_dir, out = exported
    card = (out / "README.md").read_text()
    for needed in ("lgg_flair_32.npz", "Buda M", "Bakas S", "shared-noise",
                   "recover each such image exactly", "Not measured", "DU 48, HT 48",
                   "t < 6 (cut ratio 0.3)", "Not for diagnosis"):
        assert needed in card, needed
    # a run measured by benchmarks/quality.py: the card reports its KID and floor
    (run_dir / "quality.json").write_text(json.dumps({
        "num_samples": 300, "sampler": "ddpm", "weights": "ema",
        "clients": [{"client": "DU", "kid_holdout": 0.0312}, {"client": "HT", "kid_holdout": 0.0451}],
        "all_clients": {"kid_holdout": 0.0298}, "floor": [{"name": "floor DU", "kid_holdout": 0.0074}]}))
    try:
        export_run(run_dir, tmp_path / "measured")
    finally:
        (run_dir / "quality.json").unlink()
    card = (tmp_path / "measured" / "README.md").read_text()
    assert "| client DU | 0.0312 |" in card and "| floor DU (real training images) | 0.0074 |" in card
    assert "Not measured" not in card


def test_noisy_data_card_says_the_server_never_saw_the_noise(tiny_config, tmp_path):
    cfg = tiny_config(**{"train.protocol": '"noisy-data"', "train.steps": 1})
    run_training(cfg, tmp_path / "run", progress=False)
    export_run(tmp_path / "run", tmp_path / "out")
    card = (tmp_path / "out" / "README.md").read_text()
    assert "**noisy-data**" in card and "never saw a clean image" in card
    assert "recover each such image" not in card


def test_conditional_export_samples_the_runs_classes(tmp_path):
    """model.condition = "both": the request carries the classes, both halves are guided."""
    from test_conditional import config

    data = tmp_path / "two.npz"
    rng = np.random.default_rng(0)
    x = np.full((64, 8, 8), 30.0)
    x[:32, :, :4] = 220.0
    x[32:, :, 4:] = 220.0
    np.savez(data, images=np.clip(x + rng.normal(0, 12, x.shape), 0, 255).astype(np.uint8),
             site=np.array(["S1", "S2"] * 32), label=np.array(["left"] * 32 + ["right"] * 32))
    cfg = config(data, "both", **{"train.steps": 3})
    run_training(cfg, tmp_path / "run", progress=False)
    export_run(tmp_path / "run", tmp_path / "out")
    run, pipe = load_run(tmp_path / "run"), CollaFusePipeline.from_pretrained(tmp_path / "out")
    labels = run.labels_for(4, "right")
    images, _ = run.sample("S1", 4, seed=5, labels=labels)
    assert torch.equal(pipe("S1", 4, seed=5, label="right"), images)
    assert not torch.equal(pipe("S1", 4, seed=5, label="left"), images)


def test_flower_server_run_exports_its_server_alone(tiny_config, tmp_path):
    """A Flower server's run folder (config.toml, server.pt) holds no client model."""
    from collafuse.engines.flower.server_app import Settings, resume, save

    cfg = tiny_config()
    server = make_server(cfg)
    settings = Settings.of({"run-dir": str(tmp_path / "flower")}, cfg)
    progress = resume(server, settings, cfg.to_toml())
    save(server, {**progress, "round": 0}, settings.run_dir)
    info = export_run(settings.run_dir, tmp_path / "out")
    assert not (tmp_path / "out" / "clients").exists()
    assert {c: v["exported"] for c, v in info["clients"].items()} == {"DU": False, "HT": False}
    assert "No client model" in (tmp_path / "out" / "README.md").read_text()
    pipe = CollaFusePipeline.from_pretrained(tmp_path / "out")
    handover = pipe.handover("DU", 2, seed=4)
    # the run's server (here: as made, round 0) gives the same hand-over
    want = make_server(cfg).generate(SampleRequest(client_id="DU", num_samples=2, seed=4,
                                                   sampler=cfg.sample.sampler, steps=cfg.sample.steps))
    assert torch.equal(handover.x, want.x)
    with pytest.raises(ValueError, match="holds no model of it"):
        pipe("DU", 2)


def test_bad_input_is_one_line(exported, tmp_path, capsys):
    run_dir, _ = exported
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("mine")
    cases = {(str(tmp_path), str(tmp_path / "o1")): "not a run folder",
             (str(tmp_path / "missing"), str(tmp_path / "o2")): "no such folder",
             (str(run_dir), str(tmp_path / "full")): "not an empty folder"}
    for (src, out), why in cases.items():
        assert main(["export", src, out]) == 2
        err = capsys.readouterr().err
        assert why in err and err.count("\n") == 1, err
    assert [p.name for p in (tmp_path / "full").iterdir()] == ["keep.txt"]  # untouched
    assert not list(tmp_path.glob(".o*.tmp")) and not (tmp_path / "o1").exists()
    with pytest.raises(ExportError, match="not a CollaFuse export"):
        CollaFusePipeline.from_pretrained(run_dir)
