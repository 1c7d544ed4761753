"""Train on synthetic, test on real (evaluation/utility.py) on the bundled slices."""

import numpy as np
import pytest
import torch

from collafuse.config import load_config
from collafuse.evaluation.utility import (auc, balanced_accuracy, bootstrap, paired_difference,
                                          scores_over_seeds, training_sets, utility_split)
from conftest import DEFAULT_DATA, REPO


@pytest.fixture(scope="module")
def split():
    cfg = load_config(REPO / "configs" / "conditional.toml", [f'data.path="{DEFAULT_DATA}"'])
    return cfg, *utility_split(cfg)


def test_split_never_trains_on_a_holdout_hospital(split):
    cfg, real, test = split
    assert set(test.sites.tolist()) == set(cfg.data.holdout_sites)
    for cid, own in real.items():
        assert set(own.sites.tolist()) == {cid}
    # and the clients' own hold-out patients stay out too: the run's partition, exactly
    assert {cid: len(own) for cid, own in real.items()} == {"DU": 1527, "HT": 740, "FG": 505}
    assert 0.2 < test.labels.mean() < 0.5


@pytest.mark.slow  # trains classifiers
def test_tstr_trains_on_the_synthetic_set(split):
    """Synthetic stand-ins with the labels flipped: a classifier trained on them must score
    below chance on the real test slices, while one trained on the real slices scores well.
    TSTR trained on real images by mistake would score well on both."""
    _, real, test = split
    small = {cid: own.subset(np.arange(0, len(own), max(1, len(own) // 200)))
             for cid, own in real.items()}
    flipped = {cid: type(own)(own.images, 1 - own.labels, np.full(len(own), f"synthetic:{cid}"))
               for cid, own in small.items()}
    sets = training_sets(small, flipped, 200, np.random.default_rng(0), "FG")
    assert all(set(sets[f"TSTR {c}"].sites) == {f"synthetic:{c}"} for c in small)
    assert set(sets["FG augmented"].sites) == {"FG", "synthetic:DU", "synthetic:HT", "synthetic:FG"}
    scores = {name: scores_over_seeds(sets[name], test, [0], epochs=6)
              for name in ("TRTR DU", "TSTR DU")}
    assert auc(scores["TRTR DU"][0], test.labels) > 0.75
    assert auc(scores["TSTR DU"][0], test.labels) < 0.4


def test_metrics_and_paired_bootstrap():
    labels = np.array([0, 0, 1, 1, 1, 0])
    assert auc(np.array([0.1, 0.2, 0.8, 0.9, 0.7, 0.3]), labels) == 1.0
    assert auc(np.array([0.5] * 6), labels) == 0.5  # ties count one half
    assert auc(np.array([0.9, 0.2, 0.1, 0.9, 0.7, 0.3]), labels) == pytest.approx(4.5 / 9)
    assert balanced_accuracy(np.array([0.1, 0.6, 0.8, 0.9, 0.2, 0.3]), labels) == pytest.approx(
        (2 / 3 + 2 / 3) / 2)
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 300)
    good = np.stack([y + rng.normal(0, 0.6, 300) for _ in range(3)])
    poor = np.stack([y + rng.normal(0, 2.0, 300) for _ in range(3)])
    boot = bootstrap({"good": good, "poor": poor}, y, num_boot=200)
    diff, low, high = paired_difference(boot, "good", "poor")
    assert 0 < low < diff < high
    assert boot["good", "auc"]["low"] < boot["good", "auc"]["mean"] < boot["good", "auc"]["high"]


def test_equal_steps_control_counts_optimiser_steps(split):
    """The control's ``steps`` are optimiser steps: as many as ``epochs`` passes give the same
    classifier, one more gives another (a control that silently trained by epochs would not)."""
    from collafuse.evaluation.utility import steps_per_epoch, train_classifier

    _, real, _ = split
    small = real["FG"].subset(np.arange(0, 100))
    small.labels[:10] = 1 - small.labels[:10]  # both classes for sure
    per_epoch = steps_per_epoch(len(small), batch_size=32)
    assert per_epoch == 4

    def weights(**kw):
        model = train_classifier(small, seed=0, batch_size=32, **kw)
        return torch.cat([p.detach().flatten() for p in model.parameters()])

    by_epochs = weights(epochs=2)
    assert torch.equal(weights(epochs=99, steps=2 * per_epoch), by_epochs)
    assert not torch.equal(weights(epochs=99, steps=2 * per_epoch + 1), by_epochs)
