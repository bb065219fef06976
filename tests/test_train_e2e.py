"""The real entrypoint end to end on tiny settings: MLflow run, checkpoint, and clear errors on bad input."""
from __future__ import annotations

import pytest
import torch
from mlflow.tracking import MlflowClient

from arcface.models import create_backbone
from conftest import TINY, run_train


def test_tiny_run_tracks_and_checkpoints(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    proc = run_train([*TINY, f"tracking.uri={uri}", "tracking.experiment_name=e2e"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    log = proc.stdout + proc.stderr
    assert "step 3/3" in log and "samples/s" in log and "eta" in log
    assert "random-init accuracy" in log and f"mlflow ui --backend-store-uri {uri}" in log

    state = torch.load(tmp_path / "run" / "model.pt", map_location="cpu")
    model = create_backbone("r_tiny", embedding_size=64)
    model.load_state_dict(state, strict=True)
    assert "features.weight" in state and not any(k.startswith("module.") for k in state)

    client = MlflowClient(tracking_uri=uri)
    (run,) = client.search_runs([client.get_experiment_by_name("e2e").experiment_id])
    assert run.info.status == "FINISHED"
    assert run.data.params["pfc.rate"] == "1.0" and run.data.params["backbone.name"] == "r_tiny"
    assert run.data.params["trainer.max_steps"] == "3"
    for metric in ("loss", "lr", "samples_per_s", "synthetic_holdout/acc"):
        assert metric in run.data.metrics, metric
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id, "hydra")}
    assert "hydra/config.yaml" in artifacts and "hydra/overrides.yaml" in artifacts


def test_tracking_none_writes_no_store(tmp_path):
    proc = run_train([*TINY, "tracking=none"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert not (tmp_path / "mlflow.db").exists()
    assert (tmp_path / "run" / "model.pt").is_file()


def _one_line_error(proc, *needles: str) -> None:
    assert proc.returncode == 2, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    for needle in needles:
        assert needle in errors[0], errors[0]


def test_missing_dataset_path(tmp_path):
    missing = tmp_path / "no_such_dataset"
    proc = run_train(["dataset=ms1mv3", f"dataset.root={missing}", "tracking=none"], tmp_path)
    _one_line_error(proc, str(missing))


def test_unknown_backbone_name(tmp_path):
    proc = run_train([*TINY, "backbone.name=no_such_net", "tracking=none"], tmp_path)
    _one_line_error(proc, "no_such_net", "r50")


def test_labels_beyond_num_classes(tmp_path):
    # The classifier is built for 8 classes while the data carries 16.
    proc = run_train([*TINY, "pfc.num_classes=8", "tracking=none"], tmp_path)
    _one_line_error(proc, "num_classes")


def test_resume_continues_where_it_stopped(tmp_path):
    first = run_train([*TINY, "tracking=none", "trainer.max_steps=2", "trainer.save_every=1"], tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    checkpoint = torch.load(tmp_path / "run" / "checkpoint.pt", map_location="cpu", weights_only=False)
    assert checkpoint["step"] == 2 and checkpoint["fc"]["weight"].shape == (16, 64)
    again = run_train([*TINY, "tracking=none", "trainer.max_steps=4", "trainer.resume=auto"], tmp_path)
    log = again.stdout + again.stderr
    assert again.returncode == 0, log[-3000:]
    assert "resumed from" in log and "at step 2/4" in log and "step 3/4" in log and "step 1/4" not in log


def test_resume_from_missing_checkpoint(tmp_path):
    proc = run_train([*TINY, "tracking=none", f"trainer.resume={tmp_path / 'nope.pt'}"], tmp_path)
    _one_line_error(proc, "nope.pt", "trainer.resume")


def test_resume_with_another_global_batch_is_refused(tmp_path):
    first = run_train([*TINY, "tracking=none", "trainer.max_steps=1"], tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    proc = run_train([*TINY, "tracking=none", "trainer.resume=auto", "trainer.batch_size=4"], tmp_path)
    _one_line_error(proc, "trainer.batch_size", "8 samples per step")


@pytest.mark.parametrize("override,key", [("trainer.batch_size=0", "trainer.batch_size"),
                                          ("trainer.precision=fp8", "trainer.precision"),
                                          ("trainer.max_steps=0", "trainer.max_steps"),
                                          ("trainer.resume=conftest.py", "trainer.resume")])
def test_impossible_trainer_values(tmp_path, override, key):
    if override.endswith("conftest.py"):
        (tmp_path / "conftest.py").write_text("not a checkpoint")
    proc = run_train([*TINY, "tracking=none", override], tmp_path)
    _one_line_error(proc, key)
