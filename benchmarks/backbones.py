"""Backbone throughput and memory on this machine: training (forward + backward) and eval images/s at batch 32,
with and without gradient checkpointing and channels_last.

    python benchmarks/backbones.py --out benchmarks/results/backbones.md
    python benchmarks/backbones.py r50 --iters 5 --device cuda --precision bf16

Memory is the peak of tensor bytes allocated during one training step (activations, gradients, temporaries;
not the weights), and the part of it still held for backward when the forward ends. Both are counted by
arcface.models.profiling.PeakMemory, so they are exact on CPU too; on CUDA the allocator's peak is also shown.
"""
from __future__ import annotations

import argparse
import datetime
import sys
import time

import torch

from arcface.models import create_backbone
from arcface.models.profiling import PeakMemory
from arcface.precision import PRECISIONS
from benchmarks.machine import describe, load_average

VARIANTS = {  # name: backbone options
    "plain": {},
    "checkpointing": {"checkpointing": True},
    "channels_last": {"channels_last": True},
}
MB = 2**20


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def train_step(model: torch.nn.Module, x: torch.Tensor) -> None:
    model(x).square().mean().backward()
    model.zero_grad(set_to_none=True)


def timed(fn, device: torch.device) -> float:
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - start


def memory(model: torch.nn.Module, x: torch.Tensor) -> tuple[float, float]:
    """(MB still held for backward when the forward ends, peak MB of the whole step); also the warm-up."""
    with PeakMemory() as mem:
        out = model(x)
        held = mem.current
        out.square().mean().backward()
    model.zero_grad(set_to_none=True)
    return held / MB, mem.peak / MB


def measure(name: str, variants: list[str], args, device: torch.device) -> dict[str, dict]:
    """All variants of one backbone, timed in turns (round-robin) so that load from other processes on a shared
    machine falls on every variant alike; the best of `iters` rounds is kept."""
    x = torch.rand(args.batch, 3, 112, 112, device=device) * 2 - 1
    models, rows = {}, {}
    for v in variants:
        torch.manual_seed(0)
        models[v] = create_backbone(name, precision=args.precision, **VARIANTS[v]).to(device).train()
        held, peak = memory(models[v], x)
        rows[v] = {"held": held, "peak": peak, "train": 0.0, "eval": 0.0}
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
            train_step(models[v], x)
            rows[v]["cuda_peak"] = torch.cuda.max_memory_allocated(device) / MB
    for _ in range(args.iters):
        for v in variants:
            rows[v]["train"] = max(rows[v]["train"], args.batch / timed(lambda: train_step(models[v], x), device))
    with torch.no_grad():
        for v in variants:
            models[v].eval()(x)  # warm-up
        for _ in range(args.iters):
            for v in variants:
                rows[v]["eval"] = max(rows[v]["eval"], args.batch / timed(lambda: models[v](x), device))
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("names", nargs="*", default=["r18", "r50", "mbf", "vit_t"], metavar="NAME")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--iters", type=int, default=3, help="timed rounds; the best is shown")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--precision", default="fp32", choices=list(PRECISIONS))
    parser.add_argument("--out", help="also write the table, command, machine and date to this markdown file")
    args = parser.parse_args(argv)
    device = torch.device(args.device)

    cuda = device.type == "cuda"
    lines = ["| backbone | variant | train img/s | eval img/s | held after forward (MB) | peak fwd+bwd (MB) |"
             + (" CUDA peak (MB) |" if cuda else ""),
             "|---|---|---:|---:|---:|---:|" + ("---:|" if cuda else "")]
    print(lines[0], lines[1], sep="\n", flush=True)
    for name in args.names:
        for variant, r in measure(name, args.variants, args, device).items():
            line = (f"| {name} | {variant} | {r['train']:.1f} | {r['eval']:.1f} | {r['held']:.0f} | {r['peak']:.0f} |"
                    + (f" {r['cuda_peak']:.0f} |" if cuda else ""))
            lines.append(line)
            print(line, flush=True)
    if args.out:
        load = load_average()
        header = [
            "# Backbone benchmark",
            "",
            f"Command: `python tools/benchmark.py backbones {' '.join(argv or sys.argv[1:])}`  ",
            f"Machine: {describe(device)}; torch {torch.__version__}; precision {args.precision}; "
            f"batch {args.batch}; best of {args.iters} rounds, variants timed in turns  ",
            f"Date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC; "
            f"load average at the end (1/5/15 min): {load}",
            "",
        ]
        with open(args.out, "w") as f:
            f.write("\n".join(header + lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
