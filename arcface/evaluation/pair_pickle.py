"""Unpickling a `.bin` pair set without running anything the file names.

Unpickling calls whatever callables a pickle names, so a pair set is read by an unpickler that resolves only the
names the writers of pair sets need, each to a stand-in of this module that accepts only what a pair set holds:

- `_codecs.encode(text, "latin1")`: how Python 3 rebuilds bytes under protocol 2;
- `bytearray(bytes)`;
- numpy uint8 arrays (`cv2.imencode` output, which some tools store as the JPEG): `numpy.dtype("u1")`,
  `numpy.ndarray` + `_reconstruct` (protocols 2-4) or `_frombuffer` (protocol 5), under numpy 1 and 2 module names;
  `image_bytes` gives their bytes;
- numpy bool scalars (`numpy.dtype("b1")` + `scalar`) as issame flags; they come out as bool.

Anything else is refused (`Refused`), before it is called. Python 2 pickles (the public files) are read with
`encoding="bytes"`, so their strings come out as bytes.
"""
from __future__ import annotations

import pickle
from typing import BinaryIO


class Refused(Exception):
    """The pickle asked for something a pair set never needs; `name` says what."""

    def __init__(self, name: str):
        super().__init__(name)
        self.name = name


def _raw(data) -> bytes:
    """Raw bytes as a pickle carries them: bytes, or text holding bytes as latin-1 (protocol 2 from Python 3)."""
    if isinstance(data, str):
        return data.encode("latin-1")
    if isinstance(data, (bytes, bytearray)):
        return bytes(data)
    raise Refused(f"raw data given as a {type(data).__name__}")


def _encode(text, encoding: str = "utf-8", errors: str = "strict") -> bytes:
    if encoding not in ("latin1", "latin-1") or not isinstance(text, str):
        raise Refused(f"_codecs.encode with encoding {encoding!r}")
    return text.encode("latin-1", errors)


def _bytearray(data) -> bytearray:
    if not isinstance(data, bytes):  # not a count: bytearray(10**12) would allocate a terabyte
        raise Refused(f"bytearray of a {type(data).__name__}")
    return bytearray(data)


class _Dtype:
    """numpy's bool or uint8 dtype; byte order, the state numpy sets, means nothing for one-byte types."""

    def __init__(self, code: str):
        self.code = code

    def __setstate__(self, state) -> None:
        pass


def _dtype(code, align=False, copy=False) -> _Dtype:
    code = code.decode("latin-1") if isinstance(code, bytes) else code
    if code not in ("b1", "u1"):
        raise Refused(f"numpy.dtype({code!r})")
    return _Dtype(code)


class _NdarrayType:
    """What `numpy.ndarray` resolves to: only ever passed to `_reconstruct`."""


class _Uint8Array:
    """A numpy uint8 array (any shape) kept as its bytes; numpy's state: (version, shape, dtype, fortran, raw)."""

    def __init__(self, data: bytes = b""):
        self.data = data

    def __setstate__(self, state) -> None:
        if not (isinstance(state, tuple) and len(state) == 5):
            raise Refused("a numpy array state of another form")
        _require_uint8(state[2])
        self.data = _raw(state[4])


def _require_uint8(dtype) -> None:
    if not (isinstance(dtype, _Dtype) and dtype.code == "u1"):
        raise Refused("a numpy array of another type than uint8")


def _reconstruct(subtype, shape, typecode) -> _Uint8Array:
    if subtype is not _NdarrayType:
        raise Refused("numpy _reconstruct of another type than ndarray")
    return _Uint8Array()


def _frombuffer(buffer, dtype, shape, order) -> _Uint8Array:
    _require_uint8(dtype)
    return _Uint8Array(_raw(buffer))


def _scalar(dtype, data=b"\0") -> bool:
    raw = _raw(data)
    if not (isinstance(dtype, _Dtype) and dtype.code == "b1" and len(raw) == 1):
        raise Refused("a numpy scalar of another type than bool")
    return raw != b"\0"


_ALLOWED = {
    ("_codecs", "encode"): _encode,
    ("builtins", "bytearray"): _bytearray,
    ("__builtin__", "bytearray"): _bytearray,
    ("numpy", "dtype"): _dtype,
    ("numpy", "ndarray"): _NdarrayType,
}
for _core in ("numpy.core", "numpy._core"):  # numpy 1 and numpy 2 spellings
    _ALLOWED.update({(f"{_core}.multiarray", "_reconstruct"): _reconstruct,
                     (f"{_core}.multiarray", "scalar"): _scalar,
                     (f"{_core}.numeric", "_frombuffer"): _frombuffer})


class _Unpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        allowed = _ALLOWED.get((module, name))
        if allowed is None:
            raise Refused(f"{module}.{name}")
        return allowed


def load(file: BinaryIO):
    """The unpickled object; raises `Refused` for anything a pair set never needs, pickle's errors for a damaged
    file. Images stored as numpy arrays come out as stand-ins: read every image through `image_bytes`."""
    return _Unpickler(file, encoding="bytes").load()


def image_bytes(blob) -> bytes | None:
    """The encoded image an entry of a pair set's image list holds, or None when it holds something else."""
    if isinstance(blob, _Uint8Array):
        return blob.data
    return bytes(blob) if isinstance(blob, (bytes, bytearray)) else None
