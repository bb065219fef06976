"""Bytes each rank sends through collectives and the memory one Partial FC step adds, at 1, 2 and 3 gloo ranks.

    python benchmarks/pfc_scaling.py                       # JSON + Markdown into benchmarks/results/
    python benchmarks/pfc_scaling.py --classes 30000 --name quick

One training step of the head (forward, backward, SGD with momentum) on random embeddings, every point in fresh
processes, for three designs: "sparse" (ours, float32 centres), "sparse_bf16" (ours, `storage_dtype=bfloat16`) and
"dense" (`sparse_update=False` + torch SGD: the reference's dense gradient over every centre). Every
torch.distributed collective the step calls is counted with the size of the tensor this rank hands it (the
payload; what a ring algorithm puts on the wire is derived in docs/scaling.md). Memory: the resident set before the
step (centres and momentum, allocated up front) and the peak during it, per rank.
The numbers check the formulas in docs/scaling.md, which extrapolate them to 64 GPUs x 100M classes.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
from collections import defaultdict
from functools import partial
from pathlib import Path

import psutil
import torch
import torch.distributed as dist
import torch.nn as nn

from arcface.distributed import gather_objects
from arcface.engine.optim import build_optimizer
from arcface.fileio import write_text_atomically
from arcface.heads import CombinedMargin, PartialFC
from arcface.testing import spawn_gloo

RESULTS = Path(__file__).resolve().parent / "results"
MIB = 1024 ** 2
_COUNTED = ("all_gather", "all_reduce", "reduce", "reduce_scatter", "gather", "broadcast", "all_to_all")


def _count_collectives(totals: dict) -> None:
    """Wrap torch.distributed's collectives so each call adds its payload (bytes of this rank's tensor) to totals."""
    for name in _COUNTED:
        original = getattr(dist, name)

        def counted(*args, _name=name, _original=original, **kwargs):
            tensors = [a for a in args if isinstance(a, torch.Tensor)]
            lists = [a for a in args if isinstance(a, list) and a and isinstance(a[0], torch.Tensor)]
            # all_gather(out_list, tensor): the payload is the input tensor; reduce_scatter(out, in_list): the
            # input list; all_reduce(tensor) etc.: the tensor itself.
            payload = lists[-1] if _name == "reduce_scatter" else [tensors[0] if tensors else lists[-1][0]]
            totals[_name]["calls"] += 1
            totals[_name]["bytes"] += sum(t.numel() * t.element_size() for t in payload)
            return _original(*args, **kwargs)

        setattr(dist, name, counted)


def _point(rank: int, world: int, classes: int, batch: int, rate: float, design: str, out: str) -> None:
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    torch.manual_seed(0)
    head = PartialFC(CombinedMargin(), 512, classes, rate=rate, sparse_update=design != "dense",
                     storage_dtype="bfloat16" if design == "sparse_bf16" else "float32")
    backbone = nn.Linear(512, 512, bias=False)
    optimizer = build_optimizer(partial(torch.optim.SGD, lr=0.1, momentum=0.9, weight_decay=5e-4), backbone, head)
    optimizer.state[head.weight]["momentum_buffer"] = torch.zeros_like(head.weight)  # before the step, not in it
    generator = torch.Generator().manual_seed(rank)
    x = torch.randn(batch, 512, generator=generator)
    labels = torch.randint(0, classes, (batch,), generator=generator)
    totals = defaultdict(lambda: {"calls": 0, "bytes": 0})
    dist.barrier()
    before_mib = psutil.Process().memory_info().rss / MIB
    peak_before_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    _count_collectives(totals)
    head(backbone(x), labels).backward()
    optimizer.step()
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    mine = {"rank": rank, "local_rows": head.num_local, "sampled_rows": head.num_sample, "collectives": dict(totals),
            "rss_before_step_mib": round(before_mib), "peak_before_step_mib": round(peak_before_mib),
            "peak_mib": round(peak_mib), "step_peak_over_before_mib": round(peak_mib - before_mib)}
    everyone = gather_objects(mine)
    if rank == 0:
        Path(out).write_text(json.dumps(everyone))


def measure(world: int, classes: int, batch: int, rate: float, design: str) -> dict:
    out = RESULTS / f".scaling-{os.getpid()}.json"
    cmd = [sys.executable, __file__, "--point", str(world), str(classes), str(batch), str(rate), design,
           "--out", str(out)]
    subprocess.run(cmd, check=True)
    ranks = json.loads(out.read_text())
    out.unlink()
    return {"world": world, "classes": classes, "batch_per_rank": batch, "rate": rate, "design": design,
            "ranks": ranks}


def table(result: dict) -> str:
    lines = ["# Partial FC per-step communication and memory (gloo, CPU)", "",
             f"`{result['command']}`: embedding 512, SGD momentum 0.9, one step after the centres and momentum "
             f"exist. Payload = bytes of the tensor this rank hands each collective (rank 0's; every rank's are "
             f"equal). Memory per rank in MiB.", "",
             "| world | design | C | batch/rank | local rows | sampled | all_gather B (calls) | reduce_scatter B (calls) "
             "| all_reduce B (calls) | RSS before step | step peak over it |",
             "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for p in result["points"]:
        r = p["ranks"][0]
        c = r["collectives"]
        cell = {k: f"{c[k]['bytes']:,} ({c[k]['calls']})" if k in c else "0"
                for k in ("all_gather", "reduce_scatter", "all_reduce")}
        lines.append(f"| {p['world']} | {p['design']} | {p['classes']:,} | {p['batch_per_rank']} | "
                     f"{r['local_rows']:,} | {r['sampled_rows']:,} | {cell['all_gather']} | {cell['reduce_scatter']} | "
                     f"{cell['all_reduce']} | "
                     f"{max(q['rss_before_step_mib'] for q in p['ranks'])} | "
                     f"{max(q['step_peak_over_before_mib'] for q in p['ranks'])} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--classes", type=int, default=300_000)
    parser.add_argument("--batch", type=int, default=64, help="samples per rank")
    parser.add_argument("--rate", type=float, default=0.1)
    parser.add_argument("--worlds", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--designs", nargs="+", default=["sparse", "sparse_bf16", "dense"],
                        choices=["sparse", "sparse_bf16", "dense"])
    parser.add_argument("--name", default="pfc_scaling", help="results file stem under benchmarks/results/")
    parser.add_argument("--point", nargs=5, help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.point:
        world, classes, batch, rate, design = args.point
        spawn_gloo(_point, int(world), int(classes), int(batch), float(rate), design, args.out)
        return
    # Checked here, before any process starts: a bad value would otherwise fail inside every spawned rank.
    if not 0.0 <= args.rate <= 1.0:
        parser.error(f"--rate {args.rate}: give a fraction between 0 and 1")
    if args.batch < 1 or min(args.worlds) < 1 or args.classes < max(args.worlds):
        parser.error(f"--batch {args.batch} --worlds {args.worlds} --classes {args.classes}: batch and worlds must "
                     f"be at least 1, and every rank needs a class (--classes at least the largest world)")
    RESULTS.mkdir(parents=True, exist_ok=True)
    points = [measure(world, args.classes, args.batch, args.rate, design)
              for design in args.designs for world in args.worlds]
    result = {"command": " ".join(["python", "benchmarks/pfc_scaling.py", *sys.argv[1:]]), "torch": torch.__version__,
              "points": points}
    write_text_atomically(RESULTS / f"{args.name}.json", json.dumps(result, indent=1) + "\n")
    write_text_atomically(RESULTS / f"{args.name}.md", table(result))
    print(table(result))


if __name__ == "__main__":
    main()
