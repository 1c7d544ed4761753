"""Writing an ImageSet as the .npz that load_images reads back."""

from __future__ import annotations

from pathlib import Path


from ..state import save_npz
from .imageset import DataError, ImageSet


def save_images(images: ImageSet, path) -> None:
    """Write images and meta to a compressed .npz, atomically; object arrays are refused."""
    path = Path(path)
    if path.suffix != ".npz":
        raise DataError(f"{path}: expected a .npz file name")
    for key, values in images.meta.items():
        if values.dtype == object:
            raise DataError(f"ImageSet.meta[{key!r}]: object arrays cannot be saved without pickle; use str or numbers")
    if "images" in images.meta:
        raise DataError("ImageSet.meta: the field name 'images' is reserved for the pixel array")
    save_npz(path, images=images.images, **images.meta)
