"""Every figure the project draws, as PNG with matplotlib's Agg backend (no display needed):
the sweep's (the paper's Figures 2 and 3, the cost per party) and the privacy audit's
utility-against-privacy plot. Importing this module loads matplotlib; the modules that draw
import it only when they draw, so a run that only trains does without it."""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # after use("Agg"): the backend must be chosen first
import numpy as np

from ..choices import PROTOCOLS
from ..state import atomic_path
from . import intervals as iv
from .layout import TRAJECTORY, run_dir
from .rows import by_cut, cut_ratios, mean_of, per_client, seed_table, seeds_of


def plot_kid(rows: list[dict], path: Path) -> None:
    """The paper's Figure 3 (left): per-client KID stacked, against c."""
    cs = cut_ratios(rows)
    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    for ax, key, title in [(axes[0], "kid_train", "KID against own training data"),
                           (axes[1], "kid_holdout", "KID against hold-out patients")]:
        bottom = np.zeros(len(cs))
        for cid, values in per_client(rows, key).items():
            ax.bar([f"{c:g}" for c in cs], values, bottom=bottom, label=cid)
            bottom += np.nan_to_num(values)
        # error bars: the 95% t-interval over seeds of each seed's stack (sum over clients)
        stacks = seed_table(rows, key, reduce=np.sum)
        spans = [iv.t_interval(stacks.get(c, {}).values()) for c in cs]
        if any(span.n >= 2 for span in spans):
            ax.errorbar([f"{c:g}" for c in cs], bottom,
                        yerr=[[bottom[i] - span.low if span.n >= 2 else 0 for i, span in
                               enumerate(spans)],
                              [span.high - bottom[i] if span.n >= 2 else 0 for i, span in
                               enumerate(spans)]], fmt="none", ecolor="black", capsize=4)
        ax.set_title(title)
        ax.set_xlabel("cut ratio c (client's share of steps)")
    axes[0].set_ylabel("KID (stacked over clients, lower is better)")
    axes[1].legend(title="client")
    save_figure(fig, path)


def plot_disclosure(rows: list[dict], path: Path) -> None:
    """The paper's Figure 3 (right) and the copy-sensitive measures, against c."""
    cs = cut_ratios(rows)
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for cid, values in per_client(rows, "disclosure_mse").items():
        axes[0].plot(cs, values, "o-", label=f"{cid}: paper's, mean pairwise")
    for cid, values in per_client(rows, "disclosure_x0_nn_mse").items():
        axes[0].plot(cs, values, "s--", label=f"{cid}: server's x0 estimate, nearest")
    axes[0].plot(cs, by_cut(rows, "disclosure_x0_nn_mse_baseline"), "k:",
                 label="baseline: new images of the hospitals, nearest")
    axes[0].set_ylabel("MSE to the client's training images")
    for cid, values in per_client(rows, "disclosure_kid").items():
        axes[1].plot(cs, values, "o-", label=cid)
    axes[1].set_ylabel("KID, hand-over vs real images (paper's)")
    for cid, values in per_client(rows, "disclosure_memorisation_nearer_train").items():
        axes[2].plot(cs, values, "o-", label=cid)
    axes[2].plot(cs, by_cut(rows, "disclosure_memorisation_baseline_nearer_train"), "k:",
                 label="baseline: held-out patients")
    axes[2].set_ylabel("fraction of x0 estimates nearer to training\nthan to held-out patients")
    for ax in axes:
        ax.set_xlabel("cut ratio c")
        ax.legend(fontsize=7)
    save_figure(fig, path)


def plot_costs(rows: list[dict], path: Path) -> None:
    """Training cost of a client (mean over clients) and of the server, against c."""
    cs = cut_ratios(rows)
    panels = [("flops", "FLOPs"), ("energy_kwh", "energy (kWh)"),
              ("bytes", "bytes sent + received"), ("seconds", "wall time (s)")]
    fig, axes = plt.subplots(1, 4, figsize=(16, 3.8))
    for ax, (key, label) in zip(axes, panels):
        for party, label_ in (("client", "client (mean over clients)"), ("server", "server")):
            ax.plot(cs, _party_cost(rows, party, key), "o-", label=label_)
        ax.set_xlabel("cut ratio c")
        ax.set_title(label)
    axes[0].legend()
    save_figure(fig, path)


def _party_cost(rows: list[dict], party: str, key: str) -> np.ndarray:
    if key == "bytes":
        return by_cut(rows, f"{party}_bytes_sent") + by_cut(rows, f"{party}_bytes_received")
    return by_cut(rows, f"{party}_{key}")


def plot_trajectories(out: Path, rows: list[dict], path: Path) -> None:
    """The paper's Figure 2: one sample denoised, a row per c (same starting noise), from the
    runs of the first training seed of the rows' protocol."""
    protocol, seed = rows[0]["protocol"], seeds_of(rows)[0]
    files = [(c, run_dir(out, protocol, c, seed) / TRAJECTORY) for c in cut_ratios(rows)]
    found = [(c, np.load(f)) for c, f in files if f.is_file()]
    if not found:
        return
    cols = max(len(t["steps"]) for _, t in found)
    fig, axes = plt.subplots(len(found), cols, figsize=(1.6 * cols, 1.7 * len(found)),
                             squeeze=False)
    for row, (c, t) in enumerate(found):
        for col, ax in enumerate(axes[row]):
            ax.axis("off")
            if col >= len(t["steps"]):
                continue
            step = int(t["steps"][col])
            ax.imshow(t["images"][col], cmap="gray", vmin=0, vmax=255)
            owner = "server" if step >= int(t["cut"]) else "client"
            ax.set_title(f"{step} left ({owner})" if col else "noise", fontsize=7)
        axes[row][0].text(-0.15, 0.5, f"c={c:g}", transform=axes[row][0].transAxes,
                          ha="right", va="center")
    save_figure(fig, path)


def save_figure(fig, path: Path) -> None:
    """Lay out, write as PNG atomically, and free the figure."""
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)


def plot_tradeoff(rows: list[dict], path: Path) -> None:
    """Left: KID (hold-out) against attack PSNR, a point per cut ratio, a line per protocol.
    Right: attack PSNR against c for both protocols (counterfactual ones dashed). Both show
    the mean-image baseline (dotted): points left of / below it disclose less than a guess."""
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for protocol in PROTOCOLS:
        for trained, style in ((True, "o-"), (False, "s--")):
            pts = sorted((r for r in rows if r["protocol"] == protocol and r["trained"] == trained),
                         key=lambda r: r["cut_ratio"])
            if not pts:
                continue
            psnr = [min(r["attack_psnr"], 160.0) for r in pts]
            label = protocol + ("" if trained else " (counterfactual)")
            axes[1].plot([r["cut_ratio"] for r in pts], psnr, style, label=label)
            if trained:
                axes[0].plot(psnr, [r["kid_holdout"] for r in pts], style, label=protocol)
                for r, x in zip(pts, psnr):
                    axes[0].annotate(f"c={r['cut_ratio']:g}", (x, r["kid_holdout"]), fontsize=7)
    base = sorted({(r["cut_ratio"], r["baseline_psnr"]) for r in rows
                   if math.isfinite(r["baseline_psnr"])})
    if base:
        axes[1].plot([c for c, _ in base], [p for _, p in base], ":", color="grey",
                     label="baseline: non-members' mean image")
        axes[0].axvline(mean_of([p for _, p in base]), linestyle=":", color="grey",
                        label="baseline: non-members' mean image")
    axes[0].set_xlabel("attack PSNR, dB (higher = more disclosed)")
    axes[0].set_ylabel("KID against hold-out (lower = better images)")
    axes[1].set_xlabel("cut ratio c")
    axes[1].set_ylabel("attack PSNR, dB (capped at 160)")
    for ax in axes:
        ax.legend(fontsize=7)
    save_figure(fig, path)
