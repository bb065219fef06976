"""Pair sets for 1:1 verification (LFW, CFP-FP, AgeDB-30 and the synthetic held-out set).

A `.bin` pair set is a pickle, read without running anything it names (see `arcface.evaluation.pair_pickle`), then
checked: two encoded images per issame flag, every image decodable and of one size.
"""
from __future__ import annotations

from pathlib import Path

import torch

from arcface.data.decode import decode_image
from arcface.data.pair_set import PairSet
from arcface.errors import UserError
from arcface.evaluation import pair_pickle


def _read_pickle(file: Path) -> tuple[list, list]:
    try:
        with open(file, "rb") as f:
            loaded = pair_pickle.load(f)
    except pair_pickle.Refused as refused:
        raise UserError(f"{file} is not a pair set: its pickle asks for {refused.name}, which a pair set never needs, "
                        f"so it was not loaded; re-download the .bin from a source you trust") from None
    except Exception as exc:
        raise UserError(f"{file} is not a pair-set pickle of (images, issame) ({exc}); re-download it") from None
    if not (isinstance(loaded, (tuple, list)) and len(loaded) == 2
            and all(isinstance(part, (list, tuple)) for part in loaded)):
        raise UserError(f"{file} holds a {type(loaded).__name__}, not the pair-set pickle of (list of images, "
                        f"list of issame flags); re-download it")
    return loaded[0], loaded[1]


def load_pair_set(path: str) -> PairSet:
    """Read an InsightFace `.bin` pair set: pickle of (2N JPEG byte strings, N issame bools)."""
    file = Path(path)
    if not file.is_file():
        raise UserError(f"verification pair set {file} does not exist: check the path (training reads the .bin "
                        f"beside train.rec, and trains without pair sets with dataset.val=null)")
    blobs, issame = _read_pickle(file)
    if len(issame) < 10:
        raise UserError(f"{file} holds {len(issame)} pairs, fewer than the 10 folds of the protocol; re-download it")
    if len(blobs) != 2 * len(issame):
        raise UserError(f"{file} holds {len(blobs)} images for {len(issame)} pairs (expected twice as many, two "
                        f"per pair); re-download it")
    flags = [s for s in issame if not isinstance(s, bool)]
    if flags:
        raise UserError(f"{file} has an issame flag {flags[0]!r} that is not a bool; re-download it")
    images = []
    for i, blob in enumerate(blobs):
        data = pair_pickle.image_bytes(blob)
        if data is None:
            raise UserError(f"{file} holds a {type(blob).__name__} as image {i}, not encoded image bytes; "
                            f"re-download it")
        try:
            images.append(decode_image(data))
        except ValueError as e:
            raise UserError(f"image {i} (pair {i // 2}) of {file}: {e}; re-download the .bin") from None
    odd = next((i for i, image in enumerate(images) if image.shape != images[0].shape), None)
    if odd is not None:
        raise UserError(f"image {odd} of {file} is {tuple(images[odd].shape)[1:]} pixels but image 0 is "
                        f"{tuple(images[0].shape)[1:]}: a pair set holds images of one size; re-download it")
    return PairSet(torch.stack(images), torch.tensor(issame, dtype=torch.bool))
