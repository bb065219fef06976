"""The RecordIO tools as users run them: pack a folder tree or list file, inspect, shuffle, rebuild an index."""
from __future__ import annotations

import contextlib
import importlib.util
import io
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

from arcface.data import RecordDataset
from arcface.data.recordio import RecordIndex, RecordReader, read_layout, unpack
from arcface.errors import UserError
from conftest import copy_rec

TOOLS = Path(__file__).resolve().parents[1] / "tools"


def _load(tool: str):
    if tool not in sys.modules:  # registered, so worker processes can unpickle the tool's functions
        spec = importlib.util.spec_from_file_location(tool, TOOLS / f"{tool}.py")
        sys.modules[tool] = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(sys.modules[tool])
    return sys.modules[tool]


def run(tool: str, *args) -> SimpleNamespace:
    """Call the tool's main() in this process (a subprocess per call would spend seconds importing torch)."""
    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        try:
            code = _load(tool).main([str(a) for a in args])
        except SystemExit as e:
            code = e.code
    return SimpleNamespace(returncode=code, stdout=stdout.getvalue(), stderr=stderr.getvalue())


def _error_line(result: SimpleNamespace) -> str:
    """The tool's one `error: ` line (the progress bar shares stderr)."""
    [line] = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    return line


@pytest.fixture(scope="module")
def faces(tmp_path_factory) -> Path:
    """4 identities, 2-4 images each; one PNG, one 150x150 JPEG (resized when packed) and one broken file."""
    root = tmp_path_factory.mktemp("faces")
    rng = np.random.default_rng(0)
    for c in range(4):
        (root / f"person{c}").mkdir()
        for i in range(2 + c % 3):
            size = 150 if (c, i) == (1, 0) else 112
            ext = "png" if (c, i) == (2, 1) else "jpg"
            Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(root / f"person{c}/{i}.{ext}")
    (root / "person3" / "broken.jpg").write_bytes(b"not an image")
    return root


@pytest.fixture(scope="module")
def packed(faces, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("packed")
    result = run("pack_rec", faces, out, "--workers", 2)
    assert result.returncode == 0, result.stderr
    assert "packed 11 images" in result.stdout and "broken.jpg" in result.stderr
    return out


@pytest.mark.parametrize("tool", ["pack_rec", "shuffle_rec", "inspect_rec"])
def test_help(tool):
    result = run(tool, "--help")
    assert result.returncode == 0 and "usage:" in result.stdout


def test_command_line(packed):
    result = subprocess.run([sys.executable, str(TOOLS / "inspect_rec.py"), str(packed), "--no-decode"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and "images: 11" in result.stdout, result.stderr


def test_pack_writes_insightface_layout(packed, faces):
    reader = RecordReader(packed / "train.rec", packed / "train.idx")
    layout = read_layout(reader)
    assert layout.insightface and layout.num_identities == 4 and len(layout.image_keys) == 11
    labels = [int(unpack(reader.read(int(k)))[0].label) for k in layout.image_keys]
    assert labels == [0, 0, 1, 1, 1, 2, 2, 2, 2, 3, 3]
    data = RecordDataset(str(packed), num_classes=4)
    image, label = data[0]
    assert tuple(image.shape) == (3, 112, 112) and label == 0
    # JPEGs already 112x112 are stored byte for byte.
    assert unpack(reader.read(1))[1] == (faces / "person0" / "0.jpg").read_bytes()


def test_pack_from_list_file(faces, tmp_path):
    lines = [f"{i}\t{c}\t{faces}/person{c}/0.jpg" for i, c in enumerate([0, 0, 2, 3])]
    (tmp_path / "train.lst").write_text("\n".join(lines) + "\n")
    result = run("pack_rec", tmp_path / "train.lst", tmp_path / "out", "--workers", 1)
    assert result.returncode == 0, result.stderr
    layout = read_layout(RecordReader(tmp_path / "out/train.rec", tmp_path / "out/train.idx"))
    assert len(layout.image_keys) == 4 and layout.num_identities == 4


def test_pack_refuses_ungrouped_list_unless_plain(faces, tmp_path):
    (tmp_path / "train.lst").write_text("".join(f"{faces}/person{c}/0.jpg\t{c}\n" for c in [0, 1, 0]))
    result = run("pack_rec", tmp_path / "train.lst", tmp_path / "out", "--workers", 1)
    assert result.returncode == 2 and "grouped by label" in result.stderr
    assert not (tmp_path / "out" / "train.rec").exists() and not list((tmp_path / "out").glob(".*.tmp"))
    result = run("pack_rec", tmp_path / "train.lst", tmp_path / "out", "--workers", 1, "--plain")
    assert result.returncode == 0, result.stderr
    assert not read_layout(RecordReader(tmp_path / "out/train.rec", tmp_path / "out/train.idx")).insightface


def test_pack_skips_a_damaged_jpeg_of_the_right_size_and_keeps_empty_identities(tmp_path):
    """A JPEG of the training size is copied byte for byte, but only once it decodes; identity folders without a
    packable image stay classes, as dataset=folder counts them."""
    rng = np.random.default_rng(0)
    for name, count in [("a", 2), ("b", 1), ("c", 0)]:
        (tmp_path / "faces" / name).mkdir(parents=True)
        for i in range(count):
            Image.fromarray(rng.integers(0, 255, (112, 112, 3), dtype=np.uint8)).save(tmp_path / f"faces/{name}/{i}.jpg")
    whole = (tmp_path / "faces/b/0.jpg").read_bytes()
    (tmp_path / "faces/b/0.jpg").write_bytes(whole[:len(whole) // 2])  # its header still says 112x112
    result = run("pack_rec", tmp_path / "faces", tmp_path / "out", "--workers", 1)
    assert result.returncode == 0 and "packed 2 images" in result.stdout and "b/0.jpg" in result.stderr, result.stderr
    layout = read_layout(RecordReader(tmp_path / "out/train.rec", tmp_path / "out/train.idx"))
    assert len(layout.image_keys) == 2 and layout.num_identities == 3


@pytest.mark.parametrize("label", ["-1", "inf", "0.7", "nan", "x"])
def test_pack_refuses_a_list_label_that_is_no_class_number(faces, tmp_path, label):
    (tmp_path / "train.lst").write_text(f"{faces}/person0/0.jpg\t{label}\n")
    result = run("pack_rec", tmp_path / "train.lst", tmp_path / "out", "--workers", 1)
    assert result.returncode == 2 and _error_line(result) == (
        f"error: {tmp_path / 'train.lst'} line 1 has label {label!r}, not a class number (0, 1, 2, ...): fix it.")


def test_pack_names_why_no_image_could_be_packed(tmp_path):
    (tmp_path / "train.lst").write_text("missing/0.jpg\t0\n")
    result = run("pack_rec", tmp_path / "train.lst", tmp_path / "out", "--workers", 1)
    assert result.returncode == 2 and _error_line(result).startswith(
        f"error: none of the 1 images of {tmp_path / 'train.lst'} could be packed (the first: "
        f"{tmp_path / 'missing/0.jpg'}: [Errno 2] No such file"), result.stderr


def test_inspect_reports_counts(packed):
    result = run("inspect_rec", packed, "--workers", 1)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "images: 11" in result.stdout and "classes: 4" in result.stdout


def test_shuffle_then_train_from_copy(packed, tmp_path):
    result = run("shuffle_rec", packed, tmp_path, "--seed", 3)
    assert result.returncode == 0, result.stderr
    original = RecordDataset(str(packed), num_classes=4)
    shuffled = RecordDataset(str(tmp_path), num_classes=4)
    assert not shuffled.layout.insightface and len(shuffled) == 11
    pairs = lambda ds: sorted((label, image.numpy().tobytes()) for image, label in (ds[i] for i in range(len(ds))))
    assert pairs(original) == pairs(shuffled)
    assert [shuffled[i][1] for i in range(11)] != sorted(shuffled[i][1] for i in range(11))


def test_inspect_lists_every_bad_record_and_fails(packed, tmp_path):
    copy_rec(packed, tmp_path)
    index = RecordIndex.load(tmp_path / "train.idx")
    raw = bytearray((tmp_path / "train.rec").read_bytes())
    raw[index.offset(2) + 8 + 24:index.offset(2) + 8 + 40] = b"\0" * 16  # wreck the JPEG of key 2
    raw[index.offset(5):index.offset(5) + 4] = b"XXXX"  # break the magic of key 5
    (tmp_path / "train.rec").write_bytes(bytes(raw))
    result = run("inspect_rec", tmp_path, "--workers", 2)
    assert result.returncode == 1
    assert "2 bad records" in result.stdout
    assert f"key 2 at offset {index.offset(2)}" in result.stdout
    assert f"key 5 at offset {index.offset(5)}" in result.stdout


def test_write_idx_rebuilds_a_missing_index(packed, tmp_path):
    (tmp_path / "train.rec").write_bytes((packed / "train.rec").read_bytes())
    result = run("inspect_rec", tmp_path)
    assert result.returncode == 2 and "train.idx is missing" in result.stderr
    result = run("inspect_rec", tmp_path, "--write-idx", "--workers", 1)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "train.idx").read_text() == (packed / "train.idx").read_text()
    assert not list(tmp_path.glob(".*.tmp"))


def test_inspect_fails_on_labels_that_name_no_class(packed, tmp_path):
    # 4 identity records; the image at key 3 claims class 99 and the one at key 6 a NaN (scalar label: IRHeader + 4).
    folder = copy_rec(packed, tmp_path)
    index = RecordIndex.load(folder / "train.idx")
    raw = bytearray((folder / "train.rec").read_bytes())
    for key, label in ((3, 99.0), (6, float("nan"))):
        raw[index.offset(key) + 12:index.offset(key) + 16] = np.float32(label).tobytes()
    (folder / "train.rec").write_bytes(bytes(raw))
    result = run("inspect_rec", folder, "--workers", 1, "--no-decode")
    assert result.returncode == 1 and "2 bad records" in result.stdout
    assert f"key 3 at offset {index.offset(3)}: label 99, beyond the classes 0..3 its 4 identity records" \
        in result.stdout
    assert f"key 6 at offset {index.offset(6)}: label nan, not a class number" in result.stdout


def test_inspect_fails_on_a_rec_cut_short(packed, tmp_path):
    folder = copy_rec(packed, tmp_path)
    index = RecordIndex.load(folder / "train.idx")
    raw = (folder / "train.rec").read_bytes()
    (folder / "train.rec").write_bytes(raw[:index.offset(9)])
    result = run("inspect_rec", folder, "--workers", 1)
    assert result.returncode != 0
    assert "past the end" in result.stdout + result.stderr


def _crash_at_replace(monkeypatch, survive: int) -> None:
    """The process dies at the (survive+1)-th rename: nothing after it runs, temporaries stay behind."""
    real, calls = os.replace, []

    def replace(src, dst):
        if len(calls) == survive:
            raise KeyboardInterrupt("power cut")
        calls.append(dst)
        real(src, dst)
    monkeypatch.setattr(os, "replace", replace)


@pytest.mark.parametrize("survive", [0, 1])
def test_repack_interrupted_while_renaming_never_pairs_a_rec_with_a_foreign_idx(faces, packed, tmp_path,
                                                                                monkeypatch, survive):
    # Re-pack over an existing folder as a plain file (other offsets); die before or after the .rec is renamed.
    folder = copy_rec(packed, tmp_path)
    old_rec = (folder / "train.rec").read_bytes()
    _crash_at_replace(monkeypatch, survive)
    with pytest.raises(KeyboardInterrupt):
        _load("pack_rec").main([str(faces), str(folder), "--workers", "1", "--plain", "--force"])
    monkeypatch.undo()
    assert not (folder / "train.idx").exists()  # the old .idx went first; the new one was never renamed
    assert ((folder / "train.rec").read_bytes() == old_rec) == (survive == 0)
    with pytest.raises(UserError, match=r"train\.idx is missing in .*--write-idx"):
        RecordDataset(str(folder), num_classes=4)
    assert run("inspect_rec", folder, "--write-idx", "--workers", 1).returncode == 0  # the documented way back


def test_pack_and_shuffle_leave_no_temporaries_and_a_failed_pack_keeps_the_old_pair(faces, packed, tmp_path):
    result = run("shuffle_rec", packed, tmp_path / "shuffled", "--seed", 1)
    assert result.returncode == 0 and not list((tmp_path / "shuffled").glob(".*")), result.stderr
    folder = copy_rec(packed, tmp_path / "again")
    before = {f: (folder / f).read_bytes() for f in ("train.rec", "train.idx")}
    (tmp_path / "bad.lst").write_text("".join(f"{faces}/person{c}/0.jpg\t{c}\n" for c in [0, 1, 0]))
    result = run("pack_rec", tmp_path / "bad.lst", folder, "--workers", 1, "--force")
    assert result.returncode == 2 and "grouped by label" in result.stderr
    assert {f: (folder / f).read_bytes() for f in before} == before and not list(folder.glob(".*"))
