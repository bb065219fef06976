"""Experiment tracking: an MLflow run per training job (rank 0), or nothing.

Tracking never stops or stalls training. Every MLflow call runs in one background thread; the training side only
appends to in-memory queues (`log_metrics` returns at once), and `start`/`end` wait for it at most `timeout`/
`flush_timeout` seconds. No call raises into training.

When the store is unreachable (server down, sqlite file locked, a call unanswered for `timeout` seconds), the job
logs ONE warning naming the uri and goes on: metrics wait in memory, at most `max_buffered` of them (beyond that
the OLDEST are dropped and counted), and the thread retries with a growing pause (0.5 s up to 30 s). Once
everything waiting has been delivered it warns once more: "tracking is back; N metrics delivered, M dropped".
`end()` makes one last attempt; if the store is still unreachable, what is left is lost and an info line counts it.
Each metric keeps the timestamp taken when it was logged, so re-sending a batch whose answer was lost does not
duplicate it (MLflow ignores a point with the same key, step, value and timestamp). A continued run drops points
at steps it already holds (a job resumed from a checkpoint older than its last log line replays those steps).

An error that retrying cannot fix (MLflow refuses a value, a deleted run) drops that one item with a warning; a
refusal to open the run at all turns tracking off for the job.
"""
from __future__ import annotations

import contextlib
import functools
import logging
import math
import os
import re
import threading
import time
from collections import deque
from pathlib import Path

from arcface.errors import first_line

log = logging.getLogger(__name__)

_THREAD_NAME = "mlflow-tracking"
_BATCH = 1000  # MLflow's limit of metrics per log_batch request
_FIRST_PAUSE_S = 0.5
_MAX_PAUSE_S = 30.0
_NOT_IN_NAMES = re.compile(r"[^/\w.\- ]")  # MLflow names allow only these (plus ":" off Windows)
# MLflow error codes that mean "this request is wrong", not "the store is away": retrying cannot help.
_REFUSED = frozenset({"INVALID_PARAMETER_VALUE", "RESOURCE_DOES_NOT_EXIST", "RESOURCE_ALREADY_EXISTS",
                      "INVALID_STATE", "BAD_REQUEST", "PERMISSION_DENIED", "UNAUTHENTICATED"})


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


_REFERENCE = re.compile(r"\$\{[\w.\[\]]+\}")  # `${dataset.num_classes}`, `${..root}`: a value set elsewhere


def settings(cfg) -> dict:
    """The config as plain values, once per setting: a key that only repeats another (`pfc.num_classes:
    ${dataset.num_classes}`) is left out; values computed by a resolver (`${oc.env:...}`) are kept, resolved."""
    from omegaconf import DictConfig, OmegaConf

    out = {}
    for key in cfg:
        if OmegaConf.is_interpolation(cfg, key) and _REFERENCE.fullmatch(str(cfg._get_node(key)._value())):
            continue
        value = cfg[key]
        if isinstance(value, DictConfig):
            out[key] = settings(value)
        else:
            out[key] = OmegaConf.to_container(value, resolve=True) if OmegaConf.is_config(value) else value
    return out


@contextlib.contextmanager
def answered_within(seconds: float):
    """MLflow HTTP requests made in this block fail after `seconds`, where its defaults retry for about 4 minutes
    per call (it reads these variables at every request); the process's own settings come back afterwards."""
    wanted = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": str(max(1, math.ceil(seconds)))}
    saved = {key: os.environ.get(key) for key in wanted}
    os.environ.update(wanted)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def experiment_id_of(client, name: str) -> str:
    """The id of MLflow experiment `name`, created when missing (also when a concurrent job creates it first)."""
    from mlflow.exceptions import MlflowException

    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        return experiment.experiment_id
    try:
        return client.create_experiment(name)
    except MlflowException as error:
        if error.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
        return client.get_experiment_by_name(name).experiment_id


def metric_key(name: str) -> str:
    """A name MLflow accepts: `lfw/val@far` -> `lfw/val_at_far`, any other character it rejects -> `_`."""
    return _NOT_IN_NAMES.sub("_", name.replace("@", "_at_"))


class NullTracker:
    """Tracking switched off (`tracking=none`) and on ranks other than 0."""

    run_id: str | None = None

    def start(self, params: dict, tags: dict | None = None, run_id: str | None = None) -> None:
        pass

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        pass

    def log_artifacts(self, directory: str | Path, artifact_path: str | None = None) -> None:
        pass

    def set_tags(self, tags: dict) -> None:
        pass

    def end(self, status: str = "FINISHED") -> None:
        pass


def _guarded(method):
    """Whatever goes wrong inside a tracking call is logged (once per method) and swallowed."""
    @functools.wraps(method)
    def call(self, *args, **kwargs):
        try:
            return method(self, *args, **kwargs)
        except Exception as error:  # tracking must never stop training
            if method.__name__ not in self._broken:
                self._broken.add(method.__name__)
                log.warning("MLflow tracking at %s: %s failed (%s); training goes on", self.uri, method.__name__,
                            first_line(error))
    return call


def _root(error: BaseException) -> BaseException:
    """Why a store is away ("Connection refused", "database is locked") is at the end of MLflow's exception chain."""
    for _ in range(20):  # bounded in case of a cycle
        inner = error.__cause__ or error.__context__
        if inner is None or not str(inner).strip():
            break
        error = inner
    return error


class _QuietTrackingThread(logging.Filter):
    """MLflow logs a full traceback for every sqlite lock error; from our thread, one warning already says it."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.threadName != _THREAD_NAME or record.levelno < logging.ERROR


_QUIET = _QuietTrackingThread()


class MLflowTracker(NullTracker):
    """One MLflow run: params = flattened config, metrics by step, tags, artifacts such as the `.hydra/` files.

    `timeout`: seconds one MLflow call may take before the store counts as unreachable (also MLflow's HTTP request
    timeout unless MLFLOW_HTTP_REQUEST_TIMEOUT is set) and the longest `start()` waits for the run to open.
    `flush_timeout`: the longest `end()` waits for queued data. `max_buffered`: metrics kept while the store is away.
    """

    def __init__(self, uri: str, experiment_name: str, run_name: str | None = None, *, timeout: float = 10.0,
                 flush_timeout: float = 60.0, max_buffered: int = 100_000):
        self.uri = uri
        self.experiment_name = experiment_name
        self.run_name = run_name
        self.timeout = timeout
        self.flush_timeout = flush_timeout
        self.max_buffered = max_buffered
        self.run_id: str | None = None
        self._broken: set[str] = set()
        self._cond = threading.Condition()
        # Everything below is shared with the tracking thread and guarded by _cond.
        self._metrics: deque[tuple[str, float, int, int]] = deque()  # (key, value, timestamp ms, step), oldest first
        self._sending: list[tuple[str, float, int, int]] = []  # the batch in flight; requeued at the front on failure
        self._ops: deque[tuple[str, object]] = deque()  # ("params" | "tags" | "artifacts", payload), in order
        self._tags: dict[str, str] = {}
        # A continued run's last step per metric: a job that crashed after its last checkpoint replays steps it
        # had logged, and they are not logged twice.
        self._logged_through: dict[str, int] = {}
        self._status: str | None = None  # set by end(): the run's final status
        self._thread: threading.Thread | None = None
        self._client = None
        self._experiment_id: str | None = None
        self._current = ""  # what the tracking thread is sending: "open", "op", "batch" or "status"
        self._attempted = False  # the first attempt to open the run is over (start() waits for it)
        self._opened = False  # the run exists in the store
        self._off = False  # the store refused to open the run: nothing more is sent
        self._stop = False  # end() gave up waiting: the thread stops after its current call
        self._call_since: float | None = None  # when the call in flight began (monotonic)
        self._down = False
        self._delivered = self._dropped = self._refused = 0
        self._mark = (0, 0)  # (delivered, dropped) when the current outage began

    # ---- training side: never blocks for long, never raises ----

    @_guarded
    def start(self, params: dict, tags: dict | None = None, run_id: str | None = None) -> None:
        """Open a new run, or continue `run_id` (params already there are kept; only new keys are logged).

        `self.run_id` is the given id at once; for a new run it is set once the store has opened it, so it stays
        None while the store is unreachable.
        """
        if self._thread is not None:
            return
        # MLflow reads these at every request; its defaults retry for ~4 minutes per call, our thread retries itself.
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", str(max(1, math.ceil(self.timeout))))
        import mlflow  # noqa: F401  imported here: it costs ~2 s and only rank 0 tracks

        logging.getLogger("mlflow.store.db.utils").addFilter(_QUIET)  # a no-op when already there
        self.run_id = run_id
        self._tags = {key: str(value) for key, value in (tags or {}).items()}
        self._ops.appendleft(("params", flatten(params)))
        self._thread = threading.Thread(target=self._work, name=_THREAD_NAME, daemon=True)
        self._thread.start()
        with self._cond:
            attempted = self._cond.wait_for(lambda: self._attempted, timeout=self.timeout)
        # Only a store call left unanswered counts: setting up a fresh sqlite file alone can take several seconds.
        if not attempted and self._call_since is not None:
            self._outage(f"no answer within {self.timeout:g} s")

    @_guarded
    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        stamp = int(time.time() * 1000)
        points = [(metric_key(key), float(value), stamp, int(step)) for key, value in metrics.items()]
        with self._cond:
            if self._off or self._status is not None:
                return
            self._metrics.extend(points)
            self._trim()
            self._cond.notify()
        self._check_stalled()

    @_guarded
    def log_artifacts(self, directory: str | Path, artifact_path: str | None = None) -> None:
        if Path(directory).is_dir():
            self._queue(("artifacts", (str(directory), artifact_path)))

    @_guarded
    def set_tags(self, tags: dict) -> None:
        self._queue(("tags", {key: str(value) for key, value in tags.items()}))

    @_guarded
    def end(self, status: str = "FINISHED") -> None:
        """Finish the run as FINISHED / FAILED / KILLED, waiting at most `flush_timeout` s for queued data."""
        with self._cond:
            if self._thread is None or self._status is not None:
                return
            self._status = status
            self._cond.notify()
        deadline = time.monotonic() + self.flush_timeout
        while self._thread.is_alive() and (left := deadline - time.monotonic()) > 0:
            self._thread.join(min(left, 1.0))
            self._check_stalled()
        with self._cond:
            self._stop = True
            unsent = len(self._metrics) + len(self._sending)
        if self._opened:
            if self.uri.startswith(("http://", "https://")):
                log.info("MLflow run %s: open %s/#/experiments/%s/runs/%s", self.run_id, self.uri.rstrip("/"),
                         self._experiment_id, self.run_id)
            else:
                log.info("MLflow run %s in %s; open it with:  mlflow ui --backend-store-uri %s",
                         self.run_id, self.uri, self.uri)
        if unsent or self._dropped or self._refused:
            log.info("MLflow tracking at %s: %d metrics never delivered, %d dropped while it was unreachable, "
                     "%d items refused", self.uri, unsent, self._dropped, self._refused)

    def _queue(self, op: tuple[str, object]) -> None:
        with self._cond:
            if self._off or self._status is not None:
                return
            self._ops.append(op)
            self._cond.notify()

    def _trim(self) -> None:
        """Keep at most `max_buffered` metrics waiting: the oldest go first (caller holds _cond)."""
        extra = len(self._metrics) - self.max_buffered
        for _ in range(extra):
            self._metrics.popleft()
        self._dropped += max(extra, 0)

    def _check_stalled(self) -> None:
        since = self._call_since
        if since is not None and time.monotonic() - since > self.timeout:
            self._outage(f"no answer for {self.timeout:g} s")

    def _outage(self, reason: str) -> None:
        with self._cond:
            if self._down or self._off:
                return
            self._down = True
            self._mark = (self._delivered, self._dropped)
        log.warning("MLflow tracking at %s is unreachable (%s); training goes on, metrics wait in memory (at most %d, "
                    "oldest dropped first) and are sent when it is back", self.uri, reason, self.max_buffered)

    # ---- the tracking thread: the only place MLflow is called ----

    def _work(self) -> None:
        pause = _FIRST_PAUSE_S
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._stop or self._off or self._has_work() or self._status is not None)
                if self._stop or self._off:
                    return
                final = self._status is not None  # end() was called: this attempt is the last if it fails
            try:
                finished, error = self._deliver_one(), None
            except Exception as caught:
                finished, error = False, caught
            self._first_attempt_over()
            if error is None:
                pause = _FIRST_PAUSE_S
                self._check_back()
                if finished:
                    return
            elif _refusal(error):
                self._refuse(error)
            else:
                self._failed(error)
                if final:
                    return
                with self._cond:
                    self._cond.wait_for(lambda: self._status is not None, timeout=pause)
                pause = min(2 * pause, _MAX_PAUSE_S)

    def _has_work(self) -> bool:
        return not self._opened or bool(self._ops or self._metrics)

    def _deliver_one(self) -> bool:
        """Send the next item; True once the run is ended (after everything before it)."""
        from mlflow import MlflowClient
        from mlflow.entities import Metric

        if self._client is None:
            self._current = "open"
            self._client = MlflowClient(self.uri)
        if not self._opened:
            self._current = "open"
            self._watched(self._open_run, self._client)
            return False
        with self._cond:
            op = self._ops[0] if self._ops else None
            while op is None and not self._sending and self._metrics:
                batch = [self._metrics.popleft() for _ in range(min(_BATCH, len(self._metrics)))]
                self._sending = [p for p in batch if p[3] > self._logged_through.get(p[0], -1)]
            self._current = "op" if op else "batch" if self._sending else "status"
            status = self._status
        if op is not None:
            self._send_op(self._client, *op)
            with self._cond:
                self._ops.popleft()
        elif self._sending:
            self._watched(self._client.log_batch, self.run_id, metrics=[Metric(*point) for point in self._sending])
            with self._cond:
                self._delivered += len(self._sending)
                self._sending = []
        elif status is not None:
            self._watched(self._client.set_terminated, self.run_id, status)
            return True
        return False

    def _watched(self, call, *args, **kwargs):
        """A call that counts as a stall when it runs past `timeout` (artifact uploads may rightly take longer)."""
        self._call_since = time.monotonic()
        try:
            return call(*args, **kwargs)
        finally:
            self._call_since = None

    def _open_run(self, client) -> None:
        from mlflow.entities import RunTag
        from mlflow.exceptions import MlflowException
        from mlflow.tracking.context.registry import resolve_tags

        if self.run_id is not None:
            try:
                run = client.get_run(self.run_id)
            except MlflowException as error:
                if error.error_code != "RESOURCE_DOES_NOT_EXIST":
                    raise
                run = None
            if run is not None and run.info.lifecycle_stage == "active":
                client.update_run(self.run_id, status="RUNNING")
                self._logged_through = {key: max(m.step for m in client.get_metric_history(self.run_id, key))
                                        for key in run.data.metrics}
                if self._tags:
                    client.log_batch(self.run_id, tags=[RunTag(key, value) for key, value in self._tags.items()])
                self._experiment_id = run.info.experiment_id
                self._opened = True
                return
            log.warning("MLflow run %s is not in %s (deleted, or another store); continuing in a new run",
                        self.run_id, self.uri)
            self.run_id = None
        experiment_id = experiment_id_of(client, self.experiment_name)
        run = client.create_run(experiment_id, run_name=self.run_name, tags=resolve_tags(self._tags))
        self.run_id = run.info.run_id
        self._experiment_id = experiment_id
        self._opened = True

    def _send_op(self, client, kind: str, payload) -> None:
        from mlflow.entities import Param, RunTag

        if kind == "artifacts":
            client.log_artifacts(self.run_id, *payload)
        elif kind == "tags":
            self._watched(client.log_batch, self.run_id, tags=[RunTag(k, v) for k, v in payload.items()])
        else:  # params: on a continued run only keys not yet there (MLflow params cannot change)
            present = self._watched(client.get_run, self.run_id).data.params
            new = [Param(key, value) for key, value in payload.items() if key not in present]
            if new:
                self._watched(client.log_batch, self.run_id, params=new)
            changed = sorted(key for key, value in payload.items() if key in present and present[key] != value)
            if changed:
                log.warning("MLflow run %s keeps the values first logged for %d changed param(s): %s", self.run_id,
                            len(changed), ", ".join(changed[:8]) + (", ..." if len(changed) > 8 else ""))

    def _first_attempt_over(self) -> None:
        with self._cond:
            if not self._attempted:
                self._attempted = True
                self._cond.notify_all()

    def _failed(self, error: Exception) -> None:
        with self._cond:  # the batch in flight goes back in front of newer metrics
            self._metrics.extendleft(reversed(self._sending))
            self._sending = []
            self._trim()
        self._outage(first_line(_root(error)))

    def _refuse(self, error: Exception) -> None:
        with self._cond:
            if self._current == "open":
                self._off = True
                self._cond.notify_all()
            elif self._current == "op":
                self._ops.popleft()
            elif self._current == "batch":
                self._sending = []
            else:
                self._stop = True
            self._refused += 1
            first = self._refused == 1
        if self._current == "open":
            log.warning("MLflow tracking at %s refused to open the run (%s); tracking is off for this job",
                        self.uri, first_line(error))
        elif first:
            log.warning("MLflow tracking at %s refused an item (%s); it is dropped, later refusals are only counted",
                        self.uri, first_line(error))

    def _check_back(self) -> None:
        with self._cond:
            if not self._down or self._has_work():
                return
            self._down = False
            delivered, dropped = self._delivered - self._mark[0], self._dropped - self._mark[1]
        log.warning("MLflow tracking at %s is back; %d metrics delivered, %d dropped", self.uri, delivered, dropped)


def _refusal(error: Exception) -> bool:
    """True for errors that retrying cannot fix; anything else (connection, timeout, lock) is an outage."""
    import requests
    from mlflow.exceptions import MlflowException

    if isinstance(error, MlflowException):
        return error.error_code in _REFUSED
    return not isinstance(error, (ConnectionError, TimeoutError, requests.RequestException))
