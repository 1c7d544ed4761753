"""CollaFuse ServerApp: a thin Flower adapter over ``collafuse.server.Server``.

Per round the server sends every connected node one ``train`` message asking for K batches,
receives each node's K encoded CollaFuse messages, and calls ``Server.train_step`` once per
batch index on the union of the clients' messages (clients in the in-process engine's order),
exactly as ``collafuse.engines.local`` does, so both engines give the same models under the
same seed. The server state is saved to ``<run-dir>/server.pt`` every round (atomically); a
restarted ServerApp with the same ``run-dir`` and config resumes after the last saved round.

Faults: a node that fails or does not answer within ``round-timeout`` is logged and the
round goes on with the replies that came. A node that connects during the run (a hospital
whose SuperNode restarted after a crash gets a new node id) is greeted before the next round
and serves its client again; the client resumes from its own disk. A reply that does not decode, has the wrong count
or round, or holds a message the Server rejects (shape, dtype, NaN/inf, protocol, timesteps)
is dropped whole with a logged reason before anything of it reaches the model.

Run config (``[tool.flwr.app.config]`` in pyproject.toml, override with ``flwr run -c``):
``task`` ("train"), ``config`` (CollaFuse TOML path; "" = defaults), ``overrides``
(space-separated ``section.key=value``), ``run-dir`` (absolute path), ``rounds`` (0 = from the
config), ``batches-per-round`` (0 = ``train.batches_per_round``), ``min-nodes``,
``node-wait-timeout``, ``round-timeout`` (seconds), ``sample-n`` (split inference per node
after training; 0 = none), ``sim-clients`` / ``sim-state-dir`` (simulation engine only).
"""

from __future__ import annotations

import json
import re
import shlex
import time
import tomllib
from pathlib import Path

from flwr.app import Context, Message, RecordDict
from flwr.serverapp import Grid, ServerApp

from . import transport
from ...state import write_text
from .common import write_json, info, wait_for_nodes, warn

app = ServerApp()

SERVER_STATE = "server.pt"
PROGRESS = "progress.json"
METRICS = "metrics.jsonl"


class RejectedReply(ValueError):
    """A node's reply that must not reach the model (one-line reason)."""


def config_from_text(text: str):
    from ...config import from_dict

    return from_dict(tomllib.loads(text), source="config sent by the server")


def load_run_config(context: Context):
    from ...config import load_config

    rc = context.run_config
    path = str(rc.get("config", "")) or None
    overrides = shlex.split(str(rc.get("overrides", "")))
    return load_config(path, overrides)


def client_order(cfg, client_ids) -> list[str]:
    """The in-process engine's client order: config order for sites, else natural sort."""
    ids = list(client_ids)
    if cfg.data.partition == "site":
        pos = {c: i for i, c in enumerate(cfg.data.clients)}
        return sorted(ids, key=lambda c: (pos.get(c, len(pos)), c))
    return sorted(ids, key=lambda c: [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", c)])


def accept_reply(server, content: RecordDict, expected_round: int, num_batches: int):
    """Decode and check one node's train reply: returns (client-id, messages, meta).

    Raises RejectedReply (nothing of the reply may reach the model) on any problem.
    """
    from ...messages import MessageError, decode

    try:
        arrays, meta = transport.unpack(content)
    except transport.TransportError as err:
        raise RejectedReply(f"malformed record: {err}") from None
    cid = str(meta.get("client-id", "?"))
    if meta.get("round") != expected_round:
        raise RejectedReply(f"client {cid}: reply for round {meta.get('round')!r}, expected {expected_round}")
    if len(arrays) != num_batches:
        raise RejectedReply(f"client {cid}: {len(arrays)} messages, expected {num_batches}")
    msgs = []
    for i, a in enumerate(arrays):
        try:
            m = decode(a)
            if m.client_id != cid:
                raise MessageError(f"{m.kind}: says client {m.client_id!r}, sent by {cid!r}")
            server.check(m)
        except MessageError as err:
            raise RejectedReply(f"client {cid}, message {i}: {err}") from None
        msgs.append(m)
    return cid, msgs, meta


def _send(grid: Grid, nodes, message_type: str, contents: dict[int, RecordDict], timeout: float):
    """send_and_receive; returns ({node: reply content}, {node: failure reason})."""
    out = [Message(content=contents[n], dst_node_id=n, message_type=message_type) for n in nodes]
    replies = grid.send_and_receive(out, timeout=timeout)
    # match replies by the message they answer: an error made by the SuperLink itself (e.g. the
    # node went offline) comes from the SuperLink's own node id, not from the node asked
    asked = {m.metadata.message_id: m.metadata.dst_node_id for m in out if m.metadata.message_id}
    ok, failed = {}, {}
    for r in replies:
        src = asked.get(r.metadata.reply_to_message_id, r.metadata.src_node_id)
        if src not in contents:
            warn("%s: reply from unexpected node %s ignored", message_type, src)
            continue
        if r.has_error():
            failed[src] = f"error {r.error.code}: {r.error.reason}"
        else:
            ok[src] = r.content
    for n in nodes:
        if n not in ok and n not in failed:
            failed[n] = f"no reply within {timeout:.0f}s"
    return ok, failed


def greet(grid: Grid, nodes, cfg_text: str, done: int, timeout: float, names: dict, node_of: dict) -> None:
    """Send ``query.hello`` to ``nodes``; record who answered (a client id seen before moves
    to the node that answered now, e.g. a hospital that came back after a crash)."""
    hello_meta = {"config-toml": cfg_text, "round": done}
    ok, failed = _send(grid, nodes, "query.hello", {n: transport.pack([], hello_meta) for n in nodes}, timeout)
    for n, why in failed.items():
        names[n] = {"client-id": None}  # do not ask this node again
        warn("node %s left out: hello failed (%s)", n, why)
    for n, content in ok.items():
        try:
            _, meta = transport.unpack(content)
            cid = str(meta["client-id"])
            int(meta["num-images"])
        except (transport.TransportError, KeyError, TypeError, ValueError) as err:
            names[n] = {"client-id": None}
            warn("node %s left out: bad hello reply (%s)", n, err)
            continue
        names[n] = meta
        if cid in node_of and node_of[cid] != n:
            info("client %s is back on node %s (was node %s); it resumes from its disk at round %s",
                 cid, n, node_of[cid], meta.get("round"))
        node_of[cid] = n


def train(grid: Grid, context: Context) -> dict:
    from ...factory import make_server, total_rounds
    from ...messages import SampleRequest, encode

    rc = context.run_config
    cfg = load_run_config(context)
    cfg_text = cfg.to_toml()
    run_dir = Path(str(rc.get("run-dir", "runs/flower"))).expanduser().resolve()
    run_dir.mkdir(parents=True, exist_ok=True)
    K = int(rc.get("batches-per-round", 0)) or cfg.train.batches_per_round
    round_timeout = float(rc.get("round-timeout", 600.0))

    server = make_server(cfg)
    progress = {"round": 0}
    if (run_dir / "config.toml").is_file():
        if (run_dir / "config.toml").read_text() != cfg_text:
            raise ValueError(f"{run_dir}: holds a run with another config; choose another run-dir")
        if (run_dir / SERVER_STATE).is_file():
            server.load(run_dir / SERVER_STATE)
            if not server.resumable:
                raise ValueError(f"{run_dir / SERVER_STATE}: saved on another kind of device "
                                 f"than {server.device}; resume the server there")
            progress = json.loads((run_dir / PROGRESS).read_text())
            info("resuming %s after round %d", run_dir, progress["round"])
    else:
        write_text(run_dir / "config.toml", cfg_text)

    nodes = wait_for_nodes(grid, int(rc.get("min-nodes", 1)), float(rc.get("node-wait-timeout", 120.0)))
    if not nodes:
        raise RuntimeError("no SuperNode connected")
    names: dict[int, dict] = {}  # node id -> its hello reply (client-id, num-images, round)
    node_of: dict[str, int] = {}  # client id -> the node that serves it now
    greet(grid, nodes, cfg_text, progress["round"], round_timeout, names, node_of)
    if not node_of:
        raise RuntimeError(f"none of the nodes {nodes} answered hello")
    order = client_order(cfg, node_of)
    sizes = [int(names[node_of[c]]["num-images"]) for c in order]
    rounds = int(rc.get("rounds", 0)) or total_rounds(cfg, sizes)
    info("clients %s on nodes %s; %d round(s) of %d batch(es)", order, [node_of[c] for c in order], rounds, K)

    with open(run_dir / METRICS, "a") as log:
        while progress["round"] < rounds:
            rnd = progress["round"] + 1
            start = time.perf_counter()
            # a node that (re)connected since the last round: a hospital that came back after a
            # crash gets a new node id; its hello names its client and it rejoins from its disk
            new = sorted({int(n) for n in grid.get_node_ids()} - set(names))
            if new:
                greet(grid, new, cfg_text, progress["round"], round_timeout, names, node_of)
                order = client_order(cfg, node_of)
            meta = {"config-toml": cfg_text, "round": rnd, "batches": K}
            targets = [node_of[c] for c in order]
            ok, failed = _send(grid, targets, "train", {n: transport.pack([], meta) for n in targets},
                               round_timeout)
            inbox, nbytes, problems = {}, {}, {}
            for n, why in failed.items():
                problems[names[n]["client-id"]] = why
                warn("round %d: node %s (client %s) failed: %s; going on without it",
                     rnd, n, names[n]["client-id"], why)
            for n, content in ok.items():
                try:
                    cid, msgs, _ = accept_reply(server, content, rnd, K)
                    if node_of.get(cid) != n:
                        raise RejectedReply(f"node {n} claims to be client {cid!r}")
                except RejectedReply as err:
                    problems[str(names[n]["client-id"])] = f"rejected: {err}"
                    warn("round %d: rejected reply of node %s: %s", rnd, n, err)
                    continue
                inbox[cid] = msgs
                nbytes[cid] = sum(m.nbytes for m in msgs)
            answered = [c for c in order if c in inbox]
            losses = [server.train_step([inbox[c][k] for c in answered]) for k in range(K)] if answered else []
            server.save(run_dir / SERVER_STATE)
            progress = {"round": rnd, "rounds": rounds, "server-steps": server.steps}
            write_json(run_dir / PROGRESS, progress)
            losses = [x.item() for x in losses if x is not None]
            line = {"round": rnd, "clients": answered, "problems": problems,
                    "server_loss": sum(losses) / len(losses) if losses else None,
                    "bytes": nbytes, "seconds": time.perf_counter() - start}
            log.write(json.dumps(line) + "\n")
            log.flush()
            info("round %d/%d: %d/%d clients, server loss %s, %.1fs", rnd, rounds, len(answered),
                 len(order), line["server_loss"], line["seconds"])

    result = {"rounds": progress["round"], "clients": order}
    n_samples = int(rc.get("sample-n", 0))
    if n_samples > 0:
        seed = cfg.sample.seed
        contents = {}
        for c in order:
            partial = server.generate(SampleRequest(client_id=c, num_samples=n_samples, seed=seed))
            contents[node_of[c]] = transport.pack([encode(partial)], {"config-toml": cfg_text, "seed": seed})
        ok, failed = _send(grid, [node_of[c] for c in order], "query.sample", contents, round_timeout)
        for n, why in failed.items():
            warn("sampling: node %s failed: %s", n, why)
        result["samples"] = {str(transport.unpack(c)[1]["client-id"]): transport.unpack(c)[1]
                             for c in ok.values()}
        info("sampling: %d/%d clients stored their images", len(ok), len(order))
    write_json(run_dir / "flower-result.json", result)
    return result


@app.main()
def main(grid: Grid, context: Context) -> None:
    task = str(context.run_config.get("task", "train"))
    if task != "train":
        raise ValueError(f"run config task={task!r}: expected 'train'")
    train(grid, context)
