"""Shared fixtures: small real data and tiny configs."""

from pathlib import Path

import pytest
import torch

from collafuse.config import load_config
from collafuse.device import enlarge_cpu_kernel_cache

# Tests compare runs bit for bit; on a GPU machine (run.device = "auto" trains there) that needs
# cuDNN's deterministic kernels, and the plain attention kernel (the fused ones may accumulate
# gradients in a varying order). No effect on the CPU.
torch.backends.cudnn.deterministic = True
enlarge_cpu_kernel_cache()  # as the collafuse command does: the split meets many batch sizes
if torch.cuda.is_available():
    for fused_attention in ("flash", "mem_efficient", "cudnn"):
        getattr(torch.backends.cuda, f"enable_{fused_attention}_sdp")(False)

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO / "data" / "lgg_flair_32.npz"


def tiny_overrides(**extra) -> list[str]:
    """A two-hospital run of the tiny preset at 16x16 that trains in seconds."""
    values = {
        "data.path": f'"{DEFAULT_DATA}"',
        "data.image_size": 16,
        "data.clients": '["DU", "HT"]',
        "data.max_images_per_client": 48,
        "diffusion.num_timesteps": 20,
        "diffusion.cut_ratio": 0.5,
        "model.preset": '"tiny"',
        "train.batch_size": 16,
        "train.steps": 6,
        "train.checkpoint_every": 2,
        "sample.num_samples": 4,
        **extra,
    }
    return [f"{k}={v}" for k, v in values.items()]


@pytest.fixture
def tiny_config():
    def make(**extra):
        return load_config(None, tiny_overrides(**extra))
    return make


def record_server_traffic(run) -> list:
    """Every message that reaches the server of ``run``, as it arrives."""
    seen = []
    train_step, generate = run.server.train_step, run.server.generate

    def spy_train(messages):
        seen.extend(messages)
        return train_step(messages)

    def spy_generate(request, on_step=None):
        seen.append(request)
        return generate(request, on_step)

    run.server.train_step, run.server.generate = spy_train, spy_generate
    return seen
