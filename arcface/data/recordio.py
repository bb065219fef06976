"""The MXNet RecordIO format (dmlc-core), read and written without mxnet.

A record on disk: u32 magic, u32 lrecord (low 29 bits length, top 3 bits cflag), payload, zero padding to 4 bytes.
The writer splits a payload at every 4-byte-aligned occurrence of the magic (dropping it) into chunks flagged
first/middle/last; the reader joins them and puts the magic back. A payload starts with an IRHeader
(`<IfQQ`: flag, label, id, id2); when flag > 0, `flag` float32 labels follow and the struct's label is 0.
The `.idx` file is text, one `key<TAB>offset` line per record.
"""
from __future__ import annotations

import os
import struct
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterator, Sequence, Union

import numpy as np

from arcface.errors import UserError
from arcface.fileio import fsync_path, new_temporary

MAGIC = 0xCED7230A
_MAGIC_BYTES = struct.pack("<I", MAGIC)
_LENGTH_BITS = 29
MAX_CHUNK = (1 << _LENGTH_BITS) - 1
_WHOLE, _FIRST, _MIDDLE, _LAST = 0, 1, 2, 3
_IR = struct.Struct("<IfQQ")
_FLOAT32_EXACT = 1 << 24  # float32 labels (header key ranges) hold every integer only up to here

Label = Union[float, Sequence[float]]


@dataclass(frozen=True)
class IRHeader:
    """The image-record header; `label` is a float, or a tuple of floats when the record carries several."""

    flag: int
    label: Label
    id: int = 0
    id2: int = 0


def pack(header: IRHeader, data: bytes) -> bytes:
    """IRHeader + data -> payload; an array label sets `flag` to its length, as MXNet does."""
    if isinstance(header.label, (int, float, np.integer, np.floating)):
        return _IR.pack(0, float(header.label), header.id, header.id2) + data
    labels = np.asarray(header.label, dtype="<f4").ravel()
    return _IR.pack(labels.size, 0.0, header.id, header.id2) + labels.tobytes() + data


def unpack(payload: bytes) -> tuple[IRHeader, bytes]:
    """payload -> (IRHeader, data), the inverse of `pack`."""
    if len(payload) < _IR.size:
        raise ValueError(f"payload of {len(payload)} bytes is shorter than the {_IR.size}-byte IRHeader")
    flag, label, id_, id2 = _IR.unpack_from(payload)
    start = _IR.size
    if flag > 0:
        end = start + 4 * flag
        if len(payload) < end:
            raise ValueError(f"IRHeader announces {flag} labels but the payload has {len(payload)} bytes")
        label = tuple(float(x) for x in np.frombuffer(payload, dtype="<f4", count=flag, offset=start))
        start = end
    return IRHeader(flag, label, id_, id2), payload[start:]


def first_label(header: IRHeader) -> float:
    """The class label of an image record: the scalar label, or the first of an array label."""
    return header.label[0] if header.flag > 0 else header.label


def encode_record(payload: bytes) -> bytes:
    """payload -> the bytes of one on-disk record (split into chunks wherever the aligned magic occurs)."""
    pieces = []
    start = 0
    cflag = _WHOLE
    aligned_end = len(payload) - len(payload) % 4
    # Only 4-byte-aligned occurrences confuse a reader that resynchronises on aligned magic, so only they split.
    pos = payload.find(_MAGIC_BYTES, 0, aligned_end)
    while pos >= 0:
        if pos % 4 == 0:
            pieces.append(_chunk(payload[start:pos], _FIRST if cflag == _WHOLE else _MIDDLE))
            cflag = _LAST
            start = pos + 4
            pos = payload.find(_MAGIC_BYTES, start, aligned_end)
        else:
            pos = payload.find(_MAGIC_BYTES, pos + 1, aligned_end)
    pieces.append(_chunk(payload[start:], cflag))
    return b"".join(pieces)


def _chunk(data: bytes, cflag: int) -> bytes:
    if len(data) > MAX_CHUNK:
        raise ValueError(f"a RecordIO chunk holds at most {MAX_CHUNK} bytes, got {len(data)}")
    return struct.pack("<II", MAGIC, (cflag << _LENGTH_BITS) | len(data)) + data + b"\0" * (-len(data) % 4)


class RecordWriter:
    """Appends records to a `.rec` and, when `idx_path` is given, their `key<TAB>offset` lines to an `.idx`."""

    def __init__(self, rec_path: str | os.PathLike, idx_path: str | os.PathLike | None = None):
        self.rec_path = os.fspath(rec_path)
        self._rec = open(self.rec_path, "wb")
        self._idx = open(idx_path, "w") if idx_path is not None else None

    def write(self, payload: bytes, key: int | None = None) -> int:
        """Append one record; returns its offset. `key` is required when writing an index."""
        offset = self._rec.tell()
        self._rec.write(encode_record(payload))
        if self._idx is not None:
            if key is None:
                raise ValueError("a key is required when writing an index")
            self._idx.write(f"{key}\t{offset}\n")
        return offset

    def close(self) -> None:
        self._rec.close()
        if self._idx is not None:
            self._idx.close()

    def __enter__(self) -> "RecordWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


@contextmanager
def replaced_on_success(*paths: str) -> Iterator[list[str]]:
    """Yield unique temporary names beside `paths`; when the block succeeds, flush them to disk and move them into
    place in the order given, else delete them. Unique names let concurrent writers (ranks) share a target.

    Invariant for a `.rec` and its `.idx` (pass the `.rec` first): a crash at any moment leaves the old pair, the
    new pair, or a `.rec` with no `.idx`, never a `.rec` beside an `.idx` of other contents. The old `.idx` is
    deleted before the new `.rec` takes its place, the new `.idx` comes last, and the folder is flushed after each
    step so the steps reach the disk in that order. A reader refuses a `.rec` without `.idx` (and
    `tools/inspect_rec.py --write-idx` rebuilds it from the `.rec` alone).
    """
    temps = [os.fspath(new_temporary(p)) for p in paths]
    try:
        yield temps
        for temp in temps:
            fsync_path(temp)
    except BaseException:
        for temp in temps:
            if os.path.exists(temp):
                os.remove(temp)
        raise
    for path in paths[1:]:  # companions of the first path go first: none may outlive the file it describes
        if os.path.lexists(path):
            os.remove(path)
            fsync_path(os.path.dirname(path) or ".")
    for temp, path in zip(temps, paths):
        os.replace(temp, path)
        fsync_path(os.path.dirname(path) or ".")


class RecordIndex:
    """The `.idx` as two int64 arrays (keys, offsets) in file order, with O(1) lookup when keys are a range."""

    def __init__(self, keys: np.ndarray, offsets: np.ndarray, path: str = "<memory>"):
        self.keys = keys
        self.offsets = offsets
        self.path = path
        self._dense = len(keys) > 0 and bool(np.array_equal(keys, np.arange(keys[0], keys[0] + len(keys))))
        if not self._dense:
            self._order = np.argsort(keys, kind="stable")
            self._sorted = keys[self._order]

    @classmethod
    def load(cls, path: str | os.PathLike, block_bytes: int = 64 << 20) -> "RecordIndex":
        """Parse an `.idx` in bounded blocks (a 40M-line index never becomes 40M Python objects)."""
        path = os.fspath(path)
        parts = []
        carry = b""
        with open(path, "rb") as f:
            while True:
                block = f.read(block_bytes)
                if not block:
                    break
                block = carry + block
                cut = block.rfind(b"\n") + 1
                carry = block[cut:]
                parts.append(_parse_index_block(block[:cut], path))
        if carry.strip():
            parts.append(_parse_index_block(carry, path))
        pairs = np.concatenate(parts) if parts else np.empty(0, dtype=np.int64)
        if pairs.size % 2:
            raise UserError(f"{path} is malformed: every line must be `key<TAB>offset`; rebuild it with "
                            f"`python tools/inspect_rec.py --write-idx {os.path.dirname(path) or '.'}`.")
        pairs = pairs.reshape(-1, 2)
        return cls(np.ascontiguousarray(pairs[:, 0]), np.ascontiguousarray(pairs[:, 1]), path)

    def __len__(self) -> int:
        return len(self.keys)

    def __contains__(self, key: int) -> bool:
        return self.position(key) is not None

    def position(self, key: int) -> int | None:
        """Row of `key` in the index, or None."""
        if self._dense:
            pos = key - int(self.keys[0])
            return pos if 0 <= pos < len(self.keys) else None
        i = int(np.searchsorted(self._sorted, key))
        return int(self._order[i]) if i < len(self._sorted) and self._sorted[i] == key else None

    def positions(self, keys: np.ndarray) -> np.ndarray:
        """Rows of `keys`, all of which must be in the index."""
        if self._dense:
            return keys - self.keys[0]
        return self._order[np.searchsorted(self._sorted, keys)]

    def offset(self, key: int) -> int:
        pos = self.position(key)
        if pos is None:
            raise KeyError(key)
        return int(self.offsets[pos])

    def write(self, path: str | os.PathLike) -> None:
        with open(path, "w") as f:
            for start in range(0, len(self.keys), 1 << 20):
                rows = zip(self.keys[start:start + (1 << 20)].tolist(), self.offsets[start:start + (1 << 20)].tolist())
                f.write("".join(f"{k}\t{o}\n" for k, o in rows))


def _parse_index_block(text: bytes, path: str) -> np.ndarray:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        try:
            return np.fromstring(text, dtype=np.int64, sep=" ")
        except (ValueError, DeprecationWarning):
            raise UserError(f"{path} is malformed: every line must be `key<TAB>offset` with integers; rebuild it "
                            f"with `python tools/inspect_rec.py --write-idx {os.path.dirname(path) or '.'}`.") from None


class RecordReader:
    """Random access (by key, through the `.idx`) and sequential scans of a `.rec`.

    The file descriptor is opened lazily in each process and reads use `os.pread`, so one reader can be shared
    with (forked or spawned) DataLoader workers and used from threads without seeking.
    """

    def __init__(self, rec_path: str | os.PathLike, idx_path: str | os.PathLike | None = None):
        self.rec_path = os.fspath(rec_path)
        if not os.path.isfile(self.rec_path):
            raise UserError(f"{self.rec_path} does not exist: point dataset.root at a folder holding train.rec "
                            f"and train.idx, or pack one with `python tools/pack_rec.py SRC OUT_DIR`.")
        self.size = os.path.getsize(self.rec_path)
        self.index = None
        if idx_path is not None:
            idx_path = os.fspath(idx_path)
            if not os.path.isfile(idx_path):
                raise UserError(f"{os.path.basename(idx_path)} is missing in {os.path.dirname(idx_path) or '.'}: "
                                f"rebuild it from the .rec with `python tools/inspect_rec.py --write-idx "
                                f"{os.path.dirname(idx_path) or '.'}`.")
            self.index = RecordIndex.load(idx_path)
        self._fd = None
        self._pid = None

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_fd"] = state["_pid"] = None
        return state

    def _file(self) -> int:
        if self._pid != os.getpid():
            self._fd = os.open(self.rec_path, os.O_RDONLY)
            self._pid = os.getpid()
        return self._fd

    def keys(self) -> np.ndarray:
        return self._require_index().keys

    def offset_of(self, key: int) -> int:
        """File offset of `key`, checked against the file size."""
        index = self._require_index()
        pos = index.position(key)
        if pos is None:
            raise UserError(f"key {key} is not in {index.path}: the .idx does not match the .rec; rebuild it with "
                            f"`python tools/inspect_rec.py --write-idx {os.path.dirname(index.path) or '.'}`.")
        offset = int(index.offsets[pos])
        if not 0 <= offset < self.size:
            raise UserError(f"{index.path} points key {key} at offset {offset}, past the end of {self.rec_path} "
                            f"({self.size} bytes): the .rec is truncated or the .idx belongs to another file; "
                            f"re-copy the .rec or rebuild the .idx with `python tools/inspect_rec.py --write-idx`.")
        return offset

    def read(self, key: int) -> bytes:
        """The payload of record `key`."""
        return self.read_at(self.offset_of(key), key)[0]

    def read_header(self, key: int) -> IRHeader:
        """Just the IRHeader of record `key` (reads a few dozen bytes unless the label array is long)."""
        offset = self.offset_of(key)
        head = os.pread(self._file(), 8 + _IR.size + 16, offset)  # room for a short label array
        cflag, length = self._chunk_header(head, offset, key)
        flag = _IR.unpack_from(head, 8)[0] if len(head) >= 8 + _IR.size else 0
        need = _IR.size + 4 * flag
        if cflag == _WHOLE and need <= length and 8 + need <= len(head):
            payload = head[8:8 + need]
        else:
            payload = self.read_at(offset, key)[0]
        return self.unpack_checked(payload, offset, key)[0]

    def read_at(self, offset: int, key: int | None = None) -> tuple[bytes, int]:
        """(payload, offset of the next record) of the record starting at `offset`, chunks joined."""
        fd = self._file()
        pieces = []
        pos = offset
        while True:
            cflag, length = self._chunk_header(os.pread(fd, 8, pos), pos, key)
            # A record is one WHOLE chunk, or FIRST, any MIDDLE, LAST.
            expected = (_WHOLE, _FIRST) if not pieces else (_MIDDLE, _LAST)
            if cflag not in expected:
                raise UserError(self._where(offset, key) + f" has a chunk out of order at offset {pos} (cflag "
                                f"{cflag}): the .rec is corrupt or the .idx points inside a record; re-pack the .rec.")
            data = os.pread(fd, length, pos + 8)
            if len(data) < length:
                raise UserError(self._where(offset, key) + f" is truncated: its chunk at offset {pos} announces "
                                f"{length} bytes but the file ends at {self.size}; re-copy or re-pack the .rec.")
            pieces.append(data)
            pos += 8 + length + (-length % 4)
            if cflag in (_WHOLE, _LAST):
                break
        return _MAGIC_BYTES.join(pieces), pos

    def _chunk_header(self, head: bytes, pos: int, key: int | None) -> tuple[int, int]:
        if len(head) < 8:
            raise UserError(self._where(pos, key) + f" is truncated: the file ends at {self.size} bytes inside the "
                            f"record header; re-copy or re-pack the .rec.")
        magic, lrecord = struct.unpack_from("<II", head)
        if magic != MAGIC:
            raise UserError(self._where(pos, key) + f" does not start with the RecordIO magic (found {magic:#010x}): "
                            f"the .rec is corrupt or the .idx belongs to another file; rebuild the .idx with "
                            f"`python tools/inspect_rec.py --write-idx` or re-pack the .rec.")
        return lrecord >> _LENGTH_BITS, lrecord & MAX_CHUNK

    def unpack_checked(self, payload: bytes, offset: int, key: int | None) -> tuple[IRHeader, bytes]:
        try:
            return unpack(payload)
        except ValueError as e:
            raise UserError(self._where(offset, key) + f" has a broken IRHeader ({e}); re-pack the .rec.") from None

    def scan(self, start: int = 0) -> Iterator[tuple[int, bytes]]:
        """(offset, payload) of every record from `start` to the end of the file, in file order."""
        pos = start
        while pos < self.size:
            payload, next_pos = self.read_at(pos)
            yield pos, payload
            pos = next_pos

    def _where(self, offset: int, key: int | None) -> str:
        who = f"record {key}" if key is not None else "the record"
        return f"{who} at offset {offset} of {self.rec_path}"

    def _require_index(self) -> RecordIndex:
        if self.index is None:
            raise ValueError(f"{self.rec_path} was opened without an .idx; random access needs one")
        return self.index


class PlainWriter:
    """Writes images in the plain layout: keys 0..N-1, each record an image with its label (a float or floats)."""

    def __init__(self, rec_path: str | os.PathLike, idx_path: str | os.PathLike):
        self._writer = RecordWriter(rec_path, idx_path)
        self.next_key = 0

    def add(self, label: Label, data: bytes) -> int:
        key = self.next_key
        self._writer.write(pack(IRHeader(0, label, key), data), key)
        self.next_key += 1
        return key

    def close(self) -> None:
        self._writer.close()

    def __enter__(self) -> "PlainWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class InsightFaceWriter:
    """Streams images, grouped by label 0, 1, 2, ..., into the InsightFace layout: header record 0, images at keys
    1..N, then one identity record per label with its key range [start, end). The header is written last, in
    place (its size never changes), so nothing has to be counted beforehand."""

    def __init__(self, rec_path: str | os.PathLike, idx_path: str | os.PathLike):
        self._writer = RecordWriter(rec_path, idx_path)
        self._writer.write(self._header(0, 0), 0)
        self.next_key = 1
        self.ranges: list[tuple[int, int]] = []

    @staticmethod
    def _header(end: int, stop: int) -> bytes:
        return pack(IRHeader(2, (float(end), float(stop))), b"")

    def add(self, label: int, data: bytes) -> int:
        """Append one image (encoded bytes) of identity `label`; returns its key."""
        if label < len(self.ranges) - 1:
            raise ValueError(f"images must come grouped by label in increasing order; got label {label} after "
                             f"{len(self.ranges) - 1}")
        self.reserve(label)
        key = self.next_key
        self._writer.write(pack(IRHeader(0, float(label), key), data), key)
        self.ranges[label] = (self.ranges[label][0], key + 1)
        self.next_key += 1
        return key

    def reserve(self, label: int) -> None:
        """Give identity `label`, and every one before it, an identity record even if none of its images come:
        identities without images get empty ranges, and still count as classes."""
        while len(self.ranges) <= label:
            self.ranges.append((self.next_key, self.next_key))

    def close(self) -> None:
        end = self.next_key
        for label, (start, stop) in enumerate(self.ranges):
            self._writer.write(pack(IRHeader(2, (float(start), float(stop)), end + label), b""), end + label)
        self._writer.close()
        with open(self._writer.rec_path, "r+b") as f:
            f.write(encode_record(self._header(end, end + len(self.ranges))))

    def __enter__(self) -> "InsightFaceWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


@dataclass(frozen=True)
class Layout:
    """Which records of a `.rec` are images: the InsightFace layout (header record 0, images 1..N-1, identity
    records after) or the plain one (every record an image, any keys)."""

    image_keys: np.ndarray
    insightface: bool
    num_identities: int | None = None  # identity records of the InsightFace layout: a free class count


def read_layout(reader: RecordReader) -> Layout:
    """Tell the two layouts apart from record 0 alone: an InsightFace header has an array label and no image."""
    index = reader._require_index()
    if 0 in index:
        payload = reader.read(0)
        header, data = reader.unpack_checked(payload, reader.offset_of(0), 0)
        if header.flag >= 2 and not data:
            read = tuple(int(x) for x in header.label[:2])
            exact = _exact_bounds(*read, lambda key: key in reader.index and not unpack(reader.read(key))[1],
                                  int(reader.index.keys.max()))
            if exact is None:
                raise UserError(f"the header record of {reader.rec_path} says images end near key {read[0]}, but no "
                                f"identity record is there: the header is wrong; re-pack the images with "
                                f"`python tools/pack_rec.py`.")
            end, stop = exact
            keys = np.arange(1, end, dtype=np.int64)
            missing = _missing(index, keys)
            if missing is not None:
                raise UserError(f"{index.path} lacks key {missing}, which the header record of {reader.rec_path} "
                                f"lists as an image (keys 1..{end - 1}): the .idx is incomplete; rebuild it with "
                                f"`python tools/inspect_rec.py --write-idx {os.path.dirname(index.path) or '.'}`.")
            return Layout(keys, insightface=True, num_identities=max(stop - end, 0))
    return Layout(index.keys, insightface=False)


def _exact_bounds(end: int, stop: int, is_identity: Callable[[int], bool], last_key: int) -> tuple[int, int] | None:
    """The header's (end, stop) as written, from the values read back (None if no identity record is near `end`).

    Its label is float32, which holds every integer only up to 2**24: once `stop` (images + identities + 1) passes
    that, either value may be rounded (2**24 + 1 reads as 2**24). Then the images end at the first identity record
    (a record without image bytes) near `end`, and the identity records run to the last key.
    """
    if max(end, stop) < _FLOAT32_EXACT:
        return end, stop
    spacing = int(np.spacing(np.float32(end)))
    first = next((key for key in range(end - spacing, end + spacing + 1) if is_identity(key)), None)
    return None if first is None else (first, last_key + 1)


def _missing(index: RecordIndex, keys: np.ndarray) -> int | None:
    """The first of `keys` that is not in `index`, or None."""
    if not len(keys):
        return None
    if index._dense:
        lo, hi = int(index.keys[0]), int(index.keys[0]) + len(index.keys)
        bad = keys[(keys < lo) | (keys >= hi)]
    else:
        bad = keys[~np.isin(keys, index.keys)]
    return int(bad[0]) if len(bad) else None
