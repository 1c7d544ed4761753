"""Writing an ImageSet as the .npz that load_images reads back."""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np

from ..state import atomic_path
from .imageset import DataError, ImageSet


def save_images(images: ImageSet, path) -> None:
    """Write images and meta to a compressed .npz, atomically; object arrays are refused.

    The archive is written member by member (what np.savez_compressed does) rather than through
    np.savez_compressed(file, **meta), whose own parameter names ("file", "allow_pickle") would
    collide with meta fields of the same name, such as the "file" an image folder records.
    """
    path = Path(path)
    if path.suffix != ".npz":
        raise DataError(f"{path}: expected a .npz file name")
    for key, values in images.meta.items():
        if values.dtype == object:
            raise DataError(f"ImageSet.meta[{key!r}]: object arrays cannot be saved without pickle; use str or numbers")
    if "images" in images.meta:
        raise DataError("ImageSet.meta: the field name 'images' is reserved for the pixel array")
    arrays = {"images": images.images, **images.meta}
    with atomic_path(path) as tmp, zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED, allowZip64=True) as zf:
        for key, values in arrays.items():
            with zf.open(f"{key}.npy", "w", force_zip64=True) as member:
                np.lib.format.write_array(member, np.asanyarray(values), allow_pickle=False)
