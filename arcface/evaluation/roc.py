"""ROC of 1:1 scores: true accept rate at fixed false accept rates, area under the curve, and the ROC plot."""
from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from arcface.fileio import atomic_write

FARS = (1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1)


@dataclass
class Roc:
    """Operating points, FAR ascending: accepting scores >= thresholds[i] gives fpr[i] and tpr[i]."""

    fpr: np.ndarray
    tpr: np.ndarray
    thresholds: np.ndarray
    genuine: int
    impostors: int

    def tar_at_far(self, far: float) -> float | None:
        """The highest TAR among operating points whose FAR is at most `far`; None when `far` is below one impostor
        in all of them (1 / impostors), a rate these pairs cannot measure."""
        if far * self.impostors < 1:
            return None
        return float(self.tpr[np.searchsorted(self.fpr, far, side="right") - 1])

    @property
    def auc(self) -> float:
        from sklearn.metrics import auc

        return float(auc(self.fpr, self.tpr))


def roc_curve(scores: np.ndarray, labels: np.ndarray) -> Roc:
    """The ROC of `scores` (higher = more alike) for `labels` (1 genuine, 0 impostor); both kinds must occur."""
    from sklearn.metrics import roc_curve as sklearn_roc

    labels = np.asarray(labels).astype(bool)
    fpr, tpr, thresholds = sklearn_roc(labels, scores)
    return Roc(fpr, tpr, thresholds, int(labels.sum()), int((~labels).sum()))


def plot_roc(curves: dict[str, Roc], path: str | Path, title: str) -> Path:
    """ROC curves (TAR against FAR on a log axis from 1e-6) as a PNG, written atomically."""
    from matplotlib.figure import Figure  # no pyplot: no global figure state, no GUI backend

    fig = Figure(figsize=(6.4, 4.8), dpi=120)
    ax = fig.add_subplot()
    for label, roc in curves.items():
        ax.plot(roc.fpr[1:], roc.tpr[1:], label=f"{label} (AUC {roc.auc:.4f})")  # FAR 0 has no place on a log axis
    ax.set_xscale("log")
    ax.set_xlim(min(FARS), 1)
    ax.set_ylim(0, 1)
    ax.set_xlabel("false accept rate")
    ax.set_ylabel("true accept rate")
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(loc="lower right")
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    with atomic_write(path) as f:
        f.write(buffer.getvalue())
    return Path(path)
