"""The in-memory form of a verification pair set, shared by the synthetic data and the `.bin` reader."""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class PairSet:
    """`images`: uint8 (2N, 3, H, W), pairs at rows (2i, 2i+1); `issame`: bool (N,)."""

    images: torch.Tensor
    issame: torch.Tensor
