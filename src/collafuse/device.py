"""Where a party computes: ``run.device`` turned into a torch device and what goes with it.

The one place that knows devices (docs/design.md section 5): parties ask it for their device, their
random generators and the precision of their model calls; the math and the protocols never do.
On the CPU everything here is the identity, so a CPU run computes bit for bit what it did
before devices existed. On CUDA a model call runs in bf16 autocast on channels_last tensors with
TF32 matmuls (weights, optimiser and losses stay fp32). This module imports nothing from
collafuse, so every layer may use it.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

import torch

# oneDNN, which runs the CPU's convolutions, compiles a kernel per layer, direction and batch
# size and caches 1024 of them. A CollaFuse party meets a new batch size at most steps (how many
# images of a batch fall on each side of the cut is random), about 90 kernels per size for the
# small UNet, so the default cache thrashes and every round recompiles hundreds of kernels while
# a plain loop's fixed batch compiles once. 8192 holds the sizes a quickstart run meets (about
# 5,000 kernels, about 1 GB more memory); the kernels, and so every number, stay the same.
CPU_KERNEL_CACHE = "8192"


def enlarge_cpu_kernel_cache() -> None:
    """Raise oneDNN's kernel cache (a value the user set wins). It is read when the first
    kernel is made: call this before any convolution runs."""
    os.environ.setdefault("ONEDNN_PRIMITIVE_CACHE_CAPACITY", CPU_KERNEL_CACHE)


class DeviceError(ValueError):
    """A device that does not exist on this machine (one-line reason)."""


def resolve_device(name: str = "auto") -> torch.device:
    """"auto" -> cuda if available, else cpu; "cuda" -> the current CUDA device, with its index
    (tensors always report one, and generators and caches key on it)."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError:
        raise DeviceError(f"run.device: expected auto, cpu, cuda, cuda:N or mps, got {name!r}") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise DeviceError(f"run.device: {name!r}, but this PyTorch ({torch.__version__}) sees no "
                              "CUDA device; use --device cpu")
        index = torch.cuda.current_device() if device.index is None else device.index
        if index >= torch.cuda.device_count():
            raise DeviceError(f"run.device: {name!r}, but this machine has "
                              f"{torch.cuda.device_count()} CUDA device(s)")
        return torch.device("cuda", index)
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise DeviceError(f"run.device: {name!r}, but this machine has no MPS device; use --device cpu")
    if device.type not in ("cpu", "mps"):
        raise DeviceError(f"run.device: expected auto, cpu, cuda, cuda:N or mps, got {name!r}")
    return device


def _allow_tf32() -> None:
    # torch >= 2.9 has the per-backend precision settings and warns on the old flags
    if hasattr(torch.backends.cuda.matmul, "fp32_precision"):
        torch.backends.cuda.matmul.fp32_precision = "tf32"
        torch.backends.cudnn.conv.fp32_precision = "tf32"
    else:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True


@dataclass(frozen=True)
class Placement:
    """A party's device and how its model runs there."""

    device: torch.device

    @classmethod
    def of(cls, device: str | torch.device = "cpu") -> Placement:
        device = resolve_device(device) if isinstance(device, str) else device
        if device.type == "cuda":
            _allow_tf32()
        return cls(device)

    @property
    def fast(self) -> bool:
        """bf16 autocast, channels_last and fused optimisers: CUDA only (the CPU stays exact)."""
        return self.device.type == "cuda"

    @property
    def is_cpu(self) -> bool:
        return self.device.type == "cpu"

    def generator(self, seed: int) -> torch.Generator:
        """A generator on this device (on the CPU exactly ``torch.Generator().manual_seed``)."""
        return torch.Generator(device=self.device).manual_seed(seed)

    def put(self, x: torch.Tensor) -> torch.Tensor:
        """x on this device. A copy from host memory does not wait for the device's queue; a
        copy back to the host does (its values are read at once)."""
        return x.to(self.device, non_blocking=x.device.type == "cpu")

    def model(self, model: torch.nn.Module) -> torch.nn.Module:
        model = model.to(self.device)
        return model.to(memory_format=torch.channels_last) if self.fast else model

    def model_input(self, x: torch.Tensor) -> torch.Tensor:
        x = self.put(x)
        return x.contiguous(memory_format=torch.channels_last) if self.fast else x

    def autocast(self):
        if self.fast:
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def optimizer(self, params, lr: float) -> torch.optim.Optimizer:
        """Adam; on CUDA the fused kernel (a handful of launches per step instead of ten per
        parameter tensor); elsewhere PyTorch's default, whose settings the checkpoint records."""
        return torch.optim.Adam(params, lr=lr, fused=True if self.fast else None)
