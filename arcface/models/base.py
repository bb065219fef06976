"""What every backbone family shares: the mixed-precision region, gradient checkpointing and channels_last."""
from __future__ import annotations

import contextlib
from typing import Iterable, Iterator

import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint

from arcface.errors import UserError
from arcface.precision import precision_dtype


def wants_channels_last(setting: bool | str) -> bool:
    """`backbone.channels_last`: true, false, or auto = NHWC where CUDA is available (the trainer then trains there).

    On an H200, r50 in bf16 trained 1.47x faster in NHWC than in NCHW (benchmarks/results/gpu_h200_rerun.md). On
    the CPU it gave no reliable gain (benchmarks/results/backbones.md), and torch's CPU kernels crash training thin
    layers (r_tiny) in it. Code that builds a backbone directly gets NCHW unless it asks (the default is false).
    """
    if not isinstance(setting, bool) and setting != "auto":
        raise UserError(f"backbone.channels_last={setting!r} is invalid: set it to true, false or auto")
    return torch.cuda.is_available() if setting == "auto" else setting


def cpu_channels_last_crash(model: nn.Module) -> str | None:
    """The first layer whose training in channels_last may crash torch's CPU kernels, described; None if none may.

    Seen on torch 2.14: the backward of a 1x1 convolution with a stride of 2 over fewer than 16 input channels
    segfaults or aborts in channels_last (8, 12 and 15 channels into 32, 8 into 8, 12 at stride (2, 1); r_tiny's
    first downsample, over its 8-channel stem, is one). 3x3 kernels, stride 3 and 16 channels or more did not. The
    check covers every crash seen and also some such layers that run (8 channels into 64): torch's own condition
    is not known. torch.compile lays convolutions out in channels_last on the CPU too.
    """
    for name, module in model.named_modules():
        if (isinstance(module, nn.Conv2d) and module.kernel_size == (1, 1) and 2 in module.stride
                and module.in_channels < 16):
            return f"{name} (a 1x1 strided convolution over {module.in_channels} channels)"
    return None


@contextlib.contextmanager
def frozen_running_stats(module: nn.Module) -> Iterator[None]:
    """BatchNorm keeps normalising with batch statistics but leaves its running averages alone.

    A checkpointed block runs its forward twice (once more during backward); without this its BatchNorm layers
    would fold every batch into their running averages twice and drift from an uncheckpointed run. Momentum 0
    keeps the averages (the op itself must stay the same, or checkpointing rejects the recomputation).
    """
    norms = [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    saved = [(m.momentum, m.num_batches_tracked.clone()) for m in norms]
    for m in norms:
        m.momentum = 0.0
    try:
        yield
    finally:
        for m, (momentum, count) in zip(norms, saved):
            m.momentum = momentum
            m.num_batches_tracked.copy_(count)


class Backbone(nn.Module):
    """Base of the families: maps (B,3,112,112) in [-1,1] to (B, embedding_size).

    Subclasses build their layers, call `finish_init()` last, and write `forward` with `self.trunk_autocast(x)`
    around the trunk and `self.run_blocks(...)` over the repeated blocks; the embedding layers stay in fp32.
    """

    def __init__(self, precision: str = "fp32", checkpointing: bool = False, channels_last: bool | str = False):
        super().__init__()
        self.precision = precision
        self.trunk_dtype = precision_dtype(precision, "backbone.precision")
        self.checkpointing = checkpointing
        self.channels_last = wants_channels_last(channels_last)

    def finish_init(self) -> None:
        if self.channels_last:
            self.to(memory_format=torch.channels_last)

    def unused_parameters(self) -> list[str]:
        """Names of the parameters that training never uses, and so never gives a gradient (DDP must be told to look
        for them). They stay trainable parameters, for the state_dict's keys and the optimizer state's layout."""
        return []

    def prepare_input(self, x: torch.Tensor) -> torch.Tensor:
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x

    def trunk_autocast(self, x: torch.Tensor) -> contextlib.AbstractContextManager:
        if x.device.type == "meta":  # shape-only runs (counting MACs) have no autocast
            return contextlib.nullcontext()
        # fp32 actively disables autocast, so an outer autocast region cannot leak into the trunk.
        if self.trunk_dtype == torch.float32:
            return torch.autocast(x.device.type, enabled=False)
        return torch.autocast(x.device.type, dtype=self.trunk_dtype)

    def run_blocks(self, blocks: Iterable[nn.Module], x: torch.Tensor) -> torch.Tensor:
        """Apply `blocks` in order; when checkpointing in training, keep only each block's input for backward."""
        recompute = self.checkpointing and self.training and torch.is_grad_enabled()
        for block in blocks:
            if recompute:
                x = checkpoint(block, x, use_reentrant=False,
                               context_fn=lambda b=block: (contextlib.nullcontext(), frozen_running_stats(b)))
            else:
                x = block(x)
        return x
