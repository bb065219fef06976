"""The samples/s that a real `arcface-train` run logs: the trainer with its loader, logging and everything else."""
from __future__ import annotations

import re
import statistics
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
_LOGGED_RATE = re.compile(r"step (\d+)/\d+ .* samples/s ([0-9.]+)")


def logged_samples_per_s(overrides: list[str], run_dir: str | Path, after_step: int, timeout_s: float) -> dict:
    """Train with `overrides` (Hydra) in a process of its own; the median of the samples/s logged after
    `after_step` (the windows before hold start-up: workers, compilation, cuDNN autotuning)."""
    proc = subprocess.run([sys.executable, "-m", "arcface.train", *overrides, "tracking=none",
                           f"hydra.run.dir={run_dir}"], cwd=REPO, capture_output=True, text=True, timeout=timeout_s)
    if proc.returncode != 0:
        raise RuntimeError(f"arcface-train failed: {(proc.stderr.strip().splitlines() or ['?'])[-1]}")
    rates = [float(rate) for step, rate in _LOGGED_RATE.findall(proc.stdout + proc.stderr) if int(step) > after_step]
    if not rates:
        raise RuntimeError(f"arcface-train logged no samples/s after step {after_step}")
    return {"samples_s": round(statistics.median(rates), 1), "windows": len(rates)}
