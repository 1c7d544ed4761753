"""The ``collafuse`` command line: thin wrappers over the library."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .config import load_config


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args) or 0
    except KeyboardInterrupt:
        print("interrupted; the last checkpoint is kept: continue with --resume "
              "(a sweep: run the same command again)", file=sys.stderr)
        return 130
    except (ValueError, OSError) as err:  # our errors are one-line ValueErrors
        print(f"collafuse: error: {err}", file=sys.stderr)
        return 2


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="collafuse", description="CollaFuse: split diffusion training and inference across "
        "clients and a shared server, its evaluation, privacy audit and data tools.")
    commands = parser.add_subparsers(required=True, metavar="COMMAND")

    train = commands.add_parser("train", help="train and sample one cut ratio")
    train.add_argument("config", type=Path, help="TOML config, e.g. configs/quickstart.toml")
    _add_overrides(train)
    train.add_argument("--out", type=Path, help="run folder (default runs/<run.name>)")
    train.add_argument("--resume", action="store_true", help="continue the run in --out")
    train.set_defaults(func=_train)

    sample = commands.add_parser("sample", help="split inference from a trained run")
    sample.add_argument("run_dir", type=Path)
    sample.add_argument("-n", "--num-samples", type=int, help="per client")
    sample.add_argument("--seed", type=int)
    sample.add_argument("--out", type=Path, help="folder for the grids (default RUN_DIR)")
    sample.set_defaults(func=_sample)

    audit = commands.add_parser("audit", help="what the server can learn: attacks and "
                                "(epsilon, delta) per client, cut and protocol")
    audit.add_argument("run_dir", type=Path, help="a run folder or a sweep folder of runs")
    audit.add_argument("--out", type=Path, help="folder for privacy.csv/json/md (default RUN_DIR)")
    audit.add_argument("-n", "--num-images", type=int, default=128,
                       help="images per client attacked (and hold-out images compared)")
    audit.add_argument("--seed", type=int, default=0)
    audit.set_defaults(func=_audit)

    sweep = commands.add_parser("sweep", help="train and evaluate every cut ratio: KID, "
                                "disclosure, cost, figures, report.md")
    sweep.add_argument("config", type=Path, help="TOML config, e.g. configs/sweep.toml")
    _add_overrides(sweep)
    sweep.add_argument("--out", type=Path, help="sweep folder (default runs/<run.name>-sweep); "
                       "rerun with the same --out to continue an interrupted sweep")
    sweep.set_defaults(func=_sweep)

    data = commands.add_parser("data", help="prepare and inspect data sets")
    data_commands = data.add_subparsers(required=True, metavar="ACTION")
    prepare = data_commands.add_parser("prepare", help="load any supported source, resize, "
                                       "write one npz")
    prepare.add_argument("source", type=Path, help="npz, image folder, NIfTI, DICOM or LGG folder")
    prepare.add_argument("output", type=Path, help="the .npz to write")
    prepare.add_argument("--size", type=int, default=32)
    prepare.add_argument("--channels", type=int, default=1, choices=(1, 3))
    prepare.set_defaults(func=_data_prepare)
    inspect = data_commands.add_parser("inspect", help="counts per site and patient, a preview")
    inspect.add_argument("source", type=Path)
    inspect.add_argument("--config", type=Path, help="also show the config's partition")
    _add_overrides(inspect)
    inspect.add_argument("--preview", type=Path, help="write a PNG grid of 64 images here")
    inspect.set_defaults(func=_data_inspect)
    return parser


def _add_overrides(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--set", dest="overrides", action="append", default=[],
                        metavar="SECTION.KEY=VALUE", help="override a config field (repeatable)")


def _train(args) -> None:
    from .engines.local import run_training

    cfg = load_config(args.config, args.overrides)
    out = args.out or Path("runs") / cfg.run.name
    run = run_training(cfg, out, resume=args.resume)
    print(f"run folder: {out}")
    for cid in run.clients:
        print(f"samples of {cid}: {out / 'samples' / (cid + '.png')}")


def _sample(args) -> None:
    from .engines.local import load_run, write_samples

    run = load_run(args.run_dir)
    out = args.out or args.run_dir
    for cid, path in write_samples(run, out, args.num_samples, args.seed).items():
        print(f"samples of {cid}: {path}")


def _audit(args) -> None:
    from .privacy.audit import audit

    if args.num_images < 1:
        raise ValueError(f"--num-images: expected an integer >= 1, got {args.num_images}")
    audit(args.run_dir, args.out, num_images=args.num_images, seed=args.seed)
    out = args.out or args.run_dir
    print(f"privacy audit: {out / 'privacy.md'} (privacy.csv, privacy.json)")


def _sweep(args) -> None:
    from .evaluation.sweep import run_sweep

    cfg = load_config(args.config, args.overrides)
    out = args.out or Path("runs") / f"{cfg.run.name}-sweep"
    run_sweep(cfg, out)
    print(f"sweep folder: {out} (results.csv, results.json, report.md)")


def _data_prepare(args) -> None:
    from .data import load_images, save_images

    images = load_images(args.source, image_size=args.size, channels=args.channels)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    save_images(images, args.output)
    print(f"wrote {args.output}: {len(images)} images of {args.size}x{args.size}, "
          f"meta fields {sorted(images.meta)}")


def _data_inspect(args) -> None:
    import numpy as np

    from .data import load_images, save_grid

    images = load_images(args.source)
    print(f"{args.source}: {len(images)} images, shape {images.images.shape[1:]}, "
          f"mean intensity {images.images.mean():.1f}/255")
    for name in ("site", "patient"):
        if name in images.meta:
            values, counts = np.unique(images.meta[name], return_counts=True)
            shown = ", ".join(f"{v} {c}" for v, c in zip(values[:12], counts[:12]))
            print(f"  {name}: {len(values)} distinct ({shown}{', ...' if len(values) > 12 else ''})")
    if args.config:
        from .factory import load_client_data

        cfg = load_config(args.config, args.overrides)
        clients, holdout = load_client_data(cfg)
        for cid, part in clients.items():
            print(f"  client {cid}: {len(part)} images")
        print(f"  hold-out: {len(holdout)} images")
    if args.preview:
        save_grid(images.images[:64], args.preview, nrow=8)
        print(f"preview: {args.preview}")


if __name__ == "__main__":
    sys.exit(main())
