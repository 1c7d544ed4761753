"""Deployment parity: a TLS + SuperNode-auth loopback federation against the in-process run.

    python benchmarks/deployment_parity.py [--config configs/quickstart.toml]
        [--set train.steps=50 ...] [--evaluate-n 16] [--work DIR]

(1) The deployment of docs/deployment.md on loopback: certificates from make_certs.sh, a
    SuperLink with TLS and SuperNode authentication behind the fleet gateway (HAProxy with
    scripts/flower/fleet-gateway.cfg), one registered SuperNode per hospital of the config
    (each with its whole partition on its disk, as section 2). It trains, samples and evaluates
    with one ``flwr run`` each (task='train', 'sample', 'evaluate'); the hospitals' numbers land
    in the server's ``report.md``.
(2) The in-process run of the same config, seeds and client secrets (the nodes' key files):
    ``run_training`` (what ``collafuse train`` runs), then the same evaluation: the server's
    hand-overs for ``sample.seed``, each client finishes its rows and evaluates them against its
    own images (``evaluation.federated.evaluate_on_node``, what a node runs).

Prints both tables, the wall time of each step, and per hospital whether the two KIDs agree
within each other's 95% intervals. Every party gets one torch thread (they share the cores,
and the same thread count keeps the two runs' sums in the same order). Needs haproxy and
openssl. Not part of the test suite.
"""

from __future__ import annotations

import argparse
import importlib.util
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from collafuse.config import load_config  # noqa: E402
from collafuse.data import save_images  # noqa: E402
from collafuse.factory import load_client_data  # noqa: E402

KID_COLUMNS = ("kid_holdout", "kid_train")


def _harness():
    spec = importlib.util.spec_from_file_location("collafuse_flower_harness",
                                                  ROOT / "scripts" / "flower" / "harness.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


def hospital_files(cfg_path: Path, overrides: list[str], work: Path) -> dict[str, Path]:
    """Each hospital's whole partition (the node applies the run's own hold-out and cap)."""
    whole = load_config(cfg_path, [*overrides, "data.client_holdout_fraction=0.0",
                                   "data.max_images_per_client=0"])
    files = {}
    for cid, part in load_client_data(whole).clients.items():
        files[cid] = work / f"{cid}.npz"
        save_images(part, files[cid])
    return files


def deploy(cfg_path: Path, overrides: list[str], work: Path, evaluate_n: int,
           timeout: float) -> tuple[Path, dict[str, bytes], dict[str, float]]:
    """Train, sample and evaluate on the loopback deployment; (run-dir, the nodes' secrets,
    seconds per step)."""
    h = _harness()
    certs = work / "certs"
    files = hospital_files(cfg_path, overrides, work)
    subprocess.run(["bash", str(ROOT / "scripts" / "flower" / "make_certs.sh"), str(certs),
                    str(len(files))], check=True, capture_output=True, timeout=120)
    run_dir, seconds = work / "server" / "run", {}
    settings = {"config": str(cfg_path.resolve()), "run-dir": str(run_dir),
                "min-nodes": len(files), "round-timeout": timeout, "sample-timeout": timeout}
    if overrides:
        settings["overrides"] = " ".join(overrides)
    with h.Deployment(work / "dep", ROOT, certs=certs, node_auth=True, node_threads=1,
                      server_threads=1) as dep:
        dep.start_superlink()
        dep.start_gateway()
        for i, (cid, path) in enumerate(files.items()):
            dep.add_supernode(cid, {"client-id": cid, "data-path": str(path),
                                    "state-dir": str(work / f"state-{cid}")},
                              auth_key=certs / f"supernode-{i + 1}")
        for task, extra in (("train", {}), ("sample", {"sample-n": 4}),
                            ("evaluate", {"evaluate-n": evaluate_n})):
            start = time.monotonic()
            res = dep.run({**settings, "task": task, **extra}, timeout=4 * timeout)
            seconds[task] = time.monotonic() - start
            if res.returncode != 0:
                raise SystemExit(f"flwr run task={task} failed:\n{res.stdout[-4000:]}")
    secrets = {cid: (work / f"state-{cid}" / f"{cid}.key").read_bytes() for cid in files}
    return run_dir, secrets, seconds


def in_process(cfg, secrets: dict[str, bytes], out: Path, evaluate_n: int) -> list[dict]:
    """The same run in one process and the same evaluation of each client's samples; its rows
    (written to ``out`` as results.csv and report.md)."""
    from collafuse.engines.local import run_training
    from collafuse.evaluation.federated import evaluate_on_node, write_federated_results
    from collafuse.messages import PartialSamples, SampleRequest

    run = run_training(cfg, out, progress=False, secrets=secrets)
    data = load_client_data(cfg)
    clients = list(run.clients)
    if len({run.server.cut_of(c) for c in clients}) != 1:
        raise SystemExit("one cut for all clients only (the hand-overs are made in one batch)")
    s, n = cfg.sample, evaluate_n
    handover = run.server.generate(SampleRequest(
        client_id=clients[0], num_samples=n * len(clients), seed=s.seed, sampler=s.sampler,
        steps=s.steps))
    rows = []
    for i, cid in enumerate(clients):
        part = PartialSamples(client_id=cid, x=handover.x[i * n:(i + 1) * n].cpu(),
                              cut=handover.cut, sampler=handover.sampler, steps=handover.steps)
        images = run.clients[cid].finish_samples(part, s.seed, guidance_scale=s.guidance_scale)
        train, held = data.clients[cid], data.client_holdout[cid]
        figures = evaluate_on_node(images.cpu(), part.x, train, held, cfg.evaluation, s.seed,
                                   out / "inception")
        rows.append({"protocol": cfg.train.protocol, "seed": cfg.run.seed,
                     "cut_ratio": cfg.diffusion.cut_ratio, "cut_index": run.server.cut,
                     "client_cut_ratio": cfg.cut_ratio(cid),
                     "client_cut_index": run.server.cut_of(cid), "client_preset": cfg.preset(cid),
                     "condition": cfg.model.condition,
                     "num_timesteps": cfg.diffusion.num_timesteps, "client": cid,
                     "train_images": len(train), "holdout_images": len(held),
                     "num_samples": n, **figures})
    write_federated_results(out, rows)
    return rows


def agreement(deployed: list[dict], local: list[dict]) -> list[str]:
    """Per hospital and KID: does each run's KID lie in the other's 95% interval?"""
    by_client = {r["client"]: r for r in local}
    lines = []
    for row in deployed:
        twin = by_client[row["client"]]
        for key in KID_COLUMNS:
            inside = (twin[f"{key}_ci_low"] <= row[key] <= twin[f"{key}_ci_high"]
                      and row[f"{key}_ci_low"] <= twin[key] <= row[f"{key}_ci_high"])
            lines.append(f"{row['client']} {key}: deployed {row[key]:.4f} "
                         f"[{row[f'{key}_ci_low']:.4f}, {row[f'{key}_ci_high']:.4f}], in-process "
                         f"{twin[key]:.4f} [{twin[f'{key}_ci_low']:.4f}, "
                         f"{twin[f'{key}_ci_high']:.4f}]: {'agree' if inside else 'DISAGREE'}")
    return lines


def main() -> None:
    import json

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", type=Path, default=ROOT / "configs" / "quickstart.toml")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="a config override, applied to both runs (repeatable)")
    p.add_argument("--evaluate-n", type=int, default=16, help="samples per hospital")
    p.add_argument("--timeout", type=float, default=900.0, help="round and sample timeout (s)")
    p.add_argument("--work", type=Path, help="working folder (default: a temporary one); one "
                   "that holds a finished deployment's run is reused (only the in-process run)")
    args = p.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="collafuse-parity-"))
    work.mkdir(parents=True, exist_ok=True)
    cfg = load_config(args.config, args.set)
    if (work / "server" / "run" / "results.json").is_file():  # deployed already: reuse it
        run_dir, seconds = work / "server" / "run", {}
        secrets = {cid: (work / f"state-{cid}" / f"{cid}.key").read_bytes()
                   for cid in cfg.data.clients}
    else:
        run_dir, secrets, seconds = deploy(args.config, args.set, work, args.evaluate_n,
                                           args.timeout)
    start = time.monotonic()
    local = in_process(cfg, secrets, work / "local", args.evaluate_n)
    seconds["in-process train + evaluate"] = time.monotonic() - start
    deployed = json.loads((run_dir / "results.json").read_text())
    print(f"work folder: {work}")
    print("seconds: " + ", ".join(f"{k} {v:.0f}" for k, v in seconds.items()))
    print("\n## deployed (server's report.md)\n\n" + (run_dir / "report.md").read_text())
    print("\n## in-process\n\n" + (work / "local" / "report.md").read_text())
    print("\n".join(agreement(deployed, local)))


if __name__ == "__main__":
    main()
