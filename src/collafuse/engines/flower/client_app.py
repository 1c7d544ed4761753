"""CollaFuse ClientApp: a thin Flower adapter over ``collafuse.client.Client``.

Every Flower message starts a fresh ClientApp process on the node, so the node keeps what it
needs on its own disk, in its ``state-dir``:

- ``client.pt``: the Client's state (model, optimiser, EMA, RNG, data cursor), the last round
  it trained and its replies to the last two rounds, in one atomic file. A round asked again
  (the server restarted, a reply was lost, a message came twice) is answered from there and
  never trained twice; a round older than those is refused.
- ``config.toml``: the run's config as the server first sent it; another config later is
  refused.
- ``<client-id>.key``: the client's secret, made from os.urandom on first use; it seeds the
  noisy-data view noise and never leaves the node.
- ``images.npz`` / ``holdout.npz`` / ``images.json``: the node's training images and its own
  held-out patients as the factory makes them (``load_node_data``: the run's size, layout,
  intensity, data.client_holdout_fraction, data.min_images_per_client), cached so that a
  message does not re-read the source data.

Message types handled (each checks the request and the node's policy before anything else):

- ``query.hello``: the client id, image count and round; no model code is imported, since a
  fresh ClientApp process pays for every import.
- ``train``: build or load the Client; ``Client.train_round(K)``; save state and reply; reply
  the K encoded messages and the client's loss.
- ``query.sample``: the server's ``PartialSamples`` -> ``Client.finish_samples`` -> PNG grid
  and npz under ``out-dir`` on the node's disk; only the file names and the count go back.
- ``query.evaluate``: the same finishing, then the samples are evaluated here against the
  node's own training images and held-out patients (KID, copies; Inception features cached in
  ``state-dir/inception``); only the numbers go back, no image.

``node_config`` (``flower-supernode --node-config``, docs/deployment.md): ``client-id``,
``data-path``, ``state-dir``, optional ``out-dir`` and ``device``, and the hospital's policy:
``allow-protocols`` (comma-separated; default both), ``min-cut-ratio`` (default 0),
``max-images-per-round`` (K x batch size; default 0 = no limit), ``serve-sampling`` and
``serve-evaluation`` (default true), ``code-sha256`` (run only this CollaFuse code; default:
no pin). A request outside the
policy gets a refusal (``refused``: the reason), not data. In the simulation engine nodes have
only ``partition-id``; the run config's ``sim-clients`` (comma-separated ids, in order) then
names the client, its images are its partition of ``cfg.data.path`` exactly as the in-process
engine makes them, and its state-dir is ``sim-state-dir/<id>`` (default
``<run-dir>/sim-nodes/<id>``).
"""

from __future__ import annotations

import fcntl
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from . import transport
from ...choices import PROTOCOLS
from ...state import write_text
from .common import code_digest, config_from_text, info, node_setting, sample_labels

app = ClientApp()

STATE_FILE = "client.pt"
CONFIG_FILE = "config.toml"
IMAGES_CACHE, HOLDOUT_CACHE, IMAGES_KEY = "images.npz", "holdout.npz", "images.json"
KEEP_REPLIES = 2  # a pipelining server may re-ask the round before the last after a crash
MAX_SAMPLE_IMAGES = 4096
MAX_SAMPLE_BYTES = 2**30  # one hand-over array

# what the server's requests hold, exactly
REQUESTS = {
    "query.hello": {"config-toml": str, "round": int, "code-digest": str},
    "train": {"config-toml": str, "round": int, "batches": int, "code-digest": str},
    "query.sample": {"config-toml": str, "seed": int, "code-digest": str},
    "query.evaluate": {"config-toml": str, "seed": int, "code-digest": str},
}


class RequestError(ValueError):
    """A request from the server that this node does not act on (one-line reason)."""


def _truthy(value) -> bool:
    return str(value).strip().lower() in ("1", "true", "yes", "on")


@dataclass
class Policy:
    """What this hospital accepts, from its own ``node_config``: the server cannot change it."""

    protocols: tuple[str, ...] = PROTOCOLS
    min_cut_ratio: float = 0.0
    max_images_per_round: int = 0
    serve_sampling: bool = True
    serve_evaluation: bool = True
    code_sha256: str = ""

    @classmethod
    def of(cls, nc: dict) -> "Policy":
        protocols = tuple(p.strip() for p in str(nc.get("allow-protocols", ",".join(PROTOCOLS)))
                          .split(",") if p.strip())
        unknown = sorted(set(protocols) - set(PROTOCOLS))
        if unknown or not protocols:
            raise ValueError(f"node_config allow-protocols: {unknown or 'empty'}; choose from "
                             f"{PROTOCOLS}")
        return cls(protocols, float(nc.get("min-cut-ratio", 0.0)),
                   int(nc.get("max-images-per-round", 0)),
                   _truthy(nc.get("serve-sampling", True)),
                   _truthy(nc.get("serve-evaluation", True)), str(nc.get("code-sha256", "")))

    def refusal(self, cfg, client_id: str, server_digest: str, batches: int = 0,
                serve: str = "") -> str | None:
        """Why this node declines the request (None: it accepts); ``serve``: "sampling" or
        "evaluation" for those requests."""
        own = code_digest()
        if self.code_sha256 and own != self.code_sha256:
            return f"this node's CollaFuse code is {own[:12]}, its policy pins {self.code_sha256[:12]}"
        if server_digest != own:
            return (f"the server runs CollaFuse code {server_digest[:12]}, this node "
                    f"{own[:12]}; install the same version on both")
        if cfg.train.protocol not in self.protocols:
            return f"protocol {cfg.train.protocol!r} not allowed (allowed: {', '.join(self.protocols)})"
        if cfg.cut_ratio(client_id) < self.min_cut_ratio:  # this client's own, where it has one
            return (f"cut ratio {cfg.cut_ratio(client_id)} below this node's minimum "
                    f"{self.min_cut_ratio}")
        images = batches * cfg.train.batch_size
        if self.max_images_per_round and images > self.max_images_per_round:
            return f"{images} images per round asked, this node allows {self.max_images_per_round}"
        if serve and not getattr(self, f"serve_{serve}"):
            return f"this node does not serve {serve} requests"
        return None


@dataclass
class Node:
    """Who this node is and where it keeps things (from node_config, never from the server)."""

    client_id: str
    state_dir: Path
    data_path: Path | None  # None: my partition of cfg.data.path (simulation engine)
    out_dir: Path
    policy: Policy

    @classmethod
    def of(cls, context: Context) -> "Node":
        nc, rc = context.node_config, context.run_config
        if "client-id" in nc:
            cid = str(nc["client-id"])
            state_dir = Path(str(node_setting(nc, "state-dir")))
            data = nc.get("data-path")
            data_path = Path(str(data)) if data not in (None, "", "partition") else None
        else:  # simulation engine: virtual nodes only know their partition id
            ids = [s.strip() for s in str(rc.get("sim-clients", "")).split(",") if s.strip()]
            pid = int(node_setting(nc, "partition-id"))
            if pid >= len(ids):
                raise ValueError(f"simulation node {pid}: run config sim-clients={ids} names too few clients")
            cid = ids[pid]
            root = str(rc.get("sim-state-dir", "")) or str(Path(str(rc["run-dir"])) / "sim-nodes")
            state_dir = Path(root).expanduser().resolve() / cid
            data_path = None
        out_dir = Path(str(nc.get("out-dir") or state_dir / "samples"))
        return cls(cid, state_dir, data_path, out_dir, Policy.of(nc))

    def refuse(self, msg: Message, reason: str) -> Message:
        info("refused %s: %s", msg.metadata.message_type, reason)
        return Message(content=transport.pack([], {"client-id": self.client_id, "refused": reason}),
                       reply_to=msg)


def _request(msg: Message, max_count: int = 0, max_array_bytes: int = 4096):
    """The request's (arrays, metadata, config), checked: exactly the expected keys and types."""
    schema = REQUESTS[msg.metadata.message_type]
    try:
        arrays, meta = transport.unpack(msg.content, max_count, max_array_bytes)
    except transport.TransportError as err:
        raise RequestError(f"malformed request: {err}") from None
    bad = [k for k, kind in schema.items()
           if not isinstance(meta.get(k), kind) or isinstance(meta.get(k), bool)]
    if set(meta) != set(schema) or bad:
        raise RequestError(f"request keys {sorted(meta)} (bad: {bad}), expected {sorted(schema)}")
    if meta.get("round", 0) < 0 or not 1 <= meta.get("batches", 1) <= 10_000:
        raise RequestError(f"round {meta.get('round')} / batches {meta.get('batches')} out of range")
    return arrays, meta, config_from_text(meta["config-toml"])


def _record_config(node: Node, cfg_text: str) -> None:
    """The run's config, as first sent; a node's state belongs to one run."""
    from ...config import ConfigError

    node.state_dir.mkdir(parents=True, exist_ok=True)
    cfg_file = node.state_dir / CONFIG_FILE
    if not cfg_file.is_file():
        write_text(cfg_file, cfg_text)
    elif cfg_file.read_text() != cfg_text:
        raise ConfigError(f"{cfg_file}: this node's state belongs to a run with another config; "
                          "use a fresh state-dir for a new run")


def _source_key(cfg, node: Node) -> str:
    """What the cached images depend on: the data settings, the seed and the source file."""
    source = node.data_path
    stamp = [str(source), source.stat().st_size, source.stat().st_mtime_ns] if source else ["partition"]
    text = json.dumps([cfg.to_dict()["data"], cfg.run.seed, node.client_id, stamp], sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()


def _cache_index(node: Node, key: str) -> dict | None:
    """The cached images' index ({"key", "num-images"}) when the cache is there and current."""
    key_file = node.state_dir / IMAGES_KEY
    if not (key_file.is_file() and (node.state_dir / IMAGES_CACHE).is_file()):
        return None
    index = json.loads(key_file.read_text())
    return index if index["key"] == key else None


def _num_images(cfg, node: Node) -> int:
    """The image count, from the cache's index when it is current (no torch import)."""
    index = _cache_index(node, _source_key(cfg, node))
    return int(index["num-images"]) if index else len(_node_data(cfg, node)[0])


def _node_data(cfg, node: Node):
    """The node's (training images, own held-out patients) as the factory makes them (its
    data-path, or its partition of data.path in the simulation engine), from the node's cache
    when current, else made and cached."""
    from ...data import load_images, save_images

    key = _source_key(cfg, node)
    train_file, held_file = node.state_dir / IMAGES_CACHE, node.state_dir / HOLDOUT_CACHE
    if _cache_index(node, key) and held_file.is_file():
        return load_images(train_file), load_images(held_file)
    if node.data_path is None:
        from ...factory import load_client_data

        data = load_client_data(cfg)
        if node.client_id not in data.clients:
            raise ValueError(f"client {node.client_id!r} is not a partition of {cfg.data.path} "
                             f"(have {sorted(data.clients)})")
        train, held = data.clients[node.client_id], data.client_holdout[node.client_id]
    else:
        from ...factory import load_node_data

        train, held = load_node_data(cfg, node.client_id, node.data_path)
    save_images(train, train_file)
    save_images(held, held_file)
    write_text(node.state_dir / IMAGES_KEY, json.dumps({"key": key, "num-images": len(train)}))
    return train, held


def _client(cfg, node: Node, context: Context):
    """The node's Client, made afresh (its state is loaded by the caller)."""
    from ...device import enlarge_cpu_kernel_cache
    from ...factory import client_secret, make_client

    enlarge_cpu_kernel_cache()  # before any convolution runs, as the collafuse command does
    # the secret stays on this node's disk; the server never sees it or anything it is made from
    device = str(context.node_config.get("device") or "auto")  # the node's choice, not the server's
    return make_client(cfg, node.client_id, _node_data(cfg, node)[0],
                       client_secret(node.state_dir, node.client_id), device=device)


@app.query("hello")
def hello(msg: Message, context: Context) -> Message:
    node = Node.of(context)
    _, meta, cfg = _request(msg)
    if reason := node.policy.refusal(cfg, node.client_id, meta["code-digest"]):
        return node.refuse(msg, reason)
    _record_config(node, meta["config-toml"])
    n = _num_images(cfg, node)
    done = 0
    if (node.state_dir / STATE_FILE).is_file():
        from ...state import load_state

        done = int(load_state(node.state_dir / STATE_FILE)["round"])
    info("hello: client %s, %d images, at round %d", node.client_id, n, done)
    return Message(content=transport.pack([], {"client-id": node.client_id, "num-images": n,
                                               "round": done, "code-digest": code_digest()}),
                   reply_to=msg)


@app.train()
def train(msg: Message, context: Context) -> Message:
    node = Node.of(context)
    _, meta, cfg = _request(msg)
    if reason := node.policy.refusal(cfg, node.client_id, meta["code-digest"],
                                     batches=meta["batches"]):
        return node.refuse(msg, reason)
    _record_config(node, meta["config-toml"])
    # one training at a time per node: the same round may arrive twice at once (a server
    # restarted while the first request was being served)
    with open(node.state_dir / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        return _train(msg, node, cfg, meta["round"], meta["batches"], context)


def _train(msg: Message, node: Node, cfg, rnd: int, k: int, context: Context) -> Message:
    import torch

    from ...messages import encode
    from ...state import StateError, load_state, save_state

    path = node.state_dir / STATE_FILE
    state = load_state(path) if path.is_file() else {"round": 0, "replies": {}, "losses": {}}
    if rnd in state["replies"]:  # asked again: the same answer, no second training
        encoded = [{name: t.numpy() for name, t in m.items()} for m in state["replies"][rnd]]
        info("train: client %s round %d asked again; resending the stored reply", node.client_id, rnd)
        return _train_reply(msg, node, rnd, encoded, state["losses"][rnd])
    if rnd <= state["round"]:
        raise RequestError(f"round {rnd} asked, this node has trained up to round "
                           f"{state['round']} and keeps replies for {sorted(state['replies'])}")
    client = _client(cfg, node, context)
    if "client" in state:
        client.load_state_dict(state["client"])
        if not client.resumable:
            raise StateError(f"{path}: saved on another kind of device than {client.device}; "
                             "keep the node's device for the whole run")
    encoded = [encode(m) for m in client.train_round(k)]
    loss = float(client.last_loss or 0.0)
    replies = {r: state["replies"][r] for r in sorted(state["replies"])[1 - KEEP_REPLIES:]}
    losses = {r: state["losses"][r] for r in replies}
    replies[rnd] = [{name: torch.from_numpy(a) for name, a in m.items()} for m in encoded]
    losses[rnd] = loss
    save_state({"client": client.state_dict(), "round": rnd, "replies": replies,
                "losses": losses}, path)
    info("train: client %s round %d, %d batches, %d bytes out", node.client_id, rnd, k,
         transport.nbytes(encoded))
    return _train_reply(msg, node, rnd, encoded, loss)


def _train_reply(msg: Message, node: Node, rnd: int, encoded: list, loss: float) -> Message:
    return Message(content=transport.pack(encoded, {"client-id": node.client_id, "round": rnd,
                                                    "client-loss": loss}), reply_to=msg)


@app.query("sample")
def sample(msg: Message, context: Context) -> Message:
    from ..local import save_samples

    node = Node.of(context)
    arrays, meta, cfg = _request(msg, 1, MAX_SAMPLE_BYTES)
    if reason := node.policy.refusal(cfg, node.client_id, meta["code-digest"], serve="sampling"):
        return node.refuse(msg, reason)
    images, partial = _finish_samples(msg, arrays, node, cfg, meta, context)
    labels = sample_labels(cfg, len(images))
    names = None if labels is None else np.array(cfg.model.classes)[labels.numpy()]
    png, npz = save_samples(node.out_dir, node.client_id, images, partial.x, names)
    info("sample: client %s wrote %d images to %s", node.client_id, len(images), node.out_dir)
    # file names only: where the node keeps its files is none of the server's business
    return Message(content=transport.pack([], {"client-id": node.client_id, "png": png.name,
                                               "npz": npz.name, "num-images": len(images)}),
                   reply_to=msg)


@app.query("evaluate")
def evaluate(msg: Message, context: Context) -> Message:
    """Finish the server's hand-overs and evaluate them here, against this hospital's own
    images (:func:`collafuse.evaluation.federated.evaluate_on_node`); numbers only go back."""
    from ...evaluation.federated import evaluate_on_node

    node = Node.of(context)
    arrays, meta, cfg = _request(msg, 1, MAX_SAMPLE_BYTES)
    if reason := node.policy.refusal(cfg, node.client_id, meta["code-digest"], serve="evaluation"):
        return node.refuse(msg, reason)
    images, partial = _finish_samples(msg, arrays, node, cfg, meta, context)
    train, held = _node_data(cfg, node)
    figures = evaluate_on_node(images, partial.x.cpu(), train, held, cfg.evaluation,
                               meta["seed"], node.state_dir / "inception",
                               str(context.node_config.get("device") or "cpu"))
    info("evaluate: client %s, %d samples: KID hold-out %.4f, train %.4f", node.client_id,
         len(images), figures["kid_holdout"], figures["kid_train"])
    return Message(content=transport.pack([], {
        "client-id": node.client_id, "num-samples": len(images), "num-train": len(train),
        "num-holdout": len(held), **figures}), reply_to=msg)


def _finish_samples(msg: Message, arrays: list, node: Node, cfg, meta: dict, context: Context):
    """(finished images on the host, the server's PartialSamples) of a sample or evaluate
    request, with this node's latest trained client; a conditional run's samples of the
    classes the config names (:func:`.common.sample_labels`), guided at sample.guidance_scale
    on this node's steps."""
    from ...messages import PartialSamples, decode
    from ...state import load_state

    _record_config(node, meta["config-toml"])
    partial = decode(arrays[0]) if len(arrays) == 1 else None
    if not isinstance(partial, PartialSamples) or partial.batch_size > MAX_SAMPLE_IMAGES:
        raise RequestError(f"{msg.metadata.message_type} request: expected one partial-samples "
                           f"message of at most {MAX_SAMPLE_IMAGES} images")
    client = _client(cfg, node, context)
    if (node.state_dir / STATE_FILE).is_file():
        client.load_state_dict(load_state(node.state_dir / STATE_FILE)["client"])
    labels = sample_labels(cfg, partial.batch_size)
    images = client.finish_samples(partial, meta["seed"], labels=labels,
                                   guidance_scale=cfg.sample.guidance_scale)
    return images.cpu(), partial
