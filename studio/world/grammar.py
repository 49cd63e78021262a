"""The caption grammar: what the renderer drew, in words, and back.

A caption names one to three objects joined by "and", each as
``a [size] [colour] [style] <shape> [position phrase][, style]``, optionally followed by
``on a <colour> background``. Any attribute but the shape may be left out; the renderer then
chooses it at random. Examples the grammar accepts::

    a red circle
    a red circle on a white background
    a red circle on the left
    a large blue square at the top right, striped
    a red circle on the left and a green triangle on the right

Words the grammar does not know (a DreamBooth identifier such as "sks") are kept in
``ScenePrompt.unknown`` rather than rejected.

>>> p = parse_prompt("a large blue square at the top right, striped")
>>> (p.objects[0].size, p.objects[0].colour, p.objects[0].shape, p.objects[0].position, p.objects[0].style)
('large', 'blue', 'square', 'top right', 'striped')
>>> format_prompt(p)
'a large blue square at the top right, striped'
"""

from __future__ import annotations

import hashlib
import random
import re
from dataclasses import dataclass

from studio.world.concepts import (
    BASE_SHAPES,
    BASE_STYLES,
    COLOUR_NAMES,
    POSITION_NAMES,
    POSITION_PHRASES,
    SHAPES,
    SIZE_NAMES,
    STYLES,
)
from studio.world.render import Scene, sample_scene

ATTRIBUTES = ("shape", "colour", "size", "position", "style")

# Phrases the parser also accepts for a position (the formatter writes POSITION_PHRASES).
_POSITION_SYNONYMS: dict[str, str] = {phrase: name for name, phrase in POSITION_PHRASES.items()}
for _name in POSITION_NAMES:
    for _prep in ("at the", "on the", "in the"):
        _POSITION_SYNONYMS.setdefault(f"{_prep} {_name}", _name)
        if " " in _name:
            _POSITION_SYNONYMS.setdefault(f"{_prep} {_name} corner", _name)
            _POSITION_SYNONYMS.setdefault(f"{_prep} {_name.replace(' ', '-')}", _name)
for _phrase in ("in the middle", "in the centre", "at the center", "at the centre"):
    _POSITION_SYNONYMS[_phrase] = "center"
_POSITION_RE = re.compile(
    r"\b(" + "|".join(re.escape(p) for p in sorted(_POSITION_SYNONYMS, key=len, reverse=True)) + r")\b"
)
_BACKGROUND_RE = re.compile(r"\bon an? ([a-z]+) background\b")

# Every word a caption can contain: the tokenizer's corpus is built from these.
VOCABULARY: tuple[str, ...] = tuple(
    sorted(
        set(" ".join(_POSITION_SYNONYMS).replace("-", " ").split())
        | set(" ".join(SIZE_NAMES + COLOUR_NAMES + SHAPES + STYLES).split())
        | {"a", "an", "and", "on", "background"}
    )
)


@dataclass(frozen=True)
class ObjectPrompt:
    """What a caption says about one object; ``None`` means the caption leaves it open."""

    shape: str | None
    colour: str | None = None
    size: str | None = None
    position: str | None = None
    style: str | None = None

    def attributes(self) -> dict[str, str]:
        """The attributes the caption names, e.g. ``{"shape": "circle", "colour": "red"}``."""
        return {a: getattr(self, a) for a in ATTRIBUTES if getattr(self, a) is not None}


@dataclass(frozen=True)
class ScenePrompt:
    """A parsed caption: its objects, an optional background and the words it did not know."""

    objects: tuple[ObjectPrompt, ...]
    background: str | None = None
    unknown: tuple[str, ...] = ()

    def n_attributes(self) -> int:
        """How many attributes the caption names (the denominator of prompt fidelity)."""
        return sum(len(o.attributes()) for o in self.objects) + (self.background is not None)


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def format_object(obj: ObjectPrompt, style_first: bool = False) -> str:
    """One object phrase, e.g. ``a large blue square at the top right, striped``."""
    if obj.shape is None:
        raise ValueError("an object phrase needs a shape")
    words = [w for w in (obj.size, obj.colour) if w]
    if obj.style and style_first:
        words.append(obj.style)
    words.append(obj.shape)
    text = f"{_article(words[0])} {' '.join(words)}"
    if obj.position:
        text += f" {POSITION_PHRASES[obj.position]}"
    if obj.style and not style_first:
        text += f", {obj.style}"
    return text


def format_prompt(prompt: ScenePrompt, style_first: bool = False) -> str:
    """The caption for a :class:`ScenePrompt`; ``parse_prompt`` inverts it."""
    text = " and ".join(format_object(o, style_first) for o in prompt.objects)
    if prompt.background:
        text += f" on {_article(prompt.background)} {prompt.background} background"
    return text


def _parse_object(segment: str, unknown: list[str]) -> ObjectPrompt:
    fields: dict[str, str] = {}
    match = _POSITION_RE.search(segment)
    if match:
        fields["position"] = _POSITION_SYNONYMS[match.group(1)]
        segment = segment[: match.start()] + " " + segment[match.end() :]
    for word in re.findall(r"[a-z0-9']+", segment):
        if word in ("a", "an", "the", "and", "with"):
            continue
        for attr, names in (("shape", SHAPES), ("colour", COLOUR_NAMES), ("size", SIZE_NAMES), ("style", STYLES)):
            if word in names:
                fields[attr] = word
                break
        else:
            if word == "grey":
                fields["colour"] = "gray"
            else:
                unknown.append(word)
    return ObjectPrompt(**{"shape": None, **fields})


def parse_prompt(text: str) -> ScenePrompt:
    """Read a caption into a :class:`ScenePrompt`.

    Raises ``ValueError`` for an empty prompt. Unknown words are collected, not rejected.
    """
    if not text or not text.strip():
        raise ValueError("the prompt is empty; write e.g. 'a red circle on the left'")
    text = " ".join(text.lower().replace("-", " ").split())
    background = None
    match = _BACKGROUND_RE.search(text)
    if match and match.group(1) in COLOUR_NAMES + ("grey",):
        background = "gray" if match.group(1) == "grey" else match.group(1)
        text = (text[: match.start()] + text[match.end() :]).strip()
    unknown: list[str] = []
    objects = []
    for segment in re.split(r"\band\b|;", text):
        if segment.strip(" ,."):
            obj = _parse_object(segment, unknown)
            if obj.shape is not None or obj.attributes():
                objects.append(obj)
    return ScenePrompt(tuple(objects), background, tuple(unknown))


def caption_scene(scene: Scene, rng: random.Random, detail: float = 0.5) -> ScenePrompt:
    """Name what ``scene`` shows, leaving out a random subset of attributes (never the shape).

    ``detail`` is the chance that an object's size, and separately its style, is named (0.5: the evaluation
    prompts' rate; pretraining may name them more often). Positions are always named when the scene has several
    objects of the same description, so the caption is never ambiguous about which object is which.
    """
    multi = len(scene.objects) > 1
    objects = tuple(
        ObjectPrompt(
            shape=o.shape,
            colour=o.colour if rng.random() < 0.9 else None,
            size=o.size if rng.random() < detail else None,
            position=o.position if rng.random() < (0.8 if multi else 0.6) else None,
            style=o.style if rng.random() < detail else None,
        )
        for o in scene.objects
    )
    background = scene.background if rng.random() < 0.5 else None
    return ScenePrompt(objects, background)


def is_held_out(caption: str) -> bool:
    """The fixed 1-in-20 split of captions that pretraining never uses (for ``studio eval prompts``)."""
    return int(hashlib.sha1(caption.encode()).hexdigest(), 16) % 20 == 0


def sample_captioned_scene(
    rng: random.Random,
    n_objects: int | None = None,
    held_out: bool = False,
    shapes: tuple[str, ...] = BASE_SHAPES,
    styles: tuple[str, ...] = BASE_STYLES,
) -> tuple[Scene, str]:
    """A random scene and its caption, from the training split or (``held_out=True``) the eval split."""
    while True:
        scene = sample_scene(rng, n_objects, shapes, styles)
        caption = format_prompt(caption_scene(scene, rng), style_first=rng.random() < 0.3)
        if is_held_out(caption) == held_out:
            return scene, caption


def scene_from_prompt(prompt: ScenePrompt, rng: random.Random) -> Scene:
    """A scene that satisfies ``prompt``, drawing what it leaves open at random.

    Raises ``ValueError`` when an object has no shape or when two objects ask for one position.
    """
    from studio.world.concepts import COLOURS
    from studio.world.render import WorldObject

    if not prompt.objects:
        raise ValueError("the prompt names no object; write e.g. 'a red circle'")
    taken = {o.position for o in prompt.objects if o.position}
    if len(taken) < sum(o.position is not None for o in prompt.objects):
        raise ValueError("two objects of the prompt ask for the same position")
    free = [p for p in POSITION_NAMES if p not in taken]
    rng.shuffle(free)
    used_colours = {o.colour for o in prompt.objects if o.colour}
    background = prompt.background or ("white" if "white" not in used_colours else "black")
    objects = []
    for o in prompt.objects:
        if o.shape is None:
            raise ValueError(f"an object of the prompt has no shape; known shapes: {', '.join(SHAPES)}")
        colour = o.colour or rng.choice([c for c in COLOURS if c != background])
        if colour == background:
            raise ValueError(f"object colour {colour!r} equals the background colour")
        objects.append(WorldObject(o.shape, colour, o.size or rng.choice(SIZE_NAMES), o.position or free.pop(),
                                   o.style or "flat"))
    return Scene(tuple(objects), background)
