"""What client and server have in common: a model, its optimiser, optional EMA weights, a
random generator, a cost meter, and a state that can be saved and restored exactly (for --resume).

The meter only watches: it draws no random numbers and changes no tensor, so a metered party
computes bit for bit what an unmetered one does."""

from __future__ import annotations

import hashlib

import torch

from .metering import NullMeter
from .models import EMA, predict_noise
from .protocols import check_protocol
from .state import load_state, save_state


class Party:
    def __init__(self, model: torch.nn.Module, scheduler, cut: int, protocol: str, lr: float,
                 seed: int, ema_decay: float | None = None, meter=None):
        self.model = model
        self.scheduler = scheduler
        self.cut = cut
        self.protocol = check_protocol(protocol)
        self.optimizer = torch.optim.Adam(model.parameters(), lr=lr)
        self.ema = EMA(model, ema_decay) if ema_decay else None
        self.seed = seed
        self.generator = torch.Generator().manual_seed(seed)
        self.steps = 0
        self.last_loss: float | None = None
        # measure(party, phase) and add_bytes(...), as evaluation.costs.CostMeter
        self.meter = meter or NullMeter()

    @property
    def name(self) -> str:
        """The party's name in cost tables: ``server`` or ``client:<id>``."""
        raise NotImplementedError

    @property
    def num_timesteps(self) -> int:
        return self.scheduler.config.num_train_timesteps

    def stream(self, purpose: str, seed: int) -> torch.Generator:
        """A generator of this party's own for one purpose and a (possibly public) seed.

        Mixed with the party's own seed, so two parties given the same request seed draw
        independent noise (DESIGN.md section 2); sha256 because torch keeps only 32 bits of a
        seed and party seeds must not collide after that cut.
        """
        digest = hashlib.sha256(f"{self.seed}:{purpose}:{seed}".encode()).digest()
        return torch.Generator().manual_seed(int.from_bytes(digest[:4], "big"))

    def _eps(self, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return predict_noise(self.model, x_t, t)

    def _sampling_eps(self, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The noise predictor used for generation: the EMA weights where kept."""
        return predict_noise(self.ema.model if self.ema else self.model, x_t, t)

    def _optimise(self, loss: torch.Tensor) -> float:
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        if self.ema:
            self.ema.update(self.model)
        self.last_loss = loss.item()
        return self.last_loss

    def state_dict(self) -> dict:
        return {
            "model": self.model.state_dict(),
            "ema": self.ema.state_dict() if self.ema else {},
            "optimizer": self.optimizer.state_dict(),
            "generator": self.generator.get_state(),
            "steps": self.steps,
        }

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        if self.ema:
            self.ema.load_state_dict(state["ema"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.generator.set_state(state["generator"])
        self.steps = state["steps"]

    def save(self, path) -> None:
        save_state(self.state_dict(), path)

    def load(self, path) -> None:
        self.load_state_dict(load_state(path))
