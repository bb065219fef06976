"""Face image files -> flip-added embeddings, batched, with decoding (and alignment) in loader workers."""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn as nn
from torch.utils.data import DataLoader, Dataset

from arcface.data.decode import decode_rgb, fit
from arcface.data.transforms import prepare_batch
from arcface.errors import UserError
from arcface.evaluation.alignment import CROP, align_face

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp")


def list_images(inputs: Sequence[str | Path]) -> list[Path]:
    """Image files named on a command line: files as given, folders as the image files under them (sorted)."""
    paths = []
    for item in map(Path, inputs):
        if item.is_dir():
            found = sorted(p for p in item.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
            if not found:
                raise UserError(f"folder {item} holds no image files ({', '.join(IMAGE_SUFFIXES)}): name the "
                                f"images or a folder that has them")
            paths += found
        elif item.is_file():
            paths.append(item)
        else:
            raise UserError(f"{item} does not exist: name aligned face images or folders of them")
    if not paths:
        raise UserError("no images named: give image files or folders of them")
    return paths


class FaceImages(Dataset):
    """Image files as uint8 (3, 112, 112) crops: aligned by their five landmarks (N, 5, 2) when given, else
    resized to 112x112 if they are of another size (they are taken as aligned crops already).

    An item is (crop, problem): a file that cannot be read or decoded gives a black crop and a sentence saying why,
    so the caller raises one error naming the file instead of a loader worker's traceback.
    """

    def __init__(self, paths: Sequence[Path], landmarks: np.ndarray | None = None):
        self.paths = [Path(p) for p in paths]
        self.landmarks = landmarks

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, str]:
        path = self.paths[index]
        try:
            image = decode_rgb(path.read_bytes())
        except (OSError, ValueError) as e:
            return torch.zeros(3, CROP, CROP, dtype=torch.uint8), f"{path}: {e}"
        crop = align_face(image, self.landmarks[index]) if self.landmarks is not None else fit(image, CROP, CROP)
        return torch.from_numpy(np.require(crop, requirements="CW")).permute(2, 0, 1), ""


@torch.no_grad()
def embed_images(model: nn.Module, images: FaceImages, *, batch_size: int, device: torch.device,
                 workers: int = 0, flip: bool = True, progress: str | None = None) -> np.ndarray:
    """float32 (N, D) embeddings f(x) + f(flip x) (f(x) alone without `flip`), not normalised, in file order.

    `progress`: a label for a progress bar on stderr (None: no bar). An unreadable image stops with a UserError.
    """
    from tqdm import tqdm

    model.eval()
    loader = DataLoader(images, batch_size=batch_size, num_workers=workers, shuffle=False)
    out = None
    done = 0
    with tqdm(total=len(images), desc=progress, unit="img", disable=progress is None, file=sys.stderr) as bar:
        for crops, problems in loader:
            bad = next((p for p in problems if p), None)
            if bad is not None:
                raise UserError(f"cannot read face image {bad}: replace or remove the file")
            x = prepare_batch(crops, device, flip=False)
            features = model(x).float()
            if flip:
                features = features + model(torch.flip(x, dims=[3])).float()
            features = features.cpu().numpy()
            if out is None:
                out = np.empty((len(images), features.shape[1]), np.float32)
            out[done:done + len(features)] = features
            done += len(features)
            bar.update(len(features))
    return out if out is not None else np.empty((0, 0), np.float32)
