"""The precision names this project accepts and the torch dtypes they stand for, defined once.

`trainer.precision` and `backbone.precision` take the short names of mixed-precision training (fp32 | fp16 | bf16);
`pfc.logits_dtype` takes torch's dtype names (float32 | float16 | bfloat16). Both name the same three dtypes.
"""
from __future__ import annotations

import torch

from arcface.errors import UserError

PRECISIONS = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
DTYPE_NAMES = {str(dtype).removeprefix("torch."): dtype for dtype in PRECISIONS.values()}


def _lookup(table: dict[str, torch.dtype], key: str, name: str) -> torch.dtype:
    if name not in table:
        raise UserError(f"{key}={name!r} is unknown: set {key} to one of {', '.join(table)}")
    return table[name]


def precision_dtype(name: str, key: str = "trainer.precision") -> torch.dtype:
    """The dtype of a short precision name; an unknown name is a UserError naming `key`."""
    return _lookup(PRECISIONS, key, name)


def dtype_named(name: str, key: str) -> torch.dtype:
    """The dtype of a torch dtype name ("bfloat16"); an unknown name is a UserError naming `key`."""
    return _lookup(DTYPE_NAMES, key, name)


def needs_loss_scaling(precision: str, device: torch.device) -> bool:
    """fp16 gradients underflow without a loss scaler; the trainer scales only on CUDA (CPU fp16 trains as fp32)."""
    return precision_dtype(precision) == torch.float16 and device.type == "cuda"
