"""Where a job runs: its launch rank before any process group exists, and SLURM jobs started by submitit.

Every task of a SLURM job (and every torchrun rank) runs the same Hydra job in the same output directory, so
the config asks `launch_rank()` who writes `.hydra/` and `train.log` (rank 0; the others log to `rank<k>.log`).

Under `cluster=slurm` submitit installs a SIGUSR2 handler that checkpoints the submitted call and requeues the job.
Training takes that signal first (the state is saved at a step boundary) and then hands it to submitit's handler,
which requeues up to `cluster.max_requeues` times; the requeued job re-runs the same Hydra job in the same
directory and `trainer.resume=auto` continues from the checkpoint.
"""
from __future__ import annotations

import hashlib
import logging
import os
import shutil
import signal
import subprocess

from omegaconf import DictConfig, OmegaConf

from arcface.errors import exit_with_error

log = logging.getLogger(__name__)


def requeue_signal() -> signal.Signals:
    """The signal submitit asks SLURM to send before the time limit (`--signal=USR2@...`), and handles by requeueing:
    SIGUSR2 unless submitit's SUBMITIT_PREEMPT_SIGNAL names another."""
    return signal.Signals.__members__.get("SIG" + os.environ.get("SUBMITIT_PREEMPT_SIGNAL", "USR2"), signal.SIGUSR2)


def launch_rank() -> int:
    """This process's global rank as its launcher set it (torchrun's RANK, else SLURM's task id), 0 when alone."""
    return int(os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0")))


def _main_rank_only(value):
    """`${arcface.rank0:X}`: X on rank 0, null on the other ranks (e.g. hydra.output_subdir: only rank 0 writes)."""
    return value if launch_rank() == 0 else None


def _log_name(job_name: str) -> str:
    """`${arcface.log_name:${hydra.job.name}}`: rank 0 logs to <job>.log, rank k to rank<k>.log."""
    rank = launch_rank()
    return f"{job_name}.log" if rank == 0 else f"rank{rank}.log"


def _short_dirname(text: str, limit: int = 120) -> str:
    """`${arcface.short:${hydra.job.override_dirname}}`: a sweep job's directory name stays far below the file
    system's 255-byte limit; a longer override list keeps its start and a hash of the whole."""
    if len(text) <= limit:
        return text
    return f"{text[:limit - 9]}-{hashlib.sha1(text.encode()).hexdigest()[:8]}"


def register_resolvers() -> None:
    for name, resolver in (("arcface.rank0", _main_rank_only), ("arcface.log_name", _log_name),
                           ("arcface.short", _short_dirname)):
        if not OmegaConf.has_resolver(name):
            OmegaConf.register_new_resolver(name, resolver)


def warn_if_not_submitted(cfg: DictConfig, multirun: bool) -> None:
    """`cluster=slurm` acts through the multirun launcher only: a plain run stays here, and says so."""
    if cfg.cluster.name == "slurm" and not multirun and "SLURM_JOB_ID" not in os.environ:
        log.warning("cluster=slurm submits jobs only in a multirun: this run trains on this machine; add -m to submit "
                    "it to SLURM (one job per sweep point)")


def check_sweep(config: DictConfig) -> None:
    """Sweeps that cannot do what they say stop with one sentence (exit 2) before anything is submitted: a sweep
    over cluster.* values, which the one launcher of a sweep would silently apply to no job, and a SLURM sweep where
    SLURM's commands are missing or its controller cannot be reached."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    for override in OverridesParser.create().parse_overrides(list(config.hydra.overrides.task)):
        key = override.key_or_group
        if override.is_sweep_override() and (key in ("cluster", "hydra/launcher")
                                             or key.startswith(("cluster.", "hydra.launcher."))):
            exit_with_error(f"{override.input_line} sweeps a launcher setting, but one sweep has one launcher and "
                            f"every job would get the same {key}: run one sweep per value")
    target = OmegaConf.select(config, "hydra.launcher._target_", default="") or ""
    if target.endswith("SlurmLauncher"):
        unreachable = _slurm_unreachable()
        if unreachable:
            exit_with_error(f"cluster=slurm (hydra/launcher=submitit_slurm) needs a SLURM controller, and "
                            f"{unreachable}: run on a SLURM login node, bring a local cluster up with "
                            f"launchers/slurm_local_up.sh, or sweep on this machine with hydra/launcher=submitit_local")


def _slurm_unreachable() -> str | None:
    """Why no job can be submitted from here (sbatch missing, or `scontrol ping`'s last line), or None."""
    if shutil.which("sbatch") is None:
        return "SLURM's sbatch is not on PATH here"
    if shutil.which("scontrol") is None:  # nothing more to ask: sbatch will tell
        return None
    try:
        ping = subprocess.run(["scontrol", "ping"], capture_output=True, text=True, timeout=20)
    except subprocess.TimeoutExpired:
        return "scontrol ping had no answer within 20 s"
    if ping.returncode == 0:
        return None
    said = (ping.stderr.strip() or ping.stdout.strip()).splitlines()
    return f"scontrol ping says: {said[-1] if said else f'exit status {ping.returncode}'}"


def submitit_requeue_handler(previous_handler):
    """submitit's requeue handler when it is what `previous_handler` (the handler of requeue_signal() that training
    replaced) is."""
    from submitit.core.job_environment import SignalHandler

    return previous_handler if isinstance(getattr(previous_handler, "__self__", None), SignalHandler) else None


def requeue(handler) -> None:
    """Let submitit requeue this job: on rank 0 it checkpoints the submitted call, runs `scontrol requeue` and
    raises SystemExit; when the requeues are used up it raises submitit's UncompletedJobError with the reason.
    On the other ranks it does nothing (SLURM ends and restarts every task of the job)."""
    handler(requeue_signal(), None)
