"""GPU benchmark of the training path, in one run of a few minutes on one GPU.

    python tools/benchmark.py gpu --out benchmarks/results/gpu.json
    python tools/benchmark.py gpu --smoke          # every section on tiny sizes, CPU when there is no GPU
    python tools/benchmark.py gpu --render benchmarks/results/gpu_h200_rerun.json   # summary again, no measuring

Sections (each item prints a line as it finishes and is appended to the JSON at once, so an interrupted run keeps
what it measured; an item that fails records its error and the run goes on; once --budget-s has passed, the
remaining items are recorded as skipped):
- environment: GPU, torch/CUDA versions, commit; the measured peak of a large bf16 and fp16 matmul.
- backbones: a full training step (backbone forward, Partial FC ArcFace loss over 100k classes at rate 1,
  backward, gradient clipping, SGD step; GradScaler with fp16, as the trainer does) at batch 128, for r50/r100/mbf
  in bf16/fp16, NCHW/channels_last, with and without cuDNN autotuning, eager / CUDA-graphed backbone
  (torch.cuda.make_graphed_callables) / torch.compile (default and reduce-overhead): samples/s, peak memory, MFU
  (FLOPs per trained sample = 3 x 2 x forward MACs counted by arcface.models.profiling), compile time, ratio to
  eager fp16 NCHW r50; then the largest r50 bf16 channels_last batch that fits. Each row runs in a fresh process
  (see `in_fresh_process`).
- profile: where the trainer's default GPU step (r50 bf16 channels_last, cuDNN autotuning, batch 128) spends its
  time: wall ms per step against GPU busy ms (the union of kernel intervals), and the top kernels.
- partial_fc: forward + backward + optimizer step of PartialFC alone (embedding 512, batch 128, rate 0.1) at
  1M/4M/16M classes, row-sparse updates vs the dense gradient: step time and peak memory.
- jpeg_decode: batched nvJPEG decode (torchvision.io.decode_jpeg on the GPU) of 112x112 q95 synthetic faces vs the
  project's CPU loader (RecordIO, worker processes) and single-core decoders.
- host_syncs: every place where a training step makes the host wait for the GPU (CUDA sync debug mode, and the
  ops that need values on the host), attributed to lines of the arcface package.
- trainer: `arcface-train` itself (r50, bf16, batch 128, the trainer's GPU defaults) on a RecordIO file of the
  JPEGs: the samples/s it logs after start-up, as it is, with trainer.compile=reduce-overhead, and with
  dataset.loader=device_decode. Needs hydra-core and omegaconf installed.

Item order puts cheap items first and the backbones' torch.compile rows last, so a short budget loses the slowest
items only.
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import functools
import gc
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
import traceback
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn as nn

from arcface.data import decode as decode_module
from arcface.data.decode import decode_rgb, encode_jpeg
from arcface.data.loader import build_loader
from arcface.data.record import RecordDataset
from arcface.data.recordio import InsightFaceWriter
from arcface.data.synthetic import SyntheticIdentities
from arcface.data.transforms import prepare_batch
from arcface.engine.optim import build_optimizer
from arcface.fileio import write_text_atomically
from arcface.heads import CombinedMargin, PartialFC
from arcface.models import create_backbone
from arcface.models.profiling import backbone_stats
from arcface.precision import needs_loss_scaling
from benchmarks.host_syncs import HostReads, cuda_sync_warnings, tally
from benchmarks.training_runs import logged_samples_per_s

REPO = Path(__file__).resolve().parents[1]
SECTIONS = ("matmul", "backbones", "profile", "partial_fc", "jpeg_decode", "host_syncs", "trainer")
GIB = 2**30
EMBEDDING = 512
BASELINE = "r50 eager fp16 NCHW"


@dataclass(frozen=True)
class Variant:
    """One way to train a backbone, as the backbones section times it."""

    backbone: str
    precision: str
    channels_last: bool
    # eager | compiled (torch.compile, default mode) | compiled reduce-overhead (with CUDA graphs) |
    # graphed (the backbone's forward and backward as CUDA graphs: torch.cuda.make_graphed_callables; CUDA only)
    mode: str = "eager"
    cudnn_benchmark: bool = False

    @property
    def name(self) -> str:
        layout = "channels_last" if self.channels_last else "NCHW"
        autotuned = " cudnn.benchmark" if self.cudnn_benchmark else ""
        return f"{self.backbone} {self.mode} {self.precision} {layout}{autotuned}"


@dataclass
class Plan:
    """Sizes of one run: the real ones on a GPU, tiny ones for --smoke."""

    device: torch.device
    compile_backend: str = "inductor"
    backbone_kwargs: dict = field(default_factory=dict)
    matmul: int = 8192
    batch: int = 128
    head_classes: int = 100_000
    warmup: int = 3
    seconds: float = 2.0  # each timed measurement runs steps for about this long
    max_steps: int = 50
    # Cheap first; the first is the baseline. cuDNN's autotuning is on in the trainer (trainer.cudnn_benchmark)
    # and in the reference; the rows without it keep the earlier runs comparable.
    eager: list = field(default_factory=lambda: [
        Variant("r50", "fp16", False), Variant("r50", "fp16", False, cudnn_benchmark=True),
        Variant("r50", "bf16", False), Variant("r50", "bf16", True), Variant("r50", "bf16", True, cudnn_benchmark=True),
        Variant("r50", "bf16", True, "graphed", cudnn_benchmark=True), Variant("r100", "bf16", True),
        Variant("mbf", "bf16", False, cudnn_benchmark=True), Variant("mbf", "bf16", True, cudnn_benchmark=True)])
    compiled: list = field(default_factory=lambda: [
        Variant("r50", "bf16", True, "compiled"), Variant("r50", "bf16", True, "compiled reduce-overhead"),
        Variant("r100", "bf16", True, "compiled")])
    compile_need_s: dict = field(default_factory=lambda: {"r50": 100, "r100": 170})
    big_batches: tuple = (256, 512, 1024, 2048, 4096, 8192)
    pfc_classes: tuple = (1_000_000, 4_000_000, 16_000_000)
    pfc_rate: float = 0.1
    jpegs: int = 256  # distinct synthetic faces; the loader epoch repeats them
    loader_images: int = 16384
    gpu_decode_batches: tuple = (128, 512, 2048)
    sync_backbone: str = "r50"
    sync_classes: int = 1_000_000
    sync_precisions: tuple = ("bf16", "fp16")
    sync_steps: int = 3
    profile: Variant = Variant("r50", "bf16", True, cudnn_benchmark=True)  # the trainer's default on a GPU
    profile_steps: int = 3
    trainer_backbone: str = "r50"
    trainer_overrides: tuple = ()  # on top of every trainer row's
    trainer_steps: int = 200
    trainer_warmup_steps: int = 50
    trainer_variants: tuple = ((), ("trainer.compile=reduce-overhead",), ("dataset.loader=device_decode",))

    @classmethod
    def smoke(cls, device: torch.device) -> "Plan":
        # r_tiny at its default widths (8 channels at full resolution) trained channels_last crashes torch 2.14's
        # CPU kernels; 16 is fine. fp32 stands in for fp16, whose CPU convolutions are ten times slower than bf16's.
        return cls(device, compile_backend="eager", matmul=256, batch=2, head_classes=1000, warmup=0, seconds=0.01,
                   max_steps=2, backbone_kwargs={"widths": (16, 16, 32, 32)},
                   eager=[Variant("r_tiny", "fp32", False), Variant("r_tiny", "bf16", True)],
                   compiled=[Variant("r_tiny", "bf16", True, "compiled")],
                   compile_need_s={"r_tiny": 5}, big_batches=(4,), pfc_classes=(1000, 4000), jpegs=8,
                   loader_images=64, gpu_decode_batches=(8,), sync_backbone="r_tiny", sync_classes=1000,
                   sync_precisions=("bf16",), sync_steps=2,
                   profile=Variant("r_tiny", "bf16", True), profile_steps=1, trainer_backbone="r_tiny",
                   trainer_overrides=("embedding_size=64",), trainer_steps=4, trainer_warmup_steps=1,
                   trainer_variants=((), ("dataset.loader=device_decode",)))


class Report:
    """Results as they come: printed, and the whole JSON rewritten (atomically) after every item."""

    def __init__(self, path: Path, budget_s: float, device: torch.device, header: dict,
                 sections: tuple[str, ...] = SECTIONS):
        self.path, self.budget_s, self.device, self.start = path, budget_s, device, time.perf_counter()
        self.sections = sections
        self.data = {"environment": header, **{s: [] for s in SECTIONS}, "summary": {}}
        self.save()

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def time_left(self) -> float:
        return self.budget_s - self.elapsed()

    def save(self) -> None:
        """JSON and Markdown tables, both complete after every item (a run cut short keeps both)."""
        self.data["summary"] = summarise(self.data)
        self.data["environment"]["elapsed_s"] = round(self.elapsed(), 1)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for path, text in ((self.path, json.dumps(self.data, indent=1, default=str) + "\n"),
                           (self.path.with_suffix(".md"), tables(self.data))):
            write_text_atomically(path, text)

    def item(self, section: str, name: str, fn: Callable[[], dict], need_s: float = 0.0) -> dict:
        """Run one measurement unless the budget is spent; record its result, its error or why it was skipped."""
        if section not in self.sections:
            return {}
        left = self.time_left()
        started = time.perf_counter()
        if left < need_s or left <= 0:
            row = {"name": name, "skipped": f"time budget: {max(left, 0):.0f} s left of --budget-s {self.budget_s:.0f}"
                                            f", this item needs about {need_s:.0f} s"}
        else:
            try:
                row = {"name": name, **fn()}
            except Exception as e:  # one failed measurement must not cost the others
                traceback.print_exc(limit=4)
                row = {"name": name, "error": f"{type(e).__name__}: {str(e).splitlines()[0][:400]}"}
            finally:
                release(self.device)
        row["wall_s"] = round(time.perf_counter() - started, 1)
        self.data[section].append(row)
        self.save()
        shown = {k: v for k, v in row.items() if k != "name" and not isinstance(v, (list, dict))}
        print(f"[{self.elapsed():5.0f} s] {section} | {name} | " + ", ".join(f"{k}={v}" for k, v in shown.items()),
              flush=True)
        return row


def release(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def out_of_memory(error: Exception) -> bool:
    """The allocator's OOM, or a library (cuDNN, cuBLAS) failing to get its workspace."""
    return isinstance(error, torch.OutOfMemoryError) or any(
        s in str(error) for s in ("out of memory", "ALLOC_FAILED", "CUDNN_STATUS_NOT_SUPPORTED"))


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_gib(device: torch.device) -> float | None:
    return round(torch.cuda.max_memory_allocated(device) / GIB, 2) if device.type == "cuda" else None


def seconds_per_call(fn: Callable[[], object], plan: Plan) -> tuple[float, int]:
    """(mean seconds per call, calls timed): calls until about `plan.seconds` have passed, at least 2."""
    sync(plan.device)
    start, calls = time.perf_counter(), 0
    while calls < 2 or (calls < plan.max_steps and time.perf_counter() - start < plan.seconds):
        fn()
        calls += 1
        if calls == 2 or calls % 5 == 0:
            sync(plan.device)  # keep the clock honest without a sync per call
    sync(plan.device)
    return (time.perf_counter() - start) / calls, calls


# ---- environment -----------------------------------------------------------------------------------------------

def commit(given: str | None) -> str:
    if given:
        return given
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True,
                             timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        if out.returncode == 0:
            return out.stdout.strip() + (" (with uncommitted changes)" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        pass
    return "unknown (no git checkout here: pass --commit)"


def environment(plan: Plan, args) -> dict:
    import torchvision

    env = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "commit": commit(args.commit), "python": platform.python_version(), "torch": torch.__version__,
           "torchvision": torchvision.__version__, "cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version(),
           "cpu_cores": os.cpu_count(), "device": str(plan.device), "smoke": args.smoke,
           "peak_tflops_spec": args.peak_tflops, "budget_s": args.budget_s, "command": " ".join(sys.argv)}
    if plan.device.type == "cuda":
        props = torch.cuda.get_device_properties(plan.device)
        env.update(gpu=props.name, gpu_memory_gib=round(props.total_memory / GIB, 1),
                   capability=f"{props.major}.{props.minor}", sms=props.multi_processor_count)
    return env


def bench_matmul(plan: Plan, dtype: torch.dtype) -> dict:
    n = plan.matmul
    a, b = (torch.randn(n, n, device=plan.device, dtype=dtype) for _ in range(2))
    for _ in range(20):  # warm-up: library handles, kernel choice, clocks
        a @ b
    seconds, calls = seconds_per_call(lambda: a @ b, plan)
    return {"n": n, "tflops": round(2 * n**3 / seconds / 1e12, 1), "calls": calls}


# ---- backbones -------------------------------------------------------------------------------------------------

def training_step(model: nn.Module, backbone: nn.Module, head: nn.Module, optimizer, scaler, x, labels) -> Callable:
    """One optimizer step as the trainer takes it (arcface/engine/trainer.py), on a fixed batch."""

    def step() -> torch.Tensor:
        loss = head(model(x), labels)
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
        nn.utils.clip_grad_norm_(backbone.parameters(), 5.0)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        return loss

    return step


def sgd(lr: float = 0.1):
    return partial(torch.optim.SGD, lr=lr, momentum=0.9, weight_decay=5e-4)


class TrainSetup:
    """A variant's backbone (eager, compiled or CUDA-graphed), Partial FC head, optimizer and scaler on the device."""

    def __init__(self, plan: Plan, variant: Variant, classes: int | None = None, rate: float = 1.0):
        torch.manual_seed(0)
        torch.backends.cudnn.benchmark = variant.cudnn_benchmark
        self.device, self.variant = plan.device, variant
        self.backbone = create_backbone(variant.backbone, precision=variant.precision,
                                        channels_last=variant.channels_last, **plan.backbone_kwargs).to(plan.device)
        self.backbone.train()
        self.model = self.backbone
        if variant.mode.startswith("compiled"):
            mode = variant.mode.removeprefix("compiled").strip() or None
            self.model = torch.compile(self.backbone, backend=plan.compile_backend, mode=mode)
        self.classes = classes or plan.head_classes
        self.head = PartialFC(CombinedMargin(), EMBEDDING, self.classes, rate=rate).to(plan.device)
        self.optimizer = build_optimizer(sgd(), self.backbone, self.head)
        # As the trainer: a GradScaler only for fp16 on a GPU.
        self.scaler = torch.amp.GradScaler(plan.device.type,
                                           enabled=needs_loss_scaling(variant.precision, plan.device))

    def batch(self, size: int) -> tuple[torch.Tensor, torch.Tensor]:
        x = torch.rand(size, 3, 112, 112, device=self.device) * 2 - 1
        return x, torch.randint(0, self.classes, (size,), device=self.device)

    def step(self, x: torch.Tensor, labels: torch.Tensor) -> Callable:
        model = self.model
        if self.variant.mode == "graphed":  # captured for this input's shape (after a few warm-up passes)
            model = torch.cuda.make_graphed_callables(self.backbone, (x,))
        step = training_step(model, self.backbone, self.head, self.optimizer, self.scaler, x, labels)
        if not self.variant.mode.endswith("reduce-overhead"):
            return step

        def new_step() -> torch.Tensor:  # the previous step's CUDA-graph outputs may be overwritten now
            torch.compiler.cudagraph_mark_step_begin()
            return step()

        return new_step


@functools.lru_cache(maxsize=None)
def flops_per_sample(name: str, kwargs: tuple = ()) -> float:
    """Training FLOPs per sample: forward MACs x 2 FLOPs x 3 (forward, and backward at twice the forward)."""
    return 3 * 2 * backbone_stats(name, **dict(kwargs))[1]


def mfu_fields(samples_s: float, name: str, plan: Plan, peaks: dict[str, float]) -> dict:
    achieved = samples_s * flops_per_sample(name, tuple(plan.backbone_kwargs.items())) / 1e12
    out = {"tflops": round(achieved, 1)}
    for label, peak in peaks.items():
        if peak:
            out[f"mfu_vs_{label}"] = round(achieved / peak, 3)
    return out


def bench_backbone(plan: Plan, variant: Variant, peaks: dict[str, float]) -> dict:
    setup = TrainSetup(plan, variant)
    step = setup.step(*setup.batch(plan.batch))
    started = time.perf_counter()
    step()
    sync(plan.device)
    first_s = time.perf_counter() - started
    for _ in range(plan.warmup):
        step()
    reset_peak(plan.device)
    seconds, steps = seconds_per_call(step, plan)
    samples_s = plan.batch / seconds
    row = {"batch": plan.batch, "samples_s": round(samples_s, 1), "step_ms": round(1e3 * seconds, 2),
           "steps": steps, "peak_gib": peak_gib(plan.device), **mfu_fields(samples_s, variant.backbone, plan, peaks)}
    if variant.mode.startswith("compiled"):  # the first step compiled forward and backward; one step's time did not
        row["compile_s"] = round(first_s - seconds, 1)
    if variant.mode.endswith("reduce-overhead"):  # torch.compile runs without CUDA graphs where it cannot use them
        from torch._dynamo.utils import counters
        row["cudagraph_skips"] = counters["inductor"]["cudagraph_skips"]  # this process measured this row alone
    return row


def bench_largest_batch(plan: Plan, name: str, peaks: dict[str, float]) -> dict:
    """bf16 channels_last eager at growing batches until one does not fit; every batch that fit is timed."""
    setup = TrainSetup(plan, Variant(name, "bf16", True))
    tried = []
    for batch in plan.big_batches:
        try:
            step = setup.step(*setup.batch(batch))
            for _ in range(1 + plan.warmup):
                step()
            reset_peak(plan.device)
            seconds, _ = seconds_per_call(step, plan)
        except RuntimeError as e:  # torch.OutOfMemoryError is one
            if not out_of_memory(e):
                raise
            setup.optimizer.zero_grad(set_to_none=True)
            step = None
            release(plan.device)
            tried.append({"batch": batch, "fits": False, "error": str(e).splitlines()[0][:160]})
            break
        samples_s = batch / seconds
        tried.append({"batch": batch, "fits": True, "samples_s": round(samples_s, 1), "peak_gib": peak_gib(plan.device),
                      **mfu_fields(samples_s, name, plan, peaks)})
        print(f"         batch {batch}: {samples_s:.0f} samples/s, peak {tried[-1]['peak_gib']} GiB", flush=True)
    fitting = [t for t in tried if t["fits"]]
    best = max(fitting, key=lambda t: t["samples_s"]) if fitting else {}
    return {"largest_batch": fitting[-1]["batch"] if fitting else None, "best_batch": best.get("batch"),
            "best_samples_s": best.get("samples_s"), "best_mfu_vs_spec": best.get("mfu_vs_spec"), "tried": tried}


def busy_us(intervals: list[tuple[float, float]]) -> float:
    """Length of the union of (start, end) intervals: the time at least one of them was running."""
    total, reach = 0.0, float("-inf")
    for start, end in sorted(intervals):
        if end > reach:
            total += end - max(start, reach)
            reach = end
    return total


def bench_profile(plan: Plan, variant: Variant, top: int = 12) -> dict:
    """Where a training step's time goes: wall time per step (unprofiled) against the time the GPU is busy per step
    (profiled: the union of its kernels' intervals), with the kernels that take most of it. Busy well below the
    wall time means the GPU waits for the host to issue work; near it, the kernels themselves are the limit."""
    from torch.profiler import ProfilerActivity, profile

    setup = TrainSetup(plan, variant)
    step = setup.step(*setup.batch(plan.batch))
    for _ in range(1 + plan.warmup):
        step()
    seconds, _ = seconds_per_call(step, plan)
    cuda = plan.device.type == "cuda"
    with profile(activities=[ProfilerActivity.CPU] + [ProfilerActivity.CUDA] * cuda) as prof:
        for _ in range(plan.profile_steps):
            step()
        sync(plan.device)
    row = {"batch": plan.batch, "step_ms": round(1e3 * seconds, 2)}
    steps = plan.profile_steps
    if cuda:
        # Device-side copies of named regions (such as Optimizer.step) span idle gaps: kernels and copies only.
        kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA
                   and not getattr(e, "is_user_annotation", False)]
        busy = busy_us([(e.time_range.start, e.time_range.end) for e in kernels]) / steps
        totals: dict[str, list[float]] = {}
        for e in kernels:
            entry = totals.setdefault(e.name, [0.0, 0])
            entry[0] += e.time_range.elapsed_us()
            entry[1] += 1
        row.update(gpu_busy_ms=round(busy / 1e3, 2), gpu_busy_share=round(busy / 1e3 / row["step_ms"], 3),
                   kernels_per_step=round(len(kernels) / steps), what="GPU kernels, time per step")
        ranked = sorted(totals.items(), key=lambda kv: -kv[1][0])[:top]
        row["top"] = [{"name": name[:100], "ms": round(us / steps / 1e3, 3), "calls": round(calls / steps),
                       "share_of_busy": round(us / steps / busy, 3)} for name, (us, calls) in ranked]
    else:
        ranked = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)[:top]
        row.update(what="CPU ops (self time) per step: no GPU to profile")
        row["top"] = [{"name": e.key[:100], "ms": round(e.self_cpu_time_total / steps / 1e3, 3),
                       "calls": round(e.count / steps)} for e in ranked]
    return row


def in_fresh_process(task: dict, smoke: bool, timeout_s: float) -> dict:
    """Run one backbone measurement in a new Python process and return its row.

    cuDNN keeps the algorithm it chose for each convolution shape for the life of a process, and looks there before
    it looks at cudnn.benchmark; torch.compile keeps its kernels too. Measured in one process, a row would inherit
    the choices of the rows before it, so every backbone row starts from a clean process.
    """
    command = [sys.executable, str(REPO / "tools" / "benchmark.py"), "gpu", *(["--smoke"] * smoke),
               "--child", json.dumps(task)]
    proc = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=timeout_s)
    if proc.returncode != 0:
        lines = proc.stderr.strip().splitlines() or [f"exit status {proc.returncode}"]
        raise RuntimeError(f"the measuring process failed: {lines[-1]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def child_measurement(plan: Plan, task: dict) -> dict:
    """The measurement `in_fresh_process` asked for, run in this (fresh) process."""
    variant = Variant(**task["variant"])
    if task["what"] == "profile":
        return bench_profile(plan, variant)
    return bench_backbone(plan, variant, task["peaks"])


# ---- Partial FC ------------------------------------------------------------------------------------------------

def bench_partial_fc(plan: Plan, head: PartialFC, sparse: bool) -> dict:
    """Step time and peak memory of the head alone (behind a linear layer, so embeddings carry a gradient)."""
    head.sparse_update = sparse  # the same centres under the other gradient design
    backbone = nn.Linear(EMBEDDING, EMBEDDING, bias=False).to(plan.device)
    release(plan.device)
    reset_peak(plan.device)
    optimizer = build_optimizer(sgd(), backbone, head)
    generator = torch.Generator(plan.device).manual_seed(0)
    x = torch.randn(plan.batch, EMBEDDING, device=plan.device, generator=generator)
    labels = torch.randint(0, head.num_classes, (plan.batch,), device=plan.device, generator=generator)

    def step():
        optimizer.zero_grad(set_to_none=True)
        head(backbone(x), labels).backward()
        optimizer.step()

    try:
        step()  # allocates the momentum buffer: not timed
        seconds, steps = seconds_per_call(step, plan)
    except RuntimeError as e:  # torch.OutOfMemoryError is one
        if not out_of_memory(e):
            raise
        return {"fits": False, "peak_gib_before_oom": peak_gib(plan.device)}
    finally:
        head.weight.grad = None
        optimizer.state.clear()
    return {"fits": True, "step_ms": round(1e3 * seconds, 2), "steps": steps, "peak_gib": peak_gib(plan.device),
            "centres_gib": round(head.weight.numel() * 4 / GIB, 2)}


def partial_fc_items(plan: Plan, report: Report) -> None:
    for classes in plan.pfc_classes:
        holder: dict = {}

        def build(classes=classes):
            # Initialised on the CPU (the head's seeded generator), then moved: the CPU copy is freed.
            started = time.perf_counter()
            holder["head"] = PartialFC(CombinedMargin(), EMBEDDING, classes, rate=plan.pfc_rate).to(plan.device)
            return {"init_s": round(time.perf_counter() - started, 1)}

        label = f"{classes:,} classes rate {plan.pfc_rate}"
        need = 4 + classes / 1e6  # mostly the CPU init and the copy
        if "error" in report.item("partial_fc", f"{label}: build", build, need) or "head" not in holder:
            continue
        for sparse in (True, False):
            report.item("partial_fc", f"{label} {'sparse' if sparse else 'dense'}",
                        lambda s=sparse: {"classes": classes, "design": "sparse" if s else "dense",
                                          **bench_partial_fc(plan, holder["head"], s)}, need_s=5)
        holder.clear()
        release(plan.device)


# ---- JPEG decode -----------------------------------------------------------------------------------------------

def synthetic_jpegs(count: int) -> list[bytes]:
    faces = SyntheticIdentities(num_classes=max(1, count // 4), images_per_class=4)
    return [encode_jpeg(np.ascontiguousarray(faces[i][0].permute(1, 2, 0).numpy()), quality=95) for i in range(count)]


def bench_gpu_decode(plan: Plan, jpegs: list[bytes], batch: int) -> dict:
    from torchvision.io import decode_jpeg

    data = [torch.frombuffer(bytearray(jpegs[i % len(jpegs)]), dtype=torch.uint8) for i in range(batch)]
    decode_jpeg(data, device=plan.device)  # warm-up: decoder state, buffers
    seconds, calls = seconds_per_call(lambda: decode_jpeg(data, device=plan.device), plan)
    return {"device": str(plan.device), "batch": batch, "images_s": round(batch / seconds), "calls": calls}


def bench_cpu_decoder(jpegs: list[bytes], decode: Callable[[bytes], object], threads: int, plan: Plan) -> dict:
    """Images/s of `decode` over the JPEGs, in `threads` threads (the decoders release the GIL)."""
    work = jpegs * max(1, 512 // len(jpegs))
    with ThreadPoolExecutor(threads) as pool:
        def epoch():
            list(pool.map(decode, work, chunksize=max(1, len(work) // (4 * threads))))
        epoch()
        seconds, _ = seconds_per_call(epoch, plan)
    return {"threads": threads, "images_s": round(len(work) / seconds)}


def write_face_rec(folder: Path, jpegs: list[bytes], images: int) -> int:
    """train.rec/.idx in `folder`: `images` records cycling over the JPEGs, grouped by label as a dataset's images
    are (labels increasing); returns the number of classes."""
    classes = min(1000, images)
    with InsightFaceWriter(folder / "train.rec", folder / "train.idx") as writer:
        for i in range(images):
            writer.add(i * classes // images, jpegs[i % len(jpegs)])
    return classes


def bench_project_loader(plan: Plan, jpegs: list[bytes], workers: int, loader: str = "torch") -> dict:
    """A training loader over a RecordIO file of the JPEGs: "torch" decodes in worker processes into uint8 batches
    on the CPU, "device_decode" has the workers read and the plan's device decode."""
    with tempfile.TemporaryDirectory() as tmp:
        data = RecordDataset(tmp, num_classes=write_face_rec(Path(tmp), jpegs, plan.loader_images))
        batches = build_loader(data, plan.batch, rank=0, world_size=1, seed=0, num_workers=workers,
                               device=plan.device if loader == "device_decode" else torch.device("cpu"), loader=loader)

        def epoch():
            return sum(len(images) for images, _ in batches)

        epoch()  # worker start-up
        sync(plan.device)
        started = time.perf_counter()
        images = epoch()
        sync(plan.device)
        return {"workers": workers, "images_s": round(images / (time.perf_counter() - started)), "images": images}


def jpeg_items(plan: Plan, report: Report) -> None:
    jpegs: list[bytes] = []

    def make():
        started = time.perf_counter()
        jpegs.extend(synthetic_jpegs(plan.jpegs))
        return {"jpegs": len(jpegs), "mean_kb": round(sum(map(len, jpegs)) / len(jpegs) / 1024, 1),
                "make_s": round(time.perf_counter() - started, 1)}

    report.item("jpeg_decode", "make synthetic-face JPEGs (112x112, q95)", make, need_s=10)
    if not jpegs:
        return
    for batch in plan.gpu_decode_batches:
        report.item("jpeg_decode", f"torchvision.io.decode_jpeg, batched list of {batch}, on {plan.device.type}",
                    lambda b=batch: bench_gpu_decode(plan, jpegs, b), need_s=5)
    decoders = {f"project decode_rgb ({'simplejpeg' if decode_module.simplejpeg else 'PIL'})": decode_rgb}
    try:
        import cv2
        decoders["OpenCV imdecode"] = lambda b: cv2.imdecode(np.frombuffer(b, np.uint8), cv2.IMREAD_COLOR)
    except ImportError:
        pass
    cores = os.cpu_count() or 1
    for name, decode in decoders.items():
        for threads in sorted({1, cores}):
            report.item("jpeg_decode", f"CPU {name}, {threads} threads",
                        lambda d=decode, t=threads: bench_cpu_decoder(jpegs, d, t, plan), need_s=5)
    report.item("jpeg_decode", f"CPU project loader (RecordIO, {cores} worker processes, uint8 batches)",
                lambda: bench_project_loader(plan, jpegs, cores), need_s=15)
    report.item("jpeg_decode", f"project device_decode loader (RecordIO, {cores} worker processes read, "
                               f"{plan.device.type} decodes)",
                lambda: bench_project_loader(plan, jpegs, cores, "device_decode"), need_s=15)


# ---- the trainer itself ----------------------------------------------------------------------------------------

def bench_trainer(plan: Plan, jpegs: list[bytes], overrides: tuple[str, ...], timeout_s: float) -> dict:
    """`arcface-train` on a RecordIO file of the JPEGs, from the reference's base values (no preset; dataset=rec):
    the samples/s it logs once start-up (workers, compilation, cuDNN autotuning) is over."""
    workers = min(8, os.cpu_count() or 1)
    with tempfile.TemporaryDirectory() as tmp:
        classes = write_face_rec(Path(tmp), jpegs, plan.loader_images)
        base = ["~experiment", f"backbone={plan.trainer_backbone}", *plan.trainer_overrides, f"dataset.root={tmp}",
                f"dataset.num_classes={classes}", "trainer.precision=bf16", f"trainer.batch_size={plan.batch}",
                f"trainer.max_steps={plan.trainer_steps}", "trainer.log_every=10", "trainer.verify_at_start=false",
                "trainer.verify_at_end=false", "trainer.save_every=0", f"trainer.num_workers={workers}"]
        measured = logged_samples_per_s([*base, *overrides], Path(tmp) / "run", after_step=plan.trainer_warmup_steps,
                                        timeout_s=timeout_s)
    return {"batch": plan.batch, "workers": workers, **measured}


def trainer_items(plan: Plan, report: Report) -> None:
    """One row per variant, each bounded by the budget left (a hung run must not cost the items after it)."""
    jpegs = synthetic_jpegs(plan.jpegs)
    for overrides in plan.trainer_variants:
        name = f"arcface-train backbone={plan.trainer_backbone} bf16 {' '.join(overrides) or '(defaults)'}"
        compiles = any(o.startswith("trainer.compile") for o in overrides)
        need = 30 + (plan.compile_need_s.get(plan.trainer_backbone, 100) if compiles else 0)
        report.item("trainer", name, lambda o=overrides: bench_trainer(plan, jpegs, o, max(need, report.time_left())),
                    need_s=need)


# ---- host syncs ------------------------------------------------------------------------------------------------

def sync_step(plan: Plan, precision: str) -> tuple[Callable, TrainSetup]:
    """A trainer-like step including the input path: pinned uint8 batch -> device -> prepare_batch."""
    setup = TrainSetup(plan, Variant(plan.sync_backbone, precision, True), classes=plan.sync_classes, rate=0.1)
    images = torch.randint(0, 256, (plan.batch, 3, 112, 112), dtype=torch.uint8)
    labels = torch.randint(0, setup.classes, (plan.batch,))
    if plan.device.type == "cuda":
        images, labels = images.pin_memory(), labels.pin_memory()

    def step():
        x = prepare_batch(images, plan.device, flip=True)
        training_step(setup.model, setup.backbone, setup.head, setup.optimizer, setup.scaler, x,
                      labels.to(plan.device, non_blocking=True))()

    return step, setup


def bench_syncs(plan: Plan, precision: str) -> dict:
    step, _ = sync_step(plan, precision)
    step()  # warm-up outside the capture: one-time set-up (momentum buffers, library handles) is not per step
    sync(plan.device)
    result = {"precision": precision, "steps": plan.sync_steps}
    with HostReads() as reads:
        step()
    result["host_read_ops_per_step"] = tally(reads.sites)
    if plan.device.type == "cuda":
        with cuda_sync_warnings() as sites:
            for _ in range(plan.sync_steps):
                step()
        sync(plan.device)
        result["cuda_syncs_per_step"] = [dict(r, count=r["count"] / plan.sync_steps) for r in tally(sites)]
        result["cuda_syncs_total"] = len(sites) / plan.sync_steps
    else:
        result["cuda_syncs_per_step"] = "not measured: CUDA's sync debug mode needs a GPU"
    result["host_read_ops_total"] = len(reads.sites)
    return result


# ---- summary and tables ----------------------------------------------------------------------------------------

def batch_scaling(data: dict, name: str = "r50 eager bf16 channels_last") -> dict:
    """Step time of `name` against batch: a line fitted to the batches of 512 and more (where the GPU's work sets
    the pace), and how far the batch-128 step lies above it: time that is not the GPU working through the batch."""
    row = next((r for r in data["backbones"] if r["name"] == name and "step_ms" in r), None)
    tried = next((r["tried"] for r in data["backbones"] if r["name"] == f"{name}, largest batch" and "tried" in r), [])
    points = {t["batch"]: 1e3 * t["batch"] / t["samples_s"] for t in tried if t.get("fits")}
    fit = sorted(b for b in points if b >= 512)
    if row is None or len(fit) < 2:
        return {}
    slope, intercept = np.polyfit(fit, [points[b] for b in fit], 1)
    batch = row["batch"]
    return {"fitted_batches": fit, "intercept_ms": round(float(intercept), 2), "ms_per_sample": round(float(slope), 4),
            "samples_s_cap": round(1e3 / float(slope)), f"batch_{batch}_ms": row["step_ms"],
            f"batch_{batch}_above_line_ms": round(row["step_ms"] - float(intercept + slope * batch), 1)}


def summarise(data: dict) -> dict:
    rows = {r["name"]: r for r in data["backbones"] if "samples_s" in r}
    base = rows.get(BASELINE) or next((r for r in data["backbones"] if "samples_s" in r), None)
    if base:
        for r in data["backbones"]:
            if "samples_s" in r:
                r["vs_baseline"] = round(r["samples_s"] / base["samples_s"], 3)
    summary: dict = {"baseline": base["name"] if base else None}
    pfc = {}
    for r in data["partial_fc"]:
        if r.get("fits"):
            pfc.setdefault(r["classes"], {})[r["design"]] = r
    summary["partial_fc_sparse_over_dense"] = {
        f"{c:,}": {"time": round(d["sparse"]["step_ms"] / d["dense"]["step_ms"], 3),
                   "memory": round(d["sparse"]["peak_gib"] / d["dense"]["peak_gib"], 3) if d["sparse"]["peak_gib"]
                   else None}
        for c, d in pfc.items() if "sparse" in d and "dense" in d}
    r50 = [r for n, r in rows.items() if n.startswith("r50 ") and "bf16 channels_last" in n]
    best_r50 = max((r["samples_s"] for r in r50), default=None)
    decode = data["jpeg_decode"]
    rates = {
        "gpu_decode": [r["images_s"] for r in decode if "decode_jpeg" in r["name"] and "images_s" in r],
        "cpu_loader": [r["images_s"] for r in decode if r["name"].startswith("CPU project loader") and "images_s" in r],
        "device_decode_loader": [r["images_s"] for r in decode if "device_decode loader" in r["name"]
                                 and "images_s" in r],
        "cpu_threads": [r["images_s"] for r in decode if r["name"].startswith("CPU ") and r.get("threads", 1) > 1
                        and "images_s" in r],
    }
    best = {k: max(v, default=None) for k, v in rates.items()}
    cpu = best["cpu_loader"] or best["cpu_threads"]
    summary["decode"] = {**{f"{k}_best_images_s": v for k, v in best.items()},
                         "r50_bf16_channels_last_samples_s": best_r50}
    if best["gpu_decode"] and cpu:
        summary["decode"]["gpu_beats_cpu"] = best["gpu_decode"] > cpu
        summary["decode"]["gpu_over_cpu"] = round(best["gpu_decode"] / cpu, 2)
    for k in ("gpu_decode", "cpu_loader", "device_decode_loader"):
        if best[k] and best_r50:
            summary["decode"][f"{k}_feeds_r50"] = best[k] >= best_r50
            summary["decode"][f"{k}_over_r50_rate"] = round(best[k] / best_r50, 2)
    summary["batch_scaling"] = batch_scaling(data)
    return summary


def cell(row: dict, key: str) -> str:
    value = row.get(key)
    return "" if value is None else str(value)


def tables(data: dict) -> str:
    env = data["environment"]
    out = ["# GPU benchmark", "", f"{env.get('gpu', env['device'])}; torch {env['torch']} (CUDA {env['cuda']}, cuDNN "
           f"{env['cudnn']}), torchvision {env['torchvision']}, Python {env['python']}, {env['cpu_cores']} CPU cores; "
           f"commit {env['commit']}; {env['date']}" + ("; SMOKE RUN (tiny sizes)" if env["smoke"] else ""), "",
           f"Command: `{env['command']}`", ""]
    columns = {
        "matmul": ["name", "n", "tflops", "error", "skipped"],
        "backbones": ["name", "batch", "samples_s", "vs_baseline", "step_ms", "peak_gib", "tflops", "mfu_vs_spec",
                      "mfu_vs_measured", "compile_s", "largest_batch", "best_batch", "best_samples_s", "error",
                      "skipped"],
        "partial_fc": ["name", "fits", "step_ms", "peak_gib", "centres_gib", "init_s", "error", "skipped"],
        "jpeg_decode": ["name", "images_s", "mean_kb", "error", "skipped"],
        "profile": ["name", "batch", "step_ms", "gpu_busy_ms", "gpu_busy_share", "kernels_per_step", "error",
                    "skipped"],
        "host_syncs": ["name", "cuda_syncs_total", "host_read_ops_total", "error", "skipped"],
        "trainer": ["name", "batch", "workers", "samples_s", "windows", "error", "skipped"],
    }
    for section, keys in columns.items():
        rows = data[section]
        if not rows:
            out += [f"## {section}", "", "(no items yet)", ""]
            continue
        keys = [k for k in keys if any(k in r for r in rows)]
        out += [f"## {section}", "", "| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
        out += ["| " + " | ".join(cell(r, k) for k in keys) + " |" for r in rows]
        out.append("")
    for r in data["profile"]:
        if "top" in r:
            out += [f"{r['name']}, {r['what']}:", ""] + [
                f"- {t['ms']} ms, {t['calls']} calls" + (f", {t['share_of_busy']:.1%} of busy" if "share_of_busy" in t
                                                         else "") + f": `{t['name']}`" for t in r["top"]] + [""]
    for r in data["host_syncs"]:
        for key in ("cuda_syncs_per_step", "host_read_ops_per_step"):
            if isinstance(r.get(key), list):
                out += [f"{r['name']}, {key}:", ""] + [f"- {s['count']:g} x {s['what']} at {s['where']}"
                                                        for s in r[key]] + [""]
    out += ["## summary", "", "```", json.dumps(data["summary"], indent=1), "```", ""]
    return "\n".join(out)


# ---- driver ----------------------------------------------------------------------------------------------------

def run(plan: Plan, report: Report, peak_spec: float, smoke: bool) -> None:
    peaks = {"spec": peak_spec, "measured": None}
    for dtype in (torch.bfloat16, torch.float16):
        row = report.item("matmul", f"{str(dtype).split('.')[1]} {plan.matmul}^3 matmul",
                          lambda d=dtype: bench_matmul(plan, d), need_s=5)
        if dtype == torch.bfloat16 and "tflops" in row:
            peaks["measured"] = row["tflops"]

    def isolated(section: str, name: str, what: str, variant: Variant, need_s: float) -> None:
        task = {"what": what, "variant": dataclasses.asdict(variant), "peaks": peaks}
        # No longer than the budget has left: a hung process must not cost the items after it.
        report.item(section, name, lambda: in_fresh_process(task, smoke, max(need_s, report.time_left())), need_s)

    for variant in plan.eager:
        isolated("backbones", variant.name, "backbone", variant, need_s=12)
    isolated("profile", f"{plan.profile.name}, batch {plan.batch}", "profile", plan.profile, need_s=15)
    partial_fc_items(plan, report)
    jpeg_items(plan, report)
    for precision in plan.sync_precisions:
        report.item("host_syncs", f"{plan.sync_backbone} {precision} channels_last + PartialFC "
                                  f"{plan.sync_classes:,} classes rate 0.1 + SGD, batch {plan.batch}",
                    lambda p=precision: bench_syncs(plan, p), need_s=10)
    if "trainer" in report.sections:
        trainer_items(plan, report)
    name = plan.eager[0].backbone
    report.item("backbones", f"{name} eager bf16 channels_last, largest batch",
                lambda: bench_largest_batch(plan, name, peaks), need_s=20)
    for variant in plan.compiled:
        isolated("backbones", variant.name, "backbone", variant, need_s=plan.compile_need_s.get(variant.backbone, 100))


def render(path: Path) -> int:
    if not path.is_file():
        print(f"error: --render {path} is not a file: name a JSON written by this benchmark", file=sys.stderr)
        return 2
    data = json.loads(path.read_text())
    for section in SECTIONS:  # runs recorded before the section existed
        data.setdefault(section, [])
    data["summary"] = summarise(data)
    write_text_atomically(path, json.dumps(data, indent=1, default=str) + "\n")
    write_text_atomically(path.with_suffix(".md"), tables(data))
    print(f"rewrote {path} and {path.with_suffix('.md')}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="tools/benchmark.py gpu", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", help="JSON results, rewritten after every item; the tables go beside it as .md "
                                      "(default benchmarks/results/gpu.json, gpu_smoke.json with --smoke)")
    parser.add_argument("--budget-s", type=float, default=420.0,
                        help="after this many seconds the remaining items are skipped (default 420)")
    parser.add_argument("--peak-tflops", type=float, default=989.0,
                        help="dense bf16 peak for MFU (default 989, H100/H200 spec); MFU is also given against the "
                             "bf16 matmul peak measured in the run")
    parser.add_argument("--commit", help="commit to record when git is not available")
    parser.add_argument("--sections", default=",".join(SECTIONS),
                        help=f"comma-separated sections to run (default: all of {','.join(SECTIONS)})")
    parser.add_argument("--smoke", action="store_true",
                        help="tiny sizes (r_tiny, batch 2, 1k classes, 8 JPEGs, torch.compile with the eager "
                             "backend), on CPU when there is no GPU: checks every code path in well under a minute")
    parser.add_argument("--render", metavar="JSON",
                        help="measure nothing: recompute the summary of a recorded run and rewrite its JSON and tables")
    parser.add_argument("--child", help=argparse.SUPPRESS)  # one measurement, for in_fresh_process
    args = parser.parse_args(argv)
    if args.render:
        return render(Path(args.render))
    sections = tuple(args.sections.split(","))
    unknown = sorted(set(sections) - set(SECTIONS))
    if unknown:
        print(f"error: --sections {','.join(unknown)} is unknown: choose from {','.join(SECTIONS)}", file=sys.stderr)
        return 2
    cuda = torch.cuda.is_available()
    if not cuda and not args.smoke:
        print("error: no CUDA device is visible: run this on a GPU machine, or add --smoke for the tiny CPU check",
              file=sys.stderr)
        return 2
    device = torch.device("cuda" if cuda else "cpu")
    # TF32 for whatever still runs in float32 (the head's cosine matmul, the fp32 rows), as a GPU run should.
    torch.set_float32_matmul_precision("high")
    plan = Plan.smoke(device) if args.smoke else Plan(device)
    if args.child:
        print(json.dumps(child_measurement(plan, json.loads(args.child))), flush=True)
        return 0
    out = Path(args.out or REPO / "benchmarks" / "results" / f"gpu{'_smoke' if args.smoke else ''}.json")
    report = Report(out, args.budget_s, device, environment(plan, args), sections)
    env = report.data["environment"]
    print(f"# {env.get('gpu', env['device'])} | torch {env['torch']} CUDA {env['cuda']} | commit {env['commit']} | "
          f"budget {args.budget_s:.0f} s | results -> {out}", flush=True)
    try:
        run(plan, report, args.peak_tflops, args.smoke)
    finally:
        report.save()
        print("\n" + tables(report.data), flush=True)
    return 0
