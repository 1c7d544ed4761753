"""Are a conditional run's synthetic slices useful? Train on synthetic, test on real.

    python benchmarks/utility.py RUN_DIR [--samples EXPORT_DIR] [-n 500] [--seeds 5]

A small CNN tells tumour from no-tumour slices (collafuse.evaluation.utility); every classifier
is tested on the real slices of the hold-out hospitals (data.holdout_sites), which no party
trained on. Per client it is trained on
  TRTR  n of the client's real training slices (its partition of the run, drawn at random),
  TSTR  n of the client's synthetic labelled samples, half of each class;
and for FG (the smallest hospital) on its real slices alone against its real slices plus the
synthetic samples of every client of the federation (augmentation), with a control that trains
FG's real slices for as many optimiser steps as the augmented set gets. n = min(-n, the client's
real slices). Samples come from EXPORT_DIR (`collafuse sample RUN_DIR -n N --export DIR`), or
are exported to RUN_DIR/utility-samples first. AUC and balanced accuracy are means over
--seeds classifier seeds, with 95% percentile bootstrap intervals over seeds and test slices;
the FG difference is paired. A copy table follows: per client, the near-copy fraction of its
samples against its training slices beside that of its own held-out patients' slices. The last
lines are the headline figures.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

from collafuse.config import load_config
from collafuse.factory import load_client_data
from collafuse.data import load_images
from collafuse.device import enlarge_cpu_kernel_cache
from collafuse.evaluation.metrics import near_copies
from collafuse.evaluation.utility import (bootstrap, labelled, paired_difference,
                                          scores_over_seeds, steps_per_epoch, training_sets,
                                          utility_split)

AUGMENTED = "FG"


def synthetic_sets(run_dir: Path, samples: Path | None, n: int) -> dict:
    """Each client's exported samples (class from the folder level), exporting them if needed."""
    if samples is None:
        samples = run_dir / "utility-samples"
        if not (samples / "manifest.csv").is_file():
            from collafuse.engines.local import export_samples, load_run

            export_samples(load_run(run_dir, device="cpu"), samples, n)
    images = load_images(samples, layout="site/class")
    return {site: labelled(images.subset(np.flatnonzero(images.meta["site"] == site)),
                           f"synthetic:{site}")
            for site in np.unique(images.meta["site"])}


def print_copy_check(cfg, synthetic: dict) -> None:
    """Are the samples copies of patients? Per client, the near-copy fraction (Carlini et al.'s
    ratio test, collafuse.evaluation.metrics.near_copies) of its samples against its training
    slices, beside the same fraction for its own held-out patients' real slices (the baseline)."""
    data = load_client_data(cfg)
    print("\n| client | samples | near-copies of samples | own held-out slices | near-copies of "
          "them (baseline) |")
    print("|---|---|---|---|---|")
    for cid, samples in synthetic.items():
        held = data.client_holdout[cid].images
        copies = near_copies(samples.images, data.clients[cid].images,
                             held if len(held) else None)
        base = "-" if copies.baseline_fraction is None else f"{copies.baseline_fraction:.3f}"
        print(f"| {cid} | {len(samples)} | {copies.fraction:.3f} | {len(held)} | {base} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--samples", type=Path, help="an export folder of the run (site/class)")
    parser.add_argument("-n", "--num-images", type=int, default=500,
                        help="training images per client and setting (capped at its real ones)")
    parser.add_argument("--seeds", type=int, default=5, help="classifier seeds")
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--boot", type=int, default=1000, help="bootstrap resamples")
    args = parser.parse_args()
    enlarge_cpu_kernel_cache()
    start = time.time()

    cfg = load_config(args.run_dir / "config.toml")
    if cfg.model.condition == "none":
        raise SystemExit(f"{args.run_dir}: an unconditional run; TSTR needs labelled samples")
    real, test = utility_split(cfg)
    synthetic = synthetic_sets(args.run_dir, args.samples, args.num_images)
    rng = np.random.default_rng(0)
    seeds = list(range(args.seeds))
    print(f"{args.run_dir}: model.condition = {cfg.model.condition!r}; test: {len(test)} real "
          f"slices of {', '.join(sorted(set(test.sites)))} ({test.labels.mean():.0%} tumour); "
          f"{args.seeds} classifier seeds, {args.epochs} epochs")
    sets = training_sets(real, synthetic, args.num_images, rng, AUGMENTED)
    # the control: FG's real slices alone, given as many optimiser steps as the augmented set
    # gets in --epochs passes, so the augmentation's gain is not a gain from longer training
    equal_steps = args.epochs * steps_per_epoch(len(sets[f"{AUGMENTED} augmented"]))
    steps = {f"{AUGMENTED} real (equal steps)": equal_steps}
    sets[f"{AUGMENTED} real (equal steps)"] = sets[f"{AUGMENTED} real"]
    scores = {}
    for name, train in sets.items():
        scores[name] = scores_over_seeds(train, test, seeds, args.epochs, steps.get(name))
        print(f"  trained {name}: {len(train)} images ({train.labels.mean():.0%} tumour)",
              flush=True)
    boot = bootstrap(scores, test.labels, args.boot)

    print("\n| training set | images | AUC (95% CI) | balanced accuracy (95% CI) |")
    print("|---|---|---|---|")
    for name, train in sets.items():
        a, b = boot[name, "auc"], boot[name, "balanced_accuracy"]
        print(f"| {name} | {len(train)} | {a['mean']:.3f} ({a['low']:.3f}-{a['high']:.3f}) | "
              f"{b['mean']:.3f} ({b['low']:.3f}-{b['high']:.3f}) |")
    ratios = [boot[f"TSTR {cid}", "auc"]["mean"] / boot[f"TRTR {cid}", "auc"]["mean"]
              for cid in real]
    for cid, r in zip(real, ratios):
        print(f"{cid}: TSTR AUC / TRTR AUC = {r:.3f}")
    print_copy_check(cfg, synthetic)
    print(f"({time.time() - start:.0f} s)")
    print(f"TSTR AUC / TRTR AUC = {np.mean(ratios):.3f}")
    diff, low, high = paired_difference(boot, f"{AUGMENTED} augmented", f"{AUGMENTED} real")
    diff_eq, low_eq, high_eq = paired_difference(boot, f"{AUGMENTED} augmented",
                                                 f"{AUGMENTED} real (equal steps)")
    print(f"{AUGMENTED} augmented - {AUGMENTED} real (equal steps, {equal_steps}) AUC = "
          f"{diff_eq:.3f} [{low_eq:.3f}, {high_eq:.3f}]")
    print(f"{AUGMENTED} augmented - {AUGMENTED} real AUC = {diff:.3f} [{low:.3f}, {high:.3f}]")


if __name__ == "__main__":
    main()
