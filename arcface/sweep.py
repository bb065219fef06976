"""Sweeps in MLflow: one parent run per multirun, and the tags that place each job's run under it; and a guard on
a single run's directory.

`SweepRuns` is a Hydra callback (conf/train.yaml, hydra.callbacks). In the process that launches a multirun it opens
the parent run; Hydra hands the same callback object to every job (in the same process for the basic launcher,
pickled into submitit's jobs, local or SLURM, requeued ones included), and `on_job_start` passes the parent's id on
to the job's own run through PARENT_RUN_ENV.
"""
from __future__ import annotations

import atexit
import logging
import os
import subprocess
from pathlib import Path

from hydra.core.hydra_config import HydraConfig
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from arcface.cluster import check_sweep
from arcface.engine.tracking import answered_within, experiment_id_of
from arcface.engine.training_state import refuse_fresh_start_over
from arcface.errors import UserError, exit_with_error, first_line

log = logging.getLogger(__name__)

PARENT_RUN_ENV = "ARCFACE_MLFLOW_PARENT_RUN"
_MLFLOW_TRACKER = "arcface.engine.tracking.MLflowTracker"
_STORE_TIMEOUT_S = 10  # the parent run is opened before any job is submitted: an absent store must not stall them


class FreshStartGuard(Callback):
    """Refuses a run that would start afresh over an earlier run's checkpoint before Hydra writes anything into the
    run dir (its .hydra/ record and train.log); jobs of a multirun are checked as they start training."""

    def on_run_start(self, config: DictConfig, **kwargs) -> None:
        try:
            refuse_fresh_start_over(Path(str(config.hydra.run.dir)).absolute(), config.trainer.resume)
        except UserError as error:
            exit_with_error(error)


class SweepRuns(Callback):
    def __init__(self):
        self.parent_run_id: str | None = None
        self._uri: str | None = None
        self._ended = False

    def on_multirun_start(self, config: DictConfig, **kwargs) -> None:
        check_sweep(config)
        HydraConfig.instance().set_config(config)  # the tracking uri may read ${hydra:runtime.cwd}
        tracking = config.tracking
        if OmegaConf.select(tracking, "_target_") != _MLFLOW_TRACKER:
            return
        from mlflow import MlflowClient

        self._uri = tracking.uri
        sweep_dir = Path(str(config.hydra.sweep.dir))
        tags = {"arcface.sweep_dir": str(sweep_dir.resolve()), "hydra.overrides": " ".join(config.hydra.overrides.task),
                "arcface.launcher": str(config.hydra.launcher._target_).rsplit(".", 1)[-1]}
        try:
            with answered_within(_STORE_TIMEOUT_S):
                client = MlflowClient(self._uri)
                experiment_id = experiment_id_of(client, tracking.experiment_name)
                run = client.create_run(experiment_id, run_name=f"sweep {sweep_dir.name}", tags=tags)
        except Exception as error:  # tracking never stops training: the jobs still track their own runs
            log.warning("MLflow tracking at %s did not answer (%s): the sweep goes on without a parent run",
                        self._uri, first_line(error))
            return
        self.parent_run_id = run.info.run_id
        atexit.register(self._end, "FAILED")  # the sweep raised: a job failed (on_multirun_end never comes)
        log.info("MLflow parent run %s (%s) for the sweep in %s", self.parent_run_id, self._uri, sweep_dir)

    def on_multirun_end(self, config: DictConfig, **kwargs) -> None:
        self._end("FINISHED")

    def on_job_start(self, config: DictConfig, **kwargs) -> None:
        if self.parent_run_id is None:
            os.environ.pop(PARENT_RUN_ENV, None)
        else:
            os.environ[PARENT_RUN_ENV] = self.parent_run_id

    def _end(self, status: str) -> None:
        if self.parent_run_id is None or self._ended:
            return
        self._ended = True
        from mlflow import MlflowClient

        try:
            with answered_within(_STORE_TIMEOUT_S):
                MlflowClient(self._uri).set_terminated(self.parent_run_id, status)
        except Exception as error:
            log.warning("MLflow tracking at %s did not answer (%s): the sweep's parent run %s stays RUNNING",
                        self._uri, first_line(error), self.parent_run_id)


def git_commit() -> str | None:
    """The commit of the code that runs (its checkout), or None outside a git checkout."""
    try:
        done = subprocess.run(["git", "-C", str(Path(__file__).resolve().parent), "rev-parse", "HEAD"],
                              capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return (done.stdout.strip() or None) if done.returncode == 0 else None


def slurm_job_id() -> str | None:
    """submitit's name for the job: <array job>_<task> for a sweep's array, else SLURM's job id."""
    array, task = os.environ.get("SLURM_ARRAY_JOB_ID"), os.environ.get("SLURM_ARRAY_TASK_ID")
    return f"{array}_{task}" if array and task else os.environ.get("SLURM_JOB_ID")


def job_tags() -> dict[str, str]:
    """Tags of this job's MLflow run: its Hydra choices and overrides, parent sweep run, SLURM job, git commit."""
    hydra_cfg = HydraConfig.get()
    tags = {f"hydra.choice.{group}": option for group, option in hydra_cfg.runtime.choices.items()
            if option is not None and not group.startswith("hydra/")}
    tags["hydra.overrides"] = " ".join(hydra_cfg.overrides.task)
    optional = {"mlflow.parentRunId": os.environ.get(PARENT_RUN_ENV), "slurm.job_id": slurm_job_id(),
                "mlflow.source.git.commit": git_commit()}
    tags.update({key: value for key, value in optional.items() if value})
    return tags
