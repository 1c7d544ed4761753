"""The paper's experiment: train and evaluate every protocol, cut ratio and training seed.

The plan (:func:`sweep_plan`): for each protocol of ``sweep.protocols`` its cut ratios and
training seeds (``sweep.cut_ratios`` and ``sweep.seeds``, or the protocol's own from a
``[[sweep.grid]]`` entry). Each (protocol, c, seed) trains its own run in
``<out>/<protocol>/c=<c>-seed=<seed>/`` (the in-process engine; a finished run is kept, an
interrupted one resumed), then every client is evaluated:

- performance: KID of its generated samples against its own training images and against the
  hold-out set;
- disclosed information: the server's hand-over x_{s-1} (pure noise for c = 1, the final
  images for c = 0) against the client's real training images: the paper's measures, mean
  pairwise MSE (blind to copying, see :mod:`.disclosure`) and KID; and the copy-sensitive
  measures on the server's own estimate of x0 from each hand-over (Tweedie with its model):
  nearest-neighbour MSE to the training images and :func:`.metrics.memorisation` against
  the client's same-hospital held-out patients, each beside its no-copy baseline;
- cost per party and phase from a CostMeter (FLOPs, energy, seconds, bytes).

A training seed is the run's ``run.seed`` (initial weights, data split, training draws) and
the seed of its evaluation (generated samples, real subsets, KID subsets), so that seeds are
independent replicates and an interval over them holds both kinds of variance
(:mod:`.intervals`). An evaluated run keeps its rows in its ``evaluation.json``, so a rerun only
does what is missing. Features of real image sets are cached under ``<out>/cache``. Before it
starts the sweep measures its pace and prints a projection (:mod:`.pace`); one progress bar
runs over the whole sweep. It writes ``results.csv`` and ``results.json`` (one row per run and
client), the figures and ``report.md`` (:mod:`collafuse.evaluation.report`).
"""

from __future__ import annotations

import csv
import io
import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from ..config import Config, ConfigError, from_dict, load_config
from ..data import patient_ids, split_holdout, to_model, to_uint8
from ..diffusion import tweedie_from_view
from ..engines.local import CHECKPOINT, METRICS, load_run, run_training
from ..metering import SERVER, client_party, totals
from ..state import save_npz, write_text
from ..tracking import log_sweep_rows
from .costs import CostMeter
from .kid import cached_features, kid, kid_bootstrap_interval
from .layout import EVALUATION, RESULTS, TRAJECTORY, run_dir
from .metrics import mean_nearest_neighbour_mse, mean_pairwise_mse, memorisation, near_copies
from .pace import SweepBar, project

TRAINING_PHASES = ("diffusion", "training")
# Generated images per sampling call: bounds memory at 128x128 without changing the method.
SAMPLE_CHUNK = 250
# Seeds of a client's generated samples: sample.seed + CLIENT_STRIDE * client index +
# SEED_STRIDE * training seed. Every cut ratio of a training seed draws the same noise (paired
# comparisons); each training seed its own, since models of different seeds map the same noise
# to similar images, which would tie the seeds' KIDs together and narrow their interval falsely.
CLIENT_STRIDE, SEED_STRIDE = 1000, 100_000


@dataclass(frozen=True)
class SweepRun:
    """One training run of a sweep."""

    protocol: str
    cut_ratio: float
    seed: int

    def label(self) -> str:
        return f"{self.protocol} c={self.cut_ratio:g} seed={self.seed}"


def sweep_plan(cfg: Config) -> list[SweepRun]:
    """Every (protocol, c, seed) of the sweep: seed by seed (an interrupted sweep has whole
    seeds), and within a seed protocol by protocol, c in the config's order."""
    grid = {entry["protocol"]: entry for entry in cfg.sweep.grid}
    axes = []
    for protocol in cfg.sweep.protocols or [cfg.train.protocol]:
        entry = grid.get(protocol, {})
        cuts = entry.get("cut_ratios", cfg.sweep.cut_ratios)
        seeds = entry.get("seeds", cfg.sweep.seeds or [cfg.run.seed])
        axes.append((protocol, [float(c) for c in cuts], [int(k) for k in seeds]))
    seeds = sorted({k for _, _, ks in axes for k in ks})
    return [SweepRun(protocol, c, k) for k in seeds for protocol, cuts, ks in axes
            if k in ks for c in cuts]


def with_seeds(cfg: Config, seeds: list[int]) -> Config:
    """``cfg`` whose every protocol trains these seeds (``collafuse sweep --seeds``)."""
    raw = cfg.to_dict()
    raw["sweep"]["seeds"] = list(seeds)
    raw["sweep"]["grid"] = [{k: v for k, v in e.items() if k != "seeds"}
                            for e in raw["sweep"]["grid"]]
    return from_dict(raw, source="--seeds")


def run_config(cfg: Config, spec: SweepRun) -> Config:
    """The training config of one run: the sweep's with the run's protocol, cut ratio and
    run.seed.

    The sweep and evaluation sections are reset to their defaults, so that changing how a
    sweep is evaluated (or which runs it has) never invalidates a finished training run.
    """
    raw = cfg.to_dict()
    raw["diffusion"]["cut_ratio"] = spec.cut_ratio
    raw["train"]["protocol"] = spec.protocol
    raw["run"]["seed"] = spec.seed
    del raw["sweep"], raw["evaluation"]
    return from_dict(raw, source=f"sweep {spec.label()}")


def run_sweep(cfg: Config, out: str | Path, progress: bool = True,
              max_runs: int | None = None, train: bool = True,
              evaluate: bool = True) -> list[dict]:
    """Train and evaluate every run of the plan; write results, figures and the report.

    ``max_runs`` stops after that many runs, as an interruption would; a later call with the
    same ``out`` continues. ``train=False`` evaluates runs trained before, perhaps on another
    machine: the finished ones, naming the others in the report (an error if none is
    finished); ``evaluate=False`` only trains (for a machine without the Inception weights),
    and writes no results.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    write_text(out / "config.toml", cfg.to_toml())
    plan = sweep_plan(cfg)[:max_runs]
    untrained: list[str] = []  # labels of the planned runs not trained yet
    if not train:
        # A sweep of hours is often read before it ends: evaluate and report the finished
        # runs, and name the others (on screen and in report.md), but never report nothing.
        finished = [s for s in plan if _finished(cfg, s, run_dir(out, *_key(s)))]
        if not finished:
            raise ConfigError(f"{out}: no finished training run to evaluate; train first "
                              "(collafuse sweep without --evaluate-only)")
        untrained = [s.label() for s in plan if s not in finished]
        if untrained and progress:
            print(f"sweep: evaluating {len(finished)} of {len(plan)} planned runs; not "
                  f"trained yet: {', '.join(untrained)}", flush=True)
        plan = finished
    if progress and any(s.protocol == "noisy-data" and s.cut_ratio == 0.0 for s in plan):
        print(NOISY_DATA_AT_ZERO, flush=True)
    projection = _project(cfg, out, plan, train, evaluate) if progress else None
    if projection is not None:
        print(projection.text(), flush=True)
    rows: list[dict] = []
    with SweepBar(projection, enabled=progress) as bar:
        for spec in plan:
            folder = run_dir(out, *_key(spec))
            if train:
                train_run(cfg, spec, folder, bar)
            if evaluate:
                rows += evaluate_run(cfg, spec, folder, out / "cache", bar)
    if evaluate:
        from .report import write_report  # matplotlib: not needed where --train-only runs

        write_results(out, rows)
        log_sweep_rows(out, rows)  # TensorBoard (collafuse.tracking)
        write_report(out, untrained=untrained)
    return rows


NOISY_DATA_AT_ZERO = (
    "note: noisy-data at c = 0: the client owns no noise level, so its one view per image is "
    "taken at no noise: the server receives the clean images (everything is disclosed, as "
    "under shared-noise at c = 0) and trains an ordinary DDPM on them")


def _project(cfg: Config, out: Path, plan: list[SweepRun], train: bool, evaluate: bool):
    """Measure the pace here and project the sweep's remaining wall time (:mod:`.pace`)."""
    def rounds_left(spec):
        folder = run_dir(out, *_key(spec))
        return None if not train or _finished(cfg, spec, folder) else rounds_done(folder)

    return project(plan, lambda spec: run_config(cfg, spec), rounds_left,
                   lambda spec: evaluated(cfg, spec, run_dir(out, *_key(spec))) is None,
                   cfg.evaluation if evaluate else None)


def _key(spec: SweepRun) -> tuple:
    return spec.protocol, spec.cut_ratio, spec.seed


def _finished(cfg: Config, spec: SweepRun, folder: Path) -> bool:
    """Whether ``folder`` holds this finished run (an error if a run of another config).
    Where it ran does not matter (run.device is no part of a run's identity)."""
    if not (folder / "summary.json").is_file():
        return False
    config_file = folder / "config.toml"
    if load_config(config_file).identity() != run_config(cfg, spec).identity():
        raise ConfigError(f"{config_file}: this finished run was made with another config; "
                          "choose another --out")
    return True


def rounds_done(folder: Path) -> int:
    """Rounds an unfinished run has logged (its checkpoint is at most checkpoint_every
    rounds behind): for the projection only."""
    path = folder / METRICS
    if not path.is_file():
        return 0
    lines = [ln for ln in path.read_text().splitlines() if ln.strip()]
    return json.loads(lines[-1])["round"] if lines else 0


def train_run(cfg: Config, spec: SweepRun, folder: Path, bar: SweepBar | None = None) -> None:
    """Train one run, FLOPs and energy metered; keep a finished run, resume a begun one."""
    bar = bar or SweepBar(None)
    if _finished(cfg, spec, folder):
        return
    bar.describe(f"training {spec.label()}")
    run_training(run_config(cfg, spec), folder, resume=(folder / "config.toml").is_file(),
                 progress=False, meter=CostMeter(energy=cfg.evaluation.energy),
                 on_round=bar.training_round(spec))
    bar.training_done(spec)


def evaluation_key(cfg: Config, spec: SweepRun) -> dict:
    """What a run's evaluation depends on besides the run: stored beside its rows."""
    return {"evaluation": asdict(cfg.evaluation), "sample_seed": cfg.sample.seed,
            "seed": spec.seed}


def evaluated(cfg: Config, spec: SweepRun, folder: Path) -> list[dict] | None:
    """The run's stored rows when they were evaluated under this config, else None."""
    saved = folder / EVALUATION
    if saved.is_file():
        stored = json.loads(saved.read_text())
        if stored["key"] == evaluation_key(cfg, spec):
            return stored["rows"]
    return None


def evaluate_run(cfg: Config, spec: SweepRun, folder: Path, cache: Path,
                 bar: SweepBar | None = None) -> list[dict]:
    """One row per client of a trained run (cached in ``evaluation.json``)."""
    bar = bar or SweepBar(None)
    rows = evaluated(cfg, spec, folder)
    if rows is not None:
        return rows
    if not (folder / CHECKPOINT).is_file():
        raise ConfigError(f"{folder}: no checkpoint here (a committed sweep folder keeps each "
                          "run's rows, not its weights), and its rows were evaluated under "
                          "other [evaluation] settings: evaluate with those, or delete the run "
                          "folder to train it again")
    ev, seed = cfg.evaluation, spec.seed
    meter = CostMeter(energy=ev.energy)  # the parties report their sampling costs here
    run = load_run(folder, meter=meter, device=cfg.run.device)
    device = str(run.server.device)
    training = json.loads((folder / "summary.json").read_text())["costs"]
    server_train = totals(training, SERVER, TRAINING_PHASES)
    inner = False  # the sweep's one bar, not one per feature set
    holdout = _features(_subset(run.holdout.images, ev.max_real_images, seed), cache, inner,
                        device)
    rows = []
    for i, (cid, client) in enumerate(run.clients.items()):
        bar.describe(f"evaluating {spec.label()} client {cid}")
        meter.restore([])  # this client's sampling alone (training's costs: summary.json)
        labels = run.labels_for(ev.num_samples)  # every class in turn, for a conditional run
        images, handover = _generate(run, cid, ev.num_samples,
                                     cfg.sample.seed + CLIENT_STRIDE * i + SEED_STRIDE * seed,
                                     labels)
        real = client.images  # the client's training images, in [-1, 1]
        real_feats = _features(_subset(to_uint8(real), ev.max_real_images, seed), cache,
                               inner, device)
        gen_feats = _features(to_uint8(images), cache, inner, device)
        handover_feats = _features(to_uint8(handover.clamp(-1.0, 1.0)), cache, inner, device)
        kid_args = {"num_subsets": ev.kid_subsets, "subset_size": ev.kid_subset_size,
                    "seed": seed}
        kid_train = kid(gen_feats, real_feats, **kid_args)
        kid_holdout = kid(gen_feats, holdout, **kid_args)
        # With fewer generated images than a subset, every subset holds all of them and the std
        # above says nothing about sampling; the bootstrap interval does.
        train_ci = kid_bootstrap_interval(gen_feats, real_feats, seed=seed)
        holdout_ci = kid_bootstrap_interval(gen_feats, holdout, seed=seed)
        kid_disclosure = kid(handover_feats, real_feats, **kid_args)
        client_train = totals(training, client_party(cid), TRAINING_PHASES)
        sampled = meter.rows()
        client_sample = totals(sampled, client_party(cid), ("sampling",))
        server_sample = totals(sampled, SERVER, ("sampling",))
        rows.append({
            "protocol": run.cfg.train.protocol,
            "seed": run.cfg.run.seed,
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
            **copy_disclosure(run, cid, handover, seed),
            **sample_copies(images, real, run.client_holdout.get(cid)),
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
            **_per_class_kid(run, client, images, labels, cache, inner, device, kid_args),
        })
    _save_trajectory(run, folder / TRAJECTORY, ev.trajectory_steps, cfg.sample.seed)
    write_text(folder / EVALUATION, json.dumps({"key": evaluation_key(cfg, spec), "rows": rows},
                                               indent=2))
    bar.evaluation_done(spec)
    return rows


def sample_copies(samples: torch.Tensor, train: torch.Tensor, held) -> dict:
    """Do a client's published samples copy its patients? The mean nearest-neighbour MSE
    (:func:`.metrics.mean_nearest_neighbour_mse`, the unit of the disclosure columns) of its
    samples to the client's training images and to its own held-out patients, and the near-copy
    fraction of the ratio test (:func:`.metrics.near_copies`,
    Carlini et al. 2023) beside its baseline: the same fraction for those held-out patients'
    real images (None when the hospital holds no patients out)."""
    held = None if held is None else to_model(held.images)
    copies = near_copies(samples, train, held)
    return {
        "samples_nn_mse_train": mean_nearest_neighbour_mse(samples.numpy(), train.numpy()),
        "samples_nn_mse_holdout": None if held is None else mean_nearest_neighbour_mse(
            samples.numpy(), held.numpy()),
        "samples_near_copies": copies.fraction,
        "samples_near_copies_baseline": copies.baseline_fraction,
    }


def copy_disclosure(run, client_id: str, handover: torch.Tensor, seed: int) -> dict:
    """What the server's own x0 estimates of a client's hand-overs reveal about its images.

    The server denoises each hand-over with its model (Tweedie, as attack b of the audit;
    the final images themselves at c = 0; nothing at c = 1, where it hands over pure noise).
    ``x0_nn_mse``: mean nearest-neighbour MSE of the estimates to the client's training images,
    beside the same for real images of held-out patients of the hospital (``_baseline``: what
    a new image of that hospital scores). ``memorisation_*``: :func:`.metrics.memorisation`,
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
