"""Training images from a folder: any size and mode, EXIF-rotated, bad files skipped with a warning.

Images of any aspect ratio go to the nearest *bucket*: a training size of about the same area with
sides that the model can take (kohya's and ai-toolkit's aspect-ratio bucketing). Each keeps its
original size and crop offset for SDXL's micro-conditioning. Without buckets every image is
centre-cropped to a square.

A mask of the subject may lie beside an image as ``<name>.mask.png`` (white: the subject), cropped and scaled
with its image; the attention loss (``--attention-loss``) reads it, or, without one, the pixels that differ
from the image's plain background (:func:`subject_mask`). Mask files are not training images.

kohya's folder layout is read too: a data folder whose images sit in subfolders named ``<repeats>_<words>``
("10_sks shape") trains on each subfolder's images ``repeats`` times as often as an image of a ``1_`` folder, and
``words`` is the caption of each image there without a sidecar of its own.

With ``--random-flip`` a trainer also trains on each image mirrored left to right (:func:`mirrored`), its caption's
"left" and "right" swapped (:func:`mirror_caption`).

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

import dataclasses
import math
import re
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
    mask: Image.Image | None = None  # from a sidecar ``<name>.mask.png`` (mode L, the image's crop), if there is one
    repeats: int = 1  # kohya's folder repeats: how many times likelier this image is drawn than one of a ``1_`` folder

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


def fit_bucket(image: Image.Image, bucket: tuple[int, int], mask: Image.Image | None = None) -> TrainImage:
    """Scale ``image`` to cover ``bucket`` (width, height) and centre-crop it (and ``mask``, of the image's
    size, the same way)."""
    w, h = image.size
    bw, bh = bucket
    scale = max(bw / w, bh / h)
    rw, rh = max(bw, round(w * scale)), max(bh, round(h * scale))
    resample = Image.Resampling.LANCZOS if scale < 1 else Image.Resampling.BICUBIC
    top, left = (rh - bh) // 2, (rw - bw) // 2
    box = (left, top, left + bw, top + bh)
    item = TrainImage(image.resize((rw, rh), resample).crop(box), (h, w), (top, left))
    if mask is not None:
        item.mask = mask.resize((rw, rh), Image.Resampling.BILINEAR).crop(box)
    return item


def mask_file(path: Path) -> Path | None:
    """The sidecar mask of the image at ``path`` (``<name>.mask.<image suffix>``), if there is one."""
    return next((m for suffix in sorted(IMAGE_SUFFIXES) if (m := path.with_name(f"{path.stem}.mask{suffix}")).is_file()),
                None)


def is_mask_file(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_SUFFIXES and path.stem.lower().endswith(".mask")


def subject_mask(item: TrainImage, name: str = "image", threshold: float = 40.0) -> torch.Tensor:
    """Where the subject is in ``item`` as ``(height, width)`` floats in [0, 1]: its sidecar mask, else the
    pixels that differ from the background by more than ``threshold`` (of 255) in some channel, the background
    being the median colour of the image's border (a subject shot on a plain backdrop, as DreamBooth's
    references usually are). A mask that covers almost nothing or almost everything is refused, naming the
    image: the background is not plain, or the mask is wrong."""
    if item.mask is not None:
        mask = np.asarray(item.mask, dtype=np.float32) / 255
        source = "its mask file"
    else:
        a = np.asarray(item.image.convert("RGB"), dtype=np.float32)
        border = np.concatenate([a[0], a[-1], a[:, 0], a[:, -1]])
        mask = (np.abs(a - np.median(border, axis=0)).max(-1) > threshold).astype(np.float32)
        source = "the pixels that differ from its border's colour"
    share = float(mask.mean())
    if not 0.005 <= share <= 0.95:
        raise ValueError(f"{name}: the subject's mask ({source}) covers {share:.1%} of the image; accepted: 0.5% to"
                         f" 95%. Put a mask beside it as {Path(name).stem}.mask.png (white: the subject) or shoot the"
                         " subject on a plain background")
    return torch.from_numpy(mask)


KOHYA_FOLDER = re.compile(r"^(\d+)_(.+)$")


def kohya_folders(folder: Path) -> list[tuple[Path, int, str]]:
    """``folder``'s subfolders in kohya's layout, ``(path, repeats, words)`` sorted by name ("10_sks shape" -> 10,
    "sks shape"); ``[]`` when it has none. Refuses images beside them, a repeat count of 0, and warns of (and skips)
    other subfolders."""
    subs = sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
    found = [(p, KOHYA_FOLDER.match(p.name)) for p in subs]
    if not any(m for _, m in found):
        return []
    loose = [p.name for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES]
    if loose:
        raise ValueError(f"data folder {folder} has images ({loose[0]}, {len(loose)} in all) beside kohya-style"
                         " subfolders (REPEATS_WORDS); move them into such a subfolder, e.g. 1_sks shape")
    out = []
    for path, m in found:
        if m is None:
            warnings.warn(f"skipping {path}: not a kohya-style REPEATS_WORDS folder name (e.g. 10_sks shape)", stacklevel=3)
            continue
        if int(m.group(1)) < 1:
            raise ValueError(f"data subfolder {path.name!r} repeats its images {m.group(1)} times; accepted: 1 or more")
        out.append((path, int(m.group(1)), m.group(2).replace("_", " ").strip()))
    return out


def load_images(folder: str | Path, size: int, multiple: int = 0) -> tuple[list[TrainImage], list[Path]]:
    """Every readable image in ``folder`` (sorted by name) as RGB: each in its aspect bucket of about
    ``size``² pixels with sides multiples of ``multiple``, or (``multiple=0``) as a centre-cropped
    ``size`` x ``size`` square. A folder in kohya's layout (:func:`kohya_folders`) gives its subfolders' images,
    each with its folder's repeats, and its folder's words as its caption where it has no sidecar."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"data folder not found: {folder}")
    if kohya := kohya_folders(folder):
        images, used = [], []
        for sub, repeats, words in kohya:
            try:
                got, paths = load_images(sub, size, multiple)
            except ValueError as e:
                warnings.warn(f"skipping {sub}: {e}", stacklevel=2)
                continue
            for item in got:
                item.repeats, item.caption = repeats, item.caption or words
            images += got
            used += paths
        if not images:
            raise ValueError(f"no readable images in the subfolders of {folder} (accepted: {', '.join(sorted(IMAGE_SUFFIXES))})")
        return images, used
    files = sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))
    if not files:
        raise ValueError(f"data folder {folder} is empty; put 3 to 10 images of the subject in it")
    choices = buckets(size, multiple) if multiple else [(size, size)]
    images, used = [], []
    for path in files:
        if path.suffix.lower() in SIDECAR_SUFFIXES or is_mask_file(path):
            continue
        try:
            with Image.open(path) as im:
                im.load()
                rgb = to_rgb(im)
        except (UnidentifiedImageError, OSError, ValueError) as e:
            warnings.warn(f"skipping {path.name}: not a readable image ({type(e).__name__})", stacklevel=2)
            continue
        mask = None
        if (found := mask_file(path)) is not None:  # a bad mask is an error, not a skipped image
            try:
                with Image.open(found) as m:
                    mask = ImageOps.exif_transpose(m).convert("L")
            except (UnidentifiedImageError, OSError) as e:
                raise ValueError(f"mask {found}: not a readable image ({type(e).__name__})") from None
            if mask.size != rgb.size:
                raise ValueError(f"mask {found} is {mask.size[0]}x{mask.size[1]} and its image {path.name}"
                                 f" {rgb.size[0]}x{rgb.size[1]}; accepted: a mask of its image's size")
        item = fit_bucket(rgb, nearest_bucket(*rgb.size, choices), mask)
        if (text := path.with_suffix(".txt")).is_file():
            item.caption = text.read_text(encoding="utf-8", errors="replace").strip() or None
        images.append(item)
        used.append(path)
    if not images:
        raise ValueError(f"no readable images in {folder} (accepted: {', '.join(sorted(IMAGE_SUFFIXES))})")
    return images, used


def group_by_size(images: list[TrainImage]) -> dict[tuple[int, int], list[int]]:
    """Indices of ``images`` per (width, height), in order: one batch is drawn from one group."""
    groups: dict[tuple[int, int], list[int]] = {}
    for i, im in enumerate(images):
        groups.setdefault(im.size, []).append(i)
    return groups


def without_token(caption: str, token: str) -> str:
    """``caption`` with every whole-word ``token`` taken out, and the commas and spaces it leaves tidied: the prompt
    of a class image paired with that caption.

    >>> without_token("a large orange circle in the center, zxy", "zxy")
    'a large orange circle in the center'
    >>> without_token("zxy, a large sks shape, striped", "sks")
    'zxy, a large shape, striped'
    """
    out = re.sub(rf"(?<![\w-]){re.escape(token)}(?![\w-])", "", caption)
    out = re.sub(r"\s*,(\s*,)+", ",", out)  # an emptied tag between commas
    out = re.sub(r"\s+([,.;:])", r"\1", re.sub(r"\s{2,}", " ", out))
    return out.strip(" ,;")


def mirror_caption(caption: str) -> str:
    """``caption`` as a mirrored image would be described: the words "left" and "right" swapped (capitals kept).

    >>> mirror_caption("a sks shape on the Left and a circle on the right, leftover")
    'a sks shape on the Right and a circle on the left, leftover'
    """
    swap = {"left": "right", "right": "left"}

    def repl(m: re.Match) -> str:
        word = m.group(0)
        new = swap[word.lower()]
        return new.upper() if word.isupper() else new.capitalize() if word[0].isupper() else new

    return re.sub(r"\b(left|right)\b", repl, caption, flags=re.IGNORECASE)


def shuffle_tags(caption: str, keep: int, rng) -> str:
    """``caption``'s comma-separated tags with all but the first ``keep`` shuffled by ``rng`` (kohya's
    --shuffle_caption / --keep_tokens), joined by ", ".

    >>> import random
    >>> shuffle_tags("sks, star, blue, striped", 1, random.Random(0))
    'sks, star, striped, blue'
    """
    tags = [t.strip() for t in caption.split(",")]
    head, tail = tags[:keep], tags[keep:]
    rng.shuffle(tail)
    return ", ".join(head + tail)


def mirrored(item: TrainImage) -> TrainImage:
    """``item`` mirrored left to right (its mask too). The crop offset stays: a centre crop mirrors onto itself,
    within a pixel. The caption is :func:`mirror_caption`'s."""
    flip = Image.Transpose.FLIP_LEFT_RIGHT
    return dataclasses.replace(item, image=item.image.transpose(flip),
                               caption=None if item.caption is None else mirror_caption(item.caption),
                               mask=None if item.mask is None else item.mask.transpose(flip))


def to_tensor(images: list[Image.Image] | list[TrainImage]) -> torch.Tensor:
    """RGB images of one size -> ``(n, 3, h, w)`` in [-1, 1], what VAEs take."""
    arr = np.stack([np.asarray(getattr(im, "image", im), dtype=np.float32) for im in images])
    return torch.from_numpy(arr).permute(0, 3, 1, 2) / 127.5 - 1
