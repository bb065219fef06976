"""The training entrypoint on real files: `dataset=rec` (torch and DALI loaders) and `dataset=folder`."""
from __future__ import annotations

from pathlib import Path

import pytest
from hydra.errors import InstantiationException
from hydra.utils import instantiate

from arcface.errors import UserError
from conftest import compose_config, train_here, write_image_folders, write_rec

SHORT = ["trainer.batch_size=8", "trainer.max_steps=2", "trainer.log_every=1", "embedding_size=64",
         "trainer.verify_at_start=false", "tracking=none", "dataset.num_classes=6"]


@pytest.fixture(scope="module")
def rec_dir(tmp_path_factory) -> Path:
    """48 images of 6 identities in the InsightFace layout."""
    return write_rec(tmp_path_factory.mktemp("rec"), sorted(i % 6 for i in range(48)))


@pytest.mark.parametrize("loader,workers", [("torch", 2), ("dali", 1)])
def test_train_from_recordio(tmp_path, rec_dir, loader, workers):
    proc = train_here(["dataset=rec", f"dataset.root={rec_dir}", f"dataset.loader={loader}",
                       f"trainer.num_workers={workers}", *SHORT], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp_path / "run" / "model.pt").exists()


def test_train_from_image_folders(tmp_path):
    data = write_image_folders(tmp_path / "faces", {f"id{label}": [112] * 4 for label in range(6)})
    proc = train_here(["dataset=folder", f"dataset.root={data}", "trainer.num_workers=0", *SHORT], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_num_classes_too_small_names_the_count(rec_dir):
    cfg = compose_config(["dataset=rec", f"dataset.root={rec_dir}", *SHORT, "dataset.num_classes=4"])
    with pytest.raises(InstantiationException) as caught:  # wrapping the dataset's UserError, which the CLI prints
        instantiate(cfg.dataset.train)
    assert isinstance(caught.value.__cause__, UserError) and "set dataset.num_classes=6" in str(caught.value.__cause__)
