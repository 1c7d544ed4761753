"""Figures and report.md of a cut-ratio sweep, from its results.json and trajectories.

Figures (PNG, matplotlib's Agg backend): the paper's Figure 3 (stacked per-client KID against
c, on training data and hold-out; disclosure MSE and KID against c), the cost per party
against c, and the paper's Figure 2 (one sample's denoising trajectory, a row per c).
report.md puts this run's numbers beside the paper's findings and says, for each, whether the
run supports it.
"""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # after use("Agg"): the backend must be chosen first
import numpy as np

from ..state import atomic_path, write_text
from .layout import TRAJECTORY, cut_dir

FIGURES = {
    "kid": "fig3_kid.png",
    "disclosure": "fig3_disclosure.png",
    "costs": "costs.png",
    "trajectory": "fig2_trajectory.png",
}
REPORT = "report.md"
# The paper's mean pixel MSE between the server's images at the cut and the clients' real ones.
PAPER_DISCLOSURE_MSE = {"c=0": 0.087, "c>=0.2": "about 1.0 to 1.07"}


def write_report(out: str | Path) -> Path:
    """Draw every figure and write report.md into the sweep folder ``out``."""
    out = Path(out)
    rows = json.loads((out / "results.json").read_text())
    if rows:
        plot_kid(rows, out / FIGURES["kid"])
        plot_disclosure(rows, out / FIGURES["disclosure"])
        plot_costs(rows, out / FIGURES["costs"])
        plot_trajectories(out, sorted({r["cut_ratio"] for r in rows}), out / FIGURES["trajectory"])
    path = out / REPORT
    write_text(path, render(rows, out))
    return path


# ---------------------------------------------------------------- tables of the rows


def cut_ratios(rows: list[dict]) -> list[float]:
    return sorted({r["cut_ratio"] for r in rows})


def clients(rows: list[dict]) -> list[str]:
    return list(dict.fromkeys(r["client"] for r in rows))


def by_cut(rows: list[dict], key: str, reduce=np.mean) -> np.ndarray:
    """One value per cut ratio: ``reduce`` over the clients' rows (NaN where none is known)."""
    out = []
    for c in cut_ratios(rows):
        values = [r[key] for r in rows if r["cut_ratio"] == c and r.get(key) is not None]
        out.append(float(reduce(values)) if values else float("nan"))
    return np.array(out)


def per_client(rows: list[dict], key: str) -> dict[str, np.ndarray]:
    cs = cut_ratios(rows)
    table = {(r["client"], r["cut_ratio"]): r[key] for r in rows}
    return {cid: np.array([_num(table.get((cid, c))) for c in cs]) for cid in clients(rows)}


def _num(value) -> float:
    return float("nan") if value is None else float(value)


# ---------------------------------------------------------------- figures


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


def plot_trajectories(out: Path, cs: list[float], path: Path) -> None:
    """The paper's Figure 2: one sample denoised, a row per c (same starting noise)."""
    found = [(c, np.load(cut_dir(out, c) / TRAJECTORY)) for c in cs
             if (cut_dir(out, c) / TRAJECTORY).is_file()]
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


# ---------------------------------------------------------------- the report


def render(rows: list[dict], out: Path) -> str:
    if not rows:
        return "# CollaFuse cut-ratio sweep\n\nNo cut ratio has been evaluated yet.\n"
    protocols = sorted({r["protocol"] for r in rows})
    estimate = {r["energy_is_estimate"] for r in rows}
    parts = [
        "# CollaFuse cut-ratio sweep",
        f"Protocol: **{', '.join(protocols)}**"
        + (" (the paper's: the server sees x_t, t and the noise)" if protocols == ["shared-noise"]
           else "") + f". Cut ratios: {', '.join(f'{c:g}' for c in cut_ratios(rows))}; "
        f"clients: {', '.join(clients(rows))}; T = {rows[0]['num_timesteps']}; "
        f"{rows[0]['num_samples']} generated images per client and cut ratio.",
        ("KID is clean-fid's (its resize and its `kernel_distance`, checked in the tests): the "
         "mean over random subsets of the smaller set's size or the subset size. With fewer "
         "generated images than a subset, every subset holds all of them, so the std over "
         "subsets (`kid_*_std`) does not measure sampling uncertainty; the 95% bootstrap "
         "interval over both sets (`kid_*_ci_low`, `kid_*_ci_high`) does."),
        _energy_note(estimate),
        "## Findings of the paper, and this run",
        *findings(rows),
        "## Beyond the paper: copying",
        copying(rows),
        "## Results per cut ratio (mean over clients)",
        summary_table(rows),
        *per_class_table(rows),
        ("Per client and cut ratio: `results.csv` / `results.json`. The client FLOP share is "
         "client FLOPs / (client FLOPs + server FLOPs / number of clients) in training: the "
         "server trains on equal-sized batches from every client, so that is the part of the "
         "work on this client's data that the client does itself."),
        "## Figures",
        f"Figure 3 of the paper: per-client KID (stacked) against c.\n\n![KID]({FIGURES['kid']})",
        f"Disclosed information against c.\n\n![disclosure]({FIGURES['disclosure']})",
        f"Training cost per party against c.\n\n![costs]({FIGURES['costs']})",
        *([] if not (out / FIGURES["trajectory"]).is_file() else [
            ("Figure 2 of the paper: one sample's denoising, a row per c (same starting noise; "
             f"labels: steps left, and who ran them).\n\n![trajectory]({FIGURES['trajectory']})")
        ]),
        privacy_section(out),
    ]
    return "\n\n".join(parts) + "\n"


def _energy_note(estimate: set) -> str:
    if estimate == {None}:
        return "Energy was not measured (evaluation.energy = false)."
    if True in estimate:
        return ("Energy is an **estimate**: this machine has no power counters that codecarbon "
                "can read, so it models power as CPU load times a TDP table (RAM from installed "
                "memory). FLOPs, seconds and bytes do not depend on that.")
    return "Energy was read from power counters by codecarbon (RAM power is always modelled)."


def summary_table(rows: list[dict]) -> str:
    cols = [("handover_sigma", "hand-over noise std", "{:.2f}"),
            ("kid_train", "KID train", "{:.4f}"), ("kid_holdout", "KID hold-out", "{:.4f}"),
            ("kid_holdout_ci_low", "hold-out 95% CI low", "{:.4f}"),
            ("kid_holdout_ci_high", "high", "{:.4f}"),
            ("disclosure_mse", "discl. MSE (paper's)", "{:.3f}"),
            ("disclosure_kid", "discl. KID (paper's)", "{:.4f}"),
            ("disclosure_x0_nn_mse", "x0 NN-MSE", "{:.4f}"),
            ("disclosure_x0_nn_mse_baseline", "baseline NN-MSE", "{:.4f}"),
            ("disclosure_memorisation_nearer_train", "nearer train", "{:.2f}"),
            ("disclosure_memorisation_baseline_nearer_train", "baseline nearer train",
             "{:.2f}"),
            ("disclosure_memorisation_copy_fraction", "near-copies", "{:.2f}"),
            ("disclosure_memorisation_baseline_copy_fraction", "baseline near-copies", "{:.2f}"),
            ("client_flop_share", "client FLOP share", "{:.2f}"),
            ("client_energy_kwh", "client kWh", "{:.2e}"),
            ("server_energy_kwh", "server kWh", "{:.2e}"),
            ("client_bytes_sent", "client bytes sent", "{:.3g}"),
            ("server_bytes_received", "server bytes recv.", "{:.3g}")]
    lines = ["| c | " + " | ".join(name for _, name, _ in cols) + " |",
             "|---" * (len(cols) + 1) + "|"]
    values = {key: by_cut(rows, key) for key, _, _ in cols if key != "handover_sigma"}
    values["handover_sigma"] = handover_sigma(rows)
    for i, c in enumerate(cut_ratios(rows)):
        cells = [fmt.format(values[key][i]) if np.isfinite(values[key][i]) else "n/a"
                 for key, _, fmt in cols]
        lines.append(f"| {c:g} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def per_class_table(rows: list[dict]) -> list[str]:
    """A conditional run's KID per class and cut ratio (mean over clients); none otherwise."""
    names = [key.split("/", 1)[1] for key in rows[0] if key.startswith("kid_holdout/")]
    if not names:
        return []
    lines = ["| c | " + " | ".join(f"KID train {n} | KID hold-out {n}" for n in names) + " |",
             "|---" * (2 * len(names) + 1) + "|"]
    columns = [by_cut(rows, f"{kind}/{n}") for n in names for kind in ("kid_train", "kid_holdout")]
    for i, c in enumerate(cut_ratios(rows)):
        lines.append(f"| {c:g} | " + " | ".join(f"{v[i]:.4f}" for v in columns) + " |")
    return [f"### Per class (model.condition = {rows[0]['condition']!r}): the samples generated "
            "for a class against real images of that class", "\n".join(lines)]


def handover_sigma(rows: list[dict]) -> np.ndarray:
    """Noise std of the server's hand-over x_{s-1} per cut ratio: sqrt(1 - abar_{s-1}),
    1 for s = T (pure noise) and 0 for s = 0 (the final image)."""
    from ..diffusion import make_scheduler

    abar = make_scheduler(rows[0]["num_timesteps"]).alphas_cumprod.numpy()
    cuts = {r["cut_ratio"]: r["cut_index"] for r in rows}
    return np.array([np.sqrt(1.0 - abar[cuts[c] - 1]) if cuts[c] > 0 else 0.0
                     for c in cut_ratios(rows)])


def findings(rows: list[dict]) -> list[str]:
    """The paper's four findings, each with this run's numbers and a verdict."""
    cs = cut_ratios(rows)
    if len(cs) < 3:
        return [("Fewer than three cut ratios were evaluated; the paper's trends cannot be "
                 "checked on this run.")]
    return [_u_shape(rows, cs), _collaboration(rows, cs), _disclosure(rows, cs),
            _energy(rows, cs)]


def _series(cs, values, fmt="{:.4f}") -> str:
    return ", ".join(f"c={c:g}: {fmt.format(v)}" for c, v in zip(cs, values))


def _u_shape(rows, cs) -> str:
    parts = []
    verdicts = []
    for key, name in (("kid_train", "training data"), ("kid_holdout", "hold-out")):
        kid = by_cut(rows, key)
        best = int(np.nanargmin(kid))
        inside = 0 < best < len(cs) - 1
        verdicts.append(inside)
        parts.append(f"on {name} the best mean KID is at c={cs[best]:g} ({_series(cs, kid)})")
    verdict = _verdict(all(verdicts), any(verdicts))
    return ("1. **KID is U-shaped in c, best strictly between the extremes** (paper: best "
            f"around c = 0.6, worst at c = 1). {verdict}: " + "; ".join(parts) + ".")


def _collaboration(rows, cs) -> str:
    if 1.0 not in cs:
        return "2. **Collaboration beats c = 1**: c = 1 was not evaluated; cannot check."
    parts, verdicts = [], []
    for key, name in (("kid_train", "training data"), ("kid_holdout", "hold-out")):
        kid = by_cut(rows, key)
        local = kid[cs.index(1.0)]
        best = int(np.nanargmin(kid[:-1])) if cs[-1] == 1.0 else int(np.nanargmin(kid))
        verdicts.append(kid[best] < local)
        parts.append(f"{name}: best c<1 is c={cs[best]:g} with {kid[best]:.4f} vs "
                     f"{local:.4f} at c=1")
    return ("2. **Collaboration (some c < 1) beats no collaboration (c = 1)** on KID. "
            f"{_verdict(all(verdicts), any(verdicts))}: " + "; ".join(parts) + ".")


def _disclosure(rows, cs) -> str:
    if 0.0 not in cs:
        return "3. **Disclosure high only at c = 0**: c = 0 was not evaluated; cannot check."
    mse = by_cut(rows, "disclosure_mse")
    at_zero = mse[cs.index(0.0)]
    others = [m for c, m in zip(cs, mse) if c > 0]
    # "high disclosure only at c = 0": c = 0 is far closer to the real images than any c > 0.
    clear = at_zero < min(others) / 3
    return ("3. **Disclosed information is high only at c = 0** (paper: mean pixel MSE "
            f"{PAPER_DISCLOSURE_MSE['c=0']} at c = 0 against {PAPER_DISCLOSURE_MSE['c>=0.2']} "
            f"for c >= 0.2). {_verdict(clear, at_zero < min(others))}: mean pairwise MSE "
            f"{_series(cs, mse, '{:.3f}')}; hand-over noise std "
            f"{_series(cs, handover_sigma(rows), '{:.2f}')} (the client owns the s lowest-noise "
            "steps, so a small c hands over a lightly noised image). (Criterion: the c = 0 "
            "value below a third of every c > 0 value.) The paper's measure depends only on the "
            "two sets' means and second moments: for c > 0 it is fixed by the hand-over noise "
            "level, and it cannot see copying (exact copies of the training images score worse "
            "than their mean image repeated); the next section measures copying.")


def copying(rows) -> str:
    """Not a finding of the paper: whether the server's view of a client's images copies them."""
    cs = cut_ratios(rows)
    near = by_cut(rows, "disclosure_memorisation_nearer_train")
    base = by_cut(rows, "disclosure_memorisation_baseline_nearer_train")
    nn, nn_base = by_cut(rows, "disclosure_x0_nn_mse"), by_cut(rows, "disclosure_x0_nn_mse_baseline")
    copies = by_cut(rows, "disclosure_memorisation_copy_fraction")
    copies_base = by_cut(rows, "disclosure_memorisation_baseline_copy_fraction")
    if not np.any(np.isfinite(near)):
        return ("**Copying**: not measured; set "
                "data.client_holdout_fraction > 0 to hold out same-hospital patients.")
    return ("**Does the server's view copy the clients' images?** (The "
            "server's own x0 estimate of each hand-over, Tweedie with its model, against the "
            "client's training images and its held-out patients of the same hospital; baseline: "
            "real images of other held-out patients, which copy nothing). Fraction nearer to "
            f"training than to held-out patients: {_series(cs, near, '{:.2f}')} (baseline "
            f"{_series(cs, base, '{:.2f}')}); nearest-neighbour MSE to training: "
            f"{_series(cs, nn, '{:.4f}')} (baseline {_series(cs, nn_base, '{:.4f}')}); "
            "fraction of near-copies (three times nearer to a training image than to any "
            f"held-out one): {_series(cs, copies, '{:.2f}')} (baseline "
            f"{_series(cs, copies_base, '{:.2f}')}). A fraction above its baseline, or an MSE "
            "below its baseline, shows copying beyond what any new image of the hospital would "
            "show.")


def _energy(rows, cs) -> str:
    energy = by_cut(rows, "client_energy_kwh")
    flops = by_cut(rows, "client_flops")
    parts = [f"client FLOPs {_series(cs, flops, '{:.3g}')}"]
    if np.all(np.isfinite(energy)):
        rising = bool(np.all(np.diff(energy) > 0))
        parts.insert(0, f"client energy (kWh) {_series(cs, energy, '{:.2e}')}")
        verdict = _verdict(rising, _spearman(cs, energy) > 0.5)
    else:
        rising = bool(np.all(np.diff(flops) > 0))
        verdict = _verdict(rising, False) + " (energy not measured; judged on FLOPs)"
    return ("4. **A client's energy falls as c falls** (paper: clients spend less the more "
            f"steps the server takes). {verdict}: " + "; ".join(parts) + ".")


def _spearman(x, y) -> float:
    rx, ry = np.argsort(np.argsort(x)), np.argsort(np.argsort(y))
    return float(np.corrcoef(rx, ry)[0, 1])


def _verdict(yes: bool, partly: bool) -> str:
    return "Supported" if yes else ("Partly supported" if partly else "Not supported")


# ---------------------------------------------------------------- privacy (audit hook)


def privacy_section(out: Path) -> str:
    """HOOK for the privacy audit: its utility-vs-privacy table, when it has run.

    ``collafuse audit <sweep folder>`` writes privacy.md / privacy.csv into the sweep folder;
    the report then includes privacy.md here. Extend this function (not the rest of the
    report) to draw a utility-vs-privacy curve from privacy.csv.
    """
    md = Path(out) / "privacy.md"
    if not md.is_file():
        return ("## Privacy audit\n\nNot run for this sweep: `collafuse audit "
                f"{out}` adds what the server can reconstruct or infer, per cut ratio.")
    body = md.read_text().strip()
    # Demote its headings so they nest under this section.
    body = "\n".join("#" + ln if ln.startswith("#") else ln for ln in body.splitlines())
    return "## Privacy audit\n\n" + body
