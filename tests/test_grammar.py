import random

import pytest

from studio.world.grammar import (
    ObjectPrompt,
    ScenePrompt,
    caption_scene,
    format_prompt,
    is_held_out,
    parse_prompt,
    sample_captioned_scene,
    scene_from_prompt,
)

REQUIRED = {
    "a red circle": ScenePrompt((ObjectPrompt("circle", "red"),)),
    "a red circle on a white background": ScenePrompt((ObjectPrompt("circle", "red"),), "white"),
    "a red circle on the left": ScenePrompt((ObjectPrompt("circle", "red", position="left"),)),
    "a large blue square at the top right, striped": ScenePrompt(
        (ObjectPrompt("square", "blue", "large", "top right", "striped"),)
    ),
    "a red circle on the left and a green triangle on the right": ScenePrompt(
        (ObjectPrompt("circle", "red", position="left"), ObjectPrompt("triangle", "green", position="right"))
    ),
}


@pytest.mark.parametrize("text", list(REQUIRED))
def test_required_forms_parse_and_format_back(text):
    parsed = parse_prompt(text)
    assert parsed == REQUIRED[text]
    assert format_prompt(parsed) == text


def test_random_captions_round_trip():
    rng = random.Random(0)
    for _ in range(500):
        scene, caption = sample_captioned_scene(rng)
        parsed = parse_prompt(caption)
        assert parsed.unknown == ()
        assert len(parsed.objects) == len(scene.objects)
        assert parse_prompt(format_prompt(parsed)) == parsed
        for want, obj in zip(parsed.objects, scene.objects):
            for attr, value in want.attributes().items():
                assert getattr(obj, attr) == value


def test_synonyms_and_style_before_shape():
    p = parse_prompt("A Striped blue square in the top-right corner on a grey background")
    assert p.objects[0] == ObjectPrompt("square", "blue", None, "top right", "striped")
    assert p.background == "gray"
    assert parse_prompt("a circle in the middle").objects[0].position == "center"


def test_unknown_words_are_kept_not_rejected():
    p = parse_prompt("a photo of sks star")
    assert p.objects[0].shape == "star"
    assert p.unknown == ("photo", "of", "sks")


def test_empty_prompt_is_an_error():
    for text in ("", "   "):
        with pytest.raises(ValueError, match="prompt is empty"):
            parse_prompt(text)


def test_held_out_split_is_about_one_in_twenty_and_disjoint():
    rng = random.Random(1)
    train = [sample_captioned_scene(rng)[1] for _ in range(300)]
    held = [sample_captioned_scene(rng, held_out=True)[1] for _ in range(300)]
    assert not any(is_held_out(c) for c in train)
    assert all(is_held_out(c) for c in held)
    frac = sum(is_held_out(f"a red circle {i}") for i in range(4000)) / 4000
    assert 0.03 < frac < 0.07


def test_scene_from_prompt_honours_what_is_named():
    rng = random.Random(0)
    prompt = parse_prompt("a large blue square at the top right, striped and a red circle")
    for _ in range(20):
        scene = scene_from_prompt(prompt, rng)
        square, circle = scene.objects
        assert (square.shape, square.colour, square.size, square.position, square.style) == (
            "square", "blue", "large", "top right", "striped")
        assert circle.shape == "circle" and circle.colour == "red" and circle.position != "top right"
    with pytest.raises(ValueError, match="same position"):
        scene_from_prompt(parse_prompt("a red circle on the left and a blue square on the left"), rng)


def test_captions_name_every_shape():
    rng = random.Random(2)
    for _ in range(100):
        scene, _ = sample_captioned_scene(rng, n_objects=3)
        prompt = caption_scene(scene, rng)
        assert [o.shape for o in prompt.objects] == [o.shape for o in scene.objects]


def test_caption_detail_sets_how_often_size_and_style_are_named():
    scenes = [sample_captioned_scene(random.Random(i))[0] for i in range(200)]

    def named(detail):
        rng = random.Random(5)
        objects = [o for s in scenes for o in caption_scene(s, rng, detail).objects]
        return sum(o.size is not None for o in objects) / len(objects), sum(o.style is not None for o in objects) / len(objects)

    # the default is the evaluation prompts' rate, drawing the same captions as before the knob existed
    default = [caption_scene(s, random.Random(i)) for i, s in enumerate(scenes)]
    assert default == [caption_scene(s, random.Random(i), 0.5) for i, s in enumerate(scenes)]
    assert all(0.4 < rate < 0.6 for rate in named(0.5))
    from studio.eval.fidelity import (
        held_out_prompts,  # the evaluation split's first prompts, as every score so far read them
    )
    assert held_out_prompts(2, 1) == ["a medium black rectangle, striped on a white background",
                                      "a blue semicircle in the center, dotted on a green background"]
    assert all(0.75 < rate < 0.85 for rate in named(0.8))
    assert named(1.0) == (1.0, 1.0) and named(0.0) == (0.0, 0.0)
