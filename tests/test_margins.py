"""Margins: values, gradients against finite differences (float64), angles past pi, filtering."""
from __future__ import annotations

import math

import pytest
import torch

from arcface.heads import AdaFace, CombinedMargin, CurricularFace
from arcface.heads.margins import monotone_cos

MARGINS = {
    "arcface": lambda: CombinedMargin(s=64, m1=1.0, m2=0.5, m3=0.0),
    "cosface": lambda: CombinedMargin(s=64, m1=1.0, m2=0.0, m3=0.4),
    "sphereface": lambda: CombinedMargin(s=64, m1=1.35, m2=0.0, m3=0.0),
    "sphereface4": lambda: CombinedMargin(s=64, m1=4.0, m2=0.0, m3=0.0),
    "combined": lambda: CombinedMargin(s=64, m1=1.2, m2=0.3, m3=0.2),
    "curricularface": lambda: CurricularFace(s=64, m=0.5),
    "adaface": lambda: AdaFace(s=64, m=0.4),
}


def _batch(rows: int = 6, cols: int = 9, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    logits = torch.rand(rows, cols, generator=g, dtype=torch.float64) * 1.8 - 0.9
    labels = torch.randint(0, cols, (rows,), generator=g)
    norms = torch.rand(rows, generator=g, dtype=torch.float64) * 30 + 5
    return logits, labels, norms


@pytest.mark.parametrize("name", sorted(MARGINS))
def test_gradient_matches_finite_differences(name):
    margin = MARGINS[name]().eval()  # frozen running statistics: a pure function of the logits
    logits, labels, norms = _batch()
    labels[1] = -1  # a row whose target lives on another shard
    target_cosine = torch.rand(6, dtype=torch.float64) * 1.8 - 0.9
    logits.requires_grad_(True)
    assert torch.autograd.gradcheck(
        lambda x: margin(x, labels, target_cosine=target_cosine, norms=norms), (logits,), eps=1e-6, atol=1e-5)


@pytest.mark.parametrize("m1,m2", [(1.0, 0.5), (1.0, 1.2), (1.35, 0.0), (4.0, 0.0), (2.0, 0.5)])
def test_target_logit_is_monotone_and_finite_past_pi(m1, m2):
    margin = CombinedMargin(s=1.0, m1=m1, m2=m2, m3=0.0)
    cosine = torch.linspace(-1, 1, 4001, dtype=torch.float64, requires_grad=True)
    target = margin.transform(cosine)
    target.sum().backward()
    assert torch.isfinite(target).all() and torch.isfinite(cosine.grad).all()
    # Larger cosine (smaller angle) must never give a smaller target logit, also where m1*theta + m2 > pi.
    assert (target.diff() >= -1e-12).all()
    assert (cosine.grad >= -1e-9).all()


def test_monotone_cos_is_continuous_and_extends_cos():
    phi = torch.linspace(0, 5 * math.pi, 20001, dtype=torch.float64)
    values = monotone_cos(phi)
    inside = phi <= math.pi
    torch.testing.assert_close(values[inside], torch.cos(phi[inside]))
    assert values.diff().abs().max() < 1e-3 and (values.diff() <= 1e-15).all()


def test_arcface_values_and_saturated_inputs():
    margin = CombinedMargin(s=2.0, m1=1.0, m2=0.5, m3=0.0)
    logits = torch.tensor([[0.3, -1.0, 1.0], [1.0, 0.2, -1.0]], requires_grad=True)
    labels = torch.tensor([0, 2])
    out = margin(logits, labels)
    assert out[0, 0].item() == pytest.approx(2 * math.cos(math.acos(0.3) + 0.5), abs=1e-5)
    assert out[0, 1].item() == pytest.approx(-2.0) and out[1, 0].item() == pytest.approx(2.0)
    out.sum().backward()
    assert torch.isfinite(out).all() and torch.isfinite(logits.grad).all()
    # theta = pi (cos = -1): past the turning point, below cos(pi) = -1.
    assert out[1, 2].item() < -2.0


def test_margin_gradient_differs_from_straight_through():
    logits, labels, _ = _batch()
    true_grad = torch.autograd.grad(CombinedMargin()(logits.requires_grad_(), labels).sum(), logits)[0]
    straight = torch.autograd.grad(CombinedMargin(straight_through=True)(logits, labels).sum(), logits)[0]
    torch.testing.assert_close(straight, torch.full_like(logits, 64.0))
    rows = torch.arange(len(labels))
    assert not torch.allclose(true_grad[rows, labels], straight[rows, labels])
    torch.testing.assert_close(CombinedMargin()(logits, labels), CombinedMargin(straight_through=True)(logits, labels))


def test_interclass_filtering_zeroes_only_high_negatives():
    margin = CombinedMargin(s=1.0, m1=1.0, m2=0.0, m3=0.0, interclass_filtering_threshold=0.4)
    logits = torch.tensor([[0.9, 0.5, 0.3, -0.2], [0.1, 0.45, 0.41, 0.2]])
    labels = torch.tensor([0, -1])
    expected = torch.tensor([[0.9, 0.0, 0.3, -0.2], [0.1, 0.0, 0.0, 0.2]])
    torch.testing.assert_close(margin(logits, labels), expected)


def test_curricularface_reweights_hard_negatives_and_tracks_mean():
    margin = CurricularFace(s=1.0, m=0.5, momentum=0.5)
    logits = torch.tensor([[0.5, 0.9, 0.0], [0.8, 0.1, 0.2]])
    labels = torch.tensor([0, 0])
    out = margin(logits, labels)
    t = 0.5 * (0.5 + 0.8) / 2
    assert margin.t.item() == pytest.approx(t)
    margined = math.cos(math.acos(0.5) + 0.5)
    assert out[0, 0].item() == pytest.approx(margined, abs=1e-6)
    assert out[0, 1].item() == pytest.approx(0.9 * (t + 0.9), abs=1e-6)  # hard: above the margined target
    assert out[0, 2].item() == pytest.approx(0.0) and out[1, 1].item() == pytest.approx(0.1)


def test_adaface_margin_follows_norm():
    margin = AdaFace(s=1.0, m=0.4, h=1.0).eval()
    margin.norm_mean.fill_(20.0)
    margin.norm_std.fill_(5.0)
    logits = torch.full((2, 3), 0.5)
    labels = torch.tensor([0, 0])
    out = margin(logits, labels, norms=torch.tensor([30.0, 10.0]))
    theta = math.acos(0.5)
    assert out[0, 0].item() == pytest.approx(math.cos(theta - 0.4) - 0.8, abs=1e-5)  # high quality: angular
    assert out[1, 0].item() == pytest.approx(math.cos(theta + 0.4) - 0.0, abs=1e-5)  # low quality
    with pytest.raises(ValueError):
        margin(logits, labels)


def test_standalone_call_needs_every_target_present():
    logits, labels, _ = _batch()
    labels[0] = -1
    with pytest.raises(ValueError):
        CurricularFace()(logits, labels)
