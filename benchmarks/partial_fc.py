"""Partial FC step time and peak memory against the number of classes: sparse row updates vs a dense gradient.

    python benchmarks/partial_fc.py                    # the full sweep; JSON + PNG into benchmarks/results/
    python benchmarks/partial_fc.py --classes 100000 --name quick   # a quick look
    python benchmarks/partial_fc.py --render           # redraw chart and table from the recorded JSON

One step = forward (all-gather, sampling, logits, margin, sharded softmax) + backward + SGD step (momentum 0.9,
weight decay 5e-4), on random embeddings of size 512, 128 per rank. The "dense" design is the same maths with the
centres' gradient dense over all rows, as in the reference (`PartialFC(sparse_update=False)` + torch.optim.SGD);
"sparse_bf16" is the sparse design with the centres and their momentum stored in bfloat16 (`storage_dtype`).
Every point runs in a fresh process (a world of 2 is two spawned gloo processes) so peak RSS is that point's alone;
points run one after another; a point whose memory estimate exceeds the machine (24 GiB) is recorded as not
fitting, and one that exceeds the memory free at that moment as skipped.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from functools import partial
from pathlib import Path

import psutil
import torch
import torch.nn as nn

from arcface.distributed import all_reduce, get_rank, get_world_size
from arcface.engine.optim import build_optimizer
from arcface.fileio import atomic_write, write_text_atomically
from arcface.heads import CombinedMargin, PartialFC
from arcface.testing import spawn_gloo

EMBEDDING, BATCH = 512, 128
GIB = 1024 ** 3
RESULTS = Path(__file__).resolve().parent / "results"


def estimate_gib(classes: int, rate: float, world: int, design: str) -> float:
    """Peak memory of the whole world, from what each rank holds at its peak: its class rows (weight + momentum;
    + the gradient at rate 1 or when dense; + SGD's decayed-gradient copy when dense; + the normalised centres and
    their gradient when dense at rate 1), one buffer of sampled rows, a few (global batch x sampled) logit-sized
    tensors, and ~0.6 GiB of runtime per process."""
    rows = classes / world
    sampled = max(int(rate * rows), BATCH * world)
    # bfloat16 storage: rows of half the size; its sampled rows and their gradient are bfloat16 too.
    copies = {"sparse": 2 + (rate >= 1), "sparse_bf16": 1 + (rate >= 1) / 2, "dense": 4 + 2 * (rate >= 1)}[design]
    per_rank = rows * EMBEDDING * 4 * copies + sampled * EMBEDDING * 4 * (rate < 1) + sampled * BATCH * world * 4 * 4
    return world * (per_rank / GIB + 0.6)


def _run_steps(classes: int, rate: float, design: str, steps: int) -> dict:
    """Build the head and optimizer in this process (rank of the current group) and time `steps` steps."""
    torch.manual_seed(0)
    head = PartialFC(CombinedMargin(), EMBEDDING, classes, rate=rate, sparse_update=design != "dense",
                     storage_dtype="bfloat16" if design == "sparse_bf16" else "float32")
    backbone = nn.Linear(EMBEDDING, EMBEDDING, bias=False)
    optimizer = build_optimizer(partial(torch.optim.SGD, lr=0.1, momentum=0.9, weight_decay=5e-4), backbone, head)
    generator = torch.Generator().manual_seed(get_rank())
    times = []
    for step in range(steps + 1):  # the first step also allocates the momentum buffer: not timed
        x = torch.randn(BATCH, EMBEDDING, generator=generator)
        labels = torch.randint(0, classes, (BATCH,), generator=generator)
        start = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        head(backbone(x), labels).backward()
        optimizer.step()
        if step:
            times.append(time.perf_counter() - start)
    rss = torch.tensor([resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GIB])
    step_s = torch.tensor([statistics.median(times)])
    total = all_reduce(rss.clone())
    return {"step_s": float(all_reduce(step_s, torch.distributed.ReduceOp.MAX)),
            "peak_gib_per_rank": float(all_reduce(rss, torch.distributed.ReduceOp.MAX)),
            "peak_gib_total": float(total), "world": get_world_size()}


def _rank_worker(rank: int, world: int, classes: int, rate: float, design: str, steps: int, out: str) -> None:
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    result = _run_steps(classes, rate, design, steps)
    if rank == 0:
        Path(out).write_text(json.dumps(result))


def run_point(classes: int, rate: float, world: int, design: str, steps: int, out: str) -> None:
    """One point, in this (fresh) process: directly for a world of 1, else in `world` spawned gloo processes."""
    if world == 1:
        Path(out).write_text(json.dumps(_run_steps(classes, rate, design, steps)))
    else:
        spawn_gloo(_rank_worker, world, classes, rate, design, steps, out)


def _load() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def sweep(args) -> dict:
    shared = {"load_average_at_start": _load(), "other_processes_memory_gib_at_start":
              round((psutil.virtual_memory().total - psutil.virtual_memory().available) / GIB, 1)}
    points = []
    for classes in args.classes:
        for rate in args.rates:
            for world in args.worlds:
                for design in args.designs:
                    points.append(measure(classes, rate, world, design, args))
                    print(json.dumps(points[-1]), flush=True)
    return {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
                    "cpus": os.cpu_count(), "memory_gib": round(psutil.virtual_memory().total / GIB, 1),
                    "torch": torch.__version__, "threads_per_rank": "cpus // world",
                    **shared, "load_average_at_end": _load()},
        "setup": {"embedding": EMBEDDING, "batch_per_rank": BATCH, "optimizer": "SGD lr 0.1 momentum 0.9 wd 5e-4",
                  "margin": "ArcFace (1, 0.5, 0) s=64", "steps_timed": args.steps, "budget_gib": args.budget_gib},
        "points": points,
        "summary": summarise(points),
    }


def measure(classes: int, rate: float, world: int, design: str, args) -> dict:
    point = {"classes": classes, "rate": rate, "world": world, "design": design,
             "estimate_gib": round(estimate_gib(classes, rate, world, design), 2)}
    available = psutil.virtual_memory().available / GIB - 0.5
    if point["estimate_gib"] > args.budget_gib:
        point["status"] = "did not fit"
        return point
    if point["estimate_gib"] > available:  # the machine is shared: what others hold now is not ours to use
        point.update(status="skipped: memory in use by other processes", available_gib=round(available, 1))
        return point
    out = RESULTS / f".point-{os.getpid()}.json"
    load_before = _load()
    cmd = [sys.executable, __file__, "--point", str(classes), str(rate), str(world), design, "--steps",
           str(args.steps), "--out", str(out)]
    started = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    point["wall_s"] = round(time.perf_counter() - started, 1)
    point["load_before_after"] = [load_before, _load()]
    if proc.returncode != 0:
        point.update(status="failed", error=(proc.stderr.strip().splitlines() or ["killed"])[-1][:300])
        return point
    point.update(status="ok", **{k: round(v, 3) for k, v in json.loads(out.read_text()).items() if k != "world"})
    out.unlink()
    return point


def summarise(points: list[dict]) -> dict:
    ok = {(p["classes"], p["rate"], p["world"], p["design"]): p for p in points if p["status"] == "ok"}
    ratios = {}
    for (classes, rate, world, design), p in ok.items():
        dense = ok.get((classes, rate, world, "dense"))
        if design == "sparse" and dense:
            ratios[f"C={classes} rate={rate} world={world}"] = {
                "memory_sparse_over_dense": round(p["peak_gib_total"] / dense["peak_gib_total"], 3),
                "time_sparse_over_dense": round(p["step_s"] / dense["step_s"], 3)}
    largest = {}
    for design in ("sparse", "sparse_bf16", "dense"):
        fits = [c for (c, r, w, d), p in ok.items() if d == design and r < 1 and p["peak_gib_total"] <= 24]
        largest[design] = max(fits, default=None)
    return {"sparse_vs_dense": ratios, "largest_classes_within_24_gib_at_rate_below_1": largest}


def chart(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_time, ax_mem) = plt.subplots(1, 2, figsize=(13, 5))
    series = {}
    for p in result["points"]:
        if p["status"] == "ok":
            series.setdefault((p["design"], p["rate"], p["world"]), []).append(p)
    for (design, rate, world), pts in sorted(series.items()):
        label = f"{design} rate {rate} world {world}"
        style = "--" if design == "dense" else "-"
        marker = "o" if world == 1 else "s"
        xs = [p["classes"] for p in pts]
        ax_time.plot(xs, [p["step_s"] for p in pts], style, marker=marker, label=label)
        ax_mem.plot(xs, [p["peak_gib_total"] for p in pts], style, marker=marker, label=label)
    ax_mem.axhline(24, color="grey", linewidth=0.8)
    ax_mem.text(ax_mem.get_xlim()[0], 24.3, "24 GiB machine", color="grey", fontsize=8)
    for ax, ylabel in ((ax_time, "step time (s)"), (ax_mem, "peak RSS, all ranks (GiB)")):
        ax.set_xscale("log")
        ax.set_xlabel("classes")
        ax.set_ylabel(ylabel)
        ax.grid(True, which="both", alpha=0.3)
    ax_time.set_yscale("log")
    ax_time.legend(fontsize=7)
    fig.suptitle(f"Partial FC on CPU ({result['machine']['cpus']} cores): embedding 512, batch 128 per rank, "
                 f"SGD momentum; dashed = dense gradient (reference design)", fontsize=10)
    fig.tight_layout()
    with atomic_write(path) as f:
        fig.savefig(f, dpi=110, format="png")


def table(result: dict) -> str:
    """The sweep as a Markdown table, with the run's command, machine and summary."""
    m = result["machine"]
    lines = ["# Partial FC benchmark", "",
             f"`{result['command']}` on {result['date']}: {m['processor']}, {m['cpus']} cores, {m['memory_gib']} GiB, "
             f"torch {m['torch']}. Shared machine: load average {m['load_average_at_start']} at the start and "
             f"{m['load_average_at_end']} at the end (1/5/15 min), {m['other_processes_memory_gib_at_start']} GiB "
             f"held by other processes at the start.", "",
             f"Setup: {json.dumps(result['setup'])}. Step = forward + backward + optimizer step (median of the timed "
             f"steps, slowest rank); peak = max RSS of each rank's process, summed over ranks.", "",
             "| classes | rate | world | design | step (s) | peak (GiB) | estimate (GiB) | status |",
             "|---:|---:|---:|---|---:|---:|---:|---|"]
    for p in result["points"]:
        lines.append(f"| {p['classes']:,} | {p['rate']} | {p['world']} | {p['design']} | {p.get('step_s', '')} | "
                     f"{p.get('peak_gib_total', '')} | {p['estimate_gib']} | {p['status']} |")
    ratios = result["summary"]["sparse_vs_dense"]
    if ratios:  # only when the run measured both designs at the same points
        lines += ["", "Sparse / dense (same run):", ""]
        lines += [f"- {k}: memory {v['memory_sparse_over_dense']}x, step time {v['time_sparse_over_dense']}x"
                  for k, v in ratios.items()]
    largest = result["summary"]["largest_classes_within_24_gib_at_rate_below_1"]
    measured = ", ".join(f"{design} {classes}" for design, classes in largest.items() if classes is not None)
    lines += ["", f"Largest C measured within 24 GiB at rate 0.1: {measured or 'none'}.",
              "", f"![chart]({result.get('chart', 'partial_fc.png')})", ""]
    return "\n".join(lines)


def write_outputs(result: dict, name: str) -> None:
    result["chart"] = f"{name}.png"
    write_text_atomically(RESULTS / f"{name}.json", json.dumps(result, indent=1) + "\n")
    chart(result, RESULTS / f"{name}.png")
    write_text_atomically(RESULTS / f"{name}.md", table(result))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--classes", type=int, nargs="+", default=[100_000, 1_000_000, 2_000_000, 4_000_000])
    parser.add_argument("--rates", type=float, nargs="+", default=[1.0, 0.1])
    parser.add_argument("--worlds", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--designs", nargs="+", default=["sparse", "dense"],
                        choices=["sparse", "sparse_bf16", "dense"])
    parser.add_argument("--steps", type=int, default=2, help="timed steps per point (after one untimed step)")
    parser.add_argument("--budget-gib", type=float, default=24.0,
                        help="points estimated above this are recorded as not fitting (the machine's memory)")
    parser.add_argument("--name", default="partial_fc", help="results file stem under benchmarks/results/")
    parser.add_argument("--render", action="store_true", help="only redraw chart and table from the JSON")
    parser.add_argument("--point", nargs=4, metavar=("C", "RATE", "WORLD", "DESIGN"), help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.point:
        classes, rate, world, design = args.point
        run_point(int(classes), float(rate), int(world), design, args.steps, args.out)
        return
    recorded = RESULTS / f"{args.name}.json"
    if args.render and not recorded.is_file():
        parser.error(f"--render: {recorded} does not exist; run the sweep with --name {args.name} first")
    # Checked before the sweep: a bad value would otherwise be recorded as a failed point, one after another.
    if not all(0.0 <= rate <= 1.0 for rate in args.rates):
        parser.error(f"--rates {args.rates}: give fractions between 0 and 1")
    if args.steps < 1 or min(args.worlds) < 1 or min(args.classes) < max(args.worlds):
        parser.error(f"--steps {args.steps} --worlds {args.worlds} --classes {args.classes}: steps and worlds must "
                     f"be at least 1, and every rank needs a class (each --classes at least the largest world)")
    RESULTS.mkdir(parents=True, exist_ok=True)
    if args.render:  # redraw the chart and table of a recorded run
        result = json.loads(recorded.read_text())
    else:
        result = sweep(args)
    write_outputs(result, args.name)
    print(json.dumps(result["summary"], indent=1))


if __name__ == "__main__":
    main()
