"""The paper's experiment: train and evaluate every cut ratio of a config under one seed.

For each c in ``sweep.cut_ratios`` a training run goes to ``<out>/c=<c>/`` (the in-process
engine; a finished run is kept, an interrupted one resumed), then every client is evaluated:

- performance: KID of its generated samples against its own training images and against the
  hold-out set;
- disclosed information: the server's hand-over x_{s-1} (pure noise for c = 1, the final
  images for c = 0) against the client's real training images: the paper's measures, mean
  pairwise MSE (blind to copying, see :mod:`.disclosure`) and KID; and the copy-sensitive
  measures on the server's own estimate of x0 from each hand-over (Tweedie with its model):
  nearest-neighbour MSE to the training images and :func:`.disclosure.memorisation` against
  the client's same-hospital held-out patients, each beside its no-copy baseline;
- cost per party and phase from a CostMeter (FLOPs, energy, seconds, bytes).

An evaluated cut ratio keeps its rows in ``c=<c>/evaluation.json``, so a rerun only does
what is missing. Features of real image sets are cached under ``<out>/cache``. The sweep
writes ``results.csv`` and ``results.json`` (one row per cut ratio and client), the figures
and ``report.md`` (:mod:`collafuse.evaluation.report`).
"""

from __future__ import annotations

import csv
import io
import json
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from ..config import Config, ConfigError, from_dict, load_config
from ..data import patient_ids, split_holdout, to_model, to_uint8
from ..engines.local import load_run, run_training
from ..metering import SERVER, client_party, totals
from ..privacy.attacks import tweedie_from_view
from ..state import save_npz, write_text
from ..tracking import log_sweep_rows
from .costs import CostMeter
from .disclosure import mean_nearest_neighbour_mse, mean_pairwise_mse, memorisation
from .kid import cached_features, kid, kid_bootstrap_interval
from .layout import EVALUATION, RESULTS, TRAJECTORY, cut_dir

TRAINING_PHASES = ("diffusion", "training")
# Generated images per sampling call: bounds memory at 128x128 without changing the method.
SAMPLE_CHUNK = 250


def cut_config(cfg: Config, cut_ratio: float) -> Config:
    """The training config of one cut ratio.

    The sweep and evaluation sections are reset to their defaults, so that changing how a
    sweep is evaluated (or which cut ratios it has) never invalidates a finished training run.
    """
    raw = cfg.to_dict()
    raw["diffusion"]["cut_ratio"] = cut_ratio
    del raw["sweep"], raw["evaluation"]
    return from_dict(raw, source=f"sweep c={cut_ratio:g}")


def run_sweep(cfg: Config, out: str | Path, progress: bool = True,
              max_cut_ratios: int | None = None, train: bool = True,
              evaluate: bool = True) -> list[dict]:
    """Train and evaluate every cut ratio; write results, figures and the report.

    ``max_cut_ratios`` stops after that many cut ratios, as an interruption would; a later call
    with the same ``out`` continues. ``train=False`` evaluates runs trained before, perhaps on
    another machine (each must be finished); ``evaluate=False`` only trains (for a machine
    without the Inception weights), and writes no results.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    write_text(out / "config.toml", cfg.to_toml())
    rows: list[dict] = []
    for i, c in enumerate(cfg.sweep.cut_ratios):
        if max_cut_ratios is not None and i >= max_cut_ratios:
            break
        run_dir = cut_dir(out, c)
        if train:
            train_cut(cfg, c, run_dir, progress)
        elif not _finished(cfg, c, run_dir):
            raise ConfigError(f"{run_dir}: no finished training run to evaluate; train it "
                              "first (collafuse sweep without --evaluate-only)")
        if evaluate:
            rows += evaluate_cut(cfg, run_dir, out / "cache", progress)
    if evaluate:
        from .report import write_report  # matplotlib: not needed where --train-only runs

        write_results(out, rows)
        log_sweep_rows(out, rows)  # TensorBoard (collafuse.tracking)
        write_report(out)
    return rows


def _finished(cfg: Config, cut_ratio: float, run_dir: Path) -> bool:
    """Whether run_dir holds a finished run of this cut ratio (an error if of another config).
    Where it ran does not matter (run.device is no part of a run's identity)."""
    if not (run_dir / "summary.json").is_file():
        return False
    config_file = run_dir / "config.toml"
    if load_config(config_file).identity() != cut_config(cfg, cut_ratio).identity():
        raise ConfigError(f"{config_file}: this finished run was made with another config; "
                          "choose another --out")
    return True


def train_cut(cfg: Config, cut_ratio: float, run_dir: Path, progress: bool = True) -> None:
    """Train one cut ratio, FLOPs and energy metered; keep a finished run, resume a begun one."""
    cfg_c = cut_config(cfg, cut_ratio)
    config_file = run_dir / "config.toml"
    if _finished(cfg, cut_ratio, run_dir):
        return
    _say(progress, f"c={cut_ratio:g}: training in {run_dir}")
    run_training(cfg_c, run_dir, resume=config_file.is_file(), progress=progress,
                 meter=CostMeter(energy=cfg.evaluation.energy))


def evaluate_cut(cfg: Config, run_dir: Path, cache: Path, progress: bool = True) -> list[dict]:
    """One row per client of a trained cut ratio (cached in ``evaluation.json``)."""
    key = {"evaluation": asdict(cfg.evaluation), "sample_seed": cfg.sample.seed}
    saved = run_dir / EVALUATION
    if saved.is_file():
        stored = json.loads(saved.read_text())
        if stored["key"] == key:
            return stored["rows"]
    ev = cfg.evaluation
    run = load_run(run_dir, device=cfg.run.device)
    device = str(run.server.device)
    training = json.loads((run_dir / "summary.json").read_text())["costs"]
    server_train = totals(training, SERVER, TRAINING_PHASES)
    holdout = _features(_subset(run.holdout.images, ev.max_real_images, cfg.run.seed), cache,
                        progress, device)
    rows = []
    for i, (cid, client) in enumerate(run.clients.items()):
        _say(progress, f"c={run.cfg.diffusion.cut_ratio:g}: evaluating client {cid}")
        meter = CostMeter(energy=ev.energy)
        for party in (run, run.server, client):
            party.meter = meter
        labels = run.labels_for(ev.num_samples)  # every class in turn, for a conditional run
        images, handover = _generate(run, cid, ev.num_samples, cfg.sample.seed + 1000 * i, labels)
        real = client.images
        real_feats = _features(_subset(to_uint8(real), ev.max_real_images, cfg.run.seed),
                               cache, progress, device)
        gen_feats = _features(to_uint8(images), cache, progress, device)
        handover_feats = _features(to_uint8(handover.clamp(-1.0, 1.0)), cache, progress, device)
        kid_args = {"num_subsets": ev.kid_subsets, "subset_size": ev.kid_subset_size,
                    "seed": cfg.run.seed}
        kid_train = kid(gen_feats, real_feats, **kid_args)
        kid_holdout = kid(gen_feats, holdout, **kid_args)
        # With fewer generated images than a subset, every subset holds all of them and the std
        # above says nothing about sampling; the bootstrap interval does.
        train_ci = kid_bootstrap_interval(gen_feats, real_feats, seed=cfg.run.seed)
        holdout_ci = kid_bootstrap_interval(gen_feats, holdout, seed=cfg.run.seed)
        kid_disclosure = kid(handover_feats, real_feats, **kid_args)
        client_train = totals(training, client_party(cid), TRAINING_PHASES)
        sampled = meter.rows()
        client_sample = totals(sampled, client_party(cid), ("sampling",))
        server_sample = totals(sampled, SERVER, ("sampling",))
        rows.append({
            "protocol": run.cfg.train.protocol,
            "cut_ratio": run.cfg.diffusion.cut_ratio,
            "cut_index": run.server.cut,
            # the client's own cut and model (the run's unless [clients.<id>] sets them)
            "client_cut_ratio": run.cfg.cut_ratio(cid),
            "client_cut_index": client.cut,
            "client_preset": run.cfg.preset(cid),
            "condition": run.cfg.model.condition,
            "num_timesteps": run.cfg.diffusion.num_timesteps,
            "client": cid,
            "train_images": len(real),
            "num_samples": ev.num_samples,
            "kid_train": kid_train[0], "kid_train_std": kid_train[1],
            "kid_train_ci_low": train_ci[0], "kid_train_ci_high": train_ci[1],
            "kid_holdout": kid_holdout[0], "kid_holdout_std": kid_holdout[1],
            "kid_holdout_ci_low": holdout_ci[0], "kid_holdout_ci_high": holdout_ci[1],
            "disclosure_mse": mean_pairwise_mse(handover.numpy(), real.numpy()),
            "disclosure_kid": kid_disclosure[0], "disclosure_kid_std": kid_disclosure[1],
            **copy_disclosure(run, cid, handover, cfg.run.seed),
            **_cost_columns("client", client_train),
            **_cost_columns("server", server_train),
            "client_flop_share": _share(client_train["flops"], server_train["flops"],
                                        len(run.clients)),
            "client_sampling_flops": client_sample["flops"],
            "server_sampling_flops": server_sample["flops"],
            "client_sampling_seconds": client_sample["seconds"],
            "server_sampling_seconds": server_sample["seconds"],
            "client_sampling_energy_kwh": client_sample["energy_kwh"],
            "server_sampling_energy_kwh": server_sample["energy_kwh"],
            "sampling_bytes": server_sample["bytes_sent"],
            "energy_is_estimate": meter.energy_is_estimate,
            **_per_class_kid(run, client, images, labels, cache, progress, device, kid_args),
        })
    _save_trajectory(run, run_dir / TRAJECTORY, ev.trajectory_steps, cfg.sample.seed)
    write_text(saved, json.dumps({"key": key, "rows": rows}, indent=2))
    return rows


def copy_disclosure(run, client_id: str, handover: torch.Tensor, seed: int) -> dict:
    """What the server's own x0 estimates of a client's hand-overs reveal about its images.

    The server denoises each hand-over with its model (Tweedie, as attack b of the audit;
    the final images themselves at c = 0; nothing at c = 1, where it hands over pure noise).
    ``x0_nn_mse``: mean nearest-neighbour MSE of the estimates to the client's training images,
    beside the same for real images of held-out patients of the hospital (``_baseline``: what
    a new image of that hospital scores). ``memorisation_*``: :func:`.disclosure.memorisation`,
    with those held-out patients split by patient into reference and no-copy probe.
    """
    server, train = run.server, run.clients[client_id].images.numpy()
    names = ["x0_nn_mse", "x0_nn_mse_baseline"] + [
        f"memorisation_{base}{stat}" for base in ("", "baseline_")
        for stat in ("nearer_train", "distance_ratio", "copy_fraction")]
    out = {f"disclosure_{n}": None for n in names}
    held = run.client_holdout.get(client_id)
    cut = server.cut_of(client_id)
    if cut == server.num_timesteps:
        return out
    with torch.no_grad():
        estimate = tweedie_from_view(server._sampling_eps, server.scheduler, handover, cut,
                                     torch.Generator().manual_seed(seed)).clamp(-1, 1).numpy()
    out["disclosure_x0_nn_mse"] = mean_nearest_neighbour_mse(estimate, train)
    if held is None or len(np.unique(patient_ids(held))) < 2:
        return out  # no same-hospital patients held out (data.client_holdout_fraction = 0)
    reference, probe = split_holdout(held, holdout_fraction=0.5, seed=seed)
    reference, probe = to_model(reference.images).numpy(), to_model(probe.images).numpy()
    out["disclosure_x0_nn_mse_baseline"] = mean_nearest_neighbour_mse(probe, train)
    out.update({f"disclosure_memorisation_{k}": v
                for k, v in memorisation(estimate, train, reference, probe).items()})
    return out


def _cost_columns(prefix: str, cost: dict) -> dict:
    """Training cost of one party: FLOPs, energy, seconds and bytes."""
    return {f"{prefix}_flops": cost["flops"], f"{prefix}_energy_kwh": cost["energy_kwh"],
            f"{prefix}_seconds": cost["seconds"], f"{prefix}_bytes_sent": cost["bytes_sent"],
            f"{prefix}_bytes_received": cost["bytes_received"]}


def _share(client_flops, server_flops, num_clients: int) -> float | None:
    """The client's share of the training FLOPs spent on its data.

    The server trains on the union of equal-sized batches from every client, so a client's
    part of the server's work is server_flops / num_clients.
    """
    if client_flops is None or server_flops is None:
        return None
    total = client_flops + server_flops / num_clients
    return client_flops / total if total else None


def _subset(images_uint8: np.ndarray, limit: int, seed: int) -> np.ndarray:
    """At most ``limit`` images (0 = all), a seeded choice in the original order."""
    if not limit or len(images_uint8) <= limit:
        return images_uint8
    keep = np.sort(np.random.default_rng(seed).choice(len(images_uint8), limit, replace=False))
    return images_uint8[keep]


def _features(images_uint8: np.ndarray, cache: Path, progress: bool,
              device: str = "cpu") -> np.ndarray:
    return cached_features(images_uint8, cache, progress=progress, device=device)


def _per_class_kid(run, client, images: torch.Tensor, labels: torch.Tensor | None, cache: Path,
                   progress: bool, device: str, kid_args: dict) -> dict:
    """A conditional run's KID per class: the samples generated for class k against the
    hold-out hospitals' images of class k (``kid_holdout/<k>``) and the client's own
    (``kid_train/<k>``). Nothing for an unconditional run."""
    if labels is None:
        return {}
    classes, limit, seed = run.cfg.model.classes, run.cfg.evaluation.max_real_images, run.cfg.run.seed
    holdout_labels = run.holdout.class_indices(classes)
    out = {}
    for k, name in enumerate(classes):
        gen = _features(to_uint8(images[labels == k]), cache, progress, device)
        real = _features(_subset(to_uint8(client.images[client.labels == k]), limit, seed),
                         cache, progress, device)
        held = _features(_subset(run.holdout.images[holdout_labels == k], limit, seed), cache,
                         progress, device)
        out[f"kid_train/{name}"] = kid(gen, real, **kid_args)[0]
        out[f"kid_holdout/{name}"] = kid(gen, held, **kid_args)[0] if len(held) > 1 else None
    return out


def _generate(run, client_id: str, num_samples: int, seed: int,
              labels: torch.Tensor | None = None):
    """Split inference in chunks (seeds seed, seed + 1, ...): (images, hand-over) in [-1, 1],
    of the classes ``labels`` for a conditional run."""
    images, handover = [], []
    for k, start in enumerate(range(0, num_samples, SAMPLE_CHUNK)):
        stop = min(num_samples, start + SAMPLE_CHUNK)
        x, h = run.sample(client_id, stop - start, seed + k,
                          labels=None if labels is None else labels[start:stop])
        images.append(x)
        handover.append(h)
    return torch.cat(images), torch.cat(handover)


def trajectory(run, client_id: str, num_steps: int, seed: int) -> tuple[list[int], np.ndarray]:
    """One sample's way from noise to image, recorded along the split sampler itself.

    Returns the marks t after whose step x was recorded (the first, T, is the pure noise) and
    the uint8 images (len(marks), H, W[, C]). The same seed gives every cut ratio the same
    starting noise (the server's stream for that seed).
    """
    frames = {}

    def record(t, x):
        frames[t] = x.clone()

    run.sample(client_id, 1, seed, on_step=record)
    # evenly spaced among the levels the sampler visited (all T + 1, or a sub-schedule's)
    visited = sorted(frames, reverse=True)
    marks = sorted({visited[round(i * (len(visited) - 1) / (num_steps - 1))]
                    for i in range(num_steps)}, reverse=True)
    return marks, to_uint8(torch.cat([frames[m] for m in marks]))


def _save_trajectory(run, path: Path, num_steps: int, seed: int) -> None:
    first = next(iter(run.clients))
    steps, images = trajectory(run, first, num_steps, seed)
    save_npz(path, steps=np.array(steps), images=images, cut=run.server.cut_of(first), client=first)


def write_results(out: Path, rows: list[dict]) -> None:
    """results.json and results.csv, each written to a temp file and renamed."""
    write_text(out / f"{RESULTS}.json", json.dumps(rows, indent=2))
    buffer = io.StringIO()
    if rows:
        writer = csv.DictWriter(buffer, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    write_text(out / f"{RESULTS}.csv", buffer.getvalue())


def _say(progress: bool, line: str) -> None:
    if progress:
        print(line, flush=True)
