"""The benchmarks, by suite name: `python tools/benchmark.py SUITE [options]` (`SUITE --help` for its options).

    python tools/benchmark.py gpu --out benchmarks/results/gpu.json     # on a GPU machine, a few minutes
    python tools/benchmark.py accuracy [--quick]                        # held-out accuracy of the heads, CPU
    python tools/benchmark.py speed [--quick]                           # every speed-up as a same-run ratio, CPU
    python tools/benchmark.py gpu --smoke                               # every GPU-suite path, tiny, on CPU
    python tools/benchmark.py backbones r50 --device cuda --precision bf16
    python tools/benchmark.py data_loader --images 2000
    python tools/benchmark.py partial_fc --classes 100000 --name quick
    python tools/benchmark.py evaluation --pairs 1000000 --name quick
"""
from __future__ import annotations

import importlib
import inspect
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # runs from a checkout without installing the package
    sys.path.insert(0, str(REPO))

SUITES = {  # name: (module, one line)
    "accuracy": ("benchmarks.accuracy", "held-out accuracy: heads x 3 seeds, each backbone family's demo (CPU)"),
    "speed": ("benchmarks.speed", "loader, Partial FC, backbone and end-to-end speed, each against its alternative in "
                                  "the same run (CPU)"),
    "gpu": ("benchmarks.gpu", "training step, Partial FC, JPEG decode and host syncs on one GPU (--smoke: CPU)"),
    "backbones": ("benchmarks.backbones", "backbone train/eval images/s and memory, with/without checkpointing"),
    "data_loader": ("benchmarks.data_loader", "decode + augment throughput of the data paths on the CPU"),
    "partial_fc": ("benchmarks.partial_fc", "Partial FC step time and memory vs classes, sparse vs dense (CPU)"),
    "pfc_scaling": ("benchmarks.pfc_scaling", "bytes per collective and step memory of Partial FC at 1-3 gloo ranks"),
    "evaluation": ("benchmarks.evaluation", "10-fold pair-set scores; IJB-C-sized pooling, pair scores, ROC (CPU)"),
}


def usage() -> str:
    lines = [__doc__.strip(), "", "suites:"]
    lines += [f"  {name:<12} {about}" for name, (_, about) in SUITES.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0 if argv else 2
    suite, rest = argv[0], argv[1:]
    if suite not in SUITES:
        print(f"error: unknown suite {suite!r}: choose one of {', '.join(SUITES)}", file=sys.stderr)
        return 2
    module = importlib.import_module(SUITES[suite][0])
    # Some suites read sys.argv themselves; their usage lines then name this entrypoint.
    sys.argv = [f"{Path(__file__).name} {suite}", *rest]
    takes_argv = bool(inspect.signature(module.main).parameters)
    code = module.main(rest) if takes_argv else module.main()
    return code or 0


if __name__ == "__main__":
    sys.exit(main())
