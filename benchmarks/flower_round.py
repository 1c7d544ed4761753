"""Flower engine: bytes per round per node, and time per round in deployment vs in-process.

    python benchmarks/flower_round.py [--config configs/quickstart.toml] [--rounds 3] [--K 1,8,32]

(a) Bytes per round per node, for both protocols (shared-noise, noisy-data), at the config's
    batch size, image size and cut ratio (quickstart: 32x32, batch 64, c = 0.6, T = 100):
    a client of the config trains ``--byte-rounds`` rounds of K batches and we count what it
    sends (the CollaFuse payload: array bytes, and the Flower RecordDict as protobuf) and what
    the server sends it (the train request, which carries the run's config).
(b) Time per round, for each K of ``--K``: the same work (two hospitals, DU and HT, K batches
    each, one server step per batch index) through the in-process engine
    (``engines.local.Run.train_round``) and through a real deployment on loopback
    (flower-superlink + 2 flower-supernode + ``flwr run``; the server's own per-round wall
    time from its metrics log, which with pipelined rounds is the time between two finished
    rounds), side by side: in-process, then deployment, then in-process again (the
    in-process figure is the mean of both passes). The deployment's first round (each node
    unpacks the app, builds its model, the pipeline fills) is shown apart; the ratio is that
    of the rounds after it. All parties share this machine's cores: each SuperNode's
    ClientApps and the ServerApp get ``--node-threads`` / ``--server-threads`` torch threads
    (default 1; torch's default of one per core in every process oversubscribes the cores,
    and OpenMP's spinning then slows every party down several times). Every Flower message
    starts a fresh ClientApp process on the node, and the SuperNode polls for messages; both
    costs are paid once per message, so they shrink relative to the work as K grows.

Prints a table and the ratios. Not part of the test suite; run it on a quiet machine.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path


ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from collafuse.config import load_config  # noqa: E402
from collafuse.data import save_images  # noqa: E402
from collafuse.engines.flower import transport  # noqa: E402
from collafuse.engines.local import Run  # noqa: E402
from collafuse.factory import load_client_data, make_client  # noqa: E402
from collafuse.messages import encode  # noqa: E402

PROTOCOLS = ("shared-noise", "noisy-data")


def _harness():
    spec = importlib.util.spec_from_file_location("collafuse_flower_harness",
                                                  ROOT / "scripts" / "flower" / "harness.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


def wire_bytes(content) -> int:
    """Size of a Flower RecordDict as protobuf (what crosses the wire, before HTTP framing)."""
    from flwr.common.serde import recorddict_to_proto

    return recorddict_to_proto(content).ByteSize()


def bytes_per_round(config: Path, overrides: list[str], rounds: int) -> list[dict]:
    rows = []
    for protocol in PROTOCOLS:
        cfg = load_config(config, [*overrides, f"train.protocol='{protocol}'"])
        parts = load_client_data(cfg).clients
        cid = next(iter(parts))
        client = make_client(cfg, cid, parts[cid], secret=os.urandom(32))
        k = cfg.train.batches_per_round
        request = transport.pack([], {"config-toml": cfg.to_toml(), "round": 1, "batches": k,
                                      "code-digest": "0" * 64})
        payload, wire, images = [], [], []
        for rnd in range(1, rounds + 1):
            encoded = [encode(m) for m in client.train_round(k)]
            payload.append(transport.nbytes(encoded))
            wire.append(wire_bytes(transport.pack(encoded, {"client-id": cid, "round": rnd,
                                                            "client-loss": 0.0})))
            images.append(sum(int(a[next(n for n in a if n in ("x_t", "views"))].shape[0]) for a in encoded))
        rows.append({
            "protocol": protocol, "client": cid, "batch": cfg.train.batch_size, "K": k,
            "image": cfg.data.image_size, "cut_ratio": cfg.diffusion.cut_ratio,
            "T": cfg.diffusion.num_timesteps, "rounds": rounds,
            "images_sent_per_round": statistics.mean(images),
            "payload_up": statistics.mean(payload), "wire_up": statistics.mean(wire),
            "wire_up_min": min(wire), "wire_up_max": max(wire),
            "wire_down": wire_bytes(request),
        })
    return rows


def time_in_process(cfg, rounds: int) -> list[float]:
    run = Run(cfg)
    out = []
    for _ in range(rounds):
        start = time.perf_counter()
        run.train_round()
        out.append(time.perf_counter() - start)
    return out


def time_deployment(config: Path, cfg, rounds: int, work: Path, node_threads: int,
                    server_threads: int) -> tuple[list[float], float]:
    h = _harness()
    parts = load_client_data(cfg).clients
    run_dir = work / "run"
    with h.Deployment(work / "dep", ROOT, node_threads=node_threads or None,
                      server_threads=server_threads or None) as dep:
        dep.start_superlink()
        for cid, part in parts.items():
            save_images(part, work / f"{cid}.npz")
            dep.add_supernode(cid, {"client-id": cid, "data-path": str(work / f"{cid}.npz"),
                                    "state-dir": str(work / f"state-{cid}")})
        start = time.perf_counter()
        res = dep.run({"task": "train", "config": str(config), "identity": "node-report",
                       "run-dir": str(run_dir), "rounds": rounds, "min-nodes": len(parts),
                       "round-timeout": 1200.0}, timeout=120 + 600 * rounds)
        total = time.perf_counter() - start
        if res.returncode != 0:
            raise RuntimeError(f"flwr run failed:\n{res.stdout[-3000:]}")
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    if any(x["clients"] != list(parts) for x in lines):
        raise RuntimeError(f"a node missed a round: {lines}")
    return [x["seconds"] for x in lines], total


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", type=Path, default=ROOT / "configs" / "quickstart.toml")
    ap.add_argument("--clients", default="DU,HT", help="the hospitals of part (b), one SuperNode each")
    ap.add_argument("--rounds", type=int, default=5,
                    help="rounds timed per engine in part (b); the deployment's first is shown apart")
    ap.add_argument("--byte-rounds", type=int, default=5, help="rounds counted per protocol in part (a)")
    ap.add_argument("--set", dest="overrides", action="append", default=[],
                    help="config override section.key=value (repeatable)")
    ap.add_argument("--K", default="1,8,32", help="batches per round (one Flower message) of part (b)")
    ap.add_argument("--node-threads", type=int, default=1,
                    help="torch threads of each SuperNode's ClientApps (they share this machine's "
                         "cores; 0 = torch's default, one per core)")
    ap.add_argument("--server-threads", type=int, default=1,
                    help="torch threads of the ServerApp, which shares the cores with the nodes "
                         "(0 = torch's default)")
    ap.add_argument("--skip-deploy", action="store_true", help="only part (a)")
    args = ap.parse_args(argv)
    config = args.config.resolve()
    # data.path relative to the repository, whatever the working directory
    overrides = [f"data.path='{(ROOT / load_config(config).data.path).resolve()}'", *args.overrides]

    print(f"config {config.relative_to(ROOT) if config.is_relative_to(ROOT) else config}"
          + (f" with {overrides}" if overrides else ""))
    print("\n(a) bytes per round per node (mean over rounds; up = node -> server, down = server -> node)")
    rows = bytes_per_round(config, overrides, args.byte_rounds)
    r0 = rows[0]
    print(f"    {r0['image']}x{r0['image']}, batch {r0['batch']}, K = {r0['K']} batch(es) per round, "
          f"c = {r0['cut_ratio']}, T = {r0['T']}, client {r0['client']}, {r0['rounds']} rounds")
    print(f"    {'protocol':<13} {'images/round':>12} {'payload up':>12} {'wire up':>12} "
          f"{'(min..max)':>20} {'wire down':>10}")
    for r in rows:
        print(f"    {r['protocol']:<13} {r['images_sent_per_round']:>12.1f} {r['payload_up']:>12,.0f} "
              f"{r['wire_up']:>12,.0f} {r['wire_up_min']:>9,}..{r['wire_up_max']:<9,} {r['wire_down']:>10,}")
    print(f"    noisy-data / shared-noise (wire up): {rows[1]['wire_up'] / rows[0]['wire_up']:.2f}")
    if args.skip_deploy:
        return

    cids = [c.strip() for c in args.clients.split(",") if c.strip()]
    clients = "data.clients=[" + ", ".join(f"'{c}'" for c in cids) + "]"
    print(f"\n(b) time per round, {len(cids)} hospitals {cids}, {args.rounds} rounds per engine and K "
          f"(seconds; load average {os.getloadavg()[0]:.2f} before)")
    print(f"    {'K':>3} {'in-process':>11} {'deployment':>11} {'ratio':>6}  {'first round':>11} "
          f"{'flwr run total':>14}")
    table = []
    for k in [int(x) for x in args.K.split(",")]:
        cfg = load_config(config, [*overrides, clients, f"train.batches_per_round={k}"])
        with tempfile.TemporaryDirectory(prefix="flower-round-") as tmp:
            tmp = Path(tmp)
            cfg_file = tmp / "bench.toml"  # the resolved config: both engines read this one file
            cfg_file.write_text(cfg.to_toml())
            cfg = load_config(cfg_file)
            a = time_in_process(cfg, args.rounds)
            d, total = time_deployment(cfg_file, cfg, args.rounds, tmp, args.node_threads,
                                       args.server_threads)
            b = time_in_process(cfg, args.rounds)
        # the deployment's first round pays once for what the in-process engine did before its
        # timer started (each node unpacks the app, builds its model, fills the pipeline): the
        # ratio compares the rounds after it, the cost of every further round of a run
        row = {"K": k, "in_process": a + b, "deployment": d, "flwr_run_total": total,
               "ratio": statistics.mean(d[1:]) / statistics.mean(a + b)}
        table.append(row)
        print(f"    {k:>3} {statistics.mean(a + b):>11.2f} {statistics.mean(d[1:]):>11.2f} "
              f"{row['ratio']:>5.2f}x  {d[0]:>11.2f} {total:>13.1f}s", flush=True)
    print(f"    (load average {os.getloadavg()[0]:.2f} after; threads per node {args.node_threads or 'default'}, "
          f"server {args.server_threads or 'default'}; {cfg.train.protocol}, batch "
          f"{cfg.train.batch_size}, {cfg.data.image_size}x{cfg.data.image_size}, "
          f"preset {cfg.model.preset})")
    print(json.dumps({"bytes": rows, "seconds": table}, default=float))


if __name__ == "__main__":
    main()
