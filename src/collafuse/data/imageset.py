"""The in-memory image collection every loader returns and every partition slices."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


class DataError(ValueError):
    """Bad input data; the message is one line naming the file or field and what was expected."""


@dataclass
class ImageSet:
    """uint8 images, (N,H,W) grayscale or (N,H,W,3) RGB, plus per-image metadata of length N."""

    images: np.ndarray
    meta: dict[str, np.ndarray] = field(default_factory=dict)

    def __post_init__(self) -> None:
        x = self.images
        if x.dtype != np.uint8 or not (x.ndim == 3 or (x.ndim == 4 and x.shape[3] == 3)):
            raise DataError(f"ImageSet.images: expected uint8 array (N,H,W) or (N,H,W,3), found {x.dtype} {x.shape}")
        for key, values in self.meta.items():
            if values.shape != (len(x),):
                raise DataError(
                    f"ImageSet.meta[{key!r}]: expected 1-D array of length {len(x)}, found shape {values.shape}"
                )

    def __len__(self) -> int:
        return len(self.images)

    @property
    def channels(self) -> int:
        return 1 if self.images.ndim == 3 else 3

    def subset(self, indices) -> ImageSet:
        idx = np.asarray(indices, dtype=np.int64)
        return ImageSet(self.images[idx], {k: v[idx] for k, v in self.meta.items()})

    def meta_field(self, name: str) -> np.ndarray:
        """The meta field `name`, or a DataError saying which fields exist."""
        if name not in self.meta:
            raise DataError(f"ImageSet.meta: expected field {name!r}, found fields {sorted(self.meta)}")
        return self.meta[name]

    def class_names(self) -> np.ndarray:
        """Each image's class name, for class-conditional models: the "label" field (an image
        folder's class, or an npz's own), else for LGG data "tumour" or "no-tumour" by whether
        the slice's tumour mask has any pixel ("tumor_pixels")."""
        if "label" in self.meta:
            return self.meta["label"].astype(str)
        if "tumor_pixels" in self.meta:
            return np.where(self.meta["tumor_pixels"] > 0, "tumour", "no-tumour")
        raise DataError(f"ImageSet.meta: class labels need a 'label' or 'tumor_pixels' field, "
                        f"found fields {sorted(self.meta)}")

    def class_indices(self, classes: list[str]) -> np.ndarray:
        """Each image's index in ``classes`` (model.classes), int64; a DataError names a class
        of the data that ``classes`` lacks."""
        names = self.class_names()
        if unknown := sorted(set(names.tolist()) - set(classes)):
            raise DataError(f"model.classes {classes} lacks the data's class {unknown[0]!r}")
        index = {name: i for i, name in enumerate(classes)}
        return np.array([index[name] for name in names], dtype=np.int64)
