"""Training images from a folder: any size and mode, EXIF-rotated, bad files skipped with a warning.

    >>> from studio.trainers.data import load_images
    >>> load_images("/no/such/folder", 64)
    Traceback (most recent call last):
    ...
    FileNotFoundError: data folder not found: /no/such/folder
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff"}


def to_rgb(image: Image.Image) -> Image.Image:
    """EXIF orientation applied; transparency composited over white; greyscale/palette/CMYK to RGB."""
    image = ImageOps.exif_transpose(image)
    if image.mode in ("RGBA", "LA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        canvas = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(canvas, rgba).convert("RGB")
    return image.convert("RGB")


def fit(image: Image.Image, size: int) -> Image.Image:
    """Scale the short side to ``size`` and centre-crop a square (the subject is usually centred)."""
    return ImageOps.fit(image, (size, size), Image.Resampling.LANCZOS if min(image.size) > size else Image.Resampling.BICUBIC)


def load_images(folder: str | Path, size: int) -> tuple[list[Image.Image], list[Path]]:
    """Every readable image in ``folder`` (sorted by name), as ``size`` x ``size`` RGB."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"data folder not found: {folder}")
    files = sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))
    if not files:
        raise ValueError(f"data folder {folder} is empty; put 3 to 10 images of the subject in it")
    images, used = [], []
    for path in files:
        try:
            with Image.open(path) as im:
                im.load()
                images.append(fit(to_rgb(im), size))
                used.append(path)
        except (UnidentifiedImageError, OSError, ValueError) as e:
            warnings.warn(f"skipping {path.name}: not a readable image ({type(e).__name__})", stacklevel=2)
    if not images:
        raise ValueError(f"no readable images in {folder} (accepted: {', '.join(sorted(IMAGE_SUFFIXES))})")
    return images, used


def to_tensor(images: list[Image.Image]) -> torch.Tensor:
    """RGB images -> ``(n, 3, h, w)`` in [-1, 1], what VAEs take."""
    arr = np.stack([np.asarray(im, dtype=np.float32) for im in images])
    return torch.from_numpy(arr).permute(0, 3, 1, 2) / 127.5 - 1
