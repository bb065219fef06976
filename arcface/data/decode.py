"""Image decoding to the batch contract: uint8 tensors (3, H, W), RGB."""
from __future__ import annotations

import io

import numpy as np
import torch
from PIL import Image


def decode_image(data: bytes) -> torch.Tensor:
    """Decode JPEG/PNG bytes to a uint8 (3, H, W) RGB tensor."""
    with Image.open(io.BytesIO(data)) as img:
        array = np.asarray(img.convert("RGB"))
    return torch.from_numpy(array.copy()).permute(2, 0, 1)
