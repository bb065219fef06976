"""The everyday switches: training without pair sets, verification on/off and its progress, class counts of image
folders, fp16 on CPU, and messages that give the counts behind them."""
from __future__ import annotations

import logging

import pytest
import torch
import torch.nn as nn
from hydra.utils import instantiate
from omegaconf import OmegaConf

from arcface.config_checks import check_config
from arcface.data import synthetic_pair_set
from arcface.errors import UserError
from arcface.evaluation import evaluate
from arcface.evaluation.selection import selected_pair_sets
from arcface.train import _count_classes, _cpu_precision, _total_steps, trainer_options as options_from_config
from conftest import CPU, FIXTURES, compose_config, tiny_trainer, train_here, write_image_folders


@pytest.mark.parametrize("drop,kept", [
    ([], ["agedb_30", "cfp_fp", "lfw"]),
    (["dataset.val={}"], []),
    (["dataset.val=null"], []),
    (["~dataset.val"], []),
    (["~dataset.val.lfw"], ["agedb_30", "cfp_fp"]),
    (["dataset.val.lfw=null"], ["agedb_30", "cfp_fp"]),
    (["dataset.val={lfw:{}}"], ["lfw"]),
])
def test_pair_sets_kept_by_the_command_line(drop, kept):
    overrides = ["dataset=ms1mv3", "dataset.root=/data/ms1m", *drop]
    cfg = compose_config(overrides)
    selected = selected_pair_sets(OmegaConf.select(cfg, "dataset.val"), overrides)
    assert sorted(selected) == kept
    assert all(node.path == f"/data/ms1m/{name}.bin" for name, node in selected.items())


def test_readme_command_trains_without_pair_sets(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", True)  # put back after the test
    # ms1mv3 verifies on lfw/cfp_fp/agedb_30 .bin files, which this folder does not have.
    proc = train_here(["dataset=ms1mv3", f"dataset.root={FIXTURES / 'insightface_header'}", "dataset.val={}",
                       "backbone=r_tiny", "embedding_size=64", "dataset.num_classes=12", "trainer.batch_size=8",
                       "trainer.max_steps=2", "trainer.num_workers=0", "tracking=none",
                       "trainer.cudnn_benchmark=false"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert torch.backends.cudnn.benchmark is False
    assert (tmp_path / "run" / "model.pt").is_file()
    assert "accuracy" not in proc.stdout + proc.stderr


@pytest.mark.parametrize("switches,tags", [
    ({}, ["final", "initial"]),
    ({"verify_at_start": False, "verify_every": 2}, ["final", "step2"]),
    ({"verify_at_start": False, "verify_at_end": False}, []),
])
def test_verification_switches(tmp_path, switches, tags):
    pairs = synthetic_pair_set(10, num_identities=4, first_identity=8, image_size=16)
    results = tiny_trainer(tmp_path, val_sets={"holdout": pairs}, **switches).fit()
    assert sorted(results.get("holdout", {})) == tags
    assert (tmp_path / "model.pt").is_file()


def test_long_verification_shows_progress(caplog):
    pairs = synthetic_pair_set(20, num_identities=4, first_identity=0, image_size=16)
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 16 * 16, 8))
    with caplog.at_level(logging.INFO, logger="arcface.evaluation"):
        evaluate(model, pairs, batch_size=16, name="holdout", progress_every_s=0)
    lines = [r.getMessage() for r in caplog.records]
    assert [line.split(" (")[0] for line in lines] == ["verifying on holdout: 16/40 images",
                                                       "verifying on holdout: 32/40 images"]
    with caplog.at_level(logging.INFO, logger="arcface.evaluation"):
        caplog.clear()
        evaluate(model, pairs, batch_size=16, name="holdout")  # far shorter than the default 10 s
    assert not caplog.records


def test_verification_flags_must_be_booleans():
    cfg = compose_config(["trainer.verify_at_end=no"])
    with pytest.raises(UserError, match="trainer.verify_at_end=.no. is invalid: set trainer.verify_at_end=true or"):
        check_config(cfg)


def test_folder_counts_its_identities(tmp_path, caplog):
    write_image_folders(tmp_path, {f"id{i}": [112] for i in range(3)})
    cfg = compose_config(["dataset=folder", f"dataset.root={tmp_path}"])
    dataset = instantiate(cfg.dataset.train)
    _count_classes(cfg, dataset)
    assert cfg.dataset.num_classes == 3 and cfg.pfc.num_classes == 3  # the head is built for the count
    cfg = compose_config(["dataset=folder", f"dataset.root={tmp_path}", "dataset.num_classes=5"])
    with caplog.at_level(logging.WARNING):
        instantiate(cfg.dataset.train)
    assert "3 identity folders but dataset.num_classes=5" in caplog.records[-1].getMessage()


def test_fp16_on_cpu_trains_in_fp32_and_says_so(caplog):
    cfg = compose_config(["trainer.precision=fp16"])
    with caplog.at_level(logging.WARNING, logger="arcface"):
        _cpu_precision(cfg, CPU)
    assert cfg.trainer.precision == "fp32" and cfg.backbone.precision == "fp32"
    assert len(caplog.records) == 1 and "trains in fp32 instead" in caplog.records[0].getMessage()
    cfg = compose_config(["trainer.precision=bf16"])
    _cpu_precision(cfg, CPU)
    assert cfg.backbone.precision == "bf16"


def test_too_few_batches_gives_the_counts():
    cfg = compose_config(["dataset=rec", "dataset.root=/data/faces", "trainer.batch_size=128"])
    with pytest.raises(UserError, match=r"^/data/faces has 48 images, which 1 rank\(s\) at trainer.batch_size=128 split into "
                                        r"0 full batch\(es\) each.*at most 48"):
        _total_steps(cfg, 48, 1, 0)
    cfg = compose_config(["dataset=synthetic", "trainer.batch_size=4", "trainer.gradient_acc=16"])
    with pytest.raises(UserError, match=r"^dataset=synthetic has 48 images, which 4 rank\(s\).*3 full.*gradient_acc=16.*fewer ranks"):
        _total_steps(cfg, 48, 4, 3)


def test_trainer_options_come_from_the_config_alone():
    options = options_from_config(compose_config(["trainer.batch_size=32", "trainer.xnorm=reference"]))
    assert options.eval_batch_size == 32
    assert options.xnorm == "reference"
    with pytest.raises(UserError, match=r"^trainer.xnorm is missing from the config"):
        options_from_config(compose_config(["~trainer.xnorm"]))
