"""Cost of the start-up label check (`arcface.data.record_checks.record_labels`) per record.

    python benchmarks/record_headers.py [--records 100000] [--record-bytes 7000] [--out FILE.md]

Writes a plain-layout `.rec` of --records records of --record-bytes each (about a 112x112 q95 face JPEG) and times
reading every record's label from its header: the vectorised mmap scan, and for comparison a `read_header` call
per record (two `os.pread`s each). Each runs with the file in the page cache (hot) and after its pages were dropped
with posix_fadvise (cold: what the first start-up after a copy pays, bound by the disk); medians of 5 runs.
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import tempfile
import time

import numpy as np

from arcface.data.record_checks import record_labels
from arcface.data.recordio import PlainWriter, RecordReader, first_label


def _write(folder: str, records: int, record_bytes: int) -> RecordReader:
    blob = np.random.default_rng(0).integers(0, 256, record_bytes + 64, dtype=np.uint8).tobytes()
    with PlainWriter(os.path.join(folder, "train.rec"), os.path.join(folder, "train.idx")) as writer:
        for i in range(records):
            writer.add(float(i % 1000), blob[i % 64:i % 64 + record_bytes])
    return RecordReader(os.path.join(folder, "train.rec"), os.path.join(folder, "train.idx"))


def _drop_cache(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def _time(fn, reader: RecordReader, cold: bool) -> float:
    runs = []
    for _ in range(5):
        if cold:
            _drop_cache(reader.rec_path)
        start = time.perf_counter()
        fn()
        runs.append(time.perf_counter() - start)
    return statistics.median(runs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--records", type=int, default=100_000)
    parser.add_argument("--record-bytes", type=int, default=7000)
    parser.add_argument("--out", help="also write the table to this markdown file")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        reader = _write(folder, args.records, args.record_bytes)
        keys = reader.keys()
        ways = {
            "vectorised scan (record_labels)": lambda: record_labels(reader, keys),
            "read_header per record": lambda: [first_label(reader.read_header(int(k))) for k in keys],
        }
        assert np.array_equal(record_labels(reader, keys), np.arange(len(keys)) % 1000)
        lines = [f"{args.records} records of {args.record_bytes} bytes ({reader.size / 1e6:.0f} MB), "
                 f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, load average "
                 f"{os.getloadavg()[0]:.1f} at the start", "",
                 "| way | hot: s | hot: us/record | cold: s | cold: us/record |", "|---|---|---|---|---|"]
        for name, fn in ways.items():
            fn()  # warm-up: page cache, mmap set-up
            hot, cold = _time(fn, reader, cold=False), _time(fn, reader, cold=True)
            lines.append(f"| {name} | {hot:.3f} | {hot / len(keys) * 1e6:.2f} | {cold:.3f} | "
                         f"{cold / len(keys) * 1e6:.2f} |")
    print("\n".join(lines))
    if args.out:
        with open(args.out, "w") as f:
            f.write("# Start-up label check: cost per record\n\n`python benchmarks/record_headers.py`\n\n"
                    + "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
