"""Start-up checks of a RecordIO file that read the `.idx` and record headers only, never an image.

Each finds the first bad record and reports it as the reader would when it met it, as one sentence naming the file,
key and offset, so bad data stops a run before training starts rather than in a loader worker hours later.
"""
from __future__ import annotations

import mmap
import os

import numpy as np

from arcface.data.recordio import MAGIC, MAX_CHUNK, RecordReader, first_label
from arcface.errors import UserError

# Words read per record: chunk header (magic, lrecord), IRHeader (flag, label, id, id2), first entry of a label array.
_WORDS = 2 + 6 + 1
_ROWS = 1 << 16  # records per vectorised block: the (rows, _WORDS) gather stays a few MB


def check_offsets(reader: RecordReader) -> None:
    """Every `.idx` offset lies inside the `.rec`, and the record at the largest offset is complete: a `.rec` cut
    short (an interrupted copy) or an `.idx` of another file stops here."""
    index = reader._require_index()
    if not len(index):
        return
    outside = np.flatnonzero((index.offsets < 0) | (index.offsets >= reader.size))
    if len(outside):
        reader.offset_of(int(index.keys[outside[0]]))  # raises the reader's "past the end" error for that key
    last = int(np.argmax(index.offsets))
    reader.read_at(int(index.offsets[last]), int(index.keys[last]))  # raises if the last record is truncated


def record_labels(reader: RecordReader, keys: np.ndarray) -> np.ndarray:
    """The class label (the first label of an array) of each record in `keys`, as float64, from the headers alone.

    Headers are gathered from one read-only mmap of the `.rec` with numpy, a block of records at a time (records are
    4-byte aligned, so as rows of 32-bit words); records this cannot take (split into chunks, a wrong magic, a short
    or misaligned record) go through `RecordReader.read_header`, which returns their label or raises its error.
    """
    index = reader._require_index()
    offsets = index.offsets[index.positions(keys)]
    labels = np.empty(len(keys), dtype=np.float64)
    slow = []
    if reader.size >= 4 * _WORDS:
        with open(reader.rec_path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mapped:
            words = np.frombuffer(mapped, dtype="<u4", count=reader.size // 4)
            try:
                for start in range(0, len(keys), _ROWS):
                    block = slice(start, start + _ROWS)
                    labels[block], fast = _block_labels(words, offsets[block])
                    slow.append(np.flatnonzero(~fast) + start)
            finally:
                del words  # the mmap cannot close while numpy holds a view of it
    rows = np.concatenate(slow) if slow else np.arange(len(keys))  # a file too short to map: all the slow way
    for row in rows.tolist():
        labels[row] = first_label(reader.read_header(int(keys[row])))
    return labels


def _block_labels(words: np.ndarray, offsets: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(labels, whether each was read here) of the records at `offsets`, a row of header words per record."""
    fits = (offsets % 4 == 0) & (offsets >= 0) & (offsets // 4 + _WORDS <= len(words))
    heads = words[np.where(fits, offsets // 4, 0)[:, None] + np.arange(_WORDS)]
    magic, lrecord, flag = heads[:, 0], heads[:, 1], heads[:, 2]
    whole = lrecord >> 29 == 0  # one chunk: the payload is contiguous
    fast = fits & (magic == MAGIC) & whole & ((lrecord & MAX_CHUNK) >= 24 + 4 * flag.astype(np.int64))
    floats = heads.view("<f4")
    return np.where(flag > 0, floats[:, 8], floats[:, 3]).astype(np.float64), fast


def label_faults(labels: np.ndarray, identities: int | None = None) -> np.ndarray:
    """Mask of the labels that name no class: not a whole number from 0, or not below `identities`, the number of
    identity records, which declare the classes of an InsightFace-layout file."""
    whole = np.isfinite(labels) & (labels == np.floor(labels)) & (labels >= 0)
    return ~whole if identities is None else ~whole | (labels >= identities)


def label_fault(label: float, identities: int | None = None) -> str:
    """What is wrong with a label that `label_faults` flagged."""
    if not label_faults(np.array([label]))[0]:  # a class number, just not one of the file's classes
        return f"label {int(label)}, beyond the classes 0..{identities - 1} its {identities} identity records declare"
    return f"label {label:g}, not a class number (a whole number from 0)"


def check_labels(reader: RecordReader, keys: np.ndarray, labels: np.ndarray, identities: int | None = None) -> None:
    """Stop at the first label that names no class (see `label_faults`)."""
    rows = np.flatnonzero(label_faults(labels, identities))
    if len(rows):
        key = int(keys[rows[0]])
        raise UserError(f"record {key} at offset {reader.offset_of(key)} of {reader.rec_path} has "
                        f"{label_fault(labels[rows[0]], identities)}: re-pack the file with the right labels; "
                        f"`python tools/inspect_rec.py {os.path.dirname(reader.rec_path) or '.'}` lists every bad "
                        f"record.")
