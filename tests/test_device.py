"""Where a run computes: the CPU path stays bit for bit what it was before the device option."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
import torch

from collafuse.engines.local import run_training

SECRETS = {"DU": bytes(range(32)), "HT": bytes(range(32, 64))}

# sha256 of a tiny run's party states (every tensor and value of the server's and the clients'
# checkpoint entries) and its sample grids, recorded with the code of main at fc33582, before the
# device option existed: the run of golden_run below, one CPU thread, torch 2.13.0+cpu, on this
# project's 2-core AMD EPYC machines (AVX512). Other processors, thread counts or torch versions
# may round differently: there the exact check is skipped and the losses must agree to 1e-5.
GOLDEN_PLATFORM = ("2.13", "AVX512")
GOLDEN = {
    "shared-noise": ("7d9656d78f69671a8c2e2c3b76abff4c8b338ecdd82e191c23c9b68fd4393362",
                     0.2842714786529541, {"DU": 0.5639122128486633, "HT": 0.5112545490264893}),
    "noisy-data": ("b6b970e4fa1956669e37a2cc4b5db5d74eba7240f71d7cbd3f4641e48724f148",
                   0.5121107697486877, {"DU": 0.5639122128486633, "HT": 0.5112545490264893}),
}


def digest(obj, h, path: str = "") -> None:
    """Feed every tensor (dtype, shape, bytes) and plain value of a nested state into h."""
    if isinstance(obj, dict):
        for key in sorted(obj, key=str):
            digest(obj[key], h, f"{path}/{key}")
    elif isinstance(obj, (list, tuple)):
        for i, value in enumerate(obj):
            digest(value, h, f"{path}/{i}")
    elif isinstance(obj, torch.Tensor):
        t = obj.detach().cpu().contiguous()
        h.update(f"{path}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.numpy().tobytes())
    else:
        h.update(f"{path}={obj!r}".encode())


def golden_run(tiny_config, out: Path, protocol: str, **extra):
    """3 rounds of 2 batches with EMA, then sampling; (sha256, server loss, client losses)."""
    cfg = tiny_config(**{"train.protocol": f'"{protocol}"', "train.ema_decay": 0.9,
                         "train.batches_per_round": 2, **extra})
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the thread count changes how CPU kernels split their sums
    try:
        run = run_training(cfg, out, progress=False, secrets=SECRETS)
    finally:
        torch.set_num_threads(threads)
    state = run.state_dict()
    h = hashlib.sha256()
    digest({"server": state["server"], "clients": state["clients"], "round": state["round"]}, h)
    for cid in ("DU", "HT"):
        samples = np.load(out / "samples" / f"{cid}.npz")
        h.update(samples["images"].tobytes())
        h.update(samples["handover"].tobytes())
    return h.hexdigest(), run.server.last_loss, {c: x.last_loss for c, x in run.clients.items()}


def _on_golden_platform() -> bool:
    version = ".".join(torch.__version__.split(".")[:2])
    return (version, torch.backends.cpu.get_cpu_capability()) == GOLDEN_PLATFORM


@pytest.mark.parametrize("protocol", list(GOLDEN))
def test_cpu_run_is_bit_identical_to_before_the_device_option(tiny_config, tmp_path, protocol):
    sha, server_loss, client_losses = golden_run(tiny_config, tmp_path / "r", protocol,
                                                 **{"run.device": '"cpu"'})
    want_sha, want_server, want_clients = GOLDEN[protocol]
    assert server_loss == pytest.approx(want_server, rel=1e-5)
    assert client_losses == pytest.approx(want_clients, rel=1e-5)
    if _on_golden_platform():
        assert sha == want_sha
