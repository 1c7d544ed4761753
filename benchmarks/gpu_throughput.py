"""Training and sampling throughput of CollaFuse on a GPU (or a CPU), against a plain loop.

By default the paper's setting (configs/paper.toml: the paper UNet at 128x128, batch 150 per
client, 3 hospitals) at c = 0.6. Side by side in one process, in alternating blocks so that
machine noise hits both alike:

- training images/s of the in-process CollaFuse run (every client's batch counts) and of a plain
  diffusers DDPM loop on the same UNet, device and precision (one model, one batch per step),
  and their ratio (goal >= 0.95);
- achieved TFLOP/s (UNet FLOPs per image from torch.utils.flop_counter, times images/s) against
  a matrix product measured in the same run (bf16 8192^3 on CUDA; fp32 1024^3 on a CPU, whose
  path stays fp32);
- split sampling images/s (server steps T-1..s, client steps s-1..0);
- the projected wall time of configs/paper.toml: one cut ratio, and the six-point sweep (at the
  steady rate, plus what the warm-up rounds cost beyond it: on a GPU each new batch size, which
  the random split makes frequent at first, builds its cuDNN plans once).

    python benchmarks/gpu_throughput.py                       # on a GPU machine
    python benchmarks/gpu_throughput.py --set data.path=...   # the 128x128 file elsewhere
    python benchmarks/gpu_throughput.py --config configs/quickstart.toml --preset small \\
        --image-size 32 --batch-size 16 --rounds 2 --blocks 2 --warmup 2 --samples 4   # a CPU
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from collafuse.config import load_config
from collafuse.device import Placement, enlarge_cpu_kernel_cache
from collafuse.diffusion import make_scheduler
from collafuse.engines.local import Run
from collafuse.factory import total_rounds
from collafuse.models import make_unet

REPO = Path(__file__).resolve().parents[1]


def plain_loop(images: torch.Tensor, cfg, place: Placement, compile: bool):
    """The textbook diffusers DDPM step on one model over all the data, on the same device and
    precision as the parties; yields after each step without reading anything back."""
    torch.manual_seed(0)
    model = place.model(make_unet(cfg.model.preset, cfg.data.image_size, cfg.data.channels))
    net = torch.compile(model) if compile else model
    optimizer = place.optimizer(model.parameters(), cfg.train.lr)
    num_timesteps, batch = cfg.diffusion.num_timesteps, cfg.train.batch_size
    abar = place.put(make_scheduler(num_timesteps).alphas_cumprod)
    data, g = place.put(images), place.generator(0)
    while True:
        x0 = data[torch.randint(0, len(data), (batch,), generator=g, device=place.device)]
        noise = torch.randn(x0.shape, generator=g, device=place.device)
        t = torch.randint(0, num_timesteps, (batch,), generator=g, device=place.device)
        a = abar[t].view(-1, 1, 1, 1)
        with place.autocast():
            pred = net(place.model_input(a.sqrt() * x0 + (1 - a).sqrt() * noise), t).sample
        loss = F.mse_loss(pred.float(), noise)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        yield batch


def collafuse_rounds(run: Run):
    per_round = run.cfg.train.batch_size * run.cfg.train.batches_per_round * len(run.clients)
    while True:
        run.train_round()
        yield per_round


def wait(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(stream, steps: int, device: torch.device) -> float:
    """Images per second over ``steps`` steps of a generator, the device's queue included."""
    wait(device)
    start, images = time.perf_counter(), 0
    for _ in range(steps):
        images += next(stream)
    wait(device)
    return images / (time.perf_counter() - start)


def flops_per_image(cfg, place: Placement) -> float:
    """Forward and backward FLOPs of one UNet step, per image (eager, fp32 counting rules)."""
    model = place.model(make_unet(cfg.model.preset, cfg.data.image_size, cfg.data.channels))
    n = cfg.train.batch_size
    x = torch.randn(n, cfg.data.channels, cfg.data.image_size, cfg.data.image_size,
                    device=place.device)
    t = torch.randint(0, cfg.diffusion.num_timesteps, (n,), device=place.device)
    with FlopCounterMode(display=False) as counter:
        with place.autocast():
            out = model(place.model_input(x), t).sample
        out.float().square().mean().backward()
    return counter.get_total_flops() / n


def matmul_peak(device: torch.device) -> tuple[str, float]:
    """(what was measured, TFLOP/s) of a square matrix product in the device's training dtype."""
    n, dtype, reps = (8192, torch.bfloat16, 10) if device.type == "cuda" else (1024, torch.float32, 5)
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    for _ in range(3):
        a @ b
    wait(device)
    start = time.perf_counter()
    for _ in range(reps):
        a @ b
    wait(device)
    seconds = (time.perf_counter() - start) / reps
    return f"{str(dtype).removeprefix('torch.')} matmul {n}^3", 2 * n ** 3 / seconds / 1e12


def sampling_rate(run: Run, num_samples: int) -> float:
    """Images per second of split inference (all T steps) for one client."""
    cid = next(iter(run.clients))
    run.sample(cid, min(num_samples, 2), seed=0)  # warm-up
    wait(run.server.device)
    start = time.perf_counter()
    run.sample(cid, num_samples, seed=1)
    wait(run.server.device)
    return num_samples / (time.perf_counter() - start)


def projection(paper, sizes: list[int], train_rate: float, sample_rate: float,
               once: float) -> list[str]:
    """Wall time of configs/paper.toml at the measured rates (training at this cut ratio's),
    plus ``once`` seconds of first-use costs per run."""
    clients = len(paper.data.clients)
    rounds = total_rounds(paper, sizes)
    passes = rounds * paper.train.batch_size * clients
    train_s = passes / train_rate + once
    final_samples = paper.sample.num_samples * clients / sample_rate
    cuts = len(paper.sweep.cut_ratios)
    eval_s = paper.evaluation.num_samples * clients / sample_rate
    return [
        f"projected configs/paper.toml, one cut ratio: {rounds} rounds x {clients} x "
        f"{paper.train.batch_size} = {passes / 1e6:.2f} M image passes (clients of "
        f"{'/'.join(map(str, sizes))} images), {train_s / 60:.1f} min training + "
        f"{final_samples:.0f} s sampling",
        f"projected six-point sweep: {cuts * (train_s + final_samples) / 60:.1f} min training + "
        f"{cuts * eval_s / 60:.1f} min evaluation sampling ({paper.evaluation.num_samples} per "
        "client and cut; KID's Inception and the privacy audit not included)",
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, default=REPO / "configs/paper.toml")
    parser.add_argument("--set", dest="overrides", action="append", default=[],
                        metavar="SECTION.KEY=VALUE", help="override a config field (repeatable)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--preset", help="model.preset (default: the config's)")
    parser.add_argument("--image-size", type=int, help="data.image_size (default: the config's)")
    parser.add_argument("--batch-size", type=int, help="per client (default: the config's)")
    parser.add_argument("--cut-ratio", type=float, default=0.6)
    parser.add_argument("--compile", action="store_true", help="torch.compile both UNets")
    parser.add_argument("--warmup", type=int, default=100, help="CollaFuse rounds before "
                        "timing: the first use of each batch size costs kernel plans once")
    parser.add_argument("--blocks", type=int, default=4, help="alternating measurement blocks")
    parser.add_argument("--rounds", type=int, default=10, help="CollaFuse rounds per block")
    parser.add_argument("--samples", type=int, default=256, help="images for the sampling rate")
    args = parser.parse_args()
    enlarge_cpu_kernel_cache()  # as the collafuse command does, before any convolution

    settings = {"run.device": args.device, "diffusion.cut_ratio": args.cut_ratio,
                "train.ema_decay": 0.0, "train.compile": args.compile, "model.preset": args.preset,
                "data.image_size": args.image_size, "train.batch_size": args.batch_size}
    # json writes strings, numbers and booleans as TOML reads them
    overrides = [*args.overrides, *(f"{k}={json.dumps(v)}" for k, v in settings.items()
                                    if v is not None)]
    cfg = load_config(args.config, overrides)
    run = Run(cfg)
    place = run.server.place
    union = torch.cat([c.images for c in run.clients.values()])
    plain = plain_loop(union, cfg, place, args.compile)
    split = collafuse_rounds(run)
    warmup_rate = timed(split, args.warmup, place.device)
    timed(plain, max(3, args.warmup // 10), place.device)
    # the plain loop takes as many steps per block as CollaFuse has images per block
    plain_steps = args.rounds * cfg.train.batches_per_round * len(run.clients)
    rates = {"plain": [], "collafuse": []}
    for block in range(args.blocks):
        rates["plain"].append(timed(plain, plain_steps, place.device))
        rates["collafuse"].append(timed(split, args.rounds, place.device))
        print(f"block {block + 1}/{args.blocks}: plain {rates['plain'][-1]:.1f} img/s, "
              f"collafuse {rates['collafuse'][-1]:.1f} img/s", flush=True)
    plain_rate = sum(rates["plain"]) / args.blocks
    split_rate = sum(rates["collafuse"]) / args.blocks
    per_image = flops_per_image(cfg, place)
    peak_what, peak = matmul_peak(place.device)
    sample_rate = sampling_rate(run, args.samples)

    device = place.device
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    precision = "bf16 autocast" if place.fast else "fp32"
    threads = "" if device.type == "cuda" else f", {torch.get_num_threads()} threads"
    print(f"device: {name} ({device}{threads}), torch {torch.__version__}, preset "
          f"{cfg.model.preset} {cfg.data.image_size}x{cfg.data.image_size}, batch "
          f"{cfg.train.batch_size} per client, {len(run.clients)} clients, c = {args.cut_ratio}, "
          f"{precision}, compile {'on' if args.compile else 'off'}")
    print(f"UNet cost: {per_image / 1e9:.2f} GFLOP per image (forward + backward, "
          "torch.utils.flop_counter)")
    for label, rate in (("plain diffusers loop", plain_rate), ("CollaFuse in-process", split_rate)):
        print(f"{label}: {rate:.1f} images/s, {rate * per_image / 1e12:.2f} TFLOP/s")
    print(f"ratio CollaFuse / plain: {split_rate / plain_rate:.3f} (goal >= 0.95)")
    print(f"peak ({peak_what}, this run): {peak:.1f} TFLOP/s; CollaFuse reaches "
          f"{100 * split_rate * per_image / 1e12 / peak:.1f}% of it")
    print(f"sampling (split, T = {cfg.diffusion.num_timesteps} steps): {sample_rate:.1f} images/s")
    warmup_images = args.warmup * cfg.train.batch_size * cfg.train.batches_per_round \
        * len(run.clients)
    once = max(0.0, warmup_images / warmup_rate - warmup_images / split_rate)
    print(f"warm-up: {args.warmup} rounds at {warmup_rate:.1f} images/s; the first use of each "
          f"batch size (and compiling, where on) cost about {once:.0f} s once")
    paper = load_config(REPO / "configs/paper.toml")
    note = "" if (cfg.model.preset, cfg.data.image_size, cfg.train.batch_size) == (
        paper.model.preset, paper.data.image_size, paper.train.batch_size) else \
        " [measured at another setting than the paper's: read as a rate, not a forecast]"
    for line in projection(paper, [len(c.images) for c in run.clients.values()], split_rate,
                           sample_rate, once):
        print(line + note)


if __name__ == "__main__":
    main()
