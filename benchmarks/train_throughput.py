"""Training throughput of the in-process CollaFuse run against a plain diffusers training loop.

Two measurements, each side by side in one process (alternating blocks, so that machine noise
hits both alike), each printing the ratio CollaFuse / plain:

1. **the split alone** (goal: >= 0.95, i.e. the split costs nothing beyond the arithmetic it
   moves): the benchmark's own settings, printed: the quickstart's data (3 hospitals), c = 0.5,
   the `--preset` UNet (small), batch `--batch-size` (64) per client, eps-prediction, no EMA,
   constant lr, uniform loss and the paper's one client step per batch
   (train.local_steps = 1). CollaFuse counts every client's batch per round, the plain loop
   (the same UNet on the union of the clients' images) its batch per step.
2. **the default run's recipe**: configs/quickstart.toml as it is (the lean UNet, batch 16,
   train.local_steps = 4 of local_batch_size 16, v-prediction, EMA). CollaFuse counts the images
   each client's steps train (its batch, plus local_batch_size per extra local step); the plain
   loop trains the same UNet with the same EMA at the run's batch size.

    python benchmarks/train_throughput.py [--blocks 4] [--rounds 5] [--warmup 60] [--preset small]

The split gives every party a batch of random size (how many images fall on each side of the
cut), so a CPU compiles convolution kernels for each new size once (see
collafuse.device.CPU_KERNEL_CACHE); a run of hundreds of rounds meets its sizes early, so the
measurement starts after --warmup rounds. The first step at a new size costs the small UNet
0.1 to 0.7 s more than the next ones (1 thread), and the server's batch (the server-owned
images of three clients of 64 at c = 0.5, binomial) takes about 40 sizes: after 20 rounds of
warm-up nearly every second measured round still met a new one and paid for compiling, which
the plain loop, at one batch size, pays once; after 60 rounds about one in seven does. Run with
ONEDNN_PRIMITIVE_CACHE_CAPACITY=1024 to see oneDNN's default cache, which never stops
recompiling.

Where a round's time goes (cProfile of 10 split-alone rounds): 98.5% the UNets' forward and
backward passes, 1.1% Adam (four optimiser steps a round against the plain loop's three), and
0.1% CollaFuse's own code (batch split, messages and their checks, metering).
"""

from __future__ import annotations

import argparse
import os
import time

import torch
import torch.nn.functional as F

from collafuse.config import load_config
from collafuse.device import enlarge_cpu_kernel_cache
from collafuse.diffusion import make_scheduler
from collafuse.engines.local import Run
from collafuse.models import EMA, make_unet

QUICKSTART = "configs/quickstart.toml"


def split_alone_settings(preset: str, batch_size: int) -> list[str]:
    """Everything that decides a round's work, stated here rather than taken from the
    quickstart (whose recipe may change): the split and nothing else."""
    return ["diffusion.cut_ratio=0.5", f"model.preset='{preset}'", "model.prediction='epsilon'",
            "model.condition='none'", f"train.batch_size={batch_size}", "train.local_steps=1",
            "train.local_batch_size=0", "train.ema_decay=0.0", "train.lr_schedule='constant'",
            "train.loss_weighting='uniform'", "train.protocol='shared-noise'",
            "train.batches_per_round=1"]


def plain_loop(images: torch.Tensor, preset: str, batch_size: int, num_timesteps: int,
               ema_decay: float = 0.0):
    """The textbook diffusers DDPM loop, one model on all the data (with an EMA of its weights
    where the compared recipe keeps one); yields the images of each step."""
    torch.manual_seed(0)
    model = make_unet(preset, images.shape[-1], images.shape[1])
    scheduler = make_scheduler(num_timesteps)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    ema = EMA(model, ema_decay) if ema_decay else None
    g = torch.Generator().manual_seed(0)
    while True:
        x0 = images[torch.randint(0, len(images), (batch_size,), generator=g)]
        noise = torch.randn(x0.shape, generator=g)
        t = torch.randint(0, num_timesteps, (batch_size,), generator=g)
        loss = F.mse_loss(model(scheduler.add_noise(x0, noise, t), t).sample, noise)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if ema:
            ema.update(model)
        yield batch_size


def images_per_round(run: Run) -> int:
    """The images a round trains on: each client's batch, and its extra local steps' images."""
    return sum(c.batch_size + (c.local_steps - 1) * c.local_batch_size
               for c in run.clients.values())


def collafuse_rounds(run: Run):
    per_round = images_per_round(run)
    while True:
        run.train_round()
        yield per_round


def timed(stream, steps: int) -> float:
    """Images per second over ``steps`` steps of a generator."""
    start, images = time.perf_counter(), 0
    for _ in range(steps):
        images += next(stream)
    return images / (time.perf_counter() - start)


def side_by_side(cfg, args, label: str) -> float:
    """Alternating blocks of CollaFuse rounds and plain steps on the same images; prints the
    rates and returns the ratio CollaFuse / plain."""
    run = Run(cfg)
    print(f"{label}: {describe(cfg, images_per_round(run))}", flush=True)
    union = torch.cat([c.images for c in run.clients.values()])  # float32 NCHW in [-1, 1]
    batch = cfg.train.batch_size
    plain = plain_loop(union, cfg.model.preset, batch, cfg.diffusion.num_timesteps,
                       cfg.train.ema_decay)
    split = collafuse_rounds(run)
    timed(plain, 2), timed(split, args.warmup)  # warm-up: allocator and oneDNN caches
    # the plain loop trains as many images per block as CollaFuse does
    plain_steps = max(1, round(args.rounds * images_per_round(run) / batch))
    rates = {"plain": [], "collafuse": []}
    for block in range(args.blocks):
        rates["plain"].append(timed(plain, plain_steps))
        rates["collafuse"].append(timed(split, args.rounds))
        print(f"  block {block + 1}/{args.blocks}: plain {rates['plain'][-1]:.1f} img/s, "
              f"collafuse {rates['collafuse'][-1]:.1f} img/s", flush=True)
    plain_rate = sum(rates["plain"]) / args.blocks
    split_rate = sum(rates["collafuse"]) / args.blocks
    ratio = split_rate / plain_rate
    print(f"{label}: plain {plain_rate:.1f} images/s, CollaFuse {split_rate:.1f} images/s, "
          f"ratio CollaFuse / plain {ratio:.3f}", flush=True)
    return ratio


def describe(cfg, images: int) -> str:
    """The settings that decide a round's work, and the images it trains on."""
    t = cfg.train
    return (f"{cfg.model.preset} UNet, {cfg.data.image_size}x{cfg.data.image_size}, "
            f"{len(cfg.data.clients)} clients, c = {cfg.diffusion.cut_ratio}, batch "
            f"{t.batch_size}, train.local_steps = {t.local_steps} (local_batch_size "
            f"{t.local_batch_size or t.batch_size}), prediction {cfg.model.prediction}, "
            f"EMA {t.ema_decay or 'off'}, protocol {t.protocol}; {images} images a round")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--blocks", type=int, default=4, help="alternating measurement blocks")
    parser.add_argument("--rounds", type=int, default=5, help="CollaFuse rounds per block")
    parser.add_argument("--preset", default="small", help="the split-alone UNet")
    parser.add_argument("--batch-size", type=int, default=64, help="the split-alone batch")
    parser.add_argument("--warmup", type=int, default=60, help="CollaFuse rounds before timing")
    parser.add_argument("--split-only", action="store_true", help="skip the recipe's line")
    args = parser.parse_args()
    enlarge_cpu_kernel_cache()  # as the collafuse command does, before any convolution
    print(f"threads {torch.get_num_threads()}, warm-up {args.warmup} rounds, {args.blocks} "
          f"blocks of {args.rounds} rounds, oneDNN cache "
          f"{os.environ['ONEDNN_PRIMITIVE_CACHE_CAPACITY']}")
    alone = load_config(QUICKSTART, split_alone_settings(args.preset, args.batch_size))
    recipe = load_config(QUICKSTART, [])
    lines = [("the split alone", alone)] + ([] if args.split_only else
                                           [("the default run's recipe", recipe)])
    results = [(label, side_by_side(cfg, args, label)) for label, cfg in lines]
    print()
    for label, ratio in results:
        goal = " (goal >= 0.95)" if label == "the split alone" else ""
        print(f"ratio CollaFuse / plain, {label}: {ratio:.3f}{goal}")


if __name__ == "__main__":
    main()
