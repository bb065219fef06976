"""Bad data stops at start-up with one sentence naming the file, key and offset: an `.idx` past the end of a cut
`.rec`, labels that name no class (both layouts), decompression bombs, and errors met inside loader workers."""
from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from arcface.data import ImageFolderDataset, RecordDataset
from arcface.data.decode import encode_jpeg
from arcface.data.loader import build_loader
from arcface.data.record_checks import record_labels
from arcface.data.recordio import MAGIC, PlainWriter, RecordIndex, RecordReader, first_label, read_layout
from arcface.errors import UserError
from conftest import FIXTURES, copy_rec

JPEG = encode_jpeg(np.random.default_rng(0).integers(0, 256, (112, 112, 3), dtype=np.uint8))


def _plain(folder: Path, labels: list, data: list[bytes] | None = None) -> Path:
    with PlainWriter(folder / "train.rec", folder / "train.idx") as writer:
        for i, label in enumerate(labels):
            writer.add(label, data[i] if data else JPEG)
    return folder


def _one_sentence(error: pytest.ExceptionInfo) -> str:
    message = str(error.value)
    assert "\n" not in message and "Traceback" not in message
    return message


def _jpeg_declaring(width: int, height: int) -> bytes:
    bomb = bytearray(JPEG)
    sof = bomb.find(b"\xff\xc0")  # baseline frame header: length, precision, height, width
    bomb[sof + 5:sof + 9] = struct.pack(">HH", height, width)
    return bytes(bomb)


def _png_declaring(width: int, height: int) -> bytes:
    out = io.BytesIO()
    Image.fromarray(np.zeros((4, 4, 3), dtype=np.uint8)).save(out, "PNG")
    png = bytearray(out.getvalue())
    png[16:24] = struct.pack(">II", width, height)  # IHDR data, then its CRC
    png[29:33] = struct.pack(">I", zlib.crc32(bytes(png[12:29])))
    return bytes(png)


@pytest.mark.parametrize("name", ["insightface_header", "plain", "continuation"])
def test_header_scan_reads_the_labels_the_reader_reads(name):
    reader = RecordReader(FIXTURES / name / "train.rec", FIXTURES / name / "train.idx")
    keys = read_layout(reader).image_keys
    expected = [first_label(reader.read_header(int(k))) for k in keys]
    assert record_labels(reader, keys).tolist() == expected


def test_header_scan_takes_chunked_records_the_slow_way(tmp_path):
    # A payload with the magic at an aligned place is split into chunks; its label still comes out right.
    chunked = JPEG[:8] + struct.pack("<I", MAGIC) + JPEG[8:]
    _plain(tmp_path, [0.0, 7.0, 2.0], [JPEG, chunked, JPEG])
    reader = RecordReader(tmp_path / "train.rec", tmp_path / "train.idx")
    assert record_labels(reader, reader.keys()).tolist() == [0.0, 7.0, 2.0]


def test_rec_cut_short_stops_at_construction(tmp_path):
    _plain(tmp_path, [float(i % 3) for i in range(20)])
    index = RecordIndex.load(tmp_path / "train.idx")
    raw = (tmp_path / "train.rec").read_bytes()
    (tmp_path / "train.rec").write_bytes(raw[:index.offset(12) + 40])  # an interrupted copy
    with pytest.raises(UserError, match=rf"key 13 at offset {index.offset(13)}, past the end of .*train.rec "
                                        rf"\({index.offset(12) + 40} bytes\)") as err:
        RecordDataset(str(tmp_path), num_classes=3)
    _one_sentence(err)
    (tmp_path / "train.idx").write_text("".join(f"{k}\t{index.offset(k)}\n" for k in range(13)))
    with pytest.raises(UserError, match=rf"record 12 at offset {index.offset(12)} .* is truncated"):
        RecordDataset(str(tmp_path), num_classes=3)


def test_idx_of_another_file_stops_at_construction(tmp_path):
    _plain(tmp_path, [0.0, 1.0, 2.0])
    index = RecordIndex.load(tmp_path / "train.idx")
    (tmp_path / "train.idx").write_text(f"0\t0\n1\t{index.offset(1) + 8}\n2\t{index.offset(2)}\n")
    with pytest.raises(UserError, match=rf"record 1 at offset {index.offset(1) + 8} .* RecordIO magic"):
        RecordDataset(str(tmp_path), num_classes=3)


@pytest.mark.parametrize("label,shown", [(float("nan"), "nan"), (-1.0, "-1"), (2.5, "2.5"), (float("inf"), "inf"),
                                         ((float("nan"), 1.0), "nan")])
def test_plain_labels_that_name_no_class_stop_at_construction(tmp_path, label, shown):
    _plain(tmp_path, [0.0, 1.0, label, 2.0])
    offset = RecordIndex.load(tmp_path / "train.idx").offset(2)
    with pytest.raises(UserError, match=rf"record 2 at offset {offset} of .*train.rec has label {shown}, not a class "
                                        rf"number .*inspect_rec.py") as err:
        RecordDataset(str(tmp_path), num_classes=3)
    _one_sentence(err)


def test_plain_label_beyond_num_classes_names_the_count(tmp_path):
    _plain(tmp_path, [0.0, 1.0, 6.0])
    with pytest.raises(UserError, match=r"has 7 classes \(from its labels\) but dataset.num_classes=3: set "
                                        r"dataset.num_classes=7"):
        RecordDataset(str(tmp_path), num_classes=3)


def test_insightface_image_label_beyond_its_identity_records(tmp_path):
    # The fixture has 12 identity records; give the image at key 5 the label 99 (scalar label: IRHeader offset 4).
    folder = copy_rec(FIXTURES / "insightface_header", tmp_path)
    offset = RecordIndex.load(folder / "train.idx").offset(5)
    raw = bytearray((folder / "train.rec").read_bytes())
    raw[offset + 8 + 4:offset + 8 + 8] = struct.pack("<f", 99.0)
    (folder / "train.rec").write_bytes(bytes(raw))
    with pytest.raises(UserError, match=rf"record 5 at offset {offset} of .*train.rec has label 99, beyond the "
                                        rf"classes 0..11 its 12 identity records declare") as err:
        RecordDataset(str(folder), num_classes=100)
    _one_sentence(err)


@pytest.mark.parametrize("bomb", [_jpeg_declaring(50000, 50000), _png_declaring(20000, 20000),
                                  _png_declaring(40000, 40000)], ids=["jpeg", "png", "png-beyond-pil-limit"])
def test_decompression_bomb_is_named_not_decoded(tmp_path, bomb):
    _plain(tmp_path, [0.0, 1.0], [JPEG, bomb])
    data = RecordDataset(str(tmp_path), num_classes=2)
    offset = data.reader.offset_of(1)
    with pytest.raises(UserError, match=rf"record 1 at offset {offset} of .*train.rec: its header declares "
                                        rf".*pixels.*decompression bomb.*inspect_rec") as err:
        data[1]
    _one_sentence(err)
    (tmp_path / "faces" / "a").mkdir(parents=True)
    (tmp_path / "faces" / "a" / "0.jpg").write_bytes(JPEG)
    (tmp_path / "faces" / "a" / "1.png").write_bytes(bomb)
    with pytest.raises(UserError, match=r"1\.png: its header declares"):
        ImageFolderDataset(str(tmp_path / "faces"), num_classes=1)[1]


@pytest.mark.parametrize("workers", [0, 2])
def test_bad_record_met_in_a_worker_reaches_the_user_as_its_sentence(tmp_path, workers):
    _plain(tmp_path, [float(i % 4) for i in range(16)], [JPEG] * 9 + [b"not an image at all"] + [JPEG] * 6)
    data = RecordDataset(str(tmp_path), num_classes=4)
    loader = build_loader(data, 4, rank=0, world_size=1, seed=0, num_workers=workers, device=torch.device("cpu"))
    loader.set_epoch(0)
    with pytest.raises(UserError, match=rf"^record 9 at offset {data.reader.offset_of(9)} of .*train.rec: not a "
                                        rf"decodable image \(19 bytes starting 6e6f7420: no image format") as err:
        for _ in loader:
            pass
    assert "DataLoader worker" not in _one_sentence(err)
