"""The CollaFuse server: one shared model of the high-noise steps t >= s, for all clients.

It trains on what the clients send (the paper's Figure 1, step 4) and, on request, denoises
pure noise down to the cut and hands the partial samples over. Every message is checked
before anything of it reaches the model.
"""

from __future__ import annotations

from dataclasses import replace

import torch

from .diffusion import StepHook, sample_steps, sampling_plan
from .messages import (Message, MessageError, NoisedBatch, NoisyViews, PartialSamples,
                       SampleRequest, TRAINING_KINDS, check_images, on_host)
from .metering import SERVER
from .party import Party, Recipe
from .protocols import server_loss


class Server(Party):
    def __init__(self, model: torch.nn.Module, scheduler, cut: int, protocol: str,
                 image_shape: tuple[int, int, int], lr: float, seed: int,
                 ema_decay: float | None = None, meter=None, device: str | torch.device = "cpu",
                 compile: bool = False, cuts: dict[str, int] | None = None,
                 num_classes: int = 0, label_dropout: float = 0.0, recipe: Recipe = Recipe()):
        """``cut`` is the run's cut index s; ``cuts`` the clients with one of their own (the
        server owns t >= s_i for client i). ``num_classes`` > 0: a class-conditional model
        (model.condition = "both"), trained on the labels the clients send. ``meter`` and
        ``recipe``: as :class:`collafuse.party.Party`."""
        super().__init__(model, scheduler, cut, protocol, lr, seed, ema_decay, meter, device,
                         compile, num_classes, label_dropout, recipe)
        self.image_shape = tuple(image_shape)
        self.cuts = dict(cuts or {})

    def cut_of(self, client_id: str) -> int:
        """s_i: where the server hands client ``client_id`` over."""
        return self.cuts.get(client_id, self.cut)

    @property
    def name(self) -> str:
        return SERVER

    def check(self, msg: Message) -> None:
        """Raise MessageError unless msg is a well-formed training message of this run."""
        expected = TRAINING_KINDS[self.protocol]
        if not isinstance(msg, expected):
            raise MessageError(f"{msg.kind} from {msg.client_id}: this server runs protocol "
                               f"{self.protocol!r} and expects {expected.kind!r}")
        if isinstance(msg, NoisedBatch):
            n = check_images(msg, "x_t", self.image_shape).shape[0]
            check_images(msg, "eps", self.image_shape)
            if msg.t.dtype != torch.int64 or tuple(msg.t.shape) != (n,) or msg.eps.shape[0] != n:
                raise MessageError(f"{msg.kind} from {msg.client_id}: t must be int64 of shape "
                                   f"({n},) and eps must match x_t")
            cut = self.cut_of(msg.client_id)
            if n and on_host(msg.t) and not bool(((msg.t >= cut)
                                                  & (msg.t < self.num_timesteps)).all()):
                raise MessageError(f"{msg.kind} from {msg.client_id}: timesteps outside the "
                                   f"server's range [{cut}, {self.num_timesteps})")
        if isinstance(msg, NoisyViews):
            check_images(msg, "views", self.image_shape)
            cut = self.cut_of(msg.client_id)
            if msg.cut != cut:
                raise MessageError(f"{msg.kind} from {msg.client_id}: views made for cut index "
                                   f"{msg.cut}, the server uses {cut}")
        self.check_labels(msg.labels, msg.batch_size, f"{msg.kind} from {msg.client_id}")

    def train_step(self, messages: list[Message]) -> torch.Tensor | None:
        """One optimiser step on the union of the clients' messages of one batch index.

        Every message is checked first, so a bad one stops the step before the model sees
        anything. Returns the loss as a 0-d tensor on the server's device (reading it waits for
        the device), or None when no client sent a server-owned sample.
        """
        for msg in messages:
            self.check(msg)
        messages = [self._receive(m) for m in messages if m.batch_size]
        if not messages:
            return None
        self.steps += 1
        rows = sum(m.batch_size for m in messages)
        with self.meter.measure(self.name, "training", flops_key=(rows, self.num_classes)):
            labels = self._training_labels(messages) if self.num_classes else None
            return self._optimise(server_loss(self.protocol,
                                              lambda x_t, t: self._eps(x_t, t, labels),
                                              self.scheduler, messages, self.generator,
                                              self.noise_generator, self.loss_weights))

    def _training_labels(self, messages: list[Message]) -> torch.Tensor:
        """The messages' labels in server_loss's row order, after label dropout; the rows of a
        message without labels get none (the null class)."""
        return self._drop_labels(torch.cat([
            torch.full((m.batch_size,), self.num_classes) if m.labels is None else m.labels
            for m in messages]))

    def _receive(self, msg: Message) -> Message:
        """The message with its tensors on the server's device (the same message on the CPU)."""
        moved = {name: self.place.put(x) for name, x in msg.tensors.items()}
        if all(moved[name] is x for name, x in msg.tensors.items()):
            return msg
        return replace(msg, **moved)

    @torch.no_grad()
    def generate(self, request: SampleRequest, on_step: StepHook | None = None) -> PartialSamples:
        """Denoise pure noise over t = T-1 .. s_i for the asking client i; the result is
        x_{s_i - 1} (pure noise when s_i = T).

        x_T and the step noises come from the server's own stream for the request's seed.
        ``on_step`` (see :func:`collafuse.diffusion.denoise`) first sees the pure noise, as t = T.
        The request's ``sampler`` and ``steps`` choose the server's part of the sampler
        (:func:`collafuse.diffusion.sampling_plan`); it still hands over at level s_i - 1.
        """
        if request.num_samples < 1:
            raise MessageError(f"{request.kind} from {request.client_id}: num_samples must be "
                               f">= 1, got {request.num_samples}")
        self.check_labels(request.labels, request.num_samples,
                          f"{request.kind} from {request.client_id}")
        scale = request.guidance_scale
        if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not 0 <= scale <= 100:
            raise MessageError(f"{request.kind} from {request.client_id}: guidance_scale must be "
                               "a number in [0, 100]")
        with self.meter.measure(self.name, "sampling"):
            generator = self.stream("sample", request.seed)
            x = torch.randn((request.num_samples, *self.image_shape), generator=generator,
                            device=self.device)
            if on_step is not None:
                on_step(self.num_timesteps, x)
            cut = self.cut_of(request.client_id)
            timesteps, _ = sampling_plan(cut, self.num_timesteps, request.steps)
            x = sample_steps(self.guided_eps(request.labels, scale), self.scheduler, x,
                             timesteps, cut - 1, request.sampler, generator, on_step)
        return PartialSamples(client_id=request.client_id, x=x, cut=cut,
                              sampler=request.sampler, steps=request.steps)
