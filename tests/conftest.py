"""Shared test helpers: compose conf/ as a run does; run the real training entrypoint on tiny settings, in this
process (no interpreter start, no torch import: seconds saved per run) or as a process of its own where the test is
about the process; tiny trainers and image data on disk."""
from __future__ import annotations

import contextlib
import dataclasses
import io
import logging
import os
import shutil
import subprocess
import sys
from functools import partial
from pathlib import Path
from unittest import mock

import numpy as np
import pytest
import torch
from cluster import mlflow_server, slurm_cluster  # noqa: F401  (fixtures: a real SLURM, a real MLflow server)
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from PIL import Image

from arcface.data import SyntheticIdentities
from arcface.data.decode import encode_jpeg
from arcface.data.loader import build_loader
from arcface.data.recordio import InsightFaceWriter
from arcface.distributed import DistEnv
from arcface.engine.optim import build_optimizer
from arcface.engine.schedule import PolynomialWarmup
from arcface.engine.trainer import Trainer
from arcface.heads import CombinedMargin, PartialFC

REPO = Path(__file__).resolve().parents[1]
CONF = REPO / "conf"
# RecordIO and pair-set files written by MXNet itself (tests/fixtures/make_fixtures.py regenerates them).
FIXTURES = REPO / "tests" / "fixtures" / "recordio"
CPU = DistEnv(0, 1, 0, torch.device("cpu"))  # a single-process run's place

# A few steps of the demo on a handful of synthetic identities: seconds, not minutes. The untrained network is not
# verified (a test about that asks for it); the final verification runs on the fewest held-out pairs it takes.
TINY = [
    "dataset.num_classes=16", "dataset.images_per_class=4", "dataset.val.synthetic_holdout.num_pairs=10",
    "dataset.val.synthetic_holdout.num_identities=4", "trainer.batch_size=8", "trainer.max_steps=3",
    "trainer.log_every=1", "trainer.num_workers=0", "embedding_size=64", "trainer.verify_at_start=false",
]


def compose_config(overrides: list[str] = (), hydra: bool = False):
    """conf/train.yaml with `overrides`, as `arcface-train` composes it (`hydra`: with the hydra: node)."""
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(config_name="train", overrides=list(overrides), return_hydra_config=hydra)


def trainer_options(**overrides):
    """The TrainerOptions a run of conf/train.yaml builds, with `overrides` (field=value) on top."""
    from arcface.train import trainer_options as from_config  # imported here: most test files never need it

    return dataclasses.replace(from_config(compose_config()), **overrides)


def run_train(args: list[str], workdir: Path, timeout: int = 300) -> subprocess.CompletedProcess:
    """`python -m arcface.train ARGS` as a process of its own, outputs under `workdir`; returns the finished process.

    For what only a process shows (its exit status as the shell sees it, signals, torchrun); `train_here` runs the
    same entrypoint seconds faster."""
    cmd = [sys.executable, "-m", "arcface.train", f"hydra.run.dir={workdir / 'run'}", *args]
    return subprocess.run(cmd, cwd=workdir, capture_output=True, text=True, timeout=timeout)


def train_here(args: list[str], workdir: Path) -> subprocess.CompletedProcess:
    """`arcface-train ARGS` in this process, outputs under `workdir`: Hydra composes the config, sets up logging and
    the run dir, and `main` prints its one-line errors, as in a process of its own. Returns what that process
    would have: the exit status (2 for a UserError, 1 for Hydra's own errors), stdout (the log) and stderr.

    What the run changes in this process is put back: working directory, environment (the MLflow tracker sets
    variables), logging handlers and Hydra's global state."""
    from arcface.train import main

    argv = [str(REPO / "arcface" / "train.py"), f"hydra.run.dir={workdir / 'run'}", *args]
    out, err = io.StringIO(), io.StringIO()
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    cwd, environ = os.getcwd(), dict(os.environ)
    code = 0
    try:
        os.chdir(workdir)
        with mock.patch.object(sys, "argv", argv), contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                main()
            except SystemExit as exc:
                code = exc.code or 0
    finally:
        os.chdir(cwd)
        os.environ.clear()
        os.environ.update(environ)
        for handler in root.handlers:
            if handler not in handlers:
                handler.close()
        root.handlers[:] = handlers
        root.setLevel(level)
        GlobalHydra.instance().clear()
    return subprocess.CompletedProcess(argv, code, out.getvalue(), err.getvalue())


@pytest.fixture(autouse=True)
def _environment_put_back():
    """Every test starts from the same environment: code run in-process may set variables for its process (the
    MLflow tracker and the tools set MLflow's HTTP retries), and one test's settings must not change another's."""
    saved = dict(os.environ)
    yield
    os.environ.clear()
    os.environ.update(saved)


@pytest.fixture(scope="session")
def _empty_mlflow_db(tmp_path_factory) -> Path:
    from mlflow import MlflowClient  # imported here: `import mlflow` takes seconds

    db = tmp_path_factory.mktemp("mlflow_store") / "mlflow.db"
    MlflowClient(f"sqlite:///{db}").search_experiments()
    return db


@pytest.fixture
def mlflow_db(_empty_mlflow_db, tmp_path) -> Path:
    """This test's own sqlite MLflow store, tmp_path/mlflow.db, with MLflow's tables in it: creating them takes
    seconds, copying a file made once does not."""
    db = tmp_path / "mlflow.db"
    shutil.copyfile(_empty_mlflow_db, db)
    return db


def error_line(proc: subprocess.CompletedProcess) -> str:
    """The one `error: ...` line of a run that stopped on bad input (exit status 2, no traceback)."""
    assert proc.returncode == 2, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    return errors[0]


@pytest.fixture(scope="session")
def finished_run(tmp_path_factory) -> Path:
    """The folder of a finished tiny run (its run dir is `run/`): checkpoints at steps 2 and 4, model.pt, no MLflow.

    Read-only: a test that resumes or damages it works on a copy (`copy_run`)."""
    workdir = tmp_path_factory.mktemp("finished_run")
    proc = train_here([*TINY, "tracking=none", "trainer.max_steps=4", "trainer.save_every=2",
                       "trainer.verify_at_end=false"], workdir)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return workdir


def copy_run(source: Path, destination: Path) -> Path:
    """A copy of `source`/run in `destination`/run; returns `destination`."""
    shutil.copytree(source / "run", destination / "run")
    return destination


# --- in-process training parts ------------------------------------------------------------------------------

def tiny_trainer(output_dir: Path, *, head=None, steps: int = 4, val_sets=None, backbone=None, **options):
    """A real Trainer on 8 synthetic 16x16 identities (4 images each), a linear backbone and SGD: milliseconds a step.

    `head`, `backbone`: factories of the classifier (default: Partial FC with ArcFace) and of the 16-d embedding
    network; `options`: TrainerOptions fields on top of conf/train.yaml's (save_every=0 and log_every=1 unless
    given)."""
    torch.manual_seed(0)
    data = SyntheticIdentities(num_classes=8, images_per_class=4, image_size=16)
    backbone = backbone() if backbone else torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 16 * 16, 16))
    head = head() if head else PartialFC(CombinedMargin(), embedding_size=16, num_classes=8)
    optimizer = build_optimizer(partial(torch.optim.SGD, lr=0.1, momentum=0.9), backbone, head)
    loader = build_loader(data, 4, rank=0, world_size=1, seed=0, num_workers=0, device=CPU.device)
    return Trainer(backbone, head, optimizer, loader, PolynomialWarmup(0, steps), env=CPU, output_dir=output_dir,
                   options=trainer_options(**{"save_every": 0, "log_every": 1, **options}), val_sets=val_sets)


# --- image data on disk -------------------------------------------------------------------------------------

def write_image_folders(root: Path, sizes: dict[str, list[int]], seed: int = 0) -> Path:
    """One folder per identity under `root` with PNGs 0.png, 1.png, ... of the given square sizes."""
    rng = np.random.default_rng(seed)
    for name, image_sizes in sizes.items():
        (root / name).mkdir(parents=True)
        for i, size in enumerate(image_sizes):
            Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(root / name / f"{i}.png")
    return root


def copy_rec(source: Path, destination: Path) -> Path:
    """A copy of `source`'s train.rec and train.idx in `destination` (made if missing); returns `destination`."""
    destination.mkdir(parents=True, exist_ok=True)
    for name in ("train.rec", "train.idx"):
        shutil.copyfile(source / name, destination / name)
    return destination


def write_rec(folder: Path, labels: list[int], seed: int = 0) -> Path:
    """train.rec/train.idx in the InsightFace layout: one random 112x112 JPEG per label (labels grouped, 0, 1, ...)."""
    rng = np.random.default_rng(seed)
    with InsightFaceWriter(folder / "train.rec", folder / "train.idx") as writer:
        for label in labels:
            writer.add(label, encode_jpeg(rng.integers(0, 255, (112, 112, 3), dtype=np.uint8)))
    return folder
