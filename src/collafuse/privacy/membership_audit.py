"""Membership inference on a finished run: the server's model, each client's model and each
client's published samples, against matched non-members, a blind baseline and controls.

:func:`membership_rows` takes a run folder and returns one row per (client, target, attack):

- target ``server``: the server's published model (EMA weights where kept), attacked on the
  levels it owns, t >= s (a curious server can query only its own model);
- target ``client``: the client's model on its levels t < s (the hospital publishing its half);
- target ``samples``: the hospital's generated images (split inference, as published), by
  nearest-neighbour distance (:func:`collafuse.privacy.membership.sample_distance_scores`);
- target ``client (exported)`` and ``samples (published)``: the same attacks on what a
  hospital publishes, read from a ``collafuse export`` folder and a ``collafuse sample
  --export`` folder (``membership_rows(..., export_dir=, samples_dir=)``);
- ``blind``: no model at all (:func:`collafuse.privacy.membership.blind_scores`), on the same
  matched sets, and ``blind (unmatched)`` on random sets, to show what matching removed.

Members are the client's training images, non-members its own held-out patients (same
hospital) where the run has them, else the run's hold-out set, matched by
:func:`collafuse.privacy.membership.match_nonmembers`. Each model attack is also run on an
untrained model of the same architecture (``untrained_auc``: about 0.5 if the matching worked)
and, calibrated, against one reference pair (server and client model) trained with the run's
own recipe for ``reference_rounds`` rounds on the run's hold-out set, which holds no patient of
any client (``reference``: what it was trained on; its cost, ``reference_seconds``, is one
client's training for that many rounds), or against the mean of ``reference_models`` such
pairs, each of its own run seed (:func:`train_references`). ``over_blind``: the attack's TPR
at 1% FPR minus the blind baseline's on the same sets.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np
import torch

from ..data import ImageSet, to_model
from . import membership as mia

DEFAULT_REFERENCE_ROUNDS = 300
REFERENCE = "run hold-out set (no patient of any client)"


def _published(party):
    """A party's published noise predictor: its EMA weights where kept, as sampling uses."""
    net = party.ema.model if party.ema else party.model
    net.eval()
    return lambda x, t: party.predict(net, x, t)


def train_reference(cfg, images: ImageSet, rounds: int, client_id: str,
                    progress: bool = False) -> tuple:
    """(server, client) of the run's architecture and recipe, trained together for ``rounds``
    rounds on ``images`` alone (a one-client run; the client's secret is fresh)."""
    from ..factory import make_client, make_server

    server = make_server(cfg)
    client = make_client(cfg, client_id, images, os.urandom(32))
    for r in range(rounds):
        messages = client.train_round(cfg.train.batches_per_round)
        server.train_step(messages)
        if progress and (r + 1) % 100 == 0:
            print(f"  reference model: round {r + 1}/{rounds}", flush=True)
    return server, client


def train_references(cfg, images: ImageSet, rounds: int, client_id: str, count: int,
                     progress: bool = False) -> list[tuple]:
    """``count`` reference pairs (:func:`train_reference`); the k-th with run.seed + k, so its
    weights' initialisation and its client's noise differ from the others' (the first is the
    run's own seed, as a single reference always was)."""
    from ..config import from_dict

    pairs = []
    for k in range(count):
        raw = cfg.to_dict()
        raw["run"]["seed"] = cfg.run.seed + k
        if progress and count > 1:
            print(f"  reference pair {k + 1}/{count} (run.seed {cfg.run.seed + k})", flush=True)
        pairs.append(train_reference(from_dict(raw, source=f"reference {k}"), images, rounds,
                                     client_id, progress))
    return pairs


def _rows_for(target: str, levels, models: dict, scheduler, members, nonmembers, seed,
              blind_tpr: float) -> list[dict]:
    """Rows of the three attacks and their calibrated variants on one target's levels."""
    rows = []
    desc = (f"t in [{levels.lo}, {levels.hi}); proximal t0 = {levels.proximal}, "
            f"error at t = {levels.attack}, SecMI step {levels.interval}")
    for name in mia.ATTACKS:
        if name == "secmi" and levels.interval < 1:
            continue
        def errors(model):  # (members' errors, non-members' errors)
            return (mia.attack_errors(name, model, scheduler, members, levels, seed),
                    mia.attack_errors(name, model, scheduler, nonmembers, levels, seed))
        err = {k: errors(models[k]) for k in ("target", "untrained")}
        untrained = mia.roc_auc(-err["untrained"][0], -err["untrained"][1])
        variants = [(name, -err["target"][0], -err["target"][1], "")]
        if models["references"]:
            ref = [errors(m) for m in models["references"]]
            variants.append((f"{name}-cal",
                             mia.calibrated(err["target"][0], [r[0] for r in ref]),
                             mia.calibrated(err["target"][1], [r[1] for r in ref]), REFERENCE))
        for attack, pos, neg, reference in variants:
            stats = mia.report(pos, neg, seed=seed)
            rows.append({"target": target, "attack": attack, "levels": desc,
                         "reference": reference, "untrained_auc": untrained, **stats,
                         "over_blind": stats["tpr_1"] - blind_tpr, "scores": (pos, neg)})
    return rows


def _reference_split(run, seed: int) -> tuple[ImageSet, ImageSet]:
    """(the reference models' training set, the non-member pool of clients without held-out
    patients of their own): the run's hold-out set whole where every client has its own
    non-members, else split by patient in half, since a non-member the reference trained on
    would read the calibration backwards."""
    from ..data.partition import split_holdout

    if all(len(run.client_holdout.get(cid, ())) for cid in run.clients):
        return run.holdout, run.holdout.subset([])
    return split_holdout(run.holdout, holdout_fraction=0.5, seed=seed)


def exported_clients(export_dir: str | Path, device: str | None = None) -> dict:
    """{client: noise predictor} of the client models in a ``collafuse export`` folder, as a
    hospital publishes them (the export holds the weights sampling uses)."""
    from ..pipeline import CollaFusePipeline

    pipe = CollaFusePipeline.from_pretrained(export_dir, device=device or "cpu")
    return {cid: _published(party) for cid, party in pipe.parties.items()}


def published_samples(samples_dir: str | Path, image_size: int, channels: int) -> dict:
    """{client: images in [-1, 1]} of a ``collafuse sample --export`` folder
    (``<client>/[<class>/]<n>.png``), read as the run's size and channels."""
    from ..data import load_images

    images = load_images(samples_dir, image_size, channels, layout="site")
    return {cid: to_model(images.images[images.meta["site"] == cid])
            for cid in np.unique(images.meta["site"])}


def _sample_row(target: str, samples: torch.Tensor, members, nonmembers, seed,
                blind_tpr: float) -> dict:
    scores = (mia.sample_distance_scores(samples, members),
              mia.sample_distance_scores(samples, nonmembers))
    stats = mia.report(*scores, seed=seed)
    return {"target": target, "attack": "nearest generated", **stats,
            "levels": f"{len(samples)} generated images",
            "over_blind": stats["tpr_1"] - blind_tpr, "scores": scores}


def _examples(images: ImageSet, index: np.ndarray) -> dict[str, list]:
    """The patient and slice of each chosen image, as the per-example scores name them."""
    return {key: images.meta[key][index].tolist() if key in images.meta else [""] * len(index)
            for key in ("patient", "slice_index")}


def _by_patient(row: dict, members: dict, nonmembers: dict, scores: list | None) -> dict:
    """Take a row's per-example scores out: into ``scores`` (one record per image, where a
    list is given) and, on the row, which member patients the 1%-FPR threshold flags."""
    pos, neg = row.pop("scores")
    flagged = mia.flagged_by_patient(pos, neg, members["patient"])
    top = [f"{p} {k}/{n}" for p, k, n in flagged[:3] if k > 0]
    row.update({"member_patients": len(flagged),
                "flagged_patients": sum(k > 0 for _, k, _ in flagged),
                "top_flagged": "; ".join(top)})
    if scores is not None:
        for member, values, who in ((1, pos, members), (0, neg, nonmembers)):
            scores += [{"target": row["target"], "attack": row["attack"], "member": member,
                        "patient": str(who["patient"][i]), "slice_index": who["slice_index"][i],
                        "score": float(values[i])} for i in range(len(values))]
    return row


def membership_rows(run_dir: str | Path, num_images: int = 128, seed: int = 0,
                    reference_rounds: int = DEFAULT_REFERENCE_ROUNDS, progress: bool = True,
                    device: str | None = None, export_dir: str | Path | None = None,
                    samples_dir: str | Path | None = None,
                    scores: list | None = None, reference_models: int = 1) -> list[dict]:
    """The membership rows of one run folder (see the module's docstring); with
    ``export_dir`` (a ``collafuse export`` of the run) also target ``client (exported)``, its
    client models; with ``samples_dir`` (a ``collafuse sample --export`` folder) also target
    ``samples (published)``, the sample-based attack on those images. Each row names the
    member patients its 1%-FPR threshold flags (``flagged_patients`` of ``member_patients``,
    ``top_flagged``); a ``scores`` list receives every image's score (patient, slice,
    member or not)."""
    from ..engines.local import load_run
    from ..factory import load_client_data, make_client, make_server
    from .audit import nonmember_set

    run_dir = Path(run_dir)
    run = load_run(run_dir, device=device)
    cfg, server = run.cfg, run.server
    data = load_client_data(cfg)  # the run's ImageSets, with the metadata matching needs
    scheduler, cut, num_timesteps = server.scheduler, server.cut, server.num_timesteps
    targets = {"server": mia.attack_levels(cut, num_timesteps, num_timesteps),
               "client": mia.attack_levels(0, cut, num_timesteps)}
    untrained_server = _published(make_server(cfg))
    reference_set, shared_pool = _reference_split(run, seed)
    for cid, part in data.clients.items():
        if mia.shared_patients(reference_set, part):
            raise ValueError(f"{run_dir}: the calibration reference's training set holds "
                             f"patients of client {cid}; it must hold none")
    if reference_models < 1:
        raise ValueError(f"reference_models: expected an integer >= 1, got {reference_models}")
    references, ref_seconds = [], 0.0
    if reference_rounds > 0 and len(reference_set) > 0:
        if progress:
            print(f"membership {run_dir.name}: {reference_models} reference pair(s), "
                  f"{reference_rounds} rounds on {len(reference_set)} hold-out images",
                  flush=True)
        start = time.perf_counter()
        references = train_references(cfg, reference_set, reference_rounds,
                                      next(iter(run.clients)), reference_models, progress)
        ref_seconds = time.perf_counter() - start
    exported = exported_clients(export_dir, device) if export_dir is not None else {}
    published = published_samples(samples_dir, cfg.data.image_size, cfg.data.channels) \
        if samples_dir is not None else {}
    rows = []
    for cid, client in run.clients.items():
        if progress:
            print(f"membership {run_dir.name}: client {cid}", flush=True)
        candidates, label = nonmember_set(run, cid)
        if candidates is run.holdout:  # the reference's patients are no candidates
            candidates = shared_pool
        mi, ni = mia.match_nonmembers(data.clients[cid], candidates, num_images, seed)
        if len(mi) < 2:
            raise ValueError(f"{run_dir}: client {cid}: fewer than 2 matched non-members")
        members, nonmembers = client.images[torch.from_numpy(mi)], \
            to_model(candidates.images[ni])
        blind_scores = mia.blind_scores(members, nonmembers, seed=seed)
        blind = mia.report(*blind_scores, seed=seed)
        ri, rn = mia.random_nonmembers(data.clients[cid], candidates, len(mi), seed)
        unmatched_scores = mia.blind_scores(client.images[torch.from_numpy(ri)],
                                            to_model(candidates.images[rn]), seed=seed)
        unmatched = mia.report(*unmatched_scores, seed=seed)
        client_rows = [{"target": "none", "attack": "blind", **blind, "over_blind": 0.0,
                        "scores": blind_scores},
                       {"target": "none", "attack": "blind (unmatched)", **unmatched,
                        "over_blind": unmatched["tpr_1"] - blind["tpr_1"],
                        "scores": unmatched_scores,
                        "examples": (_examples(data.clients[cid], ri),
                                     _examples(candidates, rn))}]
        parties = {"server": (_published(server), untrained_server,
                              [_published(s) for s, _ in references]),
                   "client": (_published(client),
                              _published(make_client(cfg, cid, data.clients[cid],
                                                     os.urandom(32))),
                              [_published(c) for _, c in references])}
        if cid in exported:
            parties["client (exported)"] = (exported[cid], *parties["client"][1:])
        for target, models in parties.items():
            levels = targets[target.split()[0]]
            if levels is None:
                continue
            models = dict(zip(("target", "untrained", "references"), models))
            client_rows += _rows_for(target, levels, models, scheduler, members, nonmembers,
                                     seed, blind["tpr_1"])
        samples, _ = run.sample(cid, len(mi), seed)
        client_rows.append(_sample_row("samples", samples, members, nonmembers, seed,
                                       blind["tpr_1"]))
        if cid in published:
            client_rows.append(_sample_row("samples (published)", published[cid], members,
                                           nonmembers, seed, blind["tpr_1"]))
        matched = _examples(data.clients[cid], mi), _examples(candidates, ni)
        client_scores = None if scores is None else []
        client_rows = [_by_patient(row, *row.pop("examples", matched), client_scores)
                       for row in client_rows]
        if scores is not None:
            scores += [{"run": str(run_dir), "client": cid, **r} for r in client_scores]
        for row in client_rows:
            rows.append({"run": str(run_dir), "cut_ratio": cfg.diffusion.cut_ratio,
                         "cut_index": cut, "protocol": cfg.train.protocol, "client": cid,
                         "num_members": len(mi), "num_nonmembers": len(ni),
                         "nonmembers": label, "reference_rounds": reference_rounds,
                         "reference_models": len(references),
                         "reference_seconds": ref_seconds, **row})
    return rows


def strongest(rows: list[dict]) -> list[dict]:
    """Per (run, protocol, cut ratio, target): the model attack with the largest TPR at 1% FPR,
    with the blind baseline's and the difference; means over clients weighted by their matched
    pairs (a client with 4 pairs moves TPR in steps of 25%)."""
    out = []
    keys = sorted({(r["run"], r["protocol"], r["cut_ratio"], r["target"]) for r in rows
                   if r["target"] != "none"}, key=lambda k: (k[2], k[1], k[3], k[0]))

    def mean(group, key):
        return float(np.average([r[key] for r in group],
                                weights=[r["num_members"] for r in group]))
    for run, protocol, c, target in keys:
        by_attack = {}
        for r in rows:
            if (r["run"], r["protocol"], r["cut_ratio"], r["target"]) == (run, protocol, c,
                                                                           target):
                by_attack.setdefault(r["attack"], []).append(r)
        attack, best = max(by_attack.items(), key=lambda kv: mean(kv[1], "tpr_1"))
        blind = [r for r in rows if r["run"] == run and r["attack"] == "blind"]
        out.append({"run": run, "protocol": protocol, "cut_ratio": c, "target": target,
                    "attack": attack, "blind_tpr_1": mean(blind, "tpr_1"),
                    **{k: mean(best, k) for k in ("auc", "tpr_1", "tpr_1_lo", "tpr_1_hi",
                                                  "over_blind")}})
    return out


def _pct(value: float) -> str:
    return f"{100 * value:.1f}%"


def _patients_markdown(rows: list[dict]) -> list[str]:
    """Per client, the strongest attack's flagged member slices by patient: whether a TPR is a
    few patients exposed wholly or many a little (per-image scores: membership-scores.csv)."""
    if not rows or "flagged_patients" not in rows[0]:
        return []  # rows of an audit written before the per-patient columns
    lines = ["", "Which patients the strongest attack flags at 1% FPR (member slices flagged "
             "per patient, most flagged first):", "",
             "| c | client | target | attack | flagged slices | patients flagged | "
             "most flagged |", "|---|---|---|---|---|---|---|"]
    for s in strongest(rows):
        for r in rows:
            if (r["run"], r["target"], r["attack"]) == (s["run"], s["target"], s["attack"]):
                flagged = round(r["tpr_1"] * r["num_members"])
                lines.append(f"| {r['cut_ratio']:g} | {r['client']} | {r['target']} | "
                             f"{r['attack']} | {flagged} of {r['num_members']} | "
                             f"{r['flagged_patients']} of {r['member_patients']} | "
                             f"{r['top_flagged'] or '-'} |")
    return lines


def membership_markdown(rows: list[dict]) -> str:
    """The membership section of privacy.md: the strongest attack per target, then all rows."""
    lines = ["## Membership inference (matched non-members, blind baseline)", "",
             ("Members: each client's training images; non-members: its held-out patients, "
              "matched on slice position, tumour, intensity and patient count. First table: "
              "means over clients weighted by matched pairs. TPR at 1% FPR "
              "(chance: 1%); over blind = that TPR minus the blind baseline's (a classifier on "
              "the images alone, no model). Intervals: 95% bootstrap. An attack shows "
              "membership only where its TPR interval lies above the blind baseline's TPR and "
              "the untrained model's AUC is near 0.5."), "",
             "| c | protocol | target | strongest attack | AUC | TPR@1%FPR [95%] | blind TPR | "
             "over blind |", "|---|---|---|---|---|---|---|---|"]
    for s in strongest(rows):
        lines.append(f"| {s['cut_ratio']:g} | {s['protocol']} | {s['target']} | {s['attack']} "
                     f"| {s['auc']:.3f} | {_pct(s['tpr_1'])} [{_pct(s['tpr_1_lo'])}, "
                     f"{_pct(s['tpr_1_hi'])}] | {_pct(s['blind_tpr_1'])} | "
                     f"{100 * s['over_blind']:+.1f} pt |")
    lines += ["", "| c | client (pairs) | target | attack | AUC [95%] | untrained AUC | "
              "TPR@1% [95%] | TPR@0.1% | over blind | levels |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        untrained = r.get("untrained_auc")
        lines.append(
            f"| {r['cut_ratio']:g} | {r['client']} ({r['num_members']}) | {r['target']} | "
            f"{r['attack']} | "
            f"{r['auc']:.3f} [{r['auc_lo']:.2f}, {r['auc_hi']:.2f}] | "
            f"{'-' if untrained is None else f'{untrained:.3f}'} | {_pct(r['tpr_1'])} "
            f"[{_pct(r['tpr_1_lo'])}, {_pct(r['tpr_1_hi'])}] | {_pct(r['tpr_0.1'])} | "
            f"{100 * r['over_blind']:+.1f} pt | {r.get('levels', '')} |")
    lines += _patients_markdown(rows)
    first = rows[0] if rows else {}
    if first:
        lines += ["", (f"Matched pairs per client in brackets (non-members: "
                       f"{first['nonmembers']}); a client with few pairs gives coarse, noisy "
                       f"figures (with n non-members, TPR at 1% FPR moves in steps of 1/n and "
                       f"allows floor(n / 100) false positives); calibration "
                       f"reference: {REFERENCE}, {first.get('reference_models', 1)} pair(s) "
                       f"of {first['reference_rounds']} rounds, "
                       f"{first['reference_seconds']:.0f} s to train."), ""]
    return "\n".join(lines) + "\n"
