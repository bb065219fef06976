"""Learning-rate schedule: linear warmup, then polynomial decay to zero, one value per optimizer step."""
from __future__ import annotations


class PolynomialWarmup:
    """factor(step) for optimizer steps 0..total_steps-1.

    Warmup ramps (step+1)/warmup_steps so the very first step is not taken at full rate; afterwards the factor
    decays as (1 - progress)^power. The trainer multiplies each param group's `initial_lr` by it.
    """

    def __init__(self, warmup_steps: int, total_steps: int, power: float = 1.0):
        if total_steps <= 0:
            raise ValueError(f"total_steps must be positive, got {total_steps}")
        self.warmup_steps = min(warmup_steps, total_steps)
        self.total_steps = total_steps
        self.power = power

    def factor(self, step: int) -> float:
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        progress = (step - self.warmup_steps) / max(1, self.total_steps - self.warmup_steps)
        return max(0.0, 1.0 - progress) ** self.power

    def apply(self, optimizer, step: int) -> float:
        """Set every group's lr for `step`; returns the first group's lr (for logging)."""
        factor = self.factor(step)
        for group in optimizer.param_groups:
            group["lr"] = group["initial_lr"] * factor
        return optimizer.param_groups[0]["lr"]
