"""A face dataset as one folder per identity (`root/<identity>/<image>`), the path for custom data."""
from __future__ import annotations

import os

import numpy as np

from arcface.data.base import EncodedImageDataset, check_num_classes, warn_if_resized
from arcface.data.decode import decode_into
from arcface.errors import UserError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")


def identity_folders(root: str) -> list[str]:
    """The identities' folder names in label order (sorted)."""
    return sorted(e.name for e in os.scandir(root) if e.is_dir())


def scan_folders(root: str, extensions: tuple[str, ...] = IMAGE_EXTENSIONS):
    """Yield (label, class name, sorted image paths) per identity folder, classes in sorted name order."""
    for label, name in enumerate(identity_folders(root)):
        folder = os.path.join(root, name)
        files = sorted(e.name for e in os.scandir(folder) if e.is_file() and e.name.lower().endswith(extensions))
        yield label, name, [os.path.join(folder, f) for f in files]


class ImageFolderDataset(EncodedImageDataset):
    """Aligned face crops in `root/<identity>/*.jpg`; identities are numbered in sorted folder-name order.

    `num_classes` None counts the identity folders. Images of another size than `image_size` are resized (with one
    warning at start-up).
    """

    def __init__(self, root: str, num_classes: int | None = None, *, image_size: int = 112):
        if not os.path.isdir(root):
            raise UserError(f"dataset.root {root} is not a folder: point it at a folder with one sub-folder of "
                            f"images per identity.")
        self.root = root
        self.image_size = image_size
        self.classes: list[str] = []
        paths, labels = [], []
        for label, name, files in scan_folders(root):
            self.classes.append(name)
            paths += files
            labels += [label] * len(files)
        if not paths:
            raise UserError(f"{root} has no images ({', '.join(IMAGE_EXTENSIONS)}) in identity sub-folders: "
                            f"lay it out as {root}/<identity>/<image>.jpg.")
        self.num_classes = len(self.classes) if num_classes is None else int(num_classes)
        check_num_classes(len(self.classes), self.num_classes, f"{root} has {len(self.classes)} identity folders")
        self.paths = paths
        self.labels = np.asarray(labels, dtype=np.int64)
        warn_if_resized(self._read(0), image_size, root)

    def _read(self, index: int) -> bytes:
        with open(self.paths[index], "rb") as f:
            return f.read()

    def __len__(self) -> int:
        return len(self.paths)

    def load_into(self, index: int, out: np.ndarray) -> int:
        """Decode image `index` into `out` (uint8 (H, W, 3)) and return its label."""
        try:
            decode_into(self._read(index), out)
        except ValueError as e:
            raise UserError(f"{self.paths[index]}: {e}; delete or replace it.") from None
        return int(self.labels[index])
