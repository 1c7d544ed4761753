"""Build the bundled default data set data/lgg_flair_<size>.npz from the shared 128x128 LGG file.

python scripts/make_default_data.py                # -> data/lgg_flair_32.npz (committed)
python scripts/make_default_data.py --size 64      # -> data/lgg_flair_64.npz (not committed)
"""

from __future__ import annotations

import argparse
from pathlib import Path

from collafuse.data import load_images, save_images

REPO = Path(__file__).resolve().parents[1]
DEFAULT_SOURCE = REPO / "../shared/data/lgg-mri/lgg_flair_128.npz"

README = """\
# Default data set: LGG brain MRI (FLAIR), 32x32

`lgg_flair_32.npz` holds all 3929 axial FLAIR slices of 110 lower-grade glioma patients from five
TCGA tissue source sites (hospitals), downsampled to 32x32 so that the whole pipeline runs on a CPU.
It is a derivative of `lgg_flair_128.npz` (see `../shared/data/lgg-mri/README.md`).

| key | shape, dtype | meaning |
|-----|--------------|---------|
| `images` | (3929, 32, 32) uint8 | FLAIR channel, 128x128 downsampled by 4x4 area averaging (PIL `Image.BOX`) |
| `site` | (3929,) str | tissue source site code: DU 1878, HT 1029, FG 640, CS 358, EZ 24 slices |
| `patient` | (3929,) str | case id, e.g. `TCGA_CS_4941` |
| `slice_index` | (3929,) int16 | slice number within the patient's volume (1-based) |
| `tumor_pixels` | (3929,) int32 | non-zero pixels of the original 256x256 tumour mask |

Slices are ordered by case folder name, then slice number. No pickled objects: `np.load(path)`.

Made with (from the repository root):

    python scripts/make_default_data.py ../shared/data/lgg-mri/lgg_flair_128.npz

(`--size 64` writes `data/lgg_flair_64.npz` instead; that file is not committed.)

## Source and citation

Images from The Cancer Imaging Archive (TCGA-LGG collection), as published in the
"LGG segmentation dataset" (kaggle_3m). Cite both papers where the data is used, and see the
original dataset pages for the terms of use:

- Buda M, Saha A, Mazurowski MA. Association of genomic subtypes of lower-grade gliomas with
  shape features automatically extracted by a deep learning algorithm.
  Computers in Biology and Medicine 109 (2019) 218-225.
- Bakas S, Akbari H, Sotiras A, et al. Advancing The Cancer Genome Atlas glioma MRI collections
  with expert segmentation labels and radiomic features. Scientific Data 4, 170117 (2017).
"""


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
    (args.out_dir / "README.md").write_text(README)
    print(f"wrote {out}: {len(images)} images {images.images.shape[1:]}, {out.stat().st_size / 1e6:.2f} MB")


if __name__ == "__main__":
    main()
