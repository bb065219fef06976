"""Checkpoint files, written atomically: a crash mid-write never leaves a truncated file behind."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

import torch


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


def save_backbone(backbone: torch.nn.Module, path: str | Path) -> Path:
    """The model-zoo file: a plain backbone state_dict (reference key names, no `module.` prefix), on CPU."""
    state = {k: v.detach().cpu() for k, v in backbone.state_dict().items()}
    return save_atomic(state, path)
