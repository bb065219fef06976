"""The launchers the cluster workflow stands on: the local SLURM of launchers/slurm_local_up.sh (jobs, arrays,
requeues, and the sacct stand-in that submitit polls) and the MLflow server of launchers/mlflow_server.sh."""
from __future__ import annotations

import importlib.util
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request

import cloudpickle
import pytest
import submitit
from cluster import LAUNCHERS, free_loopback_port, mlflow_server_sh, start_mlflow_server, stop_mlflow_server
from submitit.slurm.slurm import SlurmInfoWatcher

# Guards against a hang, not performance bounds: jobs here take a second or two, but may queue behind the jobs of
# other test sessions sharing the cluster.
DEADLINE_S = 300


def sacct_states(env: dict[str, str], *job_ids: str) -> dict[str, dict[str, str]]:
    """What submitit learns about `job_ids`: its own sacct query, parsed by its own reader."""
    query = ["sacct", "-o", "JobID,State,NodeList", "--parsable2"] + [arg for j in job_ids for arg in ("-j", j)]
    return SlurmInfoWatcher().read_info(subprocess.run(query, env=env, capture_output=True, text=True,
                                                       check=True).stdout)


def submitit_done(info: dict[str, dict[str, str]], key: str) -> bool:
    """Whether submitit stops waiting for `key` given this sacct answer (its own list of unfinished states)."""
    watcher = SlurmInfoWatcher()
    watcher._info_dict = info
    return watcher.is_done(key, mode="cache")


def wait_until_done(env: dict[str, str], job_id: str, *keys: str) -> dict[str, dict[str, str]]:
    """Poll the stand-in until every one of `keys` (default: the job itself) is in a final state."""
    keys = keys or (job_id,)
    deadline = time.monotonic() + DEADLINE_S
    while True:
        info = sacct_states(env, job_id)
        if all(key in info and submitit_done(info, key) for key in keys):
            return info
        assert time.monotonic() < deadline, f"job {job_id} not done after {DEADLINE_S}s: {info}"
        time.sleep(0.5)


def sbatch(env: dict[str, str], cwd, *args: str) -> str:
    return subprocess.run(["sbatch", "--parsable", *args], env=env, cwd=cwd, capture_output=True, text=True,
                          check=True).stdout.strip().split(";")[0]


def load_standin():
    spec = importlib.util.spec_from_file_location("sacct_standin", LAUNCHERS / "sacct_standin.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_sacct_standin_writes_scontrol_records_the_way_submitit_reads_them():
    standin = load_standin()
    # Lines of `scontrol show job -o` (SLURM 22.05), shortened: a job whose name has spaces, a started array task,
    # and the not-yet-started remainder of that array (2 at a time).
    lines = [
        "JobId=7 JobName=two words UserId=root(0) JobState=PENDING Reason=BeginTime Dependency=(null) NodeList=(null)",
        "JobId=9 ArrayJobId=8 ArrayTaskId=0 ArrayTaskThrottle=2 JobName=wrap JobState=RUNNING Reason=None NodeList=vm",
        "JobId=8 ArrayJobId=8 ArrayTaskId=1-3%2 ArrayTaskThrottle=2 JobName=wrap JobState=PENDING NodeList=",
    ]
    records = [standin.parse_record(line) for line in lines]
    assert records[0]["JobName"] == "two words" and records[0]["Dependency"] == "(null)"
    fields = ["JobID", "State", "NodeList"]
    text = "\n".join(["|".join(fields)] + ["|".join(standin.cell(r, f) for f in fields) for r in records])
    assert text.splitlines()[1:] == ["7|PENDING|None assigned", "8_0|RUNNING|vm", "8_[1-3%2]|PENDING|None assigned"]
    info = SlurmInfoWatcher().read_info(text)
    assert {key: value["State"] for key, value in info.items()} == {
        "7": "PENDING", "8_0": "RUNNING", "8_1": "PENDING", "8_2": "PENDING", "8_3": "PENDING"}


@pytest.mark.cluster
def test_sbatch_jobs_and_arrays_reach_final_states_through_sacct(slurm_cluster, tmp_path):
    env = slurm_cluster.env
    ok = sbatch(env, tmp_path, "--output=ok.out", "--wrap", "echo ran on $SLURMD_NODENAME")
    failing = sbatch(env, tmp_path, "--output=/dev/null", "--wrap", "exit 3")
    # %1: one task at a time, so the not-yet-started remainder is listed as ID_[1-2%1] meanwhile.
    array = sbatch(env, tmp_path, "--array=0-2%1", "--output=array_%a.out", "--wrap", "echo $SLURM_ARRAY_TASK_ID")

    assert wait_until_done(env, ok)[ok] == {"JobID": ok, "State": "COMPLETED", "NodeList": slurm_cluster.node}
    assert (tmp_path / "ok.out").read_text() == f"ran on {slurm_cluster.node}\n"
    assert wait_until_done(env, failing)[failing]["State"] == "FAILED"
    tasks = [f"{array}_{i}" for i in range(3)]
    info = wait_until_done(env, array, *tasks)
    assert {task: info[task]["State"] for task in tasks} == dict.fromkeys(tasks, "COMPLETED")
    assert [(tmp_path / f"array_{i}.out").read_text() for i in range(3)] == ["0\n", "1\n", "2\n"]


@pytest.mark.cluster
def test_a_requeued_job_reads_unfinished_until_its_second_run_completes(slurm_cluster, tmp_path):
    env = slurm_cluster.env
    started = tmp_path / "started"
    # The first run waits to be requeued; the second (SLURM_RESTART_COUNT=1) finishes at once.
    script = f'[ "${{SLURM_RESTART_COUNT:-0}}" = 0 ] && touch {started} && exec sleep 600; echo "$SLURM_RESTART_COUNT"'
    job = sbatch(env, tmp_path, "--output=job.out", "--wrap", script)
    deadline = time.monotonic() + DEADLINE_S
    while not started.exists():
        assert time.monotonic() < deadline, f"job {job} did not start: {sacct_states(env, job)}"
        time.sleep(0.2)

    subprocess.run(["scontrol", "requeue", job], env=env, check=True)
    # The first run ends (COMPLETING or REQUEUED), then the job waits to run again (PENDING): unfinished all along.
    while (info := sacct_states(env, job))[job]["State"] != "PENDING":
        assert info[job]["State"] in ("COMPLETING", "REQUEUED") and not submitit_done(info, job), info
        assert time.monotonic() < deadline, f"job {job} not pending again after requeue: {info}"
        time.sleep(0.2)
    assert not submitit_done(info, job)
    # A requeued job may start again only after a delay (cred_expire); shorten it instead of waiting. Not to now:
    # slurmd refuses a credential issued in the same second as its revocation at the requeue ("Job credential
    # revoked"), and the job would fail to launch; 2 s later it is always a later second.
    subprocess.run(["scontrol", "update", f"JobId={job}", "StartTime=now+2"], env=env, check=True)
    assert wait_until_done(env, job)[job]["State"] == "COMPLETED"
    assert (tmp_path / "job.out").read_text().splitlines()[-1] == "1"


def task_identity() -> tuple[int, int, str]:
    env = submitit.JobEnvironment()
    return env.global_rank, env.num_tasks, os.environ["SLURM_JOB_ID"]


@pytest.mark.cluster
def test_submitit_job_with_two_tasks_returns_both_results(slurm_cluster, tmp_path):
    cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the job's Python cannot import this test file
    try:
        executor = submitit.AutoExecutor(folder=tmp_path / "submitit", cluster="slurm")
        executor.update_parameters(slurm_partition="debug", nodes=1, tasks_per_node=2, cpus_per_task=1,
                                   timeout_min=5)
        job = executor.submit(task_identity)
        assert job.results() == [(0, 2, job.job_id), (1, 2, job.job_id)]
        # The tasks write their results before the job ends: wait for SLURM's last word as submitit reads it.
        assert wait_until_done(slurm_cluster.env, job.job_id)[job.job_id]["State"] == "COMPLETED"
    finally:
        cloudpickle.unregister_pickle_by_value(sys.modules[__name__])


def die_without_a_result() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


@pytest.mark.cluster
def test_submitit_driver_learns_that_a_task_died_without_a_result(slurm_cluster, tmp_path):
    """The case that hangs a driver without accounting: no result file, so only sacct can say the job is over."""
    cloudpickle.register_pickle_by_value(sys.modules[__name__])
    try:
        executor = submitit.AutoExecutor(folder=tmp_path / "submitit", cluster="slurm")
        executor.update_parameters(slurm_partition="debug", timeout_min=5)
        job = executor.submit(die_without_a_result)
        job._results_timeout_s = 0  # local disk: no network file system to give the result file time to appear
        deadline = time.monotonic() + DEADLINE_S
        while not job.done():
            assert time.monotonic() < deadline, f"submitit still waits for job {job.job_id}: {job.state}"
            time.sleep(0.5)
        assert job.state == "FAILED"
        with pytest.raises(submitit.core.utils.UncompletedJobError, match="has not produced any output"):
            job.result()
    finally:
        cloudpickle.unregister_pickle_by_value(sys.modules[__name__])


@pytest.mark.cluster
def test_mlflow_server_keeps_a_run_metric_and_served_artifact(mlflow_server, tmp_path):
    from mlflow.tracking import MlflowClient  # imported here: `import mlflow` takes seconds

    with urllib.request.urlopen(f"{mlflow_server}/health", timeout=30) as reply:
        assert reply.read() == b"OK"
    client = MlflowClient(tracking_uri=mlflow_server)
    run = client.create_run(client.create_experiment("launchers"))
    for step, loss in enumerate([2.5, 1.25]):
        client.log_metric(run.info.run_id, "loss", loss, step=step)
    (tmp_path / "notes.txt").write_text("served\n")
    client.log_artifact(run.info.run_id, str(tmp_path / "notes.txt"))
    client.set_terminated(run.info.run_id)

    assert run.info.artifact_uri.startswith("mlflow-artifacts:")  # uploaded through the server, not a local path
    assert [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, "loss")] == [(0, 2.5), (1, 1.25)]
    assert client.get_run(run.info.run_id).info.status == "FINISHED"
    fetched = client.download_artifacts(run.info.run_id, "notes.txt", str(tmp_path / "fetched"))
    assert open(fetched).read() == "served\n"


@pytest.mark.cluster
def test_mlflow_server_started_again_prints_the_uri_or_says_why_it_cannot(tmp_path):
    """The URI is recorded before the server starts: a start that gave up waiting for /health leaves a running
    server whose URI the next start prints; without the record it says what to do instead of printing nothing."""
    folder = tmp_path / "server"
    try:
        uri = start_mlflow_server(folder, "--port", free_loopback_port())
        assert start_mlflow_server(folder) == uri  # already running: the same server, whatever the options
        (folder / "uri").unlink()
        again = mlflow_server_sh("start", folder)
        assert again.returncode == 1 and again.stdout == "" and "stop it" in again.stderr, again.stderr
    finally:
        stop_mlflow_server(folder)


@pytest.mark.parametrize("password", [None, "short"])
def test_mlflow_server_off_loopback_refuses_to_start_without_a_valid_admin_password(tmp_path, password):
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_AUTH_")}
    if password:
        env["MLFLOW_AUTH_ADMIN_PASSWORD"] = password
    folder = tmp_path / "server"
    start = mlflow_server_sh("start", folder, "--host", "0.0.0.0", env=env)
    assert start.returncode == 2
    assert "MLFLOW_AUTH_ADMIN_PASSWORD" in start.stderr and start.stdout == ""
    assert not folder.exists()  # nothing written, not even the folder


@pytest.mark.cluster
@pytest.mark.slow
def test_mlflow_server_off_loopback_turns_basic_authentication_on(tmp_path, monkeypatch):
    from mlflow.tracking import MlflowClient

    password = "correct-horse-battery"
    env = {**os.environ, "MLFLOW_AUTH_ADMIN_PASSWORD": password}
    try:
        uri = start_mlflow_server(tmp_path, "--host", "0.0.0.0", "--port", free_loopback_port(), env=env)
        search = f"{uri}/api/2.0/mlflow/experiments/search?max_results=1"
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(search, timeout=30)
        assert refused.value.code == 401
        monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "admin")
        monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", password)
        assert [e.name for e in MlflowClient(tracking_uri=uri).search_experiments()] == ["Default"]
    finally:
        stop_mlflow_server(tmp_path)
