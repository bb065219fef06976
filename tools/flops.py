"""Parameters and multiply-accumulates (MACs) of backbones for one 112x112 image, counted by torch.

    python tools/flops.py                 # every registered backbone
    python tools/flops.py r50 vit_b convnext_tiny

Units, unambiguously: GMACs = 1e9 multiply-accumulates; GFLOPs = 2 x GMACs (a MAC is a multiply and an add).
Counted with torch.utils.flop_counter.FlopCounterMode over convolutions, matrix products and attention;
elementwise work (BatchNorm, activations, residual adds) is not counted. The reference publishes "GFLOPs" that
are in fact GMACs (counted by ptflops); the `published` column repeats them and `diff` compares with our GMACs.
Models are built on the meta device, so even r2060 and vit_h take no memory and seconds only.
"""
from __future__ import annotations

import argparse
import sys

from arcface.errors import UserError
from arcface.models import list_backbones
from arcface.models.profiling import backbone_stats

# The reference's published "GFLOPs" at 112x112, which are GMACs.
PUBLISHED_GMACS = {"r18": 2.6, "r50": 6.3, "r100": 12.1, "r200": 23.5,
                   "vit_t": 1.5, "vit_s": 5.7, "vit_b": 11.4, "vit_l": 25.3}


def rows(names: list[str], embedding_size: int) -> list[tuple[str, float, float, float, str, str]]:
    out = []
    for name in names:
        params, macs = backbone_stats(name, embedding_size=embedding_size)
        gmacs = macs / 1e9
        published = PUBLISHED_GMACS.get(name)
        diff = f"{100 * (gmacs - published) / published:+.1f}%" if published else ""
        out.append((name, params / 1e6, gmacs, 2 * gmacs, f"{published}" if published else "", diff))
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("names", nargs="*", metavar="NAME",
                        help="registered backbones or timm model names (default: every registered backbone)")
    parser.add_argument("--embedding-size", type=int, default=512, help="embedding width (default 512)")
    args = parser.parse_args(argv)
    names = args.names or list_backbones()
    try:
        table = rows(names, args.embedding_size)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print("| backbone | params (M) | GMACs | GFLOPs (2xMACs) | published GMACs | diff |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, mparams, gmacs, gflops, published, diff in table:
        print(f"| {name} | {mparams:.2f} | {gmacs:.3f} | {gflops:.3f} | {published} | {diff} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
