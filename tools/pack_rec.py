"""Pack aligned face images into a RecordIO folder (OUT_DIR/train.rec + train.idx), InsightFace layout by default.

SRC is a folder with one sub-folder per identity (identities numbered in sorted name order), or a list file with
one image per line: `path<TAB>label` or MXNet im2rec's `index<TAB>label<TAB>path` (relative paths are taken from
the list file's folder; lines must come grouped by label, e.g. `sort -t$'\\t' -k2,2n`, unless --plain).
JPEGs already of --size are copied byte for byte; other images are decoded, resized and encoded at --quality,
in parallel. Memory stays bounded: images stream through a few windows of work at a time.
"""
from __future__ import annotations

import argparse
import math
import os
import sys
from collections import deque
from itertools import islice
from multiprocessing import Pool
from typing import Iterator

from tqdm import tqdm

from arcface.data.decode import decode_rgb, encode_jpeg, fit
from arcface.data.folder import identity_folders, scan_folders
from arcface.data.recordio import InsightFaceWriter, PlainWriter, replaced_on_success
from arcface.errors import UserError


def folder_items(root: str) -> Iterator[tuple[int, str]]:
    for label, _, files in scan_folders(root):
        for path in files:
            yield label, path


def list_items(list_file: str) -> Iterator[tuple[int, str]]:
    base = os.path.dirname(os.path.abspath(list_file))
    with open(list_file) as f:
        for number, line in enumerate(f, 1):
            fields = line.rstrip("\n").split("\t")
            if not line.strip():
                continue
            if len(fields) < 2:
                raise UserError(f"{list_file} line {number} is not `path<TAB>label` or `index<TAB>label<TAB>path`: "
                                f"fix that line.")
            path, label = (fields[-1], fields[1]) if len(fields) >= 3 else (fields[0], fields[1])
            try:
                value = float(label)
            except ValueError:
                value = math.nan
            if not (value.is_integer() and value >= 0):
                raise UserError(f"{list_file} line {number} has label {label!r}, not a class number (0, 1, 2, ...): "
                                f"fix it.")
            yield int(value), os.path.join(base, path)


def count_items(src: str) -> int | None:
    """Image count for the progress bar: a cheap line count for a list file, unknown for a folder tree."""
    if os.path.isdir(src):
        return None
    with open(src, "rb") as f:
        return sum(1 for line in f if line.strip())


def prepare(task: tuple[str, int, int, bool]) -> bytes | str:
    """One image's record bytes, or an error message (a bad file is reported, it does not stop the pack)."""
    path, size, quality, reencode = task
    try:
        with open(path, "rb") as f:
            data = f.read()
        image = decode_rgb(data)  # also when copied: a damaged JPEG is skipped here, not met hours into training
        if not reencode and data[:3] == b"\xff\xd8\xff" and image.shape[:2] == (size, size):
            return data
        return encode_jpeg(fit(image, size, size), quality)
    except (OSError, ValueError) as e:
        return f"{path}: {e}"


def pack(src: str, out_dir: str, *, size: int, quality: int, workers: int, reencode: bool, plain: bool,
         window: int = 512) -> tuple[int, list[str]]:
    """Write the folder; returns (images written, error messages of skipped files)."""
    items = folder_items(src) if os.path.isdir(src) else list_items(src)
    # The .rec first: a crash while they are moved into place leaves no .idx beside a .rec it does not describe.
    outputs = os.path.join(out_dir, "train.rec"), os.path.join(out_dir, "train.idx")
    errors: list[str] = []
    written = 0
    pending: deque = deque()
    layout = PlainWriter if plain else InsightFaceWriter
    with replaced_on_success(*outputs) as (rec, idx), layout(rec, idx) as writer, Pool(workers) as pool, \
            tqdm(total=count_items(src), unit="img", mininterval=1) as bar:
        def drain(labels, result):
            nonlocal written
            for label, data in zip(labels, result.get()):
                if isinstance(data, str):
                    errors.append(data)
                    if not plain:  # the identity keeps its class even if none of its images could be packed
                        writer.reserve(label)
                    continue
                try:
                    writer.add(label, data)
                except ValueError as e:
                    raise UserError(f"{src}: {e}; sort the list by label or pass --plain.") from None
                written += 1
            bar.update(len(labels))

        while chunk := list(islice(items, window)):
            labels = [label for label, _ in chunk]
            tasks = [(path, size, quality, reencode) for _, path in chunk]
            pending.append((labels, pool.map_async(prepare, tasks, chunksize=16)))
            if len(pending) > 2:  # keep a few windows in flight: workers stay busy, memory stays bounded
                drain(*pending.popleft())
        while pending:
            drain(*pending.popleft())
        if errors and not written:
            raise UserError(f"none of the {len(errors)} images of {src} could be packed (the first: {errors[0]}): "
                            f"fix the paths or the files.")
        if not written:
            raise UserError(f"{src} gave no images to pack: lay it out as {src}/<identity>/<image>.jpg or pass a "
                            f"list file.")
        if not plain and os.path.isdir(src):  # identity folders without images are classes too, as in dataset=folder
            writer.reserve(len(identity_folders(src)) - 1)
    return written, errors


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("src", help="folder with one sub-folder per identity, or a list file")
    parser.add_argument("out_dir", help="output folder for train.rec and train.idx")
    parser.add_argument("--size", type=int, default=112, help="image side in pixels (default 112)")
    parser.add_argument("--quality", type=int, default=95, help="JPEG quality of re-encoded images (default 95)")
    parser.add_argument("--reencode", action="store_true", help="re-encode every image, even JPEGs of --size")
    parser.add_argument("--plain", action="store_true",
                        help="plain layout (keys 0..N-1, no header or identity records); labels need not be grouped")
    parser.add_argument("--workers", type=int, default=os.cpu_count(), help="encoding processes (default: all cores)")
    parser.add_argument("--force", action="store_true", help="overwrite an existing train.rec in OUT_DIR")
    args = parser.parse_args(argv)
    try:
        if not os.path.exists(args.src):
            raise UserError(f"{args.src} does not exist: pass a folder of identity folders or a list file.")
        if args.size < 1 or not 1 <= args.quality <= 100:
            raise UserError(f"--size {args.size} --quality {args.quality}: the size must be at least 1 and the "
                            f"quality from 1 to 100.")
        os.makedirs(args.out_dir, exist_ok=True)
        if os.path.exists(os.path.join(args.out_dir, "train.rec")) and not args.force:
            raise UserError(f"{args.out_dir}/train.rec already exists: pass --force to overwrite it.")
        written, errors = pack(args.src, args.out_dir, size=args.size, quality=args.quality,
                               workers=max(1, args.workers), reencode=args.reencode, plain=args.plain)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for message in errors:
        print(f"skipped {message}", file=sys.stderr)
    print(f"packed {written} images into {args.out_dir} ({len(errors)} skipped)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
