"""Data layer: loaders -> uint8 ImageSet, partitions into clients, hold-out by patient, conversions.

Imports only numpy, PIL, nibabel, pydicom and torch (layer 3 of docs/design.md section 4).
"""

from .imageset import DataError, ImageSet
from .loaders import FolderLayout, ImageFolder, image_folder, image_sizes, load_images, parse_layout
from .partition import (PARTITIONS, DataWarning, partition, patient_ids, require_min_images,
                        split_holdout)
from .saving import save_images
from .transforms import normalise_intensity, save_grid, save_side_by_side, to_model, to_uint8

__all__ = [
    "PARTITIONS",
    "require_min_images",
    "DataError",
    "DataWarning",
    "FolderLayout",
    "ImageFolder",
    "ImageSet",
    "image_folder",
    "image_sizes",
    "load_images",
    "normalise_intensity",
    "parse_layout",
    "partition",
    "patient_ids",
    "save_grid",
    "save_side_by_side",
    "save_images",
    "split_holdout",
    "to_model",
    "to_uint8",
]
