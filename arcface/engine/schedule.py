"""Learning-rate schedule: linear warmup, then polynomial decay to zero, one value per optimizer step."""
from __future__ import annotations

from arcface.errors import UserError

WARMUPS = ("shifted", "reference")


class PolynomialWarmup:
    """factor(step) for optimizer steps 0..total_steps-1.

    warmup="shifted" (default) ramps (step+1)/warmup_steps, so the very first step is not taken at full rate;
    afterwards the factor decays as (1 - progress)^power.

    warmup="reference" is the arcface_torch schedule (its PolynomialLRWarmup), which counts micro-batches: the
    optimizer step `step` runs with its counter at l = (step+1)*micro_batches - 1, and over W = warmup_steps *
    micro_batches, T = total_steps * micro_batches the factor is 1 at l = 0 (its first step runs at the full rate,
    before the ramp starts), l/W up to W, then (1 - (l-W)/(T-W))^power. `micro_batches` is trainer.gradient_acc.
    The trainer multiplies each param group's `initial_lr` by the factor.
    """

    def __init__(self, warmup_steps: int, total_steps: int, power: float = 1.0, warmup: str = "shifted",
                 micro_batches: int = 1):
        if total_steps <= 0:
            raise ValueError(f"total_steps must be positive, got {total_steps}")
        if warmup not in WARMUPS:
            raise UserError(f"scheduler.warmup={warmup!r} is unknown: set it to one of {', '.join(WARMUPS)}")
        if micro_batches < 1:
            raise UserError(f"scheduler.micro_batches={micro_batches} must be at least 1: set it to "
                            f"trainer.gradient_acc")
        self.warmup_steps = min(warmup_steps, total_steps)
        self.total_steps = total_steps
        self.power = power
        self.warmup = warmup
        self.micro_batches = micro_batches

    def factor(self, step: int) -> float:
        if self.warmup == "reference":
            return self._reference_factor(step)
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        progress = (step - self.warmup_steps) / max(1, self.total_steps - self.warmup_steps)
        return max(0.0, 1.0 - progress) ** self.power

    def _reference_factor(self, step: int) -> float:
        count = (step + 1) * self.micro_batches - 1
        warmup, total = self.warmup_steps * self.micro_batches, self.total_steps * self.micro_batches
        if count == 0:
            return 1.0
        if count <= warmup:
            return count / warmup
        return max(0.0, 1.0 - (count - warmup) / (total - warmup)) ** self.power

    def apply(self, optimizer, step: int) -> float:
        """Set every group's lr for `step`; returns the first group's lr (for logging)."""
        factor = self.factor(step)
        for group in optimizer.param_groups:
            group["lr"] = group["initial_lr"] * factor
        return optimizer.param_groups[0]["lr"]
