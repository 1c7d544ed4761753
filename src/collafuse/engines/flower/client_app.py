"""CollaFuse ClientApp: a thin Flower adapter over ``collafuse.client.Client``.

Every Flower message starts a fresh ClientApp process on the node, so the Client lives on
node-local disk between messages: ``<state-dir>/client.pt`` (model, optimiser, EMA, RNG,
data cursor; written atomically) next to ``<state-dir>/config.toml`` (the run's config, which
the server sends with every message; a different config on a later message is refused) and
``<state-dir>/<client-id>.key`` (the client's secret, made from os.urandom on first use; it
seeds the noisy-data view noise and never leaves the node).

Message types handled:

- ``query.hello``: check the config, reply the client id and image count (no model is built:
  the model code is what makes a fresh ClientApp process slow, so hello stays light).
- ``train``: build (first time) or load the Client; ``Client.train_round(K)``; save the state;
  reply the K encoded messages.
- ``query.sample``: the server's ``PartialSamples`` -> ``Client.finish_samples`` -> PNG grid
  and npz under ``<out-dir>``, on the node's own disk; only file names and sizes go back.

``node_config`` (``flower-supernode --node-config``): ``client-id``, ``data-path`` (the
node's images, any format ``collafuse.data.load_images`` reads; ``cfg.data.intensity`` and
``cfg.data.max_images_per_client`` are applied here), ``state-dir``, optional ``out-dir``
(default ``<state-dir>/samples``), optional ``device`` (where this node computes: auto, cpu,
cuda, cuda:N, mps; default auto, the node's own GPU if it has one, whatever ``run.device`` the
server computes on: messages travel as host arrays). In the simulation engine nodes have only
``partition-id``; the run config's ``sim-clients`` (comma-separated ids, in order) and
``sim-state-dir`` then name the client, and its images are its partition of
``cfg.data.path`` exactly as the in-process engine makes it.
"""

from __future__ import annotations

import json
from pathlib import Path

from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from . import transport
from ...state import write_text
from .common import write_json, info, node_setting

app = ClientApp()

STATE_FILE = "client.pt"
CONFIG_FILE = "config.toml"
PROGRESS_FILE = "progress.json"


def _identity(context: Context) -> tuple[str, Path, Path | None, Path]:
    """(client-id, state-dir, data-path or None for 'my partition of cfg.data.path', out-dir)."""
    nc = context.node_config
    if "client-id" in nc:
        cid = str(nc["client-id"])
        state_dir = Path(str(node_setting(nc, "state-dir")))
        data = nc.get("data-path")
        data_path = Path(str(data)) if data not in (None, "", "partition") else None
    else:  # simulation engine: virtual nodes only know their partition id
        ids = [s.strip() for s in str(context.run_config.get("sim-clients", "")).split(",") if s.strip()]
        pid = int(node_setting(nc, "partition-id"))
        if pid >= len(ids):
            raise ValueError(f"simulation node {pid}: run config sim-clients={ids} names too few clients")
        cid = ids[pid]
        state_dir = Path(str(context.run_config.get("sim-state-dir", "runs/flower-sim"))) / cid
        data_path = None
    out_dir = Path(str(nc.get("out-dir") or state_dir / "samples"))
    return cid, state_dir, data_path, out_dir


def _config_and_identity(msg: Message, context: Context):
    """The run's config (as the server sent it) and this node's identity; checks the config
    against the one this node's state was made with, and records it on first contact.

    Light on purpose (no model code is imported): every message starts a fresh process."""
    from ...config import ConfigError
    from .server_app import config_from_text

    _, meta = transport.unpack(msg.content)
    cfg_text = str(meta["config-toml"])
    cfg = config_from_text(cfg_text)
    cid, state_dir, data_path, out_dir = _identity(context)
    state_dir.mkdir(parents=True, exist_ok=True)
    cfg_file = state_dir / CONFIG_FILE
    if cfg_file.is_file():
        if cfg_file.read_text() != cfg_text:
            raise ConfigError(f"{cfg_file}: this node's state belongs to a run with another config; "
                              "use a fresh state-dir for a new run")
    else:
        write_text(cfg_file, cfg_text)
    progress = {"round": 0}
    if (state_dir / PROGRESS_FILE).is_file():
        progress = json.loads((state_dir / PROGRESS_FILE).read_text())
    return cfg, meta, cid, state_dir, data_path, out_dir, progress


def _images(cfg, cid: str, data_path: Path | None):
    """The node's training images, exactly as the in-process engine would give them."""
    if data_path is None:
        from ...factory import load_client_data

        parts = load_client_data(cfg).clients
        if cid not in parts:
            raise ValueError(f"client {cid!r} is not a partition of {cfg.data.path} (have {sorted(parts)})")
        return parts[cid]
    from ...data import load_images, normalise_intensity, split_holdout

    images = load_images(data_path, image_size=cfg.data.image_size, channels=cfg.data.channels)
    images.images = normalise_intensity(images.images, cfg.data.intensity)
    if cfg.data.client_holdout_fraction:
        images, _ = split_holdout(images, holdout_fraction=cfg.data.client_holdout_fraction,
                                  seed=cfg.run.seed)
    if cfg.data.max_images_per_client:
        images = images.subset(range(min(len(images), cfg.data.max_images_per_client)))
    return images


def _load_client(msg: Message, context: Context):
    """The node's Client: made on first use, else restored from its state folder."""
    from ...factory import client_secret, make_client

    cfg, meta, cid, state_dir, data_path, out_dir, progress = _config_and_identity(msg, context)
    # The secret stays on this node's disk; the server never sees it or anything it is made from.
    device = str(context.node_config.get("device") or "auto")  # the node's choice, not the server's
    client = make_client(cfg, cid, _images(cfg, cid, data_path), client_secret(state_dir, cid),
                         device=device)
    if (state_dir / STATE_FILE).is_file():
        client.load(state_dir / STATE_FILE)
    return client, meta, cid, state_dir, out_dir, progress


@app.query("hello")
def hello(msg: Message, context: Context) -> Message:
    """Who is this node and how many images does it hold. No model is built here (the model
    code is what makes a ClientApp process slow to start); the first ``train`` builds it."""
    cfg, _, cid, _, data_path, _, progress = _config_and_identity(msg, context)
    n = len(_images(cfg, cid, data_path))
    info("hello: client %s, %d images, at round %d", cid, n, progress["round"])
    return Message(content=transport.pack([], {"client-id": cid, "num-images": n,
                                               "round": int(progress["round"])}), reply_to=msg)


@app.train()
def train(msg: Message, context: Context) -> Message:
    from ...messages import encode

    client, meta, cid, state_dir, _, progress = _load_client(msg, context)
    if not client.resumable:
        from ...state import StateError

        raise StateError(f"{state_dir / STATE_FILE}: saved on another kind of device than "
                         f"{client.device}; keep the node's device for the whole run")
    rnd, k = int(meta["round"]), int(meta["batches"])
    out = client.train_round(k)
    client.save(state_dir / STATE_FILE)
    progress = {"round": rnd, "client-steps": client.steps}
    write_json(state_dir / PROGRESS_FILE, progress)
    encoded = [encode(m) for m in out]
    info("train: client %s round %d, %d batches, %d bytes out", cid, rnd, k, transport.nbytes(encoded))
    return Message(content=transport.pack(encoded, {"client-id": cid, "round": rnd,
                                                    "client-loss": float(client.last_loss or 0.0)}),
                   reply_to=msg)


@app.query("sample")
def sample(msg: Message, context: Context) -> Message:
    from ...messages import MessageError, PartialSamples, decode
    from ..local import save_samples

    client, meta, cid, _, out_dir, _ = _load_client(msg, context)
    arrays, _ = transport.unpack(msg.content)
    if len(arrays) != 1:
        raise MessageError(f"sample request for {cid}: expected one partial-samples message, got {len(arrays)}")
    partial = decode(arrays[0])
    if not isinstance(partial, PartialSamples):
        raise MessageError(f"sample request for {cid}: expected partial-samples, got {partial.kind}")
    seed = int(meta.get("seed", 0))
    images = client.finish_samples(partial, seed).cpu()
    png, npz = save_samples(out_dir, cid, images, partial.x)
    info("sample: client %s wrote %d images to %s", cid, len(images), out_dir)
    return Message(content=transport.pack([], {"client-id": cid, "png": str(png), "npz": str(npz),
                                               "num-images": len(images)}), reply_to=msg)
