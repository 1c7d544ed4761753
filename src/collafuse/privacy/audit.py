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
from ..diffusion import add_noise, handover_view
from ..messages import SampleRequest, decode, encode
from ..protocols import PROTOCOLS, server_message
from ..state import write_text
from . import attacks
from .accounting import DEFAULT_DELTA, explain, protocol_privacy

AVERAGING_KS = (1, 2, 4, 8, 16, 32, 64)
FILES = ("privacy.csv", "privacy.json", "privacy.md")


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
        b_est = attacks.tweedie_estimate(model, scheduler, msg.x_t, msg.t)
        method = "exact inversion of (x_t, t, eps)"
    else:
        a_est = attacks.view_estimate(scheduler, msg.views, cut)
        b_est = attacks.tweedie_from_view(model, scheduler, msg.views, cut, generator)
        method = "view alone, y / sqrt(abar_{s-1})"
    return {"a_method": method,
            **{f"a_{k}": v for k, v in attacks.scores(a_est, x0).items()},
            **{f"b_{k}": v for k, v in attacks.scores(b_est, x0).items()}}


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
    scheduler, cut, num_timesteps = server.scheduler, server.cut, server.num_timesteps
    model, untrained = _server_model(server), _server_model(make_server(cfg))
    if len(run.holdout) == 0:
        raise ValueError(f"{run_dir}: the audit needs hold-out patients as non-members; the run "
                         "has none (set data.holdout_sites or data.holdout_fraction)")
    holdout = to_model(run.holdout.images)
    steps = attacks.score_timesteps(cut, num_timesteps)
    num_pixels = int(np.prod(server.image_shape))
    n_samples = min(num_images, len(holdout))
    samples = server.generate(SampleRequest(client_id="audit", num_samples=n_samples,
                                            seed=seed)).x.cpu()
    a_scale, _ = attacks.handover_signal(scheduler, cut)
    rows = []
    for cid, client in run.clients.items():
        if progress:
            print(f"audit {run_dir.name}: client {cid}", flush=True)
        rng = torch.Generator().manual_seed(seed)
        n = min(num_images, len(client.images), len(holdout))
        idx = torch.randperm(len(client.images), generator=rng)[:n]
        x0, nonmembers = client.images[idx], holdout[torch.randperm(len(holdout), generator=rng)[:n]]
        model_rows = _model_attacks(model, untrained, scheduler, steps, x0, nonmembers, samples,
                                    a_scale, seed)
        averaging = attacks.averaging_attack(scheduler, x0, cut, rng, AVERAGING_KS) \
            if cut < num_timesteps else []
        for protocol in (cfg.train.protocol, *[p for p in PROTOCOLS if p != cfg.train.protocol]):
            trained = protocol == cfg.train.protocol
            row = {"run": str(run_dir), "cut_ratio": cfg.diffusion.cut_ratio, "cut_index": cut,
                   "num_timesteps": num_timesteps, "run_protocol": cfg.train.protocol,
                   "protocol": protocol, "trained": trained, "client": cid, "num_images": n,
                   "server_steps": server.steps}
            if cut < num_timesteps:
                msg = replay_message(protocol, client, idx, rng)
                if trained:
                    server.check(msg)
                row.update(attack_message(protocol, msg, x0, model, scheduler, cut, rng))
            if protocol == "noisy-data":
                row.update({f"c_psnr_k{r['k']}": r["psnr"] for r in averaging})
                row.update({f"c_mse_k{r['k']}": r["mse"] for r in averaging})
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
          device: str | None = None) -> list[dict]:
    """Audit a run or sweep folder; write privacy.csv/json/md into ``out`` (default: path)."""
    runs = find_runs(path)
    rows = [row for run_dir in runs
            for row in audit_run(run_dir, num_images, seed, delta, progress, device)]
    out = Path(out or path)
    out.mkdir(parents=True, exist_ok=True)
    write_text(out / "privacy.csv", to_csv(rows))
    write_text(out / "privacy.json", json.dumps(
        {"delta": delta, "num_images": num_images, "seed": seed, "rows": _jsonable(rows)},
        indent=2, allow_nan=False))
    markdown = to_markdown(rows)
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
    privacy (the best reconstruction PSNR of attacks a and b, membership AUC, epsilon).

    Only protocols a model was trained with have a KID; counterfactual rows keep it blank.
    """
    out = []
    for r in summary(privacy_rows):
        kid = [x for x in results_rows if x["protocol"] == r["protocol"]
               and math.isclose(x["cut_ratio"], r["cut_ratio"])]
        out.append({
            "cut_ratio": r["cut_ratio"], "protocol": r["protocol"], "trained": r["trained"],
            "kid_train": _mean([x["kid_train"] for x in kid]) if kid else math.nan,
            "kid_holdout": _mean([x["kid_holdout"] for x in kid]) if kid else math.nan,
            "attack_psnr": max(r.get("a_psnr", math.nan), r.get("b_psnr", math.nan)),
            "attack_ssim": max(r.get("a_ssim", math.nan), r.get("b_ssim", math.nan)),
            "mia_auc": r.get("d_auc", math.nan),
            "epsilon_pixel": r["epsilon_pixel"], "epsilon_image": r["epsilon_image"]})
    return out


def tradeoff_markdown(privacy_rows: list[dict], results_rows: list[dict], out: Path) -> str:
    """The utility-vs-privacy table and figure of a sweep (the paper's outlook asks for it)."""
    rows = tradeoff_rows(privacy_rows, results_rows)
    plot_tradeoff(rows, Path(out) / TRADEOFF_FIGURE)
    lines = ["## Utility against privacy, per cut ratio and protocol", "",
             ("KID: generated images against the clients' training data and against hold-out "
              "patients (lower is better; from the sweep, mean over clients). Attack PSNR: the "
              "better of attacks a and b (higher = the server sees more). Counterfactual rows: "
              "the other protocol's messages at the same cut, attacked with this sweep's model; "
              "no model was trained with them, so no KID."), "",
             ("| c | protocol | source | KID train | KID hold-out | attack PSNR dB | attack SSIM "
              "| MIA AUC | eps pixel | eps image |"), "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append("| " + " | ".join([
            _fmt(r["cut_ratio"]), r["protocol"], "trained" if r["trained"] else "counterfactual",
            _fmt(r["kid_train"]), _fmt(r["kid_holdout"]), _fmt(r["attack_psnr"], 4),
            _fmt(r["attack_ssim"]), _fmt(r["mia_auc"]), _fmt(r["epsilon_pixel"]),
            _fmt(r["epsilon_image"])]) + " |")
    lines += ["", f"![utility against privacy]({TRADEOFF_FIGURE})", ""]
    return "\n".join(lines)


def plot_tradeoff(rows: list[dict], path: Path) -> None:
    """Left: KID (hold-out) against attack PSNR, a point per cut ratio, a line per protocol.
    Right: attack PSNR against c for both protocols (counterfactual ones dashed)."""
    from ..evaluation.report import plt, save_figure  # report chose the Agg backend

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
    axes[0].set_xlabel("attack PSNR, dB (higher = more disclosed)")
    axes[0].set_ylabel("KID against hold-out (lower = better images)")
    axes[1].set_xlabel("cut ratio c")
    axes[1].set_ylabel("attack PSNR, dB (capped at 160)")
    for ax in axes:
        ax.legend(fontsize=7)
    save_figure(fig, path)


def load_privacy_rows(path: str | Path) -> list[dict]:
    """Rows of a privacy.json (a file or the folder holding it), with "inf" back as floats."""
    path = Path(path)
    path = path / "privacy.json" if path.is_dir() else path
    rows = json.loads(path.read_text())["rows"]
    return [{k: float(v) if v in ("inf", "-inf") else (math.nan if v is None else v)
             for k, v in row.items()} for row in rows]


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
                    "explanation": group[0]["explanation"]})
    return out


def _mean(values) -> float:
    values = [float(v) for v in values]
    if any(math.isinf(v) for v in values):
        return float(np.mean(values))
    finite = [v for v in values if not math.isnan(v)]
    return float(np.mean(finite)) if finite else math.nan


def _fmt(value, digits: int = 3) -> str:
    if isinstance(value, float):
        if math.isnan(value):
            return "-"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return f"{value:.{digits}g}"
    return str(value)


def to_markdown(rows: list[dict]) -> str:
    """The short privacy.md: one line per cut ratio and protocol (mean over clients)."""
    lines = [
        "# Privacy audit: what the server can learn",
        "",
        ("Mean over clients. a: reconstruction from the messages alone (shared-noise: exact "
         "inversion of x_t, t, eps; noisy-data: the view y / sqrt(abar_{s-1})). b: the server's "
         "model as a one-step Tweedie denoiser. c: averaging k views with fresh noise per epoch "
         "(what noisy-data would leak if it re-drew its noise). d: loss-based membership "
         "inference, training clients' images vs hold-out patients (untrained-model control in "
         "brackets). e: fraction of the server's hand-over samples nearer to training than to "
         "hold-out images. PSNR/SSIM against the true images; epsilon at the listed delta. "
         "'counterfactual' rows attack the other protocol's messages at the same cut with this "
         "run's server model; d and e need a model trained under that protocol and are left "
         "blank."),
        "",
        ("| c | s | protocol | source | a PSNR dB | b PSNR dB | b SSIM | c PSNR k=1 / 64 | "
         "d AUC (untrained) | d TPR@1%FPR | e nearer train | eps image | eps pixel | SNR dB |"),
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in summary(rows):
        nan = math.nan
        lines.append("| " + " | ".join([
            _fmt(r["cut_ratio"]), str(r["cut_index"]), r["protocol"],
            "trained" if r["trained"] else "counterfactual",
            _fmt(r.get("a_psnr", nan), 4), _fmt(r.get("b_psnr", nan), 4),
            _fmt(r.get("b_ssim", nan)),
            f"{_fmt(r.get('c_psnr_k1', nan), 4)} / {_fmt(r.get('c_psnr_k64', nan), 4)}",
            f"{_fmt(r.get('d_auc', nan))} ({_fmt(r.get('d_untrained_auc', nan))})",
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
