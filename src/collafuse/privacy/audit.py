"""`collafuse audit`: what the server of a finished run can learn, per client, cut and protocol.

For each run folder (or each run of a sweep folder) the audit rebuilds the parties from
config.toml + checkpoint.pt, replays what the server received from every client (messages
built by :func:`collafuse.protocols.server_message` exactly as ``Client._train_batch`` builds
them, then encoded and decoded as they travel), runs the attacks of
:mod:`collafuse.privacy.attacks` and the accounting of
:mod:`collafuse.privacy.accounting`, and writes privacy.csv, privacy.json and privacy.md.

Each row is one (run, client, protocol). ``protocol`` is the protocol whose messages were
attacked; ``run_protocol`` the one the run trained with. Rows with protocol != run_protocol
are counterfactual: the other protocol's messages at the same cut, attacked with the run's
server model (the reconstruction attacks a-c need nothing else); the model attacks d and e
are reported only for the protocol the model was trained with.

Beside every reconstruction attack stands the trivial baseline (``base_*``): the mean image of
the non-member images guessed for every target; ``<attack>_gain_db`` is the attack's PSNR minus
the baseline's. Non-members (membership d, memorisation e, the baseline) are the client's own
held-out patients of the same hospital where the run has them (``run.client_holdout``), else
the run's hold-out set; the row says which in ``nonmembers``.

The seed-replay attack (r) applies to noisy-data rows only: shared-noise messages carry eps,
so attack a is already exact and r is marked ``r_method = "not needed: exact from eps"``
with no scores.
"""

from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path

import numpy as np
import torch

from ..data import to_model
from ..diffusion import add_noise, handover_view, tweedie_estimate, tweedie_from_view
from ..messages import SampleRequest, decode, encode
from ..protocols import PROTOCOLS, server_message
from ..state import write_text
from . import attacks
from .accounting import DEFAULT_DELTA, explain, protocol_privacy
from .membership_audit import DEFAULT_REFERENCE_ROUNDS, membership_markdown, membership_rows

AVERAGING_KS = (1, 2, 4, 8, 16, 32, 64)
REPLAY_OFFSETS = range(-4, 5)  # seed + k: how far the server looks around each derived seed
FILES = ("privacy.csv", "privacy.json", "privacy.md",
         "membership.csv", "membership.json", "membership-scores.csv")
SAME_HOSPITAL = "same-hospital patients"
R_NOT_NEEDED = "not needed: exact from eps"


def find_runs(path: str | Path) -> list[Path]:
    """The run folder itself, or the run folders (config.toml + checkpoint.pt) of a sweep
    folder, up to two levels down (c=<ratio>/ or <protocol>/c=<ratio>/)."""
    path = Path(path)
    if (path / "config.toml").is_file() and (path / "checkpoint.pt").is_file():
        return [path]
    found = sorted({p.parent for pattern in ("*/config.toml", "*/*/config.toml")
                    for p in path.glob(pattern) if (p.parent / "checkpoint.pt").is_file()})
    if not found:
        raise ValueError(f"{path}: neither a run folder (config.toml + checkpoint.pt) nor a "
                         "sweep folder of trained run folders")
    return found


def _server_model(server):
    """The server's published noise predictor: the EMA weights where kept (as in sampling).
    It runs on the server's device and takes and returns host tensors, as the attacks use."""
    net = server.ema.model if server.ema else server.model
    net.eval()
    return lambda x, t: server.predict(net, x, t)


def replay_message(protocol: str, client, idx: torch.Tensor, generator: torch.Generator):
    """What ``client`` sends for images ``idx`` under ``protocol`` when the server owns their t.

    t is drawn uniformly from [s, T) (the law of a sent image's t); noisy-data uses the
    client's own fixed views where the run used noisy-data, fresh ones otherwise.
    """
    scheduler, cut, x0 = client.scheduler, client.cut, client.images[idx]
    t = torch.randint(cut, client.num_timesteps, (len(idx),), generator=generator)
    eps = torch.randn(x0.shape, generator=generator)
    x_t = add_noise(scheduler, x0, eps, t)
    if client.views is not None:
        views = client.views[idx]
    else:
        views = handover_view(scheduler, x0, torch.randn(x0.shape, generator=generator), cut)
    msg = server_message(protocol, client.client_id, x_t, t, eps, views, cut)
    return decode(encode(msg))


def attack_message(protocol: str, msg, x0: torch.Tensor, model, scheduler, cut: int,
                   generator: torch.Generator) -> dict:
    """Attacks (a) and (b) on one replayed message against the true images x0."""
    if protocol == "shared-noise":
        a_est = attacks.reconstruct_shared_noise(scheduler, msg.x_t, msg.t, msg.eps)
        b_est = tweedie_estimate(model, scheduler, msg.x_t, msg.t)
        method = "exact inversion of (x_t, t, eps)"
    else:
        a_est = attacks.view_estimate(scheduler, msg.views, cut)
        b_est = tweedie_from_view(model, scheduler, msg.views, cut, generator)
        method = "view alone, y / sqrt(abar_{s-1})"
    return {"a_method": method,
            **{f"a_{k}": v for k, v in attacks.scores(a_est, x0).items()},
            **{f"b_{k}": v for k, v in attacks.scores(b_est, x0).items()}}


def replay_seeds(cfg, client_ids: list[str] | None = None,
                 offsets=REPLAY_OFFSETS) -> list[int]:
    """Seeds the server can derive from the run's config alone, for the seed-replay attack.

    The run seed and ``party_seed(cfg, name)`` (collafuse.factory) of every party the server
    knows of ("server", "server:init", "client:<id>", "client:<id>:init"), each plus k for k in
    ``offsets``. The client's old view noise came from party_seed(cfg, "client:<id>") + 1.
    """
    from ..factory import party_seed

    if client_ids is None:
        d = cfg.data
        client_ids = d.clients if d.partition == "site" else [f"client{i}"
                                                              for i in range(d.num_clients)]
    names = ["server", "server:init",
             *(f"client:{cid}{suffix}" for cid in client_ids for suffix in ("", ":init"))]
    bases = [cfg.run.seed, *(party_seed(cfg, name) for name in names)]
    return sorted({base + k for base in bases for k in offsets if base + k >= 0})


def replay_attack(protocol: str, msg, x0: torch.Tensor, scheduler, cut: int, num_images: int,
                  seeds: list[int]) -> dict:
    """Attack (r) on one replayed message: noisy-data views undone by regenerating xi."""
    if protocol == "shared-noise":
        return {"r_method": R_NOT_NEEDED}
    estimate, found = attacks.seed_replay(scheduler, msg.views, cut, num_images, seeds)
    return {"r_method": f"regenerate xi from {len(seeds)} config-derived seeds",
            "r_candidates": len(seeds), "r_recovered": float(found.double().mean()),
            **{f"r_{k}": v for k, v in attacks.scores(estimate, x0).items()}}


def gains(row: dict) -> dict:
    """Each reconstruction attack's PSNR minus the mean-image baseline's, in dB."""
    base = row["base_psnr"]
    out = {f"{p}_gain_db": row[f"{p}_psnr"] - base for p in ("a", "b", "r") if f"{p}_psnr" in row}
    out.update({f"c_gain_db_k{k}": row[f"c_psnr_k{k}"] - base for k in AVERAGING_KS
                if f"c_psnr_k{k}" in row})
    return out


def nonmember_set(run, cid: str):
    """The client's own same-hospital held-out patients where the run has them, else the run's
    hold-out set, with a label saying which (membership AUC against other hospitals is inflated
    by the site difference)."""
    own = getattr(run, "client_holdout", {}).get(cid)
    if own is not None and len(own) > 0:
        return own, SAME_HOSPITAL
    label = "other hospitals" if run.cfg.data.holdout_sites else "held-out patients, all hospitals"
    return run.holdout, label


def audit_run(run_dir: str | Path, num_images: int = 128, seed: int = 0,
              delta: float = DEFAULT_DELTA, progress: bool = True,
              device: str | None = None) -> list[dict]:
    """All attack and accounting rows of one run folder; its models run on ``device``
    (default: the run's ``run.device``)."""
    from ..engines.local import load_run
    from ..factory import make_server

    run_dir = Path(run_dir)
    run = load_run(run_dir, device=device)
    cfg, server = run.cfg, run.server
    if any(c != server.cut for c in server.cuts.values()):
        raise ValueError(f"{run_dir}: clients with cut ratios of their own ([clients.<id>]); "
                         "the audit attacks one cut per run: audit a run with one cut ratio")
    scheduler, cut, num_timesteps = server.scheduler, server.cut, server.num_timesteps
    model, untrained = _server_model(server), _server_model(make_server(cfg))
    steps = attacks.score_timesteps(cut, num_timesteps)
    num_pixels = int(np.prod(server.image_shape))
    samples = server.generate(SampleRequest(client_id="audit", num_samples=num_images,
                                            seed=seed)).x.cpu()
    a_scale, _ = attacks.handover_signal(scheduler, cut)
    seeds = replay_seeds(cfg, list(run.clients))
    rows = []
    for cid, client in run.clients.items():
        if progress:
            print(f"audit {run_dir.name}: client {cid}", flush=True)
        reference, nonmember_label = nonmember_set(run, cid)
        if len(reference) == 0:
            raise ValueError(f"{run_dir}: the audit needs hold-out patients as non-members; the "
                             "run has none (set data.holdout_sites or data.holdout_fraction)")
        reference = to_model(reference.images)
        rng = torch.Generator().manual_seed(seed)
        n = min(num_images, len(client.images))
        idx = torch.randperm(len(client.images), generator=rng)[:n]
        x0 = client.images[idx]
        m = min(n, len(reference))
        nonmembers = reference[torch.randperm(len(reference), generator=rng)[:m]]
        model_rows = _model_attacks(model, untrained, scheduler, steps, x0[:m], nonmembers,
                                    samples, a_scale, seed)
        baseline = {f"base_{k}": v for k, v in attacks.mean_image_baseline(x0, reference).items()}
        averaging = attacks.averaging_attack(scheduler, x0, cut, rng, AVERAGING_KS) \
            if cut < num_timesteps else []
        for protocol in (cfg.train.protocol, *[p for p in PROTOCOLS if p != cfg.train.protocol]):
            trained = protocol == cfg.train.protocol
            row = {"run": str(run_dir), "cut_ratio": cfg.diffusion.cut_ratio, "cut_index": cut,
                   "num_timesteps": num_timesteps, "run_protocol": cfg.train.protocol,
                   "protocol": protocol, "trained": trained, "client": cid, "num_images": n,
                   "nonmembers": nonmember_label, "num_nonmembers": m,
                   "server_steps": server.steps, **baseline}
            if cut < num_timesteps:
                msg = replay_message(protocol, client, idx, rng)
                if trained:
                    server.check(msg)
                row.update(attack_message(protocol, msg, x0, model, scheduler, cut, rng))
                row.update(replay_attack(protocol, msg, x0, scheduler, cut, len(client.images),
                                         seeds))
            if protocol == "noisy-data":
                row.update({f"c_psnr_k{r['k']}": r["psnr"] for r in averaging})
                row.update({f"c_mse_k{r['k']}": r["mse"] for r in averaging})
            row.update(gains(row))
            if trained:
                row.update(model_rows)
            acc = protocol_privacy(protocol, scheduler, cut, num_pixels, delta)
            row.update(acc)
            row["explanation"] = explain(protocol, cut, num_timesteps, acc)
            rows.append(row)
    return rows


def _model_attacks(model, untrained, scheduler, steps, members, nonmembers, samples, scale,
                   seed) -> dict:
    """Membership inference (d), with an untrained-model control, and memorisation (e);
    both need server timesteps (none when s = T)."""
    out = {}
    if steps:
        for prefix, net in (("d", model), ("d_untrained", untrained)):
            member = attacks.membership_losses(net, scheduler, members, steps, seed)
            nonmember = attacks.membership_losses(net, scheduler, nonmembers, steps, seed)
            mia = attacks.membership_attack(member, nonmember, fpr=0.01)
            out.update({f"{prefix}_{k}": v for k, v in mia.items()})
        # With s = T the hand-over is the pure noise itself: nothing to compare.
        m = min(len(members), len(nonmembers))
        mem = attacks.memorisation(samples, members[:m], nonmembers[:m], scale)
        out.update({f"e_{k}": v for k, v in mem.items()})
    return out


def audit(path: str | Path, out: str | Path | None = None, num_images: int = 128,
          seed: int = 0, delta: float = DEFAULT_DELTA, progress: bool = True,
          device: str | None = None,
          reference_rounds: int = DEFAULT_REFERENCE_ROUNDS,
          export_dir: str | Path | None = None,
          samples_dir: str | Path | None = None, reference_models: int = 1) -> list[dict]:
    """Audit a run or sweep folder; write privacy.csv/json/md and membership.csv/json into
    ``out`` (default: path). ``reference_rounds``: training of the calibration reference
    (:mod:`collafuse.privacy.membership_audit`; 0: no calibrated attacks), of
    ``reference_models`` reference pairs (their mean calibrates). ``export_dir`` and
    ``samples_dir`` (a run folder only): what the run's hospitals published, attacked too."""
    runs = find_runs(path)
    if len(runs) > 1 and (export_dir is not None or samples_dir is not None):
        raise ValueError(f"{path}: a sweep folder; --export and --samples belong to one run, "
                         f"audit that run's folder")
    for name, folder in (("--export", export_dir), ("--samples", samples_dir)):
        if folder is not None and not Path(folder).is_dir():
            raise ValueError(f"{name} {folder}: no such folder")
    rows = [row for run_dir in runs
            for row in audit_run(run_dir, num_images, seed, delta, progress, device)]
    scores: list[dict] = []
    member_rows = [row for run_dir in runs
                   for row in membership_rows(run_dir, num_images, seed, reference_rounds,
                                              progress, device, export_dir, samples_dir,
                                              scores, reference_models)]
    out = Path(out or path)
    out.mkdir(parents=True, exist_ok=True)
    write_text(out / "privacy.csv", to_csv(rows))
    write_text(out / "privacy.json", json.dumps(
        {"delta": delta, "num_images": num_images, "seed": seed, "rows": _jsonable(rows)},
        indent=2, allow_nan=False))
    write_text(out / "membership.csv", to_csv(member_rows))
    write_text(out / "membership-scores.csv", to_csv(scores))
    write_text(out / "membership.json", json.dumps(
        {"num_images": num_images, "seed": seed, "reference_rounds": reference_rounds,
         "reference_models": reference_models,
         "rows": _jsonable(member_rows)}, indent=2, allow_nan=False))
    markdown = to_markdown(rows) + "\n" + membership_markdown(member_rows)
    results = Path(path) / "results.json"
    if results.is_file():
        markdown += "\n" + tradeoff_markdown(rows, json.loads(results.read_text()), out)
    write_text(out / "privacy.md", markdown)
    if results.is_file() and out == Path(path):
        from ..evaluation.report import write_report

        write_report(out)  # its privacy hook includes privacy.md
    return rows


# ---------------------------------------------------------------- utility vs privacy (sweeps)

TRADEOFF_FIGURE = "privacy_tradeoff.png"


def tradeoff_rows(privacy_rows: list[dict], results_rows: list[dict]) -> list[dict]:
    """Per cut ratio and protocol: utility (KID of the sweep, mean over clients) next to
    privacy (the best reconstruction attack of a, b and r, its gain over the mean-image
    baseline, membership AUC with its non-member set and untrained control, epsilon).

    Only protocols a model was trained with have a KID; counterfactual rows keep it blank.
    """
    out = []
    for r in summary(privacy_rows):
        kid = [x for x in results_rows if x["protocol"] == r["protocol"]
               and math.isclose(x["cut_ratio"], r["cut_ratio"])]
        attack_psnr = _best([r.get(f"{p}_psnr", math.nan) for p in "abr"])
        out.append({
            "cut_ratio": r["cut_ratio"], "protocol": r["protocol"], "trained": r["trained"],
            "kid_train": _mean([x["kid_train"] for x in kid]) if kid else math.nan,
            "kid_holdout": _mean([x["kid_holdout"] for x in kid]) if kid else math.nan,
            "baseline_psnr": r.get("base_psnr", math.nan),
            "baseline_ssim": r.get("base_ssim", math.nan),
            "attack_psnr": attack_psnr,
            "attack_gain_db": attack_psnr - r.get("base_psnr", math.nan),
            "attack_ssim": _best([r.get(f"{p}_ssim", math.nan) for p in "abr"]),
            "mia_auc": r.get("d_auc", math.nan),
            "mia_auc_untrained": r.get("d_untrained_auc", math.nan),
            "nonmembers": r.get("nonmembers", ""),
            "epsilon_pixel": r["epsilon_pixel"], "epsilon_image": r["epsilon_image"]})
    return out


def tradeoff_markdown(privacy_rows: list[dict], results_rows: list[dict], out: Path) -> str:
    """The utility-vs-privacy table and figure of a sweep (the paper's outlook asks for it)."""
    from ..evaluation.plotting import plot_tradeoff  # matplotlib: only where a figure is drawn

    rows = tradeoff_rows(privacy_rows, results_rows)
    plot_tradeoff(rows, Path(out) / TRADEOFF_FIGURE)
    lines = ["## Utility against privacy, per cut ratio and protocol", "",
             ("KID: generated images against the clients' training data and against hold-out "
              "patients (lower is better; from the sweep, mean over clients). Attack PSNR: the "
              "best of attacks a, b and r (higher = the server sees more); baseline: guessing "
              "the non-members' mean image for every training image, without any message; gain "
              "= attack PSNR - baseline PSNR (at or below 0: the attack tells the server no more "
              "than the guess). MIA AUC: membership attack d, with the non-member set it was "
              "measured against and the untrained-model control (a site difference between "
              "members and non-members inflates it). Counterfactual rows: the other protocol's "
              "messages at the same cut, attacked with this sweep's model; no model was trained "
              "with them, so no KID. eps pixel assumes one pixel changes alone: pixels are "
              "correlated, so only eps image is a guarantee about an image."), "",
             ("| c | protocol | source | KID train | KID hold-out | baseline PSNR dB | "
              "attack PSNR dB | gain dB | attack SSIM (baseline) | MIA AUC (untrained; "
              "non-members) | eps image | eps pixel |"),
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append("| " + " | ".join([
            _fmt(r["cut_ratio"]), r["protocol"], "trained" if r["trained"] else "counterfactual",
            _fmt(r["kid_train"]), _fmt(r["kid_holdout"]), _fmt(r["baseline_psnr"]),
            _fmt(r["attack_psnr"], 4), _gain(r["attack_gain_db"]),
            f"{_fmt(r['attack_ssim'])} ({_fmt(r['baseline_ssim'])})",
            _mia_cell(r["mia_auc"], r["mia_auc_untrained"], r["nonmembers"]),
            _fmt(r["epsilon_image"]), _fmt(r["epsilon_pixel"])]) + " |")
    lines += ["", f"![utility against privacy]({TRADEOFF_FIGURE})", ""]
    return "\n".join(lines)


def load_privacy_rows(path: str | Path) -> list[dict]:
    """Rows of a privacy.json (a file or the folder holding it), with "inf" back as floats."""
    path = Path(path)
    path = path / "privacy.json" if path.is_dir() else path
    rows = json.loads(path.read_text())["rows"]
    return [{k: float(v) if v in ("inf", "-inf") else (math.nan if v is None else v)
             for k, v in row.items()} for row in rows]


def run_audits_markdown(sweep_dir: str | Path) -> str | None:
    """One table over the runs of a sweep folder audited one by one (`collafuse audit RUN`
    writes privacy.json and membership.json into the run's folder, as soon as the run is
    trained; a committed sweep keeps no weights to audit later): per protocol, c and seed,
    the reconstruction gains of the trained protocol and the strongest membership attack on
    each target. None where no run folder holds both files."""
    from ..config import load_config
    from .membership_audit import strongest

    folders = sorted({p.parent for pattern in ("*/membership.json", "*/*/membership.json")
                      for p in Path(sweep_dir).glob(pattern)
                      if (p.parent / "privacy.json").is_file()})
    if not folders:
        return None
    entries = []
    for folder in folders:
        recon = next(r for r in summary(load_privacy_rows(folder)) if r["trained"])
        member_rows = json.loads((folder / "membership.json").read_text())["rows"]
        entries.append((PROTOCOLS.index(recon["run_protocol"]), recon["cut_ratio"],
                        load_config(folder / "config.toml").run.seed, recon,
                        {s["target"]: s for s in strongest(member_rows)}))
    lines = ["## Audits of the sweep's runs", "",
             ("`collafuse audit <run folder> -n N` on each trained run (its privacy.md and "
              "membership.json lie in the run's folder). a, b: gain in dB over guessing the "
              "hospital's mean image (a: from the messages alone; b: the server's model as a "
              "denoiser). Membership: per target the attack with the largest TPR at 1% FPR, "
              "mean over clients weighted by matched pairs, as points above the blind "
              "baseline (a classifier on the images alone), with the TPR's 95% bootstrap "
              "interval and the attack's AUC; '-': the party owns no level to attack."), "",
             "| protocol | c | seed | a gain dB | b gain dB | blind TPR@1% | server's model "
             "| client's model | samples |", "|---|---|---|---|---|---|---|---|---|"]
    for index, c, seed, recon, strong in sorted(entries, key=lambda e: e[:3]):
        blind = next(iter(strong.values()))["blind_tpr_1"] if strong else math.nan
        lines.append(f"| {PROTOCOLS[index]} | {c:g} | {seed} | {_gain(recon['a_gain_db'])} | "
                     f"{_gain(recon['b_gain_db'])} | {100 * blind:.1f}% | " + " | ".join(
                         _strongest_cell(strong.get(t)) for t in ("server", "client",
                                                                 "samples")) + " |")
    return "\n".join(lines) + "\n"


def _strongest_cell(s: dict | None) -> str:
    if s is None:
        return "-"
    return (f"{s['attack']} {100 * s['over_blind']:+.1f} pt (TPR {100 * s['tpr_1']:.1f}% "
            f"[{100 * s['tpr_1_lo']:.1f}, {100 * s['tpr_1_hi']:.1f}], AUC {s['auc']:.2f})")


def summary(rows: list[dict]) -> list[dict]:
    """Client-averaged figures per (run, cut ratio, protocol), in cut-ratio order."""
    keys = sorted({(r["run"], r["cut_ratio"], r["protocol"], r["run_protocol"]) for r in rows},
                  key=lambda k: (k[1], k[3], k[0], k[2] != k[3]))
    out = []
    for key in keys:
        group = [r for r in rows if (r["run"], r["cut_ratio"], r["protocol"],
                                     r["run_protocol"]) == key]
        numeric = {k for r in group for k, v in r.items()
                   if isinstance(v, (int, float)) and not isinstance(v, bool)}
        out.append({"run": key[0], "cut_ratio": key[1], "protocol": key[2],
                    "run_protocol": key[3], "trained": key[2] == key[3],
                    "cut_index": group[0]["cut_index"],
                    **{k: _mean([r.get(k, math.nan) for r in group]) for k in sorted(numeric)
                       if k not in ("cut_ratio", "cut_index")},
                    **{k: "; ".join(sorted({r[k] for r in group if k in r}))
                       for k in ("nonmembers", "r_method")},
                    "explanation": group[0]["explanation"]})
    return out


def _mean(values) -> float:
    values = [float(v) for v in values]
    if any(math.isinf(v) for v in values):
        return float(np.mean(values))
    finite = [v for v in values if not math.isnan(v)]
    return float(np.mean(finite)) if finite else math.nan


def _best(values) -> float:
    """The largest value, ignoring missing (nan) ones; nan if all are missing."""
    present = [v for v in values if not math.isnan(v)]
    return max(present) if present else math.nan


def _fmt(value, digits: int = 3) -> str:
    if isinstance(value, float):
        if math.isnan(value):
            return "-"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return f"{value:.{digits}g}"
    return str(value)


def _gain(value: float) -> str:
    """A gain in dB with its sign ('-' when missing)."""
    if math.isnan(value):
        return "-"
    return _fmt(value) if math.isinf(value) else f"{value:+.3g}"


def _with_gain(psnr: float, gain: float) -> str:
    return "-" if math.isnan(psnr) else f"{_fmt(psnr, 4)} ({_gain(gain)})"


def _mia_cell(auc: float, untrained: float, nonmembers: str) -> str:
    """Membership AUC never without its caveats: the untrained control and the non-members."""
    if math.isnan(auc):
        return "-"
    return f"{_fmt(auc)} (untrained {_fmt(untrained)}; vs {nonmembers or '?'})"


def _replay_cell(r: dict) -> str:
    if r.get("r_method") == R_NOT_NEEDED:
        return "n/a: exact from eps"
    return _with_gain(r.get("r_psnr", math.nan), r.get("r_gain_db", math.nan))


def to_markdown(rows: list[dict]) -> str:
    """The short privacy.md: one line per cut ratio and protocol (mean over clients)."""
    lines = [
        "# Privacy audit: what the server can learn",
        "",
        ("Mean over clients. Every reconstruction attack is shown as PSNR (gain over the "
         "baseline, dB). Baseline: guess the non-members' mean image for every training image, "
         "without any message; a gain at or below 0 means the attack tells the server nothing a "
         "guess would not. a: reconstruction from the messages alone (shared-noise: exact "
         "inversion of x_t, t, eps; noisy-data: the view y / sqrt(abar_{s-1})). b: the server's "
         "model as a one-step Tweedie denoiser. c: averaging k views with fresh noise per epoch "
         "(what noisy-data would leak if it re-drew its noise). r: seed replay, regenerating the "
         "view noise from seeds derivable from the run's config (what noisy-data leaks if its "
         "noise is not a client secret; shared-noise sends eps, so it is not needed there). d: "
         "loss-based membership inference, training images vs the listed non-members (AUC 0.5 is "
         "chance; the untrained model is the control; non-members from other hospitals inflate "
         "the AUC by the site difference). e: fraction of the server's hand-over samples nearer "
         "to training than to non-member images. PSNR/SSIM against the true images; epsilon at "
         "the listed delta (per pixel: not a guarantee about an image, pixels are correlated). "
         "'counterfactual' rows attack the other protocol's messages at the same cut with this "
         "run's server model; d and e need a model trained under that protocol and are left "
         "blank."),
        "",
        ("| c | s | protocol | source | baseline PSNR dB (SSIM) | a PSNR dB (gain) | "
         "b PSNR dB (gain) | b SSIM | c PSNR k=1 / 64 (gain k=64) | r PSNR dB (gain) | "
         "d AUC (untrained; non-members) | d TPR@1%FPR | e nearer train | eps image | "
         "eps pixel | SNR dB |"),
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in summary(rows):
        nan = math.nan
        lines.append("| " + " | ".join([
            _fmt(r["cut_ratio"]), str(r["cut_index"]), r["protocol"],
            "trained" if r["trained"] else "counterfactual",
            f"{_fmt(r.get('base_psnr', nan), 4)} ({_fmt(r.get('base_ssim', nan))})",
            _with_gain(r.get("a_psnr", nan), r.get("a_gain_db", nan)),
            _with_gain(r.get("b_psnr", nan), r.get("b_gain_db", nan)),
            _fmt(r.get("b_ssim", nan)),
            f"{_fmt(r.get('c_psnr_k1', nan), 4)} / "
            + _with_gain(r.get("c_psnr_k64", nan), r.get("c_gain_db_k64", nan)),
            _replay_cell(r),
            _mia_cell(r.get("d_auc", nan), r.get("d_untrained_auc", nan), r["nonmembers"]),
            _fmt(r.get("d_tpr_at_fpr", nan)), _fmt(r.get("e_frac_nearer_train", nan)),
            _fmt(r["epsilon_image"]), _fmt(r["epsilon_pixel"]), _fmt(r["snr_db"])]) + " |")
    lines += ["", "## What the numbers mean", ""]
    seen = set()
    for r in summary(rows):
        if r["explanation"] not in seen:
            seen.add(r["explanation"])
            lines.append(f"- {r['explanation']}")
    return "\n".join(lines) + "\n"


def to_csv(rows: list[dict]) -> str:
    columns = list(dict.fromkeys(k for r in rows for k in r if k != "explanation"))
    buf = io.StringIO()
    writer = csv.DictWriter(buf, columns, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buf.getvalue()


def _jsonable(value):
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_jsonable(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None if math.isnan(value) else ("inf" if value > 0 else "-inf")
    return value
