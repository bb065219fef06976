"""Embeddings of aligned face images (112x112 crops; other sizes are resized) with a checkpoint or an ONNX model.

    python tools/embed.py --backbone r50 --checkpoint outputs/.../model.pt faces/ --output faces.npy
    python tools/embed.py --backbone r50 --checkpoint model.pt alice.jpg bob.jpg       # + similarity and decision
    python tools/embed.py --onnx r50.onnx alice.jpg bob.jpg --threshold 0.35

IMAGE: image files or folders of them (searched recursively, sorted). Each embedding is f(x) + f(flip x) (f(x)
with --no-flip), L2-normalised, as in verification. The .npy holds float32 (N, D) rows in the order listed in the
.txt written beside it. For exactly two images it also prints their cosine similarity and whether they are the
same person at --threshold (calibrate it on your data: cosine = 1 - t/2 for a pair-set threshold t on squared
distances).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

from arcface.errors import UserError
from arcface.evaluation.images import FaceImages, embed_images, list_images
from arcface.evaluation.inference import open_network, pick_device
from arcface.fileio import atomic_write, write_text_atomically

# A usual operating point of ArcFace-trained networks on flip-added embeddings; data-dependent, so an option.
DEFAULT_THRESHOLD = 0.3


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("images", nargs="+", metavar="IMAGE", help="aligned face images, or folders of them")
    parser.add_argument("--backbone", metavar="NAME", help="registry name of the checkpoint's backbone (r50, ...)")
    parser.add_argument("--checkpoint", metavar="FILE", help="model.pt, backbone.pth or checkpoint.pt")
    parser.add_argument("--onnx", metavar="FILE", help="an ONNX model instead of --backbone/--checkpoint")
    parser.add_argument("--embedding-size", type=int, default=512, help="the checkpoint's embedding size (512)")
    parser.add_argument("--output", default="embeddings.npy", metavar="FILE.npy",
                        help="where the embeddings go (default embeddings.npy; the image list beside it as .txt)")
    parser.add_argument("--threshold", type=float, default=DEFAULT_THRESHOLD,
                        help=f"cosine similarity at or above which two images are the same person "
                             f"(default {DEFAULT_THRESHOLD})")
    parser.add_argument("--no-flip", action="store_true", help="embed f(x) only, not f(x) + f(flip x)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--device", default="auto", help="auto (GPU if any), cpu, cuda, cuda:N")
    args = parser.parse_args(argv)
    try:
        if args.batch_size < 1:
            raise UserError(f"--batch-size {args.batch_size} must be at least 1")
        paths = list_images(args.images)
        device = pick_device(args.device)
        network = open_network(backbone=args.backbone, checkpoint=args.checkpoint, onnx=args.onnx,
                               embedding_size=args.embedding_size, device=device)
        raw = embed_images(network, FaceImages(paths), batch_size=args.batch_size, device=device,
                           flip=not args.no_flip, progress="embedding" if len(paths) > args.batch_size else None)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    embeddings = raw / np.maximum(np.linalg.norm(raw, axis=1, keepdims=True), 1e-12)
    output = Path(args.output)
    with atomic_write(output) as f:
        np.save(f, embeddings)
    write_text_atomically(output.with_suffix(".txt"), "".join(f"{p}\n" for p in paths))
    print(f"{len(paths)} embeddings of size {embeddings.shape[1]} in {output} (rows in the order of "
          f"{output.with_suffix('.txt')})")
    if len(paths) == 2:
        similarity = float(embeddings[0] @ embeddings[1])
        verdict = "same person" if similarity >= args.threshold else "different people"
        print(f"cosine similarity {similarity:.4f}: {verdict} at threshold {args.threshold:g}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
