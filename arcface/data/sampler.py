"""Which batches of a dataset one rank reads in one epoch: seeded, sharded, and resumable mid-epoch."""
from __future__ import annotations

from typing import Iterator

import numpy as np


class ShardedBatchSampler:
    """Yields lists of `batch_size` indices of a dataset of `size` for `rank` of `world_size`.

    Every rank draws the same permutation from (seed, epoch), keeps every `world_size`-th index from `rank` on,
    and drops the tail, so the ranks' shards are disjoint, equal in length, and together cover all but fewer than
    `world_size` indices of each epoch. `set_epoch(epoch, start_batch=k)` resumes at batch k of that epoch with the
    same batches as an uninterrupted run.
    """

    def __init__(self, size: int, batch_size: int, *, rank: int = 0, world_size: int = 1, seed: int = 0,
                 shuffle: bool = True):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in 0..{world_size - 1}")
        self.size = size
        self.batch_size = batch_size
        self.rank = rank
        self.world_size = world_size
        self.seed = seed
        self.shuffle = shuffle
        self.epoch = 0
        self.start_batch = 0

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        """Select the epoch's permutation; the next iteration skips its first `start_batch` batches."""
        if not 0 <= start_batch <= len(self):
            raise ValueError(f"start_batch {start_batch} is not in 0..{len(self)}")
        self.epoch = epoch
        self.start_batch = start_batch

    def __len__(self) -> int:
        return self.size // self.world_size // self.batch_size

    def shard(self) -> np.ndarray:
        """This rank's indices for the current epoch, in reading order."""
        # int32 halves the permutation's memory (170 MB for 42M images) wherever the indices fit
        order = np.arange(self.size, dtype=np.int32 if self.size < 2**31 else np.int64)
        if self.shuffle:
            np.random.default_rng([self.seed, self.epoch]).shuffle(order)
        per_rank = self.size // self.world_size
        return order[self.rank:per_rank * self.world_size:self.world_size]

    def __iter__(self) -> Iterator[list[int]]:
        shard = self.shard()
        start, self.start_batch = self.start_batch, 0  # a resume offset applies to one pass only
        for b in range(start, len(self)):
            yield shard[b * self.batch_size:(b + 1) * self.batch_size].tolist()
