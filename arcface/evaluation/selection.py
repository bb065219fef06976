"""Which of the composed `dataset.val` pair sets a run verifies on.

Hydra merges a dict given on the command line into the composed one, so `'dataset.val={}'` alone would keep every
pair set. Here a dict given for `dataset.val` replaces it instead: its keys name the pair sets kept, `{}` none.
`dataset.val=null` and `~dataset.val` drop them all; `dataset.val.<pair set>=null` or `~dataset.val.<pair set>` one.
"""
from __future__ import annotations

from typing import Sequence

from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import DictConfig

KEY = "dataset.val"


def selected_pair_sets(val: DictConfig | None, overrides: Sequence[str]) -> dict[str, DictConfig]:
    """{name: config node} of the pair sets to build, from the composed `dataset.val` and the command line."""
    if val is None:
        return {}
    kept = None  # None: every composed pair set
    for override in OverridesParser.create().parse_overrides(list(overrides)):
        if override.key_or_group == KEY and not override.is_delete():
            value = override.value()
            kept = set(value) if isinstance(value, dict) else None
    return {name: node for name, node in val.items() if node is not None and (kept is None or name in kept)}
