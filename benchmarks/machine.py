"""The machine a benchmark ran on, and the shared file of results, for the records in benchmarks/results/."""
from __future__ import annotations

import os
import platform
from pathlib import Path

import torch

from arcface.fileio import write_text_atomically


def describe(device: torch.device | None = None) -> str:
    """The GPU's name, or the CPU model with its core and torch thread counts."""
    if device is not None and device.type == "cuda":
        return torch.cuda.get_device_name(device)
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{cpu}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads"


def machine() -> dict:
    return {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "cpus": os.cpu_count(), "threads": torch.get_num_threads(), "torch": torch.__version__,
            "python": platform.python_version()}


def load_average() -> str:
    return " ".join(f"{x:.1f}" for x in os.getloadavg())


def replace_section(path: Path, heading: str, text: str) -> None:
    """Replace the section `heading` ("## Name") of `path`, up to the next "## " heading, with `text`, keeping
    every other section; a missing section is appended."""
    old = path.read_text() if path.exists() else "# Benchmark results\n\n"
    lines = old.splitlines(keepends=True)
    start = next((i for i, line in enumerate(lines) if line.rstrip() == heading), None)
    if start is None:
        new = old.rstrip("\n") + "\n\n" + text
    else:
        end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")), len(lines))
        new = "".join(lines[:start]) + text + ("\n" if end < len(lines) else "") + "".join(lines[end:])
    write_text_atomically(path, new)
