"""Training throughput of the in-process CollaFuse run against a plain diffusers training loop.

Both train the same UNet preset on the same bundled MRI, batch size and schedule. CollaFuse
(3 clients, c = 0.5) counts every client's images per round; the plain loop counts its batch per
step. The two are measured in alternating blocks in one process, so machine noise hits both
alike, and the ratio CollaFuse / plain is printed (goal: >= 0.95, i.e. the split costs nothing
beyond the arithmetic it moves).

    python benchmarks/train_throughput.py [--blocks 4] [--rounds 5] [--warmup 20] [--preset small]

The split gives every party a batch of random size (how many images fall on each side of the
cut), so a CPU compiles convolution kernels for each new size once (see
collafuse.device.CPU_KERNEL_CACHE); a run of hundreds of rounds meets its sizes early, so the
measurement starts after --warmup rounds. Run with ONEDNN_PRIMITIVE_CACHE_CAPACITY=1024 to see
oneDNN's default cache, which never stops recompiling.
"""

from __future__ import annotations

import argparse
import os
import time

import torch
import torch.nn.functional as F

from collafuse.config import load_config
from collafuse.data import to_model
from collafuse.device import enlarge_cpu_kernel_cache
from collafuse.diffusion import make_scheduler
from collafuse.engines.local import Run
from collafuse.factory import load_client_data
from collafuse.models import make_unet


def plain_loop(images: torch.Tensor, preset: str, batch_size: int, num_timesteps: int):
    """The textbook diffusers DDPM loop, one model on all the data; yields after each step."""
    torch.manual_seed(0)
    model = make_unet(preset, images.shape[-1], images.shape[1])
    scheduler = make_scheduler(num_timesteps)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(0)
    while True:
        x0 = images[torch.randint(0, len(images), (batch_size,), generator=g)]
        noise = torch.randn(x0.shape, generator=g)
        t = torch.randint(0, num_timesteps, (batch_size,), generator=g)
        loss = F.mse_loss(model(scheduler.add_noise(x0, noise, t), t).sample, noise)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        yield batch_size


def collafuse_rounds(cfg):
    run = Run(cfg)
    while True:
        run.train_round()
        yield cfg.train.batch_size * len(run.clients)


def timed(stream, steps: int) -> float:
    """Images per second over ``steps`` steps of a generator."""
    start, images = time.perf_counter(), 0
    for _ in range(steps):
        images += next(stream)
    return images / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--blocks", type=int, default=4, help="alternating measurement blocks")
    parser.add_argument("--rounds", type=int, default=5, help="CollaFuse rounds per block")
    parser.add_argument("--preset", default="small")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--warmup", type=int, default=20, help="CollaFuse rounds before timing")
    args = parser.parse_args()
    enlarge_cpu_kernel_cache()  # as the collafuse command does, before any convolution
    cfg = load_config("configs/quickstart.toml", [
        "diffusion.cut_ratio=0.5", f"model.preset={args.preset}",
        f"train.batch_size={args.batch_size}", "train.ema_decay=0.0"])
    clients = load_client_data(cfg).clients
    union = torch.cat([to_model(c.images) for c in clients.values()])
    plain = plain_loop(union, args.preset, args.batch_size, cfg.diffusion.num_timesteps)
    split = collafuse_rounds(cfg)
    timed(plain, 2), timed(split, args.warmup)  # warm-up: allocator and oneDNN caches
    # the plain loop takes as many steps per block as CollaFuse has images per block
    plain_steps = args.rounds * len(clients)
    rates = {"plain": [], "collafuse": []}
    for block in range(args.blocks):
        rates["plain"].append(timed(plain, plain_steps))
        rates["collafuse"].append(timed(split, args.rounds))
        print(f"block {block + 1}/{args.blocks}: plain {rates['plain'][-1]:.1f} img/s, "
              f"collafuse {rates['collafuse'][-1]:.1f} img/s", flush=True)
    plain_rate = sum(rates["plain"]) / args.blocks
    split_rate = sum(rates["collafuse"]) / args.blocks
    print(f"preset {args.preset}, batch {args.batch_size}, {len(clients)} clients, c = 0.5, "
          f"threads {torch.get_num_threads()}, warm-up {args.warmup} rounds, oneDNN cache "
          f"{os.environ['ONEDNN_PRIMITIVE_CACHE_CAPACITY']}")
    print(f"plain diffusers loop: {plain_rate:.1f} images/s")
    print(f"CollaFuse in-process: {split_rate:.1f} images/s")
    print(f"ratio CollaFuse / plain: {split_rate / plain_rate:.3f} (goal >= 0.95)")


if __name__ == "__main__":
    main()
