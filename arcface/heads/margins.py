"""Margin functions applied to cosine logits: the ArcFace family."""
from __future__ import annotations

import math

import torch


class CombinedMargin:
    """cos(m1*theta + m2) - m3 on the target logit, all logits times s (ArcFace m2>0, CosFace m3>0)."""

    def __init__(self, s: float = 64.0, m1: float = 1.0, m2: float = 0.5, m3: float = 0.0,
                 interclass_filtering_threshold: float = 0.0):
        self.s, self.m1, self.m2, self.m3 = s, m1, m2, m3
        self.interclass_filtering_threshold = interclass_filtering_threshold

    def __call__(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """`logits`: cosines (B, C); `labels`: (B,) column index of the target, -1 where it is not in `logits`."""
        rows = torch.nonzero(labels != -1).squeeze(1)
        cols = labels[rows]
        if self.interclass_filtering_threshold > 0:
            keep = (logits <= self.interclass_filtering_threshold).to(logits.dtype)
            keep[rows, cols] = 1
            logits = logits * keep
        target = logits[rows, cols].clamp(-1 + 1e-7, 1 - 1e-7)
        theta = torch.acos(target)
        margin_target = torch.cos(self.m1 * theta + self.m2) - self.m3
        # Past theta + m2 > pi the cosine turns back up; keep the target logit monotone in theta instead.
        limit = self.m1 * theta + self.m2 > math.pi
        margin_target = torch.where(limit, target - self.m3 - math.sin(self.m2) * self.m2, margin_target)
        logits = logits.index_put((rows, cols), margin_target.to(logits.dtype))
        return logits * self.s
