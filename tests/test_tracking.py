"""MLflow tracking never stops training: real stores that are away, locked or restarted, and a continued run."""
from __future__ import annotations

import inspect
import logging
import os
import subprocess
import sys
import time

import pytest

from arcface.engine.tracking import MLflowTracker, NullTracker, metric_key
from cluster import free_loopback_port, start_mlflow_server, stop_mlflow_server

# Holds an exclusive lock on a sqlite file until killed: what a busy concurrent writer does to everyone else.
LOCKER = ("import sqlite3, sys, time\n"
          "db = sqlite3.connect(sys.argv[1], isolation_level=None)\n"
          "db.execute('BEGIN EXCLUSIVE')\n"
          "print('locked', flush=True)\n"
          "time.sleep(600)\n")


@pytest.fixture(autouse=True)
def _restore_mlflow_env():
    """The tracker bounds MLflow's HTTP retries through the environment; other tests get theirs back."""
    names = ("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "MLFLOW_HTTP_REQUEST_TIMEOUT")
    saved = {name: os.environ.get(name) for name in names}
    yield
    for name, value in saved.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value


@pytest.fixture
def warnings(caplog):
    """The tracker's warning lines so far (the test reads the list again after more happened)."""
    caplog.set_level(logging.INFO, logger="arcface.engine.tracking")
    return lambda: [r.getMessage() for r in caplog.records
                    if r.name == "arcface.engine.tracking" and r.levelno == logging.WARNING]


def wait_until(condition, what: str, limit: float = 60.0) -> None:
    deadline = time.monotonic() + limit
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"{what} did not happen within {limit:g} s")
        time.sleep(0.05)


def history(uri: str, run_id: str, key: str = "loss") -> list[int]:
    from mlflow import MlflowClient

    return sorted(point.step for point in MlflowClient(uri).get_metric_history(run_id, key))


def test_null_tracker_has_the_same_api():
    for name in ("start", "log_metrics", "log_artifacts", "set_tags", "end"):
        assert inspect.signature(getattr(NullTracker, name)) == inspect.signature(getattr(MLflowTracker, name)), name
    assert NullTracker().run_id is None


def test_unreachable_server_costs_one_warning_and_never_raises(tmp_path, warnings, caplog):
    uri = f"http://127.0.0.1:{free_loopback_port()}"  # nothing listens there: every connection is refused
    tracker = MLflowTracker(uri, "arcface", timeout=5, flush_timeout=30)
    tracker.start({"optimizer": {"lr": 0.1}}, tags={"backbone": "r18"})
    for step in range(1, 51):
        tracker.log_metrics({"loss": 1.0 / step, "lfw/val@far": 0.5}, step)
    tracker.set_tags({"best_step": 50})
    tracker.log_artifacts(tmp_path, artifact_path="hydra")
    tracker.end("FINISHED")

    assert tracker.run_id is None
    assert len(warnings()) == 1, warnings()
    assert uri in warnings()[0] and "unreachable" in warnings()[0]
    assert "100 metrics never delivered" in caplog.text
    assert "mlflow ui" not in caplog.text  # no run to point at


def test_locked_sqlite_file_buffers_then_delivers_newest(mlflow_db, warnings):
    from mlflow import MlflowClient

    uri = f"sqlite:///{mlflow_db}"
    MlflowClient(uri).search_experiments()  # the store is in use before another writer locks it
    locker = subprocess.Popen([sys.executable, "-c", LOCKER, str(mlflow_db)], stdout=subprocess.PIPE, text=True)
    try:
        assert locker.stdout.readline().strip() == "locked"
        tracker = MLflowTracker(uri, "arcface", timeout=2, flush_timeout=60, max_buffered=40)
        tracker.start({"trainer": {"max_steps": 50}})
        for step in range(1, 51):
            tracker.log_metrics({"loss": 1.0 / step}, step)
        wait_until(lambda: len(warnings()) == 1, "the outage warning")
        assert tracker.run_id is None
    finally:
        locker.kill()
        locker.wait()
    wait_until(lambda: len(warnings()) == 2, "delivery after the lock is gone")
    assert "is back; 40 metrics delivered, 10 dropped" in warnings()[1]
    assert history(uri, tracker.run_id) == list(range(11, 51))  # the oldest went first
    tracker.end("FINISHED")
    run = MlflowClient(uri).get_run(tracker.run_id)
    assert run.info.status == "FINISHED" and run.data.params == {"trainer.max_steps": "50"}
    assert len(warnings()) == 2


def test_resumed_run_continues_with_each_step_once(mlflow_db, warnings):
    from mlflow import MlflowClient

    uri = f"sqlite:///{mlflow_db}"
    params = {"optimizer": {"lr": 0.1}, "trainer": {"max_steps": 6}}
    first = MLflowTracker(uri, "arcface", run_name="demo")
    first.start(params, tags={"backbone": "r18"})
    for step in (1, 2, 3):
        first.log_metrics({"loss": 1.0 / step}, step)
    first.end("KILLED")
    assert MlflowClient(uri).get_run(first.run_id).info.status == "KILLED"

    second = MLflowTracker(uri, "arcface", run_name="demo")
    second.start({"optimizer": {"lr": 0.1}, "trainer": {"max_steps": 9, "resume": "auto"}}, run_id=first.run_id)
    assert second.run_id == first.run_id
    for step in (2, 3, 4, 5, 6):  # resumed from a checkpoint at step 1: steps 2 and 3 are replayed
        second.log_metrics({"loss": 1.0 / step}, step)
    second.set_tags({"resumed_at": 3})
    second.end("FINISHED")

    client = MlflowClient(uri)
    (run,) = client.search_runs([client.get_experiment_by_name("arcface").experiment_id])
    assert run.info.run_id == first.run_id and run.info.status == "FINISHED"
    assert history(uri, run.info.run_id) == [1, 2, 3, 4, 5, 6]
    # A param can't change in MLflow: the first value stays, new keys are added, one warning names the change.
    assert run.data.params == {"optimizer.lr": "0.1", "trainer.max_steps": "6", "trainer.resume": "auto"}
    assert run.data.tags["backbone"] == "r18" and run.data.tags["resumed_at"] == "3"
    assert len(warnings()) == 1 and "trainer.max_steps" in warnings()[0]


def test_metric_names_are_made_acceptable_to_mlflow():
    assert metric_key("lfw/val@far") == "lfw/val_at_far"
    assert metric_key("cfp-fp/acc (flip)#2") == "cfp-fp/acc _flip__2"


def test_run_deleted_mid_training_costs_one_warning(mlflow_db, warnings, caplog):
    from mlflow import MlflowClient

    uri = f"sqlite:///{mlflow_db}"
    tracker = MLflowTracker(uri, "arcface")
    tracker.start({"optimizer": {"lr": 0.1}})
    for step in (1, 2, 3):
        tracker.log_metrics({"loss": 1.0 / step}, step)
    wait_until(lambda: history(uri, tracker.run_id) == [1, 2, 3], "delivery")
    MlflowClient(uri).delete_run(tracker.run_id)  # as from the UI while the job trains
    for step in (4, 5, 6):
        tracker.log_metrics({"loss": 1.0 / step}, step)
        tracker.set_tags({"step": step})
    tracker.end("FINISHED")
    assert len(warnings()) == 1 and "refused" in warnings()[0], warnings()
    assert "items refused" in caplog.text


@pytest.mark.slow  # two server starts: ~20 s each on 2 cores
def test_server_stopped_mid_run_then_back(tmp_path, warnings):
    port = free_loopback_port()
    folder = tmp_path / "server"  # its store, log and process group: the second start serves the same store
    uri = start_mlflow_server(folder, "--port", port)
    try:
        tracker = MLflowTracker(uri, "arcface", timeout=5, flush_timeout=60)
        tracker.start({"optimizer": {"lr": 0.1}})
        assert tracker.run_id is not None
        for step in range(1, 11):
            tracker.log_metrics({"loss": 1.0 / step}, step)
        wait_until(lambda: len(history(uri, tracker.run_id)) == 10, "delivery while the server is up")

        stop_mlflow_server(folder)
        for step in range(11, 21):
            tracker.log_metrics({"loss": 1.0 / step}, step)
        wait_until(lambda: len(warnings()) == 1, "the outage warning")
        assert uri in warnings()[0]

        assert start_mlflow_server(folder, "--port", port) == uri
        tracker.end("FINISHED")  # a last attempt right away, instead of the thread's next retry
        assert len(warnings()) == 2 and "is back; 10 metrics delivered, 0 dropped" in warnings()[1]
        assert history(uri, tracker.run_id) == list(range(1, 21))
        from mlflow import MlflowClient

        assert MlflowClient(uri).get_run(tracker.run_id).info.status == "FINISHED"
    finally:
        stop_mlflow_server(folder)
