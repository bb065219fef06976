"""Where a training step makes the host wait for the GPU, attributed to lines of the arcface package.

Two views of the same question:
- `cuda_sync_warnings()`: torch's own CUDA sync debug mode, which warns at every synchronising CUDA call; each
  warning is attributed, from the Python stack at that moment, to the innermost frame inside `arcface/`.
- `HostReads`: on any device (so on a CPU machine too), the ops whose result the host must read to go on — a
  tensor read as a Python number, or an output whose size depends on the values (nonzero, unique, boolean-mask
  indexing), or a Python scalar written through indexing (`x[i] = 1`: on a GPU the scalar is copied from the host,
  which waits). On a GPU each of them is a sync.
"""
from __future__ import annotations

import collections
import contextlib
import sys
import warnings
from pathlib import Path
from typing import Iterator

import torch
from torch.utils._python_dispatch import TorchDispatchMode

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "arcface"

# Ops whose output the host has to see: a scalar read back, or an output sized by the data.
_HOST_READ_OPS = {"_local_scalar_dense", "nonzero", "_unique", "_unique2", "unique_dim", "unique_consecutive",
                  "masked_select", "is_nonzero", "equal", "repeat_interleave"}
_INDEX_OPS = {"index", "index_put", "index_put_", "_index_put_impl_"}


def arcface_frame(frame) -> str:
    """'arcface/x.py:LINE (function)' of the innermost frame at or above `frame` in the package; else that of the
    innermost frame in this repository (e.g. the step's `backward()` call, where the autograd engine reports the
    syncs of built-in backward ops), marked as outside the package."""
    fallback = "outside arcface"
    while frame is not None:
        path = Path(frame.f_code.co_filename).resolve()
        where = f"{frame.f_code.co_name} at line {frame.f_lineno}"
        if path.is_relative_to(PACKAGE):
            return f"{path.relative_to(REPO)}:{frame.f_lineno} ({frame.f_code.co_name})"
        if fallback == "outside arcface" and path.is_relative_to(REPO):
            fallback = f"outside arcface: {path.relative_to(REPO)}, {where}"
        frame = frame.f_back
    return fallback


def tally(sites: list[tuple[str, str]]) -> list[dict]:
    """[(where, what)] -> one row per distinct pair with its count, most frequent first."""
    counts = collections.Counter(sites)
    return [{"where": where, "what": what, "count": n} for (where, what), n in counts.most_common()]


@contextlib.contextmanager
def cuda_sync_warnings() -> Iterator[list[tuple[str, str]]]:
    """Inside the block every synchronising CUDA call is recorded as (where, message), see `arcface_frame`.

    Do not call torch.cuda.synchronize() inside: it is a sync too. The list is filled as the block runs.
    """
    sites: list[tuple[str, str]] = []

    def record(message, category, filename, lineno, file=None, line=None):
        sites.append((arcface_frame(sys._getframe(1)), str(message).splitlines()[0][:120]))

    previous = torch.cuda.get_sync_debug_mode()
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.showwarning = record  # called at the warning, so the stack is the caller's
        torch.cuda.set_sync_debug_mode("warn")
        try:
            yield sites
        finally:
            torch.cuda.set_sync_debug_mode(previous)


class HostReads(TorchDispatchMode):
    """Records (arcface frame, op) for every op in the block that needs its values on the host."""

    def __init__(self):
        super().__init__()
        self.sites: list[tuple[str, str]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func._overloadpacket.__name__
        bool_index = name in _INDEX_OPS and any(
            isinstance(t, torch.Tensor) and t.dtype == torch.bool for t in (args[1] if len(args) > 1 else ()) or ())
        value = args[2] if name in _INDEX_OPS and len(args) > 2 else None
        host_scalar = isinstance(value, torch.Tensor) and value.dim() == 0 and value.device.type == "cpu"
        if name in _HOST_READ_OPS or bool_index or host_scalar:
            what = (f"{name} with a boolean mask" if bool_index else
                    f"{name} of a scalar from the host" if host_scalar else name)
            self.sites.append((arcface_frame(sys._getframe(1)), what))
        return func(*args, **(kwargs or {}))
