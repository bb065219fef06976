"""Rounding float32 values to bfloat16 storage without losing small updates.

bfloat16 keeps the top 16 bits of a float32. Rounding to nearest drops any update smaller than half a unit in the
last place of the stored value (2^-9 of it): a centre moved by lr x gradient a thousand times a little never moves.
Stochastic rounding rounds up with probability equal to the dropped fraction, so the stored value is the exact
float32 result in expectation and small updates accumulate. It costs 16 random bits per value and no extra memory
(Kahan compensation would need a second stored copy).
"""
from __future__ import annotations

import torch

_LOW_BITS = (1 << 16) - 1  # the float32 bits bfloat16 drops


def round_stochastic(values: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """float32 `values` as bfloat16, each rounded away from zero with probability (dropped bits) / 2^16.

    Adding 16 uniform random bits to the magnitude's low half and truncating does exactly that (the sign bit is
    untouched, so positive and negative values round symmetrically). Draws from `generator`, or torch's global
    generator of the values' device, so a run that restores its random streams resumes bit for bit.
    """
    if values.dtype != torch.float32:
        raise TypeError(f"round_stochastic takes float32 values, not {values.dtype}")
    noise = torch.randint(0, _LOW_BITS + 1, values.shape, dtype=torch.int32, device=values.device,
                          generator=generator)
    bits = noise.add_(values.contiguous().view(torch.int32)).bitwise_and_(~_LOW_BITS)
    return bits.view(torch.float32).to(torch.bfloat16)  # exact: the low 16 bits are zero
