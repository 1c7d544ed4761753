"""Build the bundled data set data/lgg_flair_<size>.npz from the bundled 128x128 LGG file.

python scripts/make_default_data.py                # -> data/lgg_flair_32.npz (committed)
python scripts/make_default_data.py --size 64      # -> data/lgg_flair_64.npz (not committed)
"""

from __future__ import annotations

import argparse
from pathlib import Path

from collafuse.data import load_images, save_images

REPO = Path(__file__).resolve().parents[1]
DEFAULT_SOURCE = REPO / "data" / "lgg_flair_128.npz"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("source", nargs="?", type=Path, default=DEFAULT_SOURCE, help="lgg_flair_128.npz")
    parser.add_argument("--size", type=int, default=32, help="output side length in pixels (default 32)")
    parser.add_argument("--out-dir", type=Path, default=REPO / "data", help="folder to write into (default data/)")
    args = parser.parse_args()

    images = load_images(args.source, image_size=args.size)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    out = args.out_dir / f"lgg_flair_{args.size}.npz"
    save_images(images, out)
    print(f"wrote {out}: {len(images)} images {images.images.shape[1:]}, {out.stat().st_size / 1e6:.2f} MB")


if __name__ == "__main__":
    main()
