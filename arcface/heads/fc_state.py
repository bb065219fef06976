"""World-size-independent state of the sharded classifier: save on W ranks, resume on any W'.

Two layouts:
- sharded (`save_fc_shards`, what training checkpoints use): every rank writes its own rows of the class centres
  and of their optimizer state into one directory with `torch.distributed.checkpoint` (DCP), each block of rows
  declared at its global row offset; loading asks DCP for this rank's rows under the current world size and DCP
  reads them from whichever files hold them. No rank ever holds more than its own shard. What is small (sizes,
  the optimizer's scalar state, the margin's buffers) comes back as a dict for the caller to store beside it.
- gathered (`save_fc_state`): every row gathered into full (C, ...) tensors on rank 0, in one dict; fine for small
  heads and read from checkpoints written before the sharded layout.

`load_fc_state` reads either. Rows go into the head's storage dtype whatever dtype they were saved in, so float32
state loads into bfloat16 storage (rounded to nearest) and back.
"""
from __future__ import annotations

import contextlib
import warnings
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed._shard.metadata import ShardMetadata
from torch.distributed._shard.sharded_tensor import Shard, ShardedTensor, ShardedTensorMetadata
from torch.distributed._shard.sharded_tensor.metadata import TensorProperties

from arcface.distributed import gather_rows, get_world_size
from arcface.errors import UserError
from arcface.heads.partial_fc import PartialFC
from arcface.heads.sharding import shard_range

FORMAT = "arcface.partial_fc/1"  # gathered rows in the dict
SHARDED_FORMAT = "arcface.partial_fc/2"  # rows in a DCP directory beside the dict
_OPTIMIZER = "optimizer."  # prefix of the optimizer's row state among the DCP keys; the centres are "weight"


def _is_row_state(value, num_local: int) -> bool:
    return isinstance(value, torch.Tensor) and value.dim() >= 1 and value.shape[0] == num_local


def _split_optimizer_state(head: PartialFC, optimizer) -> tuple[dict, dict]:
    """(per-row tensors, everything else) of the centres' optimizer state, by name."""
    opt_state = optimizer.state.get(head.weight, {}) if optimizer is not None else {}
    rows, scalars = {}, {}
    for name in sorted(opt_state):
        value = opt_state[name]
        if _is_row_state(value, head.num_local):
            rows[name] = value
        else:
            scalars[name] = value.detach().cpu().clone() if isinstance(value, torch.Tensor) else value
    return rows, scalars


def _small_state(head: PartialFC, scalars: dict, layout: str) -> dict:
    return {"format": layout, "num_classes": head.num_classes, "embedding_size": head.embedding_size,
            "optimizer_scalars": scalars,
            "margin": {k: v.detach().cpu().clone() for k, v in head.margin.state_dict().items()}}


def save_fc_state(head: PartialFC, optimizer: torch.optim.Optimizer | None = None) -> dict | None:
    """Full (gathered) centres, their optimizer state and the margin's buffers on rank 0; None on other ranks.

    Collective: every rank must call it.
    """
    rows, scalars = _split_optimizer_state(head, optimizer)
    weight = gather_rows(head.weight)
    rows = {name: gather_rows(value) for name, value in rows.items()}
    if weight is None:
        return None
    return {**_small_state(head, scalars, FORMAT), "weight": weight, "optimizer_rows": rows}


def _global_rows(head: PartialFC, local: torch.Tensor):
    """`local` (this rank's rows) as DCP sees it: a block of the (num_classes, ...) tensor at the shard's offset.

    Without a process group the local rows are the whole tensor, which DCP takes as it is.
    """
    if not dist.is_initialized():
        return local
    world, device = get_world_size(), local.device
    where = "cpu" if device.type == "cpu" else f"{device.type}:{device.index}"
    tail = list(local.shape[1:])
    shards = []
    for rank in range(world):
        start, count = shard_range(head.num_classes, rank, world)
        shards.append(ShardMetadata([start] + [0] * len(tail), [count] + tail, f"rank:{rank}/{where}"))
    properties = TensorProperties(dtype=local.dtype, layout=local.layout, requires_grad=False,
                                  memory_format=torch.contiguous_format, pin_memory=False)
    metadata = ShardedTensorMetadata(shards, torch.Size([head.num_classes] + tail), properties)
    mine = Shard(local, shards[dist.get_rank()])
    return ShardedTensor._init_from_local_shards_and_global_metadata([mine], metadata)


def save_fc_shards(head: PartialFC, optimizer: torch.optim.Optimizer | None, directory: str | Path) -> dict:
    """Write this rank's rows of the centres and of their optimizer state into `directory` (DCP files: one per rank
    and `.metadata`); return the small rest (sizes, optimizer scalars, margin buffers) on every rank.

    Collective: every rank must call it with the same (existing, shared) directory.
    """
    rows, scalars = _split_optimizer_state(head, optimizer)
    tensors = {"weight": head.weight.detach(), **{_OPTIMIZER + name: value for name, value in rows.items()}}
    with _quiet_dcp():
        dcp.save({key: _global_rows(head, value) for key, value in tensors.items()},
                 storage_writer=dcp.FileSystemWriter(str(directory)), no_dist=not dist.is_initialized())
    return _small_state(head, scalars, SHARDED_FORMAT)


def saved_shards_complete(directory: str | Path) -> bool:
    """Whether `directory` holds a finished DCP save (its `.metadata` is written last, by rank 0)."""
    return (Path(directory) / ".metadata").is_file()


@contextlib.contextmanager
def _quiet_dcp():
    """DCP warns that ShardedTensor, the one way to declare blocks at arbitrary row offsets, is deprecated, and
    that a load without a process group is a load in one process; both are intended here."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*deprecating ShardedTensor", category=FutureWarning)
        warnings.filterwarnings("ignore", message=".*assuming the intent is to (load|save) in a single process")
        yield


def _load_shards(head: PartialFC, directory: Path) -> dict[str, torch.Tensor]:
    """This rank's rows of every tensor saved in `directory`, by key, in the dtype they were saved in (DCP reads
    into tensors of that dtype only). Centres saved in the storage dtype are read straight into `head.weight`."""
    saved = dcp.FileSystemReader(str(directory)).read_metadata().state_dict_metadata
    local = {}
    for key, meta in saved.items():
        dtype = meta.properties.dtype
        in_place = key == "weight" and dtype == head.weight.dtype
        local[key] = head.weight.detach() if in_place else torch.empty(
            [head.num_local, *meta.size[1:]], dtype=dtype, device=head.weight.device)
    with _quiet_dcp():
        dcp.load({key: _global_rows(head, value) for key, value in local.items()},
                 storage_reader=dcp.FileSystemReader(str(directory)), no_dist=not dist.is_initialized())
    return local


def gathered_fc_state(state: dict, shards: str | Path | None = None) -> dict:
    """`state` in the gathered layout (full `weight` and `optimizer_rows`), reading the rows of a sharded save from
    `shards` into full tensors in this process: for inspecting a checkpoint or converting it, not for training."""
    if state.get("format") != SHARDED_FORMAT:
        return state
    saved = dcp.FileSystemReader(str(shards)).read_metadata().state_dict_metadata
    full = {key: torch.empty(meta.size, dtype=meta.properties.dtype) for key, meta in saved.items()}
    with _quiet_dcp():
        dcp.load(full, storage_reader=dcp.FileSystemReader(str(shards)), no_dist=True)
    rows = {key.removeprefix(_OPTIMIZER): value for key, value in full.items() if key != "weight"}
    return {**state, "format": FORMAT, "weight": full["weight"], "optimizer_rows": rows}


def load_fc_state(head: PartialFC, optimizer: torch.optim.Optimizer | None, state: dict,
                  shards: str | Path | None = None) -> None:
    """Load what `save_fc_state` or `save_fc_shards` saved into this rank's shard (any world size) and its
    optimizer state. `shards` is the DCP directory of a sharded save (collective then: every rank calls it)."""
    if state.get("format") not in (FORMAT, SHARDED_FORMAT):
        raise UserError("the checkpoint holds no classifier state in this project's format: resume from a "
                        "checkpoint written by arcface-train")
    if (state["num_classes"], state["embedding_size"]) != (head.num_classes, head.embedding_size):
        raise UserError(f"the checkpoint's classifier has {state['num_classes']} classes of size "
                        f"{state['embedding_size']} but this run has {head.num_classes} of size "
                        f"{head.embedding_size}: set dataset.num_classes and embedding_size to match the checkpoint")
    gathered = state["format"] == FORMAT
    if gathered:  # full tensors (memory-mapped by torch.load): this shard's rows are copied out below
        shard = slice(head.class_start, head.class_start + head.num_local)
        with torch.no_grad():
            head.weight.copy_(state["weight"][shard])
        rows = {name: full[shard] for name, full in state["optimizer_rows"].items()}
    else:
        loaded = _load_shards(head, Path(shards))
        weight = loaded.pop("weight")
        if weight.data_ptr() != head.weight.data_ptr():  # saved in another dtype: rounded to nearest here
            with torch.no_grad():
                head.weight.copy_(weight)
        rows = {key.removeprefix(_OPTIMIZER): value for key, value in loaded.items()}
    head.margin.load_state_dict(state["margin"])
    if optimizer is None:
        return
    # Centre-shaped state (momentum, Adam's moments) takes the centres' storage dtype; per-row counts stay as saved.
    opt_state = {name: value.to(head.weight.device, head.weight.dtype if value.dim() == head.weight.dim()
                                else value.dtype, copy=gathered)
                 for name, value in rows.items()}
    for name, value in state["optimizer_scalars"].items():
        opt_state[name] = value.to(head.weight.device) if isinstance(value, torch.Tensor) else value
    if opt_state:
        optimizer.state[head.weight] = opt_state
    else:
        optimizer.state.pop(head.weight, None)
