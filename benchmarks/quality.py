"""Sample quality of a CollaFuse run beside its two references, all by the project's KID.

For a trained run folder (or one it trains first from --config): KID (clean-fid-exact, on the
FID Inception features; collafuse.evaluation.kid) of N split samples per client against the
hold-out hospitals and against the client's own training images; beside it

- the floor: the client's real training images against the same hold-out (what the
  difference between hospitals alone costs);
- a plain pooled DDPM: one diffusers UNet of the same preset trained on the union of the
  clients' images with the textbook loop and the run's recipe (batch = the run's images per
  round, lr, lr schedule, loss weighting, EMA; one step per batch, as it has no client levels
  for train.local_steps) for the run's training seconds (summary.json,
  or --seconds; or exactly --pooled-steps steps), sampled with the same sampler and scored the
  same way;

and one line: ``quickstart KID / pooled-DDPM KID = X``: the KID against the hold-out of all
clients' samples together over that of as many samples of the pooled model. Features of real images and of generated ones are cached
under --cache (Inception takes about 0.3-0.5 s per image on a CPU core); results also go to
<run>/quality.json.

    python benchmarks/quality.py runs/quickstart                       # an existing run
    python benchmarks/quality.py --config configs/quickstart.toml --out runs/q   # train first
    python benchmarks/quality.py runs/q -n 100 --no-pooled              # quick recipe checks

The default sampler is the run's own (sample.sampler, sample.steps); --sampler and --steps
score the same weights with another.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np
import torch

from collafuse.config import load_config
from collafuse.data import to_uint8
from collafuse.device import enlarge_cpu_kernel_cache
from collafuse.diffusion import eps_from_output, make_scheduler, sample_steps, sampling_plan
from collafuse.engines.local import load_run, run_training
from collafuse.factory import recipe
from collafuse.evaluation.kid import cached_features, kid, kid_bootstrap_interval
from collafuse.metering import SERVER, client_party, totals
from collafuse.models import EMA, make_unet, predict_noise
from collafuse.optim import lr_factor
from collafuse.protocols import local_loss

CHUNK = 100  # samples per sampling call


def say(line: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')} load {os.getloadavg()[0]:.2f}] {line}", flush=True)


def subset(images: np.ndarray, limit: int, seed: int = 0) -> np.ndarray:
    """At most ``limit`` images (0: all), a seeded choice kept in order."""
    if not limit or len(images) <= limit:
        return images
    return images[np.sort(np.random.default_rng(seed).choice(len(images), limit, replace=False))]


def training_seconds(run_dir: Path, clients) -> float:
    """Seconds the run's parties spent training (their diffusion and training phases)."""
    rows = json.loads((run_dir / "summary.json").read_text())["costs"]
    parties = [SERVER, *(client_party(cid) for cid in clients)]
    return sum(totals(rows, p, ("diffusion", "training"))["seconds"] or 0.0 for p in parties)


def train_pooled(cfg, images: torch.Tensor, batch_size: int, seconds: float | None,
                 steps: int | None, seed: int = 0):
    """The textbook DDPM loop (Ho et al. 2020, Algorithm 1) on one model and all the images,
    with the run's recipe: Adam at train.lr under train.lr_schedule and lr_warmup_steps, the
    model's output read as model.prediction says, the loss weighted by train.loss_weighting,
    an EMA of train.ema_decay for sampling.

    Trains ``steps`` steps, or as many as fit into ``seconds`` (the step count, which a cosine
    decay needs in advance, is fixed from the pace of the first 10 steps). Returns
    (sampling model, steps taken, seconds taken).
    """
    t_cfg, T = cfg.train, cfg.diffusion.num_timesteps
    torch.manual_seed(seed)
    model = make_unet(cfg.model.preset, cfg.data.image_size, cfg.data.channels)
    scheduler = make_scheduler(T)
    optimizer = torch.optim.Adam(model.parameters(), lr=t_cfg.lr)
    ema = EMA(model, t_cfg.ema_decay) if t_cfg.ema_decay else None
    weighting = recipe(cfg).loss_weights(scheduler)
    g = torch.Generator().manual_seed(seed)
    eps_of = eps_reader(model, scheduler, cfg.model.prediction)
    start, step, horizon = time.perf_counter(), 0, steps or 10**9
    while step < horizon:
        for group in optimizer.param_groups:
            group["lr"] = t_cfg.lr * lr_factor(step, horizon, t_cfg.lr_schedule,
                                               t_cfg.lr_warmup_steps)
        x0 = images[torch.randint(0, len(images), (batch_size,), generator=g)]
        t = torch.randint(0, T, (batch_size,), generator=g)
        eps = torch.randn(x0.shape, generator=g)
        loss = local_loss(eps_of, scheduler, x0, t, eps, weighting)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if ema:
            ema.update(model)
        step += 1
        if steps is None and step == 10:  # fix the horizon from the pace so far
            horizon = max(10, int(seconds / ((time.perf_counter() - start) / 10)))
            say(f"pooled DDPM: {seconds:.0f} s at this pace is {horizon} steps")
        if step % 50 == 0:
            say(f"pooled DDPM: step {step}/{horizon}, loss {loss.item():.4f}")
    return (ema.model if ema else model), step, time.perf_counter() - start


def eps_reader(model, scheduler, prediction: str):
    """eps_hat(x_t, t) of a model that outputs model.prediction."""
    return lambda x, t: eps_from_output(scheduler, predict_noise(model, x, t), x, t, prediction)


@torch.no_grad()
def sample_pooled(model, cfg, n: int, sampler: str, steps: int, seed: int) -> torch.Tensor:
    """n samples of the pooled model with the run's sampler over all T levels."""
    T = cfg.diffusion.num_timesteps
    scheduler = make_scheduler(T)
    timesteps, _ = sampling_plan(0, T, steps)  # cut 0: one party runs every step
    out = []
    for k, start in enumerate(range(0, n, CHUNK)):
        g = torch.Generator().manual_seed(seed + k)
        x = torch.randn((min(CHUNK, n - start), cfg.data.channels, cfg.data.image_size,
                         cfg.data.image_size), generator=g)
        out.append(sample_steps(eps_reader(model, scheduler, cfg.model.prediction), scheduler,
                                x, timesteps, -1, sampler, g))
    return torch.cat(out)


def score(name: str, gen: np.ndarray, holdout: np.ndarray, own: np.ndarray | None,
          subsets: int) -> dict:
    mean, _ = kid(gen, holdout, num_subsets=subsets)
    low, high = kid_bootstrap_interval(gen, holdout)
    row = {"name": name, "samples": len(gen), "kid_holdout": mean,
           "kid_holdout_ci": [low, high]}
    line = f"{name:>14}: KID vs hold-out {mean:.4f} [{low:.4f}, {high:.4f}]"
    if own is not None:
        row["kid_own"] = kid(gen, own, num_subsets=subsets)[0]
        line += f", vs own training images {row['kid_own']:.4f}"
    say(line + f" ({len(gen)} samples)")
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", nargs="?", help="a trained run folder")
    parser.add_argument("--config", help="train this config first (into --out)")
    parser.add_argument("--out", help="run folder for --config")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="config override for --config (repeatable)")
    parser.add_argument("-n", "--num-samples", type=int, default=300, help="samples per client")
    parser.add_argument("--sampler", choices=["ddpm", "ddim"], help="default: the run's")
    parser.add_argument("--steps", type=int,
                        help="model calls per sample (0: all T; default: the run's sample.steps)")
    parser.add_argument("--weights", default="ema", choices=["ema", "raw"],
                        help="sample with the EMA weights (where kept) or the raw ones")
    parser.add_argument("--max-real", type=int, default=500, help="real images per set (0: all)")
    parser.add_argument("--subsets", type=int, default=100, help="KID subsets")
    parser.add_argument("--seed", type=int, default=1000, help="sampling seed")
    parser.add_argument("--cache", default="runs/kid-cache", help="Inception feature cache")
    parser.add_argument("--no-pooled", action="store_true", help="skip the pooled DDPM")
    parser.add_argument("--seconds", type=float, help="pooled DDPM budget (default: the run's "
                        "training seconds from summary.json)")
    parser.add_argument("--pooled-steps", type=int, help="pooled DDPM steps instead of seconds")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    enlarge_cpu_kernel_cache()
    cache = Path(args.cache)
    if args.config:
        if not args.out:
            parser.error("--config needs --out")
        say(f"training {args.config} into {args.out}")
        run_training(load_config(args.config, args.set), args.out)
        args.run_dir = args.out
    if not args.run_dir:
        parser.error("give a run folder or --config")
    run_dir = Path(args.run_dir)
    run = load_run(run_dir, device="cpu")
    cfg = run.cfg
    args.sampler = args.sampler or cfg.sample.sampler
    args.steps = cfg.sample.steps if args.steps is None else args.steps
    cfg.sample.sampler, cfg.sample.steps = args.sampler, args.steps
    if args.weights == "raw":
        for party in [run.server, *run.clients.values()]:
            party.ema = None
    say(f"{run_dir}: {len(run.clients)} clients, c = {cfg.diffusion.cut_ratio}, "
        f"{cfg.train.steps} steps, {cfg.train.local_steps} client steps per batch, "
        f"sampler {args.sampler} with {args.steps or 'all'} calls, "
        f"{args.weights} weights, {args.num_samples} samples per client, "
        f"torch threads {torch.get_num_threads()}")

    say(f"hold-out features ({len(run.holdout)} images)")
    holdout = cached_features(run.holdout.images, cache, progress=True)
    rows, generated, reals = [], [], []
    for i, (cid, client) in enumerate(run.clients.items()):
        real = subset(to_uint8(client.images), args.max_real)
        say(f"{cid}: real features ({len(real)} images)")
        reals.append(cached_features(real, cache, progress=True))
        say(f"{cid}: sampling {args.num_samples}")
        images = torch.cat([run.sample(cid, min(CHUNK, args.num_samples - s),
                                       args.seed + 1000 * i + k)[0]
                            for k, s in enumerate(range(0, args.num_samples, CHUNK))])
        gen = cached_features(to_uint8(images), cache, progress=True)
        generated.append(gen)
        rows.append({**score(cid, gen, holdout, reals[-1], args.subsets), "client": cid})
    split = score("all clients", np.concatenate(generated), holdout, np.concatenate(reals),
                  args.subsets)
    floors = [score(f"floor {cid}", real, holdout, None, args.subsets)
              for cid, real in zip(run.clients, reals)]
    result = {"run": str(run_dir), "sampler": args.sampler, "sampler_steps": args.steps,
              "weights": args.weights, "num_samples": args.num_samples, "clients": rows,
              "all_clients": split, "floor": floors}
    mean_split = float(np.mean([r["kid_holdout"] for r in rows]))
    say(f"clients' mean KID vs hold-out: {mean_split:.4f}")

    if not args.no_pooled:
        union = torch.cat([c.images for c in run.clients.values()])
        batch = cfg.train.batch_size * len(run.clients)
        seconds = None if args.pooled_steps else (args.seconds or
                                                  training_seconds(run_dir, run.clients))
        say(f"pooled DDPM: {len(union)} images, batch {batch}, "
            + (f"{args.pooled_steps} steps" if args.pooled_steps else f"{seconds:.0f} s"))
        model, steps, took = train_pooled(cfg, union, batch, seconds, args.pooled_steps)
        n_pooled = args.num_samples * len(run.clients)  # as many as all clients' together
        say(f"pooled DDPM: {steps} steps in {took:.0f} s; sampling {n_pooled}")
        pooled_images = sample_pooled(model, cfg, n_pooled, args.sampler, args.steps, args.seed)
        gen = cached_features(to_uint8(pooled_images), cache, progress=True)
        pooled = score("pooled DDPM", gen, holdout, np.concatenate(reals), args.subsets)
        result["pooled"] = {**pooled, "steps": steps, "seconds": took, "budget_seconds": seconds}
        ratio = split["kid_holdout"] / pooled["kid_holdout"]
        result["ratio"] = ratio
        say(f"quickstart KID / pooled-DDPM KID = {ratio:.2f} "
            f"({split['kid_holdout']:.4f} / {pooled['kid_holdout']:.4f})")
    (run_dir / "quality.json").write_text(json.dumps(result, indent=2))
    say(f"written {run_dir / 'quality.json'}")


if __name__ == "__main__":
    main()
