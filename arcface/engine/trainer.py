"""The training loop: forward, margin loss, backward, clip, step, schedule; logging, verification, checkpoints,
and stopping cleanly on a signal or a diverged loss."""
from __future__ import annotations

import contextlib
import inspect
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel

from arcface.data.transforms import prepare_batch
from arcface.distributed import DistEnv, barrier, gather_objects, sum_allreduce_hook
from arcface.engine import rng
from arcface.engine.amp import agree_on_overflow
from arcface.engine.training_state import CHECKPOINT_NAME, load_training_state, save_backbone, save_training_state
from arcface.engine.schedule import PolynomialWarmup
from arcface.engine.stopping import StepFlags, StopRequest
from arcface.engine.tracking import NullTracker
from arcface.errors import UserError
from arcface.evaluation import PairSet, evaluate
from arcface.export import export_after_training
from arcface.models.base import cpu_channels_last_crash
from arcface.precision import needs_loss_scaling

log = logging.getLogger(__name__)

NONFINITE_POLICIES = ("stop", "skip")
ACCUMULATIONS = ("mean", "sum")
# trainer.compile: off, on in torch.compile's default mode, or one of its modes
COMPILE_CHOICES = (False, True, "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
_CUDA_GRAPH_MODES = ("reduce-overhead", "max-autotune")
# BatchNorm statistics stay each rank's own. torch 2.13 renamed DDP's switch (the old name warns on every rank); the
# project's floor, torch 2.11, knows only the old one.
_RANK_LOCAL_BUFFERS = ({"forward_sync_buffers": False}
                       if "forward_sync_buffers" in inspect.signature(DistributedDataParallel).parameters
                       else {"broadcast_buffers": False})


@dataclass(frozen=True)
class TrainerOptions:
    """The loop's `trainer.*` settings, built from the config by `arcface.train.trainer_options`; conf/train.yaml
    holds the only defaults (and says what each key means)."""

    precision: str
    cudnn_benchmark: bool  # cuDNN times its convolution algorithms for the (fixed) input shape
    compile: bool | str  # one of COMPILE_CHOICES
    gradient_acc: int
    grad_clip: float | None  # None: no clipping
    log_every: int
    verify_every: int  # 0: no periodic verification
    verify_at_start: bool
    verify_at_end: bool
    export_onnx: bool  # write onnx/model.onnx beside model.pt at the end
    eval_batch_size: int  # trainer.batch_size
    save_every: int
    keep_checkpoints: int
    on_nonfinite: str
    accumulate: str
    xnorm: str  # see arcface.evaluation.verification.embed_pair_set

    def __post_init__(self):
        if self.accumulate not in ACCUMULATIONS:
            raise UserError(f"trainer.accumulate={self.accumulate!r} is unknown: set it to one of "
                            f"{', '.join(ACCUMULATIONS)}")


def _refuse_what_cannot_train(backbone: nn.Module, options: TrainerOptions, device: torch.device) -> None:
    """Stop with one sentence on switches that would fail mid-run or kill the process."""
    if options.compile and getattr(backbone, "checkpointing", False):
        raise UserError("trainer.compile cannot trace backbone.checkpointing's recomputation (which keeps "
                        "BatchNorm's running statistics from counting a batch twice): set one of them to false")
    if options.compile in _CUDA_GRAPH_MODES and options.gradient_acc > 1:
        raise UserError(f"trainer.compile={options.compile} replays CUDA graphs, whose next forward pass overwrites "
                        f"the gradients that trainer.gradient_acc={options.gradient_acc} keeps between micro-batches: "
                        f"use trainer.compile=true or max-autotune-no-cudagraphs, or trainer.gradient_acc=1")
    if device.type != "cpu":
        return
    switches = [name for name, on in (("trainer.compile", bool(options.compile)),
                                      ("backbone.channels_last=true", getattr(backbone, "channels_last", False))) if on]
    layer = cpu_channels_last_crash(backbone) if switches else None
    if layer:
        named = " and ".join(switches)
        raise UserError(f"{named} train{'s' * (len(switches) == 1)} the backbone in channels_last, and training "
                        f"{layer} that way crashes torch's CPU kernels: on the CPU, train without {named}, or widen "
                        f"that layer's input to 16 channels (r_tiny: +backbone.widths=[16,32,64,128])")


class Diverged(UserError):
    """The loss or the weights stopped being finite; nothing non-finite was saved."""


class _RunningStatistics:
    """The buffers a forward pass updates in place (BatchNorm's running statistics, the margin's), saved before each
    step so that a step dropped under on_nonfinite=skip leaves no non-finite value in them either."""

    def __init__(self, *modules: nn.Module):
        self.live = [buffer for module in modules for buffer in module.buffers()]
        self.saved = [buffer.clone() for buffer in self.live]

    def save(self) -> None:
        if self.live:
            torch._foreach_copy_(self.saved, self.live)

    def restore(self) -> None:
        if self.live:
            torch._foreach_copy_(self.live, self.saved)


def _every(step: int, period: int) -> bool:
    """True every `period` steps; a period of 0 switches the action off."""
    return period > 0 and step % period == 0


def _format_eta(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


class Trainer:
    """Trains `backbone` + `head` for `total_steps` optimizer steps over `loader` (which yields uint8 batches)."""

    def __init__(self, backbone: nn.Module, head: nn.Module, optimizer, loader, schedule: PolynomialWarmup, *,
                 env: DistEnv, output_dir: str | Path, options: TrainerOptions,
                 val_sets: dict[str, PairSet] | None = None, tracker=None, stop_request: StopRequest | None = None,
                 backbone_name: str = ""):
        self.backbone, self.head, self.optimizer, self.loader = backbone, head, optimizer, loader
        self.schedule = schedule
        self.env = env
        self.output_dir = Path(output_dir)
        self.options = options
        self.val_sets = val_sets or {}
        self.tracker = tracker or NullTracker()
        self.stop_request = stop_request or StopRequest()
        self.backbone_name = backbone_name
        _refuse_what_cannot_train(backbone, options, env.device)
        self.model = backbone
        self._ddp: DistributedDataParallel | None = None
        if env.world_size > 1:
            ids = [env.device.index] if env.device.type == "cuda" else None
            # Without being told, DDP stops at the second step over parameters that training never gives a gradient;
            # finding them costs a walk over the autograd graph each step, so only backbones that have them pay it.
            unused = bool(getattr(backbone, "unused_parameters", list)())
            self.model = self._ddp = DistributedDataParallel(backbone, device_ids=ids, find_unused_parameters=unused,
                                                             **_RANK_LOCAL_BUFFERS)
            # Each rank's gradient is one term of the global loss's gradient (see sum_allreduce_hook): sum, not mean.
            self._ddp.register_comm_hook(None, sum_allreduce_hook)
        if options.compile:  # training steps only: verification and checkpoints use the backbone itself
            self.model = torch.compile(self.model, mode=None if options.compile is True else options.compile)
        torch.backends.cudnn.benchmark = options.cudnn_benchmark
        use_scaler = needs_loss_scaling(options.precision, env.device)
        self.scaler = torch.amp.GradScaler(env.device.type, growth_interval=100, enabled=use_scaler)
        for group in optimizer.param_groups:
            group.setdefault("initial_lr", group["lr"])
        self.step = 0
        self.skipped_steps = 0
        self.stopped_by: str | None = None  # the signal that ended the run early, if one did
        self.last_checkpoint: tuple[int, Path] | None = None
        self.tracking_run_id: str | None = None  # the MLflow run a resumed run continues
        self.results: dict[str, dict[str, float]] = {}
        self._flags = StepFlags(env.device)
        self._statistics = _RunningStatistics(backbone, head) if options.on_nonfinite == "skip" else None
        self._log_window = (0.0, 0)  # (sum of step losses, steps) since the last progress line

    @property
    def total_steps(self) -> int:
        return self.schedule.total_steps

    @property
    def global_batch(self) -> int:
        """Samples per optimizer step over all ranks: what a step means, so it must survive a resume."""
        return self.loader.batch_size * self.options.gradient_acc * self.env.world_size

    def _generators(self) -> dict[str, torch.Generator]:
        """Named random generators beside the global ones (the Partial FC class sampler)."""
        return {"pfc_sampling": self.head.sampling_generator()} if hasattr(self.head, "sampling_generator") else {}

    def resume(self, path: str | Path) -> None:
        """Continue from a `checkpoint.pt` written by any world size; exactly where it stopped on the same one."""
        state = load_training_state(path, backbone=self.backbone, backbone_name=self.backbone_name, head=self.head,
                                    optimizer=self.optimizer, scaler=self.scaler, global_batch=self.global_batch)
        self.step = int(state["step"])
        self.skipped_steps = int(state.get("skipped_steps", 0))
        self.tracking_run_id = state.get("tracking_run_id")
        self.last_checkpoint = (self.step, Path(path))
        self._log_window = tuple(state.get("log_window", (0.0, 0)))
        streams = state.get("rng")
        if streams is not None and len(streams) == self.env.world_size:
            rng.restore(streams[self.env.rank], self.env.device, self._generators())
            exact = "random streams restored"
        else:
            exact = (f"random streams re-seeded (saved on {len(streams) if streams else '?'} ranks, now "
                     f"{self.env.world_size})")
        if self.env.is_main:
            log.info("resumed from %s at step %d/%d (%s)", path, self.step, self.total_steps, exact)

    def fit(self) -> dict[str, dict[str, float]]:
        """Train to the end, or until a signal (then `stopped_by` names it and a checkpoint holds the state).

        Returns {val_set: {tag: acc}} for the verifications run: "initial", "step<N>", "final" (rank 0; empty
        elsewhere).
        """
        if self.options.verify_at_start and self.step == 0:
            self._verify("initial")
        if self._flags.agree_now(self.stop_request.signal_name is not None):
            self.stopped_by = self.stop_request.signal_name or "a signal on another rank"
        else:
            try:
                self._train()
            finally:
                self.loader.close()
        self._save_checkpoint()
        if self.stopped_by is not None and self.step < self.total_steps:
            return self.results
        self.stopped_by = None  # a signal during the last step: the run is complete anyway
        if self.options.verify_at_end:
            self._verify("final")
        if self.env.is_main:
            path = save_backbone(self.backbone, self.output_dir / "model.pt")
            log.info("saved backbone weights to %s", path)
            if self.options.export_onnx:
                export_after_training(self.backbone, self.backbone_name, self.output_dir, self.tracker)
        barrier()
        return self.results

    def _check_flags(self, *, wait: bool) -> None:
        """Act on the agreed flags: note a stop request, or end a diverged run (on_nonfinite=stop)."""
        stop, first_bad = self._flags.drain() if wait else self._flags.poll()
        if stop and self.stopped_by is None:
            self.stopped_by = self.stop_request.signal_name or "a signal on another rank"
        if first_bad >= 0:
            afresh = "a lower optimizer.lr" + (" or trainer.precision=bf16" * (self.options.precision == "fp16"))
            if self.last_checkpoint is None:
                raise Diverged(f"the loss became non-finite at step {first_bad}, before any checkpoint was written: "
                               f"start afresh with {afresh}, or with trainer.on_nonfinite=skip to drop such steps")
            raise Diverged(f"the loss became non-finite at step {first_bad}; {self.last_checkpoint_note()}: resume "
                           f"from it with trainer.on_nonfinite=skip to drop such steps, or start afresh with {afresh}")

    def last_checkpoint_note(self) -> str:
        if self.last_checkpoint is None:
            return "no checkpoint was written before it"
        step, path = self.last_checkpoint
        return f"the last good checkpoint is {path} (step {step})"

    def _weights_finite(self) -> bool:
        """Every rank's parameters and running statistics are finite (one reduction per rank, agreed across
        ranks)."""
        tensors = [t.detach() for module in (self.backbone, self.head)
                   for t in (*module.parameters(), *module.buffers()) if t.is_floating_point()]
        finite = bool(torch.stack([torch.isfinite(t).all() for t in tensors]).all())
        return not self._flags.agree_now(not finite)

    def _save_checkpoint(self) -> None:
        self._check_flags(wait=True)
        if not self._weights_finite():
            raise Diverged(f"the weights or running statistics are not finite at step {self.step}, so no checkpoint "
                           f"was written; {self.last_checkpoint_note()}: start afresh with a lower optimizer.lr")
        streams = gather_objects(rng.capture(self.env.device, self._generators()))
        window_sum, window_steps = self._log_window
        extra = {"rng": streams, "skipped_steps": self.skipped_steps, "log_window": (float(window_sum), window_steps),
                 "tracking_run_id": getattr(self.tracker, "run_id", None)}
        path = save_training_state(self.output_dir, self.options.keep_checkpoints, backbone=self.backbone,
                                   head=self.head, optimizer=self.optimizer, scaler=self.scaler, step=self.step,
                                   global_batch=self.global_batch, extra=extra)
        self.last_checkpoint = (self.step, self.output_dir / CHECKPOINT_NAME)
        if path is not None:
            log.info("saved training state at step %d to %s", self.step, path)
        barrier()  # nobody reads or rotates the files, or exits, before rank 0 has written them

    def _train(self) -> None:
        opts = self.options
        self.backbone.train()
        self.head.train()
        # Micro-batches are counted across epochs, so a resumed run lands on the batch where it stopped.
        micro = self.step * opts.gradient_acc
        epoch, start_batch = divmod(micro, len(self.loader))
        step_loss = torch.zeros((), device=self.env.device)
        # mean: dividing by the accumulation count keeps the update size independent of it; sum: the reference's.
        divisor = opts.gradient_acc if opts.accumulate == "mean" else 1
        tick, tick_step, start = time.perf_counter(), self.step, time.perf_counter()
        while self.step < self.total_steps:
            self.loader.set_epoch(epoch, start_batch)
            start_batch = 0
            for images, labels in self.loader:
                x = prepare_batch(images, self.env.device, flip=True)
                labels = labels.to(self.env.device, non_blocking=True)
                if self._statistics is not None and micro % opts.gradient_acc == 0:
                    self._statistics.save()
                micro += 1
                last_micro = micro % opts.gradient_acc == 0
                sync = contextlib.nullcontext() if last_micro or self._ddp is None else self._ddp.no_sync()
                with sync:
                    loss = self.head(self.model(x), labels)
                    self.scaler.scale(loss / divisor).backward()
                step_loss += loss.detach() / opts.gradient_acc
                if not last_micro:
                    continue
                lr = self._optimizer_step(step_loss)
                self.step += 1
                self._check_flags(wait=False)
                if _every(self.step, opts.log_every) or self.step == self.total_steps:
                    now = time.perf_counter()
                    self._log_progress(epoch, lr, (self.step - tick_step) / (now - tick), now - start)
                    tick, tick_step = now, self.step
                step_loss = torch.zeros((), device=self.env.device)
                if self.stopped_by is not None or self.step >= self.total_steps:
                    return
                if _every(self.step, opts.verify_every):
                    self._verify(f"step{self.step}")
                if _every(self.step, opts.save_every):
                    self._save_checkpoint()
            epoch += 1

    def _optimizer_step(self, step_loss: torch.Tensor) -> float:
        """Apply the accumulated gradients (or drop them: see trainer.on_nonfinite); returns the step's LR."""
        lr = self.schedule.apply(self.optimizer, self.step)
        skip = self.options.on_nonfinite == "skip"
        if skip and self._flags.agree_now(not bool(torch.isfinite(step_loss))):
            self.optimizer.zero_grad(set_to_none=True)
            self._statistics.restore()
            self.skipped_steps += 1
            log.warning("skipped step %d: the loss is not finite (%d skipped so far)", self.step + 1,
                        self.skipped_steps)
            self._flags.post(self.stop_request.signal_name is not None, None, self.step + 1)
            return lr
        self.scaler.unscale_(self.optimizer)
        agree_on_overflow(self.scaler, self.optimizer)
        if self.options.grad_clip is not None:
            nn.utils.clip_grad_norm_(self.backbone.parameters(), self.options.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self._flags.post(self.stop_request.signal_name is not None, None if skip else step_loss, self.step + 1)
        window_sum, window_steps = self._log_window
        self._log_window = (window_sum + step_loss, window_steps + 1)
        return lr

    def _log_progress(self, epoch: int, lr: float, steps_per_s: float, elapsed: float) -> None:
        window_sum, window_steps = self._log_window
        loss = float(window_sum) / max(window_steps, 1)  # the loss is already the global batch's mean
        self._log_window = (0.0, 0)
        samples_per_s = steps_per_s * self.global_batch
        eta = (self.total_steps - self.step) / max(steps_per_s, 1e-9)
        if self.env.is_main:
            log.info("step %d/%d  epoch %d  loss %.4f  lr %.5f  samples/s %.1f  elapsed %s  eta %s",
                     self.step, self.total_steps, epoch, loss, lr, samples_per_s, _format_eta(elapsed),
                     _format_eta(eta))
        metrics = {"loss": loss, "lr": lr, "samples_per_s": samples_per_s, "epoch": epoch}
        if self.skipped_steps:
            metrics["skipped_steps"] = self.skipped_steps
        self.tracker.log_metrics(metrics, step=self.step)

    def _verify(self, tag: str) -> None:
        """Rank 0 evaluates every pair set; the others wait."""
        if self.env.is_main:
            for name, pairs in self.val_sets.items():
                result = evaluate(self.backbone, pairs, self.options.eval_batch_size, self.env.device,
                                  name=f"{name} [{tag}]", xnorm=self.options.xnorm)
                self.results.setdefault(name, {})[tag] = result.accuracy
                log.info("[%s] %s  accuracy %.4f +- %.4f  xnorm %.3f  val@far=%g %.4f", tag, name, result.accuracy,
                         result.accuracy_std, result.xnorm, result.far_target, result.val)
                self.tracker.log_metrics(result.metrics(name), step=self.step)
        barrier()
