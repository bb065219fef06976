"""The training loader: seeded, sharded over ranks, resumable mid-epoch; uint8 batches decoded straight into place.

Workers decode whole batches (a dataset that stores encoded images decodes each one into its slot of a
(B, H, W, 3) buffer, so there is no per-image tensor and no collate copy); flip and scaling to [-1, 1] happen on
the device in `prepare_batch`. On CUDA the batches come through pinned memory and are copied to the GPU one batch
ahead on a side stream. A dataset with `loader="dali"` is read by the DALI pipeline instead.
"""
from __future__ import annotations

from typing import Iterator, Sequence

import torch
from torch.utils.data import DataLoader, Dataset

from arcface.data.sampler import ShardedBatchSampler
from arcface.errors import UserError

Batch = tuple[torch.Tensor, torch.Tensor]


def load_batch(dataset: Dataset, indices: Sequence[int]) -> Batch:
    """(uint8 (B, 3, H, W), int64 (B,)) for `indices`; channels-last in memory when decoded in place."""
    if hasattr(dataset, "load_into"):
        size = dataset.image_size
        images = torch.empty((len(indices), size, size, 3), dtype=torch.uint8)
        pixels = images.numpy()
        labels = [dataset.load_into(i, pixels[j]) for j, i in enumerate(indices)]
        return images.permute(0, 3, 1, 2), torch.tensor(labels, dtype=torch.int64)
    items = [dataset[i] for i in indices]
    return torch.stack([image for image, _ in items]), torch.tensor([label for _, label in items], dtype=torch.int64)


class _Batches(Dataset):
    """Indexed by a list of indices (what the batch sampler yields), so each worker builds a whole batch."""

    def __init__(self, dataset: Dataset):
        self.dataset = dataset

    def __getitem__(self, indices: Sequence[int]) -> Batch:
        return load_batch(self.dataset, indices)


def _ahead_on_device(batches: Iterator[Batch], device: torch.device) -> Iterator[Batch]:
    """Copy batch k+1 to the GPU on a side stream while batch k is being used."""
    stream = torch.cuda.Stream(device)

    def send(batch: Batch) -> Batch:
        with torch.cuda.stream(stream):
            return tuple(t.to(device, non_blocking=True) for t in batch)

    pending = next(batches, None)
    pending = send(pending) if pending is not None else None
    while pending is not None:
        torch.cuda.current_stream(device).wait_stream(stream)
        for t in pending:  # the memory belongs to the compute stream from now on
            t.record_stream(torch.cuda.current_stream(device))
        ready = pending
        nxt = next(batches, None)
        pending = send(nxt) if nxt is not None else None
        yield ready


class TrainLoader:
    """Batches of (uint8 (B,3,112,112), int64 (B,)) for one rank; `set_epoch` reshuffles deterministically."""

    def __init__(self, dataset: Dataset, batch_size: int, *, rank: int, world_size: int, seed: int,
                 num_workers: int, device: torch.device):
        self.batch_size = batch_size
        self.device = torch.device(device)
        self.sampler = ShardedBatchSampler(len(dataset), batch_size, rank=rank, world_size=world_size, seed=seed)
        self.loader = DataLoader(_Batches(dataset), batch_size=None, sampler=self.sampler, num_workers=num_workers,
                                 pin_memory=self.device.type == "cuda", persistent_workers=num_workers > 0)

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        """Select the epoch; `start_batch` > 0 resumes mid-epoch, skipping the batches already trained on."""
        self.sampler.set_epoch(epoch, start_batch)

    def __len__(self) -> int:
        return len(self.sampler)

    def __iter__(self) -> Iterator[Batch]:
        batches = iter(self.loader)
        return _ahead_on_device(batches, self.device) if self.device.type == "cuda" else batches


def build_loader(dataset: Dataset, batch_size: int, *, rank: int, world_size: int, seed: int, num_workers: int,
                 device: torch.device):
    """The loader the dataset asks for (`dataset.loader`: "torch", the default, or "dali")."""
    kind = getattr(dataset, "loader", "torch")
    if kind == "dali":
        from arcface.data.dali import DaliLoader  # optional dependency, imported only when asked for

        return DaliLoader(dataset, batch_size, rank=rank, world_size=world_size, seed=seed,
                          num_threads=max(1, num_workers), device=device)
    if kind != "torch":
        raise UserError(f"dataset.loader={kind} is not a loader: use dataset.loader=torch or dataset.loader=dali.")
    return TrainLoader(dataset, batch_size, rank=rank, world_size=world_size, seed=seed, num_workers=num_workers,
                       device=device)
