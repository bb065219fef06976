"""Files from elsewhere run nothing: `.bin` pair sets and `model.pt` weights that would execute code when unpickled
are refused with one sentence naming the file, and the code never runs (a marker file it would create stays absent);
damaged files give one sentence too, not the unpickler's exception."""
from __future__ import annotations

import os
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from arcface.data.decode import encode_jpeg
from arcface.errors import UserError
from arcface.evaluation import load_pair_set
from arcface.models import create_backbone, load_backbone_weights
from conftest import FIXTURES

PAIRS_FIXTURE = FIXTURES / "verification" / "pairs.bin"


class _RunsCommand:
    """Unpickling this runs `command` (os.system) — what a hostile file does."""

    def __init__(self, command: str):
        self.command = command

    def __reduce__(self):
        return os.system, (self.command,)


class _Calls:
    """Unpickling this calls `function(*args)`."""

    def __init__(self, function, *args):
        self.function, self.args = function, args

    def __reduce__(self):
        return self.function, self.args


def _touch(marker: Path) -> _RunsCommand:
    return _RunsCommand(f"touch {marker}")


def _jpegs(count: int) -> list[bytes]:
    rng = np.random.default_rng(0)
    return [encode_jpeg(rng.integers(0, 256, (112, 112, 3), dtype=np.uint8)) for _ in range(count)]


def _write_pickle(path: Path, obj, protocol: int = 2) -> Path:
    path.write_bytes(pickle.dumps(obj, protocol=protocol))
    return path


def _python2_pair_set(blobs: list[bytes], issame: list[bool]) -> bytes:
    """Protocol 2 as Python 2 writes a (list of str, list of bool) tuple: strings as BINSTRING, no globals."""
    strings = b"".join(b"T" + struct.pack("<I", len(b)) + b for b in blobs)
    flags = b"".join(b"\x88" if s else b"\x89" for s in issame)
    return b"\x80\x02](" + strings + b"e](" + flags + b"e\x86."


# --- pair sets -------------------------------------------------------------------------------------------------

def test_public_pair_set_formats_load(tmp_path):
    pairs = load_pair_set(str(PAIRS_FIXTURE))  # written by Python 3: bytes rebuilt through _codecs.encode
    assert pairs.images.shape[0] == 2 * pairs.issame.shape[0]
    blobs, issame = _jpegs(20), [i % 2 == 0 for i in range(10)]
    # cv2.imencode's (N, 1) uint8 arrays, as some pair-set tools store the JPEGs
    arrays = [np.frombuffer(b, dtype=np.uint8).reshape(-1, 1) for b in blobs]
    files = {"py2.bin": _python2_pair_set(blobs, issame),
             "numpy_flags.bin": pickle.dumps(([bytearray(b) for b in blobs], [np.bool_(s) for s in issame]), 2),
             "arrays_p5.bin": pickle.dumps((arrays, issame), protocol=5),
             "arrays_p4.bin": pickle.dumps((arrays, issame), protocol=4),
             # numpy 1 names its modules numpy.core.*: the same file as numpy 1 writes it
             "arrays_numpy1.bin": pickle.dumps((arrays, issame), protocol=2).replace(b"numpy._core", b"numpy.core")}
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
        pairs = load_pair_set(str(tmp_path / name))
        assert pairs.issame.tolist() == issame and tuple(pairs.images.shape) == (20, 3, 112, 112), name
        assert torch.equal(pairs.images, load_pair_set(str(tmp_path / "py2.bin")).images), name


@pytest.mark.parametrize("payload", [
    lambda marker: (_jpegs(2), [_touch(marker)] * 10),
    lambda marker: _touch(marker),
    lambda marker: (_jpegs(2), [_Calls(exec, f"open({str(marker)!r}, 'w')")] * 10),
    lambda marker: (_jpegs(2), [_Calls(eval, f"open({str(marker)!r}, 'w')")] * 10),
    lambda marker: ([np.array([_touch(marker)], dtype=object)] * 20, [True] * 10),
], ids=["os.system in a flag", "os.system as the whole file", "exec", "eval", "numpy object array"])
def test_pair_set_that_runs_code_is_refused_unrun(tmp_path, payload):
    marker = tmp_path / "marker"
    path = _write_pickle(tmp_path / "lfw.bin", payload(marker))
    with pytest.raises(UserError, match=rf"^{path} is not a pair set: its pickle asks for \S+, which a pair set "
                                        rf"never needs, so it was not loaded") as err:
        load_pair_set(str(path))
    assert not marker.exists() and "\n" not in str(err.value)


def test_pair_set_allowed_names_with_hostile_arguments_are_refused(tmp_path):
    bomb = _write_pickle(tmp_path / "bomb.bin", ([_Calls(bytearray, 1 << 40)] * 20, [True] * 10))
    with pytest.raises(UserError, match="asks for bytearray of a int"):
        load_pair_set(str(bomb))
    codec = _write_pickle(tmp_path / "codec.bin", ([_Calls(__import__("codecs").encode, "x", "rot13")] * 20,
                                                   [True] * 10))
    with pytest.raises(UserError, match="asks for _codecs.encode with encoding 'rot13'"):
        load_pair_set(str(codec))


def test_damaged_pair_sets_give_one_sentence(tmp_path):
    blobs, issame = _jpegs(20), [True, False] * 5
    cases = {
        "odd.bin": ((blobs[:19], issame), r"holds 19 images for 10 pairs \(expected twice as many"),
        "shape.bin": ({"images": blobs}, r"holds a dict, not the pair-set pickle"),
        "flags.bin": ((blobs, [1] * 10), r"issame flag 1 that is not a bool"),
        "broken.bin": ((blobs[:3] + [b"\xff\xd8\xff\xe0 not a jpeg"] + blobs[4:], issame),
                       r"image 3 \(pair 1\) of .*broken.bin: not a decodable image"),
    }
    for name, (obj, message) in cases.items():
        path = _write_pickle(tmp_path / name, obj)
        with pytest.raises(UserError, match=message) as err:
            load_pair_set(str(path))
        assert str(path) in str(err.value) and "\n" not in str(err.value)
    truncated = tmp_path / "truncated.bin"
    truncated.write_bytes(pickle.dumps((blobs, issame), protocol=2)[:5000])
    with pytest.raises(UserError, match=rf"{truncated} is not a pair-set pickle"):
        load_pair_set(str(truncated))


def test_pair_set_decompression_bomb_is_named(tmp_path):
    blobs = _jpegs(20)
    bomb = bytearray(blobs[5])
    sof = bomb.find(b"\xff\xc0")  # baseline frame header: precision, height, width
    bomb[sof + 5:sof + 9] = struct.pack(">HH", 50000, 50000)
    path = _write_pickle(tmp_path / "bomb.bin", (blobs[:5] + [bytes(bomb)] + blobs[6:], [True] * 10))
    with pytest.raises(UserError, match=r"image 5 \(pair 2\) of .*bomb.bin: its header declares 50000x50000 pixels"):
        load_pair_set(str(path))


# --- backbone weights ------------------------------------------------------------------------------------------

def test_weights_that_run_code_are_refused_unrun(tmp_path):
    marker = tmp_path / "marker"
    state = create_backbone("r_tiny").state_dict()
    zipped = tmp_path / "model.pt"
    torch.save({**state, "extra": _touch(marker)}, zipped)
    legacy = _write_pickle(tmp_path / "legacy.pt", _touch(marker))  # pre-1.6 torch files were plain pickles
    for path in (zipped, legacy):
        with pytest.raises(UserError, match=rf"^{path} asks to run (posix|nt).system when unpickled, which a file of "
                                            rf"weights never needs, so it was not loaded") as err:
            load_backbone_weights(create_backbone("r_tiny"), path, "r_tiny")
        assert "\n" not in str(err.value)
    assert not marker.exists()


def test_damaged_weights_give_one_sentence(tmp_path):
    good = tmp_path / "good.pt"
    torch.save(create_backbone("r_tiny").state_dict(), good)
    raw = good.read_bytes()
    (tmp_path / "empty.pt").write_bytes(b"")
    (tmp_path / "truncated.pt").write_bytes(raw[:len(raw) // 2])
    (tmp_path / "text.pt").write_text("not weights")
    torch.save({"fc.weight": "a string, not a tensor"}, tmp_path / "strings.pt")
    damaged = r"is not a complete torch.save archive \(\d+ bytes\): it was damaged in writing or copying"
    cases = {"empty.pt": r"is empty \(0 bytes\)", "truncated.pt": damaged, "text.pt": damaged,
             "strings.pt": r"keys fc.weight hold no tensor"}
    for name, message in cases.items():
        with pytest.raises(UserError, match=message) as err:
            load_backbone_weights(create_backbone("r_tiny"), tmp_path / name, "r_tiny")
        assert str(tmp_path / name) in str(err.value) and "\n" not in str(err.value)
    missing = dict(torch.load(good, weights_only=True))
    del missing["fc.weight"]
    torch.save(missing, tmp_path / "missing.pt")
    with pytest.raises(UserError, match=r"missing.pt does not fit backbone 'r_tiny' \(missing keys fc.weight\)"):
        load_backbone_weights(create_backbone("r_tiny"), tmp_path / "missing.pt", "r_tiny")
