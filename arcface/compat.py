"""`compat=reference` (conf/compat/reference.yaml): which margins have an arcface_torch form to follow.

The reference has one margin function: ArcFace cos(theta + m2) with m1 = 1 and m3 = 0, or CosFace cos(theta) - m3
whenever m3 > 0, ignoring m1 and m2 then (it raises for anything else). Training a different margin under the
reference's name would reproduce nothing, so such configs are refused with the values that would match.
"""
from __future__ import annotations

from omegaconf import DictConfig, OmegaConf

from arcface.errors import UserError

_COMBINED = ("arcface.heads.CombinedMargin", "arcface.heads.margins.CombinedMargin")


def check_compat(cfg: DictConfig) -> None:
    """Raise UserError when compat=reference is asked for a margin the reference does not compute."""
    if OmegaConf.select(cfg, "compat", default="default") != "reference":
        return
    margin = cfg.margin
    if margin.get("_target_") not in _COMBINED:
        raise UserError(f"compat=reference cannot follow margin {margin.get('_target_')}: arcface_torch has only the "
                        f"combined margin, so use margin=arcface or margin=cosface, or drop compat=reference")
    m1, m2, m3 = margin.m1, margin.m2, margin.m3
    if m1 != 1 or (m2 > 0 and m3 > 0):
        fix = "margin.m1=1 margin.m2=0 (what it trains then)" if m3 > 0 else "margin.m1=1"
        raise UserError(f"compat=reference cannot follow margin (m1, m2, m3)=({m1}, {m2}, {m3}): arcface_torch "
                        f"computes ArcFace (m1=1, m3=0) or, whenever m3>0, CosFace ignoring m1 and m2, so set "
                        f"{fix} or drop compat=reference")
