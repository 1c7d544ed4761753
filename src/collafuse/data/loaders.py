"""load_images: one entry point that dispatches on what the path is (npz, NIfTI, LGG, DICOM, images).

Folders of PNG/JPEG/TIFF images: how the folder levels below ROOT are read is the *layout*, a
word per level joined by "/": ``site`` (the folder name becomes meta "site", a hospital),
``class`` (meta "label"), ``patient`` (meta "patient", the folder's path from ROOT so that two
sites' "001" stay apart) or ``skip`` (ignored), e.g. "site/class", "class", "skip/class";
deeper folders are kept in meta "file" only. "flat" reads no folder level. "auto" (the default)
looks at the shallowest image: directly in ROOT -> flat; one folder below -> class; two or
more -> site/class. Without a patient level every image counts as its own patient.
Hidden files and folders (names starting with ".", and __MACOSX) are skipped.
"""

from __future__ import annotations

import re
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from ..choices import LAYOUT_LEVELS
from .imageset import DataError, ImageSet
from .transforms import fit_array, fit_image

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".tif", ".tiff"}
LGG_CASE = re.compile(r"^(TCGA_([A-Za-z0-9]+)_[A-Za-z0-9]+)_\d{8}$")
LGG_SLICE = re.compile(r"^(?P<case>TCGA_[A-Za-z0-9]+_[A-Za-z0-9]+_\d{8})_(?P<slice>\d+)\.tif$")


@dataclass(frozen=True)
class FolderLayout:
    """How the folder levels below an image folder's ROOT are read (see the module docstring)."""

    levels: tuple[str, ...]  # one word per level: site, class, label, patient or skip
    reason: str  # one line: why these levels (given, or the auto rule that chose them)

    @property
    def name(self) -> str:
        return "/".join(self.levels) or "flat"


@dataclass(frozen=True)
class ImageFolder:
    """A folder of PNG/JPEG/TIFF images: its root, the image files found, their layout."""

    root: Path
    files: list[Path]
    layout: FolderLayout


def load_images(path, image_size: int | None = None, channels: int = 1, layout: str = "auto") -> ImageSet:
    """Load images from a .npz, .nii/.nii.gz, image file, or folder (LGG layout, DICOM, images).

    Every image is converted to grayscale (channels=1) or RGB (channels=3) and, when image_size
    is given, center-cropped to square and resized to image_size x image_size. ``layout`` says
    how a folder of images is read (module docstring); other sources accept only "auto".
    """
    path = Path(path)
    if channels not in (1, 3):
        raise DataError(f"load_images: channels must be 1 or 3, found {channels}")
    if image_size is not None and (isinstance(image_size, bool) or image_size < 1):
        raise DataError(f"load_images: image_size must be a positive int, found {image_size}")
    parse_layout(layout)
    if not path.exists():
        raise DataError(f"{path}: no such file or folder")
    if path.is_dir():
        return _load_folder(path, image_size, channels, layout)
    if layout != "auto":
        raise DataError(f"{path}: layout {layout!r} applies to folders of images only; use 'auto' for a file")
    name = path.name.lower()
    if name.endswith(".npz"):
        return _load_npz(path, image_size, channels)
    if name.endswith((".nii", ".nii.gz")):
        return _load_nifti(path, image_size, channels)
    if path.suffix.lower() in IMAGE_SUFFIXES:
        return _load_image_files([path], path.parent, image_size, channels)
    raise DataError(f"{path}: unsupported file type; expected .npz, .nii, .nii.gz, .png, .jpg, .tif or a folder")


def _load_npz(path: Path, image_size, channels) -> ImageSet:
    try:
        with np.load(path, allow_pickle=False) as npz:
            arrays = {k: npz[k] for k in npz.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
        raise DataError(f"{path}: not a readable .npz without pickled objects ({type(e).__name__}: {e})") from e
    images = arrays.pop("images", None)
    # a samples npz of `collafuse sample` also holds the server's hand-over, (N, C, H, W): the
    # partial images, neither the images nor per-image metadata
    arrays.pop("handover", None)
    if images is None or images.dtype != np.uint8 or images.ndim not in (3, 4):
        found = f"found keys {sorted(arrays)}" if images is None else f"found {images.dtype} {images.shape}"
        raise DataError(f"{path}: expected key 'images' (uint8 array N,H,W or N,H,W,C), {found}")
    if images.ndim == 4 and images.shape[3] not in (1, 3):
        raise DataError(f"{path}: 'images' must have 1 or 3 channels in the last axis, found {images.shape}")
    if images.ndim == 4 and images.shape[3] == 1:
        images = images[..., 0]
    meta = {}
    for key, values in arrays.items():
        if values.shape != (len(images),):
            raise DataError(
                f"{path}: key {key!r} must be 1-D of length {len(images)} (per image), found {values.shape}"
            )
        meta[key] = values
    return ImageSet(fit_array(images, image_size, channels), meta)


def _load_nifti(path: Path, image_size, channels) -> ImageSet:
    import nibabel as nib

    try:
        volume = np.asarray(nib.load(path).dataobj, dtype=np.float64)
    except Exception as e:  # nibabel raises many types for a bad file; all mean "unreadable"
        raise DataError(f"{path}: not a readable NIfTI file ({type(e).__name__}: {e})") from e
    extra = volume.shape[3:]
    if volume.ndim < 3 or any(d != 1 for d in extra):
        raise DataError(f"{path}: expected a 3-D volume (X,Y,Z), found shape {volume.shape}")
    volume = volume.reshape(volume.shape[:3])
    slices = [np.rot90(volume[:, :, k]) for k in range(volume.shape[2])]  # rows = anterior->posterior
    images = _scale_to_uint8(np.stack(slices), volume.min(), volume.max())
    stem = path.name[: -len(".nii.gz")] if path.name.lower().endswith(".nii.gz") else path.stem
    meta = {
        "patient": np.array([stem] * len(images)),
        "slice_index": np.arange(1, len(images) + 1, dtype=np.int16),
    }
    return ImageSet(fit_array(images, image_size, channels), meta)


def _scale_to_uint8(x: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """Linear map [lo, hi] -> [0, 255], clipped; a constant input becomes all zero."""
    if hi <= lo:
        return np.zeros(x.shape, np.uint8)
    return np.clip(np.rint((x - lo) * (255.0 / (hi - lo))), 0, 255).astype(np.uint8)


def parse_layout(layout: str) -> tuple[str, ...] | None:
    """The layout's level words, () for "flat", None for "auto"; a DataError for anything else."""
    if layout == "auto":
        return None
    if layout == "flat":
        return ()
    words = tuple(layout.split("/")) if isinstance(layout, str) else ()
    named = [LAYOUT_LEVELS.get(w) for w in words if w != "skip"]
    if not words or any(w not in LAYOUT_LEVELS for w in words) or len(set(named)) != len(named):
        raise DataError(
            f"layout {layout!r}: expected 'auto', 'flat' or one word per folder level joined by '/' "
            "(site, class, patient, skip; each at most once), e.g. 'site/class'"
        )
    return words


def image_folder(path, layout: str = "auto") -> ImageFolder | None:
    """The folder of PNG/JPEG/TIFF images at path and its layout; None when path is something
    else (a file, an LGG or DICOM folder); a DataError when it is a folder without images."""
    path = Path(path)
    parse_layout(layout)
    if not path.is_dir() or _lgg_cases(path):
        return None
    files = _visible_files(path)
    if any(_is_dicom(p) for p in files):
        return None
    images = [p for p in files if p.suffix.lower() in IMAGE_SUFFIXES]
    if not images:
        raise DataError(f"{path}: no readable images (expected LGG case folders, DICOM, PNG, JPEG or TIFF files)")
    return ImageFolder(path, images, _folder_layout(path, images, layout))


def image_sizes(files: list[Path]) -> list[tuple[int, int]]:
    """(width, height) of each image file, read from its header only."""
    sizes = []
    for f in files:
        try:
            with Image.open(f) as img:
                sizes.append(img.size)
        except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as e:
            raise DataError(f"{f}: not a readable image ({type(e).__name__}: {e})") from e
    return sizes


def _visible_files(root: Path) -> list[Path]:
    def hidden(p: Path) -> bool:
        return any(part.startswith(".") or part == "__MACOSX" for part in p.relative_to(root).parts)

    return sorted(p for p in root.rglob("*") if p.is_file() and not hidden(p))


def _folder_layout(root: Path, files: list[Path], layout: str) -> FolderLayout:
    words = parse_layout(layout)
    if words is not None:
        return FolderLayout(words, "given")
    shallowest = min(len(f.relative_to(root).parts) - 1 for f in files)
    if shallowest == 0:
        return FolderLayout((), f"auto: images sit directly in {root.name}/, so its folders are not read")
    if shallowest == 1:
        return FolderLayout(
            ("class",), "auto: every image is in a subfolder, read as its class; layout 'site' if they are hospitals"
        )
    return FolderLayout(
        ("site", "class"), "auto: every image is two or more folders deep: first level site, second class"
    )


def _load_folder(path: Path, image_size, channels, layout: str) -> ImageSet:
    cases = _lgg_cases(path)
    if cases:
        _only_auto(layout, path, "an LGG folder")
        return _load_lgg(cases, image_size, channels)
    files = _visible_files(path)
    dicoms = [p for p in files if _is_dicom(p)]
    if dicoms:
        _only_auto(layout, path, "a DICOM folder")
        return _load_dicom(dicoms, image_size, channels)
    images = [p for p in files if p.suffix.lower() in IMAGE_SUFFIXES]
    if not images:
        raise DataError(f"{path}: no readable images (expected LGG case folders, DICOM, PNG, JPEG or TIFF files)")
    return _load_image_files(images, path, image_size, channels, _folder_layout(path, images, layout))


def _only_auto(layout: str, path: Path, kind: str) -> None:
    if layout != "auto":
        raise DataError(f"{path}: layout {layout!r} applies to folders of PNG/JPEG/TIFF images; this is {kind}")


def _load_image_files(
    files: list[Path], root: Path, image_size, channels, layout: FolderLayout | None = None
) -> ImageSet:
    arrays = []
    for f in files:
        try:
            with Image.open(f) as img:
                arrays.append(fit_image(_to_8bit(img), image_size, channels))
        except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as e:
            raise DataError(f"{f}: not a readable image ({type(e).__name__}: {e})") from e
    shapes = {a.shape[:2] for a in arrays}
    if len(shapes) > 1:
        heights, widths = zip(*shapes)
        raise DataError(
            f"{root}: images have {len(shapes)} different sizes (width {min(widths)}-{max(widths)}, height "
            f"{min(heights)}-{max(heights)} px); give an image size to resize them (--size, data.image_size)"
        )
    meta = {"file": np.array([f.relative_to(root).as_posix() for f in files])}
    meta.update(_layout_meta(files, root, layout or FolderLayout((), "a single file")))
    return ImageSet(np.stack(arrays), meta)


def _layout_meta(files: list[Path], root: Path, layout: FolderLayout) -> dict[str, np.ndarray]:
    """Per-image meta from the folder levels the layout names."""
    meta: dict[str, list[str]] = {}
    for f in files:
        folders = f.relative_to(root).parts[:-1]
        if len(folders) < len(layout.levels):
            raise DataError(
                f"{f}: layout {layout.name!r} expects every image at least {len(layout.levels)} folder(s) "
                f"below {root}, found {len(folders)}"
            )
        for i, word in enumerate(layout.levels):
            field = LAYOUT_LEVELS[word]
            if field is not None:
                value = "/".join(folders[: i + 1]) if field == "patient" else folders[i]
                meta.setdefault(field, []).append(value)
    return {k: np.array(v) for k, v in meta.items()}


def _to_8bit(img: Image.Image) -> Image.Image:
    """16-bit and float images (common for medical TIFFs) are min-max scaled; PIL would clip them."""
    if img.mode not in ("I", "F") and not img.mode.startswith("I;16"):
        return img
    x = np.asarray(img, dtype=np.float64)
    return Image.fromarray(_scale_to_uint8(x, x.min(), x.max()))


# --- LGG segmentation dataset (kaggle_3m) layout -------------------------------------------------


def _lgg_cases(path: Path) -> list[Path]:
    """Case folders with at least one slice tif: the folder itself, or its children."""
    candidates = [path] if LGG_CASE.match(path.name) else sorted(p for p in path.iterdir() if p.is_dir())
    return [c for c in candidates if LGG_CASE.match(c.name) and _lgg_slices(c)]


def _lgg_slices(case: Path) -> list[tuple[int, Path]]:
    found = []
    for f in case.iterdir():
        m = LGG_SLICE.match(f.name)
        if m and m["case"] == case.name:
            found.append((int(m["slice"]), f))
    return sorted(found)


def _load_lgg(cases: list[Path], image_size, channels) -> ImageSet:
    images, site, patient, slice_index, tumor = [], [], [], [], []
    for case in cases:
        case_id, site_code = LGG_CASE.match(case.name).groups()
        for number, f in _lgg_slices(case):
            flair = _read_lgg_tif(f, "RGB")[..., 1]  # channels: pre-contrast, FLAIR, post-contrast
            mask = _read_lgg_tif(f.with_name(f.stem + "_mask.tif"), "L")
            images.append(fit_image(Image.fromarray(flair), image_size, channels))
            site.append(site_code)
            patient.append(case_id)
            slice_index.append(number)
            tumor.append(int(np.count_nonzero(mask)))
    meta = {
        "site": np.array(site),
        "patient": np.array(patient),
        "slice_index": np.array(slice_index, dtype=np.int16),
        "tumor_pixels": np.array(tumor, dtype=np.int32),
    }
    return ImageSet(np.stack(images), meta)


def _read_lgg_tif(f: Path, mode: str) -> np.ndarray:
    try:
        with Image.open(f) as img:
            found, pixels = img.mode, np.asarray(img)
    except (UnidentifiedImageError, OSError, ValueError) as e:
        raise DataError(f"{f}: not a readable tif ({type(e).__name__}: {e})") from e
    if found != mode:
        raise DataError(f"{f}: expected a {mode} tif (LGG layout), found mode {found}")
    return pixels


# --- DICOM -------------------------------------------------------------------------------------


def _is_dicom(f: Path) -> bool:
    if f.suffix.lower() == ".dcm":
        return True
    from pydicom.misc import is_dicom

    return is_dicom(f)


def _load_dicom(files: list[Path], image_size, channels) -> ImageSet:
    """One series per folder; each series is scaled to uint8 as a whole so slices stay comparable."""
    by_folder: dict[Path, list[Path]] = {}
    for f in files:
        by_folder.setdefault(f.parent, []).append(f)
    parts = [_load_dicom_series(folder, fs, image_size, channels) for folder, fs in sorted(by_folder.items())]
    shapes = {p.images.shape[1:] for p in parts}
    if len(shapes) > 1:
        raise DataError(
            f"DICOM series have different image sizes {sorted(shapes)}; give an image size to resize them "
            "(--size, data.image_size)"
        )
    meta = {k: np.concatenate([p.meta[k] for p in parts]) for k in parts[0].meta}
    return ImageSet(np.concatenate([p.images for p in parts]), meta)


def _load_dicom_series(folder: Path, files: list[Path], image_size, channels) -> ImageSet:
    import pydicom

    datasets = []
    for f in files:
        try:
            datasets.append(pydicom.dcmread(f))
        except Exception as e:  # pydicom raises many types for a bad file; all mean "unreadable"
            raise DataError(f"{f}: not a readable DICOM file ({type(e).__name__}: {e})") from e
    uids = {str(getattr(ds, "SeriesInstanceUID", "")) for ds in datasets}
    if len(uids) > 1:
        raise DataError(f"{folder}: expected one DICOM series per folder, found {len(uids)} SeriesInstanceUIDs")
    datasets = _sort_slices(folder, datasets)
    pixels = [_dicom_pixels(ds) for ds in datasets]
    if len({x.shape for x in pixels}) > 1:
        raise DataError(f"{folder}: slices of one series have different sizes {sorted({x.shape for x in pixels})}")
    volume = np.stack(pixels)
    images = _dicom_to_uint8(volume, datasets[0])
    patient = str(getattr(datasets[0], "PatientID", "") or folder.name)
    meta = {
        "patient": np.array([patient] * len(images)),
        "series": np.array([folder.name] * len(images)),
        "slice_index": np.arange(1, len(images) + 1, dtype=np.int16),
    }
    return ImageSet(fit_array(images, image_size, channels), meta)


def _sort_slices(folder: Path, datasets: list) -> list:
    if len(datasets) == 1:
        return datasets
    if all("ImagePositionPatient" in ds and "ImageOrientationPatient" in ds for ds in datasets):
        orient = np.asarray(datasets[0].ImageOrientationPatient, dtype=float)
        normal = np.cross(orient[:3], orient[3:])
        return sorted(datasets, key=lambda ds: float(np.dot(normal, np.asarray(ds.ImagePositionPatient, float))))
    if all("InstanceNumber" in ds for ds in datasets):
        return sorted(datasets, key=lambda ds: int(ds.InstanceNumber))
    raise DataError(f"{folder}: cannot order slices; expected ImagePositionPatient or InstanceNumber in every file")


def _dicom_pixels(ds) -> np.ndarray:
    try:
        x = ds.pixel_array
    except Exception as e:  # missing pixel data or an unsupported transfer syntax
        raise DataError(f"{ds.filename}: cannot decode DICOM pixel data ({type(e).__name__}: {e})") from e
    if x.ndim != 2:
        raise DataError(f"{ds.filename}: expected a single-frame grayscale slice, found pixel array {x.shape}")
    slope = float(getattr(ds, "RescaleSlope", 1) or 1)
    intercept = float(getattr(ds, "RescaleIntercept", 0) or 0)
    return x.astype(np.float64) * slope + intercept


def _dicom_to_uint8(volume: np.ndarray, first) -> np.ndarray:
    """Use the series' display window when it has one, else its min-max range."""
    if "WindowCenter" in first and "WindowWidth" in first:
        center, width = (_first_value(first.WindowCenter), _first_value(first.WindowWidth))
        images = _scale_to_uint8(volume, center - width / 2, center + width / 2)
    else:
        images = _scale_to_uint8(volume, volume.min(), volume.max())
    if getattr(first, "PhotometricInterpretation", "") == "MONOCHROME1":  # 0 means white
        images = 255 - images
    return images


def _first_value(v) -> float:
    from pydicom.multival import MultiValue

    return float(v[0]) if isinstance(v, MultiValue) else float(v)
