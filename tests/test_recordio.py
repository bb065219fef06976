"""RecordIO format: the MXNet-written fixtures byte for byte, write->read properties, and clear errors on bad files."""
from __future__ import annotations

import hashlib
import json
import os
import pickle
import struct

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from arcface.data.recordio import (MAGIC, IRHeader, RecordIndex, RecordReader, RecordWriter, _exact_bounds,
                                   encode_record, pack, read_layout, unpack)
from arcface.errors import UserError
from conftest import FIXTURES, copy_rec

MANIFEST = json.loads((FIXTURES / "MANIFEST.json").read_text())
MAGIC_BYTES = struct.pack("<I", MAGIC)


def _reader(name: str) -> RecordReader:
    return RecordReader(FIXTURES / name / "train.rec", FIXTURES / name / "train.idx")


def _md5(data: bytes) -> str:
    return hashlib.md5(data).hexdigest()


@pytest.mark.parametrize("name", ["insightface_header", "plain", "continuation"])
def test_fixture_records_match_manifest(name):
    reader = _reader(name)
    for expected in MANIFEST[name]["records"]:
        header, data = unpack(reader.read(expected["key"]))
        label = list(header.label) if header.flag else header.label
        assert label == expected["label"]
        assert len(data) == expected.get("jpeg_len", expected.get("payload_len"))
        assert _md5(data) == expected.get("jpeg_md5", expected.get("payload_md5"))


def test_insightface_header_layout():
    reader = _reader("insightface_header")
    manifest = MANIFEST["insightface_header"]
    header, data = unpack(reader.read(0))
    assert (header.flag, list(header.label), data) == (2, manifest["header"], b"")
    layout = read_layout(reader)
    assert layout.insightface
    assert layout.image_keys.tolist() == [r["key"] for r in manifest["records"]]
    assert layout.num_identities == manifest["num_classes"]
    first_identity = manifest["header"][0]
    for label, expected in enumerate(manifest["identity_ranges"]):
        identity = reader.read_header(first_identity + label)
        assert [int(x) for x in identity.label] == expected


@pytest.mark.parametrize("images,identities", [(16_000_000, 1_000_000), (1 << 24, 10), (30_000_000, 2_000_000),
                                               (1000, 10)])
def test_header_bounds_rounded_by_float32_are_found_exactly(images, identities):
    """The header holds end = images + 1 and stop = end + identities as float32: past 2**24 they read back rounded
    (16,000,000 images of 1,000,000 identities read as 999,999 identities; 2**24 images as 2**24 - 1)."""
    end, stop = images + 1, images + 1 + identities
    read = (int(np.float32(end)), int(np.float32(stop)))
    assert _exact_bounds(*read, is_identity=lambda key: key >= end, last_key=stop - 1) == (end, stop)


def test_header_bounds_without_an_identity_record_near_the_end_are_refused():
    assert _exact_bounds(1 << 25, (1 << 25) + 8, is_identity=lambda key: False, last_key=(1 << 25) + 7) is None


def test_plain_layout_keys_and_array_label():
    reader = _reader("plain")
    layout = read_layout(reader)
    assert not layout.insightface and layout.num_identities is None
    assert layout.image_keys.tolist() == list(range(10))
    assert reader.read_header(9) == IRHeader(3, (3.0, 1.5, -2.0), 9, 0)


def test_continuation_fixture_really_is_chunked():
    raw = (FIXTURES / "continuation" / "train.rec").read_bytes()
    cflags = []
    pos = 0
    while pos < len(raw):
        magic, lrecord = struct.unpack_from("<II", raw, pos)
        assert magic == MAGIC
        length = lrecord & ((1 << 29) - 1)
        cflags.append(lrecord >> 29)
        pos += 8 + length + (-length % 4)
    assert {1, 2, 3} <= set(cflags)
    assert [payload for _, payload in _reader("continuation").scan()] == [
        _reader("continuation").read(k) for k in range(3)]


@pytest.mark.parametrize("name", ["insightface_header", "plain", "continuation"])
def test_writer_reproduces_mxnet_files_byte_for_byte(tmp_path, name):
    reader = _reader(name)
    with RecordWriter(tmp_path / "train.rec", tmp_path / "train.idx") as writer:
        for key in reader.keys():
            header, data = unpack(reader.read(int(key)))
            assert pack(header, data) == reader.read(int(key))
            writer.write(pack(header, data), int(key))
    assert (tmp_path / "train.rec").read_bytes() == (FIXTURES / name / "train.rec").read_bytes()
    assert (tmp_path / "train.idx").read_text() == (FIXTURES / name / "train.idx").read_text()


def test_pair_set_fixture():
    from arcface.evaluation import load_pair_set

    manifest = MANIFEST["verification"]
    with open(FIXTURES / "verification" / "pairs.bin", "rb") as f:
        blobs, issame = pickle.load(f, encoding="bytes")
    assert len(blobs) == 2 * manifest["num_pairs"] and sum(issame) == manifest["num_same"]
    assert _md5(bytes(blobs[0])) == manifest["first_jpeg_md5"]
    pairs = load_pair_set(str(FIXTURES / "verification" / "pairs.bin"))
    assert tuple(pairs.images.shape) == (2 * manifest["num_pairs"], 3, 112, 112)
    assert int(pairs.issame.sum()) == manifest["num_same"]


payloads = st.one_of(
    st.binary(max_size=200),
    # Payloads built from pieces with the magic spliced in at arbitrary (often aligned) places.
    st.lists(st.one_of(st.just(MAGIC_BYTES), st.binary(max_size=9)), max_size=12).map(b"".join),
)
labels = st.one_of(st.floats(width=32, allow_nan=False),
                   st.lists(st.floats(width=32, allow_nan=False), min_size=1, max_size=5).map(tuple))


@settings(max_examples=150, deadline=None)
@given(records=st.lists(st.tuples(labels, payloads), max_size=8), ids=st.integers(0, 2**64 - 1))
def test_write_read_roundtrip(tmp_path_factory, records, ids):
    folder = tmp_path_factory.mktemp("rt")
    keys = [3 * i + 7 for i in range(len(records))]  # sparse keys exercise the non-range index
    with RecordWriter(folder / "r.rec", folder / "r.idx") as writer:
        for key, (label, data) in zip(keys, records):
            writer.write(pack(IRHeader(0, label, ids, key), data), key)
    reader = RecordReader(folder / "r.rec", folder / "r.idx")
    for key, (label, data) in zip(keys, records):
        header, got = unpack(reader.read(key))
        assert got == data and header.id == ids and header.id2 == key
        assert header.label == (label if isinstance(label, float) else tuple(label))
        assert header.flag == (0 if isinstance(label, float) else len(label))
    assert [unpack(p)[1] for _, p in reader.scan()] == [data for _, data in records]


@given(payloads)
def test_encoded_record_is_aligned_and_has_no_stray_magic(payload):
    raw = encode_record(payload)
    assert len(raw) % 4 == 0
    magic_positions = [i for i in range(0, len(raw), 4) if raw[i:i + 4] == MAGIC_BYTES]
    # Every aligned magic left in the file starts a chunk: a reader can always resynchronise on it.
    chunks, pos = [], 0
    while pos < len(raw):
        chunks.append(pos)
        length = struct.unpack_from("<I", raw, pos + 4)[0] & ((1 << 29) - 1)
        pos += 8 + length + (-length % 4)
    assert magic_positions == chunks


def test_index_parses_in_blocks(tmp_path):
    lines = "".join(f"{k}\t{k * 40}\n" for k in range(1000))
    (tmp_path / "a.idx").write_text(lines)
    index = RecordIndex.load(tmp_path / "a.idx", block_bytes=64)
    assert index.keys.tolist() == list(range(1000)) and index.offset(999) == 39960


def test_missing_idx_names_file_and_fix(tmp_path):
    folder = copy_rec(FIXTURES / "plain", tmp_path)
    os.remove(folder / "train.idx")
    with pytest.raises(UserError, match=r"train\.idx is missing in .*--write-idx"):
        RecordReader(folder / "train.rec", folder / "train.idx")


def test_truncated_rec_names_key_and_offset(tmp_path):
    folder = copy_rec(FIXTURES / "plain", tmp_path)
    raw = (folder / "train.rec").read_bytes()
    offset = RecordIndex.load(folder / "train.idx").offset(9)
    (folder / "train.rec").write_bytes(raw[:offset + 100])
    reader = RecordReader(folder / "train.rec", folder / "train.idx")
    with pytest.raises(UserError, match=rf"record 9 at offset {offset} .* truncated"):
        reader.read(9)


def test_idx_past_end_names_key_and_offset(tmp_path):
    folder = copy_rec(FIXTURES / "plain", tmp_path)
    size = os.path.getsize(folder / "train.rec")
    (folder / "train.idx").write_text(f"0\t0\n1\t{size + 8}\n")
    reader = RecordReader(folder / "train.rec", folder / "train.idx")
    with pytest.raises(UserError, match=rf"key 1 at offset {size + 8}, past the end"):
        reader.read(1)


def test_corrupt_magic_names_key_and_offset(tmp_path):
    folder = copy_rec(FIXTURES / "plain", tmp_path)
    (folder / "train.idx").write_text("0\t4\n")  # points inside record 0
    with pytest.raises(UserError, match=r"record 0 at offset 4 .*RecordIO magic"):
        RecordReader(folder / "train.rec", folder / "train.idx").read(0)


def test_malformed_idx(tmp_path):
    (tmp_path / "train.idx").write_text("0\t0\n1\tbanana\n")
    with pytest.raises(UserError, match="malformed"):
        RecordIndex.load(tmp_path / "train.idx")


def test_reader_reopens_after_fork_and_pickles(tmp_path):
    reader = _reader("plain")
    first = reader.read(3)
    clone = pickle.loads(pickle.dumps(reader))
    assert clone.read(3) == first
    pid = os.fork()
    if pid == 0:  # the child must not share the parent's descriptor state
        os._exit(0 if reader.read(3) == first and reader._pid == os.getpid() else 1)
    assert os.waitpid(pid, 0)[1] == 0
    assert np.array_equal(reader.keys(), clone.keys())
