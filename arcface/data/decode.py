"""Image decoding to the batch contract: uint8 RGB, (3, H, W) per image or straight into an (H, W, 3) slot.

JPEGs go through simplejpeg (libjpeg-turbo, and it can decode into a caller's buffer); measured here on 112x112
q95 faces it is the fastest of PIL, simplejpeg, PyTurboJPEG (needs a system libturbojpeg), OpenCV and
torchvision.io (see docs/data.md). Anything it cannot read (PNG, CMYK JPEG) or a missing simplejpeg falls back to PIL.

An image's declared size is checked against `MAX_PIXELS` from its header before any pixel is decoded: a few bytes
of JPEG or PNG can declare gigapixels (a decompression bomb), and the decoder would allocate them.
"""
from __future__ import annotations

import io

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

try:
    import simplejpeg
except ImportError:  # optional speed-up; PIL decodes everything it does
    simplejpeg = None

_JPEG_SOI = b"\xff\xd8\xff"
# Face crops are 112x112 and source photos a few megapixels; this admits 8K x 4K and stops bombs (~100 MB as RGB).
MAX_PIXELS = 1 << 25


class ImageTooLarge(ValueError):
    """An image header declares more than MAX_PIXELS."""


def _check_size(height: int, width: int) -> None:
    if height * width > MAX_PIXELS:
        raise ImageTooLarge(f"its header declares {width}x{height} pixels, more than the {MAX_PIXELS} any face "
                            f"image needs (a decompression bomb, or not a face image)")


def decode_rgb(data: bytes) -> np.ndarray:
    """Decode JPEG/PNG/... bytes to a uint8 (H, W, 3) RGB array; ValueError when the bytes are no image."""
    if simplejpeg is not None and data[:3] == _JPEG_SOI:
        try:
            _check_size(*simplejpeg.decode_jpeg_header(data)[:2])
            return simplejpeg.decode_jpeg(data, colorspace="RGB")
        except ImageTooLarge:
            raise
        except ValueError:
            pass  # let PIL try: it reads some JPEG variants libjpeg-turbo's fast path refuses
    try:
        with Image.open(io.BytesIO(data)) as img:  # reads the header only
            _check_size(img.height, img.width)
            if img.mode.startswith("I"):  # 16-bit grayscale: convert() would clip every value above 255 to white
                gray = (np.asarray(img).astype(np.uint32) >> 8).clip(0, 255).astype(np.uint8)
                return np.repeat(gray[..., None], 3, axis=2)
            return np.asarray(img.convert("RGB"))
    except ImageTooLarge:
        raise
    except Image.DecompressionBombError:  # PIL's own, larger limit, checked inside open()
        raise ImageTooLarge(f"its header declares more than {2 * Image.MAX_IMAGE_PIXELS} pixels, far more than any "
                            f"face image needs (a decompression bomb, or not a face image)") from None
    except (OSError, SyntaxError, ValueError) as e:
        raise _undecodable(data, e) from None


def _undecodable(data: bytes, error: Exception) -> ValueError:
    why = "no image format recognised" if isinstance(error, UnidentifiedImageError) else str(error)
    return ValueError(f"not a decodable image ({len(data)} bytes starting {data[:4].hex()}: {why})")


def decode_image(data: bytes) -> torch.Tensor:
    """Decode JPEG/PNG bytes to a uint8 (3, H, W) RGB tensor."""
    return torch.from_numpy(np.ascontiguousarray(decode_rgb(data))).permute(2, 0, 1)


def decode_into(data: bytes, out: np.ndarray) -> None:
    """Decode into `out` (a writable uint8 (H, W, 3) array), resizing an image of another size to fit."""
    if simplejpeg is not None and data[:3] == _JPEG_SOI:
        try:
            if simplejpeg.decode_jpeg(data, colorspace="RGB", buffer=out).shape == out.shape:
                return
        except ValueError:
            pass  # another size, or a JPEG only PIL reads: take the general path
    out[...] = fit(decode_rgb(data), out.shape[0], out.shape[1])


def encode_jpeg(image: np.ndarray, quality: int = 95) -> bytes:
    """uint8 (H, W, 3) RGB -> JPEG bytes."""
    if simplejpeg is not None:
        # 4:2:0 like OpenCV and PIL, the encoders public face sets were written with.
        return simplejpeg.encode_jpeg(np.ascontiguousarray(image), quality=quality, colorspace="RGB",
                                      colorsubsampling="420")
    out = io.BytesIO()
    Image.fromarray(image).save(out, "JPEG", quality=quality)
    return out.getvalue()


def fit(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """`image` (H, W, 3) resized to (height, width); unchanged when it already fits."""
    if image.shape[:2] == (height, width):
        return image
    return np.asarray(Image.fromarray(image).resize((width, height), Image.BILINEAR))
