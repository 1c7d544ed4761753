"""Build a run's data, server and clients from a Config: the one place where config meets parties.

Both engines (in-process and Flower) build their parties here, so that the same config and
seed give the same models whatever carries the messages.
"""

from __future__ import annotations

import math
import os
import zlib
from dataclasses import dataclass
from pathlib import Path

import torch

from .client import SECRET_BYTES, Client
from .config import Config
from .data import (ImageSet, load_images, normalise_intensity, partition, require_min_images,
                   split_holdout, to_model)
from .device import resolve_device
from .diffusion import cut_index, make_scheduler
from .models import make_unet
from .party import Recipe
from .server import Server
from .state import load_or_create_secret


def party_seed(cfg: Config, party: str) -> int:
    """A stable per-party seed derived from the run's one seed (crc32, not Python's hash)."""
    return (cfg.run.seed * 1_000_003 + zlib.crc32(party.encode())) % 2**31


@dataclass
class RunData:
    """What a run trains and evaluates on: each client's training images, the hold-out set of
    whole patients nobody trains on (other hospitals, by default), and each client's own
    held-out patients (same hospital; empty unless data.client_holdout_fraction > 0)."""

    clients: dict[str, ImageSet]
    holdout: ImageSet
    client_holdout: dict[str, ImageSet]


def load_client_data(cfg: Config) -> RunData:
    d = cfg.data
    images = read_images(cfg, d.path)
    train, holdout = split_holdout(images, holdout_sites=d.holdout_sites or None,
                                   holdout_fraction=d.holdout_fraction, seed=cfg.run.seed)
    clients = d.clients if d.partition in ("site", "label") else d.num_clients
    parts = partition(train, by=d.partition, clients=clients, seed=cfg.run.seed,
                      alpha=d.dirichlet_alpha, dirichlet_by=d.dirichlet_by,
                      min_images=_min_train_images(cfg))
    parts, own_holdout = _client_sets(cfg, parts, _min_images_fix(cfg))
    return RunData(parts, holdout, own_holdout)


def load_node_data(cfg: Config, client_id: str, path: str | Path) -> tuple[ImageSet, ImageSet]:
    """One hospital's (training images, own held-out patients) from its own data ``path`` (a
    Flower node's data-path), treated exactly as :func:`load_client_data` treats a client's
    partition of data.path."""
    fix = (f"give node {client_id} more images (its data-path), a smaller "
           "data.client_holdout_fraction, or lower data.min_images_per_client")
    parts, own = _client_sets(cfg, {client_id: read_images(cfg, path)}, fix)
    return parts[client_id], own[client_id]


def read_images(cfg: Config, path: str | Path) -> ImageSet:
    """The images of ``path`` at the run's size, channels, folder layout and intensity."""
    d = cfg.data
    images = load_images(path, image_size=d.image_size, channels=d.channels, layout=d.layout)
    images.images = normalise_intensity(images.images, d.intensity)
    return images


def _client_sets(cfg: Config, parts: dict[str, ImageSet],
                 fix: str) -> tuple[dict[str, ImageSet], dict[str, ImageSet]]:
    """Each client's (training images, own held-out patients): data.client_holdout_fraction of
    its patients held out, at least data.min_images_per_client left (else a DataError with
    ``fix``), at most data.max_images_per_client kept."""
    d = cfg.data
    own_holdout = {name: part.subset([]) for name, part in parts.items()}
    if d.client_holdout_fraction:
        for name, part in parts.items():
            parts[name], own_holdout[name] = split_holdout(
                part, holdout_fraction=d.client_holdout_fraction, seed=cfg.run.seed)
    require_min_images(parts, d.min_images_per_client, fix)
    if d.max_images_per_client:
        parts = {name: part.subset(range(min(len(part), d.max_images_per_client)))
                 for name, part in parts.items()}
    return parts, own_holdout


def _min_train_images(cfg: Config) -> int:
    """What a client's partition must hold for data.min_images_per_client training images to be
    left after its own hold-out (data.client_holdout_fraction) of patients."""
    d = cfg.data
    return math.ceil(d.min_images_per_client / (1.0 - d.client_holdout_fraction))


def _min_images_fix(cfg: Config) -> str:
    """What to change in the config when a client has too few training images."""
    d = cfg.data
    fixes = {"site": "leave that site out of data.clients",
             "label": "leave that class out of data.clients",
             "dirichlet": "give fewer clients (data.num_clients) or a larger data.dirichlet_alpha "
                          "(less skew)"}
    fix = fixes.get(d.partition, "give fewer clients (data.num_clients)")
    if d.client_holdout_fraction:
        fix += ", a smaller data.client_holdout_fraction"
    return f"{fix}, or lower data.min_images_per_client"


def image_shape(cfg: Config) -> tuple[int, int, int]:
    return (cfg.data.channels, cfg.data.image_size, cfg.data.image_size)


def recipe(cfg: Config) -> Recipe:
    """The config's training recipe (model.prediction; train.loss_weighting, min_snr_gamma,
    lr_schedule, lr_warmup_steps over train.steps), the same for every party."""
    t = cfg.train
    return Recipe(prediction=cfg.model.prediction, loss_weighting=t.loss_weighting,
                  min_snr_gamma=t.min_snr_gamma, lr_schedule=t.lr_schedule,
                  lr_warmup_steps=t.lr_warmup_steps, total_steps=t.steps)


def server_classes(cfg: Config) -> int:
    """Classes of the server's model: the config's where it takes labels (condition "both")."""
    return len(cfg.model.classes) if cfg.model.condition == "both" else 0


def client_classes(cfg: Config) -> int:
    """Classes of a client's model: the config's unless the run is unconditional."""
    return len(cfg.model.classes) if cfg.model.condition != "none" else 0


def server_unet(cfg: Config):
    """The server's UNet as the run builds it (weights at their fresh initialisation)."""
    return make_unet(cfg.model.preset, cfg.data.image_size, cfg.data.channels,
                     server_classes(cfg))


def client_unet(cfg: Config, client_id: str):
    """Client ``client_id``'s UNet as the run builds it: its own preset where it has one."""
    return make_unet(cfg.preset(client_id), cfg.data.image_size, cfg.data.channels,
                     client_classes(cfg))


def make_server(cfg: Config, device: str | None = None, meter=None) -> Server:
    """The server, on ``device`` (default: ``run.device``), reporting its costs into ``meter``
    (default: nowhere)."""
    torch.manual_seed(party_seed(cfg, "server:init"))
    num_classes = server_classes(cfg)
    model = server_unet(cfg)
    scheduler = make_scheduler(cfg.diffusion.num_timesteps)
    T = cfg.diffusion.num_timesteps
    return Server(model, scheduler, cut_index(cfg.diffusion.cut_ratio, T),
                  cfg.train.protocol, image_shape(cfg), lr=cfg.train.lr,
                  seed=party_seed(cfg, "server"), ema_decay=cfg.train.ema_decay or None,
                  device=resolve_device(device or cfg.run.device), compile=cfg.train.compile,
                  cuts={cid: cut_index(cfg.cut_ratio(cid), T) for cid in cfg.clients},
                  num_classes=num_classes, label_dropout=cfg.model.label_dropout,
                  meter=meter, recipe=recipe(cfg))


def client_secret(secrets_dir: str | Path | None, client_id: str) -> bytes:
    """A client's secret, kept in ``secrets_dir/<id>.key`` (made there on first use); with no
    folder, a fresh one that lives as long as the process (nothing to resume)."""
    if secrets_dir is None:
        return os.urandom(SECRET_BYTES)
    return load_or_create_secret(Path(secrets_dir) / f"{client_id}.key", SECRET_BYTES)


def make_client(cfg: Config, client_id: str, images: ImageSet, secret: bytes,
                device: str | None = None, meter=None) -> Client:
    """A client, on ``device`` (default: ``run.device``; a Flower node may choose its own), with
    its own cut ratio and UNet preset where ``[clients.<id>]`` sets them, reporting its costs
    into ``meter`` (default: nowhere)."""
    torch.manual_seed(party_seed(cfg, f"client:{client_id}:init"))
    m = cfg.model
    num_classes = client_classes(cfg)
    model = client_unet(cfg, client_id)
    scheduler = make_scheduler(cfg.diffusion.num_timesteps)
    labels = torch.from_numpy(images.class_indices(m.classes)) if num_classes else None
    return Client(client_id, to_model(images.images), model, scheduler,
                  cut_index(cfg.cut_ratio(client_id), cfg.diffusion.num_timesteps),
                  cfg.train.protocol, cfg.train.batch_size, lr=cfg.train.lr,
                  seed=party_seed(cfg, f"client:{client_id}"), secret=secret,
                  ema_decay=cfg.train.ema_decay or None,
                  device=resolve_device(device or cfg.run.device), compile=cfg.train.compile,
                  labels=labels, num_classes=num_classes, label_dropout=m.label_dropout,
                  send_labels=m.condition == "both", local_steps=cfg.train.local_steps,
                  local_batch_size=cfg.train.local_batch_size, meter=meter,
                  recipe=recipe(cfg))


def total_rounds(cfg: Config, client_sizes: list[int], batches_per_round: int | None = None) -> int:
    """Rounds of K batches per client (K: ``batches_per_round``, default
    train.batches_per_round): train.steps batches, or train.epochs passes over the largest
    client's data (smaller clients then see their data more often)."""
    t = cfg.train
    steps = t.epochs * math.ceil(max(client_sizes) / t.batch_size) if t.epochs else t.steps
    return math.ceil(steps / (batches_per_round or t.batches_per_round))
