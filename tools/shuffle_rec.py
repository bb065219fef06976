"""Write a shuffled copy of a RecordIO folder: OUT_DIR/train.rec + train.idx in the plain layout.

Image records are copied in a seeded random order under new keys 0..N-1 (labels kept); InsightFace header and
identity records are left out, since a shuffled file has no per-identity key ranges. Records stream one at a time,
so memory holds only the index, the image keys and their shuffled order (arrays of 8 bytes per image). The pair
sets (*.bin) beside train.rec are not copied.
"""
from __future__ import annotations

import argparse
import os
import sys

import numpy as np
from tqdm import tqdm

from arcface.data.recordio import PlainWriter, RecordReader, read_layout, replaced_on_success, unpack
from arcface.errors import UserError


def shuffle(src_dir: str, out_dir: str, seed: int) -> int:
    reader = RecordReader(os.path.join(src_dir, "train.rec"), os.path.join(src_dir, "train.idx"))
    keys = read_layout(reader).image_keys
    order = keys[np.random.default_rng(seed).permutation(len(keys))]
    # The .rec first: a crash while they are moved into place leaves no .idx beside a .rec it does not describe.
    outputs = os.path.join(out_dir, "train.rec"), os.path.join(out_dir, "train.idx")
    with replaced_on_success(*outputs) as (rec, idx), PlainWriter(rec, idx) as writer:
        for key in tqdm(order, unit="img", mininterval=1):  # the array itself: a list would take 5x its memory
            header, data = unpack(reader.read(int(key)))
            writer.add(header.label, data)
    return len(order)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("src_dir", help="folder holding train.rec and train.idx")
    parser.add_argument("out_dir", help="output folder (must differ from SRC_DIR)")
    parser.add_argument("--seed", type=int, default=0, help="shuffle seed (default 0)")
    args = parser.parse_args(argv)
    try:
        if os.path.abspath(args.src_dir) == os.path.abspath(args.out_dir):
            raise UserError(f"OUT_DIR {args.out_dir} is SRC_DIR: write the shuffled copy to another folder.")
        os.makedirs(args.out_dir, exist_ok=True)
        count = shuffle(args.src_dir, args.out_dir, args.seed)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {count} shuffled images to {args.out_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
