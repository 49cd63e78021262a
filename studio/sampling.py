"""Sampling: prompts in, images out, seeded per image so a batch is reproducible image by image."""

from __future__ import annotations

import warnings

import torch
from PIL import Image

from studio.world.grammar import parse_prompt

_warned: set[str] = set()


def check_prompt(prompt: str) -> None:
    """Reject an empty prompt; warn once per word the world's grammar does not know."""
    parsed = parse_prompt(prompt)  # raises ValueError on an empty prompt
    new = [w for w in dict.fromkeys(parsed.unknown) if w not in _warned]
    if new:
        _warned.update(new)
        warnings.warn(f"unknown word(s) in prompt {prompt!r}: {', '.join(new)}; generating anyway", stacklevel=2)


def generate(
    pipe,
    prompts: list[str],
    seed: int = 0,
    steps: int = 25,
    guidance: float = 5.0,
    height: int | None = None,
    width: int | None = None,
    batch_size: int = 16,
) -> list[Image.Image]:
    """One image per prompt; image ``i`` uses seed ``seed + i`` whatever the batching."""
    if steps < 1:
        raise ValueError(f"steps must be a positive integer, got {steps}")
    images: list[Image.Image] = []
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start : start + batch_size]
        gens = [torch.Generator().manual_seed(seed + start + i) for i in range(len(chunk))]
        out = pipe(prompt=chunk, num_inference_steps=steps, guidance_scale=guidance, generator=gens,
                   height=height, width=width, output_type="pil")
        images.extend(out.images)
    return images


def image_grid(images: list[Image.Image], cols: int | None = None, scale: int = 1) -> Image.Image:
    """Tile images into one picture (row-major), optionally upscaled with nearest-neighbour."""
    if not images:
        raise ValueError("no images to tile")
    cols = cols or min(len(images), 8)
    rows = (len(images) + cols - 1) // cols
    w, h = images[0].size
    grid = Image.new("RGB", (cols * w, rows * h), "white")
    for i, im in enumerate(images):
        grid.paste(im, ((i % cols) * w, (i // cols) * h))
    if scale != 1:
        grid = grid.resize((grid.width * scale, grid.height * scale), Image.Resampling.NEAREST)
    return grid
