"""Pair-set verification metrics and the synthetic held-out pairs."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from arcface.data import SyntheticIdentities, synthetic_pair_set
from arcface.errors import UserError
from arcface.evaluation.verification import verification_scores


def _pairs(n: int, genuine_noise: float, seed: int = 0):
    rng = np.random.default_rng(seed)
    a = rng.normal(size=(n, 64))
    issame = np.arange(n) % 2 == 0
    b = np.where(issame[:, None], a + genuine_noise * rng.normal(size=(n, 64)), rng.normal(size=(n, 64)))
    emb = np.empty((2 * n, 64))
    emb[0::2], emb[1::2] = a, b
    return emb / np.linalg.norm(emb, axis=1, keepdims=True), issame


def test_separable_pairs_score_perfectly():
    acc, std, val = verification_scores(*_pairs(200, 0.05))
    assert acc == 1.0 and std == 0.0 and val == 1.0


def test_unrelated_pairs_score_at_chance():
    emb, issame = _pairs(400, 0.0)
    rng = np.random.default_rng(1)
    acc, _, _ = verification_scores(rng.permutation(emb), issame)
    assert 0.4 < acc < 0.6


def test_synthetic_pairs_are_held_out_and_balanced():
    pairs = synthetic_pair_set(20, num_identities=5, first_identity=100, seed=3)
    assert pairs.images.shape == (40, 3, 112, 112) and pairs.images.dtype == torch.uint8
    assert pairs.issame.sum() == 10
    train = SyntheticIdentities(num_classes=100, images_per_class=2, seed=3)
    assert not torch.equal(train.render(0, 0), pairs.images[0])
    again = synthetic_pair_set(20, num_identities=5, first_identity=100, seed=3)
    assert torch.equal(pairs.images, again.images)  # deterministic from the seed


def test_too_few_pairs_is_a_user_error():
    with pytest.raises(UserError, match="num_pairs"):
        synthetic_pair_set(4, num_identities=5, first_identity=0)
