"""Decode + augment throughput (images/s) of the data paths over a 5k-image RecordIO file of 112x112 q95 JPEGs.

    python benchmarks/data_loader.py [--images 5000] [--out benchmarks/results/data_loader.md]

Every path but one ends in what the network consumes, float32 (B,3,112,112) in [-1,1] with random flips, on the
CPU:
- baseline: the reference's per-image path (read record -> PIL decode -> ToPILImage / RandomHorizontalFlip /
  ToTensor / Normalize, torchvision transforms), batched by a DataLoader with 0 and 2 workers;
- decode only, per decoder (what `arcface.data.decode` chose from);
- the project's loader (`build_loader` + `prepare_batch`) with 0, 1 and 2 workers, and with 2 workers alone
  (uint8 batches: the CPU's share of a GPU run, where `prepare_batch` runs on the GPU);
- DALI's CPU pipeline as the reference builds it (mxnet reader -> decoder -> crop_mirror_normalize), 2 threads,
  and the project's DALI loader + `prepare_batch`.
Each path runs one warm-up epoch (worker start-up, page cache), then the median of --epochs timed epochs.
"""
from __future__ import annotations

import argparse
import io
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from arcface.data import RecordDataset
from arcface.data.decode import encode_jpeg
from arcface.data.loader import build_loader
from arcface.data.recordio import InsightFaceWriter, unpack
from arcface.data.transforms import PIXEL_MEAN, PIXEL_SCALE, prepare_batch

BATCH = 128
CPU = torch.device("cpu")


def make_rec(folder: Path, count: int, per_class: int = 20) -> None:
    """Smooth random colour fields plus mild noise: about 6 KB per q95 JPEG, like aligned face crops."""
    rng = np.random.default_rng(0)
    with InsightFaceWriter(folder / "train.rec", folder / "train.idx") as writer:
        for i in range(count):
            coarse = Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).resize((112, 112), Image.BICUBIC)
            pixels = np.clip(np.asarray(coarse, dtype=np.float32) + rng.normal(0, 4, (112, 112, 3)), 0, 255)
            writer.add(i // per_class, encode_jpeg(pixels.astype(np.uint8), quality=95))


class ReferenceStyle(torch.utils.data.Dataset):
    """The reference's per-image dataset: one record read, PIL decode and torchvision transforms per image."""

    def __init__(self, data: RecordDataset):
        from torchvision import transforms

        self.data = data
        self.transform = transforms.Compose([transforms.ToPILImage(), transforms.RandomHorizontalFlip(),
                                             transforms.ToTensor(), transforms.Normalize([0.5] * 3, [0.5] * 3)])

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, index: int):
        header, jpeg = unpack(self.data.reader.read(int(self.data.keys[index])))
        image = np.asarray(Image.open(io.BytesIO(jpeg)).convert("RGB"))
        return self.transform(image), torch.tensor(header.label, dtype=torch.long)


def timed_epochs(run_epoch, epochs: int) -> float:
    """Median images/s over `epochs` timed epochs after one warm-up epoch."""
    run_epoch()
    rates = []
    for _ in range(epochs):
        start = time.perf_counter()
        images = run_epoch()
        rates.append(images / (time.perf_counter() - start))
    return statistics.median(rates)


def through_network_input(loader) -> int:
    """One epoch of `loader`, each batch prepared as the trainer does; returns the image count."""
    count = 0
    for images, _ in loader:
        prepare_batch(images, CPU, flip=True)
        count += len(images)
    return count


def bench_baseline(data: RecordDataset, workers: int, epochs: int) -> float:
    loader = torch.utils.data.DataLoader(ReferenceStyle(data), batch_size=BATCH, shuffle=True, drop_last=True,
                                         num_workers=workers, persistent_workers=workers > 0)
    return timed_epochs(lambda: sum(len(x) for x, _ in loader), epochs)


def bench_project(data: RecordDataset, workers: int, epochs: int, prepare: bool = True) -> float:
    loader = build_loader(data, BATCH, rank=0, world_size=1, seed=0, num_workers=workers, device=CPU)
    if prepare:
        return timed_epochs(lambda: through_network_input(loader), epochs)
    return timed_epochs(lambda: sum(len(images) for images, _ in loader), epochs)


def decoders() -> dict:
    """name -> bytes -> HWC or CHW uint8, for every decoder that imports here."""
    found = {"PIL": lambda b: np.asarray(Image.open(io.BytesIO(b)).convert("RGB"))}
    try:
        import simplejpeg
        buffer = np.empty((112, 112, 3), dtype=np.uint8)
        found["simplejpeg"] = lambda b: simplejpeg.decode_jpeg(b, colorspace="RGB")
        found["simplejpeg, into a buffer (used)"] = lambda b: simplejpeg.decode_jpeg(b, colorspace="RGB", buffer=buffer)
    except ImportError:
        pass
    try:
        import cv2
        found["OpenCV"] = lambda b: cv2.imdecode(np.frombuffer(b, np.uint8), cv2.IMREAD_COLOR_RGB)
    except (ImportError, AttributeError):
        pass
    try:
        from torchvision.io import decode_jpeg
        found["torchvision.io"] = lambda b: decode_jpeg(torch.frombuffer(bytearray(b), dtype=torch.uint8))
    except ImportError:
        pass
    try:
        from turbojpeg import TurboJPEG, TJPF_RGB
        turbo = TurboJPEG()
        found["PyTurboJPEG"] = lambda b: turbo.decode(b, pixel_format=TJPF_RGB)
    except (ImportError, RuntimeError, OSError):
        pass  # needs a system libturbojpeg, which a plain pip install does not bring
    return found


def bench_decoders(data: RecordDataset, epochs: int) -> dict[str, float]:
    jpegs = [unpack(data.reader.read(int(k)))[1] for k in data.keys]
    results = {}
    for name, decode in decoders().items():
        def epoch():
            for jpeg in jpegs:
                decode(jpeg)
            return len(jpegs)
        results[name] = timed_epochs(epoch, epochs)
    return results


def bench_dali_reference(data: RecordDataset, epochs: int) -> float:
    from nvidia.dali import fn, pipeline_def, types
    from nvidia.dali.plugin.pytorch import DALIGenericIterator, LastBatchPolicy

    from arcface.data.dali import image_index

    @pipeline_def(batch_size=BATCH, num_threads=2, device_id=None, seed=0)
    def reference():
        jpegs, labels = fn.readers.mxnet(path=[data.reader.rec_path], index_path=[image_index(data)],
                                         random_shuffle=True, initial_fill=len(data), name="reader")
        images = fn.decoders.image(jpegs, device="cpu", output_type=types.RGB)
        images = fn.crop_mirror_normalize(images, dtype=types.FLOAT, output_layout="CHW", mean=[PIXEL_MEAN] * 3,
                                          std=[PIXEL_SCALE] * 3, mirror=fn.random.coin_flip(probability=0.5))
        return images, labels

    iterator = DALIGenericIterator([reference()], ["images", "labels"], reader_name="reader",
                                   last_batch_policy=LastBatchPolicy.DROP, auto_reset=True)
    return timed_epochs(lambda: sum(len(out[0]["images"]) for out in iterator), epochs)


def bench_dali_project(data: RecordDataset, epochs: int) -> float:
    loader = build_loader(data, BATCH, rank=0, world_size=1, seed=0, num_workers=2, device=CPU, loader="dali")
    return timed_epochs(lambda: through_network_input(loader), epochs)


def load_average() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=5000)
    parser.add_argument("--epochs", type=int, default=3, help="timed epochs per path (median reported)")
    parser.add_argument("--out", default="benchmarks/results/data_loader.md")
    parser.add_argument("--note", default="", help="a paragraph appended to the results (e.g. what else ran)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)  # the loaders' own processes/threads are the parallelism under test
    load_before = load_average()
    rows: list[tuple[str, float]] = []
    with tempfile.TemporaryDirectory() as tmp:
        make_rec(Path(tmp), args.images)
        data = RecordDataset(tmp, num_classes=-(-args.images // 20))
        mean_jpeg = os.path.getsize(data.reader.rec_path) / len(data)

        def record(name: str, rate: float) -> None:
            rows.append((name, rate))
            print(f"{name:<58} {rate:8.0f} images/s", flush=True)

        for workers in (0, 2):
            record(f"baseline: reference per-image path, {workers} workers", bench_baseline(data, workers, args.epochs))
        for name, rate in bench_decoders(data, args.epochs).items():
            record(f"decode only: {name}", rate)
        for workers in (0, 1, 2):
            record(f"project loader + prepare_batch, {workers} workers", bench_project(data, workers, args.epochs))
        # On a GPU run prepare_batch runs on the GPU: the CPU side is the loader alone.
        record("project loader alone (uint8 batches), 2 workers", bench_project(data, 2, args.epochs, prepare=False))
        record("DALI CPU, reference pipeline, 2 threads", bench_dali_reference(data, args.epochs))
        record("project DALI loader (CPU, 2 threads) + prepare_batch", bench_dali_project(data, args.epochs))
    baseline = dict(rows)["baseline: reference per-image path, 2 workers"]
    lines = [
        "# Data loader throughput",
        "",
        f"Command: `python benchmarks/data_loader.py --images {args.images} --epochs {args.epochs}`",
        "",
        f"Machine: {platform.platform()}, Python {platform.python_version()}, torch {torch.__version__}, "
        f"{os.cpu_count()} CPU cores, no GPU. Load average (1/5/15 min) before: {load_before}, after: "
        f"{load_average()}; a load above the core count means other work shared the cores and every number "
        f"is lower than on an idle machine.",
        "",
        f"Data: {len(data)} images of 112x112, JPEG q95 4:2:0 (mean {mean_jpeg / 1024:.1f} KB per record), "
        f"InsightFace layout; batch {BATCH}; median of {args.epochs} epochs after a warm-up epoch. Every loader "
        "row but the `loader alone` one ends in float32 [-1,1] flipped batches on the CPU.",
        "",
        "| path | images/s | vs baseline (2 workers) |",
        "|---|---:|---:|",
        *[f"| {name} | {rate:.0f} | {rate / baseline:.2f}x |" for name, rate in rows],
        "",
        *([args.note, ""] if args.note else []),
    ]
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text("\n".join(lines))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
