"""Pair sets for 1:1 verification (LFW, CFP-FP, AgeDB-30 and the synthetic held-out set).

A `.bin` pair set is a pickle, and unpickling runs whatever callables the file names, so these files are read with
an unpickler that resolves only the few names a pair set needs: none that can reach the file system, processes or
imports. Everything else in the file is plain pickle data (lists, tuples, byte and text strings, bools).
"""
from __future__ import annotations

import pickle
from pathlib import Path

import torch

from arcface.data.decode import decode_image
from arcface.data.pair_set import PairSet
from arcface.errors import UserError


class _Refused(Exception):
    """The pickle named a global a pair set never needs; `name` is `module.name`."""

    def __init__(self, name: str):
        super().__init__(name)
        self.name = name


def _latin1(text, encoding: str = "utf-8", errors: str = "strict") -> bytes:
    """`_codecs.encode` as protocol-2 pickles use it to rebuild bytes (Python 3 writers): latin-1 only."""
    if encoding not in ("latin1", "latin-1") or not isinstance(text, str):
        raise _Refused(f"_codecs.encode with encoding {encoding!r}")
    return text.encode("latin-1", errors)


class _BoolDtype:
    """Stands in for numpy's bool dtype, whose only use here is to rebuild numpy bool labels."""

    def __setstate__(self, state) -> None:
        pass  # numpy's byte-order/flags tuple; a bool is one byte either way


def _numpy_dtype(name, align=False, copy=False) -> _BoolDtype:
    if name not in ("b1", b"b1"):
        raise _Refused(f"numpy.dtype({name!r})")
    return _BoolDtype()


def _numpy_scalar(dtype, data=b"\0") -> bool:
    """numpy's scalar reconstructor, for bool scalars (same/different flags written from numpy) only."""
    raw = data.encode("latin-1") if isinstance(data, str) else bytes(data)
    if not isinstance(dtype, _BoolDtype) or len(raw) != 1:
        raise _Refused("numpy.core.multiarray.scalar of a non-bool")
    return raw != b"\0"


def _bytearray(data: bytes) -> bytearray:
    """bytearray of given bytes only (not of a count: `bytearray(10**12)` would be a memory bomb)."""
    if not isinstance(data, bytes):
        raise _Refused(f"bytearray of a {type(data).__name__}")
    return bytearray(data)


# (module, name) as the pickle spells it, Python 2 and numpy 1/2 spellings included.
_ALLOWED = {
    ("_codecs", "encode"): _latin1,
    ("builtins", "bytearray"): _bytearray,
    ("__builtin__", "bytearray"): _bytearray,
    ("numpy", "dtype"): _numpy_dtype,
    ("numpy.core.multiarray", "scalar"): _numpy_scalar,
    ("numpy._core.multiarray", "scalar"): _numpy_scalar,
}


class _PairSetUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        allowed = _ALLOWED.get((module, name))
        if allowed is None:
            raise _Refused(f"{module}.{name}")
        return allowed


def _read_pickle(file: Path) -> tuple[list, list]:
    try:
        with open(file, "rb") as f:
            # encoding="bytes": the public files are Python 2 pickles whose str objects are JPEG bytes.
            loaded = _PairSetUnpickler(f, encoding="bytes").load()
    except _Refused as refused:
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
        raise UserError(f"verification pair set {file} does not exist: put the .bin beside train.rec, "
                        f"or train without it by removing it from dataset.val (e.g. 'dataset.val={{}}')")
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
        if not isinstance(blob, (bytes, bytearray)):
            raise UserError(f"{file} holds a {type(blob).__name__} as image {i}, not encoded image bytes; "
                            f"re-download it")
        try:
            images.append(decode_image(bytes(blob)))
        except ValueError as e:
            raise UserError(f"image {i} (pair {i // 2}) of {file} is not a decodable image ({e}); "
                            f"re-download the .bin") from None
    odd = next((i for i, image in enumerate(images) if image.shape != images[0].shape), None)
    if odd is not None:
        raise UserError(f"image {odd} of {file} is {tuple(images[odd].shape)[1:]} pixels but image 0 is "
                        f"{tuple(images[0].shape)[1:]}: a pair set holds images of one size; re-download it")
    return PairSet(torch.stack(images), torch.tensor(issame, dtype=torch.bool))
