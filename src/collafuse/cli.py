"""The ``collafuse`` command line: thin wrappers over the library."""

from __future__ import annotations

import argparse
import os
import sys
import warnings
import zipfile
from pathlib import Path

from .choices import CHANNELS, SAMPLERS
from .config import load_config

# Bad input, reported as "collafuse: error: <one line>" with exit status 2: our own errors
# (ConfigError, DataError, StateError, MessageError, ...) are ValueErrors; files that cannot be
# read raise OSError, EOFError or zipfile.BadZipFile.
INPUT_ERRORS = (ValueError, OSError, EOFError, zipfile.BadZipFile)
PREVIEW_SIZE = 64  # data inspect: the side mixed-size images are resized to without --size


def main(argv: list[str] | None = None) -> int:
    """Run one command. No input ends in a traceback: bad input is one line on stderr and exit
    status 2 (argparse's usage errors too); anything else is a bug, reported in one line with
    exit status 1 (set COLLAFUSE_TRACEBACK=1 to see the traceback)."""
    parser = _parser()
    args = parser.parse_args(argv)
    from .device import enlarge_cpu_kernel_cache

    enlarge_cpu_kernel_cache()  # before any convolution runs
    previous = warnings.showwarning
    warnings.showwarning = _one_line_warnings(previous)
    try:
        return args.func(args) or 0
    except KeyboardInterrupt:
        print("interrupted; the last checkpoint is kept: continue with --resume "
              "(a sweep: run the same command again)", file=sys.stderr)
        return 130
    except INPUT_ERRORS as err:
        print(f"collafuse: error: {_one_line(err)}", file=sys.stderr)
        return 2
    except ImportError as err:  # a package missing here; the messages of ours name the install
        print(f"collafuse: error: {_one_line(err)}", file=sys.stderr)
        return 2
    except Exception as err:  # a bug, not bad input: still one line, the traceback on request
        if os.environ.get("COLLAFUSE_TRACEBACK"):
            raise
        print(f"collafuse: internal error: {type(err).__name__}: {_one_line(err)} "
              "(set COLLAFUSE_TRACEBACK=1 to see where)", file=sys.stderr)
        return 1
    finally:
        warnings.showwarning = previous


def _one_line(err: BaseException) -> str:
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    return "; ".join(lines) or type(err).__name__


def _one_line_warnings(previous):
    """Our DataWarnings as "collafuse: warning: <one line>"; other warnings as before."""

    def show(message, category, filename, lineno, file=None, line=None):
        from .data import DataWarning

        if issubclass(category, DataWarning):
            print(f"collafuse: warning: {message}", file=file or sys.stderr)
        else:
            previous(message, category, filename, lineno, file, line)
    return show


class _Parser(argparse.ArgumentParser):
    """Usage errors in one line (argparse prints the whole usage first)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="collafuse", description="CollaFuse: split diffusion training and inference across "
        "clients and a shared server, its evaluation, privacy audit and data tools.")
    from . import __version__

    parser.add_argument("--version", action="version", version=f"collafuse {__version__}")
    commands = parser.add_subparsers(required=True, metavar="COMMAND")

    train = commands.add_parser("train", help="train and sample one cut ratio")
    train.add_argument("config", type=Path, help="TOML config, e.g. configs/quickstart.toml")
    _add_overrides(train)
    train.add_argument("--out", type=Path, help="run folder (default runs/<run.name>)")
    train.add_argument("--resume", action="store_true", help="continue the run in --out")
    _add_device(train)
    train.set_defaults(func=_train)

    sample = commands.add_parser("sample", help="split inference from a trained run")
    sample.add_argument("run_dir", type=Path)
    sample.add_argument("-n", "--num-samples", type=int, help="per client")
    sample.add_argument("--seed", type=int)
    sample.add_argument("--out", type=Path, help="folder for the grids (default RUN_DIR)")
    sample.add_argument("--sampler", choices=SAMPLERS,
                        help="default: the run's sample.sampler")
    sample.add_argument("--steps", type=int, help="model calls per sample, server and client "
                        "together (0 = all T; default: the run's sample.steps)")
    sample.add_argument("--label", help="conditional runs: the class to generate, one of "
                        "model.classes (default: the run's sample.label; '' = every class)")
    sample.add_argument("--export", type=Path, metavar="DIR", help="write the samples as an "
                        "image folder instead of grids: DIR/<client>/<class>/<n>.png and "
                        "DIR/manifest.csv (reads back with `collafuse data prepare`)")
    sample.add_argument("--batch-size", type=int, default=64,
                        help="--export: samples generated and written at a time (default 64)")
    _add_device(sample, "the run's run.device")
    sample.set_defaults(func=_sample)

    audit = commands.add_parser("audit", help="what the server can learn: attacks and "
                                "(epsilon, delta) per client, cut and protocol")
    audit.add_argument("run_dir", type=Path, help="a run folder or a sweep folder of runs")
    audit.add_argument("--out", type=Path, help="folder for privacy.csv/json/md (default RUN_DIR)")
    audit.add_argument("-n", "--num-images", type=int, default=128,
                       help="images per client attacked (and hold-out images compared)")
    audit.add_argument("--seed", type=int, default=0)
    audit.add_argument("--reference-rounds", type=int, default=None,
                       help="rounds of the calibration reference models, trained on the "
                       "run's hold-out set (default 300; 0: no calibrated attacks)")
    audit.add_argument("--reference-models", type=int, default=1, metavar="K",
                       help="reference pairs, each of its own seed; calibrated attacks use "
                       "their mean log error (default 1; each costs --reference-rounds)")
    audit.add_argument("--export", type=Path, metavar="DIR", help="a `collafuse export` of "
                       "the run: its client models attacked too (target 'client (exported)')")
    audit.add_argument("--samples", type=Path, metavar="DIR", help="a `collafuse sample "
                       "--export` folder of the run: the sample-based attack on those images "
                       "(target 'samples (published)')")
    _add_device(audit, "each run's run.device")
    audit.set_defaults(func=_audit)

    sweep = commands.add_parser("sweep", help="train and evaluate every protocol, cut ratio "
                                "and training seed: KID, disclosure, cost, figures, report.md "
                                "with verdicts from intervals over seeds")
    sweep.add_argument("config", type=Path, help="TOML config, e.g. configs/sweep.toml")
    _add_overrides(sweep)
    sweep.add_argument("--out", type=Path, help="sweep folder (default runs/<run.name>-sweep); "
                       "rerun with the same --out to continue an interrupted sweep")
    sweep.add_argument("--seeds", type=_seed_list, metavar="K,K,...", help="training seeds, "
                       "each a run per protocol and cut ratio, e.g. 0,1,2 (default: sweep.seeds; "
                       "replaces every protocol's seeds)")
    _add_device(sweep)
    stage = sweep.add_mutually_exclusive_group()
    stage.add_argument("--train-only", action="store_true", help="train every cut ratio, "
                       "evaluate nothing (e.g. on a GPU machine without the Inception weights)")
    stage.add_argument("--evaluate-only", action="store_true", help="evaluate the finished "
                       "runs in --out, trained here or elsewhere, and report them (a partial "
                       "sweep names its missing runs); train nothing")
    sweep.set_defaults(func=_sweep)

    export = commands.add_parser("export", help="a trained run as diffusers models (safetensors), "
                                 "a chain file and a model card, for collafuse.pipeline")
    export.add_argument("run_dir", type=Path, help="a run folder (collafuse train, or a Flower "
                        "server's run-dir: its server part)")
    export.add_argument("out", type=Path, help="a new or empty folder")
    export.set_defaults(func=_export)

    evaluate = commands.add_parser(
        "evaluate", help="KID of a set of images against real ones, and the near-copy check "
        "against training images: on the node that holds the real images")
    evaluate.add_argument("samples", type=Path, help="npz or image folder of generated images")
    evaluate.add_argument("--real", type=Path, required=True, help="npz or image folder of real "
                          "images of the kind wanted, not trained on (e.g. hold-out patients)")
    evaluate.add_argument("--train", type=Path, help="npz or image folder of the images the "
                          "model was trained on: adds the near-copy fraction of SAMPLES and, "
                          "as its baseline, of REAL")
    evaluate.add_argument("--json", type=Path, metavar="OUT", help="also write the figures here")
    evaluate.add_argument("--size", type=int, help="center-crop and resize every set to this "
                          "square side, as `data prepare` does (default: the samples' own size)")
    evaluate.add_argument("--channels", type=int, default=1, choices=CHANNELS)
    evaluate.add_argument("--kid-subsets", type=int, default=100)
    evaluate.add_argument("--kid-subset-size", type=int, default=1000)
    evaluate.add_argument("--seed", type=int, default=0, help="KID subsets and bootstrap draws")
    evaluate.add_argument("--cache", type=Path, help="folder for cached Inception features "
                          "(default ~/.cache/collafuse/inception)")
    evaluate.add_argument("--no-cache", action="store_true", help="compute every feature anew")
    evaluate.add_argument("--device", default="cpu", help="where Inception runs (default cpu)")
    evaluate.set_defaults(func=_evaluate)

    data = commands.add_parser("data", help="prepare and inspect data sets")
    data_commands = data.add_subparsers(required=True, metavar="ACTION")
    prepare = data_commands.add_parser("prepare", help="load any supported source, resize, "
                                       "write one npz")
    prepare.add_argument("source", type=Path, help="npz, image folder, NIfTI, DICOM or LGG folder")
    prepare.add_argument("output", type=Path, help="the .npz to write")
    prepare.add_argument("--size", type=int, default=32, help="square side in pixels (center crop, "
                         "then resize)")
    prepare.add_argument("--channels", type=int, default=1, choices=CHANNELS)
    _add_layout(prepare)
    prepare.set_defaults(func=_data_prepare)
    inspect = data_commands.add_parser("inspect", help="what was found: sizes, layout, counts per "
                                       "site, class and patient; a preview")
    inspect.add_argument("source", type=Path)
    inspect.add_argument("--size", type=int, help="resize to this square side for the statistics "
                         f"and the preview (default: the images' own size; {PREVIEW_SIZE} when "
                         "they differ)")
    inspect.add_argument("--channels", type=int, default=1, choices=CHANNELS)
    _add_layout(inspect)
    inspect.add_argument("--config", type=Path, help="also show how the config partitions SOURCE")
    _add_overrides(inspect)
    inspect.add_argument("--preview", type=Path, help="write a PNG grid of 64 images here")
    inspect.set_defaults(func=_data_inspect)

    flower = commands.add_parser("flower", help="a Flower deployment's server-side records")
    flower_commands = flower.add_subparsers(required=True, metavar="ACTION")
    nodes = flower_commands.add_parser("nodes", help="which registered name each Flower node id "
                                       "is bound to, and the client it serves")
    nodes.add_argument("run_dir", type=Path, help="the ServerApp's run-dir (run config run-dir)")
    nodes.set_defaults(func=_flower_nodes)
    return parser


def _add_layout(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--layout", help="how an image folder's levels are read: auto (default: images directly "
        "in SOURCE -> flat, one folder deep -> class, two or more -> site/class), flat, or one "
        "word per level from site, class, patient, skip joined by '/', e.g. site, site/class, "
        "skip/class, site/patient")


def _add_device(parser: argparse.ArgumentParser, default: str = "run.device") -> None:
    parser.add_argument("--device", help="auto, cpu, cuda, cuda:N or mps (default: "
                        f"{default}; auto: cuda if available, else cpu)")


def _load_config(args):
    """The command's config with its --set overrides and --device applied."""
    overrides = list(args.overrides)
    if args.device is not None:
        overrides.append(f"run.device={_toml_string(args.device)}")
    return load_config(args.config, overrides)


def _add_overrides(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--set", dest="overrides", action="append", default=[],
                        metavar="SECTION.KEY=VALUE", help="override a config field (repeatable)")


def _train(args) -> None:
    from .engines.local import run_training

    cfg = _load_config(args)
    out = args.out or Path("runs") / cfg.run.name
    run = run_training(cfg, out, resume=args.resume)
    print(f"run folder: {out}")
    for cid in run.clients:
        print(f"samples of {cid}: {out / 'samples' / (cid + '.png')}")


def _sample(args) -> None:
    from .engines.local import export_samples, load_run, write_samples

    if args.steps is not None and (args.steps == 1 or args.steps < 0):
        raise ValueError(f"--steps: expected 0 (every step) or an integer >= 2, got {args.steps}")
    for name, value in (("--num-samples", args.num_samples), ("--batch-size", args.batch_size)):
        if value is not None and value < 1:
            raise ValueError(f"{name}: expected an integer >= 1, got {value}")
    run = load_run(args.run_dir, device=args.device)
    if args.sampler is not None:
        run.cfg.sample.sampler = args.sampler
    if args.steps is not None:
        run.cfg.sample.steps = args.steps
    if args.export is not None:
        n = args.num_samples or run.cfg.sample.num_samples
        export_samples(run, args.export, n, args.seed, args.label, args.batch_size)
        layout = "site/class" if run.cfg.model.condition != "none" else "site"
        print(f"exported {n} samples per client to {args.export} (manifest.csv); read them back "
              f"with: collafuse data prepare {args.export} OUT.npz --layout {layout} "
              f"--size {run.cfg.data.image_size} --channels {run.cfg.data.channels}")
        return
    out = args.out or args.run_dir
    for cid, path in write_samples(run, out, args.num_samples, args.seed, args.label).items():
        print(f"samples of {cid}: {path}")


def _audit(args) -> None:
    from .privacy.audit import audit
    from .privacy.membership_audit import DEFAULT_REFERENCE_ROUNDS

    rounds = DEFAULT_REFERENCE_ROUNDS if args.reference_rounds is None else args.reference_rounds
    if args.num_images < 1:
        raise ValueError(f"--num-images: expected an integer >= 1, got {args.num_images}")
    if rounds < 0:
        raise ValueError(f"--reference-rounds: expected an integer >= 0, got {rounds}")
    if args.reference_models < 1:
        raise ValueError(f"--reference-models: expected an integer >= 1, "
                         f"got {args.reference_models}")
    audit(args.run_dir, args.out, num_images=args.num_images, seed=args.seed, device=args.device,
          reference_rounds=rounds, export_dir=args.export, samples_dir=args.samples,
          reference_models=args.reference_models)
    out = args.out or args.run_dir
    print(f"privacy audit: {out / 'privacy.md'} (privacy.csv, privacy.json, membership.csv, "
          "membership.json, membership-scores.csv)")


def _seed_list(text: str) -> list[int]:
    """--seeds 0,1,2: distinct integers >= 0."""
    try:
        seeds = [int(k) for k in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected integers separated by commas, got {text!r}")
    if any(k < 0 for k in seeds) or len(set(seeds)) != len(seeds):
        raise argparse.ArgumentTypeError(f"expected distinct integers >= 0, got {text!r}")
    return seeds


def _sweep(args) -> None:
    from .evaluation.sweep import run_sweep, with_seeds

    cfg = _load_config(args)
    if args.seeds is not None:
        cfg = with_seeds(cfg, args.seeds)
    out = args.out or Path("runs") / f"{cfg.run.name}-sweep"
    run_sweep(cfg, out, train=not args.evaluate_only, evaluate=not args.train_only)
    if args.train_only:
        print(f"sweep folder: {out} (trained; evaluate with --evaluate-only)")
    else:
        print(f"sweep folder: {out} (results.csv, results.json, report.md)")


def _export(args) -> None:
    from .export import export_run

    info = export_run(args.run_dir, args.out)
    with_models = [cid for cid, c in info["clients"].items() if c["exported"]]
    print(f"exported {args.run_dir} to {args.out}: server"
          + (f", clients {', '.join(with_models)}" if with_models else " only (no client models)")
          + f"; model card {args.out / 'README.md'}")


def _flower_nodes(args) -> None:
    import json

    from .engines.flower.server_app import NODES

    path = args.run_dir / NODES
    if not path.is_file():
        raise ValueError(f"{path}: no such file (the ServerApp writes it into its run-dir once a "
                         "node has answered its hello)")
    record = json.loads(path.read_text())
    rows = [("node id", "registered name", "client", "since", "refused")]
    rows += [(str(e["node-id"]), e["registered-name"] or "-", e["client"] or "-", e["since"],
              e["refused"] or "") for e in record["nodes"]]
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    print(f"{path} (identity: {record['identity']})")
    for row in rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths)) + "  " + row[4])


def _evaluate(args) -> None:
    import json

    from .evaluation.synthetic import (default_cache_dir, evaluate_image_sets, load_image_set,
                                       summary_lines)
    from .state import write_text

    for name in ("size", "kid_subsets", "kid_subset_size"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise ValueError(f"--{name.replace('_', '-')}: expected an integer >= 1, got {value}")
    samples = load_image_set(args.samples, args.size, args.channels)
    size = args.size or samples.shape[1]
    if samples.shape[1] != samples.shape[2]:  # not square: fit every set to one square side
        samples = load_image_set(args.samples, size, args.channels)
    real = load_image_set(args.real, size, args.channels)
    train = None if args.train is None else load_image_set(args.train, size, args.channels)
    cache = None if args.no_cache else args.cache or default_cache_dir()
    result = evaluate_image_sets(samples, real, train, cache, args.kid_subsets,
                                 args.kid_subset_size, args.seed, progress=True,
                                 device=args.device)
    result["image_size"] = size  # numbers only: what may leave the node names no path
    for line in summary_lines(result):
        print(line)
    if args.json:
        write_text(args.json, json.dumps(result, indent=2) + "\n")
        print(f"wrote {args.json}")


def _data_prepare(args) -> None:
    from .data import image_folder, load_images, save_images

    if args.output.suffix != ".npz":
        raise ValueError(f"{args.output}: expected a .npz file name")
    layout = args.layout or "auto"
    folder = image_folder(args.source, layout)
    images = load_images(args.source, image_size=args.size, channels=args.channels, layout=layout)
    save_images(images, args.output)
    print(f"wrote {args.output}: {len(images)} images of {args.size}x{args.size}, "
          f"meta fields {sorted(images.meta)}")
    if folder is not None:
        print(f"  layout {folder.layout.name} ({folder.layout.reason})")
    if "patient" not in images.meta:
        print("  no patient ids: each image counts as its own patient")


def _data_inspect(args) -> None:
    import numpy as np

    from .data import image_folder, image_sizes, load_images, save_grid

    layout = args.layout or "auto"
    folder = image_folder(args.source, layout)
    size = args.size
    if folder is not None:
        print(f"{args.source}: folder of {len(folder.files)} images, layout {folder.layout.name} "
              f"({folder.layout.reason})")
        sizes = set(image_sizes(folder.files))
        widths, heights = [w for w, _ in sizes], [h for _, h in sizes]
        if len(sizes) > 1:
            size = size or PREVIEW_SIZE
            print(f"  sizes: {len(sizes)} different, width {min(widths)}-{max(widths)} px, height "
                  f"{min(heights)}-{max(heights)} px")
        else:
            print(f"  size: {widths[0]}x{heights[0]} px (width x height)")
    images = load_images(args.source, image_size=size, channels=args.channels, layout=layout)
    resized = f", center-cropped and resized to {size}x{size}" if size else ""
    print(f"{args.source}: {len(images)} images, shape {images.images.shape[1:]}{resized}, "
          f"mean intensity {images.images.mean():.1f}/255")
    for name in ("site", "label", "patient"):
        if name in images.meta:
            values, counts = np.unique(images.meta[name], return_counts=True)
            shown = ", ".join(f"{v} {c}" for v, c in zip(values[:12], counts[:12]))
            print(f"  {name}: {len(values)} distinct ({shown}{', ...' if len(values) > 12 else ''})")
        elif name == "site":
            print("  site: none (partition by site and data.holdout_sites need one)")
        elif name == "patient":
            print("  patient: none; each image counts as its own patient (hold-out and partition "
                  "by patient then split single images)")
    if args.config:
        from .factory import load_client_data

        overrides = [f"data.path={_toml_string(args.source)}", *args.overrides]
        if args.layout:
            overrides.append(f"data.layout={_toml_string(args.layout)}")
        data = load_client_data(load_config(args.config, overrides))
        for cid, part in data.clients.items():
            print(f"  client {cid}: {len(part)} images")
        print(f"  hold-out: {len(data.holdout)} images")
    if args.preview:
        save_grid(images.images[:64], args.preview, nrow=8)
        print(f"preview: {args.preview}")


def _toml_string(value) -> str:
    return '"' + str(value).replace("\\", "\\\\").replace('"', '\\"') + '"'


if __name__ == "__main__":
    sys.exit(main())
