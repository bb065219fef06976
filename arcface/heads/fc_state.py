"""World-size-independent state of the sharded classifier: save on W ranks, resume on any W'.

`save_fc_state` gathers every rank's rows of the class centres and of their optimizer state into full (C, ...)
tensors on rank 0; `load_fc_state` takes that dict on every rank (load it with `torch.load(..., mmap=True)` to keep
memory flat) and keeps the rows of this rank's shard under the current world size.
"""
from __future__ import annotations

import torch

from arcface.distributed import gather_rows
from arcface.errors import UserError
from arcface.heads.partial_fc import PartialFC

FORMAT = "arcface.partial_fc/1"


def _is_row_state(value, num_local: int) -> bool:
    return isinstance(value, torch.Tensor) and value.dim() >= 1 and value.shape[0] == num_local


def save_fc_state(head: PartialFC, optimizer: torch.optim.Optimizer | None = None) -> dict | None:
    """Full (gathered) centres, their optimizer state and the margin's buffers on rank 0; None on other ranks.

    Collective: every rank must call it.
    """
    weight = gather_rows(head.weight)
    opt_state = optimizer.state.get(head.weight, {}) if optimizer is not None else {}
    rows, scalars = {}, {}
    for name in sorted(opt_state):
        value = opt_state[name]
        if _is_row_state(value, head.num_local):
            rows[name] = gather_rows(value)
        else:
            scalars[name] = value.detach().cpu().clone() if isinstance(value, torch.Tensor) else value
    if weight is None:
        return None
    return {
        "format": FORMAT,
        "num_classes": head.num_classes,
        "embedding_size": head.embedding_size,
        "weight": weight,
        "optimizer_rows": rows,
        "optimizer_scalars": scalars,
        "margin": {k: v.detach().cpu().clone() for k, v in head.margin.state_dict().items()},
    }


def load_fc_state(head: PartialFC, optimizer: torch.optim.Optimizer | None, state: dict) -> None:
    """Load `save_fc_state`'s dict into this rank's shard (any world size) and its optimizer state."""
    if state.get("format") != FORMAT:
        raise UserError("the checkpoint holds no classifier state in this project's format: resume from a "
                        "checkpoint written by arcface-train")
    if (state["num_classes"], state["embedding_size"]) != (head.num_classes, head.embedding_size):
        raise UserError(f"the checkpoint's classifier has {state['num_classes']} classes of size "
                        f"{state['embedding_size']} but this run has {head.num_classes} of size "
                        f"{head.embedding_size}: set dataset.num_classes and embedding_size to match the checkpoint")
    shard = slice(head.class_start, head.class_start + head.num_local)
    with torch.no_grad():
        head.weight.copy_(state["weight"][shard])
    head.margin.load_state_dict(state["margin"])
    if optimizer is None:
        return
    opt_state = {name: full[shard].to(head.weight.device, copy=True) for name, full in state["optimizer_rows"].items()}
    for name, value in state["optimizer_scalars"].items():
        opt_state[name] = value.to(head.weight.device) if isinstance(value, torch.Tensor) else value
    if opt_state:
        optimizer.state[head.weight] = opt_state
    else:
        optimizer.state.pop(head.weight, None)
