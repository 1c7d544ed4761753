"""Configs are validated; the command line reports bad input in one line and writes nothing."""


import numpy as np
import pytest
import torch

from collafuse.cli import main
from collafuse import choices, config, models
from collafuse.config import ConfigError, load_config

from conftest import REPO, tiny_overrides

SHARED_RAW = REPO.parent / "shared/data/lgg-mri/raw-sample"


@pytest.mark.parametrize("name", ["quickstart.toml", "paper.toml", "sweep.toml"])
def test_shipped_configs_load(name):
    if not (REPO / "configs" / name).exists():
        pytest.skip(f"configs/{name} not in this checkout")
    cfg = load_config(REPO / "configs" / name)
    assert load_config(None, []).to_dict().keys() == cfg.to_dict().keys()
    assert cfg.model.preset in models.PRESETS
    assert config.PRESETS is models.PRESETS is choices.PRESETS  # one list of names


# every list of names a config field may take, with the field it belongs to
NAME_LISTS = {"train.protocol": choices.PROTOCOLS, "sample.sampler": choices.SAMPLERS,
              "model.prediction": choices.PREDICTIONS, "train.loss_weighting": choices.LOSS_WEIGHTINGS,
              "train.lr_schedule": choices.LR_SCHEDULES, "model.condition": choices.CONDITIONS,
              "data.intensity": choices.INTENSITIES, "data.partition": choices.PARTITIONS,
              "data.dirichlet_by": choices.DIRICHLET_BY, "model.preset": tuple(choices.PRESETS)}


def test_each_name_list_is_written_once():
    """No module but collafuse/choices.py spells out a list of names (as a tuple, in either
    quoting, or as the "a, b or c" of an error message), nor defines a preset, so the config
    checks, the CLI, the parties and the Flower node cannot drift apart. (data.dirichlet_by's
    "site", "label" are left out: other code names those two image fields together.)"""
    sources = {p: p.read_text() for p in (REPO / "src" / "collafuse").rglob("*.py")
               if p.name != "choices.py"}
    for field, names in NAME_LISTS.items():
        if field == "data.dirichlet_by":
            continue
        spelled = [", ".join(f'"{n}"' for n in names), ", ".join(f"'{n}'" for n in names),
                   choices.expected(names)]
        for text in spelled:
            found = [p.name for p, source in sources.items() if text in source]
            assert not found, f"{field}: {text} written again in {found}"
    found = [p.name for p, source in sources.items() if "Preset(" in source]
    assert not found, f"a preset defined outside choices.py, in {found}"


@pytest.mark.parametrize("field", sorted(NAME_LISTS))
def test_every_named_field_is_checked_when_the_config_loads(field):
    names = NAME_LISTS[field]
    for name in names:  # every name is accepted (classes for a conditional model)
        extra = ['model.classes=["a", "b"]'] if field == "model.condition" else []
        assert config._get(load_config(None, [f"{field}={name}", *extra]), field) == name
    with pytest.raises(ConfigError) as err:
        load_config(None, [f"{field}=nonsense"])
    assert str(err.value) == f"config: {field}: expected {choices.expected(names)}, got 'nonsense'"


def test_cli_and_node_read_the_same_lists():
    from collafuse.cli import _parser
    from collafuse.engines.flower.client_app import Policy

    sample = _parser()._subparsers._group_actions[0].choices["sample"]
    sampler = next(a for a in sample._actions if a.dest == "sampler")
    assert tuple(sampler.choices) == choices.SAMPLERS
    assert Policy.of({}).protocols == choices.PROTOCOLS


@pytest.mark.parametrize("preset", sorted(models.PRESETS))
def test_every_preset_builds_a_noise_predictor(preset):
    model = models.make_unet(preset, 16)
    x_t = torch.randn(2, 1, 16, 16)
    assert models.predict_noise(model, x_t, torch.tensor([0, 9])).shape == x_t.shape


def test_paper_config_has_the_papers_settings():
    cfg = load_config(REPO / "configs/paper.toml")
    assert (cfg.data.image_size, cfg.diffusion.num_timesteps, cfg.train.batch_size,
            cfg.train.lr, cfg.train.epochs) == (128, 100, 150, 1e-3, 300)
    assert cfg.model.prediction == "epsilon" and cfg.model.preset == "paper"
    assert cfg.sweep.cut_ratios == [0.0, 0.2, 0.4, 0.6, 0.8, 1.0]
    assert len(cfg.data.clients) == 3


def test_overrides_are_typed_and_round_trip(tmp_path):
    cfg = load_config(None, ["train.protocol=noisy-data", "train.lr=3e-4",
                             'data.clients=["DU"]', "diffusion.cut_ratio=1"])
    assert cfg.train.protocol == "noisy-data" and cfg.train.lr == 3e-4
    assert cfg.data.clients == ["DU"] and cfg.diffusion.cut_ratio == 1.0
    path = tmp_path / "c.toml"
    path.write_text(cfg.to_toml())
    assert load_config(path).to_dict() == cfg.to_dict()


@pytest.mark.parametrize("override, message", [
    ("train.learning_rate=0.1", r"train\.learning_rate: unknown key"),
    ("trainer.lr=0.1", r"unknown section \[trainer\]"),
    ("train.steps=ten", r"train\.steps: expected int"),
    ("train.steps=1.5", r"train\.steps: expected int"),
    ("diffusion.cut_ratio=1.5", r"diffusion\.cut_ratio: expected a number in \[0, 1\]"),
    ("diffusion.cut_ratio=-0.1", r"diffusion\.cut_ratio"),
    ("train.protocol=secret", r"train\.protocol"),
    ("data.clients=DU", r"data\.clients: expected list\[str\]"),
    ("lr=0.1", r"expected section\.key=value"),
])
def test_bad_config_values_are_rejected(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, [override])


def test_bad_toml_file_names_the_file(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("[train\nlr = ")
    with pytest.raises(ConfigError, match="bad.toml: not valid TOML"):
        load_config(bad)
    with pytest.raises(ConfigError, match="no such config file"):
        load_config(tmp_path / "missing.toml")


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0, err
    return err


def test_cli_bad_input_exits_2_with_one_line_and_no_run_folder(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", str(REPO / "configs/quickstart.toml"), "--out", str(out),
                 "--set", "diffusion.cut_ratio=2"]) == 2
    assert "diffusion.cut_ratio" in one_line_error(capsys)
    assert not out.exists()
    assert main(["train", str(REPO / "configs/quickstart.toml"), "--out", str(out),
                 "--set", f"data.path={tmp_path / 'nothing.npz'}"]) == 2
    assert "nothing.npz" in one_line_error(capsys)
    assert not out.exists()


@pytest.mark.slow
def test_cli_train_sample_and_resume(tmp_path, capsys):
    out = tmp_path / "run"
    args = ["train", str(REPO / "configs/quickstart.toml"), "--out", str(out)]
    for item in tiny_overrides(**{"train.steps": 3}):
        args += ["--set", item]
    assert main(args) == 0
    assert (out / "samples/DU.png").is_file()
    assert main(["sample", str(out), "-n", "2", "--seed", "5", "--out", str(tmp_path / "s")]) == 0
    assert np.load(tmp_path / "s/samples/HT.npz")["images"].shape == (2, 16, 16)
    fast = ["sample", str(out), "-n", "2", "--sampler", "ddim", "--steps", "4", "--out",
            str(tmp_path / "f")]
    assert main(fast) == 0  # 4 model calls instead of 20, split at the same level
    assert not np.array_equal(np.load(tmp_path / "f/samples/HT.npz")["images"],
                              np.load(tmp_path / "s/samples/HT.npz")["images"])
    assert main(args + ["--resume"]) == 0  # a finished run resumes to the same end
    capsys.readouterr()
    assert main(args) == 2  # but is never overwritten
    assert "not empty" in one_line_error(capsys)


def test_cli_data_prepare_and_inspect_on_real_lgg_files(tmp_path, capsys):
    if not SHARED_RAW.is_dir():
        pytest.skip(f"{SHARED_RAW} is missing")
    out = tmp_path / "ez.npz"
    assert main(["data", "prepare", str(SHARED_RAW), str(out), "--size", "32"]) == 0
    data = np.load(out)
    assert data["images"].shape == (24, 32, 32) and set(data["site"]) == {"EZ"}
    capsys.readouterr()
    assert main(["data", "inspect", str(out), "--preview", str(tmp_path / "p.png")]) == 0
    printed = capsys.readouterr().out
    assert "24 images" in printed and "EZ 24" in printed
    assert (tmp_path / "p.png").is_file()
    assert main(["data", "inspect", str(tmp_path / "empty")]) == 2
    assert "empty" in one_line_error(capsys)
