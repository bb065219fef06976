"""Experiment tracking: an MLflow run per training job (rank 0), or nothing."""
from __future__ import annotations

import logging
from pathlib import Path

log = logging.getLogger(__name__)


def flatten(tree: dict, prefix: str = "") -> dict[str, str]:
    """Nested config -> {"a.b.c": "value"} for MLflow params (lists become their string form)."""
    flat = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = str(value)
    return flat


class NullTracker:
    """Tracking switched off (`tracking=none`) and on ranks other than 0."""

    def start(self, params: dict, tags: dict | None = None) -> None:
        pass

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        pass

    def log_artifacts(self, directory: str | Path, artifact_path: str | None = None) -> None:
        pass

    def end(self, status: str = "FINISHED") -> None:
        pass


class MLflowTracker(NullTracker):
    """One MLflow run: params = flattened config, metrics by step, artifacts such as the `.hydra/` files."""

    def __init__(self, uri: str, experiment_name: str, run_name: str | None = None):
        self.uri = uri
        self.experiment_name = experiment_name
        self.run_name = run_name
        self.run_id: str | None = None

    def start(self, params: dict, tags: dict | None = None) -> None:
        import mlflow  # imported here: it costs ~2 s and only rank 0 tracks

        self._mlflow = mlflow
        mlflow.set_tracking_uri(self.uri)
        mlflow.set_experiment(self.experiment_name)
        run = mlflow.start_run(run_name=self.run_name, tags=tags)
        self.run_id = run.info.run_id
        mlflow.log_params(flatten(params))

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        clean = {k.replace("@", "_at_"): float(v) for k, v in metrics.items()}
        self._mlflow.log_metrics(clean, step=step)

    def log_artifacts(self, directory: str | Path, artifact_path: str | None = None) -> None:
        if Path(directory).is_dir():
            self._mlflow.log_artifacts(str(directory), artifact_path=artifact_path)

    def end(self, status: str = "FINISHED") -> None:
        if self.run_id is None:
            return
        self._mlflow.end_run(status=status)
        log.info("MLflow run %s in %s; open it with:  mlflow ui --backend-store-uri %s",
                 self.run_id, self.uri, self.uri)
