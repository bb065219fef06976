"""NVIDIA DALI loader for RecordIO datasets (`dataset.loader=dali`, the optional `dali` extra).

DALI's MXNet reader returns every record, and the header and identity records of an InsightFace `.rec` carry no
image, so its decoder fails on them. Instead of rewriting the `.rec`, the loader hands DALI an index of the image
records only, written once next to the system temp files. Decoding runs on the GPU ("mixed") when the training
device is CUDA and on CPU threads otherwise; batches follow the torch loader's contract (uint8 (B,3,H,W) and int64
labels), and flip/normalise stay in `prepare_batch`. The shuffle is DALI's own (a seeded buffer of
`initial_fill` records), so its order differs from the torch loader's.
"""
from __future__ import annotations

import hashlib
import os
import tempfile

import numpy as np
import torch

from arcface.data.record import RecordDataset
from arcface.data.recordio import RecordIndex, replaced_on_success
from arcface.errors import UserError


def image_index(dataset: RecordDataset, cache_dir: str | None = None) -> str:
    """Path of an `.idx` listing only the image records of `dataset`, in file order (cached by file identity)."""
    reader = dataset.reader
    stat = os.stat(reader.rec_path)
    tag = hashlib.sha1(f"{os.path.abspath(reader.rec_path)}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()
    folder = cache_dir or os.path.join(tempfile.gettempdir(), "arcface-dali")
    path = os.path.join(folder, f"{tag[:16]}.idx")
    if not os.path.exists(path):
        os.makedirs(folder, exist_ok=True)
        rows = reader.index.positions(dataset.keys)
        rows = rows[np.argsort(reader.index.offsets[rows], kind="stable")]
        with replaced_on_success(path) as (temp,):  # ranks racing here all write the same content
            RecordIndex(reader.index.keys[rows], reader.index.offsets[rows]).write(temp)
    return path


class DaliLoader:
    """Batches of (uint8 (B,3,H,W), int64 (B,)) for one rank from DALI; same interface as `TrainLoader`."""

    def __init__(self, dataset: RecordDataset, batch_size: int, *, rank: int, world_size: int, seed: int,
                 num_threads: int, device: torch.device, initial_fill: int = 32768):
        if not isinstance(dataset, RecordDataset):
            raise UserError(f"dataset.loader=dali reads RecordIO datasets only, not {type(dataset).__name__}: "
                            f"use dataset.loader=torch, or pack the images with `python tools/pack_rec.py`.")
        try:
            from nvidia.dali.plugin.pytorch import DALIGenericIterator, LastBatchPolicy
        except ImportError:
            raise UserError("dataset.loader=dali needs NVIDIA DALI: install it with `pip install -e '.[dali]'` "
                            "(or nvidia-dali-cuda120 / -cuda130 for your CUDA), or use dataset.loader=torch.") from None
        self.batch_size = batch_size
        self.device = torch.device(device)
        gpu = self.device.type == "cuda"
        pipe = _pipeline(batch_size=batch_size, num_threads=num_threads,
                         device_id=_cuda_index(self.device) if gpu else None, seed=seed,
                         rec=dataset.reader.rec_path, idx=image_index(dataset), shard_id=rank, num_shards=world_size,
                         initial_fill=min(initial_fill, len(dataset)), decode_device="mixed" if gpu else "cpu")
        self.iterator = DALIGenericIterator([pipe], ["images", "labels"], reader_name="reader",
                                            last_batch_policy=LastBatchPolicy.DROP, auto_reset=True)
        self._skip = 0
        self._mid_epoch = False

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        """DALI reshuffles every epoch by itself; `start_batch` skips that many batches to keep resumed epochs
        the right length."""
        self._skip = start_batch

    def __len__(self) -> int:
        return len(self.iterator)

    def __iter__(self):
        if self._mid_epoch:  # DALI cannot restart an epoch it is inside: finish the one a caller left
            for _ in self.iterator:
                pass
        skip, self._skip = self._skip, 0
        self._mid_epoch = True
        for i, (out,) in enumerate(self.iterator):
            if i >= skip:
                yield out["images"], out["labels"].reshape(-1).long()
        self._mid_epoch = False

    def close(self) -> None:
        """Release the pipeline (its threads and prefetched batches) before the run's final steps."""
        self.iterator = None


def _cuda_index(device: torch.device) -> int:
    return device.index if device.index is not None else torch.cuda.current_device()


def _pipeline(*, batch_size, num_threads, device_id, seed, rec, idx, shard_id, num_shards, initial_fill,
              decode_device):
    from nvidia.dali import fn, pipeline_def, types

    @pipeline_def(batch_size=batch_size, num_threads=num_threads, device_id=device_id, seed=seed)
    def faces():
        jpegs, labels = fn.readers.mxnet(path=[rec], index_path=[idx], shard_id=shard_id, num_shards=num_shards,
                                         random_shuffle=True, initial_fill=initial_fill, stick_to_shard=True,
                                         name="reader")
        images = fn.decoders.image(jpegs, device=decode_device, output_type=types.RGB)
        # an array label (plain layout) has the class in its first entry, like the torch datasets read it
        return fn.transpose(images, perm=[2, 0, 1]), fn.cast(labels[0], dtype=types.INT64)

    return faces()
