"""Data layer: every loader on real files, partitions, hold-out, conversions, errors."""

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from collafuse.config import ConfigError, load_config
from collafuse.factory import load_client_data
from collafuse.data import (
    DataError,
    DataWarning,
    ImageSet,
    image_folder,
    image_sizes,
    load_images,
    normalise_intensity,
    partition,
    patient_ids,
    save_grid,
    save_images,
    save_side_by_side,
    split_holdout,
    to_model,
    to_uint8,
)

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
RAW_SAMPLE = SHARED / "data/lgg-mri/raw-sample"
BUNDLED = REPO / "data/lgg_flair_32.npz"
BUNDLED_128 = REPO / "data/lgg_flair_128.npz"
LGG_CASE = "TCGA_EZ_7264_20010816"

needs_raw = pytest.mark.skipif(not RAW_SAMPLE.is_dir(), reason=f"LGG raw sample not found at {RAW_SAMPLE}")


@pytest.fixture(scope="module")
def lgg() -> ImageSet:
    return load_images(BUNDLED)


# --- loaders -------------------------------------------------------------------------------------


def test_bundled_npz(lgg):
    assert lgg.images.shape == (3929, 32, 32) and lgg.images.dtype == np.uint8
    assert lgg.channels == 1
    assert set(lgg.meta) == {"site", "patient", "slice_index", "tumor_pixels"}
    assert sorted(set(lgg.meta["site"].tolist())) == ["CS", "DU", "EZ", "FG", "HT"]
    assert len(set(lgg.meta["patient"].tolist())) == 110


def test_npz_resize_and_rgb(lgg):
    small = load_images(BUNDLED, image_size=16, channels=3)
    assert small.images.shape == (3929, 16, 16, 3) and small.channels == 3
    # BOX from 32 to 16 is a 2x2 mean, so one pixel can be checked by hand
    expected = np.rint(lgg.images[100, :2, :2].astype(float).mean())
    assert abs(int(small.images[100, 0, 0, 0]) - expected) <= 1


@needs_raw
def test_lgg_case_folder_and_root():
    case = load_images(RAW_SAMPLE / LGG_CASE)
    root = load_images(RAW_SAMPLE)
    assert case.images.shape == (24, 256, 256)
    np.testing.assert_array_equal(case.images, root.images)
    assert case.meta["slice_index"].tolist() == list(range(1, 25))
    assert set(case.meta["site"].tolist()) == {"EZ"}
    assert set(case.meta["patient"].tolist()) == {"TCGA_EZ_7264"}
    flair = np.asarray(Image.open(RAW_SAMPLE / LGG_CASE / f"{LGG_CASE}_12.tif"))[..., 1]
    np.testing.assert_array_equal(case.images[11], flair)
    mask = np.asarray(Image.open(RAW_SAMPLE / LGG_CASE / f"{LGG_CASE}_17_mask.tif"))
    assert case.meta["tumor_pixels"][16] == np.count_nonzero(mask) > 0


@needs_raw
def test_lgg_matches_shared_128(lgg):
    shared = np.load(SHARED / "data/lgg-mri/lgg_flair_128.npz")
    ez = shared["site"] == "EZ"
    mine = load_images(RAW_SAMPLE, image_size=128)
    np.testing.assert_array_equal(mine.images, shared["images"][ez])
    np.testing.assert_array_equal(mine.meta["tumor_pixels"], shared["tumor_pixels"][ez])


def documented_prepare_command() -> list[str]:
    """The `collafuse data prepare` line of data/README.md that makes lgg_flair_128.npz."""
    lines = [line.split() for line in (REPO / "data/README.md").read_text().splitlines()]
    [command] = [words for words in lines if words[:3] == ["collafuse", "data", "prepare"]]
    return command


@needs_raw
def test_bundled_128_is_what_the_documented_command_makes(tmp_path):
    from collafuse.cli import main

    command = documented_prepare_command()
    source, output = command[3], command[4]
    assert source.endswith("kaggle_3m") and output == "data/lgg_flair_128.npz"
    # the raw sample is one case folder of kaggle_3m, in its layout: stand it in for the source
    prepared = tmp_path / "prepared.npz"
    args = [str(RAW_SAMPLE) if w == source else str(prepared) if w == output else w
            for w in command[1:]]
    assert main(args) == 0
    mine, bundled = np.load(prepared), np.load(BUNDLED_128)
    assert sorted(mine.files) == sorted(bundled.files)
    rows = bundled["patient"] == LGG_CASE[:12]
    assert rows.sum() == len(mine["images"]) == 24
    for key in bundled.files:
        np.testing.assert_array_equal(mine[key], bundled[key][rows], err_msg=key)


def test_image_folder_odd_sizes(tmp_path):
    rng = np.random.default_rng(0)
    (tmp_path / "sub").mkdir()
    Image.fromarray(rng.integers(0, 256, (37, 53, 3), dtype=np.uint8)).save(tmp_path / "a.png")
    Image.fromarray(rng.integers(0, 256, (61, 29), dtype=np.uint8)).save(tmp_path / "sub/b.jpg", quality=95)
    Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(tmp_path / "c.tiff")
    (tmp_path / "notes.txt").write_text("not an image")
    gray = load_images(tmp_path, image_size=24)
    assert gray.images.shape == (3, 24, 24)
    assert gray.meta["file"].tolist() == ["a.png", "c.tiff", "sub/b.jpg"]
    assert load_images(tmp_path, image_size=50, channels=3).images.shape == (3, 50, 50, 3)
    with pytest.raises(DataError, match="different sizes"):
        load_images(tmp_path)


def write_tree(root: Path, layout: dict[str, int], seed: int = 0) -> list[Path]:
    """{relative folder: number of images}: small grayscale JPEGs of random sizes 12-40 px."""
    rng = np.random.default_rng(seed)
    written = []
    for folder, n in layout.items():
        (root / folder).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            h, w = rng.integers(12, 41, 2)
            f = root / folder / f"img{i}.jpg"
            Image.fromarray(rng.integers(0, 256, (h, w), dtype=np.uint8)).save(f)
            written.append(f)
    return written


def test_folder_layouts_auto(tmp_path):
    write_tree(tmp_path / "cls", {"glioma": 3, "meningioma": 2})
    write_tree(tmp_path / "both", {"A/glioma": 2, "A/tumor-free": 1, "B/glioma": 1, "B/extra/deep": 1})
    write_tree(tmp_path / "flat", {".": 2, "glioma": 1})
    cls = load_images(tmp_path / "cls", image_size=8)
    assert cls.meta["label"].tolist() == ["glioma"] * 3 + ["meningioma"] * 2
    assert set(cls.meta) == {"file", "label"}  # no site, no patient: nothing invented
    both = load_images(tmp_path / "both", image_size=8)
    assert both.meta["site"].tolist() == ["A", "A", "A", "B", "B"]
    assert both.meta["label"].tolist() == ["glioma", "glioma", "tumor-free", "extra", "glioma"]
    assert set(load_images(tmp_path / "flat", image_size=8).meta) == {"file"}
    assert image_folder(tmp_path / "both").layout.name == "site/class"
    assert image_folder(tmp_path / "cls").layout.name == "class"
    assert image_folder(tmp_path / "flat").layout.name == "flat"
    assert image_folder(BUNDLED) is None  # not a folder


def test_folder_layouts_given(tmp_path):
    write_tree(tmp_path, {"A/001": 2, "B/001": 1, "B/002": 1})
    sites = load_images(tmp_path, image_size=8, layout="site")
    assert sites.meta["site"].tolist() == ["A", "A", "B", "B"] and "label" not in sites.meta
    patients = load_images(tmp_path, image_size=8, layout="site/patient")
    assert patients.meta["patient"].tolist() == ["A/001", "A/001", "B/001", "B/002"]  # sites kept apart
    assert load_images(tmp_path, image_size=8, layout="skip/class").meta["label"].tolist()[2:] == ["001", "002"]
    assert set(load_images(tmp_path, image_size=8, layout="flat").meta) == {"file"}
    with pytest.raises(DataError, match=r"expects every image at least 3 folder\(s\)"):
        load_images(tmp_path, image_size=8, layout="site/class/patient")
    for bad in ("hospital", "site/site", "site//class", ""):
        with pytest.raises(DataError, match="expected 'auto', 'flat' or one word per folder level"):
            load_images(tmp_path, image_size=8, layout=bad)
    with pytest.raises(DataError, match="applies to folders of images only"):
        load_images(BUNDLED, layout="site")


def test_folder_skips_hidden_files_and_reports_mixed_sizes(tmp_path):
    files = write_tree(tmp_path, {"glioma": 3})
    (tmp_path / "glioma/._img0.jpg").write_bytes(b"mac resource fork, not a JPEG")
    (tmp_path / "__MACOSX/glioma").mkdir(parents=True)
    (tmp_path / "__MACOSX/glioma/img0.jpg").write_bytes(b"neither")
    assert len(load_images(tmp_path, image_size=8)) == 3
    assert [tuple(s) for s in image_sizes(files)] == [Image.open(f).size for f in files]
    with pytest.raises(DataError, match=r"images have 3 different sizes \(width \d+-\d+, height \d+-\d+ px\)"):
        load_images(tmp_path)


def test_save_images_with_file_meta(tmp_path):
    """An image folder's "file" meta used to collide with np.savez_compressed(file, ...)."""
    write_tree(tmp_path / "src", {"A/glioma": 2, "B/meningioma": 2})
    images = load_images(tmp_path / "src", image_size=16)
    save_images(images, tmp_path / "out.npz")
    back = load_images(tmp_path / "out.npz")
    np.testing.assert_array_equal(back.images, images.images)
    assert set(back.meta) == {"file", "site", "label"}
    for key in images.meta:
        np.testing.assert_array_equal(back.meta[key], images.meta[key])
    with np.load(tmp_path / "out.npz", allow_pickle=False) as npz:  # a plain npz for numpy too
        assert sorted(npz.files) == ["file", "images", "label", "site"]


def test_center_crop(tmp_path):
    x = np.zeros((10, 30), np.uint8)
    x[:, 10:20] = 255  # only the central square is white
    Image.fromarray(x).save(tmp_path / "wide.png")
    assert (load_images(tmp_path / "wide.png", image_size=10).images == 255).all()


def test_nifti(tmp_path):
    nib = pytest.importorskip("nibabel")
    volume = np.arange(8 * 6 * 5, dtype=np.float32).reshape(8, 6, 5) - 50.0
    nib.save(nib.Nifti1Image(volume, np.eye(4)), tmp_path / "brain01.nii.gz")
    s = load_images(tmp_path / "brain01.nii.gz")
    assert s.images.shape == (5, 6, 8)  # one image per slice of the last axis
    assert s.images.min() == 0 and s.images.max() == 255  # min-max over the volume
    assert s.meta["patient"].tolist() == ["brain01"] * 5
    assert s.meta["slice_index"].tolist() == [1, 2, 3, 4, 5]
    assert load_images(tmp_path / "brain01.nii.gz", image_size=4).images.shape == (5, 4, 4)


def _write_dicom(path, pixels, instance, z, series_uid, window=None):
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = MRImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.PatientID, ds.Modality, ds.SeriesInstanceUID = "P042", "MR", series_uid
    ds.InstanceNumber = instance
    ds.ImagePositionPatient = [0, 0, z]
    ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    ds.RescaleSlope, ds.RescaleIntercept = 2, -100
    if window:
        ds.WindowCenter, ds.WindowWidth = window
    ds.PixelData = pixels.astype(np.uint16).tobytes()
    ds.save_as(path, enforce_file_format=True)


def test_dicom_series(tmp_path):
    uid = "1.2.826.0.1.3680043.8.498.1"
    # files written in scrambled order; the third has no .dcm suffix but a DICOM preamble
    for name, z in [("b.dcm", 2.0), ("a.dcm", 3.0), ("c", 1.0)]:
        _write_dicom(tmp_path / name, np.full((12, 10), int(z) * 100), instance=int(z), z=z, series_uid=uid)
    s = load_images(tmp_path)
    assert s.images.shape == (3, 12, 10)
    # sorted by position; values 100, 200, 300 -> 100, 300, 500 after rescale -> min-max over the series
    np.testing.assert_allclose([int(im[0, 0]) for im in s.images], [0, 127.5, 255], atol=0.5)
    assert s.meta["patient"].tolist() == ["P042"] * 3
    assert load_images(tmp_path, image_size=8, channels=3).images.shape == (3, 8, 8, 3)


def test_dicom_window(tmp_path):
    uid = "1.2.826.0.1.3680043.8.498.2"
    for i in (1, 2):
        _write_dicom(tmp_path / f"{i}.dcm", np.full((8, 8), i * 100), i, float(i), uid, window=(200, 200))
    s = load_images(tmp_path)
    # rescaled values 100 and 300 fall on the window edges [100, 300]
    assert [int(im[0, 0]) for im in s.images] == [0, 255]


def test_save_images_round_trip(tmp_path, lgg):
    part = lgg.subset(np.arange(10))
    save_images(part, tmp_path / "x.npz")
    back = load_images(tmp_path / "x.npz")
    np.testing.assert_array_equal(back.images, part.images)
    for key in part.meta:
        np.testing.assert_array_equal(back.meta[key], part.meta[key])


# --- partitions and hold-out ---------------------------------------------------------------------


def test_partition_by_site(lgg):
    clients = partition(lgg, "site", ["DU", "HT", "FG"], seed=0)
    assert {k: len(v) for k, v in clients.items()} == {"DU": 1878, "HT": 1029, "FG": 640}
    with pytest.raises(DataError, match="'XX' has no images"):
        partition(lgg, "site", ["DU", "XX"], seed=0)


def test_holdout_by_site(lgg):
    train, holdout = split_holdout(lgg, holdout_sites=["CS", "EZ"])
    assert len(holdout) == 382 and len(train) == 3929 - 382
    assert not set(train.meta["patient"].tolist()) & set(holdout.meta["patient"].tolist())


def test_holdout_by_fraction(lgg):
    train, holdout = split_holdout(lgg, holdout_fraction=0.2, seed=3)
    assert len(set(holdout.meta["patient"].tolist())) == 22
    assert not set(train.meta["patient"].tolist()) & set(holdout.meta["patient"].tolist())
    assert len(train) + len(holdout) == len(lgg)
    again, _ = split_holdout(lgg, holdout_fraction=0.2, seed=3)
    np.testing.assert_array_equal(again.images, train.images)


def _assignment(clients: dict[str, ImageSet], lgg: ImageSet) -> np.ndarray:
    """Which client each image went to, found via a unique id stored in meta."""
    owner = np.full(len(lgg), -1)
    for i, part in enumerate(clients.values()):
        assert (owner[part.meta["uid"]] == -1).all()  # no image in two clients
        owner[part.meta["uid"]] = i
    return owner


@pytest.mark.parametrize("by", ["patient", "iid", "dirichlet"])
def test_seeded_partitions_cover_everything(by, lgg):
    tagged = ImageSet(lgg.images, {**lgg.meta, "uid": np.arange(len(lgg))})
    a = _assignment(partition(tagged, by, 4, seed=1), tagged)
    assert (a >= 0).all()  # every image exactly once
    np.testing.assert_array_equal(a, _assignment(partition(tagged, by, 4, seed=1), tagged))
    assert (a != _assignment(partition(tagged, by, 4, seed=2), tagged)).any()
    if by == "patient":  # whole patients stay together
        clients = partition(tagged, by, 4, seed=1)
        names = [set(c.meta["patient"].tolist()) for c in clients.values()]
        assert sum(len(n) for n in names) == 110 and list(clients) == ["client0", "client1", "client2", "client3"]


def test_iid_equal_and_dirichlet_skew(lgg):
    sizes = [len(c) for c in partition(lgg, "iid", 3, seed=0).values()]
    assert max(sizes) - min(sizes) <= 1
    skewed = partition(lgg, "dirichlet", 3, seed=0, alpha=0.1)
    shares = [np.mean(c.meta["site"] == "DU") for c in skewed.values()]
    assert max(shares) - min(shares) > 0.3  # small alpha: clients differ a lot in site mix


@pytest.mark.parametrize(
    "by, clients, match",
    [("hospital", 3, "unknown by='hospital'"), ("patient", 0, "int k >= 1"), ("iid", 4000, "without images")],
)
def test_partition_errors(lgg, by, clients, match):
    with pytest.raises(DataError, match=match):
        partition(lgg, by, clients, seed=0)


def _no_patients(n: int = 20) -> ImageSet:
    """An image folder's data: site and label from the layout, no patient ids."""
    return ImageSet(
        np.arange(n, dtype=np.uint8)[:, None, None].repeat(4, 1).repeat(4, 2),
        {"site": np.array(["A", "B"] * (n // 2)), "label": np.array(["x"] * (n // 4) + ["y"] * (n - n // 4))},
    )


def test_holdout_without_patient_ids():
    images = _no_patients()
    with pytest.warns(DataWarning, match="no patient ids, so each image counts as its own patient"):
        train, holdout = split_holdout(images, holdout_fraction=0.2, seed=0)
    assert (len(train), len(holdout)) == (16, 4)
    assert not set(train.images[:, 0, 0].tolist()) & set(holdout.images[:, 0, 0].tolist())
    train, holdout = split_holdout(images, holdout_sites=["B"])  # by site: no patients needed
    assert set(holdout.meta["site"].tolist()) == {"B"} and len(train) == 10
    assert len(set(patient_ids(images).tolist())) == 20
    train, holdout = split_holdout(images)  # no hold-out asked for: nothing held out
    assert (len(train), len(holdout)) == (20, 0)
    with pytest.raises(DataError, match="needs a site per image, but the data has fields \\['file'\\]"):
        split_holdout(ImageSet(images.images, {"file": images.meta["label"]}), holdout_sites=["CS"])


def test_partition_by_label_and_without_patients():
    images = _no_patients()
    by_name = partition(images, "label", ["y", "x"], seed=0)
    assert list(by_name) == ["y", "x"] and (len(by_name["y"]), len(by_name["x"])) == (15, 5)
    dealt = partition(images, "label", 2, seed=0)
    assert sorted(len(c) for c in dealt.values()) == [5, 15]
    assert all(len(set(c.meta["label"].tolist())) == 1 for c in dealt.values())  # whole labels
    with pytest.raises(DataError, match="left client2 without images"):
        partition(images, "label", 3, seed=0)
    with pytest.raises(DataError, match="label 'z' has no images"):
        partition(images, "label", ["z"], seed=0)
    with pytest.warns(DataWarning, match="no patient ids"):
        assert sum(len(c) for c in partition(images, "patient", 3, seed=0).values()) == 20
    skewed = partition(ImageSet(images.images, {"label": images.meta["label"]}), "dirichlet", 2, seed=0, alpha=5)
    assert sum(len(c) for c in skewed.values()) == 20  # skew over labels when there are no sites
    with pytest.raises(DataError, match="partition: needs a site per image.*'site/class'"):
        partition(ImageSet(images.images), "site", ["A"], seed=0)


def test_config_layout_and_label_partition():
    cfg = load_config(None, ["data.layout=site/class", "data.partition=label"])
    assert (cfg.data.layout, cfg.data.partition) == ("site/class", "label")
    assert load_config(None, []).data.layout == "auto"
    with pytest.raises(ConfigError, match="data.layout: expected 'auto', 'flat' or folder levels"):
        load_config(None, ["data.layout=hospital/class"])
    with pytest.raises(ConfigError, match="data.partition: expected 'site', 'label'"):
        load_config(None, ["data.partition=hospital"])


# --- conversions ---------------------------------------------------------------------------------


def test_to_model_round_trip():
    gray = np.arange(256, dtype=np.uint8).reshape(4, 8, 8)
    x = to_model(gray)
    assert x.dtype == torch.float32 and x.shape == (4, 1, 8, 8)
    assert x.min() == -1 and x.max() == 1
    np.testing.assert_array_equal(to_uint8(x), gray)
    rgb = np.random.default_rng(0).integers(0, 256, (2, 5, 7, 3), dtype=np.uint8)
    assert to_model(rgb).shape == (2, 3, 5, 7)
    np.testing.assert_array_equal(to_uint8(to_model(rgb)), rgb)
    assert to_uint8(torch.tensor([[[[-3.0, 3.0]]]])).tolist() == [[[0, 255]]]


def test_normalise_intensity():
    x = np.zeros((3, 20, 20), np.uint8)
    x[1] = np.linspace(0, 100, 400).reshape(20, 20)
    x[2, 0, 0] = 9  # blank but for one pixel: left alone rather than blown up to 255
    out = normalise_intensity(x, "percentile")
    assert out.dtype == np.uint8
    assert (out[0] == 0).all()
    assert out[1].max() == 255 and out[1, 0, 0] == 0
    np.testing.assert_array_equal(out[2], x[2])
    assert normalise_intensity(x, "none") is x
    with pytest.raises(DataError, match="unknown method 'zscore'"):
        normalise_intensity(x, "zscore")


def test_save_grid(tmp_path, lgg):
    save_grid(lgg.images[:10], tmp_path / "grid.png", nrow=4)
    grid = np.asarray(Image.open(tmp_path / "grid.png"))
    assert grid.shape == (3 * 34 + 2, 4 * 34 + 2)
    assert not (tmp_path / "grid.png.tmp").exists()


def test_side_by_side_enlarges_each_pixel_into_a_block(tmp_path, lgg):
    real, generated = lgg.images[:4], lgg.images[4:8]
    save_side_by_side(real, generated, tmp_path / "pair.png", nrow=2, scale=3)
    pair = np.asarray(Image.open(tmp_path / "pair.png"))
    tile = 3 * lgg.images.shape[1]
    assert pair.shape == (2 * (tile + 2) + 2, 2 * (2 * (tile + 2) + 2) + 8)
    np.testing.assert_array_equal(pair[2:2 + tile:3, 2:2 + tile:3], real[0])
    np.testing.assert_array_equal(pair[3:2 + tile:3, 4:2 + tile:3], real[0])
    right = pair[:, 2 * (tile + 2) + 2 + 8:]
    np.testing.assert_array_equal(right[2 + tile + 2:2 * (tile + 2):3, 2:2 + tile:3], generated[2])
    with pytest.raises(DataError, match="scale must be an integer >= 1"):
        save_side_by_side(real, generated, tmp_path / "bad.png", nrow=2, scale=0)
    with pytest.raises(DataError, match=r"expected non-empty uint8 \(N,H,W\[,3\]\)"):
        save_side_by_side(real[0], generated[0], tmp_path / "bad.png", nrow=2, scale=3)


# --- errors --------------------------------------------------------------------------------------


def test_missing_path(tmp_path):
    with pytest.raises(DataError, match="nope.npz: no such file"):
        load_images(tmp_path / "nope.npz")


def test_corrupt_files(tmp_path):
    (tmp_path / "bad.png").write_bytes(b"\x00garbage" * 20)
    (tmp_path / "bad.npz").write_bytes(b"\x00garbage" * 20)
    with pytest.raises(DataError, match="bad.png: not a readable image"):
        load_images(tmp_path / "bad.png")
    with pytest.raises(DataError, match="bad.png: not a readable image"):
        load_images(tmp_path)  # a corrupt file in a folder is an error, not skipped
    with pytest.raises(DataError, match="bad.npz: not a readable .npz"):
        load_images(tmp_path / "bad.npz")


def test_empty_folder(tmp_path):
    with pytest.raises(DataError, match=f"{tmp_path.name}: no readable images"):
        load_images(tmp_path)


def test_npz_without_images(tmp_path):
    np.savez(tmp_path / "x.npz", a=np.zeros(3))
    with pytest.raises(DataError, match=r"x.npz: expected key 'images' .*found keys \['a'\]"):
        load_images(tmp_path / "x.npz")


def test_npz_with_object_array(tmp_path):
    np.savez(tmp_path / "x.npz", images=np.zeros((2, 4, 4), np.uint8), site=np.array(["A", None], dtype=object))
    with pytest.raises(DataError, match="x.npz: not a readable .npz without pickled objects"):
        load_images(tmp_path / "x.npz")


# --- partitions a user can trust ---------------------------------------------------------------


def _sites_and_labels(n_per: int = 60) -> ImageSet:
    """Two sites crossed with two labels, n_per images each: site and label independent."""
    site = np.repeat(np.array(["A", "B", "A", "B"]), n_per)
    label = np.repeat(np.array(["x", "x", "y", "y"]), n_per)
    images = np.arange(4 * n_per, dtype=np.uint8)[:, None, None].repeat(4, 1).repeat(4, 2)
    return ImageSet(images, {"site": site, "label": label, "patient": np.arange(4 * n_per).astype(str)})


def _spread(parts: dict, field: str, value: str) -> float:
    shares = [np.mean(p.meta[field] == value) for p in parts.values()]
    return max(shares) - min(shares)


def test_dirichlet_by_chooses_what_is_skewed():
    images = _sites_and_labels(500)
    for seed in range(3):
        by_label = partition(images, "dirichlet", 3, seed=seed, alpha=0.3, dirichlet_by="label",
                             min_images=100)
        by_site = partition(images, "dirichlet", 3, seed=seed, alpha=0.3, dirichlet_by="site",
                            min_images=100)
        # the clients differ in the chosen field; the other stays mixed as in the data (1:1)
        assert _spread(by_label, "label", "x") > 0.4 and _spread(by_label, "site", "A") < 0.15
        assert _spread(by_site, "site", "A") > 0.4 and _spread(by_site, "label", "x") < 0.15
    with pytest.raises(DataError, match="data has no labels; skew over its sites with "
                                         "dirichlet_by='site'"):
        partition(ImageSet(images.images, {"site": images.meta["site"]}), "dirichlet", 2, seed=0,
                  dirichlet_by="label")
    with pytest.raises(DataError, match="by='dirichlet' over site: needs a site per image"):
        partition(ImageSet(images.images), "dirichlet", 2, seed=0, dirichlet_by="site")
    with pytest.raises(DataError, match="dirichlet_by='hospital'"):
        partition(images, "dirichlet", 2, seed=0, dirichlet_by="hospital")


def test_dirichlet_redraws_until_every_client_has_the_minimum(lgg):
    sizes = lambda parts: sorted(len(p) for p in parts.values())  # noqa: E731
    assert sizes(partition(lgg, "dirichlet", 5, seed=3, alpha=0.1))[0] < 100  # skewed: small ones
    assert sizes(partition(lgg, "dirichlet", 5, seed=3, alpha=0.1, min_images=100))[0] >= 100


def _saved(tmp_path, images: ImageSet) -> str:
    save_images(images, tmp_path / "images.npz")
    return str(tmp_path / "images.npz")


@pytest.mark.parametrize("few_in_b, overrides, message", [
    (False, ['data.partition="dirichlet"', "data.num_clients=4", "data.dirichlet_alpha=1.0"],
     r"^client client\d has \d+ training images, fewer than the minimum of 32: give fewer clients "
     r"\(data.num_clients\) or a larger data.dirichlet_alpha \(less skew\), or lower "
     r"data.min_images_per_client$"),
    (True, ['data.clients=["A", "B"]'],
     r"^client B has 10 training images, fewer than the minimum of 32: leave that site out of "
     r"data.clients, or lower data.min_images_per_client$"),
    (False, ["data.partition=iid", "data.num_clients=3", "data.client_holdout_fraction=0.25"],
     r"^client client\d has 30 training images, fewer than the minimum of 32: give fewer clients "
     r"\(data.num_clients\), a smaller data.client_holdout_fraction, or lower "
     r"data.min_images_per_client$"),
])
def test_a_client_under_the_minimum_is_a_one_line_error(tmp_path, few_in_b, overrides, message):
    """The brief's case: a partition that leaves a client a handful of images is refused, naming
    the client, its count and what to change (120 images: 4 clients cannot all have 32)."""
    images = _sites_and_labels(30)  # sites A and B, 60 images each
    if few_in_b:  # site B keeps 10
        images = images.subset(np.flatnonzero((images.meta["site"] == "A")
                                               | (np.arange(len(images)) % 6 == 1)))
    save_images(images, tmp_path / "images.npz")
    cfg = load_config(None, [f'data.path="{tmp_path / "images.npz"}"', "data.holdout_sites=[]",
                             *overrides])
    with pytest.raises(DataError, match=message):
        load_client_data(cfg)
    cfg.data.min_images_per_client = 8  # the fix the message names
    assert all(len(p) >= 8 for p in load_client_data(cfg).clients.values())
