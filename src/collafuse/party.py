"""What client and server have in common: a model, its optimiser, optional EMA weights, a
random generator, a cost meter, and a state that can be saved and restored exactly (for --resume).

The meter only watches: it draws no random numbers and changes no tensor, so a metered party
computes bit for bit what an unmetered one does.

Placement (docs/design.md section 5) is decided here and in :mod:`collafuse.device`: the model, its
optimiser and EMA, the party's data and its noise live on the party's device. Draws that decide
shapes (batch order, timesteps) come from a host generator, so the host knows every batch's
split without waiting for the device; noise tensors come from a generator on the device. On the
CPU the two are one generator, drawn in the same order as before devices existed.
"""

from __future__ import annotations

import functools
import hashlib
from dataclasses import dataclass

import torch

from .choices import LOSS_WEIGHTINGS, LR_SCHEDULES, PREDICTIONS, expected
from .device import Placement
from .diffusion import eps_from_output, guided_noise, loss_weights
from .messages import MessageError, on_host
from .metering import NullMeter
from .models import EMA, predict_noise
from .optim import lr_factor
from .protocols import check_protocol
from .state import load_state, save_state


@dataclass(frozen=True)
class Recipe:
    """How a party trains beyond its optimiser's base lr, and how it reads its model's output
    (model.prediction; train.loss_weighting, min_snr_gamma, lr_schedule, lr_warmup_steps, and
    train.steps as the schedule's length). The defaults are the plain recipe: eps-prediction,
    the plain mean loss, a constant lr."""

    prediction: str = "epsilon"
    loss_weighting: str = "uniform"
    min_snr_gamma: float = 5.0
    lr_schedule: str = "constant"
    lr_warmup_steps: int = 0
    total_steps: int = 0

    def __post_init__(self):
        for field, value, names in (("model.prediction", self.prediction, PREDICTIONS),
                                    ("train.loss_weighting", self.loss_weighting, LOSS_WEIGHTINGS),
                                    ("train.lr_schedule", self.lr_schedule, LR_SCHEDULES)):
            if value not in names:
                raise ValueError(f"{field}: expected {expected(names)}, got {value!r}")

    @property
    def schedules_lr(self) -> bool:
        return self.lr_schedule != "constant" or self.lr_warmup_steps > 0

    def lr_factor(self, step: int) -> float:
        """The factor of the base lr for the optimiser step after ``step`` steps taken."""
        return lr_factor(step, self.total_steps, self.lr_schedule, self.lr_warmup_steps)

    def loss_weights(self, scheduler):
        """Per-sample loss weights as a function of t (:func:`collafuse.diffusion.loss_weights`);
        None for the plain mean (uniform weights on an eps-predicting model), which keeps the
        loss exactly F.mse_loss."""
        if self.loss_weighting == "uniform" and self.prediction == "epsilon":
            return None
        return functools.partial(loss_weights, scheduler, weighting=self.loss_weighting,
                                 gamma=self.min_snr_gamma, prediction=self.prediction)


class Party:
    def __init__(self, model: torch.nn.Module, scheduler, cut: int, protocol: str, lr: float,
                 seed: int, ema_decay: float | None = None, meter=None,
                 device: str | torch.device = "cpu", compile: bool = False,
                 num_classes: int = 0, label_dropout: float = 0.0,
                 recipe: Recipe = Recipe()):
        """``num_classes`` > 0: the model is class-conditional (:func:`collafuse.models.make_unet`),
        trained with each label replaced by "no label" (index ``num_classes``) with probability
        ``label_dropout``, so that it also learns the unconditional model guidance needs.
        ``meter``: what the party reports its phases' costs into (default: nothing);
        ``recipe``: its lr schedule, loss weighting and prediction (default: the plain one)."""
        self.place = Placement.of(device)
        self.model = self.place.model(model)
        self.scheduler = scheduler
        self.cut = cut
        self.protocol = check_protocol(protocol)
        self.base_lr = lr
        self.optimizer = self.place.optimizer(self.model.parameters(), lr)
        self.ema = EMA(self.model, ema_decay) if ema_decay else None
        # the compiled module shares the model's parameters; sampling runs the plain one
        self.net = torch.compile(self.model) if compile else self.model
        self.seed = seed
        self.generator = torch.Generator().manual_seed(seed)
        self.noise_generator = (self.generator if self.place.is_cpu
                                else self.place.generator(seed))
        self.num_classes = num_classes
        self.label_dropout = label_dropout
        self.steps = 0
        self.resumable = True  # False after loading random streams of another kind of device
        # the last training loss as a 0-d tensor on the device: reading it waits for the device
        self.loss: torch.Tensor | None = None
        # measure(party, phase) and add_bytes(...), as evaluation.costs.CostMeter
        self.meter = meter or NullMeter()
        self.recipe = recipe
        # per-sample loss weights of t, made once (None: the plain mean)
        self.loss_weights = recipe.loss_weights(scheduler)

    @property
    def prediction(self) -> str:
        """What the model outputs, eps or v (collafuse.diffusion.eps_from_output)."""
        return self.recipe.prediction

    @property
    def name(self) -> str:
        """The party's name in cost tables: ``server`` or ``client:<id>``."""
        raise NotImplementedError

    @property
    def num_timesteps(self) -> int:
        return self.scheduler.config.num_train_timesteps

    @property
    def device(self) -> torch.device:
        return self.place.device

    @property
    def last_loss(self) -> float | None:
        """The last training loss (None before the first step); waits for the device."""
        return None if self.loss is None else self.loss.item()

    def stream(self, purpose: str, seed: int) -> torch.Generator:
        """A generator of this party's own for one purpose and a (possibly public) seed.

        Mixed with the party's own seed, so two parties given the same request seed draw
        independent noise (docs/design.md section 2); sha256 because torch keeps only 32 bits of a
        seed and party seeds must not collide after that cut.
        """
        digest = hashlib.sha256(f"{self.seed}:{purpose}:{seed}".encode()).digest()
        return self.place.generator(int.from_bytes(digest[:4], "big"))

    def predict(self, net: torch.nn.Module, x_t: torch.Tensor, t: torch.Tensor,
                labels: torch.Tensor | None = None) -> torch.Tensor:
        """eps_hat in fp32 on x_t's device: the model runs on the party's device (callers such
        as the audit may pass host tensors; training passes device tensors, and nothing moves).
        A conditional model given no ``labels`` predicts without a label (the null class)."""
        if self.num_classes and labels is None:
            labels = torch.full((x_t.shape[0],), self.num_classes, dtype=torch.long)
        if labels is not None:
            labels = self.place.put(labels)
        with self.place.autocast():
            out = predict_noise(net, self.place.model_input(x_t), self.place.put(t), labels)
        return eps_from_output(self.scheduler, out.float().to(x_t.device), x_t, t,
                               self.prediction)

    def _eps(self, x_t: torch.Tensor, t: torch.Tensor,
             labels: torch.Tensor | None = None) -> torch.Tensor:
        return self.predict(self.net, x_t, t, labels)

    @property
    def _sampling_net(self) -> torch.nn.Module:
        """The weights generation runs with: the EMA's where kept."""
        return self.ema.model if self.ema else self.model

    def _sampling_eps(self, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The noise predictor used for generation (no label)."""
        return self.predict(self._sampling_net, x_t, t)

    def guided_eps(self, labels: torch.Tensor | None, guidance_scale: float):
        """The generation noise predictor eps(x_t, t) for one batch of class ``labels``, with
        classifier-free guidance (:func:`collafuse.diffusion.guided_noise`): the conditional
        and the no-label predictions in one model call of twice the batch. None: no label."""
        net = self._sampling_net
        if labels is None or guidance_scale == 1.0:
            return lambda x_t, t: self.predict(net, x_t, t, labels)
        null = torch.full_like(labels, self.num_classes)

        def eps(x_t, t):
            both = self.predict(net, torch.cat([x_t, x_t]), torch.cat([t, t]),
                                torch.cat([labels, null]))
            return guided_noise(*both.chunk(2), guidance_scale)
        return eps

    def check_labels(self, labels: torch.Tensor | None, n: int, who: str) -> None:
        """Raise MessageError unless ``labels`` fit this party's model: none for an unconditional
        one; int64 class indices of shape (n,) in [0, num_classes) for a conditional one (None
        allowed: no label)."""
        if labels is None:
            return
        if not self.num_classes:
            raise MessageError(f"{who}: carries class labels, but the {self.name} model is "
                               "unconditional")
        if (not isinstance(labels, torch.Tensor) or labels.dtype != torch.int64
                or tuple(labels.shape) != (n,)):
            raise MessageError(f"{who}: labels must be int64 of shape ({n},)")
        if on_host(labels) and n and not bool(((labels >= 0) & (labels < self.num_classes)).all()):
            raise MessageError(f"{who}: labels outside [0, {self.num_classes})")

    def _drop_labels(self, labels: torch.Tensor) -> torch.Tensor:
        """Training labels, each replaced by the null class with probability label_dropout
        (classifier-free guidance training, Ho & Salimans 2022); drawn on the host."""
        drop = torch.rand(labels.shape, generator=self.generator) < self.label_dropout
        return torch.where(drop, torch.full_like(labels, self.num_classes), labels)

    def _noise(self, shape) -> torch.Tensor:
        """Standard normal noise on the device, from the party's noise generator."""
        return torch.randn(shape, generator=self.noise_generator, device=self.device)

    def _optimise(self, loss: torch.Tensor) -> torch.Tensor:
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if self.recipe.schedules_lr:
            for group in self.optimizer.param_groups:
                group["lr"] = self.base_lr * self.recipe.lr_factor(self.steps)
        self.optimizer.step()
        if self.ema:
            self.ema.update(self.model)
        self.loss = loss.detach()
        return self.loss

    def state_dict(self) -> dict:
        """Tensors on the host, so a checkpoint loads on any machine; the device's noise
        generator only where it is not the host's own (never on the CPU)."""
        state = {
            "model": self.model.state_dict(),
            "ema": self.ema.state_dict() if self.ema else {},
            "optimizer": self.optimizer.state_dict(),
            "generator": self.generator.get_state(),
            "steps": self.steps,
        }
        if self.noise_generator is not self.generator:
            state["noise_generator"] = self.noise_generator.get_state()
        return state if self.place.is_cpu else to_host(state)

    def load_state_dict(self, state: dict) -> None:
        """Weights load on any device. The random streams continue exactly only where the
        state was made on the same kind of device (``self.resumable`` says whether they did)."""
        self.model.load_state_dict(state["model"])
        if self.ema:
            self.ema.load_state_dict(state["ema"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.steps = state["steps"]
        same_kind = ("noise_generator" in state) == (self.noise_generator is not self.generator)
        self.resumable = same_kind
        if not same_kind:
            return
        try:
            self.generator.set_state(state["generator"])
            if "noise_generator" in state:
                self.noise_generator.set_state(state["noise_generator"])
        except RuntimeError:  # a generator state of another device type (e.g. cuda vs mps)
            self.resumable = False

    def save(self, path) -> None:
        save_state(self.state_dict(), path)

    def load(self, path) -> None:
        self.load_state_dict(load_state(path))


def to_host(obj):
    """A nested state with every tensor on the CPU (CPU tensors are returned as they are)."""
    if isinstance(obj, torch.Tensor):
        return obj.cpu()
    if isinstance(obj, dict):
        out = type(obj)((k, to_host(v)) for k, v in obj.items())
        if hasattr(obj, "_metadata"):  # module state dicts carry their versions here
            out._metadata = obj._metadata
        return out
    if isinstance(obj, list):
        return [to_host(v) for v in obj]
    return obj
