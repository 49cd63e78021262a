"""Training images from a folder: any size and mode, EXIF-rotated, bad files skipped with a warning.

Images of any aspect ratio go to the nearest *bucket*: a training size of about the same area with
sides that the model can take (kohya's and ai-toolkit's aspect-ratio bucketing). Each keeps its
original size and crop offset for SDXL's micro-conditioning. Without buckets every image is
centre-cropped to a square.

    >>> from studio.trainers.data import buckets
    >>> buckets(64, 16)
    [(48, 80), (64, 64), (80, 48)]

    >>> from studio.trainers.data import load_images
    >>> load_images("/no/such/folder", 64)
    Traceback (most recent call last):
    ...
    FileNotFoundError: data folder not found: /no/such/folder
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

SIDECAR_SUFFIXES = {".txt", ".caption", ".json", ".toml", ".yaml", ".npz"}  # caption/metadata files beside images
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff"}


def to_rgb(image: Image.Image) -> Image.Image:
    """EXIF orientation applied; transparency composited over white; greyscale/palette/CMYK to RGB."""
    image = ImageOps.exif_transpose(image)
    if image.mode in ("RGBA", "LA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        canvas = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(canvas, rgba).convert("RGB")
    return image.convert("RGB")


@dataclass
class TrainImage:
    """One training image at its bucket's size, with what SDXL's micro-conditioning needs."""

    image: Image.Image
    original_size: tuple[int, int]  # (height, width) as loaded, EXIF orientation applied
    crop_top_left: tuple[int, int]  # (top, left) of the crop in the resized image
    caption: str | None = None  # from a sidecar ``<name>.txt`` (kohya's convention), if there is one

    @property
    def size(self) -> tuple[int, int]:
        """(width, height), as PIL reports it."""
        return self.image.size


def buckets(size: int, multiple: int, max_ratio: float = 2.0) -> list[tuple[int, int]]:
    """``(width, height)`` pairs of at most ``size``² pixels, sides multiples of ``multiple``, aspect
    ratio within ``1/max_ratio .. max_ratio``, sorted by width."""
    if size < multiple or multiple < 1:
        raise ValueError(f"resolution {size} is smaller than the model's size step {multiple}")
    out = set()
    for w in range(multiple, int(size * max_ratio) + 1, multiple):
        h = (size * size // w) // multiple * multiple
        if h >= multiple and max(w / h, h / w) <= max_ratio:
            out.add((w, h))
    return sorted(out)


def nearest_bucket(width: int, height: int, choices: list[tuple[int, int]]) -> tuple[int, int]:
    """The bucket whose aspect ratio is closest (in log ratio) to ``width/height``; ties go to the
    squarer one."""
    aspect = math.log(width / height)
    return min(choices, key=lambda b: (round(abs(math.log(b[0] / b[1]) - aspect), 9), abs(math.log(b[0] / b[1]))))


def fit_bucket(image: Image.Image, bucket: tuple[int, int]) -> TrainImage:
    """Scale ``image`` to cover ``bucket`` (width, height) and centre-crop it."""
    w, h = image.size
    bw, bh = bucket
    scale = max(bw / w, bh / h)
    rw, rh = max(bw, round(w * scale)), max(bh, round(h * scale))
    resample = Image.Resampling.LANCZOS if scale < 1 else Image.Resampling.BICUBIC
    top, left = (rh - bh) // 2, (rw - bw) // 2
    resized = image.resize((rw, rh), resample)
    return TrainImage(resized.crop((left, top, left + bw, top + bh)), (h, w), (top, left))


def load_images(folder: str | Path, size: int, multiple: int = 0) -> tuple[list[TrainImage], list[Path]]:
    """Every readable image in ``folder`` (sorted by name) as RGB: each in its aspect bucket of about
    ``size``² pixels with sides multiples of ``multiple``, or (``multiple=0``) as a centre-cropped
    ``size`` x ``size`` square."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"data folder not found: {folder}")
    files = sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))
    if not files:
        raise ValueError(f"data folder {folder} is empty; put 3 to 10 images of the subject in it")
    choices = buckets(size, multiple) if multiple else [(size, size)]
    images, used = [], []
    for path in files:
        if path.suffix.lower() in SIDECAR_SUFFIXES:
            continue
        try:
            with Image.open(path) as im:
                im.load()
                rgb = to_rgb(im)
            item = fit_bucket(rgb, nearest_bucket(*rgb.size, choices))
            if (text := path.with_suffix(".txt")).is_file():
                item.caption = text.read_text(encoding="utf-8", errors="replace").strip() or None
            images.append(item)
            used.append(path)
        except (UnidentifiedImageError, OSError, ValueError) as e:
            warnings.warn(f"skipping {path.name}: not a readable image ({type(e).__name__})", stacklevel=2)
    if not images:
        raise ValueError(f"no readable images in {folder} (accepted: {', '.join(sorted(IMAGE_SUFFIXES))})")
    return images, used


def group_by_size(images: list[TrainImage]) -> dict[tuple[int, int], list[int]]:
    """Indices of ``images`` per (width, height), in order: one batch is drawn from one group."""
    groups: dict[tuple[int, int], list[int]] = {}
    for i, im in enumerate(images):
        groups.setdefault(im.size, []).append(i)
    return groups


def to_tensor(images: list[Image.Image] | list[TrainImage]) -> torch.Tensor:
    """RGB images of one size -> ``(n, 3, h, w)`` in [-1, 1], what VAEs take."""
    arr = np.stack([np.asarray(getattr(im, "image", im), dtype=np.float32) for im in images])
    return torch.from_numpy(arr).permute(0, 3, 1, 2) / 127.5 - 1
