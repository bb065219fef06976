"""Margin functions over cosine logits: the combined (ArcFace/CosFace/SphereFace) margin, CurricularFace, AdaFace.

Every margin is called the same way by the classifier head:

    scaled = margin(logits, labels, target_cosine=..., norms=...)

`logits` (B, K) are cosines between the batch and the K class centres this process holds; `labels` (B,) is the column
of each row's target, or -1 where the target centre lives elsewhere (another shard). `target_cosine` (B,) is every
row's target cosine wherever it lives and `norms` (B,) the embeddings' norms before normalisation; both are
detached, and margins that do not need them ignore them. Margins keep any running statistics as buffers, so they are
saved with the head.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn

# Keeps acos away from +-1, where its derivative is infinite.
_COS_EPS = 1e-7


def monotone_cos(phi: torch.Tensor) -> torch.Tensor:
    """(-1)^k cos(phi) - 2k with k = floor(phi / pi): equals cos(phi) on [0, pi] and keeps decreasing past it.

    A margin pushes the target angle phi = m1*theta + m2 beyond pi for hard samples; plain cos would turn back up
    there and reward the wrong direction. This extension (SphereFace's psi) is continuous, monotone and finite.
    """
    k = torch.floor(phi / math.pi).detach()
    sign = 1.0 - 2.0 * torch.remainder(k, 2.0)
    return sign * torch.cos(phi) - 2.0 * k


def _precise(x: torch.Tensor) -> torch.Tensor:
    """Half-precision values promoted to float32 for acos/cos; float32 and float64 kept as they are."""
    return x.float() if x.element_size() < 4 else x


class Targets:
    """Each row's target column among the logits held here, read and written with fixed-size gather/scatter.

    A row whose target lives on another shard (label -1) reads column 0 and writes back what it read, so no shape
    depends on how many targets are here: the host never waits for the device to count them.
    """

    def __init__(self, labels: torch.Tensor, columns: int):
        self.here = labels >= 0
        self.cols = labels.clamp_min(0).unsqueeze(1)
        self.columns = columns

    def read(self, logits: torch.Tensor) -> torch.Tensor:
        """(B,) each row's target logit (column 0 for rows without one; zeros when there are no columns)."""
        if not self.columns:
            return logits.new_zeros(logits.shape[0])
        return logits.gather(1, self.cols).squeeze(1)

    def write(self, logits: torch.Tensor, values: torch.Tensor, current: torch.Tensor) -> torch.Tensor:
        """`logits` with each present target replaced by `values`; `current` is `read(logits)`."""
        if not self.columns:
            return logits.clone()  # the caller scales the result in place
        return logits.scatter(1, self.cols, torch.where(self.here, values, current).unsqueeze(1))

    def fill_(self, mask: torch.Tensor, value: bool) -> torch.Tensor:
        """Set a (B, K) bool mask to `value` at the present targets, in place."""
        if self.columns:
            current = mask.gather(1, self.cols)
            here = self.here.unsqueeze(1)
            mask.scatter_(1, self.cols, current | here if value else current & ~here)
        return mask


class Margin(nn.Module):
    """Common part: the scale `s` and inter-class filtering (negatives above a cosine threshold count as noise)."""

    def __init__(self, s: float, interclass_filtering_threshold: float = 0.0):
        super().__init__()
        self.s = s
        self.interclass_filtering_threshold = interclass_filtering_threshold

    def filter_negatives(self, logits: torch.Tensor, targets: Targets) -> torch.Tensor:
        """Zero negative cosines above the threshold: such a pair is likely the same identity under two labels."""
        if self.interclass_filtering_threshold <= 0:
            return logits
        with torch.no_grad():
            keep = targets.fill_(logits <= self.interclass_filtering_threshold, True).to(logits.dtype)
        return logits * keep

    @staticmethod
    def target_cosine_of(logits: torch.Tensor, labels: torch.Tensor, target_cosine: torch.Tensor | None):
        """The head's all-reduced target cosines, or (one process, every target present) read from `logits`."""
        if target_cosine is not None:
            return target_cosine
        if bool((labels < 0).any()):
            raise ValueError("target_cosine is required when some targets are not among the logits' columns")
        return logits.detach().gather(1, labels.unsqueeze(1)).squeeze(1)

    def extra_repr(self) -> str:
        return f"s={self.s}, interclass_filtering_threshold={self.interclass_filtering_threshold}"


class CombinedMargin(Margin):
    """Target logit cos(m1*theta + m2) - m3, every logit times s: ArcFace (1, m, 0), CosFace (1, 0, m),
    SphereFace (m>1, 0, 0) and any combination.

    The gradient flows through the margin (d/dcos of the transformed target), and angles past pi follow
    `monotone_cos`. `straight_through=True` is the reference's behaviour instead: the margin is added as a constant,
    so the gradient is that of the plain cosine.
    """

    def __init__(self, s: float = 64.0, m1: float = 1.0, m2: float = 0.5, m3: float = 0.0,
                 interclass_filtering_threshold: float = 0.0, straight_through: bool = False):
        super().__init__(s, interclass_filtering_threshold)
        if m1 < 1 or m2 < 0 or m3 < 0:
            raise ValueError(f"margin needs m1 >= 1, m2 >= 0, m3 >= 0; got ({m1}, {m2}, {m3})")
        self.m1, self.m2, self.m3 = m1, m2, m3
        self.straight_through = straight_through

    def transform(self, cosine: torch.Tensor) -> torch.Tensor:
        """The target logit before scaling, from the target cosine."""
        if self.m1 == 1 and self.m2 == 0:
            # CosFace: no angle needed, and skipping acos keeps the gradient exact at |cos| = 1.
            return cosine - self.m3
        theta = torch.acos(cosine.clamp(-1 + _COS_EPS, 1 - _COS_EPS))
        return monotone_cos(self.m1 * theta + self.m2) - self.m3

    def forward(self, logits: torch.Tensor, labels: torch.Tensor, target_cosine: torch.Tensor | None = None,
                norms: torch.Tensor | None = None) -> torch.Tensor:
        targets = Targets(labels, logits.shape[1])
        logits = self.filter_negatives(logits, targets)
        current = targets.read(logits)
        target = _precise(current)
        new_target = self.transform(target)
        if self.straight_through:
            new_target = target + (new_target - target).detach()
        return targets.write(logits, new_target.to(logits.dtype), current).mul_(self.s)

    def extra_repr(self) -> str:
        return (f"m1={self.m1}, m2={self.m2}, m3={self.m3}, straight_through={self.straight_through}, "
                f"{super().extra_repr()}")


class CurricularFace(Margin):
    """CurricularFace (Huang et al., 2020): ArcFace on the target; a hard negative (cosine above the row's margined
    target) becomes cos*(t + cos), where t follows the batch's mean target cosine, so hard negatives weigh little
    early in training and more as it converges."""

    def __init__(self, s: float = 64.0, m: float = 0.5, momentum: float = 0.01,
                 interclass_filtering_threshold: float = 0.0):
        super().__init__(s, interclass_filtering_threshold)
        self.m, self.momentum = m, momentum
        self.register_buffer("t", torch.zeros(()))

    def forward(self, logits: torch.Tensor, labels: torch.Tensor, target_cosine: torch.Tensor | None = None,
                norms: torch.Tensor | None = None) -> torch.Tensor:
        target_cosine = _precise(self.target_cosine_of(logits, labels, target_cosine))
        targets = Targets(labels, logits.shape[1])
        logits = self.filter_negatives(logits, targets)
        with torch.no_grad():
            if self.training:
                self.t.lerp_(target_cosine.mean(), self.momentum)
            # Each row's margined target, also for rows whose target centre is on another shard.
            threshold = monotone_cos(torch.acos(target_cosine.clamp(-1 + _COS_EPS, 1 - _COS_EPS)) + self.m)
            hard = targets.fill_(logits > threshold.to(logits.dtype).unsqueeze(1), False)
        logits = torch.where(hard, logits * (self.t.to(logits.dtype) + logits), logits)
        current = targets.read(logits)
        theta = torch.acos(_precise(current).clamp(-1 + _COS_EPS, 1 - _COS_EPS))
        new_target = monotone_cos(theta + self.m)
        return targets.write(logits, new_target.to(logits.dtype), current).mul_(self.s)

    def extra_repr(self) -> str:
        return f"m={self.m}, momentum={self.momentum}, {super().extra_repr()}"


class AdaFace(Margin):
    """AdaFace (Kim et al., 2022): the margin adapts to image quality, read from the embedding norm.

    With z = clip(h * (norm - mean) / (std + eps), -1, 1) over running batch statistics of the norms, the target
    becomes cos(clip(theta - m*z, 0, pi)) - (m + m*z): high-quality (large-norm) samples get an angular margin,
    low-quality ones an additive margin in the other direction.
    """

    def __init__(self, s: float = 64.0, m: float = 0.4, h: float = 0.333, momentum: float = 0.01,
                 interclass_filtering_threshold: float = 0.0):
        super().__init__(s, interclass_filtering_threshold)
        self.m, self.h, self.momentum = m, h, momentum
        # Starting values from the paper's code: a wide spread, so early z stays near 0.
        self.register_buffer("norm_mean", torch.tensor(20.0))
        self.register_buffer("norm_std", torch.tensor(100.0))

    def forward(self, logits: torch.Tensor, labels: torch.Tensor, target_cosine: torch.Tensor | None = None,
                norms: torch.Tensor | None = None) -> torch.Tensor:
        if norms is None:
            raise ValueError("AdaFace needs the embedding norms (the PartialFC head passes them)")
        targets = Targets(labels, logits.shape[1])
        logits = self.filter_negatives(logits, targets)
        with torch.no_grad():
            norms = _precise(norms).clamp(0.001, 100)
            if self.training and norms.numel() > 1:
                self.norm_mean.lerp_(norms.mean(), self.momentum)
                self.norm_std.lerp_(norms.std(), self.momentum)
            z = ((norms - self.norm_mean) / (self.norm_std + 1e-3) * self.h).clamp(-1, 1)
        current = targets.read(logits)
        theta = torch.acos(_precise(current).clamp(-1 + _COS_EPS, 1 - _COS_EPS))
        new_target = torch.cos((theta - self.m * z).clamp(_COS_EPS, math.pi - _COS_EPS)) - self.m * (1 + z)
        return targets.write(logits, new_target.to(logits.dtype), current).mul_(self.s)

    def extra_repr(self) -> str:
        return f"m={self.m}, h={self.h}, momentum={self.momentum}, {super().extra_repr()}"
