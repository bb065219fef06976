"""tools/embed.py: the same embeddings from a checkpoint and from its ONNX export; two images give their
similarity and a decision; folders are searched; bad input is one sentence."""
from __future__ import annotations

import importlib.util

import numpy as np
import pytest
import torch
from conftest import REPO
from PIL import Image

from arcface.data import SyntheticIdentities
from arcface.engine.training_state import save_backbone
from arcface.export import export_onnx
from arcface.models import create_backbone

_spec = importlib.util.spec_from_file_location("embed_tool", REPO / "tools" / "embed.py")
embed_tool = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(embed_tool)


@pytest.fixture(scope="module")
def networks(tmp_path_factory):
    """(model.pt, model.onnx) of one r_tiny with 32-d embeddings."""
    folder = tmp_path_factory.mktemp("networks")
    torch.manual_seed(0)
    model = create_backbone("r_tiny", embedding_size=32)
    save_backbone(model, folder / "model.pt")
    export_onnx(model, folder / "model.onnx", backbone="r_tiny", latency_runs=1)
    return folder / "model.pt", folder / "model.onnx"


@pytest.fixture(scope="module")
def faces(tmp_path_factory):
    """Two images of identity 0 and one of identity 1 (a 128x128 one, resized on reading), in a folder tree."""
    folder = tmp_path_factory.mktemp("faces")
    synthetic = SyntheticIdentities(num_classes=2, images_per_class=2, seed=1)
    (folder / "b").mkdir()
    paths = [folder / "a0.png", folder / "b" / "a1.jpg", folder / "b" / "c.png"]
    for path, (label, variant) in zip(paths, [(0, 0), (0, 1), (1, 0)]):
        image = Image.fromarray(synthetic.render(label, variant).permute(1, 2, 0).numpy())
        (image.resize((128, 128)) if path.name == "c.png" else image).save(path)
    return folder, paths


def test_checkpoint_and_its_onnx_export_give_the_same_vectors(networks, faces, tmp_path, capsys):
    weights, onnx = networks
    folder, paths = faces
    by_checkpoint, by_onnx = tmp_path / "pt.npy", tmp_path / "onnx.npy"
    assert embed_tool.main(["--backbone", "r_tiny", "--checkpoint", str(weights), "--embedding-size", "32",
                            str(folder), "--output", str(by_checkpoint), "--device", "cpu"]) == 0
    assert embed_tool.main(["--onnx", str(onnx), str(folder), "--output", str(by_onnx), "--device", "cpu"]) == 0
    a, b = np.load(by_checkpoint), np.load(by_onnx)
    assert a.shape == (3, 32)
    np.testing.assert_allclose(a, b, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(a, axis=1), 1.0, rtol=1e-6)
    assert (tmp_path / "pt.txt").read_text().splitlines() == [str(p) for p in paths]
    assert "3 embeddings of size 32" in capsys.readouterr().out


def test_two_images_give_similarity_and_decision(networks, faces, tmp_path, capsys):
    weights, _ = networks
    _, paths = faces
    out = tmp_path / "two.npy"
    args = ["--backbone", "r_tiny", "--checkpoint", str(weights), "--embedding-size", "32", str(paths[0]),
            str(paths[2]), "--output", str(out), "--device", "cpu"]
    assert embed_tool.main(args) == 0
    emb = np.load(out)
    similarity = float(emb[0] @ emb[1])
    assert f"cosine similarity {similarity:.4f}" in capsys.readouterr().out
    assert embed_tool.main([*args, "--threshold", str(similarity - 1e-3)]) == 0
    assert "same person" in capsys.readouterr().out
    assert embed_tool.main([*args, "--threshold", str(similarity + 1e-3)]) == 0
    assert "different people" in capsys.readouterr().out


@pytest.mark.parametrize("extra, message", [
    (["missing.jpg"], "missing.jpg does not exist"),
    (["--onnx", "x.onnx"], "exactly one network"),
    (["--batch-size", "0"], "--batch-size 0 must be at least 1"),
])
def test_bad_input_is_one_sentence(networks, faces, tmp_path, capsys, extra, message):
    weights, _ = networks
    _, paths = faces
    code = embed_tool.main(["--backbone", "r_tiny", "--checkpoint", str(weights), "--embedding-size", "32",
                            str(paths[0]), *extra, "--output", str(tmp_path / "e.npy")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith("error: ") and message in err and "\n" not in err
