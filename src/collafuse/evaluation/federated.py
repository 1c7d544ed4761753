"""Federated evaluation: each hospital judges its own samples where its patients are.

A Flower node finishes N split samples and computes, against its own images, what
``collafuse evaluate`` computes (:func:`.synthetic.evaluate_image_sets`: clean-fid KID with its
bootstrap interval) against its held-out patients and its training images, and the sweep's
copy columns (:func:`.sweep.sample_copies`: nearest-neighbour MSE, the near-copy fraction
beside its baseline); only these numbers go back (docs/design.md section 7). The server puts
them in the sweep's per-client columns: ``results.csv`` / ``results.json`` and ``report.md``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..data import DataError, ImageSet, to_model, to_uint8
from ..state import write_text
from .metrics import mean_pairwise_mse
from .sweep import _subset, sample_copies, write_results
from .synthetic import evaluate_image_sets

REPORT = "report.md"
# every figure a node sends, the sweep's column names; the reply check bounds each one
KID_COLUMNS = tuple(f"kid_{ref}{stat}" for ref in ("train", "holdout")
                    for stat in ("", "_std", "_ci_low", "_ci_high"))
COPY_COLUMNS = ("samples_nn_mse_train", "samples_nn_mse_holdout", "samples_near_copies",
                "samples_near_copies_baseline")
FIGURES = (*KID_COLUMNS, *COPY_COLUMNS, "disclosure_mse")


def evaluate_on_node(samples, handover, train: ImageSet, held: ImageSet, evaluation, seed: int,
                     cache_dir: Path | None = None, device: str = "cpu") -> dict[str, float]:
    """The FIGURES of a hospital's finished ``samples`` and the server's ``handover`` (model
    space, [-1, 1]) against its ``train`` images and its own ``held`` (held-out) patients;
    KID settings from the run's ``evaluation`` config, real sets cut to its max_real_images."""
    if len(held) < 2 or len(samples) < 2:
        raise DataError(f"federated evaluation: {len(samples)} samples and {len(held)} held-out "
                        "images; it needs at least 2 of each (data.client_holdout_fraction > 0)")
    generated = to_uint8(samples)
    figures = {}
    for ref, real in (("train", train), ("holdout", held)):
        result = evaluate_image_sets(
            generated, _subset(real.images, evaluation.max_real_images, seed), None, cache_dir,
            evaluation.kid_subsets, evaluation.kid_subset_size, seed, device=device)
        figures.update({f"kid_{ref}{stat}": result[f"kid{stat}"]
                        for stat in ("", "_std", "_ci_low", "_ci_high")})
    real_train = to_model(train.images)
    figures.update(sample_copies(samples, real_train, held))
    figures["disclosure_mse"] = mean_pairwise_mse(handover.numpy(), real_train.numpy())
    return {key: float(figures[key]) for key in FIGURES}


def write_federated_results(out: Path, rows: list[dict]) -> Path:
    """results.json / results.csv (one row per hospital) and report.md in ``out``."""
    write_results(out, rows)
    path = out / REPORT
    write_text(path, render(rows))
    return path


def render(rows: list[dict]) -> str:
    if not rows:
        return "# CollaFuse federated evaluation\n\nNo hospital answered.\n"
    first = rows[0]
    cols = [("kid_holdout", "KID own hold-out"), ("kid_holdout_ci_low", "95% CI low"),
            ("kid_holdout_ci_high", "high"), ("kid_train", "KID train"),
            ("kid_train_ci_low", "95% CI low"), ("kid_train_ci_high", "high"),
            ("samples_near_copies", "near-copies"),
            ("samples_near_copies_baseline", "baseline near-copies"),
            ("samples_nn_mse_train", "NN-MSE train"), ("samples_nn_mse_holdout", "NN-MSE hold-out"),
            ("disclosure_mse", "discl. MSE (paper's)")]
    lines = ["| client | train images | " + " | ".join(name for _, name in cols) + " |",
             "|---" * (len(cols) + 2) + "|"]
    for r in rows:
        lines.append(f"| {r['client']} | {r['train_images']} | "
                     + " | ".join(f"{r[key]:.4f}" for key, _ in cols) + " |")
    lines.append("| mean | | " + " | ".join(
        f"{np.mean([r[key] for r in rows]):.4f}" for key, _ in cols) + " |")
    return "\n\n".join([
        "# CollaFuse federated evaluation",
        (f"Protocol {first['protocol']}, c = {first['cut_ratio']:g}, T = "
         f"{first['num_timesteps']}, seed {first['seed']}, condition {first['condition']}; "
         f"{first['num_samples']} split samples per hospital. Each hospital finished its "
         "samples and computed these figures on its own node against its own images; only the "
         "numbers reached the server (docs/deployment.md)."),
        ("KID is clean-fid's against the hospital's own held-out patients "
         "(data.client_holdout_fraction) and its training images; the interval is the "
         "bootstrap interval over those sets (sampling noise only, one training seed). "
         "Near-copies: fraction of samples three times nearer to a training image than to the "
         "rest (copies.near_copies), beside the same fraction for its held-out patients' real "
         "images; a fraction above its baseline shows copying."),
        "\n".join(lines),
    ]) + "\n"
