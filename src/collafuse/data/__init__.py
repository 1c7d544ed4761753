"""Data layer: loaders -> uint8 ImageSet, partitions into clients, hold-out by patient, conversions.

Imports only numpy, PIL, nibabel, pydicom and torch (layer 3 of DESIGN.md).
"""

from .imageset import DataError, ImageSet
from .loaders import load_images
from .partition import partition, split_holdout
from .saving import save_images
from .transforms import normalise_intensity, save_grid, to_model, to_uint8

__all__ = [
    "DataError",
    "ImageSet",
    "load_images",
    "normalise_intensity",
    "partition",
    "save_grid",
    "save_images",
    "split_holdout",
    "to_model",
    "to_uint8",
]
