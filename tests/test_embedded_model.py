"""The embedded model folder: stock diffusers loads it offline, and it draws what it is asked."""

from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionXLPipeline

from studio.eval.judge import load_judge
from studio.families import EMBEDDED_MODEL, encode_prompt_sdxl, load_pipeline
from studio.sampling import generate
from studio.world.concepts import COLOURS
from studio.world.render import _shade


@pytest.fixture(scope="module")
def pipe():
    return StableDiffusionXLPipeline.from_pretrained(str(EMBEDDED_MODEL), local_files_only=True)


def test_stock_diffusers_loads_the_folder_offline(pipe):
    names = {n for n, _ in pipe.unet.named_modules()}
    assert {"up_blocks.0.attentions.0", "up_blocks.0.attentions.1"} <= names
    assert pipe.unet.config.addition_embed_type == "text_time"
    assert pipe.unet.dtype == torch.float32


def test_weights_fit_the_budget():
    total = sum(p.stat().st_size for p in Path(EMBEDDED_MODEL).rglob("*.safetensors"))
    assert total <= 40 * 2**20, total


def test_our_prompt_encoding_matches_the_pipeline(pipe):
    prompts = ["a red circle on the left", "a sks star"]
    ours, pooled = encode_prompt_sdxl([pipe.tokenizer, pipe.tokenizer_2], [pipe.text_encoder, pipe.text_encoder_2], prompts)
    theirs, _, theirs_pooled, _ = pipe.encode_prompt(prompts, do_classifier_free_guidance=False)
    torch.testing.assert_close(ours, theirs)
    torch.testing.assert_close(pooled, theirs_pooled)


@pytest.mark.parametrize("colour", ["red", "blue", "yellow"])
def test_a_colour_prompt_shows_that_colour(colour):
    pipe = load_pipeline(EMBEDDED_MODEL)
    images = generate(pipe, [f"a large {colour} square in the center on a white background"] * 4, seed=0)
    judge = load_judge()
    seen = [o.colour for r in judge.read(images) for o in r.objects]
    assert seen.count(colour) >= 3, seen
    # and independently of the judge: the centre pixels' mean is closest to that colour, or to a mix of it and its
    # pattern shade (the prompt names no style: a striped or dotted square is a right answer, and the mean of a
    # rendered striped yellow square, (172, 154, 14), is nearer plain orange than plain yellow)
    hits = 0
    for im in images:
        centre = np.asarray(im).astype(float)[26:38, 26:38].reshape(-1, 3).mean(0)
        hits += min(COLOURS, key=lambda k: _to_colour_or_its_shade(centre, COLOURS[k])) == colour
    assert hits >= 3


def _to_colour_or_its_shade(rgb: np.ndarray, colour: tuple[int, int, int]) -> float:
    """L1 distance from ``rgb`` to the nearest mix of ``colour`` and its pattern shade."""
    a, b = np.array(colour, float), np.array(_shade(colour), float)
    s = float(np.clip(np.dot(rgb - a, b - a) / np.dot(b - a, b - a), 0.0, 1.0))
    return float(np.abs(rgb - (a + s * (b - a))).sum())
