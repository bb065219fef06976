"""IJB-B / IJB-C 1:1 verification of templates (sets of face images from several media).

The release folder of a target T (IJBB or IJBC) holds `loose_crop/` (the face images) and `meta/` with
- `t_face_tid_mid.txt`: image, template id, media id (one line per image; t = ijbb or ijbc);
- `t_name_5pts_score.txt`: image, five landmarks (x1 y1 ... x5 y5), detector score;
- `t_template_pair_label.txt`: template id, template id, label (1 same person, 0 not).

Each image is aligned by its landmarks and embedded as f(x) + f(flip x) (times its detector score, optionally);
features are averaged per media within a template, the media averages summed, the sum L2-normalised; a pair's
score is the dot product of its two templates' features. The ROC of the scores gives TAR at FAR 1e-6 ... 1e-1.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from arcface.errors import UserError
from arcface.evaluation.images import FaceImages, embed_images
from arcface.evaluation.roc import Roc, roc_curve

TARGETS = ("IJBB", "IJBC")
IMAGE_DIR = "loose_crop"
_SHOWN = 3  # how many missing names an error lists
_INDEX_CHUNK = 1 << 20


@dataclass
class IJBProtocol:
    """A target's meta files, read and cross-checked; arrays follow the image order of `face_tid_mid`."""

    target: str
    root: Path
    images: list[Path]
    landmarks: np.ndarray  # float32 (N, 5, 2)
    detector_scores: np.ndarray  # float32 (N,)
    templates: np.ndarray  # int64 (N,)
    medias: np.ndarray  # int64 (N,)
    pairs: np.ndarray  # int64 (P, 2): template ids
    labels: np.ndarray  # int8 (P,)


@dataclass
class IJBResult:
    target: str
    images: int
    templates: int
    scores: np.ndarray  # float32 (P,), in the order of the pair file
    labels: np.ndarray
    roc: Roc
    detector_score: bool


def meta_file(root: Path, target: str, kind: str) -> Path:
    return root / "meta" / f"{target.lower()}_{kind}.txt"


def find_root(path: str | Path, target: str) -> Path:
    """The target's folder: `path` itself when it holds `meta/`, else `path/<target>`."""
    if target not in TARGETS:
        raise UserError(f"--target {target!r} is unknown: choose one of {', '.join(TARGETS)}")
    path = Path(path)
    for root in (path, path / target):
        if (root / "meta").is_dir():
            return root
    raise UserError(f"--ijb {path} holds no meta/ folder (nor {target}/meta/): point it at the {target} release "
                    f"folder, the one with meta/ and {IMAGE_DIR}/")


def _require(file: Path) -> None:
    if not file.is_file():
        raise UserError(f"{file} does not exist: the {file.parent.parent.name} release folder needs it beside the "
                        f"other meta files")


def _lines(file: Path) -> list[list[str]]:
    _require(file)
    with open(file, encoding="utf-8", errors="replace") as f:
        return [line.split() for line in f if line.strip()]


def _check_fields(file: Path, rows: list[list[str]], count: int, what: str) -> None:
    bad = next((i for i, row in enumerate(rows) if len(row) != count), None)
    if bad is not None:
        raise UserError(f"line {bad + 1} of {file} has {len(rows[bad])} fields, not the {count} of {what}: "
                        f"restore the file from the release")


def _numbers(file: Path, rows: list[list[str]], columns: slice, dtype) -> np.ndarray:
    try:
        return np.array([row[columns] for row in rows], dtype=dtype)
    except ValueError as e:
        raise UserError(f"{file} holds a value that is not a number ({e}): restore the file from the release") \
            from None


def read_pairs(file: Path) -> tuple[np.ndarray, np.ndarray]:
    """(int64 (P, 2) template ids, int8 (P,) labels) of a `template_pair_label` file, checked."""
    _require(file)
    try:  # numpy's C parser: the IJB-C pair file has 15.7M lines
        table = np.loadtxt(file, dtype=np.int64, ndmin=2)
    except ValueError as e:
        raise UserError(f"{file} is not lines of 'template template label' ({str(e).splitlines()[0]}): restore the "
                        f"file from the release") from None
    if table.shape[1] != 3 or len(table) == 0:
        raise UserError(f"{file} has {table.shape[1]} columns in {len(table)} lines, not lines of 'template "
                        f"template label': restore the file from the release")
    labels = table[:, 2]
    if not np.isin(labels, (0, 1)).all():
        raise UserError(f"{file} has a label other than 0 or 1 (line {int(np.argmax(~np.isin(labels, (0, 1)))) + 1}):"
                        f" restore the file from the release")
    if labels.all() or not labels.any():
        raise UserError(f"{file} holds only {'genuine' if labels.all() else 'impostor'} pairs: a ROC needs both; "
                        f"restore the file from the release")
    return np.ascontiguousarray(table[:, :2]), labels.astype(np.int8)


def read_protocol(path: str | Path, target: str) -> IJBProtocol:
    """Read and cross-check the meta files: every image exists and has landmarks, every pair's templates exist."""
    root = find_root(path, target)
    faces_file = meta_file(root, target, "face_tid_mid")
    faces = _lines(faces_file)
    _check_fields(faces_file, faces, 3, "'image template_id media_id'")
    if not faces:
        raise UserError(f"{faces_file} is empty: restore the file from the release")
    names = [row[0] for row in faces]
    ids = _numbers(faces_file, faces, slice(1, 3), np.int64)
    points_file = meta_file(root, target, "name_5pts_score")
    points = _lines(points_file)
    _check_fields(points_file, points, 12, "'image x1 y1 ... x5 y5 score'")
    by_name = {row[0]: i for i, row in enumerate(points)}
    without = [name for name in names if name not in by_name]
    if without:
        raise UserError(f"{len(without)} image(s) of {faces_file.name} have no landmarks in {points_file} (first: "
                        f"{', '.join(without[:_SHOWN])}): restore the meta files from the release")
    values = _numbers(points_file, [points[by_name[name]] for name in names], slice(1, 12), np.float32)
    images = [root / IMAGE_DIR / name for name in names]
    missing = [str(p.name) for p in images if not p.is_file()]
    if missing:
        raise UserError(f"{len(missing)} of the {len(images)} images that {faces_file} names are missing from "
                        f"{root / IMAGE_DIR} (first: {', '.join(missing[:_SHOWN])}): unpack the release's "
                        f"{IMAGE_DIR}/ completely")
    pairs_file = meta_file(root, target, "template_pair_label")
    pairs, labels = read_pairs(pairs_file)
    unknown = np.setdiff1d(pairs, ids[:, 0])
    if len(unknown):
        raise UserError(f"{pairs_file} names {len(unknown)} template(s) that no image of {faces_file.name} belongs "
                        f"to (first: {', '.join(map(str, unknown[:_SHOWN]))}): restore the meta files from the "
                        f"release")
    return IJBProtocol(target, root, images, values[:, :10].reshape(-1, 5, 2), values[:, 10], ids[:, 0].copy(),
                       ids[:, 1].copy(), pairs, labels)


def template_features(features: np.ndarray, templates: np.ndarray,
                      medias: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(sorted template ids, float32 (T, D) L2-normalised template features): per template, the mean feature of
    each of its media, summed. A media id is a media within its template (templates may share media ids)."""
    keys, media_of = np.unique(np.stack([templates, medias], axis=1), axis=0, return_inverse=True)
    media_of = torch.from_numpy(media_of.reshape(-1))
    feats = torch.from_numpy(np.ascontiguousarray(features, dtype=np.float32))
    media_sum = torch.zeros(len(keys), feats.shape[1]).index_add_(0, media_of, feats)
    media_count = torch.bincount(media_of, minlength=len(keys)).clamp_(min=1)
    template_ids, template_of = np.unique(keys[:, 0], return_inverse=True)
    pooled = torch.zeros(len(template_ids), feats.shape[1]).index_add_(
        0, torch.from_numpy(template_of.reshape(-1)), media_sum / media_count[:, None])
    return template_ids, torch.nn.functional.normalize(pooled, dim=1).numpy()


def score_pairs(template_ids: np.ndarray, features: np.ndarray, pairs: np.ndarray, *,
                device: torch.device = torch.device("cpu"), block_bytes: int = 256 << 20) -> np.ndarray:
    """float32 dot products of the templates of every pair (template ids, in `template_ids`, sorted).

    A pair set as large as IJB-C's (15.7M pairs of 23k templates) touches most of the template-by-template
    similarity matrix, so it is computed in tiles of whole rows (one matrix product each, at most `block_bytes`)
    and each pair's score read from the tile of its first template: no loop over pairs, and several times faster
    than gathering two feature rows per pair (benchmarks/results/evaluation.md). Memory: one tile, the scores and
    two int32 indices per pair.
    """
    feats = torch.from_numpy(np.ascontiguousarray(features, dtype=np.float32)).to(device)
    count = len(template_ids)
    rows = max(1, block_bytes // (count * feats.element_size()))
    first, second = (np.empty(len(pairs), np.int32) for _ in range(2))
    for start in range(0, len(pairs), _INDEX_CHUNK):  # in chunks: searchsorted answers in int64
        chunk = slice(start, start + _INDEX_CHUNK)
        first[chunk] = np.searchsorted(template_ids, pairs[chunk, 0])
        second[chunk] = np.searchsorted(template_ids, pairs[chunk, 1])
    scores = np.empty(len(pairs), np.float32)
    for top in range(0, count, rows):
        members = np.flatnonzero((first >= top) & (first < top + rows))
        if len(members) == 0:
            continue
        similarities = feats[top:top + rows] @ feats.T
        at_row = torch.from_numpy(first[members] - top).to(device, torch.long)
        at_column = torch.from_numpy(second[members]).to(device, torch.long)
        scores[members] = similarities[at_row, at_column].cpu().numpy()
        del similarities  # before the next tile is allocated: one tile at a time
    return scores


def evaluate_ijb(model: nn.Module, protocol: IJBProtocol, *, batch_size: int, device: torch.device,
                 workers: int = 0, detector_score: bool = True, progress: bool = True) -> IJBResult:
    """Embed, pool and score a target's pairs with `model`."""
    images = FaceImages(protocol.images, protocol.landmarks)
    features = embed_images(model, images, batch_size=batch_size, device=device, workers=workers,
                            progress=f"{protocol.target} images" if progress else None)
    if detector_score:
        features *= protocol.detector_scores[:, None]
    ids, pooled = template_features(features, protocol.templates, protocol.medias)
    scores = score_pairs(ids, pooled, protocol.pairs, device=device)
    return IJBResult(protocol.target, len(protocol.images), len(ids), scores, protocol.labels,
                     roc_curve(scores, protocol.labels), detector_score)
