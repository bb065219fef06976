"""Real services for the tests, started by fixtures and stopped after them: a single-node SLURM
(launchers/slurm_local_up.sh) and an MLflow tracking server on loopback (launchers/mlflow_server.sh)."""
from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import os
import random
import socket
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
LAUNCHERS = REPO / "launchers"
# slurm_local_up.sh exits with this status when SLURM cannot be installed on the machine (not root, no apt, ...).
CANNOT_INSTALL = 3


@dataclasses.dataclass(frozen=True)
class SlurmCluster:
    state_dir: Path
    node: str  # the one node's name, as sinfo and SLURM_JOB_NODELIST give it
    env: dict[str, str]  # this process's environment with the cluster's SLURM_CONF and PATH (sacct stand-in first)


def _exports(text: str) -> dict[str, str]:
    """The `export NAME=VALUE` lines the up script prints, with $PATH expanded from this process."""
    exports = {}
    for line in text.splitlines():
        if line.startswith("export "):
            name, _, value = line[len("export "):].partition("=")
            exports[name] = os.path.expandvars(value)
    return exports


def _slurmctld_running(state_dir: Path) -> bool:
    try:
        pid = int((state_dir / "run" / "slurmctld.pid").read_text())
        return Path(f"/proc/{pid}/comm").read_text().strip() == "slurmctld"
    except (OSError, ValueError):
        return False


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


@contextlib.contextmanager
def _users_of(state_dir: Path):
    """Under an exclusive lock, the folder where test sessions using the cluster at `state_dir` sign in."""
    with open(f"{state_dir}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        users = Path(f"{state_dir}.users")
        users.mkdir(exist_ok=True)
        yield users


@pytest.fixture(scope="session")
def slurm_cluster():
    """A real SLURM on this machine for the whole session; the environment points at it while it lasts.

    It lives where the up script puts it by default ($ARCFACE_SLURM_DIR or /tmp/arcface-slurm), the one place a
    machine can run it (its ports are fixed), so concurrent test sessions (pytest-xdist workers, parallel runs)
    share it: each signs in, and the last one out brings it down if a test session brought it up. A cluster that
    was up before (by hand, or by CI) is left running. Skips when SLURM cannot be installed here; fails when it is
    installed but does not come up.
    """
    state_dir = Path(os.environ.get("ARCFACE_SLURM_DIR", "/tmp/arcface-slurm"))
    state_dir.parent.mkdir(parents=True, exist_ok=True)
    with _users_of(state_dir) as users:
        brought_up = not _slurmctld_running(state_dir)
        up = subprocess.run(["bash", str(LAUNCHERS / "slurm_local_up.sh"), str(state_dir)],
                            capture_output=True, text=True, timeout=900)
        if up.returncode == 0:
            (users / str(os.getpid())).touch()
            if brought_up:
                (users / "brought-up-by-tests").touch()
    if up.returncode == CANNOT_INSTALL:
        pytest.skip(up.stderr.strip().splitlines()[-1])
    if up.returncode != 0:
        pytest.fail(f"launchers/slurm_local_up.sh failed:\n{up.stderr}", pytrace=False)
    with pytest.MonkeyPatch.context() as patch:
        for name, value in _exports(up.stdout).items():
            patch.setenv(name, value)  # submitit calls sbatch and sacct from this process
        yield SlurmCluster(state_dir, socket.gethostname().split(".")[0], dict(os.environ))
    with _users_of(state_dir) as users:
        (users / str(os.getpid())).unlink()
        for user in users.iterdir():  # sessions that ended without signing out
            if user.name.isdigit() and not _alive(int(user.name)):
                user.unlink()
        marker = users / "brought-up-by-tests"
        if marker.exists() and not any(user.name.isdigit() for user in users.iterdir()):
            subprocess.run(["bash", str(LAUNCHERS / "slurm_local_down.sh"), str(state_dir)], check=True, timeout=120)
            marker.unlink()


def free_loopback_port() -> int:
    """A port free on 127.0.0.1 now, below the kernel's ephemeral range (32768+), so that no outgoing
    connection takes it before the server binds it."""
    candidates = list(range(20000, 32000))
    random.shuffle(candidates)  # concurrent test sessions do not all try the same ports first
    for port in candidates:
        with socket.socket() as probe:
            try:
                probe.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free port on 127.0.0.1 between 20000 and 32000")


def mlflow_server_sh(*args, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """`launchers/mlflow_server.sh ARGS` with this interpreter's mlflow first on PATH, in `env` (default: this
    process's environment); returns the finished process."""
    env = dict(os.environ if env is None else env)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"
    return subprocess.run(["bash", str(LAUNCHERS / "mlflow_server.sh"), *map(str, args)], env=env,
                          capture_output=True, text=True, timeout=180)


def start_mlflow_server(folder: Path, *options, env: dict[str, str] | None = None) -> str:
    """Starts the server of `folder` (launchers/mlflow_server.sh start FOLDER OPTIONS); returns its URI."""
    start = mlflow_server_sh("start", folder, *options, env=env)
    assert start.returncode == 0, f"launchers/mlflow_server.sh did not start:\n{start.stderr}"
    return _exports(start.stdout)["MLFLOW_TRACKING_URI"]


def stop_mlflow_server(folder: Path) -> None:
    """Stops the server of `folder` and every process of its group."""
    stop = mlflow_server_sh("stop", folder)
    assert stop.returncode == 0, stop.stderr


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory):
    """The URI of a real MLflow tracking server on loopback (sqlite store and served artifacts in a tmp dir)."""
    folder = tmp_path_factory.mktemp("mlflow_server")
    try:
        yield start_mlflow_server(folder, "--port", free_loopback_port())
    finally:
        stop_mlflow_server(folder)
