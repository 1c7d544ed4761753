"""Split sampling with fewer model calls: KID and seconds per image against the number of calls.

    python benchmarks/sampling_steps.py RUN_DIR [--steps 100,50,20,10] [--samplers ddpm,ddim]
        [--num-samples 100]

For a trained run (e.g. ``runs/sweep-cpu/shared-noise/c=0.6-seed=0`` of ``collafuse sweep``)
each sampler and number of calls N generates ``--num-samples`` images per client, split at the
run's cut as always (``collafuse.diffusion.sampling_plan``: the server's calls over [s, T), the
client's over [0, s)), and prints the wall seconds per image (server and client together, one
process) and KID (clean-fid's, 100 subsets) of all clients' images against the hold-out
hospitals. N = T with ddpm is the sampler every run has used. Not part of the test suite.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import numpy as np

from collafuse.data import to_uint8
from collafuse.device import enlarge_cpu_kernel_cache
from collafuse.engines.local import load_run
from collafuse.evaluation.kid import cached_features, kid, kid_bootstrap_interval


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("run_dir", type=Path)
    ap.add_argument("--steps", default="100,50,20,10", help="model calls per sample")
    ap.add_argument("--samplers", default="ddpm,ddim")
    ap.add_argument("--num-samples", type=int, default=100, help="per client")
    ap.add_argument("--seed", type=int, default=1)
    args = ap.parse_args(argv)
    enlarge_cpu_kernel_cache()
    run = load_run(args.run_dir, device="cpu")
    cfg = run.cfg
    cache = args.run_dir.parent / "cache" if (args.run_dir.parent / "cache").is_dir() else None
    rng = np.random.default_rng(cfg.run.seed)
    real = run.holdout.images  # uint8 already
    real = real[rng.permutation(len(real))[:cfg.evaluation.max_real_images or len(real)]]
    holdout = cached_features(real, cache)
    print(f"{args.run_dir}: c = {cfg.diffusion.cut_ratio}, T = {cfg.diffusion.num_timesteps}, "
          f"{len(run.clients)} clients x {args.num_samples} samples; load average "
          f"{os.getloadavg()[0]:.2f} before")
    print(f"    {'sampler':<8} {'calls':>5} {'s/image':>8} {'KID hold-out':>13} {'95% CI':>15}")
    for sampler in args.samplers.split(","):
        for steps in (int(n) for n in args.steps.split(",")):
            cfg.sample.sampler, cfg.sample.steps = sampler, steps
            start = time.perf_counter()
            images = [run.sample(cid, args.num_samples, args.seed + 1000 * i)[0]
                      for i, cid in enumerate(run.clients)]
            seconds = (time.perf_counter() - start) / (args.num_samples * len(run.clients))
            feats = cached_features(np.concatenate([to_uint8(x) for x in images]), None)
            value, _ = kid(feats, holdout, seed=cfg.run.seed)
            low, high = kid_bootstrap_interval(feats, holdout, seed=cfg.run.seed)
            print(f"    {sampler:<8} {steps:>5} {seconds:>8.3f} {value:>13.3f} "
                  f"{low:>7.3f}-{high:.3f}", flush=True)
    print(f"    (load average {os.getloadavg()[0]:.2f} after)")


if __name__ == "__main__":
    main()
