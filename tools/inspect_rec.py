"""Inspect a RecordIO folder (DIR/train.rec + train.idx): layout, image and class counts, label histogram, and a
check that every image record reads and decodes and has a class label (a whole number from 0, below the number of
identity records in the InsightFace layout). Bad records are listed with key and offset; exit status 1. A folder
that cannot be read at all (no .idx, a broken header record) is one error line; exit status 2.

--write-idx rebuilds a missing or broken train.idx by scanning train.rec from the start (keys 0, 1, 2, ... in
file order, as InsightFace and im2rec number them).
"""
from __future__ import annotations

import argparse
import os
import sys
from multiprocessing import Pool

import numpy as np
from tqdm import tqdm

from arcface.data.decode import decode_rgb
from arcface.data.record_checks import label_fault, label_faults
from arcface.data.recordio import RecordIndex, RecordReader, first_label, read_layout, replaced_on_success
from arcface.errors import UserError

_CHUNK = 1024
_state: dict = {}


def _init(reader: RecordReader, keys: np.ndarray, decode: bool, identities: int | None) -> None:
    _state.update(reader=reader, keys=keys, decode=decode, identities=identities)


def check_chunk(start: int) -> tuple[list[int], list[str]]:
    """Labels of the good records in keys[start:start+_CHUNK], and one message per bad record."""
    reader, keys, labels, bad = _state["reader"], [], [], []
    for key in _state["keys"][start:start + _CHUNK].tolist():
        try:
            offset = reader.offset_of(key)
            header, data = reader.unpack_checked(reader.read_at(offset, key)[0], offset, key)
            if _state["decode"]:
                decode_rgb(data)
            keys.append(key)
            labels.append(first_label(header))
        except (UserError, ValueError) as e:
            bad.append(f"key {key} at offset {reader.index.offset(key)}: {e}")
    labels = np.asarray(labels, dtype=np.float64)
    faults = label_faults(labels, _state["identities"])
    bad += [f"key {key} at offset {reader.index.offset(key)}: {label_fault(label, _state['identities'])}"
            for key, label in zip(np.asarray(keys)[faults].tolist(), labels[faults].tolist())]
    return labels[~faults].astype(np.int64).tolist(), bad


def histogram(counts: np.ndarray) -> list[str]:
    """Classes binned by images per class in powers of two."""
    lines = []
    present = counts[counts > 0]
    edges = 2 ** np.arange(0, int(np.log2(present.max())) + 2)
    hist, _ = np.histogram(present, bins=edges)
    width = max(1, int(hist.max()))
    for lo, hi, n in zip(edges[:-1], edges[1:], hist):
        if n:
            lines.append(f"  {lo:>6}-{hi - 1:<6} {n:>9}  {'#' * max(1, round(40 * n / width))}")
    return lines


def inspect(folder: str, decode: bool, workers: int) -> int:
    reader = RecordReader(os.path.join(folder, "train.rec"), os.path.join(folder, "train.idx"))
    layout = read_layout(reader)
    # Checked in file order, so a 40M-record file is read sequentially.
    keys = layout.image_keys[np.argsort(reader.index.offsets[reader.index.positions(layout.image_keys)],
                                        kind="stable")]
    counts = np.zeros(0, dtype=np.int64)
    bad: list[str] = []
    with Pool(workers, initializer=_init, initargs=(reader, keys, decode, layout.num_identities)) as pool:
        for labels, errors in tqdm(pool.imap(check_chunk, range(0, len(keys), _CHUNK)),
                                   total=-(-len(keys) // _CHUNK), unit="chunk", mininterval=1):
            bad += errors
            if labels:
                found = np.bincount(np.asarray(labels, dtype=np.int64))
                counts = np.pad(counts, (0, max(0, len(found) - len(counts))))
                counts[:len(found)] += found
    print(f"{folder}: {'InsightFace' if layout.insightface else 'plain'} layout, {reader.size} bytes")
    print(f"images: {len(keys)}")
    print(f"classes: {int((counts > 0).sum())} with images, labels 0..{len(counts) - 1}"
          + (f", {layout.num_identities} identity records" if layout.insightface else ""))
    if counts.any():
        present = counts[counts > 0]
        print(f"images per class: min {present.min()}, median {int(np.median(present))}, max {present.max()}")
        print("classes by images per class:")
        print("\n".join(histogram(counts)))
    if bad:
        print(f"{len(bad)} bad records:")
        print("\n".join(bad))
        return 1
    print("all records " + ("decode" if decode else "read") + " cleanly")
    return 0


def write_index(folder: str) -> int:
    """Scan train.rec in file order and write train.idx; returns the record count."""
    reader = RecordReader(os.path.join(folder, "train.rec"))
    offsets = []
    with tqdm(total=reader.size, unit="B", unit_scale=True, mininterval=1) as bar:
        for offset, payload in reader.scan():
            reader.unpack_checked(payload, offset, None)  # a payload without an IRHeader means a corrupt file
            bar.update(offset - bar.n)
            offsets.append(offset)
    index = RecordIndex(np.arange(len(offsets), dtype=np.int64), np.asarray(offsets, dtype=np.int64))
    with replaced_on_success(os.path.join(folder, "train.idx")) as (idx,):
        index.write(idx)
    return len(offsets)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("dir", help="folder holding train.rec and train.idx")
    parser.add_argument("--no-decode", action="store_true", help="only read records and labels, skip JPEG decoding")
    parser.add_argument("--workers", type=int, default=os.cpu_count(), help="checking processes (default: all cores)")
    parser.add_argument("--write-idx", action="store_true", help="rebuild DIR/train.idx from train.rec, then inspect")
    args = parser.parse_args(argv)
    try:
        if args.write_idx:
            print(f"wrote {os.path.join(args.dir, 'train.idx')} with {write_index(args.dir)} records")
        return inspect(args.dir, decode=not args.no_decode, workers=max(1, args.workers))
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
