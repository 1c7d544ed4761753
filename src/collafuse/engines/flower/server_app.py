"""CollaFuse ServerApp: a thin Flower adapter over ``collafuse.server.Server``.

Per round the server sends every verified hospital one ``train`` message asking for K batches,
receives each node's K encoded CollaFuse messages, and calls ``Server.train_step`` once per
batch index on the union of the clients' messages (clients in the in-process engine's order):
the round loop is ``collafuse.engines.rounds.run_rounds``, the in-process engine's own, with
:class:`NodeTransport` carrying the messages, so both engines give the same models under the
same seed. Rounds are pipelined: round r+1's requests go out as soon as round r's replies are
in, so the nodes train while the server does.

Identity (run config ``identity``): ``registered-name`` (default) binds a node to the client
named at its registration (``flwr supernode register --name DU``, with SuperNode
authentication); a node that claims another client is refused and logged. ``node-report``
takes the node's word (insecure loopback tests and the simulation engine only). A client is
served by one node at a time; ``min-nodes`` counts distinct verified clients.

Every reply goes through :mod:`.replies`: anything unexpected is a logged rejection of that
node's contribution for that round, never a crash. A node that fails or does not answer within
``round-timeout`` is left out of that round; a node whose hello failed is asked again later.

Crash safety: ``<run-dir>/server.pt`` holds the server's state and its progress in one atomic
file, written after every round; a restarted ServerApp with the same run-dir and config
resumes after the last saved round. Nodes keep their last replies, so a round asked again is
answered again, never trained twice.

Run config (``[tool.flwr.app.config]`` in pyproject.toml; docs/deployment.md has the table).
"""

from __future__ import annotations

import json
import re
import shlex
import time
from dataclasses import dataclass
from pathlib import Path

from flwr.app import Context, Message, RecordDict
from flwr.serverapp import Grid, ServerApp

from . import transport
from ...state import write_text
from .common import code_digest, info, sample_labels, warn, write_json
from ..rounds import ClientReplies, run_rounds
from .replies import (RejectedReply, accept_evaluation, accept_hello, accept_sample,
                      accept_train)

app = ServerApp()

SERVER_STATE = "server.pt"
METRICS = "metrics.jsonl"
RESULT = "flower-result.json"
NODES = "flower-nodes.json"  # node id -> registered name and client served (`collafuse flower nodes`)
IDENTITIES = ("registered-name", "node-report")
TASKS = ("train", "sample", "evaluate")
ACTIVITY = {"sample": "sampling", "evaluate": "evaluation"}  # what the log calls a query
POLL = 0.1  # seconds between pulls of replies (Flower's own send_and_receive sleeps 3 s)


def load_run_config(context: Context):
    from ...config import load_config

    rc = context.run_config
    path = str(rc.get("config", "")) or None
    overrides = shlex.split(str(rc.get("overrides", "")))
    return load_config(path, overrides)


@dataclass
class Settings:
    """The run config's keys, checked once (a typo fails the run before any node is asked)."""

    task: str
    run_dir: Path
    rounds: int
    batches_per_round: int
    min_nodes: int
    node_wait_timeout: float
    round_timeout: float
    sample_n: int
    sample_timeout: float
    identity: str
    evaluate_n: int

    @classmethod
    def of(cls, rc: dict, cfg) -> "Settings":
        s = cls(task=str(rc.get("task", "train")),
                run_dir=Path(str(rc.get("run-dir", "runs/flower"))).expanduser().resolve(),
                rounds=int(rc.get("rounds", 0)),
                batches_per_round=int(rc.get("batches-per-round", 0)) or cfg.train.batches_per_round,
                min_nodes=int(rc.get("min-nodes", 1)),
                node_wait_timeout=float(rc.get("node-wait-timeout", 120.0)),
                round_timeout=float(rc.get("round-timeout", 600.0)),
                sample_n=int(rc.get("sample-n", 0)),
                sample_timeout=float(rc.get("sample-timeout", 1800.0)),
                identity=str(rc.get("identity", "registered-name")),
                evaluate_n=int(rc.get("evaluate-n", 0)))
        if s.task not in TASKS:
            raise ValueError(f"run config task={s.task!r}: expected one of {TASKS}")
        if s.task != "train" and getattr(s, f"{s.task}_n") < 1:
            raise ValueError(f"run config task={s.task!r} needs {s.task}-n >= 1")
        if s.evaluate_n and not cfg.data.client_holdout_fraction:
            raise ValueError("run config evaluate-n > 0: each hospital evaluates against its own "
                             "held-out patients; set data.client_holdout_fraction > 0")
        if s.identity not in IDENTITIES:
            raise ValueError(f"run config identity={s.identity!r}: expected one of {IDENTITIES}")
        if min(s.rounds, s.sample_n, s.evaluate_n) < 0 or min(s.batches_per_round,
                                                               s.min_nodes) < 1:
            raise ValueError("run config: rounds, sample-n and evaluate-n must be >= 0, "
                             "batches-per-round and min-nodes >= 1")
        if min(s.node_wait_timeout, s.round_timeout, s.sample_timeout) <= 0:
            raise ValueError("run config: timeouts must be > 0 seconds")
        return s


def client_order(cfg, client_ids) -> list[str]:
    """The in-process engine's client order: config order for sites, else natural sort."""
    ids = list(client_ids)
    if cfg.data.partition == "site":
        pos = {c: i for i, c in enumerate(cfg.data.clients)}
        return sorted(ids, key=lambda c: (pos.get(c, len(pos)), c))
    return sorted(ids, key=lambda c: [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", c)])


class Exchange:
    """Requests in flight: pushed to nodes now, replies pulled later (Grid.push/pull_messages),
    so the server can work while nodes do. ``ttl`` bounds each request's round trip at the
    SuperLink too; ``group_id`` names the round."""

    def __init__(self, grid: Grid, message_type: str, contents: dict[int, RecordDict],
                 ttl: float, group_id: str):
        self.grid = grid
        out = [Message(content=c, dst_node_id=n, message_type=message_type, ttl=ttl,
                       group_id=group_id) for n, c in contents.items()]
        ids = list(grid.push_messages(out)) if out else []
        self.asked = {mid: n for mid, n in zip(ids, contents) if mid}
        self.pending = set(self.asked)
        self.unsent = [n for n in contents if n not in self.asked.values()]
        self.deadline = time.monotonic() + ttl
        self.ttl = ttl

    @property
    def done(self) -> bool:
        return not self.pending or time.monotonic() >= self.deadline

    def poll(self) -> dict[int, Message]:
        """The replies that have arrived since the last poll, by node (one pull, no wait)."""
        replies = {}
        if self.pending:
            for r in self.grid.pull_messages(list(self.pending)):
                # match by the request answered: an error made by the SuperLink itself (the
                # node went offline, ttl expired) comes from the SuperLink's own node id
                mid = r.metadata.reply_to_message_id
                if mid in self.pending:
                    self.pending.discard(mid)
                    replies[self.asked[mid]] = r
        return replies

    def missing(self) -> dict[int, str]:
        """{node: why there is no reply} for the nodes still without one."""
        why = f"no reply within {self.ttl:.0f}s"
        return {**{self.asked[m]: why for m in self.pending},
                **{n: "the SuperLink did not take the request" for n in self.unsent}}

    def collect(self, idle=None) -> tuple[dict[int, Message], dict[int, str]]:
        """({node: reply}, {node: why there is none}); waits until all replied or ttl passed,
        calling ``idle()`` about once a second meanwhile."""
        replies: dict[int, Message] = {}
        last_idle = time.monotonic()
        while True:
            replies.update(self.poll())
            if self.done:
                return replies, self.missing()
            if idle is not None and time.monotonic() - last_idle >= 1.0:
                idle()
                last_idle = time.monotonic()
            time.sleep(POLL)


class Taken(RejectedReply):
    """A node claims a client that another node, still online, serves."""


class Roster:
    """Which verified client each node serves, from hello replies and Flower's node registry.

    Hellos never hold up a round: :meth:`greet` sends them and binds whoever has answered by
    the next call, so a node that is slow, silent or hostile costs the others nothing."""

    def __init__(self, cfg, cfg_text: str, identity: str, timeout: float,
                 record: Path | None = None):
        self.cfg, self.cfg_text, self.identity, self.timeout = cfg, cfg_text, identity, timeout
        self.record = record  # where the node bindings are written (NODES), if anywhere
        self.nodes: dict[str, dict] = {}  # node id -> what the operator sees in NODES
        self.registry: dict = {}  # node id -> Flower's NodeInfo, as of the last greet
        self.digest = code_digest()
        self.known = set(cfg.data.clients) if cfg.data.partition == "site" else None
        self.node_of: dict[str, int] = {}  # client id -> the node serving it now
        self.num_images: dict[str, int] = {}
        self.retry_at: dict[int, float] = {}  # nodes whose hello failed: when to ask again
        self.failures: dict[int, int] = {}
        self.hellos: Exchange | None = None
        if identity == "node-report":
            warn("identity='node-report': a node's client id is its own word (insecure; "
                 "use registered-name with SuperNode authentication for a real deployment)")

    @property
    def order(self) -> list[str]:
        return client_order(self.cfg, self.node_of)

    def greet(self, grid: Grid, done: int) -> None:
        """Bind the nodes whose hello has come back; say hello to nodes not yet bound (new,
        back after a crash, or due a retry)."""
        nodes = self.registry = {int(i.node_id): i for i in grid.get_nodes()}
        if self.hellos is not None:
            for n, reply in self.hellos.poll().items():
                self._consider(n, reply, nodes)
            if self.hellos.done:
                for n, why in self.hellos.missing().items():
                    self._refuse(n, why)
                self.hellos = None
        if self.hellos is not None:
            return
        bound, now = set(self.node_of.values()), time.monotonic()
        new = sorted(n for n in nodes if n not in bound and self.retry_at.get(n, 0) <= now)
        if new:
            meta = {"config-toml": self.cfg_text, "round": done, "code-digest": self.digest}
            self.hellos = Exchange(grid, "query.hello", {n: transport.pack([], meta) for n in new},
                                   self.timeout, "hello")

    def _consider(self, n: int, reply: Message, nodes: dict) -> None:
        try:
            if n not in nodes:
                raise RejectedReply("went offline")
            hello = accept_hello(reply, lambda cid: self._may_serve(nodes, n, cid), self.digest)
        except Taken as err:  # a restart: the old node is offline within a minute, ask again soon
            return self._refuse(n, str(err), backoff=False)
        except RejectedReply as err:
            return self._refuse(n, str(err))
        cid = hello["client-id"]
        if cid in self.node_of:
            info("client %s is back on node %s (was node %s); it resumes from its disk at "
                 "round %d", cid, n, self.node_of[cid], hello["round"])
        self.node_of[cid] = n
        self.num_images[cid] = hello["num-images"]
        self.failures.pop(n, None)
        self._note(n, client=cid, refused=None)

    def _refuse(self, n: int, why: str, backoff: bool = True) -> None:
        self.failures[n] = self.failures.get(n, 0) + 1
        wait = min(60.0, 5.0 * 2 ** (self.failures[n] - 1)) if backoff else 5.0
        self.retry_at[n] = time.monotonic() + wait
        warn("node %s left out (asked again in %.0fs): %s", n, wait, why)
        self._note(n, refused=why)

    def _note(self, n: int, **facts) -> None:
        """Record what node ``n`` is: its registered name (Flower's node registry, as
        ``flwr supernode register --name`` set it), the client it serves or why it was refused;
        written to ``record`` for the operator (``collafuse flower nodes RUN_DIR``)."""
        entry = self.nodes.setdefault(str(n), {"node-id": n, "registered-name": None,
                                               "client": None, "refused": None})
        registered = self.registry.get(n)
        if registered is not None:
            entry["registered-name"] = registered.name if registered.HasField("name") else None
        if "client" in facts:
            for other in self.nodes.values():  # a client is served by one node at a time
                if other is not entry and other["client"] == facts["client"]:
                    other["client"] = None
        entry.update(facts, since=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
        if self.record is not None:
            write_json(self.record, {"identity": self.identity,
                                     "nodes": sorted(self.nodes.values(),
                                                     key=lambda e: e["node-id"])})

    def _may_serve(self, nodes: dict, n: int, cid: str) -> None:
        """Raise RejectedReply unless node ``n`` may serve client ``cid``."""
        if self.known is not None and cid not in self.known:
            raise RejectedReply(f"claims client {cid!r}, not one of the run's {sorted(self.known)}")
        if self.identity == "registered-name":
            name = nodes[n].name if nodes[n].HasField("name") else ""
            if not name:
                raise RejectedReply(f"claims client {cid!r} but was registered without a name "
                                    "(flwr supernode register --name <client-id>)")
            if name != cid:
                raise RejectedReply(f"registered as {name!r}, claims client {cid!r}: refused")
        other = self.node_of.get(cid)
        if other is not None and other != n and other in nodes:
            raise Taken(f"claims client {cid!r}, which node {other} serves: refused")


def wait_for_clients(grid: Grid, roster: Roster, settings: Settings, done: int) -> None:
    """Greet nodes until ``min-nodes`` distinct clients are verified or the wait times out."""
    deadline = time.monotonic() + settings.node_wait_timeout
    while True:
        roster.greet(grid, done)
        if len(roster.node_of) >= settings.min_nodes or time.monotonic() >= deadline:
            break
        time.sleep(0.5)
    if not roster.node_of:
        raise RuntimeError("no verified client among the connected nodes")
    if len(roster.node_of) < settings.min_nodes:
        warn("only %d verified client(s) (%s) after %.0fs, min-nodes=%d; going on",
             len(roster.node_of), roster.order, settings.node_wait_timeout, settings.min_nodes)


def resume(server, settings: Settings, cfg_text: str) -> dict:
    """The run's progress: fresh, or the one saved with the server's state in run-dir."""
    from ...state import load_state
    from ..local import truncate_metrics

    run_dir = settings.run_dir
    run_dir.mkdir(parents=True, exist_ok=True)
    config_file = run_dir / "config.toml"
    if not config_file.is_file():
        write_text(config_file, cfg_text)
        return {"round": 0, "batches-per-round": settings.batches_per_round}
    if config_file.read_text() != cfg_text:
        raise ValueError(f"{run_dir}: holds a run with another config; choose another run-dir")
    if not (run_dir / SERVER_STATE).is_file():
        return {"round": 0, "batches-per-round": settings.batches_per_round}
    state = load_state(run_dir / SERVER_STATE)
    progress = state["progress"]
    if settings.task == "train" and progress["batches-per-round"] != settings.batches_per_round:
        raise ValueError(f"{run_dir}: trained with batches-per-round="
                         f"{progress['batches-per-round']}, asked for {settings.batches_per_round}; "
                         "resume with the same value")
    server.load_state_dict(state["server"])
    if not server.resumable:
        raise ValueError(f"{run_dir / SERVER_STATE}: saved on another kind of device than "
                         f"{server.device}; resume the server there")
    truncate_metrics(run_dir / METRICS, progress["round"])
    info("%s %s after round %d", "resuming" if settings.task == "train" else "loading", run_dir,
         progress["round"])
    return progress


def save(server, progress: dict, run_dir: Path) -> None:
    """The server's state and its progress in one atomic file: never one without the other."""
    from ...state import save_state

    save_state({"server": server.state_dict(), "progress": progress}, run_dir / SERVER_STATE)


class NodeTransport:
    """The Flower engine's :class:`..rounds.Transport`: a round's requests are pushed to the
    verified nodes, their replies pulled and checked (:mod:`.replies`); a node that fails, is
    silent or sends anything unexpected is left out of that round, with a logged reason."""

    def __init__(self, grid: Grid, roster: Roster, server, settings: Settings, cfg):
        self.grid, self.roster, self.server, self.settings, self.cfg = (grid, roster, server,
                                                                         settings, cfg)
        self.inflight: dict[int, tuple[Exchange, dict[int, str]]] = {}

    def request(self, rnd: int) -> None:
        self.roster.greet(self.grid, rnd - 1)  # a node that (re)connected serves from rnd on
        clients = {self.roster.node_of[c]: c for c in self.roster.order}
        meta = {"config-toml": self.roster.cfg_text, "round": rnd,
                "batches": self.settings.batches_per_round, "code-digest": self.roster.digest}
        contents = {n: transport.pack([], meta) for n in clients}
        self.inflight[rnd] = (Exchange(self.grid, "train", contents, self.settings.round_timeout,
                                       str(rnd)), clients)

    def replies(self, rnd: int) -> ClientReplies:
        exchange, clients = self.inflight.pop(rnd)
        # greet while waiting: a node back after a crash is bound in time for the next round
        replies, failed = exchange.collect(idle=lambda: self.roster.greet(self.grid, rnd - 1))
        inbox, losses, nbytes, problems = {}, {}, {}, {}
        for n, cid in clients.items():
            try:
                if n in failed:
                    raise RejectedReply(failed[n])
                inbox[cid], losses[cid] = accept_train(
                    self.server, replies[n], cid, rnd, self.settings.batches_per_round,
                    self.cfg.train.batch_size)
                nbytes[cid] = sum(m.nbytes for m in inbox[cid])
            except RejectedReply as err:
                problems[cid] = str(err)
                warn("round %d: node %s (client %s) left out of this round: %s", rnd, n, cid, err)
        order = client_order(self.cfg, inbox)
        return ClientReplies({c: inbox[c] for c in order}, {c: losses[c] for c in order},
                             {c: nbytes[c] for c in order}, problems)


class ServerKeeper:
    """What the ServerApp keeps of each round (:class:`..rounds.Keeper`): a metrics line,
    TensorBoard, and the server's state with its progress after every round."""

    def __init__(self, server, settings: Settings, cfg, rounds: int, log, tracker,
                 progress: dict):
        self.server, self.settings, self.cfg, self.rounds = server, settings, cfg, rounds
        self.log, self.tracker = log, tracker
        self.saved = progress  # the progress saved with the server's state
        self.line: dict = {}
        self.started = time.perf_counter()

    def record(self, rnd: int, replies: ClientReplies, server_losses: list) -> None:
        losses = [x.item() for x in server_losses if x is not None]
        self.line = {"round": rnd, "clients": list(replies.messages),
                     "problems": replies.problems,
                     "server_loss": sum(losses) / len(losses) if losses else None,
                     "client_loss": replies.losses, "bytes": replies.nbytes,
                     "seconds": time.perf_counter() - self.started}
        self.log.write(json.dumps(self.line) + "\n")
        self.log.flush()
        track_round(self.tracker, self.server, self.line, self.rounds, self.cfg)

    def checkpoint(self, rnd: int, final: bool) -> None:
        self.saved = {"round": rnd, "rounds": self.rounds,
                      "batches-per-round": self.settings.batches_per_round,
                      "server-steps": self.server.steps}
        save(self.server, self.saved, self.settings.run_dir)

    def progress(self, rnd: int) -> None:
        line = self.line
        info("round %d/%d: %d/%d clients, server loss %s, %.1fs", rnd, self.rounds,
             len(line["clients"]), len(line["clients"]) + len(line["problems"]),
             line["server_loss"], line["seconds"])
        self.started = time.perf_counter()


def train(grid: Grid, context: Context) -> dict:
    from ...factory import make_server, total_rounds
    from ...tracking import Tracker

    cfg = load_run_config(context)
    cfg_text = cfg.to_toml()
    settings = Settings.of(context.run_config, cfg)
    K = settings.batches_per_round
    server = make_server(cfg)
    progress = resume(server, settings, cfg_text)
    roster = Roster(cfg, cfg_text, settings.identity, min(settings.round_timeout, 120.0),
                    record=settings.run_dir / NODES)
    wait_for_clients(grid, roster, settings, progress["round"])
    rounds = settings.rounds or total_rounds(cfg, list(roster.num_images.values()), K)
    info("clients %s on nodes %s; %d round(s) of %d batch(es)", roster.order,
         [roster.node_of[c] for c in roster.order], rounds, K)
    with open(settings.run_dir / METRICS, "a") as log, \
            Tracker.of_run(settings.run_dir, progress["round"]) as tracker:
        keeper = ServerKeeper(server, settings, cfg, rounds, log, tracker, progress)
        run_rounds(server, NodeTransport(grid, roster, server, settings, cfg), keeper,
                   progress["round"], rounds, K)
    return finish(grid, server, roster, cfg, settings, keeper.saved)


def track_round(tracker, server, line: dict, rounds: int, cfg) -> None:
    """TensorBoard (collafuse.tracking): the round's losses (the clients' as they reported
    them), the server's lr, each client's bytes; every train.sample_every rounds and at the end
    the server's own hand-overs, one grid per cut (the finished images stay on the nodes)."""
    from ...data import to_uint8
    from ...messages import SampleRequest
    from ...metering import SERVER, client_party

    rnd = line["round"]
    tracker.scalars("loss", {SERVER: line["server_loss"], **{
        client_party(c): v for c, v in line["client_loss"].items()}}, rnd)
    tracker.scalars("lr", {SERVER: server.optimizer.param_groups[0]["lr"]}, rnd)
    tracker.scalars("bytes", {client_party(c): n for c, n in line["bytes"].items()}, rnd)
    every = cfg.train.sample_every
    if not (rnd == rounds or (every and rnd % every == 0)):
        return
    s = cfg.sample
    for cut, cid in sorted({server.cut_of(c): c for c in line["clients"]}.items()):
        partial = server.generate(SampleRequest(client_id=cid, num_samples=s.num_samples,
                                                seed=s.seed, sampler=s.sampler, steps=s.steps))
        tracker.grid(f"handover/s={cut}", to_uint8(partial.x.clamp(-1, 1)), rnd)


def finish(grid: Grid, server, roster: Roster, cfg, settings: Settings, progress: dict) -> dict:
    """Split inference and federated evaluation if asked, and the run's result file (what
    earlier calls added is kept)."""
    path = settings.run_dir / RESULT
    result = json.loads(path.read_text()) if path.is_file() else {}
    result.update({"rounds": progress["round"], "clients": roster.order})
    result.setdefault("samples", {})
    if settings.sample_n > 0:
        result["samples"].update(sample(grid, server, roster, cfg, settings))
    if settings.evaluate_n > 0:
        rows = evaluate(grid, server, roster, cfg, settings)
        result["evaluated"] = {r["client"]: r["num_samples"] for r in rows}
    write_json(path, result)
    return result


def ask_to_finish(grid: Grid, server, roster: Roster, cfg, settings: Settings, n: int,
                  kind: str) -> tuple[dict[int, Message], dict[int, str], dict[int, str]]:
    """Split inference: the server generates the hand-overs of all clients that share a cut in
    one batch (its own stream for ``sample.seed``; the i-th client of the batch gets rows
    i*n..(i+1)*n) and sends each node its own in a ``query.<kind>`` request ("sample",
    "evaluate"); ({node: reply}, {node: why none}, {node: client}), nodes in client order.
    A conditional run's samples are of the classes :func:`sample_labels` names; the request
    carries them, and the guidance scale, only where the server's model takes labels
    (model.condition = "both"), as the in-process client's request does."""
    import torch

    from ...messages import PartialSamples, SampleRequest, encode

    by_cut: dict[int, list[str]] = {}  # clients with cuts of their own get their own hand-over
    for cid in roster.order:
        by_cut.setdefault(server.cut_of(cid), []).append(cid)
    meta = {"config-toml": roster.cfg_text, "seed": cfg.sample.seed, "code-digest": roster.digest}
    contents = {}
    for group in by_cut.values():
        info("%s: generating %d hand-overs for %s", ACTIVITY[kind], n * len(group), group)
        labels, scale = None, 1.0
        if cfg.model.condition == "both":
            labels = torch.cat([sample_labels(cfg, n)] * len(group))
            scale = cfg.sample.guidance_scale
        partial = server.generate(SampleRequest(
            client_id=group[0], num_samples=n * len(group), seed=cfg.sample.seed,
            sampler=cfg.sample.sampler, steps=cfg.sample.steps, labels=labels,
            guidance_scale=scale))
        for i, cid in enumerate(group):
            part = PartialSamples(client_id=cid, x=partial.x[i * n:(i + 1) * n].cpu(),
                                  cut=partial.cut, sampler=partial.sampler, steps=partial.steps)
            contents[roster.node_of[cid]] = transport.pack([encode(part)], meta)
    clients = {roster.node_of[cid]: cid for cid in roster.order}
    replies, failed = Exchange(grid, f"query.{kind}", contents, settings.sample_timeout,
                               kind).collect()
    return replies, failed, clients


def sample(grid: Grid, server, roster: Roster, cfg, settings: Settings) -> dict[str, dict]:
    """Split inference; each node finishes its samples on its disk and answers only where the
    images are (file names and the count)."""
    n = settings.sample_n
    replies, failed, clients = ask_to_finish(grid, server, roster, cfg, settings, n, "sample")
    stored = {}
    for node, cid in clients.items():
        try:
            if node in failed:
                raise RejectedReply(failed[node])
            stored[cid] = accept_sample(replies[node], cid, n)
        except RejectedReply as err:
            warn("sampling: node %s (client %s): %s", node, cid, err)
    info("sampling: %d/%d clients stored their images", len(stored), len(clients))
    return stored


def evaluate(grid: Grid, server, roster: Roster, cfg, settings: Settings) -> list[dict]:
    """Federated evaluation: every node finishes ``evaluate-n`` samples and evaluates them
    against its own images; the checked numbers become results.csv / .json and report.md."""
    from ...evaluation.federated import write_federated_results

    n = settings.evaluate_n
    replies, failed, clients = ask_to_finish(grid, server, roster, cfg, settings, n, "evaluate")
    rows = evaluation_rows(cfg, server, replies, failed, clients, n)
    report = write_federated_results(settings.run_dir, rows)
    info("evaluation: %d/%d clients evaluated their samples; %s", len(rows), len(clients), report)
    return rows


def evaluation_rows(cfg, server, replies: dict[int, Message], failed: dict[int, str],
                    clients: dict[int, str], n: int) -> list[dict]:
    """One row of the sweep's per-client columns per node whose evaluation reply passes
    :func:`.replies.accept_evaluation`; any other reply is left out with a logged reason."""
    from ...evaluation.federated import FIGURES

    rows = []
    for node, cid in clients.items():
        try:
            if node in failed:
                raise RejectedReply(failed[node])
            figures = accept_evaluation(replies[node], cid, n)
        except RejectedReply as err:
            warn("evaluation: node %s (client %s) left out: %s", node, cid, err)
            continue
        rows.append({"protocol": cfg.train.protocol, "seed": cfg.run.seed,
                     "cut_ratio": cfg.diffusion.cut_ratio, "cut_index": server.cut,
                     "client_cut_ratio": cfg.cut_ratio(cid), "client_cut_index": server.cut_of(cid),
                     "client_preset": cfg.preset(cid), "condition": cfg.model.condition,
                     "num_timesteps": cfg.diffusion.num_timesteps, "client": cid,
                     "train_images": figures["num-train"],
                     "holdout_images": figures["num-holdout"], "num_samples": n,
                     **{key: figures[key] for key in FIGURES}})
    return rows


def serve_saved(grid: Grid, context: Context) -> dict:
    """task='sample' / 'evaluate': split inference (and evaluation) from a run's saved server,
    without training."""
    from ...factory import make_server

    cfg = load_run_config(context)
    settings = Settings.of(context.run_config, cfg)
    if not (settings.run_dir / SERVER_STATE).is_file():
        raise ValueError(f"{settings.run_dir}: no {SERVER_STATE} to {settings.task} from")
    server = make_server(cfg)
    progress = resume(server, settings, cfg.to_toml())
    roster = Roster(cfg, cfg.to_toml(), settings.identity, min(settings.sample_timeout, 120.0),
                    record=settings.run_dir / NODES)
    wait_for_clients(grid, roster, settings, progress["round"])
    return finish(grid, server, roster, cfg, settings, progress)


@app.main()
def main(grid: Grid, context: Context) -> None:
    from ...device import enlarge_cpu_kernel_cache

    enlarge_cpu_kernel_cache()  # before any convolution runs, as the collafuse command does
    # Settings.of refuses any other task, before a node is asked anything
    if str(context.run_config.get("task", "train")) in ("sample", "evaluate"):
        serve_saved(grid, context)
    else:
        train(grid, context)
