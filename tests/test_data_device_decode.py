"""dataset.loader=device_decode: the torch loader's batches (order, labels, pixels) with the JPEGs decoded by the
training device (here the CPU, the same code path as nvJPEG on CUDA); bad records are one sentence naming them."""
from __future__ import annotations

import io
import logging

import numpy as np
import pytest
import torch
from PIL import Image

from arcface.data import ImageFolderDataset, RecordDataset
from arcface.data.loader import build_loader
from arcface.data.recordio import InsightFaceWriter
from arcface.errors import UserError
from conftest import train_here, write_image_folders, write_rec

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def packed(tmp_path_factory) -> RecordDataset:
    return RecordDataset(str(write_rec(tmp_path_factory.mktemp("faces"), [i // 6 for i in range(30)])), None)


def _epoch(loader, epoch: int, start_batch: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    loader.set_epoch(epoch, start_batch)
    return list(loader)


@pytest.mark.parametrize("workers", [0, 2])
def test_batches_are_the_torch_loaders_decoded_on_the_device(packed, workers):
    torch_loader = build_loader(packed, 4, rank=1, world_size=2, seed=5, num_workers=0, device=CPU)
    device_loader = build_loader(packed, 4, rank=1, world_size=2, seed=5, num_workers=workers, device=CPU,
                                 loader="device_decode")
    assert type(device_loader).__name__ == "DeviceDecodeLoader" and len(device_loader) == len(torch_loader) == 3
    for epoch, start in ((0, 0), (1, 2)):  # a resumed epoch skips the same batches
        expected, got = _epoch(torch_loader, epoch, start), _epoch(device_loader, epoch, start)
        assert len(got) == len(expected) == 3 - start
        for (want_images, want_labels), (images, labels) in zip(expected, got):
            assert images.dtype == torch.uint8 and images.shape == want_images.shape == (4, 3, 112, 112)
            assert torch.equal(labels, want_labels)
            # Two libjpeg builds may round the colour conversion differently, by a level or two.
            assert (images.int() - want_images.int()).abs().max() <= 3
    device_loader.close()


def _rec_with(folder, images: list[bytes]) -> RecordDataset:
    with InsightFaceWriter(folder / "train.rec", folder / "train.idx") as writer:
        for label, data in enumerate(images):
            writer.add(label, data)
    return RecordDataset(str(folder), None)


def test_a_record_that_is_no_jpeg_is_named(tmp_path, packed):
    good = packed.encoded(0)[1]
    data = _rec_with(tmp_path, [good, good[:200]])  # the second one cut short
    loader = build_loader(data, 2, rank=0, world_size=1, seed=0, num_workers=0, device=CPU, loader="device_decode")
    with pytest.raises(UserError, match=r"^record 2 of .*train.rec is no JPEG that decodes \(.*\); find every bad "
                                        r"record with `python tools/inspect_rec.py"):
        _epoch(loader, 0)


def test_another_size_is_refused_with_the_fix(tmp_path, caplog):
    buffer = io.BytesIO()
    Image.fromarray(np.zeros((96, 80, 3), np.uint8)).save(buffer, format="JPEG")
    with caplog.at_level(logging.WARNING):
        data = _rec_with(tmp_path, [buffer.getvalue()])
    assert "are resized to 112x112" in caplog.records[-1].getMessage()  # the torch loader's way, said at start-up
    loader = build_loader(data, 1, rank=0, world_size=1, seed=0, num_workers=0, device=CPU, loader="device_decode")
    with pytest.raises(UserError, match=r"^record 1 of .* is 80x96, and dataset.loader=device_decode takes 112x112 "
                                        r"images only: re-pack with `python tools/pack_rec.py --size 112`"):
        _epoch(loader, 0)


def test_image_folders_are_refused(tmp_path):
    data = ImageFolderDataset(str(write_image_folders(tmp_path, {"a": [112]})))
    with pytest.raises(UserError, match="^dataset.loader=device_decode reads RecordIO datasets only"):
        build_loader(data, 1, rank=0, world_size=1, seed=0, num_workers=0, device=CPU, loader="device_decode")


def test_trains_through_the_entrypoint(tmp_path, packed):
    proc = train_here(["dataset=rec", f"dataset.root={packed.root}", "dataset.loader=device_decode",
                       "trainer.num_workers=1", "trainer.batch_size=4", "trainer.max_steps=2", "embedding_size=64",
                       "trainer.verify_at_start=false", "trainer.verify_at_end=false", "tracking=none"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "step 2/2" in proc.stdout + proc.stderr
