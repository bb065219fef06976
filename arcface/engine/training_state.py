"""Checkpoint files, written atomically: a crash mid-write never leaves a truncated file behind.

`model.pt` is the backbone alone (the model-zoo format); `checkpoint.pt` is the whole training state, saved
independently of the world size so a run resumes on any number of ranks. The previous `keep - 1` states are kept as
`checkpoint.1.pt` (the one before), `checkpoint.2.pt`, ..., so a corrupt newest file costs one save interval, not
the run. Every file is read with `weights_only=True`: loading a checkpoint never runs code from it.

The classifier's rows are not in `checkpoint.pt`: every rank writes its own into a directory beside it,
`classifier.<step>.<random>/` (`arcface.heads.fc_state.save_fc_shards`), whose name the checkpoint records. The
directory is written under a hidden temporary name and renamed once complete, before `checkpoint.pt` is replaced,
so the rename of `checkpoint.pt` is the one moment a save takes effect; rotating renames only the `.pt` files, and
a directory no kept checkpoint names is deleted after each save. Checkpoints written before this layout (rows
gathered inside `checkpoint.pt`) still load.
"""
from __future__ import annotations

import logging
import os
import secrets
import shutil
from pathlib import Path

import torch

from arcface.distributed import broadcast_object, get_rank
from arcface.errors import UserError, unloadable
from arcface.fileio import atomic_write, fsync_path, remove_stale_temporaries
from arcface.heads.fc_state import (SHARDED_FORMAT, gathered_fc_state, load_fc_state, save_fc_shards,
                                    saved_shards_complete)
from arcface.models.weights import load_backbone_weights

log = logging.getLogger(__name__)

CHECKPOINT_NAME = "checkpoint.pt"
TRAINING_FORMAT = "arcface.train/3"
# /1 lacks the random streams and the tracking run id; /1 and /2 hold the classifier's rows gathered in the file.
_READABLE_FORMATS = ("arcface.train/1", "arcface.train/2", TRAINING_FORMAT)
SHARDS_PREFIX = "classifier."
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
    """Everything needed to resume, in a file and a directory that any world size can load. Collective: every rank
    calls it.

    The backbone and its optimizer state are replicated, so rank 0's copy is the whole; each rank writes its own
    rows of the classifier and their optimizer state into the shards directory. `extra` holds the rest of the
    trainer's state (random streams, data position, tracking run). Returns the path on rank 0, None elsewhere.
    """
    run_dir = Path(run_dir)
    name = None
    if get_rank() == 0:
        name = f"{SHARDS_PREFIX}{step}.{secrets.token_hex(4)}"
        (run_dir / f".{name}.tmp").mkdir(parents=True)
    name = broadcast_object(name)
    temporary = run_dir / f".{name}.tmp"
    fc = save_fc_shards(head, optimizer, temporary)
    if get_rank() != 0:
        return None
    fsync_path(temporary)
    os.replace(temporary, run_dir / name)
    fsync_path(run_dir)
    state = {
        "format": TRAINING_FORMAT,
        "step": step,
        "global_batch": global_batch,
        "backbone": _cpu_state(backbone),
        "optimizer": optimizer.state_dict(),
        "scaler": scaler.state_dict(),
        "fc": {**fc, "shards": name},
        **extra,
    }
    path = run_dir / CHECKPOINT_NAME
    with atomic_write(path, before_replace=lambda: _rotate(run_dir, keep)) as f:
        torch.save(state, f)
    _remove_unnamed_shards(run_dir)
    return path


def _shards_dir(path: Path, fc: dict) -> Path | None:
    """The classifier shards directory a checkpoint names (beside it); None for the gathered layout."""
    return path.parent / fc["shards"] if fc.get("format") == SHARDED_FORMAT else None


def _remove_unnamed_shards(run_dir: Path) -> None:
    """Delete the shards directories that no readable checkpoint in `run_dir` names, and stale temporaries."""
    named = set()
    for path in [run_dir / CHECKPOINT_NAME, *_older_checkpoints(run_dir)]:
        try:
            named.add(torch.load(path, map_location="cpu", mmap=True, weights_only=True)["fc"].get("shards"))
        except Exception:  # missing or unreadable: names nothing that could be resumed from
            continue
    for folder in [*run_dir.glob(f"{SHARDS_PREFIX}*"), *run_dir.glob(f".{SHARDS_PREFIX}*.tmp")]:
        if folder.is_dir() and folder.name not in named:
            shutil.rmtree(folder)


def refuse_fresh_start_over(run_dir: Path, resume: str | None) -> None:
    """A run that starts afresh (trainer.resume=null) where an earlier run left its state would rotate that state
    out with its own saves."""
    if resume is None and (run_dir / CHECKPOINT_NAME).exists():
        raise UserError(f"{run_dir / CHECKPOINT_NAME} holds an earlier run's state: continue it with "
                        f"trainer.resume=auto, or start afresh in another directory (hydra.run.dir=...)")


def read_training_state(path: str | Path) -> dict:
    """The dict in a training checkpoint, read without running code from it; UserError naming the file if it is
    missing, unreadable, or not a training checkpoint."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint {path} does not exist: pass trainer.resume=<a checkpoint.pt written by "
                        f"arcface-train>, trainer.resume=auto for the run dir's newest, or trainer.resume=null to "
                        f"start afresh")
    try:
        state = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    except Exception as exc:
        raise UserError(f"checkpoint {path} {unloadable(path, exc)}: it was damaged in writing or copying (resume "
                        f"from the one before, checkpoint.1.pt beside it), or is not a checkpoint.pt of "
                        f"arcface-train") from None
    if not isinstance(state, dict) or state.get("format") not in _READABLE_FORMATS:
        raise UserError(f"{path} is not a training checkpoint of arcface-train (a model.pt holds weights only: "
                        f"start from it with backbone.weights={path} instead of trainer.resume)")
    missing = [key for key in _REQUIRED if key not in state]
    if missing:
        raise UserError(f"{path} lacks {', '.join(missing)}: it is damaged; resume from an older checkpoint "
                        f"(checkpoint.1.pt beside it) or start afresh with trainer.resume=null")
    shards = _shards_dir(path, state["fc"]) if isinstance(state["fc"], dict) else None
    if shards is not None and not saved_shards_complete(shards):
        raise UserError(f"{path} keeps its classifier in {shards}, which is missing or incomplete: copy that "
                        f"directory beside the checkpoint, or resume from an older checkpoint (checkpoint.1.pt "
                        f"beside it)")
    return state


def read_classifier(path: str | Path) -> dict:
    """The classifier state of a training checkpoint with every row in full tensors (`weight`, `optimizer_rows`),
    from either layout, in this process: for inspecting a checkpoint, not for resuming."""
    path = Path(path)
    state = read_training_state(path)
    return gathered_fc_state(state["fc"], _shards_dir(path, state["fc"]))


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
    load_fc_state(head, optimizer, state["fc"], _shards_dir(path, state["fc"]))
    if state["scaler"]:  # empty when the run was saved without fp16 loss scaling
        scaler.load_state_dict(state["scaler"])
    return state


