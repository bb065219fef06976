"""The training loop: forward, margin loss, backward, clip, step, schedule; logging, verification, checkpoint."""
from __future__ import annotations

import contextlib
import logging
import math
import time
from pathlib import Path

import torch
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel

from arcface.data.transforms import prepare_batch
from arcface.distributed import DistEnv, barrier, sum_allreduce_hook
from arcface.engine.checkpoint import load_training_state, save_backbone, save_training_state
from arcface.engine.schedule import PolynomialWarmup
from arcface.engine.tracking import NullTracker
from arcface.evaluation import PairSet, evaluate

log = logging.getLogger(__name__)


def _every(step: int, period: int) -> bool:
    """True every `period` steps; a period of 0 switches the action off."""
    return period > 0 and step % period == 0


def _format_eta(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


class Trainer:
    """Trains `backbone` + `head` for `total_steps` optimizer steps over `loader` (which yields uint8 batches)."""

    def __init__(self, backbone: nn.Module, head: nn.Module, optimizer, loader, schedule: PolynomialWarmup, *,
                 env: DistEnv, output_dir: str | Path, val_sets: dict[str, PairSet] | None = None,
                 tracker=None, precision: str = "fp32", gradient_acc: int = 1, grad_clip: float = 5.0,
                 log_every: int = 10, verify_every: int = 2000, verify_at_start: bool = True,
                 eval_batch_size: int = 128, save_every: int = 0, backbone_name: str = ""):
        self.backbone, self.head, self.optimizer, self.loader = backbone, head, optimizer, loader
        self.schedule = schedule
        self.env = env
        self.output_dir = Path(output_dir)
        self.val_sets = val_sets or {}
        self.tracker = tracker or NullTracker()
        self.gradient_acc = gradient_acc
        self.grad_clip = grad_clip
        self.log_every = log_every
        self.verify_every = verify_every
        self.verify_at_start = verify_at_start
        self.eval_batch_size = eval_batch_size
        self.save_every = save_every
        self.backbone_name = backbone_name
        self.model = backbone
        if env.world_size > 1:
            ids = [env.device.index] if env.device.type == "cuda" else None
            self.model = DistributedDataParallel(backbone, device_ids=ids, broadcast_buffers=False)
            # Each rank's gradient is one term of the global loss's gradient (see sum_allreduce_hook): sum, not mean.
            self.model.register_comm_hook(None, sum_allreduce_hook)
        use_scaler = precision == "fp16" and env.device.type == "cuda"
        self.scaler = torch.amp.GradScaler(env.device.type, growth_interval=100, enabled=use_scaler)
        for group in optimizer.param_groups:
            group.setdefault("initial_lr", group["lr"])
        self.step = 0
        self.results: dict[str, dict[str, float]] = {}

    @property
    def total_steps(self) -> int:
        return self.schedule.total_steps

    @property
    def global_batch(self) -> int:
        """Samples per optimizer step over all ranks: what a step means, so it must survive a resume."""
        return self.loader.batch_size * self.gradient_acc * self.env.world_size

    @property
    def checkpoint_path(self) -> Path:
        return self.output_dir / "checkpoint.pt"

    def resume(self, path: str | Path) -> None:
        """Continue from a `checkpoint.pt` written by any world size."""
        self.step = load_training_state(path, backbone=self.backbone, backbone_name=self.backbone_name,
                                        head=self.head, optimizer=self.optimizer, scaler=self.scaler,
                                        global_batch=self.global_batch)
        log.info("resumed from %s at step %d/%d", path, self.step, self.total_steps)

    def fit(self) -> dict[str, dict[str, float]]:
        """Train to the end; returns {val_set: {"initial": acc, "final": acc}} (rank 0; empty elsewhere)."""
        if self.verify_at_start and self.step == 0:
            self._verify("initial")
        self._train()
        self._verify("final")
        self._save_checkpoint()
        if self.env.is_main:
            path = save_backbone(self.backbone, self.output_dir / "model.pt")
            log.info("saved backbone weights to %s", path)
        barrier()
        return self.results

    def _save_checkpoint(self) -> None:
        save_training_state(self.checkpoint_path, backbone=self.backbone, head=self.head, optimizer=self.optimizer,
                            scaler=self.scaler, step=self.step, global_batch=self.global_batch)
        if self.env.is_main:
            log.info("saved training state at step %d to %s", self.step, self.checkpoint_path)

    def _train(self) -> None:
        self.backbone.train()
        self.head.train()
        # Micro-batches are counted across epochs, so a resumed run lands on the batch where it stopped.
        micro = self.step * self.gradient_acc
        epoch, start_batch = divmod(micro, len(self.loader))
        loss_sum, loss_count = torch.zeros((), device=self.env.device), 0
        tick, tick_step, start = time.perf_counter(), self.step, time.perf_counter()
        while self.step < self.total_steps:
            self.loader.set_epoch(epoch, start_batch)
            start_batch = 0
            for images, labels in self.loader:
                x = prepare_batch(images, self.env.device, flip=True)
                labels = labels.to(self.env.device, non_blocking=True)
                micro += 1
                last_micro = micro % self.gradient_acc == 0
                sync = contextlib.nullcontext() if last_micro or self.model is self.backbone else self.model.no_sync()
                with sync:
                    loss = self.head(self.model(x), labels)
                    # Dividing by the accumulation count keeps the update size independent of it.
                    self.scaler.scale(loss / self.gradient_acc).backward()
                loss_sum += loss.detach()
                loss_count += 1
                if not last_micro:
                    continue
                lr = self.schedule.apply(self.optimizer, self.step)
                self.scaler.unscale_(self.optimizer)
                nn.utils.clip_grad_norm_(self.backbone.parameters(), self.grad_clip)
                self.scaler.step(self.optimizer)
                self.scaler.update()
                self.optimizer.zero_grad(set_to_none=True)
                self.step += 1
                if _every(self.step, self.log_every) or self.step == self.total_steps:
                    now = time.perf_counter()
                    mean_loss = float(loss_sum) / loss_count  # the loss is already the global batch's mean
                    self._log_progress(epoch, mean_loss, lr, (self.step - tick_step) / (now - tick), now - start)
                    loss_sum.zero_()
                    loss_count, tick, tick_step = 0, now, self.step
                if _every(self.step, self.verify_every) and self.step < self.total_steps:
                    self._verify(f"step{self.step}")
                if _every(self.step, self.save_every) and self.step < self.total_steps:
                    self._save_checkpoint()
                if self.step >= self.total_steps:
                    return
            epoch += 1

    def _log_progress(self, epoch: int, loss: float, lr: float, steps_per_s: float, elapsed: float) -> None:
        samples_per_s = steps_per_s * self.global_batch
        eta = (self.total_steps - self.step) / max(steps_per_s, 1e-9)
        if not math.isfinite(loss):
            log.warning("loss is %s at step %d: lower optimizer.lr or use trainer.precision=bf16", loss, self.step)
        if self.env.is_main:
            log.info("step %d/%d  epoch %d  loss %.4f  lr %.5f  samples/s %.1f  elapsed %s  eta %s",
                     self.step, self.total_steps, epoch, loss, lr, samples_per_s, _format_eta(elapsed),
                     _format_eta(eta))
        self.tracker.log_metrics({"loss": loss, "lr": lr, "samples_per_s": samples_per_s, "epoch": epoch},
                                 step=self.step)

    def _verify(self, tag: str) -> None:
        """Rank 0 evaluates every pair set; the others wait."""
        if self.env.is_main:
            for name, pairs in self.val_sets.items():
                result = evaluate(self.backbone, pairs, self.eval_batch_size, self.env.device)
                self.results.setdefault(name, {})[tag] = result.accuracy
                log.info("[%s] %s  accuracy %.4f +- %.4f  xnorm %.3f  val@far=%g %.4f", tag, name, result.accuracy,
                         result.accuracy_std, result.xnorm, result.far_target, result.val)
                self.tracker.log_metrics(result.metrics(name), step=self.step)
        barrier()
