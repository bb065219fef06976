"""The real entrypoint end to end on tiny settings: MLflow run, checkpoint, resume, and clear errors on bad input."""
from __future__ import annotations

import torch
from mlflow.tracking import MlflowClient

from arcface.engine.training_state import read_classifier
from arcface.models import create_backbone
from conftest import TINY, copy_run, error_line, train_here


def test_tiny_run_tracks_and_checkpoints(tmp_path, mlflow_db):
    uri = f"sqlite:///{mlflow_db}"
    proc = train_here([*TINY, "trainer.verify_at_start=true", f"tracking.uri={uri}", "tracking.experiment_name=e2e"],
                      tmp_path)
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


def test_tracking_none_writes_no_store(finished_run):
    assert not list(finished_run.glob("**/mlflow.db"))
    assert (finished_run / "run" / "model.pt").is_file()


def test_missing_dataset_path(tmp_path):
    missing = tmp_path / "no_such_dataset"
    proc = train_here(["dataset=ms1mv3", f"dataset.root={missing}", "tracking=none"], tmp_path)
    assert str(missing) in error_line(proc)


def test_labels_beyond_num_classes(tmp_path):
    # The classifier is built for 8 classes while the data carries 16: the first step stops the run.
    proc = train_here([*TINY, "pfc.num_classes=8", "tracking=none"], tmp_path)
    assert "num_classes" in error_line(proc)


def test_resume_continues_where_it_stopped(finished_run, tmp_path):
    copy_run(finished_run, tmp_path)
    checkpoint = torch.load(tmp_path / "run" / "checkpoint.pt", map_location="cpu", weights_only=False)
    assert checkpoint["step"] == 4 and read_classifier(tmp_path / "run" / "checkpoint.pt")["weight"].shape == (16, 64)
    again = train_here([*TINY, "tracking=none", "trainer.max_steps=6", "trainer.resume=auto",
                        "trainer.verify_at_end=false"], tmp_path)
    log = again.stdout + again.stderr
    assert again.returncode == 0, log[-3000:]
    assert "resumed from" in log and "at step 4/6" in log and "step 5/6" in log and "step 1/6" not in log


def test_resume_with_another_global_batch_is_refused(finished_run, tmp_path):
    copy_run(finished_run, tmp_path)
    proc = train_here([*TINY, "tracking=none", "trainer.resume=auto", "trainer.batch_size=4"], tmp_path)
    line = error_line(proc)
    assert "trainer.batch_size" in line and "8 samples per step" in line
