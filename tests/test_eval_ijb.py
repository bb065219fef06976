"""tools/eval.py: pair sets through the training-time verification code, and IJB 1:1 end to end on a small IJB
folder made here (images, meta files, landmarks), checked against scores and TAR@FAR computed by hand; the
one-sentence errors for bad inputs; the alignment geometry."""
from __future__ import annotations

import importlib.util
import json
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import FIXTURES, REPO
from PIL import Image

from arcface.data import SyntheticIdentities
from arcface.data.decode import encode_jpeg
from arcface.data.transforms import prepare_batch
from arcface.engine.training_state import save_backbone
from arcface.evaluation import evaluate, load_pair_set
from arcface.evaluation.alignment import TEMPLATE, align_face, similarity_transform
from arcface.evaluation.ijb import score_pairs, template_features
from arcface.models import create_backbone

_spec = importlib.util.spec_from_file_location("eval_tool", REPO / "tools" / "eval.py")
eval_tool = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(eval_tool)

EMBEDDING = 32
IDENTITIES, TEMPLATES_EACH = 8, 3


@pytest.fixture(scope="module")
def model_file(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("weights") / "model.pt"
    save_backbone(create_backbone("r_tiny", embedding_size=EMBEDDING), path)
    return path


def _network(model_file: Path) -> torch.nn.Module:
    model = create_backbone("r_tiny", embedding_size=EMBEDDING)
    model.load_state_dict(torch.load(model_file, weights_only=True))
    return model.eval()


def _make_ijb(root: Path) -> list[dict]:
    """An IJBC folder: IDENTITIES x TEMPLATES_EACH templates of two media (the second with one or two images),
    each face (its identity's pattern plus noise) pasted whole at a random place of a larger noisy picture (saved
    losslessly), its landmarks the template points moved there. Returns each image's truth: template, media,
    face crop and detector score."""
    rng = np.random.default_rng(0)
    synthetic = SyntheticIdentities(num_classes=IDENTITIES, images_per_class=1, seed=5)
    identities = [synthetic.render(i, 0).permute(1, 2, 0).numpy().astype(np.int16) for i in range(IDENTITIES)]
    (root / "meta").mkdir(parents=True)
    (root / "loose_crop").mkdir()
    truth, face_lines, point_lines = [], [], []
    for template in range(IDENTITIES * TEMPLATES_EACH):
        identity = template // TEMPLATES_EACH
        for media, count in ((0, 1), (1, 1 + template % 2)):
            for _ in range(count):
                index = len(truth)
                noise = rng.integers(-40, 41, size=(112, 112, 3))
                face = np.clip(identities[identity] + noise, 0, 255).astype(np.uint8)
                left, top = (int(v) for v in rng.integers(0, 40, size=2))
                picture = rng.integers(0, 256, size=(112 + 50, 112 + 45, 3), dtype=np.uint8)
                picture[top:top + 112, left:left + 112] = face
                name = f"{index + 1}.png"
                Image.fromarray(picture).save(root / "loose_crop" / name)
                score = float(rng.uniform(0.5, 1.0))
                points = " ".join(f"{v:.4f}" for v in (TEMPLATE + [left, top]).ravel())
                face_lines.append(f"{name} {1000 + template} {70000 + template * 10 + media}\n")
                point_lines.append(f"{name} {points} {score:.6f}\n")
                truth.append({"template": 1000 + template, "media": media, "face": face,
                              "score": float(f"{score:.6f}")})
    (root / "meta" / "ijbc_face_tid_mid.txt").write_text("".join(face_lines))
    (root / "meta" / "ijbc_name_5pts_score.txt").write_text("".join(point_lines))
    templates = range(IDENTITIES * TEMPLATES_EACH)
    pair_lines = [f"{1000 + a} {1000 + b} {int(a // TEMPLATES_EACH == b // TEMPLATES_EACH)}\n"
                  for a in templates for b in templates if a < b]
    (root / "meta" / "ijbc_template_pair_label.txt").write_text("".join(pair_lines))
    return truth


@torch.no_grad()
def _scores_by_hand(model, truth: list[dict], pairs: np.ndarray) -> np.ndarray:
    """Each template from loops: per image (f(x) + f(flip x)) x score, mean per media, summed, normalised."""
    faces = torch.from_numpy(np.stack([item["face"] for item in truth])).permute(0, 3, 1, 2)
    x = prepare_batch(faces, torch.device("cpu"), flip=False)
    features = (model(x) + model(torch.flip(x, dims=[3]))).numpy()
    by_template: dict[int, dict[int, list[np.ndarray]]] = {}
    for item, feature in zip(truth, features):
        by_template.setdefault(item["template"], {}).setdefault(item["media"], []).append(feature * item["score"])
    templates = {}
    for template, medias in by_template.items():
        pooled = sum(np.mean(features, axis=0) for features in medias.values())
        templates[template] = pooled / np.linalg.norm(pooled)
    return np.array([templates[a] @ templates[b] for a, b in pairs])


def _tar_by_hand(scores: np.ndarray, labels: np.ndarray, far: float) -> float:
    """Accept at most floor(far x impostors) impostors: the threshold is the next impostor score down."""
    impostors = np.sort(scores[labels == 0])[::-1]
    return float(np.mean(scores[labels == 1] > impostors[int(far * len(impostors))]))


def test_ijb_end_to_end_matches_scores_and_tar_by_hand(tmp_path, model_file, capsys):
    truth = _make_ijb(tmp_path / "IJBC")
    out = tmp_path / "out"
    code = eval_tool.main(["--backbone", "r_tiny", "--checkpoint", str(model_file), "--embedding-size",
                           str(EMBEDDING), "--ijb", str(tmp_path), "--target", "IJBC", "--output", str(out),
                           "--device", "cpu", "--workers", "0", "--batch-size", "16"])
    assert code == 0
    printed = capsys.readouterr().out
    results = json.loads((out / "results.json").read_text())["ijb"]["IJBC"]
    table = np.loadtxt(tmp_path / "IJBC" / "meta" / "ijbc_template_pair_label.txt", dtype=np.int64)
    pairs, labels = table[:, :2], table[:, 2]
    expected = _scores_by_hand(_network(model_file), truth, pairs)
    np.testing.assert_allclose(np.load(out / "ijbc_scores.npy"), expected, atol=1e-5)
    impostors = int((labels == 0).sum())
    assert results["templates"] == IDENTITIES * TEMPLATES_EACH and results["impostors"] == impostors
    for far, tar in results["tar_at_far"].items():
        if float(far) * impostors < 1:
            assert tar is None  # fewer impostors than one in 1/FAR: not measurable here
        else:
            assert tar == _tar_by_hand(expected, labels, float(far))
    assert results["tar_at_far"]["1e-01"] is not None and results["tar_at_far"]["1e-02"] is not None
    assert (out / "ijbc_roc.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "TAR@FAR" in printed and "IJBC 1:1: 24 templates" in printed


def test_template_pooling_averages_media_then_sums():
    features = np.array([[1.0, 0], [3.0, 0], [0, 2.0], [5.0, 5.0]])
    templates, medias = np.array([7, 7, 7, 9]), np.array([1, 1, 2, 1])
    ids, pooled = template_features(features, templates, medias)
    # template 7: mean of media 1 = (2, 0), plus media 2 = (0, 2) -> (2, 2) -> normalised
    np.testing.assert_allclose(pooled, [[2 ** -0.5, 2 ** -0.5], [2 ** -0.5, 2 ** -0.5]], atol=1e-7)
    assert ids.tolist() == [7, 9]
    ids, pooled = template_features(np.array([[1.0, 0], [0, 1.0], [0, 1.0]]), np.array([1, 1, 1]),
                                    np.array([1, 2, 2]))
    np.testing.assert_allclose(pooled, [[2 ** -0.5, 2 ** -0.5]], atol=1e-7)  # media 2's two images count once


def test_pair_scores_are_the_same_in_any_tiling():
    rng = np.random.default_rng(3)
    ids = np.sort(rng.choice(10_000, size=50, replace=False))
    features = rng.standard_normal((50, 16)).astype(np.float32)
    pairs = ids[rng.integers(0, 50, size=(700, 2))]
    expected = np.einsum("ij,ij->i", features[np.searchsorted(ids, pairs[:, 0])],
                         features[np.searchsorted(ids, pairs[:, 1])])
    for block_bytes in (1, 7 * 50 * 4, 1 << 20):  # one row per tile, 7 rows, everything at once
        np.testing.assert_allclose(score_pairs(ids, features, pairs, block_bytes=block_bytes), expected, atol=1e-5)


def test_similarity_transform_recovers_rotation_scale_and_shift():
    angle, scale, shift = 0.4, 1.7, np.array([12.0, -5.0])
    rotation = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    dst = TEMPLATE @ (scale * rotation).T + shift
    np.testing.assert_allclose(similarity_transform(TEMPLATE, dst), np.hstack([scale * rotation, shift[:, None]]),
                               atol=1e-10)


def test_alignment_puts_landmarks_on_the_template():
    # Five small blobs at a rotated, enlarged, shifted copy of the template; after alignment each blob's centre
    # must sit on its template point.
    angle = 0.35
    rotation = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    landmarks = (TEMPLATE - 56) @ (1.6 * rotation).T + [150, 140]
    ys, xs = np.mgrid[0:300, 0:300]
    image = np.zeros((300, 300, 3), np.uint8)
    for channel, (x, y) in zip([0, 1, 2, 0, 1], landmarks):
        blob = 255 * np.exp(-((xs - x) ** 2 + (ys - y) ** 2) / (2 * 3.0 ** 2))
        image[..., channel] = np.maximum(image[..., channel], blob.astype(np.uint8))
    crop = align_face(image, landmarks).astype(float)
    cy, cx = np.mgrid[0:112, 0:112]
    for channel, (x, y) in zip([0, 1, 2, 0, 1], TEMPLATE):
        near = (np.abs(cx - x) < 8) & (np.abs(cy - y) < 8)
        weight = crop[..., channel] * near
        assert (weight * cx).sum() / weight.sum() == pytest.approx(x, abs=0.1)
        assert (weight * cy).sum() / weight.sum() == pytest.approx(y, abs=0.1)


def test_mxnet_pair_set_evaluates_as_during_training(tmp_path, model_file):
    path = FIXTURES / "verification" / "pairs.bin"
    assert eval_tool.main(["--backbone", "r_tiny", "--checkpoint", str(model_file), "--embedding-size",
                           str(EMBEDDING), "--bin", str(path), "--output", str(tmp_path), "--device", "cpu"]) == 0
    got = json.loads((tmp_path / "results.json").read_text())["pair_sets"]["pairs"]
    expected = evaluate(_network(model_file), load_pair_set(str(path)), batch_size=128)
    assert got["pairs"] == 24
    assert (got["accuracy"], got["accuracy_std"], got["val_at_far"]) == \
        (expected.accuracy, expected.accuracy_std, expected.val)
    assert got["xnorm"] == pytest.approx(expected.xnorm, rel=1e-6)


def _bin(path: Path, blobs: list[bytes], issame: list[bool]) -> Path:
    path.write_bytes(pickle.dumps((blobs, issame), protocol=2))
    return path


def _one_error(capsys, argv: list[str]) -> str:
    assert eval_tool.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err
    return err


def test_bad_inputs_are_one_sentence(tmp_path, model_file, capsys):
    face = encode_jpeg(SyntheticIdentities(2, 1).render(0, 0).permute(1, 2, 0).numpy())
    net = ["--backbone", "r_tiny", "--checkpoint", str(model_file), "--embedding-size", str(EMBEDDING),
           "--device", "cpu", "--output", str(tmp_path / "out")]
    odd = _bin(tmp_path / "odd.bin", [face] * 21, [True, False] * 5)
    assert "21 images for 10 pairs" in _one_error(capsys, [*net, "--bin", str(odd)])
    broken = _bin(tmp_path / "broken.bin", [face] * 7 + [b"\xff\xd8\xffnot a jpeg"] + [face] * 12,
                  [True, False] * 5)
    assert "image 7 (pair 3)" in _one_error(capsys, [*net, "--bin", str(broken)])
    wrong = ["--backbone", "r18", "--checkpoint", str(model_file), "--bin", str(FIXTURES / "verification" /
                                                                               "pairs.bin")]
    assert "does not fit backbone 'r18'" in _one_error(capsys, wrong)
    _make_ijb(tmp_path / "IJBC")
    (tmp_path / "IJBC" / "loose_crop" / "5.png").unlink()
    message = _one_error(capsys, [*net, "--ijb", str(tmp_path / "IJBC"), "--target", "IJBC"])
    assert "1 of the" in message and "5.png" in message and "missing" in message
    assert "nothing to evaluate" in _one_error(capsys, net)
    missing = tmp_path / "lfw.bin"
    assert _one_error(capsys, [*net, "--bin", str(missing)]).startswith(f"error: --bin {missing} does not exist")
