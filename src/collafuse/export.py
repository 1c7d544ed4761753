"""``collafuse export RUN OUT``: a trained run as diffusers models, a chain file and a model card.

OUT holds each party's UNet written by diffusers' ``save_pretrained`` (safetensors; the EMA
weights where the run keeps them, as sampling uses), so each loads with
``diffusers.UNet2DModel.from_pretrained``:

    OUT/server/                 the shared model of the high-noise steps t >= s
    OUT/clients/<id>/           each client's model of its low-noise steps t < s_i
    OUT/scheduler/              a diffusers DDPMScheduler config: the run's cosine schedule, T
    OUT/collafuse.json          how they chain (read by collafuse.pipeline.CollaFusePipeline)
    OUT/README.md               the model card

A Flower server's run folder (engines/flower/server_app.py) holds the server's model alone:
its export has no clients/ (each client's model stays on its hospital's node).

What is exported is what the run's parties would publish: weights, cut indices, and each
party's sampling stream seed, which derives from the config's public run seed
(``factory.party_seed``). No client secret (the noisy-data view noise) and no image is exported.
OUT is written in a temporary folder beside it and renamed into place: an interrupted export
leaves nothing half-written.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from pathlib import Path

from . import __version__
from .config import Config, load_config
from .diffusion import cut_index, make_scheduler
from .engines.flower.server_app import RESULT as FLOWER_RESULT, SERVER_STATE
from .engines.local import CHECKPOINT
from .factory import client_classes, client_unet, party_seed, server_classes, server_unet
from .pipeline import CLIENTS_DIR, EXPORT_FORMAT, INFO_FILE, SCHEDULER_DIR, SERVER_DIR
from .state import StateError, load_state

QUALITY = "quality.json"  # written into a run folder by benchmarks/quality.py
SWEEP_RESULTS = "results.json"  # written into a sweep folder by evaluation/sweep.py

# The project's default data (data/README.md): its source and the papers to cite.
LGG_CITATION = """\
Images from The Cancer Imaging Archive (TCGA-LGG collection), as published in the "LGG
segmentation dataset" (kaggle_3m). Cite both papers where the data or this model is used, and
see the original dataset pages for the terms of use:

- Buda M, Saha A, Mazurowski MA. Association of genomic subtypes of lower-grade gliomas with
  shape features automatically extracted by a deep learning algorithm. Computers in Biology
  and Medicine 109 (2019) 218-225.
- Bakas S, Akbari H, Sotiras A, et al. Advancing The Cancer Genome Atlas glioma MRI collections
  with expert segmentation labels and radiomic features. Scientific Data 4, 170117 (2017)."""


class ExportSourceError(ValueError):
    """RUN is not a run folder that can be exported (one-line reason)."""


def run_kind(run_dir: Path) -> str:
    """"in-process" (checkpoint.pt) or "flower" (a Flower server's server.pt); else an error."""
    if not run_dir.is_dir():
        raise ExportSourceError(f"{run_dir}: no such folder")
    if not (run_dir / "config.toml").is_file():
        raise ExportSourceError(f"{run_dir}: not a run folder (no config.toml)")
    if (run_dir / CHECKPOINT).is_file():
        return "in-process"
    if (run_dir / SERVER_STATE).is_file():
        return "flower"
    if any(p.name.startswith("c=") for p in run_dir.iterdir()):
        raise ExportSourceError(f"{run_dir}: a sweep folder; export one of its runs, e.g. "
                                f"{run_dir / 'c=0.6'}")
    raise ExportSourceError(f"{run_dir}: not a run folder (no {CHECKPOINT} or {SERVER_STATE})")


def _check_out(out: Path) -> None:
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ExportSourceError(f"{out}: exists and is not an empty folder; choose another OUT")


def sampling_weights(party_state: dict) -> tuple[dict, str]:
    """(the weights the party samples with, "ema" or "training"): the EMA's where kept."""
    if party_state.get("ema"):
        return party_state["ema"]["model"], "ema"
    return party_state["model"], "training"


def export_run(run_dir: str | Path, out: str | Path) -> dict:
    """Export the run in ``run_dir`` to the new or empty folder ``out``; returns collafuse.json."""
    run_dir, out = Path(run_dir), Path(out)
    kind = run_kind(run_dir)
    _check_out(out)
    cfg = load_config(run_dir / "config.toml")
    state = load_state(run_dir / (CHECKPOINT if kind == "in-process" else SERVER_STATE))
    try:
        server_state = state["server"]
        client_states = state["clients"] if kind == "in-process" else {}
        rounds = state["round"] if kind == "in-process" else state["progress"]["round"]
        planned = (state["progress"].get("rounds") if kind == "flower" else
                   None if cfg.train.epochs else math.ceil(cfg.train.steps
                                                           / cfg.train.batches_per_round))
    except (KeyError, TypeError):
        raise StateError(f"{run_dir}: its state file holds no CollaFuse run state") from None
    client_ids = list(client_states) or _flower_clients(run_dir, cfg)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp"))
    try:
        weights = _write_unet(server_unet(cfg), server_state, tmp / SERVER_DIR)
        for cid, client_state in client_states.items():
            _write_unet(client_unet(cfg, cid), client_state, tmp / CLIENTS_DIR / cid)
        scheduler = make_scheduler(cfg.diffusion.num_timesteps)
        prediction = "v_prediction" if cfg.model.prediction == "v" else "epsilon"
        type(scheduler).from_config(scheduler.config, prediction_type=prediction) \
            .save_pretrained(tmp / SCHEDULER_DIR)
        info = chain_info(cfg, kind, (rounds, planned), weights, client_ids, set(client_states))
        # plain writes: the whole folder is renamed into place at once
        (tmp / INFO_FILE).write_text(json.dumps(info, indent=2) + "\n")
        (tmp / "README.md").write_text(model_card(cfg, info, run_dir))
        _shareable(tmp)
        if out.exists():
            out.rmdir()  # empty, checked above
        tmp.rename(out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return info


def _shareable(folder: Path) -> None:
    """The modes a plain folder and files get under the user's umask: an export is for
    sharing, unlike the owner-only temporary files it is written through."""
    umask = os.umask(0)
    os.umask(umask)
    for path in [folder, *folder.rglob("*")]:
        path.chmod((0o777 if path.is_dir() else 0o666) & ~umask)


def _write_unet(unet, party_state: dict, folder: Path) -> str:
    sd, which = sampling_weights(party_state)
    try:
        unet.load_state_dict(sd)
    except RuntimeError as err:
        raise StateError(f"{folder.name}: the checkpoint's weights do not fit the config's UNet "
                         f"({str(err).splitlines()[0]})") from None
    unet.save_pretrained(folder, safe_serialization=True)
    return which


def _flower_clients(run_dir: Path, cfg: Config) -> list[str]:
    """A Flower run's clients: those its result file names, else the config's sites."""
    result = run_dir / FLOWER_RESULT
    if result.is_file():
        return list(json.loads(result.read_text()).get("clients", []))
    return list(cfg.data.clients) if cfg.data.partition == "site" else []


def chain_info(cfg: Config, kind: str, rounds: tuple[int, int | None], weights: str,
               client_ids: list[str], exported: set[str]) -> dict:
    """collafuse.json: everything the pipeline needs to chain the exported models, and the
    rounds trained of those planned (None: not known from the config alone)."""
    T = cfg.diffusion.num_timesteps
    s = cfg.sample
    return {
        "format": EXPORT_FORMAT,
        "collafuse_version": __version__,
        "engine": kind,
        "rounds": rounds[0],
        "rounds_planned": rounds[1],
        "num_timesteps": T,
        "beta_schedule": make_scheduler(T).config.beta_schedule,
        "image_shape": [cfg.data.channels, cfg.data.image_size, cfg.data.image_size],
        "prediction": cfg.model.prediction,
        "protocol": cfg.train.protocol,
        "weights": weights,
        "condition": cfg.model.condition,
        "classes": list(cfg.model.classes),
        "send_labels": cfg.model.condition == "both",
        "sampling": {"sampler": s.sampler, "steps": s.steps, "seed": s.seed,
                     "num_samples": s.num_samples, "label": s.label,
                     "guidance_scale": s.guidance_scale},
        # stream seeds: factory.party_seed of the config's run seed, public like the config
        "server": {"cut_index": cut_index(cfg.diffusion.cut_ratio, T), "preset": cfg.model.preset,
                   "num_classes": server_classes(cfg),
                   "stream_seed": party_seed(cfg, "server")},
        "clients": {cid: {"cut_index": cut_index(cfg.cut_ratio(cid), T),
                          "cut_ratio": cfg.cut_ratio(cid), "preset": cfg.preset(cid),
                          "num_classes": client_classes(cfg),
                          "stream_seed": party_seed(cfg, f"client:{cid}"),
                          "exported": cid in exported}
                    for cid in client_ids},
    }


# ------------------------------------------------------------------------------ model card
def model_card(cfg: Config, info: dict, run_dir: Path) -> str:
    """OUT/README.md: what was trained on which data, the protocol and what the server saw,
    the run's measured quality, how to sample, intended use and limits."""
    T, clients = info["num_timesteps"], info["clients"]
    weights = (f"the exponential moving average (train.ema_decay = {cfg.train.ema_decay:g})"
               if info["weights"] == "ema" else "those of the last training step")
    predicts = "v (Salimans & Ho 2022)" if info["prediction"] == "v" else "the noise eps"
    shape = "x".join(map(str, info["image_shape"][1:]))
    gray = "grayscale" if info["image_shape"][0] == 1 else "RGB"
    lines = [
        "---",
        "tags: [collafuse, diffusion, ddpm, split-learning, medical-imaging]",
        "---",
        f"# CollaFuse split diffusion model: {cfg.run.name}",
        "",
        "A denoising diffusion model (DDPM, Ho et al. 2020) trained collaboratively with "
        "CollaFuse (Zipperling et al., ECIS 2024; arXiv 2406.14429): the T = "
        f"{T} denoising steps of a cosine schedule are split between one shared server model "
        "(the high-noise steps t >= s) and a model per client (the low-noise steps t < s). "
        "An image is generated by both: the server denoises pure noise down to the cut and "
        "hands over, the client finishes.",
        "",
        "## What is here",
        "",
        f"- `server/`: the server's UNet (diffusers `UNet2DModel`, preset "
        f"`{info['server']['preset']}`), {shape} {gray} images.",
        *[f"- `clients/{cid}/`: client {cid}'s UNet (preset `{c['preset']}`), steps "
          f"t < {c['cut_index']} (cut ratio {c['cut_ratio']:g})" for cid, c in clients.items()
          if c["exported"]],
        *([f"- No client model: this is a Flower server's run; each client's model stays on "
           f"its hospital's node (clients {', '.join(clients) or 'unknown'})."]
          if not any(c["exported"] for c in clients.values()) else []),
        f"- Weights: {weights}; every model predicts {predicts}.",
        f"- `scheduler/`: the diffusers DDPMScheduler of the run (`{info['beta_schedule']}`, "
        f"T = {T}); `collafuse.json`: each client's cut index, the sampler, classes and seeds.",
        "",
        "## Training data",
        "",
        *_data_lines(cfg, run_dir),
        "",
        "## Protocol: what the server saw",
        "",
        *_protocol_lines(cfg, info),
        "",
        "## Training",
        "",
        f"{info['rounds']} rounds on the {info['engine']} engine"
        + (f" (stopped before the {info['rounds_planned']} planned: the weights of its last "
           "checkpoint)" if (info["rounds_planned"] or 0) > info["rounds"] else "")
        + f"; batch {cfg.train.batch_size} "
        f"images per client, Adam lr {cfg.train.lr:g} ({cfg.train.lr_schedule}), "
        f"{cfg.train.local_steps} client step(s) per batch, loss weighting "
        f"{cfg.train.loss_weighting}, run seed {cfg.run.seed}. The run's config is the "
        "`config.toml` of its run folder.",
        "",
        "## Quality",
        "",
        *_quality_lines(cfg, run_dir),
        "",
        "## How to sample",
        "",
        "```python",
        "from collafuse.pipeline import CollaFusePipeline",
        "pipe = CollaFusePipeline.from_pretrained(\"OUT\")  # this folder",
        f"images = pipe(\"{next(iter(clients), 'DU')}\", num_samples=16, seed=0)  "
        "# float32 NCHW in [-1, 1]",
        "```",
        "",
        f"Sampler: {info['sampling']['sampler']} with "
        f"{info['sampling']['steps'] or T} model calls (server and client together). The same "
        "seed gives the images `collafuse sample` gives on the run folder. Each UNet also loads "
        "alone with `diffusers.UNet2DModel.from_pretrained`.",
        "",
        "## Intended use and limits",
        "",
        "- For research on collaborative and privacy-aware generative models, and for making "
        "synthetic images to study such models. Not for diagnosis or any clinical decision.",
        f"- The images are small ({shape}) and each client trained on its own images alone "
        "(counted above); generated images may reproduce training images, and this card "
        "does not measure memorisation (`collafuse audit` on the run folder measures what the "
        "server learnt).",
        "- The server's model alone makes only the hand-over at the cut, not a finished image.",
        "- Use the data under its own terms (see the citation above).",
        "",
    ]
    return "\n".join(lines)


def _data_lines(cfg: Config, run_dir: Path) -> list[str]:
    d = cfg.data
    counts = {}
    summary = run_dir / "summary.json"
    if summary.is_file():
        counts = {cid: c.get("images") for cid, c in
                  json.loads(summary.read_text()).get("clients", {}).items()}
    split = (f"one client per hospital (site): {', '.join(d.clients)}" if d.partition == "site"
             else f"{d.num_clients} clients, partition {d.partition!r}")
    held = (f"hospitals {', '.join(d.holdout_sites)}" if d.holdout_sites
            else f"{d.holdout_fraction:g} of the patients")
    own = (f"; and a seeded {d.client_holdout_fraction:g} of each client's own patients"
           if d.client_holdout_fraction else "")
    lines = [f"`{Path(d.path).name}`, {d.image_size}x{d.image_size}, {split}; held out for "
             f"evaluation (never trained on): {held}{own}."]
    if counts:
        lines.append("Training images per client: " + ", ".join(
            f"{cid} {n}" for cid, n in counts.items()) + ".")
    if Path(d.path).name.startswith("lgg_flair"):
        lines += ["", "Brain MRI (FLAIR slices) of lower-grade glioma patients. " + LGG_CITATION]
    else:
        lines += ["", "This data set is not one CollaFuse ships: add its source and citation "
                  "here before sharing the model."]
    return lines


def _protocol_lines(cfg: Config, info: dict) -> list[str]:
    cuts = sorted({c["cut_index"] for c in info["clients"].values()}) or \
        [info["server"]["cut_index"]]
    T = info["num_timesteps"]
    s = ", ".join(map(str, cuts))
    if all(c == T for c in cuts):
        return ["Cut ratio 1 (s = T): every step is the client's; the server received nothing "
                "and its model is untrained."]
    if cfg.train.protocol == "shared-noise":
        text = (f"**shared-noise** (the paper's protocol), cut index s = {s} of T = {T}. For "
                "every training image the client drew a timestep t and noise eps; for t >= s it "
                "sent (x_t, t, eps) to the server. From these the server can recover each such "
                "image exactly, x0 = (x_t - sqrt(1 - abar_t) eps) / sqrt(abar_t): treat the "
                "server as having seen those training images.")
    else:
        text = (f"**noisy-data**, cut index s = {s} of T = {T}. Each client sent one noisy view "
                "per image, y = add_noise(x0, xi, s - 1), its noise xi drawn once from the "
                "client's own secret and never sent; the server trained on y re-noised with its "
                "own noise. It never saw a clean image or the view noise"
                + (" (except at s = 0, where the view is the clean image)." if 0 in cuts else "."))
    return [text, "", "The clients' models and their low-noise steps never left the clients."]


def _quality_lines(cfg: Config, run_dir: Path) -> list[str]:
    """KID and floor from the run's quality.json (benchmarks/quality.py), else from the sweep
    the run belongs to, else a statement that it was not measured."""
    quality = run_dir / QUALITY
    if quality.is_file():
        q = json.loads(quality.read_text())
        lines = [f"Measured by `benchmarks/quality.py` (KID on the FID Inception features, "
                 f"{q.get('num_samples')} samples per client, sampler {q.get('sampler')}, "
                 f"weights {q.get('weights')}); lower is better.", "",
                 "| | KID vs held-out hospitals |", "|---|---|"]
        for row in q.get("clients", []):
            lines.append(f"| client {row['client']} | {row['kid_holdout']:.4f} |")
        if "all_clients" in q:
            lines.append(f"| all clients | {q['all_clients']['kid_holdout']:.4f} |")
        for row in q.get("floor", []):
            lines.append(f"| {row['name']} (real training images) | {row['kid_holdout']:.4f} |")
        if "pooled" in q:
            lines.append(f"| plain pooled DDPM, same time | {q['pooled']['kid_holdout']:.4f} |")
        lines += ["", "The floor is the KID of the client's real training images against the "
                  "same held-out hospitals: what the difference between hospitals alone costs."]
        return lines
    results = run_dir.parent / SWEEP_RESULTS
    if results.is_file():
        rows = [r for r in json.loads(results.read_text())
                if r.get("cut_ratio") == cfg.diffusion.cut_ratio
                and r.get("protocol") == cfg.train.protocol]
        if rows:
            lines = ["From the cut-ratio sweep this run belongs to (`collafuse sweep`, "
                     f"{rows[0].get('num_samples')} samples per client); lower is better. The "
                     "sweep measures no floor.", "",
                     "| client | KID vs held-out | KID vs own training images |", "|---|---|---|"]
            lines += [f"| {r['client']} | {r['kid_holdout']:.4f} | {r['kid_train']:.4f} |"
                      for r in rows]
            return lines
    return ["Not measured: no `quality.json` (`python benchmarks/quality.py RUN`) and no sweep "
            "results beside the run folder."]
