"""Checkpoint files, written atomically: a crash mid-write never leaves a truncated file behind.

`model.pt` is the backbone alone (the model-zoo format); `checkpoint.pt` is the whole training state, saved
independently of the world size so a run resumes on any number of ranks. The previous `keep - 1` states are kept as
`checkpoint.1.pt` (the one before), `checkpoint.2.pt`, ..., so a corrupt newest file costs one save interval, not
the run. Every file is read with `weights_only=True`: loading a checkpoint never runs code from it.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path

import torch

from arcface.errors import UserError
from arcface.fileio import atomic_write, remove_stale_temporaries
from arcface.heads.fc_state import load_fc_state, save_fc_state
from arcface.models.weights import load_backbone_weights

log = logging.getLogger(__name__)

CHECKPOINT_NAME = "checkpoint.pt"
TRAINING_FORMAT = "arcface.train/2"
_READABLE_FORMATS = ("arcface.train/1", TRAINING_FORMAT)  # /1 lacks the random streams and the tracking run id
_REQUIRED = ("step", "global_batch", "backbone", "optimizer", "scaler", "fc")


def save_atomic(obj, path: str | Path) -> Path:
    """torch.save to a temporary file beside `path`, then rename over it."""
    with atomic_write(path) as f:
        torch.save(obj, f)
    return Path(path)


def _cpu_state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu() for k, v in module.state_dict().items()}


def save_backbone(backbone: torch.nn.Module, path: str | Path) -> Path:
    """The model-zoo file: a plain backbone state_dict (reference key names, no `module.` prefix), on CPU."""
    return save_atomic(_cpu_state(backbone), path)


def checkpoint_files(run_dir: str | Path, keep: int) -> list[Path]:
    """`checkpoint.pt`, `checkpoint.1.pt`, ..., `checkpoint.<keep-1>.pt`: newest first."""
    run_dir = Path(run_dir)
    return [run_dir / CHECKPOINT_NAME] + [run_dir / f"checkpoint.{i}.pt" for i in range(1, keep)]


def _older_checkpoints(run_dir: Path) -> list[Path]:
    """Every `checkpoint.<n>.pt` in `run_dir`, newest first."""
    found = [(int(p.name.split(".")[1]), p) for p in run_dir.glob("checkpoint.*.pt")
             if p.name.split(".")[1].isdigit()]
    return [p for _, p in sorted(found)]


def _rotate(run_dir: Path, keep: int) -> None:
    """Shift checkpoint.pt -> .1 -> .2 ... keeping `keep - 1` older files; each rename is atomic."""
    names = checkpoint_files(run_dir, keep)
    for older in _older_checkpoints(run_dir):
        if older not in names:
            older.unlink()
    for newer, older in zip(reversed(names[:-1]), reversed(names[1:])):
        if newer.exists():
            os.replace(newer, older)


def save_training_state(run_dir: str | Path, keep: int, *, backbone: torch.nn.Module, head: torch.nn.Module,
                        optimizer, scaler, step: int, global_batch: int, extra: dict) -> Path | None:
    """Everything needed to resume, in one file that any world size can load. Collective: every rank calls it.

    The backbone and its optimizer state are replicated, so rank 0's copy is the whole; the classifier's rows and
    their optimizer state are gathered from every rank (`save_fc_state`). `extra` holds the rest of the trainer's
    state (random streams, data position, tracking run). Returns the path on rank 0, None elsewhere.
    """
    fc = save_fc_state(head, optimizer)
    if fc is None:  # not rank 0
        return None
    run_dir = Path(run_dir)
    state = {
        "format": TRAINING_FORMAT,
        "step": step,
        "global_batch": global_batch,
        "backbone": _cpu_state(backbone),
        "optimizer": optimizer.state_dict(),
        "scaler": scaler.state_dict(),
        "fc": fc,
        **extra,
    }
    path = run_dir / CHECKPOINT_NAME
    with atomic_write(path, before_replace=lambda: _rotate(run_dir, keep)) as f:
        torch.save(state, f)
    return path


def read_training_state(path: str | Path) -> dict:
    """The dict in a training checkpoint, read without running code from it; UserError naming the file if it is
    missing, unreadable, or not a training checkpoint."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint {path} does not exist: pass trainer.resume=<a checkpoint.pt written by "
                        f"arcface-train>, or trainer.resume=null to start afresh")
    try:
        state = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    except Exception as exc:
        reason = str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
        raise UserError(f"{path} cannot be read as a checkpoint ({reason}): pass the checkpoint.pt of an "
                        f"arcface-train run to trainer.resume") from None
    if not isinstance(state, dict) or state.get("format") not in _READABLE_FORMATS:
        raise UserError(f"{path} is not a training checkpoint of arcface-train (a model.pt holds weights only: "
                        f"start from it with backbone.weights={path} instead of trainer.resume)")
    missing = [key for key in _REQUIRED if key not in state]
    if missing:
        raise UserError(f"{path} lacks {', '.join(missing)}: it is damaged; resume from an older checkpoint "
                        f"(checkpoint.1.pt beside it) or start afresh with trainer.resume=null")
    return state


def newest_readable(run_dir: str | Path) -> tuple[Path | None, list[str]]:
    """The newest checkpoint in `run_dir` that loads, and one line per newer one that did not (and why)."""
    run_dir = Path(run_dir)
    remove_stale_temporaries(run_dir / CHECKPOINT_NAME)
    skipped = []
    for path in [run_dir / CHECKPOINT_NAME, *_older_checkpoints(run_dir)]:
        if not path.is_file():
            continue
        try:
            read_training_state(path)
        except UserError as exc:
            skipped.append(str(exc))
            continue
        return path, skipped
    return None, skipped


def load_training_state(path: str | Path, *, backbone: torch.nn.Module, backbone_name: str, head: torch.nn.Module,
                        optimizer, scaler, global_batch: int) -> dict:
    """Restore what `save_training_state` wrote (on any world size); returns the whole dict (step, extras)."""
    path = Path(path)
    state = read_training_state(path)
    if state["global_batch"] != global_batch:
        raise UserError(f"{path} was trained with {state['global_batch']} samples per step and this run takes "
                        f"{global_batch} (trainer.batch_size x trainer.gradient_acc x ranks): set trainer.batch_size "
                        f"or trainer.gradient_acc so the product matches, then steps, epochs and the LR schedule "
                        f"carry on unchanged")
    load_backbone_weights(backbone, state["backbone"], backbone_name)
    try:
        optimizer.load_state_dict(state["optimizer"])
    except (ValueError, KeyError) as exc:
        raise UserError(f"{path} holds the state of another optimizer ({exc}): resume with the optimizer it was "
                        f"trained with (optimizer=...)") from None
    load_fc_state(head, optimizer, state["fc"])
    if state["scaler"]:  # empty when the run was saved without fp16 loss scaling
        scaler.load_state_dict(state["scaler"])
    return state


