"""Optimizer construction over the backbone and the classifier head."""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn as nn


def build_optimizer(factory: Callable[..., torch.optim.Optimizer], backbone: nn.Module,
                    head: nn.Module) -> torch.optim.Optimizer:
    """`factory` is a partially applied optimizer class (Hydra `_partial_: true`) taking parameter groups."""
    trainable = [p for p in backbone.parameters() if p.requires_grad]
    return factory([{"params": trainable}, {"params": list(head.parameters())}])
