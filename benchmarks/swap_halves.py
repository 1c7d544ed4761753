"""Which half of the chain limits sample quality? Swap the server between two runs and score.

    python benchmarks/swap_halves.py RUN_A RUN_B [-n 100]

RUN_A and RUN_B are two trained runs of one setting (same data, cut, preset, prediction) that
differ in how long or how they trained. Split samples are generated, and scored by KID against
the hold-out hospitals (all clients' samples together, 95% bootstrap interval), for the four
pairings: A's server with A's clients, B with B, A's server with B's clients and B's server with
A's clients. The half whose swap moves KID is the one that limits quality.
"""

from __future__ import annotations

import argparse

import numpy as np

from collafuse.data import to_uint8
from collafuse.device import enlarge_cpu_kernel_cache
from collafuse.engines.local import load_run
from collafuse.evaluation.kid import cached_features, kid, kid_bootstrap_interval


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_a")
    parser.add_argument("run_b")
    parser.add_argument("-n", "--num-samples", type=int, default=100, help="per client")
    parser.add_argument("--seed", type=int, default=1000, help="sampling seed")
    parser.add_argument("--cache", default="runs/kid-cache", help="Inception feature cache")
    args = parser.parse_args()
    enlarge_cpu_kernel_cache()
    runs = {"A": load_run(args.run_a, device="cpu"), "B": load_run(args.run_b, device="cpu")}
    a, b = runs["A"].cfg, runs["B"].cfg
    if (a.data, a.diffusion, a.model) != (b.data, b.diffusion, b.model):
        parser.error("the two runs differ in data, diffusion or model settings: their halves "
                     "do not fit together")
    holdout = cached_features(runs["A"].holdout.images, args.cache)
    servers = {name: run.server for name, run in runs.items()}
    for server_of, clients_of in (("A", "A"), ("B", "B"), ("A", "B"), ("B", "A")):
        run = runs[clients_of]
        run.server = servers[server_of]
        features = [cached_features(to_uint8(run.sample(cid, args.num_samples,
                                                        args.seed + 1000 * i)[0]), args.cache)
                    for i, cid in enumerate(run.clients)]
        generated = np.concatenate(features)
        mean, _ = kid(generated, holdout)
        low, high = kid_bootstrap_interval(generated, holdout)
        print(f"server of {server_of}, clients of {clients_of}: KID vs hold-out {mean:.4f} "
              f"[{low:.4f}, {high:.4f}] ({len(generated)} samples)", flush=True)


if __name__ == "__main__":
    main()
