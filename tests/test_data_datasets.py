"""RecordDataset and ImageFolderDataset: both RecordIO layouts, start-up label checks, clear errors on bad data."""
from __future__ import annotations

import hashlib
import io
import json
import logging
import re

import numpy as np
import pytest
import torch
from PIL import Image

from arcface.data import ImageFolderDataset, RecordDataset
from arcface.data.decode import decode_image, decode_into, decode_rgb, encode_jpeg
from arcface.data.recordio import IRHeader, PlainWriter, RecordReader, RecordWriter, pack, unpack
from arcface.errors import UserError
from conftest import FIXTURES, write_image_folders

MANIFEST = json.loads((FIXTURES / "MANIFEST.json").read_text())


def test_insightface_layout_dataset():
    data = RecordDataset(str(FIXTURES / "insightface_header"), num_classes=12)
    assert len(data) == MANIFEST["insightface_header"]["num_images"]
    reader = RecordReader(FIXTURES / "insightface_header/train.rec", FIXTURES / "insightface_header/train.idx")
    for i, expected in enumerate(MANIFEST["insightface_header"]["records"]):
        image, label = data[i]
        assert label == expected["label"]
        assert image.dtype == torch.uint8 and tuple(image.shape) == (3, 112, 112)
        if i % 12 == 0:  # pixels are what a plain decode of the stored JPEG gives
            jpeg = unpack(reader.read(expected["key"]))[1]
            assert hashlib.md5(jpeg).hexdigest() == expected["jpeg_md5"]
            assert torch.equal(image, decode_image(jpeg))


def test_plain_layout_dataset_uses_first_of_array_label():
    data = RecordDataset(str(FIXTURES / "plain"), num_classes=5)
    assert len(data) == 10
    assert [data[i][1] for i in range(10)] == [0, 1, 2, 3, 4, 0, 1, 2, 3, 3]


def test_num_classes_too_small_is_caught_at_start_up():
    with pytest.raises(UserError, match=r"12 classes \(from its identity records\).*dataset.num_classes=12"):
        RecordDataset(str(FIXTURES / "insightface_header"), num_classes=10)
    with pytest.raises(UserError, match=r"5 classes \(from its labels\).*dataset.num_classes=5"):
        RecordDataset(str(FIXTURES / "plain"), num_classes=4)


def test_missing_folder_and_index(tmp_path):
    with pytest.raises(UserError, match="is not a folder"):
        RecordDataset(str(tmp_path / "nowhere"), num_classes=2)
    (tmp_path / "train.rec").write_bytes((FIXTURES / "plain/train.rec").read_bytes())
    with pytest.raises(UserError, match=rf"train\.idx is missing in {tmp_path}"):
        RecordDataset(str(tmp_path), num_classes=5)


def test_non_jpeg_payload_names_key_and_offset(tmp_path):
    jpeg = encode_jpeg(np.zeros((112, 112, 3), dtype=np.uint8))
    with PlainWriter(tmp_path / "train.rec", tmp_path / "train.idx") as writer:
        writer.add(0.0, jpeg)
        writer.add(1.0, b"this is not an image")
    data = RecordDataset(str(tmp_path), num_classes=2)
    data[0]
    offset = data.reader.offset_of(1)
    with pytest.raises(UserError, match=rf"record 1 at offset {offset} .* not a decodable image.*inspect_rec"):
        data[1]


def test_label_beyond_the_identity_records_stops_at_start_up(tmp_path):
    # An InsightFace file whose identity records undercount: the header scan catches it before any image is read.
    jpeg = encode_jpeg(np.zeros((112, 112, 3), dtype=np.uint8))
    with RecordWriter(tmp_path / "train.rec", tmp_path / "train.idx") as writer:
        writer.write(pack(IRHeader(2, (2.0, 3.0)), b""), 0)
        writer.write(pack(IRHeader(0, 7.0, 1), jpeg), 1)
        writer.write(pack(IRHeader(2, (1.0, 2.0), 2), b""), 2)
    with pytest.raises(UserError, match=r"record 1 at offset \d+ .* label 7, beyond the classes 0..0 its 1 identity "
                                        r"records declare"):
        RecordDataset(str(tmp_path), num_classes=3)


def test_other_image_sizes_are_resized_with_one_warning(tmp_path, caplog):
    big = encode_jpeg(np.full((150, 120, 3), 200, dtype=np.uint8))
    with PlainWriter(tmp_path / "train.rec", tmp_path / "train.idx") as writer:
        writer.add(0.0, big)
    with caplog.at_level(logging.WARNING):
        data = RecordDataset(str(tmp_path), num_classes=1)
        image, _ = data[0]
    assert [r.getMessage() for r in caplog.records if re.search("120x150 .* resized to 112x112", r.getMessage())] \
        and len(caplog.records) == 1
    assert tuple(image.shape) == (3, 112, 112) and abs(int(image.float().mean()) - 200) <= 2


def test_decoders_agree(tmp_path):
    rgb = np.random.default_rng(0).integers(0, 256, (112, 112, 3), dtype=np.uint8)
    jpeg = encode_jpeg(rgb, quality=95)
    out = np.empty_like(rgb)
    decode_into(jpeg, out)
    with Image.open(io.BytesIO(jpeg)) as pil:
        reference = np.asarray(pil.convert("RGB"))
    assert np.array_equal(out, decode_rgb(jpeg))
    assert np.abs(out.astype(int) - reference).mean() < 1.0  # both are libjpeg-turbo, up to upsampling details
    with pytest.raises(ValueError, match="not a decodable image"):
        decode_rgb(b"\xff\xd8\xff\x00garbage")


def test_sixteen_bit_grayscale_is_scaled_to_eight_bits():
    """PIL's convert("RGB") clips 16-bit values to 255: a 16-bit grayscale face would arrive white."""
    gray = np.arange(256, dtype=np.uint16).reshape(16, 16)
    buffer = io.BytesIO()
    Image.fromarray(gray * 257).save(buffer, format="PNG")
    assert Image.open(io.BytesIO(buffer.getvalue())).mode == "I;16"
    assert (decode_rgb(buffer.getvalue()) == np.repeat(gray[..., None], 3, axis=2)).all()


def test_image_folder_dataset(tmp_path):
    write_image_folders(tmp_path, {"bob": [112, 112], "alice": [112], "carol": [112, 112, 112]})
    (tmp_path / "alice" / "notes.txt").write_text("ignored")
    data = ImageFolderDataset(str(tmp_path), num_classes=3)
    assert data.classes == ["alice", "bob", "carol"] and len(data) == 6
    assert [data[i][1] for i in range(6)] == [0, 1, 1, 2, 2, 2]
    image, _ = data[0]
    with Image.open(tmp_path / "alice" / "0.png") as png:
        assert torch.equal(image, torch.from_numpy(np.array(png)).permute(2, 0, 1))
    with pytest.raises(UserError, match=r"3 identity folders but dataset.num_classes=2.*num_classes=3"):
        ImageFolderDataset(str(tmp_path), num_classes=2)


def test_image_folder_errors_and_resize(tmp_path, caplog):
    with pytest.raises(UserError, match="no images"):
        ImageFolderDataset(str(tmp_path), num_classes=2)
    write_image_folders(tmp_path / "big", {"a": [160, 112]})
    with caplog.at_level(logging.WARNING):
        data = ImageFolderDataset(str(tmp_path / "big"), num_classes=1)
    assert re.search("160x160 .* resized", caplog.records[-1].getMessage())
    assert tuple(data[0][0].shape) == (3, 112, 112)
    (tmp_path / "big" / "a" / "2.jpg").write_bytes(b"broken")
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        data = ImageFolderDataset(str(tmp_path / "big"), num_classes=1)
    assert "resized" in caplog.records[-1].getMessage()
    with pytest.raises(UserError, match=r"2\.jpg: not a decodable image"):
        data[2]
