"""Interop with the reference implementation: MXNet 1.9.1 (in an isolated venv, built on first use) reads what
this project writes, and this project reads what MXNet writes, record for record."""
from __future__ import annotations

import fcntl
import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from arcface.data.recordio import MAGIC, InsightFaceWriter, IRHeader, RecordReader, RecordWriter, pack, unpack

REPO = Path(__file__).resolve().parents[1]
VENV = REPO / ".venv-mxnet"
REQUIREMENTS = ["mxnet==1.9.1", "numpy==1.23.5", "opencv-python-headless<4.12"]

# Runs inside the mxnet venv. `read DIR`: every record through MXIndexedRecordIO (by key) and MXRecordIO (in file
# order) as JSON. `write DIR SPEC`: writes the records of a JSON spec with MXIndexedRecordIO.
ORACLE = r"""
import hashlib, json, sys
import numpy as np
import mxnet.recordio as rio

def describe(payload):
    header, data = rio.unpack(payload)
    label = np.asarray(header.label, dtype=np.float32).ravel().tolist() if header.flag else float(header.label)
    return {"flag": int(header.flag), "label": label, "id": int(header.id), "id2": int(header.id2),
            "md5": hashlib.md5(data).hexdigest()}

mode, folder = sys.argv[1], sys.argv[2]
rec, idx = folder + "/train.rec", folder + "/train.idx"
if mode == "read":
    indexed = rio.MXIndexedRecordIO(idx, rec, "r")
    by_key = {str(k): describe(indexed.read_idx(k)) for k in indexed.keys}
    sequential, stream = [], rio.MXRecordIO(rec, "r")
    while True:
        payload = stream.read()
        if payload is None:
            break
        sequential.append(describe(payload))
    print(json.dumps({"by_key": by_key, "sequential": sequential}))
else:
    writer = rio.MXIndexedRecordIO(idx, rec, "w")
    for r in json.load(open(sys.argv[3])):
        header = rio.IRHeader(0, r["label"], r["id"], 0)
        writer.write_idx(r["key"], rio.pack(header, bytes.fromhex(r["data"])))
    writer.close()
"""


def _build_venv() -> None:
    shutil.rmtree(VENV, ignore_errors=True)
    try:
        subprocess.run([sys.executable, "-m", "venv", str(VENV)], check=True)
        subprocess.run([str(VENV / "bin" / "pip"), "install", "-q", *REQUIREMENTS], check=True)
    except subprocess.CalledProcessError:
        shutil.rmtree(VENV, ignore_errors=True)  # never leave a half-built oracle behind
        raise


def _venv_works() -> bool:
    python = VENV / "bin" / "python"
    return python.exists() and subprocess.run([str(python), "-c", "import mxnet.recordio"],
                                              capture_output=True).returncode == 0


@pytest.fixture(scope="session")
def mxnet_python() -> Path:
    """The oracle's interpreter; the venv is (re)built under a lock, so parallel test workers build it once."""
    with open(REPO / ".venv-mxnet.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not _venv_works():
            _build_venv()
        assert _venv_works(), "mxnet oracle venv failed to import mxnet"
    return VENV / "bin" / "python"


def _oracle(python: Path, *args: str) -> dict | None:
    out = subprocess.run([str(python), "-c", ORACLE, *args], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout) if args[0] == "read" else None


def _ours(folder: Path) -> dict:
    """The same description as the oracle's, from this project's reader."""
    reader = RecordReader(folder / "train.rec", folder / "train.idx")

    def describe(payload: bytes) -> dict:
        header, data = unpack(payload)
        label = list(header.label) if header.flag else header.label
        return {"flag": header.flag, "label": label, "id": header.id, "id2": header.id2,
                "md5": hashlib.md5(data).hexdigest()}

    return {"by_key": {str(int(k)): describe(reader.read(int(k))) for k in reader.keys()},
            "sequential": [describe(p) for _, p in reader.scan()]}


def _tricky_payloads(rng: np.random.Generator) -> list[bytes]:
    """Payloads with the magic at aligned and unaligned places, at the edges, repeated, and none at all."""
    magic = MAGIC.to_bytes(4, "little")
    plain = [rng.bytes(int(n)) for n in rng.integers(0, 300, 12)]
    return plain + [
        b"", magic, magic * 3, b"ab" + magic, b"abcd" + magic + b"xy", rng.bytes(40) + magic,
        magic + rng.bytes(7) + magic + rng.bytes(1) + magic, b"abc" + magic + magic + b"z",
    ]


def test_mxnet_reads_what_we_write(tmp_path, mxnet_python):
    rng = np.random.default_rng(0)
    with RecordWriter(tmp_path / "train.rec", tmp_path / "train.idx") as writer:
        for i, data in enumerate(_tricky_payloads(rng)):
            label = float(i) if i % 3 else tuple(rng.standard_normal(i % 5 + 1).astype(np.float32).tolist())
            writer.write(pack(IRHeader(0, label, 1000 + i, i), data), 5 * i + 2)
    assert _oracle(mxnet_python, "read", str(tmp_path)) == _ours(tmp_path)


def test_mxnet_reads_our_insightface_layout(tmp_path, mxnet_python):
    rng = np.random.default_rng(1)
    with InsightFaceWriter(tmp_path / "train.rec", tmp_path / "train.idx") as writer:
        for label in (0, 0, 1, 3, 3, 3):  # identity 2 has no images
            writer.add(label, rng.bytes(int(rng.integers(1, 100))))
    seen = _oracle(mxnet_python, "read", str(tmp_path))
    assert seen == _ours(tmp_path)
    assert seen["by_key"]["0"]["label"] == [7.0, 11.0]
    assert [seen["by_key"][str(k)]["label"] for k in range(7, 11)] == [[1, 3], [3, 4], [4, 4], [4, 7]]


def test_we_read_what_mxnet_writes(tmp_path, mxnet_python):
    rng = np.random.default_rng(2)
    spec = [{"key": 3 * i, "label": float(i % 4), "id": i, "data": data.hex()}
            for i, data in enumerate(_tricky_payloads(rng))]
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    _oracle(mxnet_python, "write", str(tmp_path), str(tmp_path / "spec.json"))
    reader = RecordReader(tmp_path / "train.rec", tmp_path / "train.idx")
    for r in spec:
        header, data = unpack(reader.read(r["key"]))
        assert (data.hex(), header.label, header.id) == (r["data"], r["label"], r["id"])
    # and our writer produces the very same bytes
    with RecordWriter(tmp_path / "ours.rec", tmp_path / "ours.idx") as writer:
        for r in spec:
            writer.write(pack(IRHeader(0, r["label"], r["id"]), bytes.fromhex(r["data"])), r["key"])
    assert (tmp_path / "ours.rec").read_bytes() == (tmp_path / "train.rec").read_bytes()
    assert (tmp_path / "ours.idx").read_text() == (tmp_path / "train.idx").read_text()
