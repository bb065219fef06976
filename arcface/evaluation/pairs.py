"""Pair sets for 1:1 verification (LFW, CFP-FP, AgeDB-30 and the synthetic held-out set)."""
from __future__ import annotations

import pickle
from pathlib import Path

import torch

from arcface.data.decode import decode_image
from arcface.data.pair_set import PairSet
from arcface.errors import UserError


def load_pair_set(path: str) -> PairSet:
    """Read an InsightFace `.bin` pair set: pickle of (2N JPEG byte strings, N issame bools)."""
    file = Path(path)
    if not file.is_file():
        raise UserError(f"verification pair set {file} does not exist: put the .bin beside train.rec, "
                        f"or train without it by removing it from dataset.val (e.g. 'dataset.val={{}}')")
    try:
        with open(file, "rb") as f:
            blobs, issame = pickle.load(f, encoding="bytes")  # bytes fallback: the public files are Python 2 pickles
    except Exception as exc:
        raise UserError(f"{file} is not a pair-set pickle of (images, issame) ({exc}); re-download it") from None
    if len(issame) < 10:
        raise UserError(f"{file} holds {len(issame)} pairs, fewer than the 10 folds of the protocol")
    if len(blobs) != 2 * len(issame):
        raise UserError(f"{file} holds {len(blobs)} images for {len(issame)} pairs (expected twice as many)")
    images = torch.stack([decode_image(bytes(b)) for b in blobs])
    return PairSet(images, torch.tensor([bool(s) for s in issame]))
