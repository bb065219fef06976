"""Shared test helpers: run the real training entrypoint in a subprocess on tiny settings; build the trainer's
options as a run of conf/train.yaml does."""
from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest
from cluster import mlflow_server, slurm_cluster  # noqa: F401  (fixtures: a real SLURM, a real MLflow server)
from hydra import compose, initialize_config_dir

REPO = Path(__file__).resolve().parents[1]
# RecordIO and pair-set files written by MXNet itself (tests/fixtures/make_fixtures.py regenerates them).
FIXTURES = REPO / "tests" / "fixtures" / "recordio"

# A few steps of the demo on a handful of synthetic identities: seconds, not minutes.
TINY = [
    "dataset.num_classes=16", "dataset.images_per_class=4", "dataset.val.synthetic_holdout.num_pairs=40",
    "dataset.val.synthetic_holdout.num_identities=10", "trainer.batch_size=8", "trainer.max_steps=3",
    "trainer.log_every=1", "trainer.num_workers=0", "embedding_size=64",
]


def trainer_options(**overrides):
    """The TrainerOptions a run of conf/train.yaml builds, with `overrides` (field=value) on top."""
    from arcface.train import trainer_options as from_config  # imported here: most test files never need it

    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose(config_name="train")
    return dataclasses.replace(from_config(cfg), **overrides)


def run_train(args: list[str], workdir: Path, timeout: int = 300) -> subprocess.CompletedProcess:
    """`python -m arcface.train ARGS` with outputs under `workdir`; returns the finished process."""
    cmd = [sys.executable, "-m", "arcface.train", f"hydra.run.dir={workdir / 'run'}", *args]
    return subprocess.run(cmd, cwd=workdir, capture_output=True, text=True, timeout=timeout)


@pytest.fixture
def train_cli():
    return run_train
