"""Evaluate a backbone file or an ONNX model on pair sets (.bin) and on IJB-B / IJB-C 1:1.

    python tools/eval.py --backbone r50 --checkpoint outputs/.../model.pt --bin data/lfw.bin --bin data/cfp_fp.bin
    python tools/eval.py --onnx r50.onnx --ijb /data/IJB_release --target IJBC
    python tools/eval.py --backbone r100 --checkpoint backbone.pth --ijb /data/IJB_release/IJBB --target IJBB \\
        --run-id RUN_ID

Pair sets: the 10-fold protocol of the verification during training (same code): accuracy +- std, VAL@FAR=1e-3,
XNorm. IJB: images aligned by their five landmarks, f(x) + f(flip x) (times the detector score unless
--no-detector-score), averaged per media, summed per template; TAR at FAR 1e-6 ... 1e-1 and AUC.

Writes a table to stdout and, in --output (default: an `eval` folder beside the weights), results.json and for
IJB the scores in pair-file order (<target>_scores.npy) and the ROC plot (<target>_roc.png). --run-id adds the
metrics (eval/<set>/...), results.json and the plots to that MLflow run (the score file, tens of MB for IJB-C,
stays on disk).
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

import numpy as np

from arcface.engine.tracking import metric_key
from arcface.errors import UserError
from arcface.evaluation import evaluate, load_pair_set
from arcface.evaluation.ijb import TARGETS, evaluate_ijb, read_protocol
from arcface.evaluation.inference import open_network, pick_device
from arcface.evaluation.report import ijb_summary, metrics, pair_set_summary, table
from arcface.evaluation.roc import plot_roc
from arcface.evaluation.run_log import default_tracking_uri, existing_run, log_results
from arcface.fileio import atomic_write, write_text_atomically


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    network = parser.add_argument_group("network (--checkpoint with --backbone, or --onnx)")
    network.add_argument("--backbone", metavar="NAME", help="registry name of the checkpoint's backbone (r50, ...)")
    network.add_argument("--checkpoint", metavar="FILE", help="model.pt, backbone.pth or checkpoint.pt")
    network.add_argument("--onnx", metavar="FILE", help="an ONNX model (tools/export_onnx.py writes one)")
    network.add_argument("--embedding-size", type=int, default=512, help="the checkpoint's embedding size (512)")
    data = parser.add_argument_group("what to evaluate on (one or both)")
    data.add_argument("--bin", action="append", default=[], metavar="FILE.bin", help="a pair set; repeat for more")
    data.add_argument("--ijb", metavar="DIR", help="the IJB release folder (with meta/ and loose_crop/), or its parent")
    data.add_argument("--target", choices=TARGETS, default="IJBC", help="IJB-C or IJB-B (default IJBC)")
    data.add_argument("--no-detector-score", action="store_true", help="IJB: do not weight images by detector score")
    run = parser.add_argument_group("running and output")
    run.add_argument("--batch-size", type=int, default=128)
    run.add_argument("--device", default="auto", help="auto (GPU if any), cpu, cuda, cuda:N")
    run.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1), help="IJB image-loading processes")
    run.add_argument("--output", metavar="DIR", help="where results go (default: eval/ beside the weights)")
    run.add_argument("--run-id", help="an MLflow run to add the results to (e.g. the training run)")
    run.add_argument("--tracking-uri", help="the MLflow store of --run-id (default: mlflow.db in this directory)")
    return parser


def _ijb_outputs(result, output: Path, label: str) -> list[Path]:
    stem = result.target.lower()
    scores = output / f"{stem}_scores.npy"
    with atomic_write(scores) as f:
        np.save(f, result.scores)
    plot = plot_roc({label: result.roc}, output / f"{stem}_roc.png", f"{result.target} 1:1 verification")
    return [scores, plot]


def run(args: argparse.Namespace) -> dict:
    if not args.bin and not args.ijb:
        raise UserError("nothing to evaluate on: give --bin FILE.bin (repeatable) and/or --ijb DIR --target IJBC")
    if args.batch_size < 1:
        raise UserError(f"--batch-size {args.batch_size} must be at least 1")
    weights = Path(args.onnx or args.checkpoint or ".")
    output = Path(args.output) if args.output else weights.parent / "eval"
    # Everything the command line names is read and checked before the network runs on anything.
    missing = next((path for path in args.bin if not Path(path).is_file()), None)
    if missing:
        raise UserError(f"--bin {missing} does not exist: give the path of a pair set (.bin) such as the lfw.bin "
                        f"that InsightFace ships beside train.rec")
    pair_sets = {Path(path).stem: load_pair_set(path) for path in args.bin}
    protocol = read_protocol(args.ijb, args.target) if args.ijb else None
    uri = args.tracking_uri or default_tracking_uri()
    if args.run_id:
        existing_run(uri, args.run_id)
    device = pick_device(args.device)
    network = open_network(backbone=args.backbone, checkpoint=args.checkpoint, onnx=args.onnx,
                           embedding_size=args.embedding_size, device=device)
    label = f"{args.backbone} {weights.name}" if args.checkpoint else weights.name
    summaries: dict = {"network": {"backbone": args.backbone, "checkpoint": args.checkpoint, "onnx": args.onnx,
                                   "device": str(device)}}
    for name, pairs in pair_sets.items():
        result = evaluate(network, pairs, args.batch_size, device, name=name)
        summaries.setdefault("pair_sets", {})[name] = pair_set_summary(result, len(pairs.issame))
    files = []
    if protocol is not None:
        result = evaluate_ijb(network, protocol, batch_size=args.batch_size, device=device, workers=args.workers,
                              detector_score=not args.no_detector_score)
        summaries["ijb"] = {result.target: ijb_summary(result)}
        files += _ijb_outputs(result, output, label)
    results = output / "results.json"
    write_text_atomically(results, json.dumps(summaries, indent=2) + "\n")
    print(table(summaries))
    print(f"results in {results}" + "".join(f", {f}" for f in files))
    if args.run_id:
        log_results(uri, args.run_id, {metric_key(k): v for k, v in metrics(summaries).items()},
                    [results, *[f for f in files if f.suffix == ".png"]])
        print(f"logged to MLflow run {args.run_id} in {uri}")
    return summaries


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    try:
        run(args)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
