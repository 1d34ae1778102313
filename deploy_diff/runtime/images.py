"""Image conversions and grids (numpy; Pillow imported lazily for PNG/PIL output)."""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np

from ._fileio import atomic_open

__all__ = ["image_grid", "save_png", "to_images", "to_uint8"]


def to_images(samples: np.ndarray, output_type: str = "np"):
    """Model-space samples float[B, C, H, W] in [-1, 1] -> images, diffusers' convention.

    ``"np"``: float32[B, H, W, C] in [0, 1]; ``"uint8"``: the same as uint8 (rounded); ``"pil"``: a list
    of PIL images (mode L or RGB).
    """
    if output_type not in ("np", "uint8", "pil"):
        raise ValueError(f"output_type={output_type!r}; expected 'np', 'uint8' or 'pil'")
    x = np.asarray(samples, dtype=np.float32)
    if x.ndim != 4:
        raise ValueError(f"expected samples [B, C, H, W]; got shape {x.shape}")
    images = np.clip(x / 2 + 0.5, 0.0, 1.0).transpose(0, 2, 3, 1)
    if output_type == "np":
        return np.ascontiguousarray(images)
    as_uint8 = to_uint8(images)
    if output_type == "uint8":
        return as_uint8
    from PIL import Image

    return [Image.fromarray(im[..., 0] if im.shape[-1] == 1 else im) for im in as_uint8]


def to_uint8(images: np.ndarray) -> np.ndarray:
    """Images in [0, 1] (any layout) -> uint8, clipped and rounded as diffusers' ``numpy_to_pil`` does."""
    return (np.clip(images, 0.0, 1.0) * 255).round().astype(np.uint8)


def image_grid(images: np.ndarray, nrow: int | None = None, padding: int = 1, scale: int = 1) -> np.ndarray:
    """uint8[N, H, W, C] -> one uint8[rows*H', cols*W', C] grid (``nrow`` images per row, square-ish by
    default), each image upscaled ``scale`` times (nearest) and separated by ``padding`` pixels."""
    images = np.asarray(images)
    if images.ndim != 4 or images.dtype != np.uint8:
        raise ValueError(f"image_grid expects uint8 [N, H, W, C]; got {images.dtype} {images.shape}")
    n, h, w, c = images.shape
    if scale > 1:
        images = images.repeat(scale, axis=1).repeat(scale, axis=2)
        h, w = h * scale, w * scale
    cols = nrow or math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    grid = np.zeros((rows * (h + padding) + padding, cols * (w + padding) + padding, c), dtype=np.uint8)
    for i in range(n):
        r, q = divmod(i, cols)
        y, x = padding + r * (h + padding), padding + q * (w + padding)
        grid[y : y + h, x : x + w] = images[i]
    return grid


def save_png(image: np.ndarray, path: str | os.PathLike) -> Path:
    """Write uint8[H, W, C] (C = 1 or 3) as a PNG, atomically (temp file + rename)."""
    from PIL import Image

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    arr = np.asarray(image)
    pil = Image.fromarray(arr[..., 0] if arr.ndim == 3 and arr.shape[-1] == 1 else arr)
    with atomic_open(path) as f:
        pil.save(f, format="PNG")
    return path
