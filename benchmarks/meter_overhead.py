"""What metering costs a training round of the sweep's recipe (configs/sweep.toml).

A sweep meters every party with evaluation.costs.CostMeter: FLOPs (torch's FlopCounterMode, a
Python hook on every operation) and energy (a codecarbon task per block). Three meters train
fresh runs side by side in one process, in alternating blocks so that machine noise hits them
alike, and the script prints seconds a round and each one's ratio to no meter:

- ``none``: the parties' default meter, which measures nothing (what the sweep's pace uses);
- ``keyed``: CostMeter as the sweep uses it: each (party, phase, flops_key) counted once;
- ``every block``: ``CostMeter(reuse_flops=False)``, every block's FLOPs counted, as before
  flops_key existed.

    python benchmarks/meter_overhead.py [--blocks 2] [--rounds 8] [--warmup 20] [--protocol noisy-data]

The warm-up rounds meet most batch sizes of the split (a CPU compiles kernels per size, and a
keyed meter counts each size once), so the blocks measure the steady state of a long run.
"""

from __future__ import annotations

import argparse
import os
import time

from collafuse.config import load_config
from collafuse.engines.local import Run
from collafuse.evaluation.costs import CostMeter


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--blocks", type=int, default=2, help="alternating measurement blocks")
    parser.add_argument("--rounds", type=int, default=8, help="rounds per block")
    parser.add_argument("--warmup", type=int, default=20, help="rounds before timing")
    parser.add_argument("--cut-ratio", type=float, default=0.6)
    parser.add_argument("--protocol", default="shared-noise")
    args = parser.parse_args()

    cfg = load_config("configs/sweep.toml", [f"diffusion.cut_ratio={args.cut_ratio}",
                                             f'train.protocol="{args.protocol}"'])
    energy = cfg.evaluation.energy
    runs = {"none": Run(cfg), "keyed": Run(cfg, CostMeter(energy=energy)),
            "every block": Run(cfg, CostMeter(energy=energy, reuse_flops=False))}
    print(f"threads {os.environ.get('OMP_NUM_THREADS', 'default')}, load average "
          f"{os.getloadavg()[0]:.2f}; configs/sweep.toml at c = {args.cut_ratio}, "
          f"{args.protocol}; warm-up {args.warmup} rounds, {args.blocks} blocks of "
          f"{args.rounds} rounds", flush=True)
    for run in runs.values():
        for _ in range(args.warmup):
            run.train_round()
    seconds = dict.fromkeys(runs, 0.0)
    for block in range(args.blocks):
        for name, run in runs.items():
            start = time.perf_counter()
            for _ in range(args.rounds):
                run.train_round()
            seconds[name] += time.perf_counter() - start
        print(f"  block {block + 1}/{args.blocks}: " + ", ".join(
            f"{name} {s / ((block + 1) * args.rounds):.2f} s" for name, s in seconds.items()),
            flush=True)
    rounds = args.blocks * args.rounds
    base = seconds["none"] / rounds
    for name, s in seconds.items():
        print(f"{name}: {s / rounds:.2f} s a round, {s / rounds / base:.2f}x no meter")
    print(f"load average at the end {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
