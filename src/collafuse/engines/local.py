"""The in-process engine: carries messages between parties that live in one Python process.

One round (:func:`.rounds.run_rounds`, the order both engines share): every client diffuses K
batches, trains on its own timesteps and returns its server-bound messages; then the server
takes one step per batch index on the union of the clients' messages of that index (clients
in config order). :class:`Run` is the in-process transport, :class:`RunKeeper` what this
engine keeps of a round.

A run folder (docs/design.md section 5) holds the resolved config, one checkpoint written
atomically every ``train.checkpoint_every`` rounds, the metrics log, TensorBoard events
(:mod:`collafuse.tracking`), sample grids and a summary.
"""

from __future__ import annotations

import csv
import hashlib
import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from ..client import class_labels
from ..config import Config, ConfigError, load_config
from ..data import save_grid, save_side_by_side, to_uint8
from ..factory import client_secret, load_client_data, make_client, make_server, total_rounds
from ..metering import SERVER, WallMeter, client_party, totals
from ..state import StateError, atomic_path, load_state, save_npz, save_state, write_text
from ..tracking import Tracker
from .rounds import ClientReplies, run_rounds, server_step

CHECKPOINT = "checkpoint.pt"
METRICS = "metrics.jsonl"
MANIFEST = "manifest.csv"  # an exported sample folder's index (see export_samples)
MANIFEST_FIELDS = ("file", "client", "class", "seed", "sampler", "calls", "config_hash")
SECRETS = "client-secrets"  # the clients' secrets; in a deployment each stays on its node
# real | generated figures enlarge small images to about this many pixels a side: at 32x32 a
# ventricle is a few pixels, too small to judge in a 36-image grid
FIGURE_TILE = 96


class Run:
    """The parties of one run and the bookkeeping around them.

    ``meter`` (default: wall seconds and bytes only) is shared by all parties; they measure
    their own phases, the engine adds the bytes of every message it carries. Pass an
    ``evaluation.costs.CostMeter`` for FLOPs and energy.

    Each client's secret comes from ``secrets`` (tests inject them), else from
    ``secrets_dir/<id>.key`` (made on first use), else is fresh for this process.
    """

    def __init__(self, cfg: Config, meter=None, secrets_dir: Path | None = None,
                 secrets: dict[str, bytes] | None = None):
        self.cfg = cfg
        self.meter = meter or WallMeter()
        data = load_client_data(cfg)
        self.holdout, self.client_holdout = data.holdout, data.client_holdout
        self.server = make_server(cfg, meter=self.meter)
        secrets = secrets or {}
        self.clients = {
            cid: make_client(cfg, cid, images,
                             secrets[cid] if cid in secrets else client_secret(secrets_dir, cid),
                             meter=self.meter)
            for cid, images in data.clients.items()}
        self.rounds = total_rounds(cfg, [len(d) for d in data.clients.values()])
        self.round = 0
        self.round_bytes: dict[str, int] = {}  # what each client sent the server last round

    def request(self, rnd: int) -> None:
        """In-process clients need no asking: they train when their replies are collected."""

    def replies(self, rnd: int) -> ClientReplies:
        """The client steps of a round (:class:`.rounds.Transport`), every message counted."""
        messages, nbytes = {}, {}
        for cid, client in self.clients.items():
            messages[cid] = client.train_round(self.cfg.train.batches_per_round)
            nbytes[cid] = sum(m.nbytes for m in messages[cid])
            self._count(client.name, SERVER, nbytes[cid], "training")
        return ClientReplies(messages, {cid: c.loss for cid, c in self.clients.items()}, nbytes)

    def train_round(self) -> dict:
        """One round; returns its metrics line with the losses still on the device (0-d
        tensors): :func:`read_losses` turns lines into floats, waiting for the device once."""
        rnd = self.round + 1
        replies = self.replies(rnd)
        return self.finish_round(rnd, replies, server_step(self.server, replies,
                                                           self.cfg.train.batches_per_round))

    def finish_round(self, rnd: int, replies: ClientReplies, server_losses: list) -> dict:
        """Mark round ``rnd`` done; its metrics line (losses as 0-d tensors)."""
        self.round = rnd
        self.round_bytes = {client_party(cid): n for cid, n in replies.nbytes.items()}
        return {
            "round": rnd,
            "server_loss": [x for x in server_losses if x is not None],
            **{f"client_loss/{cid}": loss for cid, loss in replies.losses.items()},
        }

    def party_losses(self, line: dict) -> dict[str, float | None]:
        """A metrics line of :func:`read_losses` keyed by party (``server``, ``client:<id>``)."""
        return {SERVER: line["server_loss"],
                **{c.name: line[f"client_loss/{cid}"] for cid, c in self.clients.items()}}

    def learning_rates(self) -> dict[str, float]:
        """Each party's lr of its last optimiser step (the base lr before the first)."""
        return {p.name: p.optimizer.param_groups[0]["lr"]
                for p in [self.server, *self.clients.values()]}

    def sample(self, client_id: str, num_samples: int, seed: int, on_step=None,
               labels: torch.Tensor | None = None) -> tuple:
        """Split inference for one client; returns (images in [-1, 1], the server's hand-over).

        Server and client draw from their own streams for ``seed``; ``on_step(t, x)`` sees every
        step of both halves (see :func:`collafuse.diffusion.denoise`). A conditional run
        generates the classes ``labels`` (see :meth:`labels_for`), guided at
        sample.guidance_scale; the request carries them only where the server's model takes
        them (model.condition = "both")."""
        client, s = self.clients[client_id], self.cfg.sample
        request = client.request_samples(num_samples, seed, s.sampler, s.steps, labels,
                                         s.guidance_scale)
        self._count(client.name, SERVER, request.nbytes, "sampling")
        partial = self.server.generate(request, on_step)
        self._count(SERVER, client.name, partial.nbytes, "sampling")
        images = client.finish_samples(partial, seed, on_step, labels, s.guidance_scale)
        return images.cpu(), partial.x.cpu()

    def labels_for(self, num_samples: int, label: str = "") -> torch.Tensor | None:
        """Class indices of ``num_samples`` samples: all of class ``label``, or ("") every class
        of model.classes in equal blocks, in order; None for an unconditional run."""
        return class_labels(self.cfg.model.classes, self.cfg.model.condition != "none",
                            num_samples, label)

    def _count(self, sender: str, receiver: str, nbytes: int, phase: str) -> None:
        self.meter.add_bytes(sender, sent=nbytes, phase=phase)
        self.meter.add_bytes(receiver, received=nbytes, phase=phase)

    def party_totals(self) -> dict[str, dict]:
        """Bytes and seconds per party over all phases, keyed "server" and by client id."""
        rows = self.meter.rows()
        names = {SERVER: SERVER, **{cid: client_party(cid) for cid in self.clients}}
        return {key: totals(rows, name) for key, name in names.items()}

    def state_dict(self) -> dict:
        return {
            "round": self.round,
            "server": self.server.state_dict(),
            "clients": {cid: c.state_dict() for cid, c in self.clients.items()},
            "costs": self.meter.rows(),
        }

    def load_state_dict(self, state: dict) -> None:
        self.round = state["round"]
        self.server.load_state_dict(state["server"])
        for cid, client in self.clients.items():
            client.load_state_dict(state["clients"][cid])
        self.meter.restore(state.get("costs", []))

    @property
    def resumable(self) -> bool:
        """Whether every party's random streams continued from the loaded state (they do not
        when it was saved on another kind of device: weights load anywhere, streams do not)."""
        return all(p.resumable for p in [self.server, *self.clients.values()])


def read_losses(lines: list[dict]) -> list[dict]:
    """Metrics lines of :meth:`Run.train_round` with their losses as floats (None where a party
    has not trained yet); the server's is the mean over the round's steps."""
    def value(x):
        if isinstance(x, list):
            return float(np.mean([v.item() for v in x])) if x else None
        return None if x is None else x.item()
    return [{k: v if k == "round" else value(v) for k, v in line.items()} for line in lines]


def run_training(cfg: Config, run_dir: str | Path, resume: bool = False,
                 stop_after_round: int | None = None, progress: bool = True,
                 meter=None, secrets: dict[str, bytes] | None = None,
                 on_round=None) -> Run:
    """Train (or resume) a run in ``run_dir``; sample and summarise when training is complete.

    ``on_round(round)`` is called after every round (a sweep's progress bar over many runs).

    ``stop_after_round`` ends the run early after checkpointing, as an interruption would.
    ``meter`` records every party's cost (see :class:`Run`); it is checkpointed with the run.
    The clients' secrets live in ``run_dir/client-secrets/`` unless ``secrets`` injects them.
    """
    run_dir = Path(run_dir)
    _check_run_dir(cfg, run_dir, resume)
    run = Run(cfg, meter, run_dir / SECRETS, secrets)
    if resume:
        if (run_dir / CHECKPOINT).is_file():
            run.load_state_dict(load_state(run_dir / CHECKPOINT))
            if not run.resumable:
                raise StateError(f"{run_dir / CHECKPOINT}: saved on another kind of device than "
                                 f"run.device = {cfg.run.device!r}; resume it on that kind "
                                 "(--device) so that its random streams continue exactly")
        truncate_metrics(run_dir / METRICS, run.round)
    else:
        write_text(run_dir / "config.toml", cfg.to_toml())
    with Tracker.of_run(run_dir, run.round) as tracker, \
            tqdm(total=run.rounds, initial=run.round, desc=f"train c={cfg.diffusion.cut_ratio}",
                 disable=not progress, unit="round") as bar, \
            open(run_dir / METRICS, "a") as log:
        keeper = RunKeeper(run, run_dir, tracker, bar, log, on_round)
        until = run.rounds if stop_after_round is None else min(run.rounds, stop_after_round)
        run_rounds(run.server, run, keeper, run.round, until, cfg.train.batches_per_round)
        if run.round < run.rounds:
            return run
        for cid, path in write_samples(run, run_dir).items():
            with np.load(path.with_suffix(".npz")) as saved:
                tracker.grid(f"samples/{cid}", saved["images"], run.round)
    write_summary(run, run_dir)
    return run


class RunKeeper:
    """What the in-process engine keeps of each round (:class:`.rounds.Keeper`): metrics lines
    every train.log_every rounds (the losses are read from the device then, once), TensorBoard,
    a checkpoint every train.checkpoint_every, sample grids every train.sample_every."""

    def __init__(self, run: Run, run_dir: Path, tracker: Tracker, bar, log, on_round=None):
        self.run, self.run_dir, self.tracker, self.bar, self.log = run, run_dir, tracker, bar, log
        self.on_round = on_round
        self.pending: list[dict] = []  # lines whose losses have not been read from the device

    def record(self, rnd: int, replies: ClientReplies, server_losses: list) -> None:
        run = self.run
        self.pending.append(run.finish_round(rnd, replies, server_losses))
        self.tracker.scalars("lr", run.learning_rates(), rnd)
        self.tracker.scalars("bytes", run.round_bytes, rnd)
        if rnd % run.cfg.train.log_every == 0:
            self._write_lines()

    def checkpoint(self, rnd: int, final: bool) -> None:
        if final or rnd % self.run.cfg.train.checkpoint_every == 0:
            self._write_lines()
            self.log.flush()
            save_state(self.run.state_dict(), self.run_dir / CHECKPOINT)

    def progress(self, rnd: int) -> None:
        self.bar.update(1)
        if self.on_round is not None:
            self.on_round(rnd)
        # every sample_every rounds; the last round's grid is the final samples'
        every = self.run.cfg.train.sample_every
        if every and rnd % every == 0 and rnd < self.run.rounds:
            track_samples(self.run, self.tracker)

    def _write_lines(self) -> None:
        if not self.pending:
            return
        lines = read_losses(self.pending)
        self.pending.clear()
        self.log.writelines(json.dumps(line) + "\n" for line in lines)
        for line in lines:
            self.tracker.scalars("loss", self.run.party_losses(line), line["round"])
        self.bar.set_postfix({k.split("/")[-1]: f"{v:.3f}" for k, v in lines[-1].items()
                              if k != "round" and v is not None}, refresh=False)


def track_samples(run: Run, tracker: Tracker) -> None:
    """A grid per client in TensorBoard: sample.num_samples split samples at sample.seed."""
    s = run.cfg.sample
    labels = run.labels_for(s.num_samples, s.label)
    for cid in run.clients:
        images, _ = run.sample(cid, s.num_samples, s.seed, labels=labels)
        tracker.grid(f"samples/{cid}", to_uint8(images), run.round)


def _check_run_dir(cfg: Config, run_dir: Path, resume: bool) -> None:
    """A fresh run needs an empty or new folder; a resumed one its own config, unchanged."""
    config_file = run_dir / "config.toml"
    if resume:
        if not config_file.is_file():
            raise ConfigError(f"{run_dir}: not a run folder (no config.toml) to resume")
        if load_config(config_file).identity() != cfg.identity():
            raise ConfigError(f"{config_file}: the run was made with another config; resume "
                              "it with `collafuse train --resume` and no changes")
    elif run_dir.exists() and any(run_dir.iterdir()):
        raise ConfigError(f"{run_dir}: folder exists and is not empty; choose another --out "
                          "or add --resume")


def truncate_metrics(path: Path, last_round: int) -> None:
    """Drop log lines written after the checkpoint, which the resumed run will redo."""
    if not path.is_file():
        return
    lines = [ln for ln in path.read_text().splitlines()
             if ln.strip() and json.loads(ln)["round"] <= last_round]
    write_text(path, "".join(ln + "\n" for ln in lines))


def write_samples(run: Run, run_dir: Path, num_samples: int | None = None,
                  seed: int | None = None, label: str | None = None) -> dict[str, Path]:
    """Split inference for every client: a PNG grid and an npz per client under samples/, and
    ``<id>-real-vs-generated.png``: as many of the client's own images (left) beside them.
    A conditional run generates class ``label`` (default sample.label; "": every class in
    turn, one block of the grid each)."""
    num_samples = num_samples or run.cfg.sample.num_samples
    seed = run.cfg.sample.seed if seed is None else seed
    labels = run.labels_for(num_samples, run.cfg.sample.label if label is None else label)
    out = {}
    for cid, client in run.clients.items():
        images, handover = run.sample(cid, num_samples, seed, labels=labels)
        names = None if labels is None else np.array(run.cfg.model.classes)[labels.numpy()]
        out[cid], _ = save_samples(run_dir / "samples", cid, images, handover, names)
        # beside as many of the client's own training images, drawn at random: judge at a glance
        pick = torch.randperm(len(client.images), generator=torch.Generator().manual_seed(seed))
        if labels is not None:  # as many of each class (labels_for gives ascending blocks)
            classes, counts = labels.unique(return_counts=True)
            pick = torch.cat([pick[client.labels[pick] == k][:n] for k, n in zip(classes, counts)])
        real = client.images[pick[:len(images)]]
        if len(real) == len(images):
            save_side_by_side(to_uint8(real), to_uint8(images),
                              run_dir / "samples" / f"{cid}-real-vs-generated.png",
                              nrow=int(np.ceil(np.sqrt(len(images)))),
                              scale=max(1, FIGURE_TILE // images.shape[-1]))
    return out


def save_samples(folder: Path, client_id: str, images, handover,
                 labels: np.ndarray | None = None) -> tuple[Path, Path]:
    """A client's finished samples as a PNG grid, and as uint8 in an npz with the hand-over
    (and each sample's class name, for a conditional run)."""
    pixels = to_uint8(images)
    png, npz = folder / f"{client_id}.png", folder / f"{client_id}.npz"
    save_grid(pixels, png, nrow=int(np.ceil(np.sqrt(len(pixels)))))
    extra = {} if labels is None else {"labels": labels}
    save_npz(npz, images=pixels, handover=handover.numpy(), **extra)
    return png, npz


def config_hash(cfg: Config) -> str:
    """16 hex digits of sha256 over the run's identity (its config without runtime fields):
    what a sample folder records, so that images can be traced to the run that made them."""
    text = json.dumps(cfg.identity(), sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def export_samples(run: Run, out_dir: str | Path, num_samples: int, seed: int | None = None,
                   label: str | None = None, batch_size: int = 64,
                   progress: bool = True) -> Path:
    """Split inference for every client, written as an image folder a hospital can use:
    ``out_dir/<client>/<class>/<n>.png`` (no class level for an unconditional run) and
    ``out_dir/manifest.csv`` (MANIFEST_FIELDS, one row per image). ``collafuse data prepare``
    reads it back (layout site/class; an unconditional export: layout site).

    Samples are drawn ``batch_size`` at a time through :meth:`Run.sample` and written at once,
    so memory stays flat for any ``num_samples``; batch b of every client uses sampling seed
    ``seed + b`` (the manifest records it). A conditional run generates class ``label``, or
    ("") every class of model.classes in equal blocks. Each PNG is written atomically and the
    manifest is flushed after every batch: an interrupted export leaves complete images only,
    and the manifest lists every finished batch.
    """
    out_dir = Path(out_dir)
    if batch_size < 1 or num_samples < 1:
        raise ValueError(f"export: expected -n and the batch size >= 1, got {num_samples} and "
                         f"{batch_size}")
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise ValueError(f"{out_dir}: exists and is not an empty folder; choose another --export")
    cfg = run.cfg
    seed = cfg.sample.seed if seed is None else seed
    labels = run.labels_for(num_samples, cfg.sample.label if label is None else label)
    calls = cfg.sample.steps if 0 < cfg.sample.steps < cfg.diffusion.num_timesteps \
        else cfg.diffusion.num_timesteps
    fixed = {"sampler": cfg.sample.sampler, "calls": calls, "config_hash": config_hash(cfg)}
    out_dir.mkdir(parents=True, exist_ok=True)
    with open(out_dir / MANIFEST, "w", newline="") as f, \
            tqdm(total=num_samples * len(run.clients), desc="export", unit="image",
                 disable=not progress) as bar:
        manifest = csv.DictWriter(f, MANIFEST_FIELDS)
        manifest.writeheader()
        for cid in run.clients:
            for b, start in enumerate(range(0, num_samples, batch_size)):
                n = min(batch_size, num_samples - start)
                batch_labels = None if labels is None else labels[start:start + n]
                images, _ = run.sample(cid, n, seed + b, labels=batch_labels)
                for i, pixels in enumerate(to_uint8(images)):
                    name = "" if labels is None else cfg.model.classes[int(batch_labels[i])]
                    file = Path(cid, name, f"{start + i}.png")
                    with atomic_path(out_dir / file) as tmp:
                        Image.fromarray(pixels).save(tmp, format="PNG")
                    manifest.writerow({"file": file.as_posix(), "client": cid, "class": name,
                                       "seed": seed + b, **fixed})
                f.flush()
                bar.update(n)
    return out_dir


def write_summary(run: Run, run_dir: Path) -> dict:
    cfg = run.cfg
    summary = {
        "protocol": cfg.train.protocol,
        "cut_ratio": cfg.diffusion.cut_ratio,
        "cut_index": run.server.cut,
        "num_timesteps": cfg.diffusion.num_timesteps,
        "rounds": run.round,
        "server_steps": run.server.steps,
        "server_loss": run.server.last_loss,
        "clients": {cid: {"images": len(c.images), "loss": c.last_loss, "cut_index": c.cut,
                          "preset": cfg.preset(cid)}
                    for cid, c in run.clients.items()},
        "bytes": {name: {"sent": t["bytes_sent"], "received": t["bytes_received"]}
                  for name, t in run.party_totals().items()},
        "seconds": {name: t["seconds"] or 0.0 for name, t in run.party_totals().items()},
        "costs": run.meter.rows(),
    }
    write_text(run_dir / "summary.json", json.dumps(summary, indent=2))
    return summary


def load_run(run_dir: str | Path, meter=None, device: str | None = None) -> Run:
    """Rebuild a finished or interrupted run from its folder (costs continue in ``meter``), its
    parties on ``device`` (default: the run's ``run.device``) wherever it was trained."""
    run_dir = Path(run_dir)
    cfg = load_config(run_dir / "config.toml")
    if device is not None:
        cfg.run.device = device
    run = Run(cfg, meter, run_dir / SECRETS)
    run.load_state_dict(load_state(run_dir / CHECKPOINT))
    return run
