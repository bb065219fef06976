"""Process-group set-up and the collectives the rest of the library stands on.

The trainer never asks where it runs: `init_distributed` reads torchrun variables, then SLURM variables, and
otherwise runs as one process (gloo on CPU, NCCL on GPU). Everything here also works without a process group,
so single-process code paths need no special cases.
"""
from __future__ import annotations

import os
import random
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistEnv:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _env_from_slurm() -> bool:
    """Export torch.distributed variables from SLURM's when the job was started by srun/sbatch with tasks (through
    submitit or not); a MASTER_ADDR or MASTER_PORT the job script set is kept."""
    if "SLURM_PROCID" not in os.environ or int(os.environ.get("SLURM_NTASKS", "1")) < 2:
        return False
    from submitit.slurm.slurm import SlurmJobEnvironment

    job = SlurmJobEnvironment()
    port = random.Random(job.job_id).randint(20000, 60000)  # the same on every task of the job
    for key, value in {"MASTER_ADDR": job.hostnames[0], "MASTER_PORT": port, "RANK": job.global_rank,
                       "WORLD_SIZE": job.num_tasks, "LOCAL_RANK": job.local_rank,
                       "LOCAL_WORLD_SIZE": job.num_tasks // job.num_nodes}.items():
        os.environ.setdefault(key, str(value))
    return True


def init_distributed(backend: str | None = None, timeout_s: float | None = None) -> DistEnv:
    """Initialise the default process group if the launcher asked for one; return this process's place in it.

    `timeout_s` bounds every collective: a rank that stalls makes the others fail after it instead of hanging.
    """
    if "RANK" not in os.environ:
        _env_from_slurm()
    cuda = torch.cuda.is_available()
    if "RANK" in os.environ and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
        if cuda:
            torch.cuda.set_device(device)
        if not dist.is_initialized():
            timeout = None if timeout_s is None else timedelta(seconds=timeout_s)
            dist.init_process_group(backend or ("nccl" if cuda else "gloo"), timeout=timeout)
        return DistEnv(dist.get_rank(), dist.get_world_size(), local_rank, device)
    device = torch.device("cuda", 0) if cuda else torch.device("cpu")
    return DistEnv(0, 1, 0, device)


def shutdown_distributed() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def get_rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def get_world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def all_reduce(tensor: torch.Tensor, op=dist.ReduceOp.SUM) -> torch.Tensor:
    """In-place all-reduce; a no-op in one process."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(tensor, op=op)
    return tensor


def broadcast_object(obj, src: int = 0):
    """Rank `src`'s Python object on every rank (e.g. a seed or a path chosen on rank 0)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def gather_objects(obj, dst: int = 0) -> list | None:
    """Every rank's Python object, in rank order, on rank `dst`; None on the others."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return [obj]
    out = [None] * dist.get_world_size() if dist.get_rank() == dst else None
    dist.gather_object(obj, out, dst=dst)
    return out


class _AllGather(torch.autograd.Function):
    """All-gather whose backward sums every rank's gradient for each chunk and hands it to the chunk's owner: one
    reduce-scatter, which sends each rank only its own chunk's sum (an all-reduce per chunk would send every rank
    every sum, twice the bytes)."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor) -> tuple[torch.Tensor, ...]:
        chunks = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
        dist.all_gather(chunks, tensor.contiguous())
        return tuple(chunks)

    @staticmethod
    def backward(ctx, *grads: torch.Tensor) -> torch.Tensor:
        grads = [g.contiguous() for g in grads]
        own = torch.empty_like(grads[dist.get_rank()])
        try:
            dist.reduce_scatter(own, grads)
        except RuntimeError as error:  # gloo of older torch releases has no reduce-scatter: the same sums, slower
            if "does not support reduce_scatter" not in str(error):
                raise
            for g in grads:
                dist.all_reduce(g)
            own = grads[dist.get_rank()]
        return own


def all_gather(tensor: torch.Tensor) -> list[torch.Tensor]:
    """Every rank's `tensor` (same shape on all ranks), differentiable; `[tensor]` in one process."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return [tensor]
    if tensor.requires_grad:
        return list(_AllGather.apply(tensor))
    chunks = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
    dist.all_gather(chunks, tensor.contiguous())
    return chunks


def gather_rows(tensor: torch.Tensor, dst: int = 0, block_rows: int = 1 << 16) -> torch.Tensor | None:
    """Every rank's `tensor` concatenated along dim 0 (row counts may differ), as a CPU tensor on rank `dst`;
    None on the others. Sent in blocks of `block_rows` rows so no device holds more than W blocks at once."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return tensor.detach().cpu().clone()
    world, rank = dist.get_world_size(), dist.get_rank()
    count = torch.tensor([tensor.shape[0]], device=tensor.device)
    counts = [torch.zeros_like(count) for _ in range(world)]
    dist.all_gather(counts, count)
    counts = [int(c) for c in counts]
    offsets = [sum(counts[:r]) for r in range(world)]
    out = tensor.new_empty((sum(counts), *tensor.shape[1:]), device="cpu") if rank == dst else None
    tensor = tensor.detach()
    for start in range(0, max(counts), block_rows):
        size = min(block_rows, max(counts) - start)
        block = tensor.new_zeros((size, *tensor.shape[1:]))
        mine = tensor[start:start + size]
        block[:mine.shape[0]] = mine
        received = [torch.empty_like(block) for _ in range(world)] if rank == dst else None
        dist.gather(block, received, dst=dst)
        if rank == dst:
            for r, got in enumerate(received):
                n = max(0, min(size, counts[r] - start))
                out[offsets[r] + start:offsets[r] + start + n] = got[:n].cpu()
    return out


def sum_allreduce_hook(process_group, bucket):
    """DDP communication hook that sums gradients over ranks instead of averaging them.

    The Partial FC loss is already the mean over the global batch, and its all-gather hands each rank the exact
    gradient of that loss for its own embeddings; each rank's backbone gradient is then one term of a sum, and
    DDP's default averaging would shrink it W-fold. Use `ddp_model.register_comm_hook(None, sum_allreduce_hook)`.
    """
    group = process_group if process_group is not None else dist.group.WORLD
    future = dist.all_reduce(bucket.buffer(), group=group, async_op=True).get_future()
    return future.then(lambda f: f.value()[0])
