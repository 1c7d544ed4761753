"""Split inference from an exported CollaFuse model, without its run folder or config.

``collafuse export RUN OUT`` (:mod:`collafuse.export`) writes each party's UNet with diffusers'
``save_pretrained`` and a ``collafuse.json`` that says how they chain: the cut index of each
client, what the models predict, the sampler, the classes. :class:`CollaFusePipeline` reads
that folder and samples a client's images as the run itself does (``collafuse sample``): the
server's half (:meth:`collafuse.server.Server.generate`) from pure noise down to the client's
cut, the client's half (:func:`collafuse.client.finish_chain`) from there, each with the
noise of its own stream. With the same seeds the images equal the run's, bit for bit on a CPU.

    from collafuse.pipeline import CollaFusePipeline
    pipe = CollaFusePipeline.from_pretrained("exports/quickstart")
    images = pipe("DU", num_samples=16, seed=0)   # float32 NCHW in [-1, 1]

Each party's stream seed is in ``collafuse.json``: it is ``factory.party_seed`` of the run's
seed, which every party reads in the config, so it is no secret; a client's only secret (the
noisy-data view noise) is not in the export.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from diffusers import DDPMScheduler, UNet2DModel

from .client import class_labels, finish_chain
from .diffusion import make_scheduler
from .messages import PartialSamples, SampleRequest
from .metering import client_party
from .party import Party, Recipe
from .server import Server

EXPORT_FORMAT = "collafuse-export/1"
INFO_FILE = "collafuse.json"
SCHEDULER_DIR = "scheduler"
SERVER_DIR = "server"
CLIENTS_DIR = "clients"
# exported parties are never trained; their (unused) optimisers get this rate
NO_TRAINING_LR = 0.0


class ExportError(ValueError):
    """A folder that is not a complete CollaFuse export (one-line reason)."""


class ExportedClient(Party):
    """A client's model and stream, without its images or secret: what sampling needs."""

    def __init__(self, client_id: str, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.client_id = client_id

    @property
    def name(self) -> str:
        return client_party(self.client_id)


def read_info(path: str | Path) -> dict:
    """The export's ``collafuse.json``, checked for its format."""
    path = Path(path)
    info_file = path / INFO_FILE
    if not info_file.is_file():
        raise ExportError(f"{path}: not a CollaFuse export (no {INFO_FILE}); make one with "
                          "`collafuse export RUN OUT`")
    try:
        info = json.loads(info_file.read_text())
    except json.JSONDecodeError as err:
        raise ExportError(f"{info_file}: not valid JSON ({err})") from None
    if not isinstance(info, dict) or info.get("format") != EXPORT_FORMAT:
        raise ExportError(f"{info_file}: expected format {EXPORT_FORMAT!r}, got "
                          f"{info.get('format') if isinstance(info, dict) else info!r}")
    return info


def load_scheduler(path: str | Path, num_timesteps: int) -> DDPMScheduler:
    """The run's schedule (:func:`collafuse.diffusion.make_scheduler`), after checking that the
    exported scheduler config is that schedule. The exported config names what the UNets
    predict (for a diffusers user's own loop); the split loop turns every output into eps_hat
    first (:func:`collafuse.diffusion.eps_from_output`), so it steps an epsilon scheduler."""
    saved = DDPMScheduler.load_config(Path(path) / SCHEDULER_DIR)
    ours = make_scheduler(num_timesteps)
    for key in ("num_train_timesteps", "beta_schedule"):
        if saved.get(key) != ours.config[key]:
            raise ExportError(f"{path}/{SCHEDULER_DIR}: {key} = {saved.get(key)!r}, "
                              f"collafuse.json says {ours.config[key]!r}")
    return ours


def _unet(folder: Path, device: str) -> UNet2DModel:
    if not (folder / "config.json").is_file():
        raise ExportError(f"{folder}: no exported UNet (config.json) here")
    # low_cpu_mem_usage=False: the plain load (the default wants the accelerate package)
    return UNet2DModel.from_pretrained(folder, low_cpu_mem_usage=False).to(device)


class CollaFusePipeline:
    """The server's UNet and the exported clients' UNets, chained as the run chains them."""

    def __init__(self, server: Server, clients: dict[str, ExportedClient], info: dict):
        self.server = server
        self.parties = clients
        self.info = info

    @property
    def clients(self) -> list[str]:
        """The clients whose models this export holds (none for a Flower server's export)."""
        return list(self.parties)

    @classmethod
    def from_pretrained(cls, path: str | Path, device: str = "cpu") -> CollaFusePipeline:
        """Load an export of ``collafuse export``; every party on ``device``."""
        path = Path(path)
        info = read_info(path)
        T, shape = info["num_timesteps"], tuple(info["image_shape"])
        scheduler = load_scheduler(path, T)
        s = info["server"]
        recipe = Recipe(prediction=info["prediction"])  # all sampling needs of the recipe
        server = Server(_unet(path / SERVER_DIR, device), scheduler, s["cut_index"],
                        info["protocol"], shape, NO_TRAINING_LR, s["stream_seed"], device=device,
                        cuts={cid: c["cut_index"] for cid, c in info["clients"].items()},
                        num_classes=s["num_classes"], recipe=recipe)
        clients = {}
        for cid, c in info["clients"].items():
            if not c["exported"]:
                continue
            party = ExportedClient(cid, _unet(path / CLIENTS_DIR / cid, device), scheduler,
                                   c["cut_index"], info["protocol"], NO_TRAINING_LR,
                                   c["stream_seed"], device=device, num_classes=c["num_classes"],
                                   recipe=recipe)
            clients[cid] = party
        return cls(server, clients, info)

    def _defaults(self, sampler, steps, guidance_scale, seed, label):
        s = self.info["sampling"]
        return (s["sampler"] if sampler is None else sampler,
                s["steps"] if steps is None else steps,
                s["guidance_scale"] if guidance_scale is None else guidance_scale,
                s["seed"] if seed is None else seed,
                s["label"] if label is None else label)

    def _labels(self, client_id: str, num_samples: int, label: str) -> torch.Tensor | None:
        party = self.parties.get(client_id)
        conditional = bool(party.num_classes if party else self.server.num_classes)
        return class_labels(self.info["classes"], conditional, num_samples, label)

    def handover(self, client_id: str, num_samples: int, seed: int | None = None,
                 sampler: str | None = None, steps: int | None = None, label: str | None = None,
                 guidance_scale: float | None = None, on_step=None) -> PartialSamples:
        """The server's half for client ``client_id``: x_{s_i - 1}, as the run's server makes
        it. Works with a server-only export (a Flower server's)."""
        if client_id not in self.info["clients"]:
            raise ValueError(f"client {client_id!r}: not in this export (have "
                             f"{sorted(self.info['clients'])})")
        sampler, steps, scale, seed, label = self._defaults(sampler, steps, guidance_scale,
                                                            seed, label)
        labels = self._labels(client_id, num_samples, label)
        if not self.info["send_labels"]:  # client-only conditioning: the server hears of no class
            labels, scale = None, 1.0
        return self.server.generate(SampleRequest(
            client_id=client_id, num_samples=num_samples, seed=seed, sampler=sampler,
            steps=steps, labels=labels, guidance_scale=scale), on_step)

    @torch.no_grad()
    def __call__(self, client_id: str, num_samples: int | None = None, seed: int | None = None,
                 sampler: str | None = None, steps: int | None = None, label: str | None = None,
                 guidance_scale: float | None = None, on_step=None) -> torch.Tensor:
        """``num_samples`` images of client ``client_id`` by split inference, float32 NCHW in
        [-1, 1] on the host. Unset arguments take the run's values (its sample section): the
        same seed gives the images ``collafuse sample`` gives."""
        if client_id not in self.parties:
            raise ValueError(f"client {client_id!r}: this export holds no model of it (clients "
                             f"with models: {self.clients or 'none, a server-only export'})")
        if num_samples is None:
            num_samples = self.info["sampling"]["num_samples"]
        if num_samples < 1:
            raise ValueError(f"num_samples: expected an integer >= 1, got {num_samples}")
        party = self.parties[client_id]
        _, _, scale, seed, label = self._defaults(sampler, steps, guidance_scale, seed, label)
        partial = self.handover(client_id, num_samples, seed, sampler, steps, label,
                                guidance_scale, on_step)
        labels = self._labels(client_id, num_samples, label)
        return finish_chain(party, party.place.put(partial.x), partial.sampler, partial.steps,
                            seed, on_step, labels, scale).cpu()
