"""1:1 verification on a pair set: 10-fold accuracy of squared-L2 thresholds, XNorm and VAL@FAR."""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

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


def _fold_sizes(n: int, folds: int) -> np.ndarray:
    """Consecutive folds without shuffling, the first `n % folds` one pair larger (sklearn's KFold split)."""
    sizes = np.full(folds, n // folds)
    sizes[:n % folds] += 1
    return sizes


def verification_scores(embeddings: np.ndarray, issame: np.ndarray, folds: int = 10,
                        far_target: float = 1e-3) -> tuple[float, float, float]:
    """(mean accuracy, its std, mean VAL at `far_target`) over `folds` folds, thresholds chosen on the rest.

    A pair is accepted at threshold t when its squared distance is < t. Each distance falls in one bin: the number
    of thresholds <= it; a pair is then accepted at every threshold index >= its bin. Counting pairs per (fold,
    genuine/impostor, bin) and summing the counts cumulatively gives every fold's accepted pairs at every threshold
    at once, with no loop over thresholds: the same counts, so the same accuracies, as testing each threshold.
    """
    issame = np.asarray(issame, dtype=bool)
    dist = np.sum((embeddings[0::2] - embeddings[1::2]) ** 2, axis=1)
    n, steps = len(dist), len(THRESHOLDS)
    fold = np.repeat(np.arange(folds), _fold_sizes(n, folds))
    bins = np.searchsorted(THRESHOLDS, dist, side="right")  # steps when no threshold accepts the pair
    # accepted[f, s, k]: pairs of fold f with issame == s that threshold index k accepts
    cell = (fold * 2 + issame) * (steps + 1) + bins
    counts = np.bincount(cell, minlength=folds * 2 * (steps + 1)).reshape(folds, 2, steps + 1)
    accepted = np.cumsum(counts, axis=2)[:, :, :steps]
    totals = counts.sum(axis=2)  # (folds, 2): impostor and genuine pairs per fold
    train_accepted, train_totals = accepted.sum(axis=0) - accepted, totals.sum(axis=0) - totals
    # correct = genuine pairs accepted + impostor pairs rejected
    train_correct = train_accepted[:, 1] + train_totals[:, :1] - train_accepted[:, 0]
    test_correct = accepted[:, 1] + totals[:, :1] - accepted[:, 0]
    rows = np.arange(folds)
    best = np.argmax(train_correct, axis=1)  # the first best threshold, as a scan from 0 up finds it
    accuracies = test_correct[rows, best] / totals.sum(axis=1)
    # FAR grows with the threshold: take the largest threshold whose training FAR stays within the target.
    impostors = np.maximum(train_totals[:, :1], 1)  # no impostors: FAR 0 at every threshold
    within = train_accepted[:, 0] / impostors <= far_target
    chosen = steps - 1 - np.argmax(within[:, ::-1], axis=1)  # threshold index 0 (t = 0) accepts nothing: always in
    genuine = totals[:, 1]
    vals = np.where(genuine > 0, accepted[rows, 1, chosen] / np.maximum(genuine, 1), 0.0)
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
