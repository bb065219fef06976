"""DALI (CPU pipeline here): its MXNet reader reads what this project writes, and the DALI loader keeps the torch
loader's batch contract on InsightFace files without any rewrite of the `.rec`."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from arcface.data import ImageFolderDataset, RecordDataset
from arcface.data.dali import image_index
from arcface.data.loader import build_loader
from arcface.data.recordio import MAGIC, IRHeader, RecordReader, RecordWriter, pack, unpack
from arcface.errors import UserError
from nvidia.dali import fn, pipeline_def  # the dev extra installs DALI: these tests must run, not skip
from conftest import FIXTURES, write_rec

CPU = torch.device("cpu")


def dali_raw_records(rec: Path, idx: Path, count: int) -> list[tuple[bytes, list[float]]]:
    """(image bytes, label) of every record, in file order, as DALI's reader returns them."""
    @pipeline_def(batch_size=1, num_threads=1, device_id=None)
    def raw():
        data, label = fn.readers.mxnet(path=[str(rec)], index_path=[str(idx)], random_shuffle=False, name="reader")
        return data, label

    pipe = raw()
    pipe.build()
    out = []
    for _ in range(count):
        data, label = pipe.run()
        out.append((np.asarray(data[0]).tobytes(), np.asarray(label[0]).ravel().tolist()))
    return out


def test_dali_reader_reads_our_chunked_records(tmp_path):
    magic = MAGIC.to_bytes(4, "little")
    payloads = [b"abcd" * 5 + magic + b"tail", magic * 2, b"xy" + magic + b"z", bytes(range(256)) + magic]
    with RecordWriter(tmp_path / "train.rec", tmp_path / "train.idx") as writer:
        for key, data in enumerate(payloads):
            writer.write(pack(IRHeader(0, float(key), key), data), key)
    got = dali_raw_records(tmp_path / "train.rec", tmp_path / "train.idx", len(payloads))
    assert got == [(data, [float(key)]) for key, data in enumerate(payloads)]


def test_dali_reader_reads_the_mxnet_continuation_fixture():
    folder = FIXTURES / "continuation"
    got = dali_raw_records(folder / "train.rec", folder / "train.idx", 3)
    reader = RecordReader(folder / "train.rec", folder / "train.idx")
    assert [data for data, _ in got] == [unpack(reader.read(k))[1] for k in range(3)]


@pytest.fixture(scope="module")
def packed(tmp_path_factory) -> RecordDataset:
    """An InsightFace-layout file written by this project: 5 identities, 30 images."""
    folder = write_rec(tmp_path_factory.mktemp("dali"), [i // 6 for i in range(30)])
    return RecordDataset(str(folder), num_classes=5)


def _epoch(loader, epoch: int) -> list[tuple[bytes, int]]:
    loader.set_epoch(epoch)
    return [(images[k].contiguous().numpy().tobytes(), int(labels[k])) for images, labels in loader
            for k in range(len(labels))]


def test_dali_loader_matches_the_torch_contract(packed):
    loader = build_loader(packed, 5, rank=0, world_size=1, seed=1, num_workers=2, device=CPU, loader="dali")
    assert type(loader).__name__ == "DaliLoader" and len(loader) == 6
    loader.set_epoch(0)
    images, labels = next(iter(loader))
    assert images.dtype == torch.uint8 and tuple(images.shape) == (5, 3, 112, 112)
    assert labels.dtype == torch.int64 and tuple(labels.shape) == (5,)
    expected = sorted((packed[i][0].contiguous().numpy().tobytes(), packed[i][1]) for i in range(len(packed)))
    first, second = _epoch(loader, 1), _epoch(loader, 2)
    assert sorted(first) == sorted(second) == expected  # decoded pixels identical to the torch path
    assert first != second  # reshuffled


def test_dali_shards_are_disjoint_and_complete(packed):
    shards = [_epoch(build_loader(packed, 3, rank=r, world_size=2, seed=4, num_workers=1, device=CPU,
                                  loader="dali"), 0)
              for r in range(2)]
    assert len(shards[0]) == len(shards[1]) == 15
    assert not set(shards[0]) & set(shards[1])
    assert len(set(shards[0]) | set(shards[1])) == 30


def test_dali_resume_skips_batches(packed):
    loader = build_loader(packed, 5, rank=0, world_size=1, seed=1, num_workers=1, device=CPU, loader="dali")
    loader.set_epoch(0, start_batch=4)
    assert len(list(loader)) == 2


def test_image_index_lists_only_image_records(packed, tmp_path):
    path = image_index(packed, cache_dir=str(tmp_path))
    keys = [int(line.split("\t")[0]) for line in Path(path).read_text().splitlines()]
    assert keys == list(range(1, 31))


def test_dali_refuses_image_folders(tmp_path):
    from PIL import Image

    (tmp_path / "a").mkdir()
    Image.new("RGB", (112, 112)).save(tmp_path / "a" / "0.jpg")
    data = ImageFolderDataset(str(tmp_path), num_classes=1)
    with pytest.raises(UserError, match="RecordIO datasets only"):
        build_loader(data, 1, rank=0, world_size=1, seed=0, num_workers=1, device=CPU, loader="dali")
