"""Loading backbone weights: this project's `model.pt`, the reference model zoo's `backbone.pth` / `model.pt`,
or a DistributedDataParallel state_dict (`module.` prefix)."""
from __future__ import annotations

import pickle
import re
from pathlib import Path
from typing import Mapping

import torch
import torch.nn as nn

from arcface.errors import UserError, unloadable

# Training checkpoints of the reference keep the backbone under this key beside the optimizer and FC shard.
_NESTED_KEYS = ("state_dict_backbone", "state_dict", "backbone")
_SHOWN = 3  # how many offending keys the error names


def _unwrap(state: Mapping) -> dict[str, torch.Tensor]:
    for key in _NESTED_KEYS:
        if isinstance(state.get(key), Mapping):
            state = state[key]
            break
    prefix = "module."
    if state and all(k.startswith(prefix) for k in state):
        state = {k[len(prefix):]: v for k, v in state.items()}
    return dict(state)


def _read(path: str | Path) -> object:
    """torch.load with weights_only=True: a file that would run code when unpickled is refused, not executed."""
    source = str(path)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise UserError(f"backbone weights {source} do not exist: check the path") from None
    except OSError as e:
        raise UserError(f"backbone weights {source} cannot be read ({e.strerror}): check the path") from None
    except Exception as e:  # torch reports a damaged file as EOFError, RuntimeError, KeyError, ... by where it broke
        wanted = re.search(r"GLOBAL ([\w.]+)", str(e)) if isinstance(e, pickle.UnpicklingError) else None
        if wanted:  # what weights_only refused to call
            raise UserError(f"{source} asks to run {wanted.group(1)} when unpickled, which a file of weights never "
                            f"needs, so it was not loaded: use weights (a state_dict of tensors) from a source you "
                            f"trust") from None
        raise UserError(f"backbone weights {source} {unloadable(Path(path), e)}: it was damaged in writing or "
                        f"copying, or is not a torch.save file of tensors; copy it again") from None


def _first(keys: list[str]) -> str:
    more = f" (+{len(keys) - _SHOWN} more)" if len(keys) > _SHOWN else ""
    return ", ".join(keys[:_SHOWN]) + more


def load_backbone_weights(model: nn.Module, path_or_state: str | Path | Mapping, backbone_name: str) -> nn.Module:
    """Load weights into `model` (built as `backbone_name`) with strict key and shape checks.

    A file of another backbone stops with a UserError naming the expected backbone, the file and the first
    missing / unexpected / mis-shaped keys; nothing is loaded in that case.
    """
    source = "the given state_dict"
    if isinstance(path_or_state, (str, Path)):
        source = str(path_or_state)
        path_or_state = _read(path_or_state)
    if not isinstance(path_or_state, Mapping):
        raise UserError(f"{source} holds a {type(path_or_state).__name__}, not a backbone state_dict")
    state = _unwrap(path_or_state)
    not_tensors = [k for k, v in state.items() if not isinstance(v, torch.Tensor)]
    if not_tensors:
        raise UserError(f"{source} is not a backbone state_dict: keys {_first(not_tensors)} hold no tensor; "
                        f"pass the model.pt or backbone.pth a training run wrote")
    expected = model.state_dict()
    # Files written before BatchNorm counted its batches lack num_batches_tracked; torch fills it in.
    missing = [k for k in expected if k not in state and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state if k not in expected]
    shapes = [f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}" for k, v in expected.items()
              if k in state and state[k].shape != v.shape]
    problems = [f"{what} keys {_first(keys)}" for what, keys in
                (("missing", missing), ("unexpected", unexpected), ("mis-shaped (file vs model)", shapes)) if keys]
    if problems:
        raise UserError(f"{source} does not fit backbone {backbone_name!r} ({'; '.join(problems)}): "
                        "choose the backbone (and embedding_size) the weights were trained with")
    model.load_state_dict(state, strict=True)
    return model
