"""Impossible config values caught before anything is built, each with the key to fix.

Hydra passes command-line values through as typed by the user, so `pfc.rate=abc` arrives as a string and
`optimizer.lr=-0.1` as a valid float; without these checks they fail deep inside torch, or train uphill.
"""
from __future__ import annotations

import difflib
from dataclasses import dataclass
from pathlib import Path

from omegaconf import DictConfig, ListConfig, OmegaConf

from arcface.engine.schedule import WARMUPS
from arcface.engine.trainer import ACCUMULATIONS, COMPILE_CHOICES, NONFINITE_POLICIES
from arcface.errors import UserError
from arcface.evaluation.verification import XNORMS
from arcface.data.loader import LOADERS
from arcface.heads.partial_fc import STORAGE_DTYPES
from arcface.precision import PRECISIONS


@dataclass(frozen=True)
class Range:
    """A number (an integer if `integer`) within [low, high]; `*_open` excludes the bound; `nullable` allows null."""

    low: float | None = None
    high: float | None = None
    integer: bool = False
    low_open: bool = False
    high_open: bool = False
    nullable: bool = False

    def admits(self, value) -> bool:
        if value is None:
            return self.nullable
        if isinstance(value, bool) or not isinstance(value, int if self.integer else (int, float)):
            return False
        if self.low is not None and (value <= self.low if self.low_open else value < self.low):
            return False
        return self.high is None or (value < self.high if self.high_open else value <= self.high)

    def describe(self) -> str:
        bounds = []
        if self.low is not None:
            bounds.append(f"{'>' if self.low_open else '>='} {self.low:g}")
        if self.high is not None:
            bounds.append(f"{'<' if self.high_open else '<='} {self.high:g}")
        what = "an integer" if self.integer else "a number"
        return f"{what} {' and '.join(bounds)}".strip() + (" (or null)" if self.nullable else "")


COUNT = Range(1, integer=True)
PERIOD = Range(0, integer=True)  # 0 switches the periodic action off
FRACTION = Range(0, 1)
POSITIVE = Range(0, low_open=True)
DECAY = Range(0, 1, high_open=True)  # a running average's keep rate, or a share that must leave something

RULES: dict[str, Range] = {
    "embedding_size": COUNT,
    "trainer.batch_size": COUNT,
    "trainer.gradient_acc": COUNT,
    "trainer.num_epoch": COUNT,
    "trainer.warmup_epoch": Range(0, integer=True),
    "trainer.max_steps": Range(1, integer=True, nullable=True),
    "trainer.grad_clip": Range(0, low_open=True, nullable=True),
    "trainer.log_every": PERIOD,
    "trainer.verify_every": PERIOD,
    "trainer.save_every": PERIOD,
    "trainer.keep_checkpoints": COUNT,
    "trainer.num_workers": PERIOD,
    "trainer.dist_timeout_s": POSITIVE,
    "trainer.seed": Range(0, integer=True),
    "optimizer.lr": POSITIVE,
    "optimizer.weight_decay": Range(0),
    "optimizer.momentum": DECAY,
    "optimizer.eps": POSITIVE,
    "scheduler.power": Range(0),  # 0: constant after warmup; a negative power would raise the LR as training goes on
    "backbone.dropout": DECAY,
    "backbone.drop_path": DECAY,
    "backbone.mask_ratio": DECAY,
    "pfc.rate": FRACTION,
    "margin.s": POSITIVE,
    "margin.m1": Range(1, 4),  # multiplicative angular (SphereFace): 1 = none
    "margin.m2": Range(0, 1.5),  # additive angular (ArcFace), radians
    "margin.m3": Range(0, 1, high_open=True),  # additive cosine (CosFace)
    "margin.m": Range(0, 1.5),  # CurricularFace / AdaFace angular margin
    "margin.h": FRACTION,
    "margin.momentum": FRACTION,
    "margin.interclass_filtering_threshold": FRACTION,
}

# `=no` would arrive as a string, which is truthy
FLAGS = ("trainer.verify_at_start", "trainer.verify_at_end", "trainer.export_onnx", "trainer.cudnn_benchmark",
         "backbone.checkpointing", "backbone.pretrained", "pfc.sparse_update", "margin.straight_through")

CHOICES: dict[str, tuple[str | bool, ...]] = {
    "trainer.precision": tuple(PRECISIONS),
    "trainer.on_nonfinite": NONFINITE_POLICIES,
    "trainer.accumulate": ACCUMULATIONS,
    "trainer.xnorm": XNORMS,
    "scheduler.warmup": WARMUPS,
    "pfc.storage_dtype": tuple(STORAGE_DTYPES),
    "dataset.loader": LOADERS,  # only the RecordIO datasets have the key
    "backbone.channels_last": ("auto", True, False),
    "trainer.compile": COMPILE_CHOICES,
}


# Nodes whose keys are free-form: keys added there go to sbatch or Hydra, or name a pair set.
FREE_FORM = ("hydra", "cluster.sbatch", "dataset.val")


def _spelled(choice: str | bool) -> str:
    """A choice as it is written in YAML and on the command line."""
    return str(choice).lower() if isinstance(choice, bool) else choice


def check_config(cfg: DictConfig) -> None:
    """Raise UserError for the first value outside its rule; keys absent from this config are not checked."""
    for key, rule in RULES.items():
        if OmegaConf.select(cfg, key, default="<absent>") == "<absent>":
            continue
        value = OmegaConf.select(cfg, key)
        if not rule.admits(value):
            raise UserError(f"{key}={value!r} is invalid: {key} must be {rule.describe()}")
    betas = OmegaConf.select(cfg, "optimizer.betas")
    if betas is not None and not (isinstance(betas, ListConfig) and len(betas) == 2 and all(map(DECAY.admits, betas))):
        raise UserError(f"optimizer.betas={betas} is invalid: optimizer.betas must be two numbers >= 0 and < 1, "
                        f"e.g. optimizer.betas=[0.9,0.999]")
    for key in FLAGS:
        value = OmegaConf.select(cfg, key, default=False)
        if not isinstance(value, bool):
            raise UserError(f"{key}={value!r} is invalid: set {key}=true or {key}=false")
    for key, choices in CHOICES.items():
        value = OmegaConf.select(cfg, key, default="<absent>")
        # By type as well as value: 1 == True, but channels_last=1 is not a choice.
        if value != "<absent>" and not any(type(value) is type(c) and value == c for c in choices):
            raise UserError(f"{key}={value} is unknown: set {key} to one of {', '.join(map(_spelled, choices))}")


def check_added_keys(cfg: DictConfig, overrides: list[str], groups: set[str]) -> None:
    """Refuse a `+key=value` override that adds a key nothing reads.

    Hydra's own advice for a misspelled key is to add it with `+`, which it then accepts silently:
    `+trainer.batchsize=32` would train at the default batch size. Added keys are read only as arguments of a built
    object (a node with a `_target_`, whose constructor refuses names it does not take) and in free-form nodes
    (FREE_FORM); `groups` are the config groups (`+experiment=...` picks one).
    """
    for override in overrides:
        if not override.startswith("+") or override.startswith("++"):
            continue
        key = override[1:].split("=", 1)[0]
        if key in groups or "/" in key or "@" in key:
            continue
        parent, _, name = key.rpartition(".")
        if any(parent == free or parent.startswith(free + ".") for free in FREE_FORM):
            continue
        node = OmegaConf.select(cfg, parent) if parent else cfg
        if isinstance(node, DictConfig) and "_target_" in node:
            continue
        known = [k for k in node if k != name] if isinstance(node, DictConfig) else []
        close = difflib.get_close_matches(name, known, n=1)
        where = f"{parent}." if parent else ""
        fix = f"did you mean {where}{close[0]}? Set it without the +" if close else "remove it"
        raise UserError(f"{override.split('=', 1)[0]} adds a key that nothing reads ({parent or 'the config'} has "
                        f"no {name}): {fix}")


def check_group_choices(arguments: list[str], conf_dir: Path) -> None:
    """Refuse `group=option` where conf/<group>/ has no <option>.yaml, before Hydra answers with its search path.

    The command line is read with Hydra's own parsers. A sweep (`backbone=r50,vit_b`) is checked option by option;
    Hydra's sweep functions and globs are left to it, and so is everything when the command brings config folders
    of its own (--config-path, --config-dir, hydra.searchpath).
    """
    from hydra._internal.utils import get_args_parser
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.core.override_parser.types import ValueType
    from hydra.errors import OverrideParseException

    flags, rest = get_args_parser().parse_known_args(arguments)
    lines = [*flags.overrides, *(argument for argument in rest if not argument.startswith("-"))]
    if flags.config_path or flags.config_dir or any("hydra.searchpath" in line for line in lines):
        return
    try:
        overrides = OverridesParser.create().parse_overrides(lines)
    except OverrideParseException:
        return  # Hydra reports it
    for override in overrides:
        folder = conf_dir / override.key_or_group
        if override.is_delete() or not folder.is_dir():
            continue
        if override.value_type == ValueType.ELEMENT:
            chosen = [override.value()]
        elif override.value_type in (ValueType.CHOICE_SWEEP, ValueType.SIMPLE_CHOICE_SWEEP):
            chosen = list(override.sweep_string_iterator())
        else:
            continue
        options = {path.relative_to(folder).with_suffix("").as_posix() for path in folder.rglob("*.yaml")}
        for option in chosen:
            if option not in (None, "null") and str(option) not in options:
                key = override.key_or_group
                listed = sorted(name for name in options if "/" not in name)
                close = difflib.get_close_matches(str(option), listed, n=1)
                hint = f" (did you mean {key}={close[0]}?)" if close else ""
                among = ", ".join(listed) if len(listed) <= 20 else f"the {len(listed)} listed by ls {folder}"
                raise UserError(f"{key}={option} names no file in conf/{key}/: choose one of {among}{hint}")
