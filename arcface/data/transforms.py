"""Batch-level augmentation on the device: random horizontal flip and scaling to [-1, 1]."""
from __future__ import annotations

import torch


def prepare_batch(images: torch.Tensor, device: torch.device, flip: bool = True) -> torch.Tensor:
    """uint8 (B,3,H,W) -> float32 in [-1, 1] on `device`, each image mirrored with probability 1/2 when `flip`."""
    x = images.to(device, non_blocking=True).float().div_(127.5).sub_(1.0)
    if flip:
        mirror = torch.rand(x.shape[0], device=device) < 0.5
        x = torch.where(mirror[:, None, None, None], x.flip(3), x)
    return x
