"""1:1 verification on a pair set: 10-fold accuracy of squared-L2 thresholds, XNorm and VAL@FAR."""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.model_selection import KFold

from arcface.data.transforms import prepare_batch
from arcface.errors import UserError
from arcface.evaluation.pairs import PairSet

log = logging.getLogger(__name__)

THRESHOLDS = np.arange(0, 4, 0.01)
XNORMS = ("sum", "reference")  # see embed_pair_set


@dataclass
class VerificationResult:
    accuracy: float
    accuracy_std: float
    xnorm: float
    val: float  # true accept rate at FAR = far_target
    far_target: float

    def metrics(self, prefix: str) -> dict[str, float]:
        return {f"{prefix}/acc": self.accuracy, f"{prefix}/acc_std": self.accuracy_std,
                f"{prefix}/xnorm": self.xnorm, f"{prefix}/val@far": self.val}


class _Progress:
    """Logs "<name>: done/total images" at most every `every_s` seconds, so a long evaluation is seen to move."""

    def __init__(self, name: str, total: int, every_s: float):
        self.name, self.total, self.every_s = name, total, every_s
        self.start = self.last = time.monotonic()

    def update(self, done: int) -> None:
        now = time.monotonic()
        if now - self.last >= self.every_s and done < self.total:
            self.last = now
            log.info("verifying on %s: %d/%d images (%d%%) in %.0f s", self.name, done, self.total,
                     100 * done // self.total, now - self.start)


@torch.no_grad()
def embed_pair_set(model: torch.nn.Module, pairs: PairSet, batch_size: int, device: torch.device, *,
                   name: str = "pairs", progress_every_s: float = 10.0, xnorm: str = "sum"):
    """Flip-augmented embeddings f(x) + f(flip x), L2-normalised, and their XNorm.

    XNorm is the mean norm of the sums f(x) + f(flip x) (xnorm="sum"), or, as arcface_torch reports it
    (xnorm="reference"), the mean of the norms of f(x) and f(flip x) taken separately: about half as large.
    """
    if xnorm not in XNORMS:
        raise UserError(f"trainer.xnorm={xnorm!r} is unknown: set it to one of {', '.join(XNORMS)}")
    was_training = model.training
    model.eval()
    chunks, norms = [], []
    total = len(pairs.images)
    progress = _Progress(name, total, progress_every_s)
    for start in range(0, total, batch_size):
        x = prepare_batch(pairs.images[start:start + batch_size], device, flip=False)
        plain, flipped = model(x).float().cpu(), model(torch.flip(x, dims=[3])).float().cpu()
        chunks.append(plain + flipped)
        if xnorm == "reference":
            norms.append(torch.stack([plain.norm(dim=1), flipped.norm(dim=1)], dim=1).mean(dim=1))
        progress.update(min(start + batch_size, total))
    model.train(was_training)
    raw = torch.cat(chunks)
    norm = raw.norm(dim=1) if xnorm == "sum" else torch.cat(norms)
    return F.normalize(raw).numpy(), float(norm.mean())


def _accuracy(threshold: float, dist: np.ndarray, same: np.ndarray) -> float:
    return float(np.mean((dist < threshold) == same))


def _val_far(threshold: float, dist: np.ndarray, same: np.ndarray) -> tuple[float, float]:
    accept = dist < threshold
    val = accept[same].mean() if same.any() else 0.0
    far = accept[~same].mean() if (~same).any() else 0.0
    return float(val), float(far)


def verification_scores(embeddings: np.ndarray, issame: np.ndarray, folds: int = 10,
                        far_target: float = 1e-3) -> tuple[float, float, float]:
    """(mean accuracy, its std, mean VAL at `far_target`) over `folds` folds, thresholds chosen on the rest."""
    dist = np.sum((embeddings[0::2] - embeddings[1::2]) ** 2, axis=1)
    accuracies, vals = [], []
    for train, test in KFold(n_splits=folds, shuffle=False).split(dist):
        train_acc = [_accuracy(t, dist[train], issame[train]) for t in THRESHOLDS]
        accuracies.append(_accuracy(THRESHOLDS[int(np.argmax(train_acc))], dist[test], issame[test]))
        fars = np.array([_val_far(t, dist[train], issame[train])[1] for t in THRESHOLDS])
        # FAR grows with the threshold: take the largest threshold whose training FAR stays within the target.
        within = np.nonzero(fars <= far_target)[0]
        threshold = THRESHOLDS[within[-1]] if len(within) else 0.0
        vals.append(_val_far(threshold, dist[test], issame[test])[0])
    return float(np.mean(accuracies)), float(np.std(accuracies)), float(np.mean(vals))


def evaluate(model: torch.nn.Module, pairs: PairSet, batch_size: int = 64,
             device: torch.device = torch.device("cpu"), far_target: float = 1e-3, *, name: str = "pairs",
             progress_every_s: float = 10.0, xnorm: str = "sum") -> VerificationResult:
    """Verification metrics of `model` on `pairs`; evaluations longer than `progress_every_s` log their progress.
    `xnorm` picks the XNorm definition (see `embed_pair_set`)."""
    embeddings, norm = embed_pair_set(model, pairs, batch_size, device, name=name,
                                      progress_every_s=progress_every_s, xnorm=xnorm)
    acc, std, val = verification_scores(embeddings, pairs.issame.numpy().astype(bool), far_target=far_target)
    return VerificationResult(acc, std, norm, val, far_target)
