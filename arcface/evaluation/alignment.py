"""Five-point face alignment: a similarity transform (rotation, uniform scale, shift) that puts a face's eye centres,
nose tip and mouth corners on the ArcFace template of a 112x112 crop, and the warp that applies it.

Landmark coordinates count pixels from the centre of the top-left pixel (0, 0), as the IJB landmark files and
OpenCV do.
"""
from __future__ import annotations

import numpy as np

CROP = 112
# Where the left eye, right eye, nose tip, left and right mouth corners sit in a 112x112 ArcFace crop.
TEMPLATE = np.array([[38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366],
                     [41.5493, 92.3655], [70.7299, 92.2041]], dtype=np.float64)


def similarity_transform(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """The 2x3 matrix M of the similarity transform that best maps points `src` onto `dst` (least squares, no
    reflection; Umeyama's closed form): dst ~ M @ [x, y, 1]."""
    src, dst = np.asarray(src, np.float64), np.asarray(dst, np.float64)
    src_mean, dst_mean = src.mean(axis=0), dst.mean(axis=0)
    src_c, dst_c = src - src_mean, dst - dst_mean
    cov = dst_c.T @ src_c / len(src)
    u, s, vt = np.linalg.svd(cov)
    d = np.ones(2)
    if np.linalg.det(u) * np.linalg.det(vt) < 0:  # the best orthogonal map is a reflection: take the best rotation
        d[1] = -1
    rotation = u @ np.diag(d) @ vt
    variance = (src_c ** 2).sum() / len(src)
    scale = (s * d).sum() / variance if variance > 0 else 1.0
    shift = dst_mean - scale * rotation @ src_mean
    return np.hstack([scale * rotation, shift[:, None]])


def _bilinear(image: np.ndarray, xs: np.ndarray, ys: np.ndarray) -> np.ndarray:
    """`image` sampled at the points (xs, ys) (pixel-centre coordinates), black outside it, rounded to uint8."""
    h, w, c = image.shape
    # Only the window the points fall in is copied, with a black border: points up to a pixel outside the image
    # blend into it, points farther out read black.
    left, top = int(np.clip(np.floor(xs.min()), 0, w - 1)), int(np.clip(np.floor(ys.min()), 0, h - 1))
    right, bottom = int(np.clip(np.ceil(xs.max()) + 1, left + 1, w)), int(np.clip(np.ceil(ys.max()) + 1, top + 1, h))
    ww, wh = right - left, bottom - top
    window = np.zeros((wh + 2, ww + 2, c), np.float32)
    window[1:-1, 1:-1] = image[top:bottom, left:right]
    xs = np.clip(xs - (left - 1), 0, ww + 1).astype(np.float32)
    ys = np.clip(ys - (top - 1), 0, wh + 1).astype(np.float32)
    x0, y0 = np.minimum(np.floor(xs), ww).astype(np.intp), np.minimum(np.floor(ys), wh).astype(np.intp)
    fx, fy = (xs - x0)[..., None], (ys - y0)[..., None]
    flat, stride = window.reshape(-1, c), ww + 2
    corner = y0 * stride + x0
    upper = np.take(flat, corner, axis=0) * (1 - fx) + np.take(flat, corner + 1, axis=0) * fx
    lower = np.take(flat, corner + stride, axis=0) * (1 - fx) + np.take(flat, corner + stride + 1, axis=0) * fx
    return np.clip(np.rint(upper * (1 - fy) + lower * fy), 0, 255).astype(np.uint8)


def align_face(image: np.ndarray, landmarks: np.ndarray, size: int = CROP) -> np.ndarray:
    """uint8 (H, W, 3) image -> the uint8 (size, size, 3) crop with `landmarks` (5, 2) on the template.

    Each crop pixel is the bilinear sample of the image at the point the inverse transform maps it to; pixels
    from outside the image are black.
    """
    matrix = similarity_transform(landmarks, TEMPLATE * (size / CROP))
    inverse = np.linalg.inv(np.vstack([matrix, [0.0, 0.0, 1.0]]))[:2]
    ys, xs = np.mgrid[0:size, 0:size].astype(np.float64)
    src_x = inverse[0, 0] * xs + inverse[0, 1] * ys + inverse[0, 2]
    src_y = inverse[1, 0] * xs + inverse[1, 1] * ys + inverse[1, 2]
    return _bilinear(image, src_x, src_y)
