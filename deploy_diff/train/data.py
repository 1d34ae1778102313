"""Training data: the built-in digits, a folder of images, or ``.npy`` / ``.npz`` arrays.

Every source becomes an :class:`ImageData`: ``images`` float32[N, C, S, S] in [-1, 1] and, when the source
has them, ``labels`` int64[N] with ``class_names``. Data sets here are small enough to hold in memory, which
keeps batch sampling a seeded index draw (so a resumed run continues exactly).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

__all__ = [
    "IMAGE_EXTENSIONS",
    "ImageData",
    "load_arrays",
    "load_data",
    "load_digits_data",
    "load_image_folder",
    "random_flip",
]

IMAGE_EXTENSIONS = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}


@dataclass
class ImageData:
    images: torch.Tensor  # float32[N, C, S, S] in [-1, 1]
    labels: torch.Tensor | None = None  # int64[N]
    class_names: list[str] | None = None
    source: str = ""

    def __post_init__(self) -> None:
        if self.images.ndim != 4 or self.images.shape[0] == 0:
            raise ValueError(
                f"{self.source or 'data'}: expected images [N, C, H, W] with N > 0; got {tuple(self.images.shape)}"
            )
        if self.labels is not None and self.labels.shape != (self.images.shape[0],):
            raise ValueError(f"{self.source}: {self.labels.shape[0]} labels for {self.images.shape[0]} images")

    def __len__(self) -> int:
        return int(self.images.shape[0])

    @property
    def num_classes(self) -> int:
        return len(self.class_names) if self.class_names else 0

    @property
    def channels(self) -> int:
        return int(self.images.shape[1])

    @property
    def sample_size(self) -> int:
        return int(self.images.shape[-1])


def _resize(images: torch.Tensor, size: int) -> torch.Tensor:
    """Square float images [N, C, h, w] -> [N, C, size, size] (bilinear, antialiased when shrinking)."""
    if images.shape[-1] == size and images.shape[-2] == size:
        return images
    shrink = size < min(images.shape[-2:])
    return F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False, antialias=shrink)


def load_digits_data(sample_size: int = 8) -> ImageData:
    """sklearn's 1,797 real 8x8 handwritten digits (shipped with scikit-learn: no download), labels 0-9,
    optionally resized to ``sample_size`` (16 or 32)."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as e:  # pragma: no cover - the train extra brings it
        raise ImportError("the built-in digits need scikit-learn: pip install 'deploy-diff[train]'") from e
    if sample_size not in (8, 16, 32):
        raise ValueError(f"digits come at sample_size 8, 16 or 32; got {sample_size}")
    digits = load_digits()
    x = torch.from_numpy(digits.images.astype(np.float32) / 16.0)[:, None]  # [N, 1, 8, 8] in [0, 1]
    x = _resize(x, sample_size).clamp(0, 1) * 2 - 1
    y = torch.from_numpy(digits.target.astype(np.int64))
    return ImageData(x.contiguous(), y, [str(i) for i in range(10)], source="digits")


def _to_square(img, size: int):
    """PIL image -> resized (shorter side = size) and centre-cropped to size x size."""
    from PIL import Image

    w, h = img.size
    scale = size / min(w, h)
    nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
    img = img.resize((nw, nh), Image.Resampling.BICUBIC)
    left, top = (nw - size) // 2, (nh - size) // 2
    return img.crop((left, top, left + size, top + size))


def load_image_folder(path: str | Path, sample_size: int, channels: int = 3) -> ImageData:
    """Images under ``path`` (PNG, JPEG, ...). When every image sits in a sub-folder, sub-folder names are
    the class labels. Unreadable files are skipped with a warning naming them; none left is an error."""
    from PIL import Image, UnidentifiedImageError

    root = Path(path)
    if not root.exists():
        raise FileNotFoundError(f"data folder {root} does not exist")
    if not root.is_dir():
        raise NotADirectoryError(f"{root} is not a folder")
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 (grayscale) or 3 (RGB); got {channels}")
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
    if not files:
        raise ValueError(
            f"data folder {root} holds no images (expected files ending in {', '.join(sorted(IMAGE_EXTENSIONS))})"
        )
    labelled = all(p.parent != root for p in files)
    class_names = sorted({p.relative_to(root).parts[0] for p in files}) if labelled else None
    arrays, labels, bad = [], [], []
    mode = "L" if channels == 1 else "RGB"
    for p in files:
        try:
            with Image.open(p) as img:
                img.load()
                arr = np.asarray(_to_square(img.convert(mode), sample_size), dtype=np.float32) / 255.0
        except (UnidentifiedImageError, OSError, ValueError) as e:
            bad.append(f"{p} ({type(e).__name__})")
            continue
        arrays.append(arr[None] if channels == 1 else arr.transpose(2, 0, 1))
        if class_names is not None:
            labels.append(class_names.index(p.relative_to(root).parts[0]))
    if bad:
        shown = "; ".join(bad[:10]) + (f"; and {len(bad) - 10} more" if len(bad) > 10 else "")
        warnings.warn(f"skipped {len(bad)} unreadable image(s): {shown}", UserWarning, stacklevel=2)
    if not arrays:
        raise ValueError(f"no readable image left in {root} ({len(bad)} unreadable)")
    x = torch.from_numpy(np.stack(arrays)) * 2 - 1
    y = torch.tensor(labels, dtype=torch.int64) if class_names is not None else None
    return ImageData(x.contiguous(), y, class_names, source=str(root))


def load_arrays(path: str | Path, sample_size: int) -> ImageData:
    """``.npy`` (images) or ``.npz`` (``images`` or the first array, optional ``labels``). Images are
    [N, H, W], [N, H, W, C] or [N, C, H, W] (C in 1, 3), uint8 in 0..255 or float in [0, 1]."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"array file {p} does not exist")
    try:
        loaded = np.load(p, allow_pickle=False)
    except (ValueError, OSError) as e:
        raise ValueError(f"{p} is not a readable .npy/.npz file: {e}") from None
    labels = None
    if isinstance(loaded, np.lib.npyio.NpzFile):
        with loaded:
            keys = list(loaded.keys())
            if not keys:
                raise ValueError(f"{p} holds no arrays")
            images = loaded["images"] if "images" in keys else loaded[keys[0]]
            labels = loaded["labels"] if "labels" in keys else None
    else:
        images = loaded
    if images.ndim == 3:
        images = images[:, None]
    elif images.ndim == 4 and images.shape[-1] in (1, 3) and images.shape[1] not in (1, 3):
        images = images.transpose(0, 3, 1, 2)
    if images.ndim != 4 or images.shape[1] not in (1, 3):
        raise ValueError(
            f"{p}: expected images [N, H, W], [N, H, W, C] or [N, C, H, W] with C in (1, 3); got shape {images.shape}"
        )
    if images.dtype == np.uint8:
        x = images.astype(np.float32) / 255.0
    elif images.dtype.kind == "f":
        x = images.astype(np.float32)
        if not np.isfinite(x).all() or x.min() < -1e-6 or x.max() > 1 + 1e-6:
            raise ValueError(f"{p}: float images must be finite and lie in [0, 1]")
    else:
        raise ValueError(f"{p}: images must be uint8 or float; got {images.dtype}")
    t = torch.from_numpy(np.ascontiguousarray(x))
    if t.shape[-1] != t.shape[-2]:
        side = min(t.shape[-2:])
        top, left = (t.shape[-2] - side) // 2, (t.shape[-1] - side) // 2
        t = t[..., top : top + side, left : left + side]
    t = _resize(t, sample_size).clamp(0, 1) * 2 - 1
    y, names = None, None
    if labels is not None:
        labels = np.asarray(labels)
        if labels.dtype.kind not in "iu" or labels.shape != (t.shape[0],) or labels.min() < 0:
            raise ValueError(f"{p}: labels must be non-negative ints, one per image")
        y = torch.from_numpy(labels.astype(np.int64))
        names = [str(i) for i in range(int(labels.max()) + 1)]
    return ImageData(t.contiguous(), y, names, source=str(p))


def load_data(spec: str, sample_size: int, channels: int | None = None) -> ImageData:
    """``"digits"``, a folder of images, or a ``.npy`` / ``.npz`` file."""
    if spec == "digits":
        data = load_digits_data(sample_size)
        if channels not in (None, 1):
            raise ValueError("the built-in digits are grayscale: use in_channels=1")
        return data
    p = Path(spec)
    if p.suffix.lower() in (".npy", ".npz"):
        return load_arrays(p, sample_size)
    if p.is_file():
        raise ValueError(f"data={spec!r}: expected 'digits', a folder of images, or a .npy/.npz file")
    return load_image_folder(p, sample_size, channels or 3)


def random_flip(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Flip each image horizontally with probability 1/2 (draws from ``generator``)."""
    flip = torch.rand(images.shape[0], generator=generator, device=generator.device) < 0.5
    return torch.where(flip.to(images.device)[:, None, None, None], images.flip(-1), images)
