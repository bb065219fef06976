"""The 10-fold verification scores: the binned, cumulative computation gives exactly what testing each threshold
in turn gives, and known answers on constructed distances."""
from __future__ import annotations

import numpy as np
import pytest

from arcface.evaluation.verification import THRESHOLDS, verification_scores


def _scan_thresholds(embeddings, issame, folds=10, far_target=1e-3):
    """The protocol written out: every threshold tried on the training folds, one fold held out at a time."""
    dist = np.sum((embeddings[0::2] - embeddings[1::2]) ** 2, axis=1)
    bounds = np.cumsum([0] + [len(dist) // folds + (i < len(dist) % folds) for i in range(folds)])
    accuracies, vals = [], []
    for lo, hi in zip(bounds[:-1], bounds[1:]):
        test = np.zeros(len(dist), bool)
        test[lo:hi] = True
        train = ~test
        best, best_acc, far_ok = 0.0, -1.0, 0.0
        for t in THRESHOLDS:
            accept = dist[train] < t
            acc = np.mean(accept == issame[train])
            if acc > best_acc:
                best, best_acc = t, acc
            impostors = ~issame[train]
            if (accept[impostors].mean() if impostors.any() else 0.0) <= far_target:
                far_ok = t
        accuracies.append(np.mean((dist[test] < best) == issame[test]))
        genuine = issame[test]
        vals.append((dist[test] < far_ok)[genuine].mean() if genuine.any() else 0.0)
    return float(np.mean(accuracies)), float(np.std(accuracies)), float(np.mean(vals))


def _embeddings(distances: np.ndarray) -> np.ndarray:
    """Unit vectors in pairs whose squared distances are `distances` (|a - b|^2 = 2 - 2 cos)."""
    angle = np.arccos(1 - distances / 2)
    emb = np.zeros((2 * len(distances), 2))
    emb[0::2, 0] = 1
    emb[1::2, 0], emb[1::2, 1] = np.cos(angle), np.sin(angle)
    return emb


@pytest.mark.parametrize("pairs, noise, far", [(6000, 0.9, 1e-3), (1003, 1.3, 1e-1), (37, 0.6, 0.0), (15, 0.3, 1.0)])
def test_same_scores_as_trying_every_threshold(pairs, noise, far):
    rng = np.random.default_rng(pairs)
    a = rng.normal(size=(pairs, 32))
    issame = rng.random(pairs) < 0.5
    b = np.where(issame[:, None], a + noise * rng.normal(size=a.shape), rng.normal(size=a.shape))
    emb = np.empty((2 * pairs, 32))
    emb[0::2], emb[1::2] = a, b
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    assert verification_scores(emb, issame, far_target=far) == _scan_thresholds(emb, issame, far_target=far)


def test_one_impostor_per_fold_closer_than_every_genuine_pair():
    # Each fold of 10: five genuine pairs at 0.505, four impostors at 3.005 and one at 0.405. The best threshold
    # accepts that impostor, so each fold scores 9/10; keeping FAR <= 1e-3 means accepting none, genuine included.
    fold = np.array([0.505] * 5 + [3.005] * 4 + [0.405])
    issame = np.tile(np.arange(10) < 5, 10)
    acc, std, val = verification_scores(_embeddings(np.tile(fold, 10)), issame)
    assert acc == pytest.approx(0.9, abs=1e-12) and std == pytest.approx(0.0, abs=1e-12) and val == 0.0


def test_fold_sizes_follow_the_pair_order():
    # 12 pairs: folds of 2, 2, 1, ... (the first n % 10 folds are one larger). Only the first two pairs are
    # impostors closer than the genuine ones, and both sit in fold 0, which alone scores 0.
    distances = np.array([0.105, 0.105] + [0.505] * 10)
    issame = np.array([False, False] + [True] * 10)
    acc, std, _ = verification_scores(_embeddings(distances), issame)
    accuracies = np.array([0.0] + [1.0] * 9)
    assert acc == pytest.approx(accuracies.mean()) and std == pytest.approx(accuracies.std())
