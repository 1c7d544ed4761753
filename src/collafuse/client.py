"""A CollaFuse client: its images, its local model of the low-noise steps t < s, its optimiser.

It talks to the server only through messages (:mod:`collafuse.messages`): per batch it
diffuses its images (the paper's Figure 1, step 2), keeps the samples of its own timesteps
and trains on them (steps 5/6), and returns the server-owned part as a message (step 3).
For sampling it asks for partial samples and finishes them over t = s-1 .. 0.

Its one secret (``secret``: random bytes of its own, never sent, never derived from the config
or the run seed; docs/design.md section 5) seeds the noise of the noisy-data views. The engine keeps
it on the client's side: a client-private file in the run folder in-process, the node's disk
under Flower.
"""

from __future__ import annotations

import hashlib

import numpy as np
import torch

from .diffusion import StepHook, add_noise, handover_view, sample_steps, sampling_plan, server_owns
from .messages import Message, PartialSamples, SampleRequest, check_images
from .metering import client_party
from .party import Party, Recipe
from .protocols import local_loss, server_message

SECRET_BYTES = 32  # os.urandom bytes of a client's secret


class Client(Party):
    def __init__(self, client_id: str, images: torch.Tensor, model: torch.nn.Module,
                 scheduler, cut: int, protocol: str, batch_size: int, lr: float,
                 seed: int, secret: bytes, ema_decay: float | None = None, meter=None,
                 device: str | torch.device = "cpu", compile: bool = False,
                 labels: torch.Tensor | None = None, num_classes: int = 0,
                 label_dropout: float = 0.0, send_labels: bool = False,
                 local_steps: int = 1, local_batch_size: int = 0, recipe: Recipe = Recipe()):
        """``images``: float32 NCHW in [-1, 1], the client's training set; never sent anywhere.
        ``seed`` makes the public draws reproducible (batch order, t, training noise); ``secret``
        (at least 16 random bytes) makes what the server must not know. ``images`` and
        ``views`` stay as given, on the host, for evaluation; training reads copies resident on
        the client's device.

        ``labels`` (int64 class indices, one per image) make the client's model class-conditional
        over ``num_classes`` classes (model.condition "client" or "both"); they go to the server
        only with ``send_labels`` (model.condition = "both").

        After each batch's step the client takes ``local_steps`` - 1 more on its own levels
        alone, each on ``local_batch_size`` fresh images (0: ``batch_size``). ``meter`` and
        ``recipe``: as :class:`collafuse.party.Party`."""
        if images.dim() != 4 or images.shape[0] == 0:
            raise ValueError(f"client {client_id}: expected a non-empty NCHW image tensor, "
                             f"got shape {tuple(images.shape)}")
        if batch_size < 1:
            raise ValueError(f"train.batch_size: expected an integer >= 1, got {batch_size}")
        if local_steps < 1 or local_batch_size < 0:
            raise ValueError(f"train.local_steps, local_batch_size: expected integers >= 1 and "
                             f">= 0, got {local_steps} and {local_batch_size}")
        if not isinstance(secret, bytes) or len(secret) < 16:
            raise ValueError(f"client {client_id}: the secret must be at least 16 random bytes")
        if labels is not None and (not num_classes or tuple(labels.shape) != (len(images),)):
            raise ValueError(f"client {client_id}: expected one label per image and "
                             "num_classes >= 1")
        if send_labels and labels is None:
            raise ValueError(f"client {client_id}: send_labels needs labels")
        super().__init__(model, scheduler, cut, protocol, lr, seed, ema_decay, meter, device,
                         compile, num_classes if labels is not None else 0, label_dropout, recipe)
        self.client_id = client_id
        self.labels = labels
        self.send_labels = send_labels
        self.images = images
        self.batch_size = min(batch_size, len(images))
        self.local_steps = local_steps
        self.local_batch_size = min(local_batch_size or batch_size, len(images))
        self.views = self._make_views(secret) if self.protocol == "noisy-data" else None
        self._images = self.place.put(images)
        self._views = None if self.views is None else self.place.put(self.views)
        self.order = torch.randperm(len(images), generator=self.generator)
        self.position = 0

    @property
    def name(self) -> str:
        return client_party(self.client_id)

    def _make_views(self, secret: bytes) -> torch.Tensor:
        """One view per image, its noise xi drawn once from the client's secret and kept.

        A fresh xi every epoch would let the server average an image's views and strip the
        noise; an xi the server can regenerate gives it x0 = (y - b xi) / a exactly (docs/design.md
        section 3). So xi comes from the secret alone, through numpy's PCG64 seeded with all
        256 bits of it (a torch generator would keep only 32 bits: a search the server could
        afford). The same secret gives the same views after a restart.
        """
        return handover_view(self.scheduler, self.images, view_noise(secret, self.images.shape),
                             self.cut)

    def _next_indices(self, size: int) -> torch.Tensor:
        """The next ``size`` images of an epoch-wise shuffle; a new permutation when an epoch ends."""
        if self.position + size > len(self.order):
            self.order = torch.randperm(len(self.images), generator=self.generator)
            self.position = 0
        idx = self.order[self.position:self.position + size]
        self.position += size
        return idx

    def train_round(self, num_batches: int = 1) -> list[Message]:
        """Diffuse ``num_batches`` batches, train on the own timesteps, return server messages."""
        return [self._train_batch() for _ in range(num_batches)]

    def _train_batch(self) -> Message:
        # The message is built before the local step (the paper's order is the other way):
        # neither touches the generator or the other's tensors, so the numbers are the same,
        # and the cheap forward diffusion is metered apart from the training.
        # The split is decided on the host (batch order and t from the host generator), and
        # the images are picked by index on the device: the host never waits for the device.
        with self.meter.measure(self.name, "diffusion"):
            idx = self._next_indices(self.batch_size)
            t = torch.randint(0, self.num_timesteps, (len(idx),), generator=self.generator)
            sent = server_owns(t, self.cut)
            own = ~sent
            x0 = self._images[self.place.put(idx)]
            eps = self._noise(x0.shape)
            rows, own_rows = (self.place.put(mask.nonzero().squeeze(1)) for mask in (sent, own))
            x_t = add_noise(self.scheduler, x0[rows], eps[rows], t[sent])
            views = self._views[self.place.put(idx[sent])] if self._views is not None else None
            labels = None if self.labels is None else self.labels[idx]
            message = server_message(self.protocol, self.client_id, x_t, t[sent], eps[rows],
                                     views, self.cut, labels[sent] if self.send_labels else None)
        if bool(own.any()):
            # FLOPs: one forward and backward of the model at this many rows (CostMeter)
            with self.meter.measure(self.name, "training",
                                    flops_key=(len(own_rows), labels is None)):
                own_labels = None if labels is None else self._drop_labels(labels[own])
                self._optimise(local_loss(lambda x_t, t_own: self._eps(x_t, t_own, own_labels),
                                          self.scheduler, x0[own_rows], t[own], eps[own_rows],
                                          self.loss_weights))
        for _ in range(self.local_steps - 1):
            self._train_own_levels()
        self.steps += 1
        return message

    def _train_own_levels(self) -> None:
        """One step on the client's own levels alone: local_batch_size fresh images, t uniform
        over [0, s). The paper's step trains the client on the part of a batch whose t falls
        below the cut, about s/T of it; the client's half of the chain is what limits sample
        quality in short runs (docs/quality.md, third study), and these steps
        give it more updates at no cost to the server and no message."""
        if self.cut == 0:  # c = 0: the client owns no level
            return
        with self.meter.measure(self.name, "training",
                                flops_key=(min(self.local_batch_size, len(self.images)),
                                           self.labels is None)):
            idx = self._next_indices(self.local_batch_size)
            t = torch.randint(0, self.cut, (len(idx),), generator=self.generator)
            x0 = self._images[self.place.put(idx)]
            labels = None if self.labels is None else self._drop_labels(self.labels[idx])
            self._optimise(local_loss(lambda x_t, t_own: self._eps(x_t, t_own, labels),
                                      self.scheduler, x0, t, self._noise(x0.shape),
                                      self.loss_weights))

    def request_samples(self, num_samples: int, seed: int = 0, sampler: str = "ddpm",
                        steps: int = 0, labels: torch.Tensor | None = None,
                        guidance_scale: float = 1.0) -> SampleRequest:
        """Ask for ``num_samples`` hand-overs of a ``sampler`` of ``steps`` model calls in all
        (0: every one of the T; :func:`collafuse.diffusion.sampling_plan`). The samples'
        class ``labels`` and the guidance scale go into the request only with send_labels."""
        if num_samples < 1:
            raise ValueError(f"num_samples: expected an integer >= 1, got {num_samples}")
        self.check_labels(labels, num_samples, f"client {self.client_id}'s sample labels")
        if not self.send_labels:  # client-only conditioning: the server hears of no class
            labels, guidance_scale = None, 1.0
        return SampleRequest(client_id=self.client_id, num_samples=num_samples, seed=seed,
                             sampler=sampler, steps=steps, labels=labels,
                             guidance_scale=guidance_scale)

    @torch.no_grad()
    def finish_samples(self, partial: PartialSamples, seed: int = 0,
                       on_step: StepHook | None = None, labels: torch.Tensor | None = None,
                       guidance_scale: float = 1.0) -> torch.Tensor:
        """Run the client's steps t = s-1 .. 0 on the server's hand-over; images in [-1, 1].

        The step noises come from the client's own stream for ``seed``, never the server's: a
        replay of the server's draws would correlate the two halves of the chain. A conditional
        client steers its steps towards ``labels`` with classifier-free guidance.
        """
        if partial.cut != self.cut:
            raise ValueError(f"partial samples made for cut index {partial.cut}, "
                             f"client {self.client_id} uses {self.cut}")
        x = self.place.put(check_images(partial, "x", tuple(self.images.shape[1:])))
        self.check_labels(labels, x.shape[0], f"client {self.client_id}'s sample labels")
        return finish_chain(self, x, partial.sampler, partial.steps, seed, on_step, labels,
                            guidance_scale)

    def state_dict(self) -> dict:
        return {**super().state_dict(), "order": self.order, "position": self.position}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.order = state["order"]
        self.position = state["position"]


@torch.no_grad()
def finish_chain(party: Party, x: torch.Tensor, sampler: str, steps: int, seed: int,
                 on_step: StepHook | None = None, labels: torch.Tensor | None = None,
                 guidance_scale: float = 1.0) -> torch.Tensor:
    """A client party's half of the chain on a checked hand-over x = x_{s-1}: its steps
    t = s-1 .. 0 of a ``sampler`` of ``steps`` calls, the noises from its own stream for
    ``seed`` (:meth:`Party.stream`). Shared by :meth:`Client.finish_samples` and the exported
    pipeline (:mod:`collafuse.pipeline`), which holds a client's model but not its data."""
    _, timesteps = sampling_plan(party.cut, party.num_timesteps, steps)
    with party.meter.measure(party.name, "sampling"):
        return sample_steps(party.guided_eps(labels, guidance_scale), party.scheduler, x,
                            timesteps, -1, sampler, party.stream("sample", seed), on_step)


def view_noise(secret: bytes, shape: tuple[int, ...]) -> torch.Tensor:
    """Standard normal noise of ``shape`` determined by the whole secret (and nothing else)."""
    seed = int.from_bytes(hashlib.sha256(b"collafuse view noise" + secret).digest(), "big")
    rng = np.random.Generator(np.random.PCG64(seed))
    return torch.from_numpy(rng.standard_normal(tuple(shape), dtype=np.float32))


def class_labels(classes: list[str], conditional: bool, num_samples: int,
                 label: str = "") -> torch.Tensor | None:
    """Class indices of ``num_samples`` samples: all of class ``label``, or ("") every one of
    ``classes`` in equal blocks, in order; None for an unconditional model."""
    if not conditional:
        if label:
            raise ValueError(f"--label {label!r}: this run's model is unconditional "
                             "(model.condition = 'none')")
        return None
    if label and label not in classes:
        raise ValueError(f"--label: expected one of model.classes {classes}, got {label!r}")
    if label:
        return torch.full((num_samples,), classes.index(label), dtype=torch.long)
    return torch.arange(num_samples) * len(classes) // num_samples
