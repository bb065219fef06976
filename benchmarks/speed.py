"""Speed on this machine, every figure beside its alternative measured in the same run, so each speed-up is a ratio.

    python tools/benchmark.py speed              # about 2 minutes on 2 CPU cores
    python tools/benchmark.py speed --quick      # smaller sizes, no torch.compile: about a minute
    python tools/benchmark.py speed --smoke      # tiny sizes: every code path in seconds, figures meaningless
    python tools/benchmark.py speed --render     # redraw the chart and the RESULTS.md section from the JSON

Four sections, each measured with its own suite's code (no second copy of it here):
- data_loader: images/s into normalised, flipped float batches: the project's batch loader (and its DALI loader,
  where DALI is installed) against the reference's per-image path (PIL decode + torchvision transforms), both
  with the same worker count (benchmarks/data_loader.py).
- partial_fc: step time and peak memory of the head at rate 0.1: row-sparse centre updates against the dense
  gradient of the reference's design, per class count (benchmarks/partial_fc.py, a fresh process per point).
- backbones: samples/s of a whole training step (backbone + Partial FC + SGD, as the trainer takes it) in fp32
  and bf16, eager and torch.compile'd (benchmarks/gpu.py's step, here on the CPU).
- end_to_end: the samples/s that `arcface-train experiment=demo` logs, in fp32 and in bf16 (the trainer with its
  loader, logging and everything else a real run does).

Writes benchmarks/results/speed.json and speed.png, and the "## Speed" section of benchmarks/RESULTS.md (with the
command and the machine). GPU figures come from `python tools/benchmark.py gpu`.
"""
from __future__ import annotations

import argparse
import datetime
import json
import sys
import tempfile
import time
from argparse import Namespace
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from arcface.data import RecordDataset
from arcface.errors import UserError
from arcface.fileio import atomic_write, write_text_atomically
from benchmarks import data_loader, gpu, partial_fc
from benchmarks.machine import describe, load_average, machine, replace_section
from benchmarks.training_runs import logged_samples_per_s

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
RESULTS_MD = REPO / "benchmarks" / "RESULTS.md"
SECTION = "## Speed"
SECTIONS = ("data_loader", "partial_fc", "backbones", "end_to_end")
CPU = torch.device("cpu")


@dataclass
class Sizes:
    images: int = 3000  # data_loader: images in the .rec
    epochs: int = 2  # data_loader: timed epochs per path (their median), after a warm-up epoch
    workers: int = 2
    classes: tuple = (100_000, 1_000_000)  # partial_fc, at rate 0.1
    pfc_steps: int = 2
    backbone: str = "mbf"  # the quickest real backbone on a CPU
    batch: int = 32
    seconds: float = 8.0  # backbones: each variant steps for about this long
    compiled: bool = True
    demo_steps: int = 48  # end_to_end: optimizer steps of the demo, logged every 8

    @classmethod
    def quick(cls) -> "Sizes":
        return cls(images=1000, epochs=1, classes=(100_000,), pfc_steps=1, batch=16, seconds=3.0, compiled=False,
                   demo_steps=24)

    @classmethod
    def smoke(cls) -> "Sizes":
        return cls(images=300, epochs=1, classes=(2000,), pfc_steps=1, batch=2, seconds=0.01, compiled=False,
                   demo_steps=16)


# ---- sections: rows of {"name", value, "baseline" for the row the others are divided by} -----------------------

def bench_data_loader(sizes: Sizes) -> list[dict]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the loaders' own processes and threads are the parallelism under test
    try:
        with tempfile.TemporaryDirectory() as tmp:
            data_loader.make_rec(Path(tmp), sizes.images)
            data = RecordDataset(tmp, num_classes=None)
            rows = [{"name": f"reference per-image path (PIL + torchvision transforms), {sizes.workers} workers",
                     "images_s": data_loader.bench_baseline(data, sizes.workers, sizes.epochs), "baseline": True},
                    {"name": f"project loader + prepare_batch, {sizes.workers} workers",
                     "images_s": data_loader.bench_project(data, sizes.workers, sizes.epochs)}]
            name = f"project DALI loader (CPU, {sizes.workers} threads) + prepare_batch"
            try:
                rows.append({"name": name, "images_s": data_loader.bench_dali_project(data, sizes.epochs)})
            except UserError as error:  # DALI not installed
                rows.append({"name": name, "skipped": str(error)})
    finally:
        torch.set_num_threads(threads)
    return rows


def bench_partial_fc(sizes: Sizes) -> list[dict]:
    args = Namespace(steps=sizes.pfc_steps, budget_gib=24.0)
    rows = []
    for classes in sizes.classes:
        for design in ("dense", "sparse"):
            point = partial_fc.measure(classes, 0.1, 1, design, args)
            what = "dense gradient (reference)" if design == "dense" else "row-sparse"
            row = {"name": f"{classes:,} classes, {what}",
                   "classes": classes, "design": design, "status": point["status"]}
            if point["status"] == "ok":
                row.update(step_s=point["step_s"], peak_gib=point["peak_gib_total"])
            rows.append(row)
    return rows


def bench_backbones(sizes: Sizes) -> list[dict]:
    plan = gpu.Plan(CPU, batch=sizes.batch, head_classes=10_000, warmup=1, seconds=sizes.seconds, max_steps=20)
    variants = [gpu.Variant(sizes.backbone, precision, False) for precision in ("fp32", "bf16")]
    if sizes.compiled:
        variants.append(gpu.Variant(sizes.backbone, "fp32", False, "compiled"))
    rows = []
    for variant in variants:
        measured = gpu.bench_backbone(plan, variant, peaks={})
        rows.append({"name": f"{variant.backbone} {variant.mode} {variant.precision}",
                     "samples_s": measured["samples_s"], "baseline": variant == variants[0],
                     **({"compile_s": measured["compile_s"]} if "compile_s" in measured else {})})
    return rows


def bench_end_to_end(sizes: Sizes) -> list[dict]:
    rows = []
    for precision in ("fp32", "bf16"):
        with tempfile.TemporaryDirectory() as tmp:
            measured = logged_samples_per_s(
                ["experiment=demo", f"trainer.precision={precision}", f"trainer.max_steps={sizes.demo_steps}",
                 "trainer.log_every=8", "trainer.verify_at_start=false", "trainer.verify_at_end=false"],
                tmp, after_step=8, timeout_s=1800)
        rows.append({"name": f"arcface-train experiment=demo, {precision}", **measured,
                     "baseline": precision == "fp32"})
    return rows


BENCHES = {"data_loader": bench_data_loader, "partial_fc": bench_partial_fc, "backbones": bench_backbones,
           "end_to_end": bench_end_to_end}


# ---- ratios, chart, table ----------------------------------------------------------------------------------------

def ratios(sections: dict[str, list[dict]]) -> list[dict]:
    """Each speed-up claim of the run: {"section", "claim", "ratio", "figures"}, the ratio of two of its figures."""
    out = []
    for section in ("data_loader", "backbones", "end_to_end"):
        rows = [r for r in sections.get(section, []) if "skipped" not in r and "error" not in r]
        base = next((r for r in rows if r.get("baseline")), None)
        key = "images_s" if section == "data_loader" else "samples_s"
        for row in rows:
            if base is not None and row is not base:
                out.append({"section": section, "claim": f"{row['name']} / {base['name']}",
                            "ratio": row[key] / base[key],
                            "figures": f"{row[key]:,.0f} vs {base[key]:,.0f} {key.replace('_', '/')}"})
    points = {(r["classes"], r["design"]): r for r in sections.get("partial_fc", []) if r.get("status") == "ok"}
    for (classes, design), sparse in points.items():
        dense = points.get((classes, "dense"))
        if design == "sparse" and dense:
            for what, key, unit in (("step time", "step_s", "s"), ("peak memory", "peak_gib", "GiB")):
                out.append({"section": "partial_fc",
                            "claim": f"row-sparse / dense {what} at {classes:,} classes, rate 0.1",
                            "ratio": sparse[key] / dense[key],
                            "figures": f"{sparse[key]:.3f} vs {dense[key]:.3f} {unit}"})
    return out


def claim_line(claim: dict) -> str:
    return f"{claim['section']}: {claim['claim']}: {claim['ratio']:.2f}x ({claim['figures']})"


def chart(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(15, 8))
    panels = {"data_loader": ("images_s", "images/s"), "partial_fc": ("step_s", "step time (s)"),
              "backbones": ("samples_s", "training samples/s"), "end_to_end": ("samples_s", "samples/s (logged)")}
    for ax, (section, (key, label)) in zip(axes.flat, panels.items()):
        rows = [r for r in result["sections"].get(section, []) if key in r]
        ax.barh([r["name"] for r in rows], [r[key] for r in rows],
                color=["grey" if r.get("baseline") or r.get("design") == "dense" else "tab:blue" for r in rows])
        for i, r in enumerate(rows):
            ax.text(r[key], i, f" {r[key]:,.0f}" if r[key] >= 100 else f" {r[key]:.3g}", va="center", fontsize=8)
        ax.set_title(section)
        ax.set_xlabel(label)
        ax.tick_params(axis="y", labelsize=8)
        ax.invert_yaxis()
    fig.suptitle(f"Speed on {result['machine_line']} (grey: the alternative each figure is compared with)",
                 fontsize=10)
    fig.tight_layout()
    with atomic_write(path) as f:
        fig.savefig(f, dpi=100, format="png")


def _value(row: dict) -> str:
    if "skipped" in row or "error" in row:
        return row.get("skipped") or row["error"]
    if "step_s" in row:
        return f"{row['step_s']:.3f} s per step, peak {row['peak_gib']:.2f} GiB"
    if row.get("status", "ok") != "ok":
        return row["status"]
    value = row.get("images_s", row.get("samples_s"))
    unit = "images/s" if "images_s" in row else "samples/s"
    return f"{value:,.0f} {unit}" + (f" (compiling took {row['compile_s']:.0f} s)" if "compile_s" in row else "")


def section(result: dict) -> str:
    lines = [SECTION, "",
             f"Produced by `{result['command']}` on {result['date']} ({result['minutes']:.1f} min): "
             f"{result['machine_line']}, torch {result['machine']['torch']}; load average "
             f"{result['load_average'][0]} at the start and {result['load_average'][1]} at the end (1/5/15 min; on a "
             f"shared machine absolute figures follow its load; the ratios less, as the two sides of each ran one "
             f"after the other). Raw numbers: [results/speed.json](results/speed.json); sizes: "
             f"{json.dumps(result['sizes'])}.", "",
             "![speed](results/speed.png)", ""]
    for name in SECTIONS:
        rows = result["sections"].get(name)
        if rows:
            lines += [f"**{name}**", "", "| measured | result |", "|---|---|"]
            lines += [f"| {r['name']}{' (baseline)' if r.get('baseline') else ''} | {_value(r)} |" for r in rows]
            lines.append("")
    lines += ["**Speed-ups, each a ratio of two figures of this run:**", ""]
    lines += [f"- {claim_line(claim)}" for claim in result["ratios"]] + [""]
    lines += ["GPU figures (H200: backbones in bf16/fp16, channels_last, compiled, Partial FC at 1M-16M classes, "
              "nvJPEG decode, host syncs per step) are in [results/gpu_h200.md](results/gpu_h200.md), "
              "[results/gpu_h200_rerun.md](results/gpu_h200_rerun.md) and "
              "[results/gpu_h200_notes.md](results/gpu_h200_notes.md), from `python tools/benchmark.py gpu`.", ""]
    return "\n".join(lines)


def write_outputs(result: dict, results_dir: Path, results_md: Path | None) -> None:
    results_dir.mkdir(parents=True, exist_ok=True)
    write_text_atomically(results_dir / "speed.json", json.dumps(result, indent=1) + "\n")
    chart(result, results_dir / "speed.png")
    if results_md is not None:
        replace_section(results_md, SECTION, section(result))


# ---- entrypoint ------------------------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="smaller sizes and no torch.compile (about a minute)")
    size.add_argument("--smoke", action="store_true", help="tiny sizes: checks every code path in seconds")
    parser.add_argument("--sections", nargs="+", default=list(SECTIONS), choices=SECTIONS)
    parser.add_argument("--results", type=Path, default=RESULTS, help="folder of speed.json and speed.png")
    parser.add_argument("--results-md", type=Path, default=RESULTS_MD, help="file whose Speed section is rewritten")
    parser.add_argument("--render", action="store_true", help="only redraw chart and section from the recorded JSON")
    args = parser.parse_args(argv)
    recorded = args.results / "speed.json"
    if args.render:
        if not recorded.is_file():
            parser.error(f"--render: {recorded} does not exist; run `python tools/benchmark.py speed` first")
        write_outputs(json.loads(recorded.read_text()), args.results, args.results_md)
        return 0
    sizes = Sizes.quick() if args.quick else Sizes.smoke() if args.smoke else Sizes()
    started, load_start = time.perf_counter(), load_average()
    sections = {}
    for name in args.sections:
        print(f"[{time.perf_counter() - started:5.0f} s] {name} ...", flush=True)
        sections[name] = BENCHES[name](sizes)
        for row in sections[name]:
            print(f"    {row['name']:<72} {_value(row)}", flush=True)
    result = {"command": " ".join(["python tools/benchmark.py speed", *(argv if argv is not None else sys.argv[1:])]),
              "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "minutes": (time.perf_counter() - started) / 60, "machine": machine(), "machine_line": describe(CPU),
              "load_average": [load_start, load_average()], "sizes": asdict(sizes), "sections": sections,
              "ratios": ratios(sections)}
    write_outputs(result, args.results, args.results_md)
    print("\n".join(claim_line(claim) for claim in result["ratios"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
