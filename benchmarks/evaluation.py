"""Evaluation speed on the CPU: the 10-fold pair-set scores, and IJB-C-sized template pooling, pair scoring and ROC.

    python tools/benchmark.py evaluation                       # both parts; markdown + JSON into benchmarks/results/
    python tools/benchmark.py evaluation --pairs 1000000       # a smaller IJB part

10-fold: 6,000 pairs of 512-d unit embeddings (genuine = anchor + noise, tuned to about 97.5 % accuracy), scored
by `verification_scores` (one binning of the distances, cumulative counts per fold) and by the loop it replaced
(every threshold tried on every fold, two passes: accuracy, then FAR), which must give the same three numbers.

IJB: IJB-C's sizes (469,375 images in 23,124 templates of several media, 15,658,489 template pairs of which 19,557
genuine) with random 512-d features: media averaging and template pooling (`template_features`), the tiled
scores (`score_pairs`, at two tile sizes) with the extra memory they take beside gathering two rows per pair, the
ROC with TAR at every FAR and AUC, and reading the pair file (`np.loadtxt`, written here first). Times are the
median of --repeat runs; CPU seconds beside wall seconds, since a shared machine stretches wall time.
"""
from __future__ import annotations

import argparse
import ctypes
import datetime
import json
import platform
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import psutil
import torch

from arcface.evaluation.ijb import read_pairs, score_pairs, template_features
from arcface.evaluation.roc import FARS, roc_curve
from arcface.evaluation.verification import THRESHOLDS, verification_scores
from arcface.fileio import write_text_atomically
from benchmarks.machine import describe, load_average

RESULTS = Path(__file__).resolve().parent / "results"
MIB = 1 << 20


def threshold_loop_scores(embeddings: np.ndarray, issame: np.ndarray, folds: int = 10,
                          far_target: float = 1e-3) -> tuple[float, float, float]:
    """The computation `verification_scores` replaced: every threshold evaluated on every fold's training part."""
    dist = np.sum((embeddings[0::2] - embeddings[1::2]) ** 2, axis=1)
    sizes = np.full(folds, len(dist) // folds)
    sizes[:len(dist) % folds] += 1
    ends = np.cumsum(sizes)
    accuracies, vals = [], []
    for start, end in zip(ends - sizes, ends):
        test = np.zeros(len(dist), bool)
        test[start:end] = True
        d, s = dist[~test], issame[~test]
        train_acc = [np.mean((d < t) == s) for t in THRESHOLDS]
        best = THRESHOLDS[int(np.argmax(train_acc))]
        accuracies.append(np.mean((dist[test] < best) == issame[test]))
        fars = np.array([np.mean(d[~s] < t) if (~s).any() else 0.0 for t in THRESHOLDS])
        chosen = THRESHOLDS[np.nonzero(fars <= far_target)[0][-1]]
        genuine = issame[test]
        vals.append(np.mean(dist[test][genuine] < chosen) if genuine.any() else 0.0)
    return float(np.mean(accuracies)), float(np.std(accuracies)), float(np.mean(vals))


def gather_scores(template_ids: np.ndarray, features: np.ndarray, pairs: np.ndarray,
                  block: int = 65536) -> np.ndarray:
    """The other way to score pairs: gather both templates' rows for a block of pairs, multiply, sum."""
    feats = torch.from_numpy(features)
    scores = np.empty(len(pairs), np.float32)
    for start in range(0, len(pairs), block):
        rows = torch.from_numpy(np.searchsorted(template_ids, pairs[start:start + block]))
        scores[start:start + len(rows)] = (feats[rows[:, 0]] * feats[rows[:, 1]]).sum(dim=1).numpy()
    return scores


def timed(fn, repeat: int) -> tuple[object, float, float]:
    """(result, median wall s, median CPU s of this process) over `repeat` calls."""
    walls, cpus, result = [], [], None
    for _ in range(repeat):
        wall, cpu = time.perf_counter(), time.process_time()
        result = fn()
        walls.append(time.perf_counter() - wall)
        cpus.append(time.process_time() - cpu)
    return result, statistics.median(walls), statistics.median(cpus)


def _release_freed_memory() -> None:
    """Hand memory freed earlier back to the OS (glibc), so it is not silently reused and missed by PeakRss."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: the peaks may read low
        pass


class PeakRss:
    """The most resident memory above the level at entry, sampled every 5 ms in a thread."""

    def __enter__(self):
        _release_freed_memory()
        self.process = psutil.Process()
        self.base = self.peak = self.process.memory_info().rss
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()
        return self

    def _sample(self) -> None:
        while not self.stop.wait(0.005):
            self.peak = max(self.peak, self.process.memory_info().rss)

    def __exit__(self, *exc) -> None:
        self.stop.set()
        self.thread.join()
        self.peak = max(self.peak, self.process.memory_info().rss)

    @property
    def extra_mib(self) -> float:
        return (self.peak - self.base) / MIB


def kfold(repeat: int) -> dict:
    rng = np.random.default_rng(0)
    pairs, dim = 6000, 512
    anchors = rng.normal(size=(pairs, dim))
    issame = np.arange(pairs) % 2 == 0
    partners = np.where(issame[:, None], anchors + 5.7 * rng.normal(size=(pairs, dim)), rng.normal(size=(pairs, dim)))
    emb = np.empty((2 * pairs, dim), np.float32)
    emb[0::2], emb[1::2] = anchors, partners
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    new, new_wall, new_cpu = timed(lambda: verification_scores(emb, issame), repeat)
    old, old_wall, old_cpu = timed(lambda: threshold_loop_scores(emb, issame), max(1, repeat // 5))
    if new != old:
        raise AssertionError(f"the two computations disagree: {new} vs {old}")
    return {"pairs": pairs, "dim": dim, "accuracy": new[0], "accuracy_std": new[1], "val_at_far": new[2],
            "binned_s": new_wall, "binned_cpu_s": new_cpu, "loop_s": old_wall, "loop_cpu_s": old_cpu}


def ijb(args) -> dict:
    rng = np.random.default_rng(1)
    images, templates, dim = args.images, args.templates, 512
    # Each template holds a few media of a few images: consecutive images share a media, media share a template.
    template_of = np.sort(rng.integers(0, templates, images))
    template_of[:templates] = np.arange(templates)  # every template has at least one image
    template_of.sort()
    media_of = template_of * 100 + rng.integers(0, 4, images)
    features = rng.standard_normal((images, dim), dtype=np.float32)
    out = {"images": images, "templates": templates, "pairs": args.pairs, "dim": dim}
    with PeakRss() as memory:
        (ids, pooled), out["pool_s"], out["pool_cpu_s"] = timed(
            lambda: template_features(features, template_of, media_of), args.repeat)
    out["pool_extra_mib"] = memory.extra_mib
    del features
    pairs = rng.integers(0, templates, size=(args.pairs, 2)).astype(np.int64)
    labels = np.zeros(args.pairs, np.int8)
    labels[rng.choice(args.pairs, size=min(args.genuine, args.pairs), replace=False)] = 1
    for block_mib in (64, 256):
        with PeakRss() as memory:
            scores, wall, cpu = timed(lambda: score_pairs(ids, pooled, pairs, block_bytes=block_mib * MIB),
                                      args.repeat)
        out[f"score_block{block_mib}_s"], out[f"score_block{block_mib}_cpu_s"] = wall, cpu
        out[f"score_block{block_mib}_extra_mib"] = memory.extra_mib
    out["scores_mib"] = scores.nbytes / MIB
    sample = min(len(pairs), 1_000_000)
    gathered, wall, cpu = timed(lambda: gather_scores(ids, pooled, pairs[:sample]), 1)
    out["gather_s_per_million"], out["gather_cpu_s_per_million"] = wall * 1e6 / sample, cpu * 1e6 / sample
    out["score_s_per_million"] = out["score_block256_s"] * 1e6 / len(pairs)
    out["score_cpu_s_per_million"] = out["score_block256_cpu_s"] * 1e6 / len(pairs)
    out["tiles_vs_gather_max_abs_diff"] = float(np.abs(gathered - scores[:sample]).max())
    roc_curve(scores[:1000], labels[:1000])  # imports scikit-learn outside the timing
    with PeakRss() as memory:
        roc, out["roc_s"], out["roc_cpu_s"] = timed(lambda: roc_curve(scores, labels), args.repeat)
        tars, out["tar_auc_s"], _ = timed(lambda: ([roc.tar_at_far(f) for f in FARS], roc.auc), args.repeat)
    out["roc_extra_mib"] = memory.extra_mib
    with tempfile.TemporaryDirectory(dir=args.tmp) as folder:
        path = Path(folder) / "ijbc_template_pair_label.txt"
        np.savetxt(path, np.column_stack([pairs, labels]), fmt="%d")
        out["pair_file_mib"] = path.stat().st_size / MIB
        _, out["read_pairs_s"], out["read_pairs_cpu_s"] = timed(lambda: read_pairs(path), 1)
    return out


def machine() -> str:
    return (f"{describe()}; {platform.platform()}, Python {platform.python_version()}, numpy {np.__version__}, "
            f"torch {torch.__version__}")


def markdown(result: dict, command: str) -> str:
    k, j = result["kfold"], result.get("ijb")
    lines = [
        "# Evaluation speed (CPU)", "",
        f"Command: `{command}`  ",
        f"Machine: {result['machine']}  ",
        f"Date: {result['date']}; load average (1/5/15 min) before: {result['load_before']}, after: "
        f"{result['load_after']} (a load above the core count means other work shared the cores: wall times "
        f"stretch, CPU times much less)", "",
        f"## 10-fold verification, {k['pairs']} pairs of {k['dim']}-d embeddings", "",
        f"Both give accuracy {k['accuracy']:.6f} +- {k['accuracy_std']:.6f}, VAL@FAR=1e-3 {k['val_at_far']:.6f}.", "",
        "| computation | wall s | CPU s |", "|---|---:|---:|",
        f"| every threshold on every fold (the loop replaced) | {k['loop_s']:.3f} | {k['loop_cpu_s']:.3f} |",
        f"| one binning + cumulative counts per fold (`verification_scores`) | {k['binned_s']:.4f} | "
        f"{k['binned_cpu_s']:.4f} |",
        "", f"Speed-up: {k['loop_s'] / k['binned_s']:.0f}x wall.",
    ]
    if j:
        lines += [
            "", f"## IJB-C-sized 1:1: {j['images']} images, {j['templates']} templates, {j['pairs']} pairs, "
                f"{j['dim']}-d", "",
            "| step | wall s | CPU s | extra memory (MiB) |", "|---|---:|---:|---:|",
            f"| media averaging + template pooling | {j['pool_s']:.2f} | {j['pool_cpu_s']:.2f} | "
            f"{j['pool_extra_mib']:.0f} |",
            *[f"| pair scores, tiles of {b} MiB (`score_pairs`) | {j[f'score_block{b}_s']:.2f} | "
              f"{j[f'score_block{b}_cpu_s']:.2f} | {j[f'score_block{b}_extra_mib']:.0f} |" for b in (64, 256)],
            f"| ROC (sort of all scores) | {j['roc_s']:.2f} | {j['roc_cpu_s']:.2f} | {j['roc_extra_mib']:.0f} |",
            f"| TAR at 6 FARs + AUC from the ROC | {j['tar_auc_s']:.3f} | | |",
            f"| reading the pair file ({j['pair_file_mib']:.0f} MiB, np.loadtxt) | {j['read_pairs_s']:.2f} | "
            f"{j['read_pairs_cpu_s']:.2f} | |",
            "", f"The scores themselves take {j['scores_mib']:.0f} MiB; the extra memory of scoring is that, two "
                "int32 indices per pair and one tile of the template similarity matrix.", "",
            f"Per million pairs: tiles {j['score_s_per_million']:.2f} s wall ({j['score_cpu_s_per_million']:.2f} "
            f"CPU s); gathering both feature rows per pair instead (measured on the first million pairs) "
            f"{j['gather_s_per_million']:.2f} s wall ({j['gather_cpu_s_per_million']:.2f} CPU s). The two agree to "
            f"{j['tiles_vs_gather_max_abs_diff']:.1e}.",
        ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="tools/benchmark.py evaluation", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeat", type=int, default=5, help="runs per measurement; the median is reported")
    parser.add_argument("--images", type=int, default=469_375)
    parser.add_argument("--templates", type=int, default=23_124)
    parser.add_argument("--pairs", type=int, default=15_658_489)
    parser.add_argument("--genuine", type=int, default=19_557)
    parser.add_argument("--no-ijb", action="store_true", help="the 10-fold part only")
    parser.add_argument("--tmp", default=None, help="where the pair file is written for the reading test")
    parser.add_argument("--name", default="evaluation", help="results go to benchmarks/results/NAME.{md,json}")
    args = parser.parse_args(argv)
    result = {"machine": machine(), "load_before": load_average(),
              "date": f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC"}
    result["kfold"] = kfold(max(1, args.repeat) * 5)
    print(json.dumps(result["kfold"]), flush=True)
    if not args.no_ijb:
        args.repeat = max(1, args.repeat // 2)
        result["ijb"] = ijb(args)
        print(json.dumps(result["ijb"]), flush=True)
    result["load_after"] = load_average()
    command = "python tools/benchmark.py evaluation " + " ".join(argv if argv is not None else sys.argv[1:])
    write_text_atomically(RESULTS / f"{args.name}.json", json.dumps(result, indent=2) + "\n")
    write_text_atomically(RESULTS / f"{args.name}.md", markdown(result, command.strip()))
    print(f"wrote {RESULTS / args.name}.md and .json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
