"""The training loader: seeded, sharded over ranks, uint8 batches (normalised on the device by `prepare_batch`)."""
from __future__ import annotations

import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler


class TrainLoader:
    """Batches of (uint8 (B,3,112,112), int64 (B,)) for one rank; `set_epoch` reshuffles deterministically."""

    def __init__(self, dataset: Dataset, batch_size: int, *, rank: int, world_size: int, seed: int,
                 num_workers: int, device: torch.device):
        self.batch_size = batch_size
        self.sampler = DistributedSampler(dataset, num_replicas=world_size, rank=rank, shuffle=True, seed=seed,
                                          drop_last=True)
        self.loader = DataLoader(dataset, batch_size=batch_size, sampler=self.sampler, num_workers=num_workers,
                                 pin_memory=device.type == "cuda", drop_last=True,
                                 persistent_workers=num_workers > 0)

    def set_epoch(self, epoch: int) -> None:
        self.sampler.set_epoch(epoch)

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        for images, labels in self.loader:
            yield images, labels.long()


def build_loader(dataset: Dataset, batch_size: int, *, rank: int, world_size: int, seed: int, num_workers: int,
                 device: torch.device) -> TrainLoader:
    return TrainLoader(dataset, batch_size, rank=rank, world_size=world_size, seed=seed, num_workers=num_workers,
                       device=device)
