"""Adding results to an existing MLflow run (usually the training run of the weights evaluated or exported).

The run keeps the status it had: logging evaluation results to a finished run leaves it finished.
"""
from __future__ import annotations

import contextlib
import os
import time
from pathlib import Path
from typing import Iterator


def default_tracking_uri() -> str:
    """What training uses by default: `mlflow.db` in the directory the command runs from."""
    return f"sqlite:///{Path.cwd().resolve() / 'mlflow.db'}"


def existing_run(uri: str, run_id: str):
    """(client, run) of `run_id` in the store at `uri`; a UserError when the store or the run is not there."""
    from arcface.errors import UserError, first_line

    # One-shot tools: fail within a minute, not after MLflow's default of minutes of retries.
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "30")
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    client = MlflowClient(uri)
    try:
        run = client.get_run(run_id)
    except MlflowException as e:
        if e.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
            raise UserError(f"MLflow run {run_id} is not in {uri}: pass --run-id as printed at the end of training "
                            f"and --tracking-uri of the store that holds it") from None
        raise UserError(f"the MLflow store {uri} did not answer ({first_line(e)}): start it, or pass "
                        f"--tracking-uri") from None
    except Exception as e:  # connection refused, unreadable sqlite file, ...
        raise UserError(f"the MLflow store {uri} cannot be reached ({first_line(e)}): start it, or pass "
                        f"--tracking-uri") from None
    if run.info.lifecycle_stage != "active":
        raise UserError(f"MLflow run {run_id} in {uri} is deleted: restore it in the MLflow UI, or pass another "
                        f"--run-id")
    return client, run


def log_results(uri: str, run_id: str, metrics: dict[str, float], artifacts: list[Path],
                artifact_path: str = "evaluation") -> None:
    """Metrics (at step 0; names MLflow accepts) and files into run `run_id`."""
    from mlflow.entities import Metric

    client, _ = existing_run(uri, run_id)
    stamp = int(time.time() * 1000)
    client.log_batch(run_id, metrics=[Metric(key, float(value), stamp, 0) for key, value in metrics.items()])
    for path in artifacts:
        client.log_artifact(run_id, str(path), artifact_path)


@contextlib.contextmanager
def active_run(uri: str, run_id: str) -> Iterator[None]:
    """`mlflow.<flavour>.log_model(...)` inside this block logs to run `run_id`, whose status is kept."""
    import mlflow

    _, run = existing_run(uri, run_id)
    mlflow.set_tracking_uri(uri)
    mlflow.start_run(run_id=run_id)
    try:
        yield
    finally:
        mlflow.end_run(status=run.info.status)
