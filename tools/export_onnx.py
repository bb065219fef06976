"""Export a backbone to one self-contained ONNX file, ready for deployment runtimes and an MFR submission.

    python tools/export_onnx.py outputs/.../model.pt --backbone r50 --output r50.onnx
    python tools/export_onnx.py ms1mv3_arcface_r100/backbone.pth --backbone r100 --output r100.onnx
    python tools/export_onnx.py outputs/.../checkpoint.pt --backbone vit_t --output vit_t.onnx --run-id RUN_ID

WEIGHTS: a model.pt (this project's), a reference model-zoo backbone.pth, or a checkpoint.pt (training state).
The model takes `input` (batch, 3, 112, 112) RGB scaled to [-1, 1] as (p - 127.5) / 127.5 and gives `embedding`
(batch, D), not normalised; the batch dimension is free; both facts are in the file's metadata.

After export onnxruntime runs the file on random and on face-like batches: a max difference to PyTorch above 1e-4
(relative to the largest output where that exceeds 1) stops with status 2 and writes nothing. Then the MFR rules
are checked (one (batch, 3, 112, 112) input, one output, <= 1 GB, no initialiser narrower than 32 bits, no NaN/inf
on a batch of 32, CPU latency reported): a broken rule is reported and the status is 1, the file kept.
--run-id logs the model (mlflow.onnx) and the report to that MLflow run.
"""
from __future__ import annotations

import argparse
import sys

from arcface.errors import UserError
from arcface.evaluation.inference import load_backbone
from arcface.evaluation.run_log import default_tracking_uri, existing_run
from arcface.export import OPSET, export_onnx, log_onnx_model


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("weights", metavar="WEIGHTS", help="model.pt, backbone.pth or checkpoint.pt")
    parser.add_argument("--backbone", required=True, metavar="NAME",
                        help="the registry name the weights were trained as (r50, mbf, vit_t, a timm model name, ...)")
    parser.add_argument("--output", required=True, metavar="FILE.onnx", help="the ONNX file to write")
    parser.add_argument("--embedding-size", type=int, default=512, help="the embedding size trained (default 512)")
    parser.add_argument("--opset", type=int, default=OPSET, help=f"ONNX opset (default {OPSET})")
    parser.add_argument("--latency-runs", type=int, default=20, help="timed batch-1 runs for the CPU latency")
    parser.add_argument("--no-mfr-checks", action="store_true", help="check parity with PyTorch only")
    parser.add_argument("--run-id", help="an MLflow run to log the model to (e.g. the training run)")
    parser.add_argument("--tracking-uri", default=None,
                        help="the MLflow store of --run-id (default: sqlite mlflow.db in this directory)")
    args = parser.parse_args(argv)
    uri = args.tracking_uri or default_tracking_uri()
    try:
        if args.latency_runs < 1:
            raise UserError(f"--latency-runs {args.latency_runs} must be at least 1")
        if args.run_id:  # before the export: a wrong run id writes nothing
            existing_run(uri, args.run_id)
        model = load_backbone(args.backbone, args.weights, args.embedding_size)
        report = export_onnx(model, args.output, backbone=args.backbone, opset=args.opset,
                             mfr=not args.no_mfr_checks, latency_runs=args.latency_runs)
        print(report.text())
        if args.run_id:
            log_onnx_model(uri, args.run_id, args.output, report)
            print(f"logged to MLflow run {args.run_id} in {uri}")
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if not report.passed:
        print("the model breaks an MFR submission rule (FAILED above); it still runs in any ONNX runtime",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
