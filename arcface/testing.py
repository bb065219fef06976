"""Running multi-process code on one CPU machine, for the tests and the benchmarks: the library itself never
starts its own processes (torchrun or SLURM does)."""
from __future__ import annotations

import os
import tempfile

import torch.distributed as dist
import torch.multiprocessing as mp

mp.set_forkserver_preload(["torch", "torch.distributed", "arcface.heads", "arcface.engine.training_state"])


def _gloo_worker(rank: int, fn, world_size: int, store_file: str, args: tuple) -> None:
    dist.init_process_group("gloo", init_method=f"file://{store_file}", rank=rank, world_size=world_size)
    try:
        fn(rank, world_size, *args)
        # A collective returns once this rank's last sends are queued, not received; leaving then resets the
        # connections under a slower peer. After a barrier every rank has received everything sent to it.
        dist.barrier()
    finally:
        dist.destroy_process_group()


def spawn_gloo(fn, world_size: int, *args) -> None:
    """Run `fn(rank, world_size, *args)` in `world_size` fresh local processes joined in a gloo group.

    `fn` must be importable (module level). The ranks meet through a file store in a private folder, not a TCP
    store: no port is picked ahead of time (another process could take it before rank 0 listens), and no rank
    hosts a store server that the others depend on until the very end. The processes are forked from one server
    process that has imported torch once (multiprocessing's forkserver), not each started afresh: seconds saved
    per group, and no fork of a process that already runs threads.
    """
    with tempfile.TemporaryDirectory(prefix="spawn_gloo_") as folder:
        store = os.path.join(folder, "store")
        mp.start_processes(_gloo_worker, args=(fn, world_size, store, args), nprocs=world_size, join=True,
                           start_method="forkserver")
