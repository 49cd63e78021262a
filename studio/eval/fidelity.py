"""Scores read by the world judge: prompt fidelity (the CLIP-T analogue) and identity similarity
(the CLIP-I / DINO analogue).

Prompt fidelity of an image is the fraction of the attributes its prompt names that the judge
sees: each prompt object is matched to a distinct detected object (the assignment that satisfies
the most attributes); an object with no match scores zero on all its attributes; a named
background counts as one more attribute.

>>> from studio.world.grammar import parse_prompt
>>> from studio.world.render import Scene, WorldObject, render
>>> from studio.eval.judge import load_judge
>>> img = render(Scene((WorldObject("circle", "red", "large", "left", "flat"),), "white"))
>>> reading = load_judge().read([img])[0]
>>> prompt_fidelity(reading, parse_prompt("a red circle on the left"))
1.0
>>> prompt_fidelity(reading, parse_prompt("a blue circle on the right"))
0.3333333333333333
"""

from __future__ import annotations

import itertools
import random
from collections import Counter

import numpy as np
import torch
from PIL import Image

from studio.eval.judge import DEFAULT_JUDGE, Judge, SceneReading, load_judge
from studio.world.grammar import ATTRIBUTES, ScenePrompt, parse_prompt, sample_captioned_scene

__all__ = ["DEFAULT_JUDGE", "REPORTED", "prompt_fidelity", "attribute_hits", "identity_similarity", "held_out_prompts", "evaluate_prompts"]

# what a prompt can name, in the order reports list them: the object attributes, then the background
REPORTED = (*ATTRIBUTES, "background")


def prompt_fidelity(reading: SceneReading, prompt: ScenePrompt) -> float:
    """Fraction of ``prompt``'s attributes that ``reading`` shows (1.0 for a prompt naming none)."""
    return _fidelity(attribute_hits(reading, prompt), prompt)


def _fidelity(hits: dict[str, tuple[int, int]], prompt: ScenePrompt) -> float:
    """:func:`prompt_fidelity` from the prompt's :func:`attribute_hits`."""
    total = prompt.n_attributes()
    return sum(hit for hit, _ in hits.values()) / total if total else 1.0


def attribute_hits(reading: SceneReading, prompt: ScenePrompt) -> dict[str, tuple[int, int]]:
    """Per attribute the prompt names (``shape``, ..., ``background``): ``(shown, named)`` counts under
    the object assignment that shows the most attributes (the one :func:`prompt_fidelity` scores)."""
    return _matched(reading, prompt)[0]


def _matched(reading: SceneReading, prompt: ScenePrompt) -> tuple[dict[str, tuple[int, int]], dict[int, int]]:
    """:func:`attribute_hits` and the assignment behind it: prompt object index -> detected object index."""
    wanted = [o.attributes() for o in prompt.objects]
    seen = [o.attributes() for o in reading.objects]
    named = Counter(k for w in wanted for k in w)
    best, best_total, pairs = Counter(), 0, {}
    k = min(len(wanted), len(seen))
    # Up to 3 prompt objects against up to 9 cells: at most 504 assignments.
    for chosen in itertools.permutations(range(len(seen)), k):
        for subset in itertools.combinations(range(len(wanted)), k):
            hits = Counter(a for w, s in zip(subset, chosen) for a, v in wanted[w].items() if seen[s][a] == v)
            if hits.total() > best_total or not pairs:
                best, best_total, pairs = hits, hits.total(), dict(zip(subset, chosen))
    out = {a: (best[a], n) for a, n in named.items()}
    if prompt.background is not None:
        out["background"] = (int(reading.background == prompt.background), 1)
    return out, pairs


def _named_and_read(by: str, reading: SceneReading, prompt: ScenePrompt, pairs: dict[int, int]):
    """``(named value, value read)`` for each mention of attribute ``by`` in ``prompt``, under the assignment
    ``pairs`` (prompt object -> detected object) that :func:`_matched` scored."""
    if by == "background":
        if prompt.background is not None:
            yield prompt.background, reading.background
        return
    for i, obj in enumerate(prompt.objects):
        value = obj.attributes().get(by)
        if value is not None:
            yield value, reading.objects[pairs[i]].attributes()[by] if i in pairs else "none"


def identity_similarity(judge: Judge, images: list[Image.Image], references: list[Image.Image]) -> float:
    """Mean cosine similarity between the judge's identity embeddings of images and references."""
    a = judge.identity_embedding(images)
    b = judge.identity_embedding(references)
    return float((a @ b.T).mean())


def held_out_prompts(n: int, n_objects: int, seed: int = 0) -> list[str]:
    """``n`` random captions with ``n_objects`` objects from the split pretraining never used."""
    rng = random.Random(seed * 31 + n_objects)
    return [sample_captioned_scene(rng, n_objects=n_objects, held_out=True)[1] for _ in range(n)]


def evaluate_prompts(
    pipe,
    n_prompts: int = 200,
    seed: int = 0,
    steps: int = 25,
    guidance: float = 5.0,
    judge: Judge | None = None,
    progress: bool = True,
    object_counts: tuple[int, ...] = (1, 2),
    by: str | None = None,
    confusions: Counter | None = None,
) -> dict[str, float]:
    """Generate one image per held-out prompt; per object count ``k``: mean fidelity (``fidelity_k``) and,
    per attribute, the fraction of the prompts' mentions of it the images show (``shape_k``, ...).

    ``by`` (an attribute of :data:`REPORTED`): also per value of it, the fraction of that value's mentions the
    images show (``colour=blue_k``) and the number of mentions (``colour=blue_k_n``); with ``confusions``, each
    mention is counted there as ``(k, named value, value the judge read)`` (``"none"``: no object matched)."""
    if by is not None and by not in REPORTED:
        raise ValueError(f"by={by!r}: not an attribute; accepted: {', '.join(REPORTED)}")
    from tqdm.auto import tqdm

    from studio.sampling import generate

    judge = judge or load_judge()
    scores: dict[str, float] = {}
    for k in object_counts:
        prompts = held_out_prompts(n_prompts, k, seed)
        values, shown, named = [], Counter(), Counter()
        value_shown, value_named = Counter(), Counter()
        for start in tqdm(range(0, n_prompts, 25), desc=f"{k}-object prompts", disable=not progress):
            chunk = prompts[start : start + 25]
            with torch.no_grad():
                images = generate(pipe, chunk, seed=seed + start, steps=steps, guidance=guidance)
            for reading, text in zip(judge.read(images), chunk):
                prompt = parse_prompt(text)
                hits, pairs = _matched(reading, prompt)
                values.append(_fidelity(hits, prompt))
                for attribute, (hit, n) in hits.items():
                    shown[attribute] += hit
                    named[attribute] += n
                for value, read in _named_and_read(by, reading, prompt, pairs) if by else ():
                    value_named[value] += 1
                    value_shown[value] += read == value
                    if confusions is not None:
                        confusions[(k, value, read)] += 1
        scores[f"fidelity_{k}"] = float(np.mean(values))
        scores.update({f"{a}_{k}": shown[a] / named[a] for a in REPORTED if named[a]})
        for value in sorted(value_named):
            scores[f"{by}={value}_{k}"] = value_shown[value] / value_named[value]
            scores[f"{by}={value}_{k}_n"] = value_named[value]
    return scores
