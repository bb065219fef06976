"""fp16 loss scaling across ranks: every rank must skip the same steps.

GradScaler decides per process whether a step overflowed. Backbone gradients are all-reduced, so every rank sees
the same ones, but the classifier's gradients are sharded: an inf in one rank's rows would make that rank alone skip
its step and lower its scale, and the ranks' weights and scales would drift apart from then on.
"""
from __future__ import annotations

import torch
import torch.distributed as dist


def agree_on_overflow(scaler: torch.amp.GradScaler, optimizer: torch.optim.Optimizer) -> None:
    """After `scaler.unscale_(optimizer)`: make the overflow verdict the max over ranks (a no-op without fp16
    scaling or in one process). GradScaler keeps the verdict in its per-optimizer state, which `step` and `update`
    read; the reduction stays on the device (no host sync beyond GradScaler's own)."""
    if not scaler.is_enabled() or not dist.is_initialized() or dist.get_world_size() == 1:
        return
    found = scaler._per_optimizer_states[id(optimizer)]["found_inf_per_device"]
    for flag in found.values():
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
