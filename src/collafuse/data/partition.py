"""Splitting an ImageSet into clients, and holding out whole patients for evaluation."""

from __future__ import annotations

import numpy as np

from .imageset import DataError, ImageSet

PARTITIONS = ("site", "patient", "iid", "dirichlet")


def partition(
    images: ImageSet, by: str, clients: list[str] | int, seed: int, alpha: float = 0.5
) -> dict[str, ImageSet]:
    """Split images into clients; every returned client has at least one image.

    by="site": clients is a list of site codes, each client gets its site's images (others unused).
    by="patient": clients=k; whole patients, shuffled with seed, dealt round-robin to client0..k-1.
    by="iid": clients=k; a seeded random permutation split into k near-equal parts.
    by="dirichlet": clients=k; for each site, its images are split over the clients with
    Dirichlet(alpha) proportions (label skew; smaller alpha = more skew).
    """
    if by not in PARTITIONS:
        raise DataError(f"partition: unknown by={by!r}; expected one of {', '.join(PARTITIONS)}")
    if by == "site":
        return _by_site(images, clients)
    k = _client_count(clients, by)
    rng = np.random.default_rng(seed)
    if by == "patient":
        groups = _by_patient(images, k, rng)
    elif by == "iid":
        groups = np.array_split(rng.permutation(len(images)), k)
    else:
        groups = _by_dirichlet(images.meta_field("site"), k, alpha, rng)
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


def _by_site(images: ImageSet, sites) -> dict[str, ImageSet]:
    if isinstance(sites, (str, int)) or not sites:
        raise DataError(f"partition: by='site' expects clients to be a non-empty list of site codes, found {sites!r}")
    site = images.meta_field("site")
    out = {}
    for code in sites:
        idx = np.flatnonzero(site == code)
        if len(idx) == 0:
            raise DataError(f"partition: site {code!r} has no images; sites present: {sorted(set(site.tolist()))}")
        out[str(code)] = images.subset(idx)
    return out


def _by_patient(images: ImageSet, k: int, rng: np.random.Generator) -> list[np.ndarray]:
    patient = images.meta_field("patient")
    names = rng.permutation(np.unique(patient))
    return [np.flatnonzero(np.isin(patient, names[i::k])) for i in range(k)]


def _by_dirichlet(site: np.ndarray, k: int, alpha: float, rng, attempts: int = 100) -> list[np.ndarray]:
    """Per site, Dirichlet(alpha) shares of its images; re-drawn (seeded) while a client is empty.

    Re-drawing is the usual practice (e.g. in FedLab / Flower's DirichletPartitioner) because a
    client without data cannot train; if it keeps happening, alpha or k is unsuitable.
    """
    if alpha <= 0:
        raise DataError(f"partition: alpha must be > 0, found {alpha}")
    for _ in range(attempts):
        groups = [[] for _ in range(k)]
        for code in np.unique(site):
            idx = rng.permutation(np.flatnonzero(site == code))
            cuts = (np.cumsum(rng.dirichlet(np.full(k, alpha)))[:-1] * len(idx)).astype(int)
            for g, part in zip(groups, np.split(idx, cuts)):
                g.extend(part.tolist())
        if all(groups):
            return [np.array(g, dtype=np.int64) for g in groups]
    raise DataError(
        f"partition: by='dirichlet' left a client empty in {attempts} draws (k={k}, alpha={alpha}, {len(site)} images)"
    )


def split_holdout(
    images: ImageSet,
    holdout_sites: list[str] | None = None,
    holdout_fraction: float = 0.0,
    seed: int = 0,
) -> tuple[ImageSet, ImageSet]:
    """(train, holdout) with whole patients held out: all patients of holdout_sites, or a seeded
    fraction of patients. With neither, the hold-out set is empty."""
    patient = images.meta_field("patient")
    if holdout_sites and holdout_fraction:
        raise DataError("split_holdout: give holdout_sites or holdout_fraction, not both")
    if not 0.0 <= holdout_fraction < 1.0:
        raise DataError(f"split_holdout: holdout_fraction must be in [0, 1), found {holdout_fraction}")
    if holdout_sites:
        site = images.meta_field("site")
        for code in holdout_sites:
            if not np.any(site == code):
                raise DataError(
                    f"split_holdout: site {code!r} has no images; sites present: {sorted(set(site.tolist()))}"
                )
        held = np.unique(patient[np.isin(site, holdout_sites)])
    else:
        names = np.unique(patient)
        held = np.random.default_rng(seed).permutation(names)[: round(holdout_fraction * len(names))]
    mask = np.isin(patient, held)
    train, holdout = images.subset(np.flatnonzero(~mask)), images.subset(np.flatnonzero(mask))
    shared = set(train.meta["patient"].tolist()) & set(holdout.meta["patient"].tolist())
    assert not shared, f"split_holdout: patients in both train and hold-out: {sorted(shared)[:5]}"
    return train, holdout
