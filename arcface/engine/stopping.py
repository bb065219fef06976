"""Stopping cleanly: a signal or a non-finite loss is noticed between steps and agreed on by every rank.

SLURM sends SIGTERM (or the signal asked for with `--signal`, often SIGUSR1/SIGUSR2) before a time limit or a
preemption, and Ctrl-C sends SIGINT. The handler only sets a flag; the training loop checks it between optimizer
steps, so a checkpoint is never written half-way through an update. A second signal exits at once.

Ranks must agree on stopping or the ones that go on hang in their next collective. The flags of step t are
all-reduced after step t and read after step t+1 has been queued: on a GPU the host waits for an event recorded
right after that reduction, never for the step in flight, so checking costs no host-device synchronisation.
"""
from __future__ import annotations

import logging
import os
import signal
import sys

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1, signal.SIGUSR2)
# "Temporary failure, try again" (sysexits.h): the run stopped on request with its state saved.
EXIT_STOPPED = 75


class StopRequest:
    """Installs handlers for STOP_SIGNALS; `signal_name` is the first signal received, or None."""

    def __init__(self):
        self.signal_name: str | None = None
        self._pid = os.getpid()
        self.on_second_signal = None  # () -> text appended to the exit line, set once there is something to say
        self._previous = {}

    def __enter__(self) -> "StopRequest":
        for sig in STOP_SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def previous_handler(self, sig: signal.Signals):
        """The handler `sig` had before this object took it over (e.g. submitit's requeue handler)."""
        return self._previous.get(sig)

    def _handle(self, signum: int, frame) -> None:
        if os.getpid() != self._pid:  # a forked loader worker: the main process decides for it
            return
        name = signal.Signals(signum).name
        if self.signal_name is None:
            self.signal_name = name
            log.warning("%s received: stopping after this step with a checkpoint (send it again to exit now)", name)
            return
        message = self.on_second_signal() if self.on_second_signal else ""
        print(f"second {name}: exiting now without saving{message}", file=sys.stderr, flush=True)
        os._exit(128 + signum)


class StepFlags:
    """Per-step flags (stop requested, non-finite loss) or-ed over ranks, read one step late without a sync.

    `post(stop, loss, step)` after each optimizer step; `poll()` then returns (stop, first_bad_step), where
    first_bad_step is the first step whose loss was not finite (-1 if none), as of one step earlier on a GPU;
    `drain()` returns the latest flags, waiting for them (use it where the host syncs anyway, e.g. before a save).
    """

    def __init__(self, device: torch.device):
        self.device = device
        self.distributed = dist.is_initialized() and dist.get_world_size() > 1
        self._pending: list[tuple[torch.Tensor, object]] = []
        # First step with a non-finite loss, kept on the device: finding it costs no sync.
        self._first_bad = torch.full((), -1, dtype=torch.int64, device=device)

    def post(self, stop: bool, loss: torch.Tensor | None, step: int) -> None:
        """Flags after optimizer step `step`; `loss` (None: not checked) is that step's loss."""
        if loss is not None:
            bad = ~torch.isfinite(loss.detach())
            self._first_bad = torch.where(bad & (self._first_bad < 0), step, self._first_bad)
        flags = torch.stack([torch.full((), float(stop), device=self.device), self._first_bad.float()])
        if self.distributed:
            # MAX over ranks: any rank's stop, the latest first-bad step (every rank sees the same global loss).
            dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        if flags.is_cuda:
            host = torch.empty(flags.shape, dtype=flags.dtype, pin_memory=True)
            host.copy_(flags, non_blocking=True)
            ready = torch.cuda.Event()
            ready.record()
            self._pending.append((host, ready))
        else:
            self._pending.append((flags, None))

    def poll(self) -> tuple[bool, int]:
        """On a GPU the flags of the step before the latest one posted (nothing to wait for); elsewhere the
        latest (reading them costs nothing)."""
        lag = 1 if self.device.type == "cuda" else 0
        if len(self._pending) <= lag:
            return False, -1
        return self._read(self._pending.pop(0))

    def drain(self) -> tuple[bool, int]:
        """The latest flags (waits for them); clears what was pending."""
        if not self._pending:
            return False, -1
        latest = self._pending[-1]
        self._pending.clear()
        return self._read(latest)

    def agree_now(self, flag: bool) -> bool:
        """`flag` or-ed over ranks at once (a host sync: only for decisions that cannot wait a step)."""
        if not self.distributed:
            return flag
        value = torch.full((1,), float(flag), device=self.device)
        dist.all_reduce(value, op=dist.ReduceOp.MAX)
        return bool(value.item())

    @staticmethod
    def _read(entry) -> tuple[bool, int]:
        flags, ready = entry
        if ready is not None:
            ready.synchronize()
        stop, first_bad = flags.tolist()
        return bool(stop), int(first_bad)
