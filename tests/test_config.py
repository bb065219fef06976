"""Every config group option and experiment preset composes, and user overrides land where they should."""
from __future__ import annotations

import pytest
from hydra.utils import get_object
from omegaconf import OmegaConf

from conftest import CONF, compose_config, train_here

GROUPS = ["backbone", "dataset", "pfc", "margin", "optimizer", "cluster", "tracking", "experiment"]


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


def resolved(cfg) -> dict:
    """Resolve everything except the hydra: runtime resolvers, which only exist inside a running app."""
    plain = OmegaConf.to_container(cfg, resolve=False)
    plain.pop("hydra", None)
    if "uri" in plain["tracking"]:
        plain["tracking"]["uri"] = "sqlite:///mlflow.db"
    return OmegaConf.to_container(OmegaConf.create(plain), resolve=True)


@pytest.mark.parametrize("group,option", [(g, o) for g in GROUPS for o in options(g)])
def test_every_option_composes(group, option):
    cfg = resolved(compose_config([f"{group}={option}"]))
    assert cfg["dataset"]["num_classes"] is None or cfg["dataset"]["num_classes"] > 0  # null: counted from the data
    # Every node the entrypoint instantiates names a target that imports.
    nodes = [cfg["backbone"], cfg["margin"], cfg["optimizer"], cfg["tracking"], cfg["scheduler"], cfg["pfc"],
             cfg["dataset"]["train"], *cfg["dataset"]["val"].values()]
    for node in nodes:
        assert callable(get_object(node["_target_"])), node["_target_"]


def test_every_group_has_options():
    for group in GROUPS:
        assert options(group), f"conf/{group}/ is empty"


def test_no_overrides_is_the_cpu_demo():
    cfg = resolved(compose_config([]))
    assert cfg == resolved(compose_config(["experiment=demo"]))
    assert (cfg["backbone"]["name"], cfg["dataset"]["name"]) == ("r_tiny", "synthetic")
    trainer = cfg["trainer"]
    assert (trainer["batch_size"], trainer["num_epoch"], trainer["log_every"]) == (64, 3, 16)
    assert trainer["precision"] == "fp32"


@pytest.mark.parametrize("dataset", options("dataset"))
def test_choosing_a_dataset_leaves_the_trainer_alone(dataset):
    base = resolved(compose_config(["~experiment"]))["trainer"]
    assert resolved(compose_config(["~experiment", f"dataset={dataset}"]))["trainer"] == base


def test_pair_sets_are_a_group():
    cfg = resolved(compose_config(["~experiment", "dataset=webface12m", "dataset/val=insightface", "data_dir=/d"]))
    assert sorted(cfg["dataset"]["val"]) == ["agedb_30", "cfp_fp", "lfw"]
    assert cfg["dataset"]["val"]["lfw"]["path"] == "/d/webface12m/lfw.bin"
    assert resolved(compose_config(["experiment=ms1mv3_r50", "dataset/val=none"]))["dataset"]["val"] == {}


def test_overrides_land():
    cfg = resolved(compose_config(["backbone=r50", "pfc.rate=0.3", "optimizer=adamw", "optimizer.lr=1e-3",
                                  "dataset=ms1mv3", "trainer.batch_size=64"]))
    assert cfg["backbone"]["name"] == "r50"
    assert cfg["pfc"]["rate"] == 0.3 and cfg["pfc"]["num_classes"] == 93431
    assert cfg["optimizer"]["_target_"] == "torch.optim.AdamW" and cfg["optimizer"]["lr"] == 1e-3
    assert cfg["trainer"]["batch_size"] == 64


def test_command_line_beats_preset():
    cfg = resolved(compose_config(["experiment=ms1mv3_r50", "pfc.rate=0.1", "backbone=r18"]))
    assert cfg["pfc"]["rate"] == 0.1 and cfg["backbone"]["name"] == "r18"


@pytest.mark.parametrize("override,message", [
    ("backbone=no_such_net", "error: backbone=no_such_net names no file in conf/backbone/"),
    ("trainer.no_such_key=1", "Could not override 'trainer.no_such_key'"),
])
def test_unknown_options_fail_with_one_message(tmp_path, override, message):
    proc = train_here([override], tmp_path)
    assert proc.returncode != 0
    assert message in proc.stderr
    assert "Traceback" not in proc.stderr
