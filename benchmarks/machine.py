"""One line naming the machine a benchmark ran on, for the records in benchmarks/results/."""
from __future__ import annotations

import os
import platform

import torch


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
