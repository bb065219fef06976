"""The training loader: seeded, sharded over ranks, resumable mid-epoch; uint8 batches built where they are read.

Workers build whole batches straight into a ring of batch slots in shared memory, allocated once: a dataset that
stores encoded images decodes each image into a reused buffer and copies it into its slot, and only the slot
number and the labels travel back. (Sending a fresh tensor per batch costs a shared-memory segment per batch,
measured at ~90 us of CPU per image here, more than half a JPEG decode.) The main process copies each batch out of
its slot (into pinned memory on CUDA) before the slot is reused. Flip and scaling to [-1, 1] happen on the device
in `prepare_batch`; on CUDA batches reach the GPU one batch ahead on a side stream. `build_loader(...,
loader=...)` (`dataset.loader`) picks this loader ("torch"), or for RecordIO datasets one that decodes on the
training device ("device_decode", arcface.data.device_decode) or NVIDIA DALI's pipeline ("dali").
"""
from __future__ import annotations

import weakref
from typing import Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from arcface.data.sampler import ShardedBatchSampler
from arcface.errors import UserError

Batch = tuple[torch.Tensor, torch.Tensor]
_PREFETCH = 2  # batches in flight per worker


def load_batch(dataset: Dataset, indices: Sequence[int], out: torch.Tensor) -> torch.Tensor:
    """Fill `out` (uint8 (B, 3, H, W)) with the images of `indices`; returns their labels (int64 (B,))."""
    if hasattr(dataset, "load_into"):
        pixels = out.numpy()
        decoded = np.empty(pixels.shape[2:] + pixels.shape[1:2], dtype=np.uint8)
        labels = []
        for j, i in enumerate(indices):
            labels.append(dataset.load_into(i, decoded))
            pixels[j] = decoded.transpose(2, 0, 1)  # transposed here, in the worker: NCHW halves prepare_batch
        return torch.tensor(labels, dtype=torch.int64)
    labels = []
    for j, i in enumerate(indices):
        image, label = dataset[i]
        out[j] = image
        labels.append(label)
    return torch.tensor(labels, dtype=torch.int64)


class _Batches(Dataset):
    """Indexed by (slot, indices): builds that batch into ring slot `slot` and returns (slot, labels).

    A UserError (bad data) is returned as (slot, error) rather than raised: torch re-raises a worker's exception
    wrapped in a traceback of the worker, and the user should see the error's one sentence.
    """

    def __init__(self, dataset: Dataset, ring: torch.Tensor):
        self.dataset = dataset
        self.ring = ring

    def __getitem__(self, task: tuple[int, Sequence[int]]) -> tuple[int, torch.Tensor | UserError]:
        slot, indices = task
        try:
            return slot, load_batch(self.dataset, indices, self.ring[slot])
        except UserError as error:
            return slot, error


class _Slotted:
    """The batch sampler's batches numbered round-robin over the ring's slots."""

    def __init__(self, sampler: ShardedBatchSampler, slots: int):
        self.sampler = sampler
        self.slots = slots

    def __len__(self) -> int:
        return len(self.sampler)

    def __iter__(self):
        for k, indices in enumerate(self.sampler):
            yield k % self.slots, indices


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


def _stop_workers(loader: DataLoader) -> None:
    """Shut a DataLoader's persistent workers down while their queues are alive. Left to the garbage collector,
    its iterator can be finalised after its own queues, and then waits 5 s per worker for a goodbye never sent."""
    iterator, loader._iterator = loader._iterator, None
    if iterator is not None:
        iterator._shutdown_workers()


class WorkerLoader:
    """What the loaders with worker processes share: a seeded batch order sharded over ranks (`set_epoch`, mid-epoch
    resume), a DataLoader whose workers run `tasks[task]` for each task of `order`, and stopping those workers."""

    def __init__(self, tasks: Dataset, sampler: ShardedBatchSampler, order, *, batch_size: int, seed: int,
                 num_workers: int, device: torch.device):
        self.batch_size = batch_size
        self.device = torch.device(device)
        self.sampler = sampler
        # A generator of its own: each epoch's iterator draws a worker seed from it, and drawing from the global
        # one would shift the flips of a resumed run against the uninterrupted one.
        self.loader = DataLoader(tasks, batch_size=None, sampler=order, num_workers=num_workers,
                                 persistent_workers=num_workers > 0,
                                 prefetch_factor=_PREFETCH if num_workers > 0 else None,
                                 generator=torch.Generator().manual_seed(seed))
        self._stop_workers = weakref.finalize(self, _stop_workers, self.loader)

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        """Select the epoch; `start_batch` > 0 resumes mid-epoch, skipping the batches already trained on."""
        self.sampler.set_epoch(epoch, start_batch)

    def __len__(self) -> int:
        return len(self.sampler)

    def close(self) -> None:
        """Stop the worker processes now (they are stopped anyway when this loader is collected)."""
        self._stop_workers()


class TrainLoader(WorkerLoader):
    """Batches of (uint8 (B,3,112,112), int64 (B,)) for one rank; `set_epoch` reshuffles deterministically."""

    def __init__(self, dataset: Dataset, batch_size: int, *, rank: int, world_size: int, seed: int,
                 num_workers: int, device: torch.device):
        sampler = ShardedBatchSampler(len(dataset), batch_size, rank=rank, world_size=world_size, seed=seed)
        # Slots for every batch a worker may be filling or the main process may not have copied out yet.
        slots = max(1, num_workers) * _PREFETCH + 2
        image_shape = tuple(dataset[0][0].shape)
        self.ring = torch.empty((slots, batch_size) + image_shape, dtype=torch.uint8)
        if num_workers > 0:
            self.ring.share_memory_()
        super().__init__(_Batches(dataset, self.ring), sampler, _Slotted(sampler, slots), batch_size=batch_size,
                         seed=seed, num_workers=num_workers, device=device)

    def _copied_out(self) -> Iterator[Batch]:
        pinned = self.device.type == "cuda"
        for slot, labels in self.loader:
            if isinstance(labels, UserError):
                raise labels  # bad data met while building this batch, in a worker or here
            images = torch.empty(self.ring.shape[1:], dtype=torch.uint8, pin_memory=pinned)
            yield images.copy_(self.ring[slot]), labels

    def __iter__(self) -> Iterator[Batch]:
        batches = self._copied_out()
        return _ahead_on_device(batches, self.device) if self.device.type == "cuda" else batches


LOADERS = ("torch", "device_decode", "dali")


def build_loader(dataset: Dataset, batch_size: int, *, rank: int, world_size: int, seed: int, num_workers: int,
                 device: torch.device, loader: str = "torch"):
    """The training loader `loader` names (`dataset.loader`): "torch" (the default), "device_decode" or "dali"."""
    if loader == "dali":
        from arcface.data.dali import DaliLoader  # optional dependency, imported only when asked for

        return DaliLoader(dataset, batch_size, rank=rank, world_size=world_size, seed=seed,
                          num_threads=max(1, num_workers), device=device)
    if loader == "device_decode":
        from arcface.data.device_decode import DeviceDecodeLoader  # imports torchvision: only when asked for

        return DeviceDecodeLoader(dataset, batch_size, rank=rank, world_size=world_size, seed=seed,
                                  num_workers=num_workers, device=device)
    if loader != "torch":
        raise UserError(f"dataset.loader={loader} is not a loader: use one of "
                        f"{', '.join(f'dataset.loader={name}' for name in LOADERS)}.")
    return TrainLoader(dataset, batch_size, rank=rank, world_size=world_size, seed=seed, num_workers=num_workers,
                       device=device)
