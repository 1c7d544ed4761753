"""Splitting an ImageSet into clients, and holding out whole patients for evaluation.

Data without a "patient" field (a folder of images whose layout has no patient level) counts
every image as its own patient; holding out or partitioning by patient then warns (DataWarning)
that slices of one patient may end up on both sides.
"""

from __future__ import annotations

import warnings

import numpy as np

from ..choices import DIRICHLET_BY, PARTITIONS, expected
from .imageset import DataError, ImageSet


class DataWarning(UserWarning):
    """Data that works, but not the way the user may assume (one line)."""


def partition(
    images: ImageSet, by: str, clients: list[str] | int, seed: int, alpha: float = 0.5,
    dirichlet_by: str | None = None, min_images: int = 1,
) -> dict[str, ImageSet]:
    """Split images into clients; every returned client has at least one image.

    by="site": clients is a list of site codes, each client gets its site's images (others unused).
    by="label": clients is a list of labels (as by="site"), or k: whole labels, shuffled with
    seed, dealt round-robin to client0..k-1.
    by="patient": clients=k; whole patients, shuffled with seed, dealt round-robin to client0..k-1.
    by="iid": clients=k; a seeded random permutation split into k near-equal parts.
    by="dirichlet": clients=k; for each value of ``dirichlet_by`` ("site" or "label"; None: site,
    or label when the data has no sites), its images are split over the clients with
    Dirichlet(alpha) proportions (smaller alpha = more skew), re-drawn (seeded) until every client
    has ``min_images`` images, as Flower Datasets' DirichletPartitioner does with its
    ``min_partition_size``. Other partitions ignore ``min_images``: see require_min_images.
    """
    if by not in PARTITIONS:
        raise DataError(f"partition: unknown by={by!r}; expected one of {', '.join(PARTITIONS)}")
    if by == "site" or (by == "label" and not isinstance(clients, (int, np.integer))):
        return _by_value(images, by, clients)
    k = _client_count(clients, by)
    rng = np.random.default_rng(seed)
    if by in ("patient", "label"):
        groups = _by_group(_field(images, by, "partition"), k, rng)
    elif by == "iid":
        groups = np.array_split(rng.permutation(len(images)), k)
    else:
        skew = dirichlet_by or ("site" if "site" in images.meta or "label" not in images.meta
                                else "label")
        if skew not in DIRICHLET_BY:
            raise DataError(f"partition: dirichlet_by={skew!r}; expected {expected(DIRICHLET_BY)}")
        other = next(f for f in DIRICHLET_BY if f != skew)
        if skew not in images.meta and other in images.meta:
            raise DataError(f"partition: by='dirichlet' skews over each image's {skew}, but the "
                            f"data has no {skew}s; skew over its {other}s with "
                            f"dirichlet_by={other!r} (data.dirichlet_by)")
        groups = _by_dirichlet(_field(images, skew, f"partition: by='dirichlet' over {skew}"),
                               k, alpha, rng, max(1, min_images))
    for i, g in enumerate(groups):
        if len(g) == 0:
            raise DataError(
                f"partition: by={by!r} left client{i} without images ({len(images)} images for {k} clients)"
            )
    return {f"client{i}": images.subset(np.sort(g)) for i, g in enumerate(groups)}


def _client_count(clients, by: str) -> int:
    if isinstance(clients, bool) or not isinstance(clients, (int, np.integer)) or clients < 1:
        raise DataError(f"partition: by={by!r} expects clients to be an int k >= 1, found {clients!r}")
    return int(clients)


def patient_ids(images: ImageSet) -> np.ndarray:
    """meta "patient", or one id per image when the data has none (each image its own patient)."""
    if "patient" in images.meta:
        return images.meta["patient"]
    return np.array([f"image{i}" for i in range(len(images))])


def _field(images: ImageSet, name: str, who: str) -> np.ndarray:
    """meta[name]; for "patient" without one, each image its own patient (with a DataWarning);
    for "site" and "label" a DataError that says where they come from."""
    if name in images.meta:
        return images.meta[name]
    if name == "patient":
        warnings.warn(
            f"{who}: the data has no patient ids, so each image counts as its own patient and slices of "
            "one patient may land on both sides (an image folder gets patients from a 'patient' layout level)",
            DataWarning,
            stacklevel=3,
        )
        return patient_ids(images)
    if name in ("site", "label"):
        level = "site" if name == "site" else "class"
        raise DataError(
            f"{who}: needs a {name} per image, but the data has fields {sorted(images.meta)}; an image folder "
            f"gets one from a {level!r} folder level (layout 'site/class', '{level}')"
        )
    return images.meta_field(name)


def _by_value(images: ImageSet, by: str, codes) -> dict[str, ImageSet]:
    if isinstance(codes, (str, int)) or not codes:
        raise DataError(
            f"partition: by={by!r} expects clients to be a non-empty list of {by} names, found {codes!r}"
        )
    values = _field(images, by, "partition")
    out = {}
    for code in codes:
        idx = np.flatnonzero(values == code)
        if len(idx) == 0:
            raise DataError(f"partition: {by} {code!r} has no images; {by}s present: {sorted(set(values.tolist()))}")
        out[str(code)] = images.subset(idx)
    return out


def _by_group(values: np.ndarray, k: int, rng: np.random.Generator) -> list[np.ndarray]:
    names = rng.permutation(np.unique(values))
    return [np.flatnonzero(np.isin(values, names[i::k])) for i in range(k)]


def _by_dirichlet(site: np.ndarray, k: int, alpha: float, rng, min_size: int = 1,
                  attempts: int = 100) -> list[np.ndarray]:
    """Per value of ``site`` (a site or a label), Dirichlet(alpha) shares of its images; re-drawn
    (seeded) while a client has fewer than ``min_size``. If no draw in ``attempts`` gives every
    client that many, the draw whose smallest client is largest (require_min_images then names
    that client; an empty one is an error here).

    Re-drawing is the usual practice (e.g. in FedLab / Flower's DirichletPartitioner) because a
    client without data cannot train; if it keeps happening, alpha or k is unsuitable.
    """
    if alpha <= 0:
        raise DataError(f"partition: alpha must be > 0, found {alpha}")
    best: list[list[int]] = []
    for _ in range(attempts):
        groups: list[list[int]] = [[] for _ in range(k)]
        for code in np.unique(site):
            idx = rng.permutation(np.flatnonzero(site == code))
            cuts = (np.cumsum(rng.dirichlet(np.full(k, alpha)))[:-1] * len(idx)).astype(int)
            for g, part in zip(groups, np.split(idx, cuts)):
                g.extend(part.tolist())
        if not best or min(map(len, groups)) > min(map(len, best)):
            best = groups
        if min(map(len, best)) >= min_size:
            break
    if not all(best):
        raise DataError(f"partition: by='dirichlet' left a client empty in {attempts} draws "
                        f"(k={k}, alpha={alpha}, {len(site)} images)")
    return [np.array(g, dtype=np.int64) for g in best]


def require_min_images(parts: dict[str, ImageSet], minimum: int, fix: str) -> None:
    """A DataError naming the first client with fewer than ``minimum`` images, its count and
    ``fix`` (what to change), e.g. a skewed partition that left a client two images."""
    for name, part in parts.items():
        if len(part) < minimum:
            raise DataError(f"client {name} has {len(part)} training images, fewer than the "
                            f"minimum of {minimum}: {fix}")


def split_holdout(
    images: ImageSet,
    holdout_sites: list[str] | None = None,
    holdout_fraction: float = 0.0,
    seed: int = 0,
) -> tuple[ImageSet, ImageSet]:
    """(train, holdout) with whole patients held out: all images of holdout_sites, or a seeded
    fraction of patients (of images, with a DataWarning, when the data has no patient ids).
    With neither, the hold-out set is empty."""
    if holdout_sites and holdout_fraction:
        raise DataError("split_holdout: give holdout_sites or holdout_fraction, not both")
    if not 0.0 <= holdout_fraction < 1.0:
        raise DataError(f"split_holdout: holdout_fraction must be in [0, 1), found {holdout_fraction}")
    if holdout_sites:
        site = _field(images, "site", f"split_holdout: holdout_sites {list(holdout_sites)}")
        for code in holdout_sites:
            if not np.any(site == code):
                raise DataError(
                    f"split_holdout: site {code!r} has no images; sites present: {sorted(set(site.tolist()))}"
                )
        mask = np.isin(site, holdout_sites)
        if "patient" in images.meta:  # a patient seen at two sites goes with the hold-out
            mask = np.isin(images.meta["patient"], images.meta["patient"][mask])
    elif holdout_fraction:
        patient = _field(images, "patient", "split_holdout")
        names = np.unique(patient)
        held = np.random.default_rng(seed).permutation(names)[: round(holdout_fraction * len(names))]
        mask = np.isin(patient, held)
    else:
        mask = np.zeros(len(images), bool)
    train, holdout = images.subset(np.flatnonzero(~mask)), images.subset(np.flatnonzero(mask))
    if "patient" in images.meta:
        shared = set(train.meta["patient"].tolist()) & set(holdout.meta["patient"].tolist())
        assert not shared, f"split_holdout: patients in both train and hold-out: {sorted(shared)[:5]}"
    return train, holdout
