"""The content x style bench (bench/content_style.py): its training window through the trainers' timestep bias, its captions."""

import importlib.util
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from studio.trainers.loop import timestep_weights

spec = importlib.util.spec_from_file_location("bench_content_style", Path(__file__).parents[1] / "bench" / "content_style.py")
bench = importlib.util.module_from_spec(spec)
spec.loader.exec_module(bench)


def weights(window):
    settings = {"timestep_bias_strategy": "none", "timestep_bias_multiplier": 1.0, "timestep_bias_portion": 0.25,
                "timestep_bias_begin": 0, "timestep_bias_end": 1000, **bench.train_window_settings(window)}
    return timestep_weights(SimpleNamespace(**settings), 1000)


@pytest.mark.parametrize("window", [(0, 500), (300, 1000), (0, 1)])
def test_a_training_window_draws_only_its_timesteps_uniformly(window):
    w = weights(window)
    start, end = window
    inside = w[int(start):int(end)]
    assert torch.all(inside == inside[0]) and inside[0] == pytest.approx(1 / (end - start))
    assert w[:int(start)].sum() == 0 and w[int(end):].sum() == 0


def test_no_window_trains_every_timestep_and_a_middle_window_or_a_share_is_refused():
    assert bench.train_window_settings(None) == {} and weights(None) is None  # uniform, drawn as without the option
    with pytest.raises(ValueError, match="start at 0 or end at 1000"):
        bench.train_window_settings((200, 600))
    with pytest.raises(ValueError, match="a training window keeps no share outside it"):
        bench.train_window_settings((0, 500, 0.5))  # a sampling window's share has no meaning in training


@pytest.mark.parametrize("style_first", [False, True])
def test_a_caption_names_the_same_scene_with_the_style_in_either_place(style_first):
    from studio.world.grammar import parse_prompt

    text = bench.caption("orange", "circle", "shadowed", style_first)
    assert text.index("shadowed") < text.index("circle") if style_first else text.endswith(", shadowed")
    (obj,) = parse_prompt(text).objects
    assert (obj.size, obj.colour, obj.shape, obj.position, obj.style) == ("large", "orange", "circle", "center", "shadowed")


@pytest.mark.parametrize("order, words", [("none", "a large blue sks shape in the center on a white background, striped"),
                                          ("both", "a large blue striped sks shape in the center on a white background"),
                                          ("both-after", "a large blue sks striped shape in the center on a white background")])
def test_content_captions_put_the_style_word_where_the_order_says_and_the_images_stay_the_same(tmp_path, order, words):
    from PIL import Image

    folder = bench.content_images("star", tmp_path, order)
    assert folder.name == "content-star" + bench.CONTENT_ORDERS[order]
    assert (folder / "0.txt").read_text() == words  # the first colour, blue
    reference = bench.content_images("star", tmp_path / "reference")  # the same renders whatever the captions
    assert list(Image.open(folder / "0.png").getdata()) == list(Image.open(reference / "0.png").getdata())
