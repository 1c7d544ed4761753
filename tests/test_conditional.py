"""Class-conditional generation with classifier-free guidance (model.condition), tiny preset.

Two synthetic classes that no unconditional model could tell apart by chance: "left" slices are
bright on the left half and dark on the right, "right" slices the mirror image. Two hospitals
hold both classes.
"""

import json

import numpy as np
import pytest
import torch
from conftest import record_server_traffic

from collafuse.config import ConfigError, load_config
from collafuse.diffusion import guided_noise
from collafuse.engines.local import Run, load_run, run_training
from collafuse.messages import MessageError, NoisedBatch, SampleRequest, decode, encode

CLASSES = '["left", "right"]'


@pytest.fixture(scope="module")
def two_classes(tmp_path_factory):
    """64 images per class and hospital, 8x8, each with noise of its own."""
    rng = np.random.default_rng(0)
    images, site, label = [], [], []
    for hospital in ("S1", "S2"):
        for name in ("left", "right"):
            x = np.full((64, 8, 8), 30.0)
            x[:, :, :4] = 220.0
            if name == "right":
                x = x[:, :, ::-1]
            images.append(x + rng.normal(0, 12, x.shape))
            site += [hospital] * 64
            label += [name] * 64
    path = tmp_path_factory.mktemp("data") / "two_classes.npz"
    np.savez(path, images=np.clip(np.concatenate(images), 0, 255).astype(np.uint8),
             site=np.array(site), label=np.array(label))
    return path


def config(data, condition, **extra):
    values = {"data.path": f'"{data}"', "data.image_size": 8, "data.clients": '["S1", "S2"]',
              "data.holdout_sites": "[]", "diffusion.num_timesteps": 20,
              "diffusion.cut_ratio": 0.5, "model.preset": '"tiny"',
              "model.condition": f'"{condition}"', "model.classes": CLASSES,
              "train.batch_size": 32, "train.lr": 3e-3, "train.steps": 100,
              "train.checkpoint_every": 200, "sample.num_samples": 4, "sample.seed": 7,
              "run.device": '"cpu"', **extra}
    return load_config(None, [f"{k}={v}" for k, v in values.items()])


def side(images: torch.Tensor) -> torch.Tensor:
    """+1 where an image's left half is the brighter, -1 where its right half is."""
    half = images.shape[-1] // 2
    return torch.sign(images[..., :half].mean((1, 2, 3)) - images[..., half:].mean((1, 2, 3)))


# Client-only conditioning steers only the client's steps, so it needs a high cut: at c = 0.5
# the server's unconditional hand-over has mostly chosen the class (measured: 33-100% right).
@pytest.fixture(scope="module", params=[("both", 0.5), ("client", 0.8)], ids=["both", "client"])
def trained(request, two_classes):
    condition, cut_ratio = request.param
    cfg = config(two_classes, condition, **{"diffusion.cut_ratio": cut_ratio})
    run = Run(cfg)
    seen = record_server_traffic(run)
    for _ in range(cfg.train.steps):
        run.train_round()
    return condition, run, seen


@pytest.mark.slow  # the trained fixture: 100 rounds per placement
def test_each_class_on_request(trained):
    """Asked for "left" or "right", both parties' halves together give that class (the class
    means of the samples point the right way in nearly every sample), where the conditional
    model's own no-label samples come out of both classes."""
    condition, run, _ = trained
    for cid in run.clients:
        for name, sign in (("left", 1), ("right", -1)):
            images, _ = run.sample(cid, 24, seed=3, labels=run.labels_for(24, name))
            agree = (side(images) == sign).float().mean().item()
            assert agree >= 0.8, (condition, cid, name, agree)
    images, _ = run.sample("S1", 48, seed=5)  # no label at all: the unconditional model
    assert 0.15 < (side(images) == 1).float().mean().item() < 0.85, condition


@pytest.mark.slow
def test_labels_reach_the_server_only_when_it_is_conditional(trained):
    condition, run, seen = trained
    run.sample("S1", 4, seed=1, labels=run.labels_for(4, "right"))
    requests = [m for m in seen if isinstance(m, SampleRequest)]
    batches = [m for m in seen if isinstance(m, NoisedBatch)]
    assert requests and len(batches) > 100
    if condition == "client":
        # on the wire: no labels array, and the header says none
        for m in batches + requests:
            arrays = encode(m)
            assert m.labels is None and "labels" not in arrays
            assert "labels" not in json.loads(bytes(arrays["header"]).decode())
        assert all(r.guidance_scale == 1.0 for r in requests)
        return
    assert all(m.labels is not None for m in batches)
    assert requests[-1].labels.tolist() == [1, 1, 1, 1]
    # each label belongs to the image sent with it: the server's own x0 = (x_t - b eps) / a
    for m in batches[-20:]:
        abar = run.server.scheduler.alphas_cumprod[m.t].view(-1, 1, 1, 1)
        x0 = (m.x_t - (1 - abar).sqrt() * m.eps) / abar.sqrt()
        assert torch.equal(side(x0), 1 - 2 * m.labels.float())


def test_server_refuses_labels_it_cannot_use(two_classes):
    uncond = Run(config(two_classes, "client", **{"train.steps": 1}))
    (msg,) = uncond.clients["S1"].train_round()
    with_labels = NoisedBatch(client_id="S1", x_t=msg.x_t, t=msg.t, eps=msg.eps,
                              labels=torch.zeros(len(msg.t), dtype=torch.long))
    with pytest.raises(MessageError, match="unconditional"):
        uncond.server.check(with_labels)
    with pytest.raises(MessageError, match="unconditional"):
        uncond.server.generate(SampleRequest(client_id="S1", num_samples=2, seed=0,
                                             labels=torch.zeros(2, dtype=torch.long)))
    cond = Run(config(two_classes, "both", **{"train.steps": 1}))
    (msg,) = cond.clients["S1"].train_round()
    n = len(msg.t)
    for bad, reason in [(torch.full((n,), 2), "outside"), (torch.full((n,), -1), "outside"),
                        (torch.zeros(n, dtype=torch.int32), "int64"),
                        (torch.zeros(n + 1, dtype=torch.long), "shape")]:
        crafted = NoisedBatch(client_id="S1", x_t=msg.x_t, t=msg.t, eps=msg.eps, labels=bad)
        with pytest.raises(MessageError):
            cond.server.check(decode(encode(crafted)))
    arrays = encode(msg)  # a header that names labels as a JSON list instead of an array
    header = json.loads(bytes(arrays["header"]).decode())
    header["labels"] = [0] * n
    arrays.pop("labels")
    arrays["header"] = np.frombuffer(json.dumps(header).encode(), dtype=np.uint8)
    with pytest.raises(MessageError, match="int64"):
        cond.server.check(decode(arrays))
    for scale in (float("nan"), -1.0, True, "2"):
        with pytest.raises(MessageError, match="guidance_scale"):
            cond.server.generate(SampleRequest(client_id="S1", num_samples=2, seed=0,
                                               guidance_scale=scale))


def test_guidance_and_label_dropout():
    cond, uncond = torch.tensor([1.0, 3.0]), torch.tensor([0.5, 1.0])
    assert torch.equal(guided_noise(cond, uncond, 1.0), cond)
    assert torch.equal(guided_noise(cond, uncond, 0.0), uncond)
    assert torch.allclose(guided_noise(cond, uncond, 3.0), torch.tensor([2.0, 7.0]))


def test_local_steps_train_with_the_images_labels(two_classes):
    """A conditional client's extra steps on its own levels (train.local_steps) see each image's
    own class, or the null class where label dropout drew it."""
    run = Run(config(two_classes, "client", **{"train.local_steps": 2,
                                               "train.local_batch_size": 6}))
    client = run.clients["S1"]
    seen = []
    client.model.register_forward_pre_hook(
        lambda module, args, kwargs: seen.append((args[0], kwargs["class_labels"]))
        if torch.is_grad_enabled() else None, with_kwargs=True)
    run.train_round()
    (_, _), (x_t, labels) = seen
    assert x_t.shape[0] == labels.shape[0] == 6
    null = client.num_classes
    right = side(x_t) == -1  # at the client's low noise levels the bright half still shows
    named = labels != null
    assert named.any() and torch.equal(labels[named], right[named].long())


def test_label_dropout_rate(two_classes):
    run = Run(config(two_classes, "both", **{"model.label_dropout": 0.25, "train.steps": 1}))
    dropped = run.server._drop_labels(torch.zeros(20_000, dtype=torch.long))
    assert set(dropped.unique().tolist()) == {0, 2}  # 2: the null class of two classes
    assert abs((dropped == 2).float().mean().item() - 0.25) < 0.015


def test_run_folder_and_sample_command(two_classes, tmp_path, capsys):
    from collafuse.cli import main

    cfg = config(two_classes, "client", **{"train.steps": 4})
    run_training(cfg, tmp_path / "run", progress=False)
    saved = np.load(tmp_path / "run/samples/S1.npz")
    assert saved["labels"].tolist() == ["left", "left", "right", "right"]
    main(["sample", str(tmp_path / "run"), "-n", "3", "--label", "right", "--device", "cpu"])
    assert np.load(tmp_path / "run/samples/S2.npz")["labels"].tolist() == ["right"] * 3
    assert main(["sample", str(tmp_path / "run"), "--label", "up"]) != 0
    assert "expected one of model.classes" in capsys.readouterr().err
    assert load_run(tmp_path / "run").cfg.model.condition == "client"


def test_config_checks(two_classes):
    with pytest.raises(ConfigError, match="model.classes"):
        load_config(None, ['model.condition="both"'])
    with pytest.raises(ConfigError, match="model.condition"):
        load_config(None, ['model.condition="server"'])
    with pytest.raises(ConfigError, match="sample.label"):
        load_config(None, ['model.condition="both"', f"model.classes={CLASSES}",
                           'sample.label="up"'])
    from collafuse.data import DataError

    with pytest.raises(DataError, match="lacks the data's class 'right'"):
        Run(config(two_classes, "both", **{"model.classes": '["left", "up"]'}))


def test_lgg_tumour_labels():
    from collafuse.data import load_images
    from conftest import DEFAULT_DATA

    images = load_images(DEFAULT_DATA, image_size=32)
    names = images.class_names()
    assert set(names) == {"tumour", "no-tumour"}
    assert np.array_equal(names == "tumour", images.meta["tumor_pixels"] > 0)
    assert 0.2 < (names == "tumour").mean() < 0.5
