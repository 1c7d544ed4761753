"""Are synthetic images useful? Train on synthetic, test on real (TSTR; Esteban et al. 2017).

The task: tell tumour from no-tumour slices (the class of a slice is whether its tumour mask
has a pixel, ``ImageSet.class_names``), with a small CNN, tested on the real slices of the
hold-out hospitals, which no party trained on. Trained on a client's real training slices
(TRTR), on as many of its synthetic labelled samples (TSTR), or on real and synthetic slices
together (augmentation). AUC and balanced accuracy, with percentile bootstrap intervals that
resample both the test slices and the classifier seeds; differences between two training sets
are paired (same seeds, same resamples).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from ..config import Config
from ..data import DataError, ImageSet, to_model
from ..factory import load_client_data

POSITIVE = "tumour"  # the class scored as positive


@dataclass
class LabelledImages:
    images: np.ndarray  # uint8 (N, H, W)
    labels: np.ndarray  # 1 = tumour, 0 = no-tumour
    sites: np.ndarray  # the hospital of each image ("synthetic:<client>" for generated ones)

    def __len__(self) -> int:
        return len(self.images)

    def subset(self, index) -> LabelledImages:
        return LabelledImages(self.images[index], self.labels[index], self.sites[index])


def labelled(images: ImageSet, site: str | None = None) -> LabelledImages:
    """An ImageSet's images with their tumour flag; ``site`` names them when meta has none."""
    flags = (images.class_names() == POSITIVE).astype(np.int64)
    sites = images.meta["site"] if site is None else np.full(len(images), site)
    return LabelledImages(images.images, flags, np.asarray(sites).astype(str))


def concat(*parts: LabelledImages) -> LabelledImages:
    return LabelledImages(*(np.concatenate([getattr(p, k) for p in parts])
                            for k in ("images", "labels", "sites")))


def utility_split(cfg: Config) -> tuple[dict[str, LabelledImages], LabelledImages]:
    """(each client's real training slices, the hold-out hospitals' slices): exactly the run's
    partition, so no client trains here on a slice its diffusion model did not see, and the
    test slices come from hospitals no party trained on (checked, not assumed)."""
    data = load_client_data(cfg)
    if not len(data.holdout):
        raise DataError("utility: the config holds out no images (data.holdout_sites)")
    clients = {cid: labelled(part) for cid, part in data.clients.items()}
    test = labelled(data.holdout)
    held = set(test.sites.tolist())
    for cid, part in clients.items():
        if leaked := held & set(part.sites.tolist()):
            raise DataError(f"utility: client {cid}'s training slices include hold-out "
                            f"hospital {sorted(leaked)[0]}")
    return clients, test


def balanced_pick(data: LabelledImages, n: int, rng: np.random.Generator) -> np.ndarray:
    """n random indices, half of each class where the set has that many."""
    pos = rng.permutation(np.flatnonzero(data.labels == 1))
    neg = rng.permutation(np.flatnonzero(data.labels == 0))
    k = min(len(pos), max(n // 2, n - len(neg)))
    return np.concatenate([pos[:k], neg[:n - k]])


def training_sets(real: dict[str, LabelledImages], synthetic: dict[str, LabelledImages],
                  n: int, rng: np.random.Generator, augmented: str) -> dict[str, LabelledImages]:
    """The training sets compared, by name: per client "TRTR <id>" (m of its real slices, m =
    min(n, its real slices)) and "TSTR <id>" (m of its synthetic ones, half of each class);
    "<augmented> real" (that client's real slices) and "<augmented> augmented" (the same plus
    every client's synthetic samples)."""
    sets = {}
    for cid, own in real.items():
        m = min(n, len(own))
        if len(synthetic.get(cid, ())) < m:
            raise DataError(f"utility: client {cid} needs {m} synthetic samples, found "
                            f"{len(synthetic.get(cid, ()))}; export more (-n)")
        sets[f"TRTR {cid}"] = own.subset(rng.permutation(len(own))[:m])
        sets[f"TSTR {cid}"] = synthetic[cid].subset(balanced_pick(synthetic[cid], m, rng))
    sets[f"{augmented} real"] = real[augmented]
    sets[f"{augmented} augmented"] = concat(real[augmented], *synthetic.values())
    return sets


def make_classifier(channels: int = 1) -> nn.Module:
    """A small CNN (three conv blocks, 16-32-64 channels, global average pool, one logit)."""
    def block(cin, cout):
        return [nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU(),
                nn.Conv2d(cout, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU()]
    return nn.Sequential(*block(channels, 16), nn.MaxPool2d(2), *block(16, 32), nn.MaxPool2d(2),
                         *block(32, 64), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 1))


def train_classifier(train: LabelledImages, seed: int, epochs: int = 15, batch_size: int = 64,
                     lr: float = 2e-3, steps: int | None = None) -> nn.Module:
    """Adam on the class-balanced logistic loss (real and synthetic sets differ in their tumour
    share; balancing makes the training set's prior irrelevant), random left-right flips.
    ``steps``: stop after that many optimiser steps instead of ``epochs`` passes (a control that
    gives a small set as many steps as a larger one gets, so a gain from more data is not a gain
    from more training)."""
    if len(set(train.labels.tolist())) < 2:
        raise DataError("utility: a training set needs slices of both classes")
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = make_classifier()
    x, y = to_model(train.images), torch.from_numpy(train.labels).float()
    pos_weight = (y == 0).sum() / (y == 1).sum()
    loss_fn = nn.BCEWithLogitsLoss(pos_weight=pos_weight)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    total = steps if steps is not None else epochs * steps_per_epoch(len(x), batch_size)
    done = 0
    while done < total:
        order = torch.randperm(len(x), generator=gen)
        for i in range(0, len(x), batch_size):
            if done == total:
                break
            done += 1
            idx = order[i:i + batch_size]
            xb = x[idx]
            flip = torch.rand(len(idx), generator=gen) < 0.5
            xb = torch.where(flip[:, None, None, None], xb.flip(-1), xb)
            opt.zero_grad()
            loss_fn(model(xb).squeeze(1), y[idx]).backward()
            opt.step()
    return model.eval()


def steps_per_epoch(num_images: int, batch_size: int = 64) -> int:
    return -(-num_images // batch_size)


@torch.inference_mode()
def predict(model: nn.Module, images: np.ndarray, batch_size: int = 256) -> np.ndarray:
    """The tumour probability of each image."""
    x = to_model(images)
    return torch.cat([torch.sigmoid(model(x[i:i + batch_size]).squeeze(1))
                      for i in range(0, len(x), batch_size)]).numpy()


def auc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Area under the ROC curve: the Mann-Whitney U over positives x negatives (ties: 1/2)."""
    pos, neg = scores[labels == 1], scores[labels == 0]
    if not len(pos) or not len(neg):
        return float("nan")
    ranks = _average_ranks(np.concatenate([pos, neg]))
    return float((ranks[:len(pos)].sum() - len(pos) * (len(pos) + 1) / 2) / (len(pos) * len(neg)))


def _average_ranks(x: np.ndarray) -> np.ndarray:
    order = np.argsort(x, kind="mergesort")
    ranks = np.empty(len(x))
    ranks[order] = np.arange(1, len(x) + 1)
    _, inverse, counts = np.unique(x, return_inverse=True, return_counts=True)
    sums = np.bincount(inverse, weights=ranks)
    return (sums / counts)[inverse]


def balanced_accuracy(scores: np.ndarray, labels: np.ndarray, threshold: float = 0.5) -> float:
    """Mean of the true-positive and true-negative rates at ``threshold``."""
    pred = scores >= threshold
    return float(((pred[labels == 1]).mean() + (~pred[labels == 0]).mean()) / 2)


METRICS = {"auc": auc, "balanced_accuracy": balanced_accuracy}


def bootstrap(scores: dict[str, np.ndarray], labels: np.ndarray, num_boot: int = 1000,
              seed: int = 0, level: float = 0.95) -> dict:
    """Per training set (scores: (seeds, test slices) each) and metric: the mean over seeds and
    a percentile interval over resamples of seeds and test slices; the same resamples for
    every set, so :func:`paired_difference` can difference them."""
    rng = np.random.default_rng(seed)
    n_seeds, n_test = next(iter(scores.values())).shape
    draws = [(rng.integers(n_seeds, size=n_seeds), rng.integers(n_test, size=n_test))
             for _ in range(num_boot)]
    out = {}
    for name, s in scores.items():
        for metric, fn in METRICS.items():
            point = float(np.mean([fn(row, labels) for row in s]))
            reps = np.array([np.mean([fn(s[k, t], labels[t]) for k in ks]) for ks, t in draws])
            out[name, metric] = {"mean": point, "reps": reps,
                                 "low": float(np.nanquantile(reps, (1 - level) / 2)),
                                 "high": float(np.nanquantile(reps, (1 + level) / 2))}
    return out


def paired_difference(boot: dict, a: str, b: str, metric: str = "auc",
                      level: float = 0.95) -> tuple[float, float, float]:
    """(mean, low, high) of metric(a) - metric(b) over the shared resamples of :func:`bootstrap`."""
    diff = boot[a, metric]["reps"] - boot[b, metric]["reps"]
    return (boot[a, metric]["mean"] - boot[b, metric]["mean"],
            float(np.nanquantile(diff, (1 - level) / 2)), float(np.nanquantile(diff, (1 + level) / 2)))


def scores_over_seeds(train: LabelledImages, test: LabelledImages, seeds: list[int],
                      epochs: int = 15, steps: int | None = None) -> np.ndarray:
    """(len(seeds), len(test)) tumour probabilities of classifiers trained on ``train``
    (``steps``: see :func:`train_classifier`)."""
    return np.stack([predict(train_classifier(train, s, epochs, steps=steps), test.images)
                     for s in seeds])
