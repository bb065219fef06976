"""`dataset.loader=device_decode`: worker processes only read each batch's JPEG bytes from the RecordIO file; the
training device decodes them (torchvision.io.decode_jpeg: nvJPEG on a CUDA device, libjpeg on the CPU).

On an H200, nvJPEG decoded 112x112 faces at about 35k images/s, 2.1x the project's CPU loader with 16 worker
processes (benchmarks/results/gpu_h200_rerun.md). The CPU loader already feeds an r50 many times over on such a
node; decoding on the GPU pays where CPU cores per GPU are few, and leaves those cores to everything else.
RecordIO datasets of JPEGs at the training size only: other sizes need the torch loader, which resizes.
"""
from __future__ import annotations

from typing import Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from arcface.data.loader import Batch, WorkerLoader
from arcface.data.record import RecordDataset
from arcface.data.sampler import ShardedBatchSampler
from arcface.errors import UserError, first_line


class _EncodedBatches(Dataset):
    """Indexed by a batch's indices: (record keys, their bytes concatenated, each one's length, labels) as four
    tensors, one shared-memory transfer each per batch; a UserError (bad data) is returned rather than raised, so
    that the user sees its one sentence instead of a worker's traceback."""

    def __init__(self, dataset: RecordDataset):
        self.dataset = dataset

    def __getitem__(self, indices: Sequence[int]):
        try:
            items = [self.dataset.encoded(i) for i in indices]
        except UserError as error:
            return error
        data = [np.frombuffer(encoded, dtype=np.uint8) for _, encoded, _ in items]
        return (torch.tensor([key for key, _, _ in items]), torch.from_numpy(np.concatenate(data)),
                torch.tensor([len(d) for d in data]), torch.tensor([label for _, _, label in items]))


class DeviceDecodeLoader(WorkerLoader):
    """Batches of (uint8 (B,3,S,S) on the device, int64 (B,)) for one rank, as `TrainLoader` gives them."""

    def __init__(self, dataset: RecordDataset, batch_size: int, *, rank: int, world_size: int, seed: int,
                 num_workers: int, device: torch.device):
        if not isinstance(dataset, RecordDataset):
            raise UserError(f"dataset.loader=device_decode reads RecordIO datasets only, not {type(dataset).__name__}"
                            f": use dataset.loader=torch, or pack the images with `python tools/pack_rec.py`.")
        sampler = ShardedBatchSampler(len(dataset), batch_size, rank=rank, world_size=world_size, seed=seed)
        super().__init__(_EncodedBatches(dataset), sampler, sampler, batch_size=batch_size, seed=seed,
                         num_workers=num_workers, device=device)
        self.rec_path, self.root, self.size = dataset.reader.rec_path, dataset.root, dataset.image_size

    def __iter__(self) -> Iterator[Batch]:
        for batch in self.loader:
            if isinstance(batch, UserError):
                raise batch  # bad data met while reading this batch
            keys, data, lengths, labels = batch
            jpegs = list(torch.split(data, lengths.tolist()))
            yield self._decoded(jpegs, keys), labels.to(self.device, non_blocking=True)

    def _decoded(self, jpegs: list[torch.Tensor], keys: torch.Tensor) -> torch.Tensor:
        from torchvision.io import ImageReadMode, decode_jpeg  # torchvision only for this loader

        try:
            images = decode_jpeg(jpegs, mode=ImageReadMode.RGB, device=self.device)
        except RuntimeError:
            self._name_the_bad_record(jpegs, keys)
            raise
        for image, key in zip(images, keys.tolist()):
            if image.shape[1:] != (self.size, self.size):
                raise UserError(f"record {key} of {self.rec_path} is {image.shape[2]}x{image.shape[1]}, and "
                                f"dataset.loader=device_decode takes {self.size}x{self.size} images only: re-pack "
                                f"with `python tools/pack_rec.py --size {self.size}` or use dataset.loader=torch")
        return torch.stack(images)

    def _name_the_bad_record(self, jpegs: list[torch.Tensor], keys: torch.Tensor) -> None:
        """Decode the batch's images one by one, on the CPU, and raise a UserError naming the first that fails."""
        from torchvision.io import ImageReadMode, decode_jpeg

        for jpeg, key in zip(jpegs, keys.tolist()):
            try:
                decode_jpeg(jpeg, mode=ImageReadMode.RGB)
            except RuntimeError as error:
                raise UserError(f"record {key} of {self.rec_path} is no JPEG that decodes ({first_line(error)}); "
                                f"find every bad record with `python tools/inspect_rec.py {self.root}` and re-pack "
                                f"the file, or use dataset.loader=torch, which also reads PNG") from None
