"""What clients and the server say to each other: small dataclasses of arrays plus metadata.

Parties speak only in these messages; engines (in-process, Flower) only carry them. Each
message knows its size in bytes and encodes to a flat ``dict[str, np.ndarray]`` (no pickles),
which is what npz files and Flower ``ArrayRecord``s hold.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, fields
from typing import ClassVar

import numpy as np
import torch


class MessageError(ValueError):
    """A message that is malformed or does not fit the receiver (one-line reason)."""


@dataclass
class Message:
    kind: ClassVar[str] = ""
    protocol: ClassVar[str | None] = None  # the training protocol a message belongs to
    client_id: str

    @property
    def tensors(self) -> dict[str, torch.Tensor]:
        return {f.name: getattr(self, f.name) for f in fields(self)
                if isinstance(getattr(self, f.name), torch.Tensor)}

    @property
    def meta(self) -> dict:
        """The fields that are not tensors; an optional tensor that is absent (None, as labels
        of an unconditional run) is left out, so such a message encodes as it did before."""
        return {f.name: getattr(self, f.name) for f in fields(self)
                if not isinstance(getattr(self, f.name), torch.Tensor)
                and not (f.default is None and getattr(self, f.name) is None)}

    @property
    def batch_size(self) -> int:
        """Number of images carried (0 for a request)."""
        return max((x.shape[0] for x in self.tensors.values() if x.dim() == 4), default=0)

    @property
    def nbytes(self) -> int:
        """The size of :func:`encode`'s arrays, from shapes alone (nothing is copied or read)."""
        return len(_header(self)) + sum(x.numel() * x.element_size() for x in self.tensors.values())


@dataclass
class NoisedBatch(Message):
    """shared-noise (the paper's protocol): noised images of server-owned timesteps, with t and
    the noise itself. Given all three the server recovers x0 exactly (docs/design.md section 3)."""

    kind: ClassVar[str] = "noised-batch"
    protocol: ClassVar[str] = "shared-noise"
    x_t: torch.Tensor  # float32 (N, C, H, W)
    t: torch.Tensor  # int64 (N,), every t >= s
    eps: torch.Tensor  # float32 (N, C, H, W)
    labels: torch.Tensor | None = None  # int64 (N,) class indices: model.condition = "both" only


@dataclass
class NoisyViews(Message):
    """noisy-data: one fixed view y = add_noise(x0, xi, s-1) per image; no noise, no t."""

    kind: ClassVar[str] = "noisy-views"
    protocol: ClassVar[str] = "noisy-data"
    views: torch.Tensor  # float32 (N, C, H, W)
    cut: int  # the cut index s the views were made for
    labels: torch.Tensor | None = None  # int64 (N,) class indices: model.condition = "both" only


@dataclass
class SampleRequest(Message):
    """A client asks the server for n partial samples."""

    kind: ClassVar[str] = "sample-request"
    num_samples: int
    seed: int
    sampler: str = "ddpm"  # "ddpm" or "ddim"
    steps: int = 0  # model calls in all (diffusion.sampling_plan); 0: every one of the T
    # model.condition = "both" only: the class of each sample (int64 (num_samples,)) and the
    # classifier-free guidance scale of the server's steps
    labels: torch.Tensor | None = None
    guidance_scale: float = 1.0


@dataclass
class PartialSamples(Message):
    """The server's samples at the hand-over, x_{s-1} (pure noise when s = T)."""

    kind: ClassVar[str] = "partial-samples"
    x: torch.Tensor  # float32 (N, C, H, W)
    cut: int
    sampler: str = "ddpm"  # the request's, so that the client finishes the same sampler
    steps: int = 0


KINDS = {cls.kind: cls for cls in (NoisedBatch, NoisyViews, SampleRequest, PartialSamples)}
TRAINING_KINDS = {cls.protocol: cls for cls in (NoisedBatch, NoisyViews)}


def _header(msg: Message) -> bytes:
    return json.dumps({"kind": msg.kind, **msg.meta}).encode()


def encode(msg: Message) -> dict[str, np.ndarray]:
    """Flatten to arrays: the tensors (from any device), plus the kind and metadata as UTF-8
    JSON bytes."""
    arrays = {"header": np.frombuffer(_header(msg), dtype=np.uint8).copy()}
    arrays.update({k: v.detach().cpu().numpy() for k, v in msg.tensors.items()})
    return arrays


def decode(arrays: dict[str, np.ndarray]) -> Message:
    """Inverse of :func:`encode`; a wrong kind, a missing array or a bad header is an error."""
    try:
        header = json.loads(bytes(np.asarray(arrays["header"], dtype=np.uint8)).decode())
        cls = KINDS[header.pop("kind")]
    except (KeyError, ValueError, TypeError) as err:
        raise MessageError(f"message: unreadable header or unknown kind ({err})") from None
    tensor_names = [f.name for f in fields(cls) if f.name not in header
                    and (f.name in arrays or f.default is not None)]  # absent optional: None
    missing = [name for name in tensor_names if name not in arrays]
    if missing:
        raise MessageError(f"{cls.kind}: missing arrays {missing}")
    try:
        return cls(**header, **{k: torch.from_numpy(np.array(arrays[k])) for k in tensor_names})
    except TypeError as err:
        raise MessageError(f"{cls.kind}: bad fields ({err})") from None


def on_host(x: torch.Tensor) -> bool:
    """Whether a message's values can be checked without waiting for a device.

    What crosses a wire is decoded on the host and checked in full. A tensor on an accelerator
    was made by a party of this very process (the in-process engine); reading its values would
    stall the device's queue at every step, so only its dtype and shape are checked."""
    return x.device.type == "cpu"


def check_images(msg: Message, name: str, image_shape: tuple[int, ...]) -> torch.Tensor:
    """Raise unless msg.<name> is a float32 batch of images of the expected shape, finite
    where :func:`on_host`."""
    x = getattr(msg, name)
    if x.dtype != torch.float32:
        raise MessageError(f"{msg.kind} from {msg.client_id}: {name} has dtype {x.dtype}, "
                           "expected float32")
    if x.dim() != 4 or tuple(x.shape[1:]) != tuple(image_shape):
        raise MessageError(f"{msg.kind} from {msg.client_id}: {name} has shape "
                           f"{tuple(x.shape)}, expected (N, {', '.join(map(str, image_shape))})")
    if on_host(x) and not bool(torch.isfinite(x).all()):
        raise MessageError(f"{msg.kind} from {msg.client_id}: {name} holds NaN or inf")
    return x
