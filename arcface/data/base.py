"""What the datasets of encoded images share: per-item decode on top of batch decode, start-up checks."""
from __future__ import annotations

import logging

import numpy as np
import torch
from torch.utils.data import Dataset

from arcface.data.decode import decode_rgb
from arcface.errors import UserError

log = logging.getLogger(__name__)


def warn_if_resized(sample: bytes, size: int, source: str) -> None:
    """Warn once, at start-up, when a dataset's first image is not `size`x`size` (its images get resized)."""
    try:
        height, width = decode_rgb(sample).shape[:2]
    except ValueError:
        return  # a broken image is reported, with its location, when it is loaded
    if (height, width) != (size, size):
        log.warning("images in %s are %dx%d (first one checked) and are resized to %dx%d; training expects aligned "
                    "face crops of that size, so align them first or pack them once with `python tools/pack_rec.py "
                    "--size %d`", source, width, height, size, size, size)


def check_num_classes(found: int, configured: int, what: str) -> None:
    """Stop when the data has more classes than the classifier; warn when it has fewer (idle class centres)."""
    if found > configured:
        raise UserError(f"{what} but dataset.num_classes={configured}: set dataset.num_classes={found}.")
    if found < configured:
        log.warning("%s but dataset.num_classes=%d: the extra class centres are never trained; set "
                    "dataset.num_classes=%d unless this is a subset", what, configured, found)


class EncodedImageDataset(Dataset):
    """Base of datasets that store encoded images: subclasses implement `load_into`, which the batch loader calls
    to decode straight into a batch; `__getitem__` gives the per-image contract on top of it."""

    image_size = 112

    def load_into(self, index: int, out: np.ndarray) -> int:
        """Decode image `index` into `out` (uint8 (H, W, 3)) and return its label."""
        raise NotImplementedError

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        out = np.empty((self.image_size, self.image_size, 3), dtype=np.uint8)
        label = self.load_into(index, out)
        return torch.from_numpy(out).permute(2, 0, 1), label
