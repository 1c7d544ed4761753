"""Figures and report.md of a cut-ratio sweep, from its results.json and trajectories.

Figures (PNG, matplotlib's Agg backend): the paper's Figure 3 (stacked per-client KID against
c, on training data and hold-out; disclosure MSE and KID against c), the cost per party
against c, and the paper's Figure 2 (one sample's denoising trajectory, a row per c).
report.md puts the sweep's numbers beside the paper's findings; for each finding a verdict
(holds / contradicted / not resolved) computed from intervals over training seeds
(:mod:`.intervals`). Figures and the per-cut tables show the paper's protocol (shared-noise
where it ran), averaged over clients and seeds; the other protocol is compared with it, paired
by seed, in a table of its own.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from ..choices import PROTOCOLS
from ..state import write_text
from . import intervals as iv
from .plotting import plot_costs, plot_disclosure, plot_kid, plot_trajectories
from .rows import (by_cut, clients, cut_ratios, main_protocol, protocol_rows,
                   seed_table, seeds_of)

FIGURES = {
    "kid": "fig3_kid.png",
    "disclosure": "fig3_disclosure.png",
    "costs": "costs.png",
    "trajectory": "fig2_trajectory.png",
}
REPORT = "report.md"
# The paper's mean pixel MSE between the server's images at the cut and the clients' real ones.
PAPER_DISCLOSURE_MSE = {"c=0": 0.087, "c>=0.2": "about 1.0 to 1.07"}
# Energy is metered seconds times modelled power, so runs trained at different paces (load,
# threads, pauses) differ in energy for reasons other than c. Beyond this ratio between the
# slowest and the fastest run's client seconds per training FLOP, energy decides nothing.
PACE_SPREAD = 1.5


def write_report(out: str | Path, untrained: Sequence[str] = ()) -> Path:
    """Draw every figure and write report.md into the sweep folder ``out``; ``untrained``
    names the planned runs that are not in it yet (a partial sweep)."""
    out = Path(out)
    rows = json.loads((out / "results.json").read_text())
    if rows:
        main = protocol_rows(rows)
        plot_kid(main, out / FIGURES["kid"])
        plot_disclosure(main, out / FIGURES["disclosure"])
        plot_costs(main, out / FIGURES["costs"])
        plot_trajectories(out, main, out / FIGURES["trajectory"])
    path = out / REPORT
    write_text(path, render(rows, out, untrained))
    return path


# ---------------------------------------------------------------- the report


def render(rows: list[dict], out: Path, untrained: Sequence[str] = ()) -> str:
    if not rows:
        return "# CollaFuse cut-ratio sweep\n\nNo run has been evaluated yet.\n"
    main = protocol_rows(rows)
    protocol = main_protocol(rows)
    protocols = list(dict.fromkeys(r["protocol"] for r in rows))
    estimate = {r["energy_is_estimate"] for r in rows}
    plan = "; ".join(
        f"**{p}**: c = {', '.join(f'{c:g}' for c in cut_ratios(protocol_rows(rows, p)))}, "
        f"seeds {', '.join(str(k) for k in seeds_of(protocol_rows(rows, p)))}"
        for p in protocols)
    parts = [
        "# CollaFuse cut-ratio sweep",
        f"Runs: {plan}. Clients: {', '.join(clients(rows))}; T = {rows[0]['num_timesteps']}; "
        f"{rows[0]['num_samples']} generated images per client and run. Shared-noise is the "
        "paper's protocol (the server sees x_t, t and the noise); noisy-data hides the noise "
        "(docs/design.md section 3).",
        *([] if not untrained else [
            f"**A partial sweep:** {len(untrained)} planned runs are not trained yet "
            f"({', '.join(untrained)}); every figure and verdict below is on the runs above."]),
        ("KID is clean-fid's (its resize and its `kernel_distance`, checked in the tests). A "
         "training seed is a whole run and its own evaluation; each seed's value is the mean "
         "over clients. **Intervals are 95% Student t-intervals over training seeds** (n - 1 "
         "degrees of freedom) of those per-seed values, so they hold the seed-to-seed variance "
         "of training and the sampling noise of the evaluation together; differences between "
         "settings are paired by seed. One seed gives no interval. The per-run bootstrap "
         "interval in `results.csv` (`kid_*_ci_low/high`) covers sampling noise only."),
        _energy_note(estimate),
        f"## Findings of the paper, and this sweep ({protocol})",
        ("Each verdict is computed from the intervals (rules: docs/sweep.md): **holds**, "
         "**contradicted**, or **not resolved** at this power."),
        *findings(main),
        "## KID over training seeds, per protocol",
        *[kid_seed_table(protocol_rows(rows, p), p) for p in protocols],
        *protocol_cost(rows),
        "## Beyond the paper: copying",
        copying(main),
        f"## Results per cut ratio ({protocol}; mean over clients and seeds)",
        summary_table(main),
        *per_class_table(main),
        ("Per client, run and seed: `results.csv` / `results.json`. The client FLOP share is "
         "client FLOPs / (client FLOPs + server FLOPs / number of clients) in training: the "
         "server trains on equal-sized batches from every client, so that is the part of the "
         "work on this client's data that the client does itself."),
        "## Figures",
        ("Figure 3 of the paper: per-client KID (stacked, mean over seeds) against c; error "
         f"bars: 95% t-interval over seeds of the stack.\n\n![KID]({FIGURES['kid']})"),
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


KID_KEYS = (("kid_holdout", "KID vs hold-out"), ("kid_train", "KID vs own training data"))


def findings(rows: list[dict]) -> list[str]:
    """The paper's four findings on one protocol's rows: each with its computed verdict, this
    sweep's numbers and the paper's."""
    return [_u_shape(rows), _collaboration(rows), _disclosure(rows), _cost(rows)]


def _line(number: int, claim: str, paper: str, verdicts: list[tuple[str, iv.Verdict]]) -> str:
    judged = "; ".join(f"{what}: **{v.verdict}** ({v.reason})" for what, v in verdicts)
    return f"{number}. **{claim}** (paper: {paper}). {judged}."


def _u_shape(rows) -> str:
    return _line(1, "KID is U-shaped in c, best near c = 0.6", "best around c = 0.6, worst at "
                 "c = 1", [(name, iv.u_shape(seed_table(rows, key))) for key, name in KID_KEYS])


def _collaboration(rows) -> str:
    return _line(2, "Collaboration (some c < 1) beats no collaboration (c = 1) on KID",
                 "every c < 1 better than c = 1",
                 [(name, iv.collaboration(seed_table(rows, key))) for key, name in KID_KEYS])


def _disclosure(rows) -> str:
    table = seed_table(rows, "disclosure_mse")
    mse = {c: iv.t_interval(v.values()).text("{:.3f}") for c, v in table.items()}
    return (_line(3, "Disclosed information is high only at c = 0",
                  f"mean pixel MSE {PAPER_DISCLOSURE_MSE['c=0']} at c = 0 against "
                  f"{PAPER_DISCLOSURE_MSE['c>=0.2']} for c >= 0.2",
                  [("mean pairwise MSE", iv.disclosure_only_at_zero(table))])
            + " This sweep's MSE: " + "; ".join(f"c = {c:g}: {m}" for c, m in mse.items())
            + "; hand-over noise std " + _series(cut_ratios(rows), handover_sigma(rows), "{:.2f}")
            + " (the client owns the s lowest-noise steps, so a small c hands over a lightly "
            "noised image). The paper's measure depends only on the two sets' means and second "
            "moments: for c > 0 it is fixed by the hand-over noise level, and it cannot see "
            "copying (exact copies of the training images score worse than their mean image "
            "repeated); the copying section measures that.")


def _cost(rows) -> str:
    energy = seed_table(rows, "client_energy_kwh")
    measured = bool(energy) and len(energy) == len(cut_ratios(rows))
    judged = [("client energy", _energy_verdict(rows, energy))] if measured else []
    judged.append(("client FLOPs", iv.cost_falls_with_c(seed_table(rows, "client_flops"),
                                                         "FLOPs")))
    return _line(4, "A client's cost falls as c falls", "clients spend less energy the more "
                 "steps the server takes", judged)


def _pace_spread(rows) -> float:
    """The slowest over the fastest client pace (metered training seconds per training FLOP)
    among the rows; 1 where no row has both."""
    paces = [r["client_seconds"] / r["client_flops"] for r in rows
             if r.get("client_flops") and r.get("client_seconds")]
    return max(paces) / min(paces) if paces else 1.0


def _energy_verdict(rows, energy) -> iv.Verdict:
    verdict, spread = iv.cost_falls_with_c(energy, "energy"), _pace_spread(rows)
    if spread <= PACE_SPREAD:
        return verdict
    return iv.Verdict(verdict.finding, iv.UNRESOLVED,
                      f"the runs' client paces, metered seconds per training FLOP, differ by a "
                      f"factor {spread:.1f} (load, threads, pauses), so energy compares unlike "
                      f"conditions; as measured: {verdict.verdict}, {verdict.reason}")


def _series(cs, values, fmt="{:.4f}") -> str:
    """``c=0.2: 0.0310, ...``; n/a where a c has no value (e.g. the server's view at c = 1)."""
    return ", ".join(f"c={c:g}: {fmt.format(v) if np.isfinite(v) else 'n/a'}"
                     for c, v in zip(cs, values))


def kid_seed_table(rows: list[dict], protocol: str) -> str:
    """Per c: KID mean and interval over seeds, and the paired differences to c = 1 and to
    the best c."""
    lines = [f"**{protocol}**", "",
             "| c | seeds | KID hold-out [95% CI] | minus KID(c = 1) | minus KID(best c) "
             "| KID train [95% CI] | minus KID(c = 1) |", "|---" * 7 + "|"]
    hold, train = seed_table(rows, "kid_holdout"), seed_table(rows, "kid_train")
    best = iv.best_cut(hold) if hold else None
    for c in cut_ratios(rows):
        cells = [f"{c:g}", str(len(hold.get(c, {}))), iv.t_interval(hold.get(c, {}).values()).text()]
        cells.append(_diff(hold, c, 1.0))
        cells.append("(best)" if c == best else _diff(hold, c, best))
        cells.append(iv.t_interval(train.get(c, {}).values()).text())
        cells.append(_diff(train, c, 1.0))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _diff(table, c, other) -> str:
    if other is None or other not in table or c == other:
        return "-"
    return iv.paired_interval(table[c], table[other]).text()


def protocol_cost(rows: list[dict]) -> list[str]:
    """What hiding the noise costs: KID(noisy-data) - KID(shared-noise) per c, paired by seed."""
    if {r["protocol"] for r in rows} != set(PROTOCOLS):
        return []
    shared = seed_table(protocol_rows(rows, "shared-noise"), "kid_holdout")
    noisy = seed_table(protocol_rows(rows, "noisy-data"), "kid_holdout")
    lines = ["| c | seeds paired | KID hold-out shared-noise | noisy-data | noisy-data minus "
             "shared-noise [95% CI] |", "|---" * 5 + "|"]
    for c in sorted(set(shared) & set(noisy)):
        common = sorted(set(shared[c]) & set(noisy[c]))
        pick = lambda t: iv.t_interval([t[c][k] for k in common]).text()  # noqa: E731
        lines.append(f"| {c:g} | {', '.join(map(str, common)) or 'none'} | {pick(shared)} | "
                     f"{pick(noisy)} | {iv.paired_interval(noisy[c], shared[c]).text()} |")
    return ["## What hiding the noise costs (noisy-data against shared-noise)",
            ("KID against the hold-out hospitals on the training seeds both protocols ran, and "
             "their paired difference (positive: hiding the noise costs quality). With one "
             "common seed the difference has no interval."), "\n".join(lines)]


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


# ---------------------------------------------------------------- privacy (audit hook)


def privacy_section(out: Path) -> str:
    """HOOK for the privacy audit: its utility-vs-privacy table, when it has run.

    ``collafuse audit <sweep folder>`` writes privacy.md / privacy.csv into the sweep folder;
    the report then includes privacy.md here. Extend this function (not the rest of the
    report) to draw a utility-vs-privacy curve from privacy.csv.
    """
    md = Path(out) / "privacy.md"
    if not md.is_file():
        from ..privacy.audit import run_audits_markdown  # the audit imports this module

        per_run = run_audits_markdown(out)
        if per_run is not None:
            return "## Privacy audit\n\n#" + per_run
        return ("## Privacy audit\n\nNot run for this sweep: `collafuse audit "
                f"{out}` adds what the server can reconstruct or infer, per cut ratio.")
    body = md.read_text().strip()
    # Demote its headings so they nest under this section.
    body = "\n".join("#" + ln if ln.startswith("#") else ln for ln in body.splitlines())
    return "## Privacy audit\n\n" + body
