"""Run configuration: TOML files validated into typed dataclasses.

Every field has a default that says what it means; an unknown section or key, or a value of
the wrong type, is a one-line error. Any field can be overridden as ``section.key=value``
(the value is read as TOML, so ``train.lr=3e-4``, ``data.clients=["DU","HT"]``; a bare word is
taken as a string). This module imports nothing from collafuse but its lists of names
(collafuse.choices, which imports nothing), so every layer may use it.
"""

from __future__ import annotations

import re
import tomllib
import types
import typing
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from .choices import (CHANNELS, CONDITIONS, DIRICHLET_BY, INTENSITIES, LAYOUT_LEVELS,
                      LOSS_WEIGHTINGS, LR_SCHEDULES, PARTITIONS, PREDICTIONS, PRESETS, PROTOCOLS,
                      SAMPLERS, expected)


class ConfigError(ValueError):
    """A config file or override that does not fit the schema (one-line reason)."""


# Fields that say where and how a run computes, not what it computes: two configs that differ
# only here describe the same run (a folder trained on a GPU is sampled or evaluated on a CPU).
RUNTIME_FIELDS = (("run", "device"), ("train", "log_every"), ("train", "sample_every"))
DEVICE_PATTERN = re.compile(r"auto|cpu|cuda(:\d+)?|mps")


@dataclass
class RunConfig:
    seed: int = 0  # the one seed: data split, initial weights and every noise draw
    name: str = "collafuse"  # the run folder's default name under runs/
    # where every party computes: "auto" (cuda if available, else cpu), "cpu", "cuda",
    # "cuda:N" or "mps"; where a run computes is not what it is, so a run folder may be resumed,
    # sampled or evaluated under another value (see RUNTIME_FIELDS)
    device: str = "auto"


@dataclass
class DataConfig:
    path: str = "data/lgg_flair_32.npz"  # npz, image folder, NIfTI file, DICOM or LGG folder
    # how an image folder's levels below data.path are read: "auto" (images in the folder itself
    # -> "flat", one folder deep -> "class", two or more -> "site/class"), "flat", or one word per
    # level joined by "/" from site, class, patient, skip; see collafuse/data/loaders.py
    layout: str = "auto"
    image_size: int = 32  # images are cropped to a square and resized to this
    channels: int = 1  # 1 grayscale, 3 RGB
    intensity: str = "none"  # or "percentile" (per-slice 99.5th -> 255); see data/transforms.py
    partition: str = "site"  # one of choices.PARTITIONS; "label": an image folder's class
    clients: list[str] = field(default_factory=lambda: ["DU", "HT", "FG"])  # sites, by="site"
    num_clients: int = 3  # for partition "patient", "iid" and "dirichlet"
    dirichlet_alpha: float = 0.5  # skew of the "dirichlet" partition (small = more skewed)
    # what the "dirichlet" partition skews over: each client's mix of "site"s (hospitals), or of
    # "label"s (an image folder's classes; Flower Datasets' DirichletPartitioner's way)
    dirichlet_by: str = "site"
    holdout_sites: list[str] = field(default_factory=lambda: ["CS", "EZ"])  # whole hospitals
    holdout_fraction: float = 0.0  # or a seeded fraction of patients, when no sites are given
    # a seeded fraction of each client's own patients kept out of its training: non-members from
    # the same hospital, for the copy-sensitive disclosure and membership checks (0 = none)
    client_holdout_fraction: float = 0.0
    max_images_per_client: int = 0  # 0 = all; a cap for quick runs
    # a partition that leaves a client fewer training images than this is an error (a client
    # with a handful of images trains nothing useful and its KID means nothing); the
    # "dirichlet" partition re-draws its shares until every client has this many
    min_images_per_client: int = 32


@dataclass
class DiffusionConfig:
    num_timesteps: int = 100  # T
    cut_ratio: float = 0.6  # c: the client owns the round(c * T) low-noise steps


@dataclass
class ModelConfig:
    preset: str = "small"  # one of choices.PRESETS (each with a note on what it is for)
    # class-conditional generation: "none"; "both" (client and server models take the label,
    # and the clients send it with every server-owned image); "client" (only the clients'
    # models take it: the server stays unconditional and never sees a label)
    condition: str = "none"
    # the class names, in the order of the model's class indices (public: every party reads
    # the config); an image's class is its data's "label" (an image folder's class), or, for
    # LGG data, "tumour" / "no-tumour" from its tumour mask (collafuse.data.ImageSet.class_names)
    classes: list[str] = field(default_factory=list)
    # the fraction of training labels replaced by "no label", so that the model also learns
    # the unconditional prediction that classifier-free guidance needs (Ho & Salimans 2022)
    label_dropout: float = 0.1
    # what every model predicts: "epsilon" (the noise; the paper's) or "v" (Salimans & Ho 2022),
    # which keeps x0_hat bounded at the noisiest levels (collafuse.diffusion.eps_from_output)
    prediction: str = "epsilon"


@dataclass
class TrainConfig:
    protocol: str = "shared-noise"  # the paper's; choices.PROTOCOLS lists both
    batch_size: int = 64  # images per client per batch
    lr: float = 1e-3  # Adam, for every party
    steps: int = 1000  # batches per client; ignored when epochs > 0
    epochs: int = 0  # passes over the largest client's data; 0 = use steps
    batches_per_round: int = 1  # K: batches a client diffuses per message exchange
    # the client's optimiser steps per batch: the paper's one (on the images of the batch whose t
    # it owns) and local_steps - 1 more, each on local_batch_size fresh images (0 = batch_size)
    # with t drawn from its own levels [0, s); nothing of them leaves the client
    local_steps: int = 1
    local_batch_size: int = 0
    ema_decay: float = 0.0  # EMA of the weights used for sampling; 0 = off
    # the learning rate over the run: "constant", or "cosine" (half a cosine from train.lr down
    # to 0 at train.steps), after a linear warm-up over lr_warmup_steps batches (0 = none)
    lr_schedule: str = "constant"
    lr_warmup_steps: int = 0
    # per-sample loss weights: "uniform" (Ho et al. 2020) or "min-snr": min(SNR_t, gamma) / SNR_t
    # (Hang et al. 2023), gamma = min_snr_gamma; see collafuse.diffusion.loss_weights
    loss_weighting: str = "uniform"
    min_snr_gamma: float = 5.0
    checkpoint_every: int = 50  # rounds between checkpoints
    # rounds between reads of the losses: each read waits for an accelerator to finish its queue;
    # the metrics log still gets a line per round (written at each read and each checkpoint)
    log_every: int = 10
    # rounds between sample grids in TensorBoard (collafuse.tracking): sample.num_samples per
    # client at sample.seed, the same draws each time; 0 = the final grid only. Sampling reads
    # the models and draws from its own streams, so training is the same with or without it
    sample_every: int = 0
    compile: bool = False  # torch.compile the UNets for training (CUDA; the first steps compile)


@dataclass
class SampleConfig:
    num_samples: int = 16  # per client, after training
    seed: int = 0
    sampler: str = "ddpm"  # ancestral; choices.SAMPLERS lists the other (DDIM)
    # model calls per sample, server and client together; 0 = all T. Fewer still split where
    # the full chain does (diffusion.sampling_plan)
    steps: int = 0
    # conditional models only: the class to generate ("" = every class in turn) and the
    # classifier-free guidance scale (1 = the conditional model alone, 0 = unconditional)
    label: str = ""
    guidance_scale: float = 2.0


GRID_KEYS = {"protocol": str, "cut_ratios": list, "seeds": list}  # a [[sweep.grid]] entry's


@dataclass
class SweepConfig:
    # every protocol's cut ratios and training seeds, unless a [[sweep.grid]] entry gives its own
    cut_ratios: list[float] = field(default_factory=lambda: [0.0, 0.2, 0.4, 0.6, 0.8, 1.0])
    # training seeds: each is a run's run.seed (initial weights, data split, training draws) and
    # the seed of its evaluation; intervals over them include seed-to-seed variance
    seeds: list[int] = field(default_factory=list)  # [] = [run.seed]
    protocols: list[str] = field(default_factory=list)  # [] = train.protocol alone
    # [[sweep.grid]] entries {protocol = "...", cut_ratios = [...], seeds = [...]}: a protocol
    # of sweep.protocols with its own cut ratios and/or seeds (unset keys: the ones above)
    grid: list[dict] = field(default_factory=list)


@dataclass
class EvaluationConfig:
    num_samples: int = 100  # generated images per client and cut ratio for KID and disclosure
    kid_subsets: int = 100  # KID: random subsets averaged (clean-fid's default)
    kid_subset_size: int = 1000  # KID: images per subset, clamped to the smaller set
    max_real_images: int = 500  # real images per set (client, hold-out) for KID; 0 = all
    energy: bool = True  # codecarbon energy per party and phase (an estimate without counters)
    trajectory_steps: int = 6  # Figure 2: images recorded along one sample's denoising


@dataclass
class ClientConfig:
    """``[clients.<id>]``: what one client does differently from the run's defaults (unset:
    the run's value). A small hospital may run a tiny UNet over few low-noise steps."""

    cut_ratio: float | None = None  # its own c: it owns the round(c * T) low-noise steps
    preset: str | None = None  # its own UNet preset (the server's is model.preset)


@dataclass
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    data: DataConfig = field(default_factory=DataConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    sweep: SweepConfig = field(default_factory=SweepConfig)
    evaluation: EvaluationConfig = field(default_factory=EvaluationConfig)
    clients: dict[str, ClientConfig] = field(default_factory=dict)  # per-client settings

    def cut_ratio(self, client_id: str) -> float:
        """The client's cut ratio: its own where ``[clients.<id>]`` sets one."""
        own = self.clients.get(client_id)
        return self.diffusion.cut_ratio if own is None or own.cut_ratio is None else own.cut_ratio

    def preset(self, client_id: str) -> str:
        """The client's UNet preset: its own where ``[clients.<id>]`` sets one."""
        own = self.clients.get(client_id)
        return self.model.preset if own is None or own.preset is None else own.preset

    def to_dict(self) -> dict:
        """Every section; ``clients`` only when a client has settings of its own, so a config
        without them reads and writes exactly as before they existed."""
        raw = asdict(self)
        raw["clients"] = {cid: {k: v for k, v in own.items() if v is not None}
                          for cid, own in raw["clients"].items()}
        if not any(raw["clients"].values()):
            del raw["clients"]
        return raw

    def to_toml(self) -> str:
        raw = self.to_dict()
        clients = raw.pop("clients", {})
        return "\n".join([*(_toml_section(name, values) for name, values in raw.items()),
                          *(_toml_section(f"clients.{cid}", own) for cid, own in clients.items())])

    def identity(self) -> dict:
        """to_dict() without RUNTIME_FIELDS: equal for configs of the same run."""
        raw = self.to_dict()
        for section, key in RUNTIME_FIELDS:
            del raw[section][key]
        return raw


def load_config(path: str | Path | None = None, overrides: list[str] = ()) -> Config:
    """Read a TOML file (or start from the defaults), apply overrides, validate."""
    raw: dict = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"{path}: no such config file")
        try:
            raw = tomllib.loads(path.read_text())
        except tomllib.TOMLDecodeError as err:
            raise ConfigError(f"{path}: not valid TOML ({err})") from None
    for item in overrides:
        section, key, value = _parse_override(item)
        if section == "clients":  # clients.<id>.<key>=value
            cid, dot, key = key.partition(".")
            if not dot:
                raise ConfigError(f"--set {item!r}: expected clients.<id>.<key>=value")
            raw.setdefault("clients", {}).setdefault(cid, {})[key] = value
            continue
        raw.setdefault(section, {})[key] = value
    return from_dict(raw, source=str(path) if path else "config")


def from_dict(raw: dict, source: str = "config") -> Config:
    sections = {f.name: f.type for f in fields(Config)}
    hints = typing.get_type_hints(Config)
    built = {}
    for name, values in raw.items():
        if name not in sections:
            raise ConfigError(f"{source}: unknown section [{name}]; expected one of "
                              f"{sorted(sections)}")
        if not isinstance(values, dict):
            raise ConfigError(f"{source}: [{name}] must be a table")
        built[name] = (_build_clients(values, source) if name == "clients"
                       else _build_section(hints[name], values, f"{source}: {name}"))
    cfg = Config(**built)
    _check_values(cfg, source)
    return cfg


def _build_clients(values: dict, source: str) -> dict[str, ClientConfig]:
    """``[clients.<id>]`` tables, each a ClientConfig."""
    clients = {}
    for cid, own in values.items():
        if not isinstance(own, dict):
            raise ConfigError(f"{source}: [clients.{cid}] must be a table")
        clients[cid] = _build_section(ClientConfig, own, f"{source}: clients.{cid}")
    return clients


def _build_section(cls, values: dict, where: str):
    hints = typing.get_type_hints(cls)
    for key, value in values.items():
        if key not in hints:
            raise ConfigError(f"{where}.{key}: unknown key; expected one of {sorted(hints)}")
        if not _matches(value, hints[key]):
            raise ConfigError(f"{where}.{key}: expected {_type_name(hints[key])}, "
                              f"got {value!r}")
    converted = {k: float(v) if isinstance(v, int) and _allows(hints[k], float) else v
                 for k, v in values.items()}
    return cls(**converted)


def _allows(hint, kind) -> bool:
    return hint is kind or (isinstance(hint, types.UnionType) and kind in typing.get_args(hint))


def _matches(value, hint) -> bool:
    if isinstance(hint, types.UnionType):  # X | None: None is not written in TOML
        return any(_matches(value, h) for h in typing.get_args(hint) if h is not type(None))
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if typing.get_origin(hint) is list:
        (item,) = typing.get_args(hint)
        return isinstance(value, list) and all(_matches(v, item) for v in value)
    return isinstance(value, hint)


def _type_name(hint) -> str:
    return str(hint) if typing.get_origin(hint) else hint.__name__


def _check_values(cfg: Config, source: str) -> None:
    """Range checks that a type alone cannot express."""
    checks = [
        (0.0 <= cfg.diffusion.cut_ratio <= 1.0, "diffusion.cut_ratio", "a number in [0, 1]"),
        (all(0.0 <= c <= 1.0 for c in cfg.sweep.cut_ratios), "sweep.cut_ratios",
         "numbers in [0, 1]"),
        (len(set(cfg.sweep.seeds)) == len(cfg.sweep.seeds) and all(
            k >= 0 for k in cfg.sweep.seeds), "sweep.seeds",
         "distinct integers >= 0 ([] = run.seed)"),
        (all(p in PROTOCOLS for p in cfg.sweep.protocols)
         and len(set(cfg.sweep.protocols)) == len(cfg.sweep.protocols), "sweep.protocols",
         f"distinct names from {expected(PROTOCOLS)} ([] = train.protocol)"),
        (cfg.diffusion.num_timesteps >= 1, "diffusion.num_timesteps", "an integer >= 1"),
        (cfg.train.batch_size >= 1, "train.batch_size", "an integer >= 1"),
        (cfg.train.lr > 0, "train.lr", "a positive number"),
        (cfg.train.steps >= 1 or cfg.train.epochs >= 1, "train.steps",
         "an integer >= 1 (or train.epochs >= 1)"),
        (cfg.train.batches_per_round >= 1, "train.batches_per_round", "an integer >= 1"),
        (cfg.train.local_steps >= 1, "train.local_steps", "an integer >= 1"),
        (cfg.train.local_batch_size >= 0, "train.local_batch_size",
         "an integer >= 0 (0: train.batch_size)"),
        (cfg.train.checkpoint_every >= 1, "train.checkpoint_every", "an integer >= 1"),
        (cfg.train.log_every >= 1, "train.log_every", "an integer >= 1"),
        (cfg.train.sample_every >= 0, "train.sample_every", "an integer >= 0 (0: the final "
         "grid only)"),
        (DEVICE_PATTERN.fullmatch(cfg.run.device) is not None, "run.device",
         "'auto', 'cpu', 'cuda', 'cuda:N' or 'mps'"),
        (0.0 <= cfg.train.ema_decay < 1.0, "train.ema_decay", "a number in [0, 1)"),
        (cfg.train.lr_schedule in LR_SCHEDULES, "train.lr_schedule", expected(LR_SCHEDULES)),
        (cfg.train.lr_schedule == "constant" or cfg.train.epochs == 0, "train.lr_schedule",
         "'constant' with train.epochs (a cosine decays over train.steps)"),
        (cfg.train.lr_warmup_steps >= 0, "train.lr_warmup_steps", "an integer >= 0"),
        (cfg.train.loss_weighting in LOSS_WEIGHTINGS, "train.loss_weighting",
         expected(LOSS_WEIGHTINGS)),
        (cfg.train.min_snr_gamma > 0, "train.min_snr_gamma", "a positive number"),
        (cfg.train.protocol in PROTOCOLS, "train.protocol", expected(PROTOCOLS)),
        (0.0 <= cfg.data.client_holdout_fraction < 1.0, "data.client_holdout_fraction",
         "a number in [0, 1)"),
        (cfg.data.channels in CHANNELS, "data.channels", expected(CHANNELS)),
        (cfg.data.layout in ("auto", "flat") or all(
            w in LAYOUT_LEVELS for w in cfg.data.layout.split("/")),
         "data.layout", "'auto', 'flat' or folder levels such as 'site/class' (site, class, patient, skip)"),
        (cfg.data.partition in PARTITIONS, "data.partition", expected(PARTITIONS)),
        (cfg.data.dirichlet_by in DIRICHLET_BY, "data.dirichlet_by", expected(DIRICHLET_BY)),
        (cfg.data.dirichlet_alpha > 0, "data.dirichlet_alpha", "a positive number"),
        (cfg.data.min_images_per_client >= 1, "data.min_images_per_client", "an integer >= 1"),
        (cfg.data.max_images_per_client >= 0, "data.max_images_per_client",
         "an integer >= 0 (0: all)"),
        (cfg.data.intensity in INTENSITIES, "data.intensity", expected(INTENSITIES)),
        (cfg.model.preset in PRESETS, "model.preset", expected(PRESETS)),
        (cfg.data.image_size >= 8, "data.image_size", "an integer >= 8"),
        (cfg.sample.num_samples >= 1, "sample.num_samples", "an integer >= 1"),
        (cfg.sample.sampler in SAMPLERS, "sample.sampler", expected(SAMPLERS)),
        (cfg.sample.steps == 0 or cfg.sample.steps >= 2, "sample.steps",
         "0 (every step) or an integer >= 2"),
        (cfg.model.condition in CONDITIONS, "model.condition", expected(CONDITIONS)),
        (cfg.model.condition == "none" or (len(cfg.model.classes) >= 2 and len(
            set(cfg.model.classes)) == len(cfg.model.classes)), "model.classes",
         "two or more distinct class names when model.condition is not 'none'"),
        (0.0 <= cfg.model.label_dropout < 1.0, "model.label_dropout", "a number in [0, 1)"),
        (cfg.model.prediction in PREDICTIONS, "model.prediction", expected(PREDICTIONS)),
        (cfg.sample.label == "" or cfg.sample.label in cfg.model.classes, "sample.label",
         "'' or one of model.classes"),
        (0.0 <= cfg.sample.guidance_scale <= 100.0, "sample.guidance_scale",
         "a number in [0, 100]"),
        (cfg.evaluation.num_samples >= 2, "evaluation.num_samples", "an integer >= 2"),
        (cfg.evaluation.kid_subsets >= 1, "evaluation.kid_subsets", "an integer >= 1"),
        (cfg.evaluation.kid_subset_size >= 2, "evaluation.kid_subset_size", "an integer >= 2"),
        (cfg.evaluation.max_real_images >= 0, "evaluation.max_real_images", "an integer >= 0"),
        (cfg.evaluation.trajectory_steps >= 2, "evaluation.trajectory_steps", "an integer >= 2"),
    ]
    for ok, name, wanted in checks:
        if not ok:
            value = _get(cfg, name)
            raise ConfigError(f"{source}: {name}: expected {wanted}, got {value!r}")
    _check_grid(cfg, source)
    for cid, own in cfg.clients.items():
        if own.cut_ratio is not None and not 0.0 <= own.cut_ratio <= 1.0:
            raise ConfigError(f"{source}: clients.{cid}.cut_ratio: expected a number in [0, 1], "
                              f"got {own.cut_ratio!r}")
        if own.preset is not None and own.preset not in PRESETS:
            raise ConfigError(f"{source}: clients.{cid}.preset: expected {expected(PRESETS)}, "
                              f"got {own.preset!r}")
    if cfg.data.partition == "site" and (unknown := sorted(set(cfg.clients) - set(cfg.data.clients))):
        raise ConfigError(f"{source}: [clients.{unknown[0]}]: not one of data.clients "
                          f"{cfg.data.clients}")


def _check_grid(cfg: Config, source: str) -> None:
    """Each [[sweep.grid]] entry names one protocol of the sweep, once, with valid lists."""
    protocols = cfg.sweep.protocols or [cfg.train.protocol]
    seen = set()
    for i, entry in enumerate(cfg.sweep.grid):
        where = f"{source}: sweep.grid[{i}]"
        for key, value in entry.items():
            if key not in GRID_KEYS:
                raise ConfigError(f"{where}.{key}: unknown key; expected one of {sorted(GRID_KEYS)}")
            if not isinstance(value, GRID_KEYS[key]):
                raise ConfigError(f"{where}.{key}: expected {GRID_KEYS[key].__name__}, got {value!r}")
        protocol = entry.get("protocol")
        if protocol not in protocols or protocol in seen:
            raise ConfigError(f"{where}.protocol: expected one of sweep.protocols {protocols} not "
                              f"named by another entry, got {protocol!r}")
        seen.add(protocol)
        cuts, seeds = entry.get("cut_ratios", [0.0]), entry.get("seeds", [0])
        if not cuts or not all(isinstance(c, (int, float)) and not isinstance(c, bool)
                               and 0.0 <= c <= 1.0 for c in cuts):
            raise ConfigError(f"{where}.cut_ratios: expected numbers in [0, 1], got {cuts!r}")
        if not seeds or len(set(seeds)) != len(seeds) or not all(
                isinstance(k, int) and not isinstance(k, bool) and k >= 0 for k in seeds):
            raise ConfigError(f"{where}.seeds: expected distinct integers >= 0, got {seeds!r}")


def _get(cfg: Config, dotted: str):
    section, key = dotted.split(".")
    return getattr(getattr(cfg, section), key)


def _parse_override(item: str) -> tuple[str, str, object]:
    name, sep, text = item.partition("=")
    section, dot, key = name.strip().partition(".")
    if not sep or not dot or not key:
        raise ConfigError(f"--set {item!r}: expected section.key=value")
    try:
        value = tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        value = text  # a bare word such as noisy-data is a string
    return section, key.strip(), value


def _toml_section(name: str, values: dict) -> str:
    lines = [f"[{name}]"]
    for key, value in values.items():
        lines.append(f"{key} = {_toml_value(value)}")
    return "\n".join(lines) + "\n"


def _toml_value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, dict):  # an inline table (a [[sweep.grid]] entry)
        return "{" + ", ".join(f"{k} = {_toml_value(v)}" for k, v in value.items()) + "}"
    return repr(value)
