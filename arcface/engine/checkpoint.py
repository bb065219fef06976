"""Checkpoint files, written atomically: a crash mid-write never leaves a truncated file behind.

`model.pt` is the backbone alone (the model-zoo format); `checkpoint.pt` is the whole training state, saved
independently of the world size so a run resumes on any number of ranks.
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

import torch

from arcface.errors import UserError
from arcface.heads.fc_checkpoint import load_fc_state, save_fc_state
from arcface.models.checkpoint import load_backbone_weights


def save_atomic(obj, path: str | Path) -> Path:
    """torch.save to a temporary file beside `path`, then rename over it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def _cpu_state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu() for k, v in module.state_dict().items()}


def save_backbone(backbone: torch.nn.Module, path: str | Path) -> Path:
    """The model-zoo file: a plain backbone state_dict (reference key names, no `module.` prefix), on CPU."""
    return save_atomic(_cpu_state(backbone), path)


TRAINING_FORMAT = "arcface.train/1"


def save_training_state(path: str | Path, *, backbone: torch.nn.Module, head: torch.nn.Module, optimizer,
                        scaler, step: int, global_batch: int) -> None:
    """Everything needed to resume, in one file that any world size can load. Collective: every rank calls it.

    The backbone and its optimizer state are replicated, so rank 0's copy is the whole; the classifier's rows and
    their optimizer state are gathered from every rank (`save_fc_state`).
    """
    fc = save_fc_state(head, optimizer)
    if fc is None:  # not rank 0
        return
    save_atomic({
        "format": TRAINING_FORMAT,
        "step": step,
        "global_batch": global_batch,
        "backbone": _cpu_state(backbone),
        "optimizer": optimizer.state_dict(),
        "scaler": scaler.state_dict(),
        "fc": fc,
    }, path)


def load_training_state(path: str | Path, *, backbone: torch.nn.Module, backbone_name: str, head: torch.nn.Module,
                        optimizer, scaler, global_batch: int) -> int:
    """Restore what `save_training_state` wrote (on any world size); returns the optimizer step to continue from."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint {path} does not exist: pass trainer.resume=<a checkpoint.pt written by "
                        f"arcface-train>, or trainer.resume=null to start afresh")
    try:
        state = torch.load(path, map_location="cpu", mmap=True, weights_only=False)
    except Exception as exc:
        raise UserError(f"{path} cannot be read as a checkpoint ({type(exc).__name__}): pass the checkpoint.pt of "
                        f"an arcface-train run to trainer.resume") from None
    if not isinstance(state, dict) or state.get("format") != TRAINING_FORMAT:
        raise UserError(f"{path} is not a training checkpoint of arcface-train (a model.pt holds weights only: "
                        f"start from it with backbone.weights={path} instead of trainer.resume)")
    if state["global_batch"] != global_batch:
        raise UserError(f"{path} was trained with {state['global_batch']} samples per step and this run takes "
                        f"{global_batch} (trainer.batch_size x trainer.gradient_acc x ranks): set trainer.batch_size "
                        f"or trainer.gradient_acc so the product matches, then steps, epochs and the LR schedule "
                        f"carry on unchanged")
    load_backbone_weights(backbone, state["backbone"], backbone_name)
    optimizer.load_state_dict(state["optimizer"])
    load_fc_state(head, optimizer, state["fc"])
    if state["scaler"]:  # empty when the run was saved without fp16 loss scaling
        scaler.load_state_dict(state["scaler"])
    return int(state["step"])
