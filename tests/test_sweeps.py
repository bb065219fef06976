"""Sweeps: what a job logs to MLflow, who writes shared files, and a real multirun through submitit's local launcher
(one parent run, one tagged child run per job)."""
from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
import time

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from arcface.cluster import check_sweep, register_resolvers, warn_if_not_submitted
from arcface.engine.tracking import flatten, settings
from arcface.sweep import SweepRuns
from conftest import REPO, TINY

register_resolvers()


def _compose(overrides=(), hydra=False):
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        return compose(config_name="train", overrides=list(overrides), return_hydra_config=hydra)


def test_params_name_each_setting_once():
    params = flatten(settings(_compose(["tracking.uri=sqlite:///x.db"])))
    assert params["dataset.num_classes"].isdigit()
    assert "pfc.num_classes" not in params  # `${dataset.num_classes}` there: the same setting
    assert params["tracking.uri"] == "sqlite:///x.db"
    resolved = flatten(OmegaConf.to_container(_compose(["tracking.uri=sqlite:///x.db"]), resolve=True))
    assert set(params) < set(resolved)
    assert all(resolved[key] == value for key, value in params.items())


@pytest.mark.parametrize("env, subdir, log_name", [({}, ".hydra", "{job}.log"),
                                                   ({"RANK": "1"}, None, "rank1.log"),
                                                   ({"SLURM_PROCID": "3"}, None, "rank3.log")])
def test_only_rank_zero_writes_hydra_files(monkeypatch, env, subdir, log_name):
    for key in ("RANK", "SLURM_PROCID"):
        monkeypatch.delenv(key, raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    cfg = _compose(hydra=True)
    assert cfg.hydra.output_subdir == subdir
    OmegaConf.update(cfg, "hydra.runtime.output_dir", "/run")
    assert cfg.hydra.job_logging.handlers.file.filename == "/run/" + log_name.format(job=cfg.hydra.job.name)


def test_sweep_job_dirs_stay_short():
    many = [f"dataset.val.synthetic_holdout.num_pairs={n}" for n in (40, 80)]
    cfg = _compose(["tracking.uri=http://127.0.0.1:5000", *TINY, many[0]], hydra=True)
    OmegaConf.update(cfg, "hydra.job.num", 7)
    OmegaConf.update(cfg, "hydra.job.override_dirname", ",".join(TINY + many))
    name = cfg.hydra.sweep.subdir
    assert name.startswith("7_dataset.num_classes=16") and len(name) <= 122
    OmegaConf.update(cfg, "hydra.job.override_dirname", ",".join(TINY + many[1:]))
    assert cfg.hydra.sweep.subdir != name  # the hash tells apart lists that share their start


def test_slurm_settings_reach_the_launcher():
    cfg = _compose(["cluster=slurm", "cluster.nodes=2", "cluster.gpus_per_node=0", "cluster.tasks_per_node=2",
                    "cluster.max_requeues=5", "cluster.partition=gpu", "+cluster.sbatch.mail-type=END"], hydra=True)
    launcher = cfg.hydra.launcher
    assert launcher._target_.endswith("SlurmLauncher")
    assert (launcher.nodes, launcher.tasks_per_node, launcher.gpus_per_node) == (2, 2, 0)
    assert (launcher.max_num_timeout, launcher.partition) == (5, "gpu")
    assert launcher.additional_parameters == {"mail-type": "END"}
    assert cfg.trainer.resume == "auto"
    assert _compose(["cluster=slurm"], hydra=True).hydra.launcher.tasks_per_node == 8  # one rank per GPU


def test_slurm_without_multirun_says_it_trains_here(monkeypatch, caplog):
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    with caplog.at_level(logging.WARNING):
        warn_if_not_submitted(_compose(["cluster=slurm"]), multirun=False)
        warn_if_not_submitted(_compose(["cluster=slurm"]), multirun=True)
    assert [r.getMessage() for r in caplog.records if "add -m" in r.getMessage()] != []
    assert len(caplog.records) == 1


def test_slurm_sweep_without_slurm_is_one_sentence(monkeypatch, capsys, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))  # no sbatch here
    with pytest.raises(SystemExit) as exit_:
        check_sweep(_compose(["cluster=slurm"], hydra=True))
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: cluster=slurm") and "launchers/slurm_local_up.sh" in err and "\n" not in err


@pytest.mark.skipif(not (shutil.which("sbatch") and shutil.which("scontrol")), reason="SLURM's client is not installed")
def test_slurm_sweep_without_a_controller_is_one_sentence(monkeypatch, capsys, tmp_path):
    """sbatch is installed, but SLURM cannot be reached from here (no configuration): submitit would fail with a
    traceback after the sweep's MLflow parent run had started."""
    (tmp_path / "slurm.conf").write_text("")  # names no cluster (a missing file makes scontrol retry for a minute)
    monkeypatch.setenv("SLURM_CONF", str(tmp_path / "slurm.conf"))
    with pytest.raises(SystemExit) as exit_:
        check_sweep(_compose(["cluster=slurm"], hydra=True))
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: cluster=slurm (hydra/launcher=submitit_slurm) needs a SLURM controller, and "
                          "scontrol ping says: scontrol: ") and "\n" not in err, err


def test_a_sweep_goes_on_without_a_parent_run_when_the_tracking_server_is_down(caplog):
    """Opening the parent run is the one tracking call made before the jobs are submitted: with MLflow's default
    retries it stalled a sweep for 4 minutes; now it gives up after one try, with one warning."""
    from cluster import free_loopback_port

    uri = f"http://127.0.0.1:{free_loopback_port()}"  # nothing listens there
    callback = SweepRuns()
    started = time.monotonic()
    with caplog.at_level(logging.WARNING):
        callback.on_multirun_start(_compose([f"tracking.uri={uri}"], hydra=True))
    assert callback.parent_run_id is None and time.monotonic() - started < 60
    said = [r.getMessage() for r in caplog.records]
    assert [line for line in said if line.startswith(f"MLflow tracking at {uri} did not answer")], said
    assert "MLFLOW_HTTP_REQUEST_MAX_RETRIES" not in os.environ  # the jobs keep their own settings


@pytest.mark.parametrize("sweep", ["cluster.nodes=1,2", "+cluster.sbatch.qos=high,low", "++cluster.timeout_min=10,20",
                                   "cluster=local,slurm"])
def test_sweeping_a_launcher_setting_is_one_sentence(capsys, sweep):
    cfg = _compose(["cluster=slurm"], hydra=True)
    OmegaConf.update(cfg, "hydra.overrides.task", ["cluster=slurm", sweep])
    with pytest.raises(SystemExit) as exit_:
        check_sweep(cfg)
    assert exit_.value.code == 2
    assert capsys.readouterr().err.startswith(f"error: {sweep} sweeps a launcher setting")


@pytest.mark.cluster
def test_local_sweep_is_one_parent_run_with_a_child_per_job(tmp_path):
    from mlflow import MlflowClient

    db = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cmd = [sys.executable, "-m", "arcface.train", "-m", "hydra/launcher=submitit_local",
           f"hydra.sweep.dir={tmp_path / 'sweep'}", f"tracking.uri={db}", *TINY,
           "trainer.verify_at_start=false", "trainer.verify_at_end=false", "backbone=r_tiny,mbf", "pfc.rate=0.5,1.0"]
    done = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    client = MlflowClient(db)
    runs = client.search_runs([client.get_experiment_by_name("arcface").experiment_id])
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    assert len(parents) == 1 and len(children) == 4
    parent = parents[0]
    assert parent.info.status == "FINISHED" and parent.data.tags["arcface.launcher"] == "LocalLauncher"
    choices = set()
    for child in children:
        tags = child.data.tags
        assert child.info.status == "FINISHED"
        assert tags["mlflow.parentRunId"] == parent.info.run_id
        assert tags["hydra.choice.cluster"] == "local" and tags["mlflow.source.git.commit"]
        assert f"backbone={tags['hydra.choice.backbone']}" in tags["hydra.overrides"]
        assert child.data.params["backbone.name"] == tags["hydra.choice.backbone"]
        assert "pfc.num_classes" not in child.data.params
        assert child.data.metrics["loss"] > 0
        choices.add((tags["hydra.choice.backbone"], child.data.params["pfc.rate"]))
    assert choices == {("r_tiny", "0.5"), ("r_tiny", "1.0"), ("mbf", "0.5"), ("mbf", "1.0")}
    job_dirs = sorted(p for p in (tmp_path / "sweep").iterdir() if p.is_dir() and not p.name.startswith("."))
    assert len(job_dirs) == 4 and all((d / ".hydra" / "config.yaml").is_file() for d in job_dirs)


def test_the_entrypoint_pickles_by_value_as_submitit_sends_it():
    """`python -m arcface.train -m ...` runs the module as __main__, so submitit pickles its functions by value, with
    the modules their code reaches. A module-like object among them (torch.backends.cudnn is one) cannot be pickled,
    and then no job of the sweep starts."""
    import cloudpickle

    import arcface.train

    cloudpickle.register_pickle_by_value(arcface.train)
    try:
        cloudpickle.dumps(arcface.train.main)
    finally:
        cloudpickle.unregister_pickle_by_value(arcface.train)
