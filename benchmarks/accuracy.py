"""Open-set accuracy: the project's heads trained on synthetic identities, verified on identities never trained on.

    python tools/benchmark.py accuracy            # 3 seeds, 10k identities, every backbone family's demo preset
    python tools/benchmark.py accuracy --quick    # 1 seed, 2k identities, heads only: one line per variant
    python tools/benchmark.py accuracy --smoke    # seconds: every code path, tiny sizes, numbers meaningless

Head variants train the small vector network of `benchmarks.accuracy_task` with the project's Partial FC, margins,
optimizer builder and LR schedule, composed from conf/ with the overrides shown, and are verified on held-out
pairs with the 10-fold protocol (accuracy, and TAR at FAR=1e-3). Backbone families run `arcface-train
experiment=<their demo preset>` on the synthetic image identities, verified on held-out identities at the start,
midway and at the end. Results: JSON and PNG in --results (the full run also rewrites the "Accuracy" section of
benchmarks/RESULTS.md); every run is a child of one MLflow parent run in --out/mlflow.db.
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from arcface.fileio import atomic_write, write_text_atomically
from benchmarks.machine import load_average, machine, replace_section

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
RESULTS_MD = REPO / "benchmarks" / "RESULTS.md"
SECTION = "## Accuracy"
EXPERIMENT = "accuracy_benchmark"


@dataclass(frozen=True)
class Variant:
    key: str
    name: str
    overrides: list[str] | None  # None: the untrained network


VARIANTS = [
    Variant("random_init", "random init (untrained)", None),
    Variant("arcface_full", "ArcFace, full softmax", ["pfc.rate=1.0"]),
    Variant("arcface_pfc01", "ArcFace, Partial FC 0.1 (default maths)", ["pfc.rate=0.1"]),
    Variant("cosface_pfc01", "CosFace, Partial FC 0.1", ["margin=cosface", "pfc.rate=0.1"]),
    Variant("softmax_pfc01", "softmax s=64 no margin, Partial FC 0.1", ["margin.m2=0", "pfc.rate=0.1"]),
    Variant("arcface_pfc01_reference", "ArcFace, Partial FC 0.1, compat=reference",
            ["pfc.rate=0.1", "compat=reference"]),
    Variant("arcface_pfc01_straight_through", "  ... straight-through margin only",
            ["pfc.rate=0.1", "margin.straight_through=true"]),
    Variant("arcface_pfc01_dense", "  ... dense centre updates only", ["pfc.rate=0.1", "pfc.sparse_update=false"]),
    Variant("arcface_pfc01_bf16", "ArcFace, Partial FC 0.1, bfloat16 centres",
            ["pfc.rate=0.1", "pfc.storage_dtype=bfloat16"]),
]

# family: its demo preset (conf/experiment/)
FAMILIES = {"iresnet": "demo", "mobilefacenet": "demo_mbf", "vit": "demo_vit", "timm": "demo_timm"}
# Smoke-sized image runs: a few steps on a handful of identities.
SMOKE_FAMILY = ["dataset.num_classes=16", "dataset.images_per_class=4", "dataset.val.synthetic_holdout.num_pairs=10",
                "dataset.val.synthetic_holdout.num_identities=4", "trainer.batch_size=8", "trainer.max_steps=2",
                "trainer.num_workers=0", "embedding_size=32"]


# ---- runs ------------------------------------------------------------------------------------------------------

class Sweep:
    """The MLflow parent run of one benchmark run; each variant x seed (and each family run) is a child run."""

    def __init__(self, uri: str, name: str, params: dict):
        from mlflow import MlflowClient

        self.uri = uri
        self.client = MlflowClient(tracking_uri=uri)
        experiment = self.client.get_experiment_by_name(EXPERIMENT)
        self.experiment_id = (experiment.experiment_id if experiment is not None
                              else self.client.create_experiment(EXPERIMENT))
        self.parent = self.client.create_run(self.experiment_id, run_name=name).info.run_id
        self.log(self.parent, params=params)

    def log(self, run_id: str, params: dict | None = None, metrics: list[tuple[str, float, int]] = (),
            tags: dict | None = None) -> None:
        from mlflow.entities import Metric, Param, RunTag

        stamp = int(time.time() * 1000)
        self.client.log_batch(run_id, metrics=[Metric(k, float(v), stamp, int(s)) for k, v, s in metrics],
                              params=[Param(k, str(v)) for k, v in (params or {}).items()],
                              tags=[RunTag(k, str(v)) for k, v in (tags or {}).items()])

    def child(self, name: str, params: dict, metrics: list[tuple[str, float, int]]) -> str:
        run = self.client.create_run(self.experiment_id, run_name=name, tags={"mlflow.parentRunId": self.parent})
        self.log(run.info.run_id, params=params, metrics=metrics)
        self.client.set_terminated(run.info.run_id)
        return run.info.run_id

    def adopt(self, run_name: str) -> str | None:
        """Make the newest run called `run_name` (written by an arcface-train process) a child of this sweep."""
        runs = self.client.search_runs([self.experiment_id], f"tags.mlflow.runName = '{run_name}'",
                                       order_by=["attributes.start_time DESC"], max_results=1)
        if not runs:
            return None
        self.client.set_tag(runs[0].info.run_id, "mlflow.parentRunId", self.parent)
        return runs[0].info.run_id

    def history(self, run_id: str, key: str) -> list[tuple[int, float]]:
        return sorted((m.step, m.value) for m in self.client.get_metric_history(run_id, key))

    def end(self, metrics: list[tuple[str, float, int]]) -> None:
        self.log(self.parent, metrics=metrics)
        self.client.set_terminated(self.parent)


def run_heads(setup, seeds: list[int], sweep: Sweep, variants: list[Variant]) -> dict:
    from benchmarks.accuracy_task import make_data, train_variant

    data = make_data(setup)
    results = {}
    for variant in variants:
        runs = []
        for seed in seeds:
            run = train_variant(variant.overrides, setup, data, seed)
            run["seed"] = seed
            runs.append(run)
            metrics = [(key, point[field], point["step"]) for point in run["curve"]
                       for key, field in (("held_out/acc", "accuracy"), ("held_out/tar_at_far", "tar_at_far"))]
            metrics += [("loss", point["loss"], point["step"]) for point in run["losses"]]
            sweep.child(f"{variant.key}_seed{seed}", {"variant": variant.key, "seed": seed,
                                                      "overrides": " ".join(variant.overrides or ["(untrained)"])},
                        metrics)
        results[variant.key] = summarise_variant(variant, runs)
        print(variant_line(variant, results[variant.key]), flush=True)
    return results


def mean_std(values: list[float]) -> dict:
    """Mean and sample standard deviation over seeds (0 for one seed)."""
    return {"mean": float(np.mean(values)), "std": float(np.std(values, ddof=1)) if len(values) > 1 else 0.0}


def summarise_variant(variant: Variant, runs: list[dict]) -> dict:
    final = [run["curve"][-1] for run in runs]
    return {"name": variant.name, "overrides": variant.overrides, "runs": runs,
            "accuracy": mean_std([f["accuracy"] for f in final]),
            "tar_at_far": mean_std([f["tar_at_far"] for f in final]),
            "train_s_per_seed": float(np.mean([run["train_s"] for run in runs]))}


def variant_line(variant: Variant, result: dict) -> str:
    acc, tar = result["accuracy"], result["tar_at_far"]
    return (f"{variant.key:<32} held-out accuracy {acc['mean']:.4f} +- {acc['std']:.4f}  "
            f"TAR@FAR=1e-3 {tar['mean']:.4f} +- {tar['std']:.4f}  ({result['train_s_per_seed']:.0f} s per seed)")


def family_overrides(preset: str, extra: list[str]) -> tuple[list[str], int, int]:
    """The overrides a family run takes (a verification midway added), its steps and its held-out pairs."""
    from arcface.train import _total_steps
    from benchmarks.accuracy_task import compose_train

    cfg = compose_train([f"experiment={preset}", *extra])
    images = cfg.dataset.num_classes * cfg.dataset.images_per_class
    _, steps = _total_steps(cfg, images, 1, images // cfg.trainer.batch_size)
    overrides = [f"experiment={preset}", *extra, f"trainer.verify_every={max(1, steps // 2)}",
                 "trainer.verify_at_start=true", "trainer.verify_at_end=true"]
    return overrides, steps, cfg.dataset.val.synthetic_holdout.num_pairs


def run_family(family: str, preset: str, extra: list[str], sweep: Sweep, workdir: Path) -> dict:
    """`arcface-train experiment=<preset>` in a process of its own, tracked in the sweep's store."""
    overrides, steps, pairs = family_overrides(preset, extra)
    run_name = f"family_{family}_{os.getpid()}_{time.time_ns()}"
    cmd = [sys.executable, "-m", "arcface.train", *overrides, f"hydra.run.dir={workdir / family}",
           f"tracking.uri={sweep.uri}", f"tracking.experiment_name={EXPERIMENT}", f"tracking.run_name={run_name}"]
    started = time.perf_counter()
    proc = subprocess.run(cmd, cwd=workdir, capture_output=True, text=True)
    result = {"preset": preset, "command": " ".join(["arcface-train", *overrides]), "steps": steps,
              "held_out_pairs": pairs, "wall_s": round(time.perf_counter() - started, 1)}
    run_id = sweep.adopt(run_name)
    if proc.returncode != 0 or run_id is None:
        result["error"] = (proc.stderr.strip().splitlines() or [f"exit status {proc.returncode}"])[-1][:500]
        print(f"{family:<14} {preset:<10} failed: {result['error']}", flush=True)
        return result
    result["curve"] = [{"step": step, "accuracy": acc} for step, acc in sweep.history(run_id, "synthetic_holdout/acc")]
    tars = dict(sweep.history(run_id, "synthetic_holdout/val_at_far"))
    for point in result["curve"]:
        point["tar_at_far"] = tars.get(point["step"])
    losses = sweep.history(run_id, "loss")
    result["loss_first_last"] = [losses[0][1], losses[-1][1]] if losses else None
    accs = [point["accuracy"] for point in result["curve"]]
    print(f"{family:<14} {preset:<10} held-out accuracy {' -> '.join(f'{a:.4f}' for a in accs)} over {steps} steps "
          f"({result['wall_s']:.0f} s)", flush=True)
    return result


# ---- what the numbers show ---------------------------------------------------------------------------------------

def checks(heads: dict, families: dict) -> list[dict]:
    """The claims the benchmark exists to test, each with what was measured and whether it holds."""
    out = []

    def acc(key: str) -> dict | None:
        return heads[key]["accuracy"] if key in heads else None

    def add(claim: str, passed: bool, measured: str) -> None:
        out.append({"claim": claim, "passed": bool(passed), "measured": measured})

    trained, random_init = acc("arcface_pfc01"), acc("random_init")
    if trained and random_init:
        gap = trained["mean"] - random_init["mean"]
        add("trained >> random init on held-out identities (at least 5 points)", gap >= 0.05,
            f"{trained['mean']:.4f} vs {random_init['mean']:.4f}: +{100 * gap:.1f} points")
    full = acc("arcface_full")
    if trained and full:
        gap = trained["mean"] - full["mean"]
        add("Partial FC 0.1 loses at most 1 point against the full softmax", gap >= -0.01,
            f"{trained['mean']:.4f} vs {full['mean']:.4f}: {100 * gap:+.2f} points")
    softmax = acc("softmax_pfc01")
    for key, label in (("arcface_pfc01", "ArcFace"), ("cosface_pfc01", "CosFace")):
        if acc(key) and softmax:
            gap = acc(key)["mean"] - softmax["mean"]
            add(f"{label} beats plain softmax (s=64, no margin)", gap > 0,
                f"{acc(key)['mean']:.4f} vs {softmax['mean']:.4f}: {100 * gap:+.2f} points")
    for key, what in (("arcface_pfc01_reference", "compat=reference"),
                      ("arcface_pfc01_straight_through", "the straight-through margin"),
                      ("arcface_pfc01_dense", "dense centre updates")):
        other = acc(key)
        if trained and other:
            spread = max(trained["std"], other["std"])
            gap = trained["mean"] - other["mean"]
            add(f"defaults equal to or better than {what}, within the seeds' spread", gap >= -spread,
                f"{trained['mean']:.4f} +- {trained['std']:.4f} vs {other['mean']:.4f} +- {other['std']:.4f}: "
                f"{100 * gap:+.2f} points")
    for family, result in families.items():
        curve = result.get("curve") or []
        # Two points: a family's pair set is small (200-600 pairs), so smaller changes are within its noise.
        rises = len(curve) >= 2 and curve[-1]["accuracy"] >= curve[0]["accuracy"] + 0.02
        measured = (" -> ".join(f"{p['accuracy']:.4f}" for p in curve) if curve
                    else result.get("error", "no verification"))
        add(f"{family} ({result['preset']}) learns: held-out accuracy rises by 2 points or more", rises, measured)
    return out


# ---- outputs -------------------------------------------------------------------------------------------------------

def chart(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    heads, families = result["heads"], result["families"]
    panels = 3 if families else 2
    fig, axes = plt.subplots(1, panels, figsize=(6.5 * panels, 5.5))
    keys = list(heads)
    means = [heads[k]["accuracy"]["mean"] for k in keys]
    stds = [heads[k]["accuracy"]["std"] for k in keys]
    ax = axes[0]
    ax.barh(range(len(keys)), means, xerr=stds, color=["grey"] + ["C0"] * (len(keys) - 1), capsize=3)
    ax.set_yticks(range(len(keys)), [heads[k]["name"].strip(" .") for k in keys], fontsize=8)
    ax.invert_yaxis()
    low = min(means) - 0.05
    ax.set_xlim(max(0.0, low), 1.0)
    ax.set_xlabel(f"held-out pair accuracy (mean +- std, {len(result['seeds'])} seeds)")
    for i, (m, s) in enumerate(zip(means, stds)):
        ax.text(m + s + 0.002, i, f"{m:.4f}", va="center", fontsize=7)
    ax = axes[1]
    for key in keys:
        if heads[key]["overrides"] is None:
            continue
        curves = np.array([[p["accuracy"] for p in run["curve"]] for run in heads[key]["runs"]])
        steps = [p["step"] for p in heads[key]["runs"][0]["curve"]]
        ax.plot(steps, curves.mean(axis=0), marker="o", markersize=3, label=heads[key]["name"].strip(" ."))
    ax.set_xlabel("training step")
    ax.set_ylabel("held-out pair accuracy (mean over seeds)")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    if families:
        ax = axes[2]
        for family, fam in families.items():
            if fam.get("curve"):
                ax.plot([p["step"] for p in fam["curve"]], [p["accuracy"] for p in fam["curve"]], marker="o",
                        label=f"{family} (experiment={fam['preset']})")
        ax.set_xlabel("training step")
        ax.set_ylabel("held-out pair accuracy (synthetic images)")
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    setup = result["setup"]
    fig.suptitle(f"Open-set accuracy: {setup['train_identities']:,} training identities x "
                 f"{setup['samples_per_identity']}, {setup['held_out_pairs']:,} held-out pairs of "
                 f"{setup['held_out_identities']:,} other identities", fontsize=10)
    fig.tight_layout()
    with atomic_write(path) as f:
        fig.savefig(f, dpi=100, format="png")
    plt.close(fig)


FAIRNESS = """\
Why this is a fair test of the classifier head: the head (margin, Partial FC sampling, sharded softmax, sparse
centre updates, optimizer, LR schedule) sees only embeddings and labels, so what matters for it is the regime, not
the modality: how many classes ({classes:,}, where sampling 10 % of the centres and leaving the rest untouched is
a real approximation), how few samples each ({samples}, so unsampled centres go stale between updates), and an
embedding that must generalise to identities it never trained on. The synthetic identities give all three at a
size two CPU cores can train several times over: each identity is a point in a 32-d latent space; a sample is that
point moved by intra-class variation and mixed with a 16-d nuisance vector (the analogue of pose and lighting) by
a fixed random tanh network, plus noise. Held-out identities come from the same generator but a different random
stream, and verification is the 10-fold pair protocol of the face benchmarks (arcface.evaluation's code) with
TAR at FAR=1e-3 beside the accuracy. Every variant trains the same small network (Linear-BN-PReLU x2, Linear-BN
embedding) on the same data with the same seeds; only the head's config differs, and it is composed from conf/
and built by the project's own code (PartialFC, the margins, build_optimizer, the scheduler), exactly as
`arcface-train` builds it. What the task cannot show: effects that depend on image backbones (those are the
families' runs above, on synthetic images) or on multi-GPU sharding (the same code paths, covered by the gloo
tests)."""


def section(result: dict) -> str:
    """The "## Accuracy" section of RESULTS.md: self-contained, regenerated by every full run."""
    m, setup = result["machine"], result["setup"]
    lines = [SECTION, "",
             f"Produced by `{result['command']}` on {result['date']} ({result['wall_s'] / 60:.1f} min): "
             f"{m['processor']}, {m['cpus']} cores, torch {m['torch']}; load average {result['load_average'][0]} at "
             f"the start and {result['load_average'][1]} at the end (1/5/15 min; the machine is shared, so the "
             f"seconds below follow its load more than the variants' cost). Raw numbers: "
             f"[results/{result['files']['json']}](results/{result['files']['json']}); MLflow sweep: "
             f"`mlflow ui --backend-store-uri {result['tracking_uri']}`.", "",
             f"![accuracy](results/{result['files']['png']})", "",
             f"**Heads** (seeds {', '.join(map(str, result['seeds']))}; mean +- sample std "
             f"over seeds): {setup['train_identities']:,} training identities x {setup['samples_per_identity']} "
             f"samples, {setup['steps']} steps of batch {setup['batch_size']} (SGD lr 0.1, momentum 0.9, weight "
             f"decay 5e-4, linear decay, gradient clipping 5: conf/'s defaults), embedding {setup['embedding_size']}; "
             f"verified on {setup['held_out_pairs']:,} pairs of {setup['held_out_identities']:,} held-out identities.",
             "", "| variant | overrides | held-out accuracy | TAR@FAR=1e-3 | last loss | s per seed |",
             "|---|---|---:|---:|---:|---:|"]
    for key, head in result["heads"].items():
        acc, tar = head["accuracy"], head["tar_at_far"]
        losses = [run["losses"][-1]["loss"] for run in head["runs"] if run["losses"]]
        loss = f"{np.mean(losses):.2f}" if losses else ""
        overrides = " ".join(f"`{o}`" for o in head["overrides"]) if head["overrides"] is not None else "-"
        lines.append(f"| {head['name'].strip()} | {overrides} | {acc['mean']:.4f} +- {acc['std']:.4f} | "
                     f"{tar['mean']:.4f} +- {tar['std']:.4f} | {loss} | {head['train_s_per_seed']:.0f} |")
    if result["families"]:
        lines += ["", "**Backbone families** (`arcface-train experiment=<preset>` on the synthetic image identities, "
                  "verified on held-out identities at the start, midway and at the end; one seed):", "",
                  "| family | preset | held-out accuracy over training | pairs | steps | wall (s) |",
                  "|---|---|---|---:|---:|---:|"]
        for family, fam in result["families"].items():
            curve = " -> ".join(f"{p['accuracy']:.4f} (step {p['step']})" for p in fam.get("curve", [])) or \
                fam.get("error", "")
            lines.append(f"| {family} | `{fam['preset']}` | {curve} | {fam['held_out_pairs']} | {fam['steps']} | "
                         f"{fam['wall_s']:.0f} |")
    lines += ["", "**What it shows** (each claim checked from the numbers above):", ""]
    lines += [f"- {'holds' if c['passed'] else '**does not hold**'}: {c['claim']} ({c['measured']})"
              for c in result["checks"]]
    lines += ["", FAIRNESS.format(classes=setup["train_identities"], samples=setup["samples_per_identity"]), ""]
    return "\n".join(lines)


def write_outputs(result: dict, results_dir: Path, results_md: Path | None) -> None:
    results_dir.mkdir(parents=True, exist_ok=True)
    write_text_atomically(results_dir / result["files"]["json"], json.dumps(result, indent=1) + "\n")
    chart(result, results_dir / result["files"]["png"])
    if results_md is not None:
        replace_section(results_md, SECTION, section(result))


# ---- entrypoint ------------------------------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="tools/benchmark.py accuracy", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="1 seed, 2,000 identities, no families (a few minutes)")
    size.add_argument("--smoke", action="store_true", help="tiny sizes: checks every code path in seconds")
    parser.add_argument("--seeds", type=int, help="seeds per variant (default 3; --quick and --smoke: 1)")
    parser.add_argument("--families", nargs="*", choices=list(FAMILIES),
                        help="backbone families to train on images (default: all; --quick: none; --smoke: iresnet)")
    parser.add_argument("--results", type=Path,
                        help="folder for accuracy.json/.png (default benchmarks/results; --quick and --smoke write "
                             "accuracy_quick.* / accuracy_smoke.*)")
    parser.add_argument("--results-md", type=Path,
                        help="the RESULTS.md whose Accuracy section to rewrite (default: benchmarks/RESULTS.md for "
                             "the full run, none for --quick and --smoke)")
    parser.add_argument("--out", type=Path, default=Path("outputs/accuracy"),
                        help="working folder: the MLflow store (mlflow.db) and the families' run folders "
                             "(default outputs/accuracy)")
    parser.add_argument("--tracking-uri", help="MLflow store (default sqlite:///<--out>/mlflow.db)")
    parser.add_argument("--render", action="store_true",
                        help="train nothing: redo the checks, the PNG and RESULTS.md from the recorded JSON")
    args = parser.parse_args(argv)
    if args.seeds is not None and args.seeds < 1:
        parser.error(f"--seeds {args.seeds}: at least one seed is needed")
    from benchmarks.accuracy_task import Setup

    setup = Setup.quick() if args.quick else Setup.tiny() if args.smoke else Setup()
    kind = "quick" if args.quick else "smoke" if args.smoke else "full"
    seeds = list(range(args.seeds or (1 if kind != "full" else 3)))
    families = args.families if args.families is not None else \
        {"full": list(FAMILIES), "quick": [], "smoke": ["iresnet"]}[kind]
    stem = "accuracy" if kind == "full" else f"accuracy_{kind}"
    results_dir = args.results or RESULTS
    results_md = args.results_md or (RESULTS_MD if kind == "full" else None)
    if args.render:
        recorded = results_dir / f"{stem}.json"
        if not recorded.is_file():
            parser.error(f"--render: {recorded} does not exist; run the benchmark with the same size options first")
        result = json.loads(recorded.read_text())
        result["checks"] = checks(result["heads"], result["families"])
        write_outputs(result, results_dir, results_md)
        return 0
    args.out.mkdir(parents=True, exist_ok=True)
    uri = args.tracking_uri or f"sqlite:///{args.out.resolve() / 'mlflow.db'}"
    command = " ".join(["python tools/benchmark.py accuracy", *(argv if argv is not None else sys.argv[1:])])
    started, load_start = time.perf_counter(), load_average()
    sweep = Sweep(uri, f"{stem}_{datetime.datetime.now():%Y%m%d_%H%M%S}",
                  {"kind": kind, "seeds": len(seeds), **{k: v for k, v in dataclasses.asdict(setup).items()
                                                          if k != "world"}})
    print(f"# accuracy ({kind}): {setup.train_identities:,} identities, {setup.steps} steps, seeds {seeds}; "
          f"MLflow parent run {sweep.parent} in {uri}", flush=True)
    heads = run_heads(setup, seeds, sweep, VARIANTS)
    family_results = {}
    with tempfile.TemporaryDirectory(dir=args.out, prefix="families_") as workdir:
        for family in families:
            family_results[family] = run_family(family, FAMILIES[family], SMOKE_FAMILY if args.smoke else [],
                                                sweep, Path(workdir))
    result = {
        "command": command, "kind": kind,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": machine(), "load_average": [load_start, load_average()], "tracking_uri": uri,
        "mlflow_parent_run": sweep.parent, "seeds": seeds,
        "setup": {**dataclasses.asdict(setup), "steps": setup.steps},
        "heads": heads, "families": family_results, "files": {"json": f"{stem}.json", "png": f"{stem}.png"},
    }
    result["checks"] = checks(heads, family_results)
    result["wall_s"] = round(time.perf_counter() - started, 1)
    sweep.end([("wall_s", result["wall_s"], 0)] +
              [(f"{key}/acc", head["accuracy"]["mean"], 0) for key, head in heads.items()])
    write_outputs(result, results_dir, results_md)
    for check in result["checks"]:
        print(f"{'holds' if check['passed'] else 'DOES NOT HOLD'}: {check['claim']} ({check['measured']})")
    print(f"# {result['wall_s'] / 60:.1f} min; results in {results_dir / stem}.json/.png"
          f"{f' and {results_md}' if results_md else ''}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
