"""Every config group option and experiment preset composes, and user overrides land where they should."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.utils import get_object
from omegaconf import OmegaConf

from conftest import REPO, run_train

CONF = REPO / "conf"
GROUPS = ["backbone", "dataset", "pfc", "margin", "optimizer", "cluster", "tracking", "experiment"]


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


def compose_train(overrides: list[str]):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(config_name="train", overrides=overrides, return_hydra_config=True)


def resolved(cfg) -> dict:
    """Resolve everything except the hydra: runtime resolvers, which only exist inside a running app."""
    plain = OmegaConf.to_container(cfg, resolve=False)
    plain.pop("hydra", None)
    if "uri" in plain["tracking"]:
        plain["tracking"]["uri"] = "sqlite:///mlflow.db"
    return OmegaConf.to_container(OmegaConf.create(plain), resolve=True)


@pytest.mark.parametrize("group,option", [(g, o) for g in GROUPS for o in options(g)])
def test_every_option_composes(group, option):
    cfg = resolved(compose_train([f"{group}={option}"]))
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
    cfg = resolved(compose_train([]))
    assert cfg == resolved(compose_train(["experiment=demo"]))
    assert (cfg["backbone"]["name"], cfg["dataset"]["name"]) == ("r_tiny", "synthetic")
    trainer = cfg["trainer"]
    assert (trainer["batch_size"], trainer["num_epoch"], trainer["log_every"]) == (64, 3, 16)
    assert trainer["precision"] == "fp32"


@pytest.mark.parametrize("dataset", options("dataset"))
def test_choosing_a_dataset_leaves_the_trainer_alone(dataset):
    base = resolved(compose_train(["~experiment"]))["trainer"]
    assert resolved(compose_train(["~experiment", f"dataset={dataset}"]))["trainer"] == base


def test_pair_sets_are_a_group():
    cfg = resolved(compose_train(["~experiment", "dataset=webface12m", "dataset/val=insightface", "data_dir=/d"]))
    assert sorted(cfg["dataset"]["val"]) == ["agedb_30", "cfp_fp", "lfw"]
    assert cfg["dataset"]["val"]["lfw"]["path"] == "/d/webface12m/lfw.bin"
    assert resolved(compose_train(["experiment=ms1mv3_r50", "dataset/val=none"]))["dataset"]["val"] == {}


def test_overrides_land():
    cfg = resolved(compose_train(["backbone=r50", "pfc.rate=0.3", "optimizer=adamw", "optimizer.lr=1e-3",
                                  "dataset=ms1mv3", "trainer.batch_size=64"]))
    assert cfg["backbone"]["name"] == "r50"
    assert cfg["pfc"]["rate"] == 0.3 and cfg["pfc"]["num_classes"] == 93431
    assert cfg["optimizer"]["_target_"] == "torch.optim.AdamW" and cfg["optimizer"]["lr"] == 1e-3
    assert cfg["trainer"]["batch_size"] == 64


def test_command_line_beats_preset():
    cfg = resolved(compose_train(["experiment=ms1mv3_r50", "pfc.rate=0.1", "backbone=r18"]))
    assert cfg["pfc"]["rate"] == 0.1 and cfg["backbone"]["name"] == "r18"


@pytest.mark.parametrize("override,message", [
    ("backbone=no_such_net", "Could not find 'backbone/no_such_net'"),
    ("trainer.no_such_key=1", "Could not override 'trainer.no_such_key'"),
])
def test_unknown_options_fail_with_hydra_error(tmp_path, override, message):
    proc = run_train([override], tmp_path)
    assert proc.returncode != 0
    assert message in proc.stderr
    assert "Traceback" not in proc.stderr


def test_console_script_composes(tmp_path):
    """`arcface-train` (the installed script, not `python -m`) finds conf/ and prints the composed job."""
    script = Path(sys.executable).parent / "arcface-train"
    proc = subprocess.run([str(script), "--cfg", "job", "backbone=r50", "pfc.rate=0.3"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "name: r50" in proc.stdout and "rate: 0.3" in proc.stdout
