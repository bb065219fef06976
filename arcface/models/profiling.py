"""Measuring backbones: parameters, multiply-accumulates (counted by torch, not tabulated) and the peak of
tensor memory allocated while a function runs."""
from __future__ import annotations

import weakref
from typing import Callable

import torch
import torch.nn as nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.flop_counter import FlopCounterMode

from arcface.models.registry import create_backbone


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def count_macs(model: nn.Module, image_size: int = 112) -> int:
    """Multiply-accumulates of one eval forward of one image. torch counts FLOPs as 2 per multiply-accumulate
    (convolutions, matmuls, attention); elementwise ops (BN, activations, adds) are not counted."""
    device = next(model.parameters()).device
    x = torch.zeros(1, 3, image_size, image_size, device=device)
    was_training = model.training
    model.eval()
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(x)
    model.train(was_training)
    return counter.get_total_flops() // 2


def backbone_stats(name: str, **kwargs) -> tuple[int, int]:
    """(parameters, MACs at 112x112) of a registered backbone, built on the meta device: no memory, no compute."""
    with torch.device("meta"):
        model = create_backbone(name, **kwargs)
    return count_params(model), count_macs(model)


class PeakMemory(TorchDispatchMode):
    """Tracks bytes of tensor storage created inside the `with` block and still alive; `peak` is the maximum.

    Works on any device (on CPU, where the allocator keeps no statistics): every storage an op returns is
    counted until it is freed. Memory that existed before the block (weights, inputs) is not counted.
    """

    def __init__(self):
        super().__init__()
        self.current = 0
        self.peak = 0
        self._alive: dict[int, weakref.ref] = {}

    def _freed(self, key: int, nbytes: int) -> None:
        self._alive.pop(key, None)
        self.current -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if not isinstance(t, torch.Tensor):
                continue
            storage = t.untyped_storage()
            key = storage.data_ptr()
            if key in self._alive or storage.nbytes() == 0:
                continue  # a view or an in-place result: no new memory
            nbytes = storage.nbytes()
            self._alive[key] = weakref.ref(storage, lambda _, k=key, n=nbytes: self._freed(k, n))
            self.current += nbytes
            self.peak = max(self.peak, self.current)
        return out


def peak_memory(fn: Callable[[], object]) -> int:
    """Peak bytes of tensors allocated while `fn()` runs."""
    with PeakMemory() as tracker:
        fn()
    return tracker.peak
