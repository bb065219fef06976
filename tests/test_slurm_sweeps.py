"""Sweeps through a real SLURM (launchers/slurm_local_up.sh) into a real MLflow server: jobs of 2 gloo ranks with
Partial FC sharded over both, requeue after SLURM's warning signal, and the MLflow UI showing the sweep."""
from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.parse
from pathlib import Path

import pytest

from conftest import TINY

pytestmark = pytest.mark.cluster

# Every job: 2 tasks (ranks) on the one CPU node, one CPU each; two jobs share the node.
JOB = ["cluster=slurm", "cluster.gpus_per_node=0", "cluster.tasks_per_node=2", "cluster.cpus_per_task=1",
       "cluster.timeout_min=10", "trainer.verify_at_start=false", "trainer.verify_at_end=false"]


def _sweep(tmp_path: Path, uri: str, *overrides: str) -> list[str]:
    keys = {o.split("=")[0] for o in overrides}
    base = [o for o in JOB + TINY if o.split("=")[0] not in keys]
    return [sys.executable, "-m", "arcface.train", "-m", f"hydra.sweep.dir={tmp_path / 'sweep'}",
            f"tracking.uri={uri}", f"tracking.experiment_name={tmp_path.name}", *base, *overrides]


def _runs(uri: str, experiment_name: str):
    from mlflow import MlflowClient

    client = MlflowClient(uri)
    experiment_id = client.get_experiment_by_name(experiment_name).experiment_id
    runs = client.search_runs([experiment_id])
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    return client, experiment_id, parents, children


def _job_dirs(sweep: Path) -> list[Path]:
    return sorted((p for p in sweep.iterdir() if p.is_dir() and not p.name.startswith(".")), key=lambda p: p.name)


def test_sweep_of_two_rank_jobs_logs_to_a_server(slurm_cluster, mlflow_server, tmp_path):
    done = subprocess.run(_sweep(tmp_path, mlflow_server, "pfc.rate=0.5,1.0"), cwd=tmp_path, capture_output=True,
                          text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-4000:]
    client, experiment_id, parents, children = _runs(mlflow_server, tmp_path.name)
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    assert parents[0].data.tags["arcface.launcher"] == "SlurmLauncher"
    names = sorted(r.info.run_name for r in children)
    assert names == ["synthetic_r_tiny_pfc0.5", "synthetic_r_tiny_pfc1.0"]
    for run in children:
        tags, params = run.data.tags, run.data.params
        assert run.info.status == "FINISHED"
        assert tags["world_size"] == "2" and tags["hydra.choice.cluster"] == "slurm"
        assert re.fullmatch(r"\d+_[01]", tags["slurm.job_id"])  # a task of the sweep's job array
        assert params["cluster.tasks_per_node"] == "2" and params["trainer.resume"] == "auto"
        steps = [m.step for m in client.get_metric_history(run.info.run_id, "loss")]
        assert sorted(steps) == [1, 2, 3]  # trainer.max_steps=3, trainer.log_every=1
    for job in _job_dirs(tmp_path / "sweep"):  # rank 0 writes the shared files, rank 1 only its own log
        assert (job / ".hydra" / "config.yaml").is_file() and (job / "checkpoint.pt").is_file()
        assert "step 3/3" in (job / "train.log").read_text()
        assert (job / "rank1.log").is_file() and "step 3/3" not in (job / "rank1.log").read_text()
    _check_ui(mlflow_server, experiment_id, [r.info.run_id for r in children], names, tmp_path)


def _check_ui(uri: str, experiment_id: str, run_ids: list[str], names: list[str], tmp_path: Path) -> None:
    """Headless Chromium renders the runs table (child names in the page) and the comparison view (screenshot)."""
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        pytest.skip("chromium is not installed (make test-cluster installs it)")
    table = f"{uri}/#/experiments/{experiment_id}/runs?orderByKey=tags.%60mlflow.runName%60&orderByAsc=true"
    dom = _chromium(browser, table, "--dump-dom")
    assert all(name in dom for name in names), dom[-2000:]
    compare = (f"{uri}/#/compare-runs?runs={urllib.parse.quote(json.dumps(run_ids))}"
               f"&experiments={urllib.parse.quote(json.dumps([experiment_id]))}")
    shot = Path(os.environ.get("ARCFACE_TEST_ARTIFACTS", tmp_path)) / "mlflow_sweep_compare.png"
    shot.parent.mkdir(parents=True, exist_ok=True)
    _chromium(browser, compare, f"--screenshot={shot}")
    assert shot.stat().st_size > 10_000, "the comparison view rendered an empty page"
    print(f"MLflow comparison view of the sweep: {shot}")


def _chromium(browser: str, url: str, action: str) -> str:
    with tempfile.TemporaryDirectory() as profile:  # a fresh profile: the UI keeps view state in localStorage
        done = subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
                               "--disable-background-networking", "--disable-component-update", "--disable-sync",
                               f"--user-data-dir={profile}", "--window-size=1600,1000",
                               "--virtual-time-budget=15000", action, url],
                              capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


def _wait_for(predicate, timeout_s: float, what: str, driver: subprocess.Popen, output: Path) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if driver.poll() is not None:
            pytest.fail(f"the sweep ended before {what}:\n{output.read_text()[-4000:]}")
        if time.monotonic() > deadline:
            pytest.fail(f"no {what} within {timeout_s:.0f} s")
        time.sleep(1)


@contextlib.contextmanager
def _running_sweep(cmd: list[str], tmp_path: Path):
    """The sweep's driver process, the file of its output and the sweep dir; the driver is killed, and its jobs
    cancelled, if it still runs when the block ends."""
    output = tmp_path / "driver.log"
    with output.open("w") as sink:
        driver = subprocess.Popen(cmd, cwd=tmp_path, stdout=sink, stderr=subprocess.STDOUT)
    try:
        yield driver, output, tmp_path / "sweep"
    finally:
        if driver.poll() is None:
            driver.kill()
            subprocess.run(["scancel", "--name=train"], timeout=30)  # leave no job behind on the shared cluster


def test_scancel_saves_and_ends_the_job_without_requeueing_it(slurm_cluster, tmp_path):
    """scancel sends SIGTERM: the job saves its state and ends; only submitit's time-limit signal requeues (a
    requeued job would keep the sweep waiting for its second run)."""
    cmd = _sweep(tmp_path, "sqlite:///" + str(tmp_path / "mlflow.db"), "trainer.max_steps=100000",
                 "trainer.num_epoch=100000", "trainer.save_every=0")
    with _running_sweep(cmd, tmp_path) as (driver, output, sweep):
        def log() -> str:
            jobs = _job_dirs(sweep) if sweep.is_dir() else []
            return (jobs[0] / "train.log").read_text() if jobs and (jobs[0] / "train.log").is_file() else ""

        _wait_for(lambda: re.search(r"step \d+/\d+  epoch", log()), 600, "steps in the job", driver, output)
        [job] = [p.name for p in (sweep / ".submitit").iterdir() if re.fullmatch(r"\d+", p.name)]  # one job, no array
        subprocess.run(["scancel", job], check=True, timeout=30)
        driver.wait(timeout=300)
    assert driver.returncode != 0 and "SIGTERM received" in log() and "resumed from" not in log(), log()[-3000:]
    assert re.search(r"saved training state at step \d+", log())
    said = "".join(f.read_text() for f in (sweep / ".submitit" / job).glob("*_0_log.err"))  # rank 0's stderr
    assert "stopped by SIGTERM" in said and "resume with: " in said and "requeues" not in said, said[-3000:]


def test_signalled_jobs_are_requeued_and_continue_until_requeues_run_out(slurm_cluster, mlflow_server, tmp_path):
    """cluster.max_requeues=1: both jobs are signalled and requeued once, resume from their checkpoints in the same
    directories and MLflow runs; job 0 then finishes, job 1 is signalled again and ends FAILED with the reason."""
    total = 30  # job 0's steps; job 1 would run far longer, it ends on its second signal
    # cluster.timeout_min=10 (in JOB): submitit counts a signal as a time limit, not a preemption, in jobs this short.
    cmd = _sweep(tmp_path, mlflow_server, f"trainer.max_steps={total},100000", "trainer.num_epoch=100000",
                 "trainer.save_every=0", "cluster.max_requeues=1")
    with _running_sweep(cmd, tmp_path) as (driver, output, sweep):
        def logs() -> list[str]:
            files = [job / "train.log" for job in _job_dirs(sweep)] if sweep.is_dir() else []
            return [f.read_text() if f.is_file() else "" for f in files]

        def stepping(text: str) -> bool:
            return re.search(r"step \d+/\d+  epoch", text.split("resumed from")[-1]) is not None

        _wait_for(lambda: len(logs()) == 2 and all(map(stepping, logs())), 600, "steps in both jobs", driver, output)
        array = {p.name.split("_")[0] for p in (sweep / ".submitit").iterdir() if re.fullmatch(r"\d+_\d+", p.name)}
        assert len(array) == 1  # the sweep is one job array
        array = array.pop()
        subprocess.run(["scancel", "--signal=USR2", array], check=True, timeout=30)
        _wait_for(lambda: "resumed from" in logs()[1] and stepping(logs()[1]), 600, "job 1 resumed", driver, output)
        subprocess.run(["scancel", "--signal=USR2", f"{array}_1"], check=True, timeout=30)
        driver.wait(timeout=900)
    assert driver.returncode != 0, output.read_text()[-4000:]  # job 1 failed: the sweep reports a failure
    finished, failed = (job / "train.log" for job in _job_dirs(sweep))
    log = finished.read_text()
    stopped_at = int(re.search(r"saved training state at step (\d+)", log).group(1))
    assert 0 < stopped_at < total
    assert f"at step {stopped_at}/{total}" in log.split("resumed from")[1]  # the requeued job continued from there
    assert f"step {total}/{total}" in log
    assert "timed-out too many times" in failed.read_text()
    client, _, parents, children = _runs(mlflow_server, tmp_path.name)
    assert len(parents) == 1 and parents[0].info.status == "FAILED"
    assert len(children) == 2  # one MLflow run per job, across its requeue
    by_steps = {run.data.params["trainer.max_steps"]: run for run in children}
    assert by_steps[str(total)].info.status == "FINISHED"
    steps = [m.step for m in client.get_metric_history(by_steps[str(total)].info.run_id, "loss")]
    assert sorted(steps) == list(range(1, total + 1))  # each step once, across the requeue
    assert by_steps["100000"].info.status == "FAILED"
    assert "timed-out too many times" in by_steps["100000"].data.tags["arcface.failure"]
