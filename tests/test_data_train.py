"""The training entrypoint on real files: `dataset=rec` (torch and DALI loaders) and `dataset=folder`."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from arcface.data.decode import encode_jpeg
from arcface.data.recordio import InsightFaceWriter
from conftest import run_train

SHORT = ["trainer.batch_size=8", "trainer.max_steps=2", "trainer.log_every=1", "embedding_size=64",
         "trainer.verify_at_start=false", "tracking=none", "dataset.num_classes=6"]


def _images(count: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    for i in range(count):
        yield i % 6, rng.integers(0, 255, (112, 112, 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def rec_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("rec")
    with InsightFaceWriter(folder / "train.rec", folder / "train.idx") as writer:
        for label, image in sorted(_images(48), key=lambda item: item[0]):
            writer.add(label, encode_jpeg(image))
    return folder


@pytest.mark.parametrize("loader,workers", [("torch", 2), ("dali", 1)])
def test_train_from_recordio(tmp_path, rec_dir, loader, workers):
    proc = run_train(["dataset=rec", f"dataset.root={rec_dir}", f"dataset.loader={loader}",
                      f"trainer.num_workers={workers}", *SHORT], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp_path / "run" / "model.pt").exists()


def test_train_from_image_folders(tmp_path):
    data = tmp_path / "faces"
    for label, image in _images(24):
        (data / f"id{label}").mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(data / f"id{label}" / f"{len(list((data / f'id{label}').iterdir()))}.png")
    proc = run_train(["dataset=folder", f"dataset.root={data}", "trainer.num_workers=0", *SHORT], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_num_classes_too_small_is_one_line(tmp_path, rec_dir):
    proc = run_train(["dataset=rec", f"dataset.root={rec_dir}", *SHORT, "dataset.num_classes=4"], tmp_path)
    assert proc.returncode == 2 and "set dataset.num_classes=6" in proc.stderr
    assert "Traceback" not in proc.stderr
