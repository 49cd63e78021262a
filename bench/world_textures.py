"""Named textures: does a model pretrained with ``studio world pretrain --textures N`` draw each texture by its word?

The world judge knows only the world's eight styles (none of them a texture like these), so this
reads a texture by its spectrum instead: the magnitude of the 2-D Fourier transform of the luminance in the middle
12x12 pixels of a large centred object (blind to the texture's phase, so to where the model starts it), compared by
cosine with the mean spectrum of renders of the same prompt in each named texture and in the base styles
``striped`` and ``dotted``; a crop whose luminance hardly varies reads ``flat``. Per texture word, ``--seeds``
samples of ``"a large {colour} circle in the center on a white background, {word}"`` for four colours; a sample
counts when its nearest reference is the named texture (``as named``) or a texture of the same kind (``same
kind``). The ``renders`` column is the reading's ceiling: the renders of those prompts, read the same way; per
model, ``through its VAE`` is the same renders encoded and decoded by the model's VAE (what its UNet could at best
draw). A model that never saw the words (the shipped weights) is the floor. Two control rows prompt the base styles
``striped`` and ``dotted`` by their own words, which every model was trained on: what a word the model was taught
reads as, beside the texture words.

    python bench/world_textures.py --model runs/world-textures
    python bench/world_textures.py --model runs/world-textures --model assets/models/tiny-sdxl-world

The words come from the first model's ``recipe.json`` (its ``textures`` and ``seed``). Prints a table and writes
the ``world-textures`` section of docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from report import git_revision, machine, write_section  # noqa: E402

COLOURS = ("red", "blue", "green", "orange")
SENTENCE = "a large {colour} circle in the center on a white background, {word}"
CROP = (slice(26, 38), slice(26, 38))
CONTROLS = ("striped", "dotted")  # base styles every model knows by word
FLAT_STD = 6.0  # luminance std (0-255) below which a crop reads flat


def spectrum(image) -> np.ndarray | None:
    """The unit-norm magnitude spectrum of the middle crop's luminance, without its mean; None when it is flat."""
    lum = np.asarray(image.convert("RGB"), dtype=np.float64)[CROP].mean(-1)
    if lum.std() < FLAT_STD:
        return None
    mag = np.abs(np.fft.fft2(lum - lum.mean()))
    return (mag / np.linalg.norm(mag)).ravel()


def read(image, names: list[str], refs: np.ndarray) -> str:
    """The name of ``image``'s nearest reference spectrum (rows of ``refs``, unit norm), or ``flat``."""
    s = spectrum(image)
    return "flat" if s is None else names[int(np.argmax(refs @ s))]


def object_scene(colour: str, style: str = "flat"):
    from studio.world.render import Scene, WorldObject

    return Scene((WorldObject("circle", colour, "large", "center", style),), "white")


def references(textures, per_colour: int = 4, seed: int = 0) -> tuple[list[str], np.ndarray]:
    """Names (each texture's word, then ``striped`` and ``dotted``) and their unit-norm mean spectra over renders of
    a large centred circle, ``per_colour`` renders for each of ``COLOURS``."""
    from studio.world.render import render

    rng = random.Random(seed)
    renders = {t.word: [render(object_scene(c), rng.randrange(10**6), textures=(t,)) for c in COLOURS
                        for _ in range(per_colour)] for t in textures}
    renders.update({s: [render(object_scene(c, s), rng.randrange(10**6)) for c in COLOURS for _ in range(per_colour)]
                    for s in CONTROLS})
    refs = np.stack([np.mean([spectrum(im) for im in ims], axis=0) for ims in renders.values()])
    return list(renders), refs / np.linalg.norm(refs, axis=1, keepdims=True)


def main() -> None:
    from codec import through

    from studio.families import EMBEDDED_MODEL, load_pipeline
    from studio.sampling import generate
    from studio.world.pretrain import texture_words
    from studio.world.render import render

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", action="append", required=True, help="a model folder (repeatable)")
    parser.add_argument("--seeds", type=int, default=3, help="samples per prompt")
    args = parser.parse_args()
    recipe = Path(args.model[0]) / "recipe.json"
    config = json.loads(recipe.read_text())["config"] if recipe.is_file() else {}
    if not config.get("textures"):
        sys.exit(f"--model {args.model[0]}: its recipe.json names no textures; give a model pretrained with --textures first")
    textures = texture_words(config["textures"], config.get("seed", 0))

    names, refs = references(textures)
    kind = {t.word: t.kind for t in textures} | {s: s for s in (*CONTROLS, "flat")}
    words = [t.word for t in textures] + list(CONTROLS)

    def rates(images: list, word: str) -> tuple[float, float]:
        reads = [read(im, names, refs) for im in images]
        return (sum(r == word for r in reads) / len(reads), sum(kind[r] == kind[word] for r in reads) / len(reads))

    def renders(word: str) -> list:
        """Fresh renders of the word's prompts (other seeds than the references')."""
        t = next((t for t in textures if t.word == word), None)
        return [render(object_scene(c, "flat" if t else word), 10**6 + s, textures=(t,) if t else None)
                for c in COLOURS for s in range(args.seeds)]

    fresh = {w: renders(w) for w in words}
    rows = {w: {"renders": rates(fresh[w], w)} for w in words}
    for model in args.model:
        pipe = load_pipeline(model)
        for w in words:
            rec, _ = through(pipe.vae, np.stack([np.asarray(im.convert("RGB")) for im in fresh[w]]))
            rows[w][f"{model} vae"] = rates([Image.fromarray(r) for r in rec], w)
            prompts = [SENTENCE.format(colour=c, word=w) for c in COLOURS] * args.seeds
            rows[w][model] = rates(generate(pipe, prompts, seed=0), w)
            print(model, w, rows[w][f"{model} vae"], rows[w][model], flush=True)

    cols = ["renders"] + [c for m in args.model for c in (f"{m} vae", m)]

    def head(c: str) -> str:
        if c == "renders":
            return "renders: as named / same kind"
        return f"`{c[:-4]}` through its VAE" if c.endswith(" vae") else f"`{c}`: as named / same kind"

    table = ["| word | texture | " + " | ".join(head(c) for c in cols) + " |", "|---|---|" + "---|" * len(cols)]
    for t in textures:
        desc = f"{t.kind} {t.period:g} px" + (f", {np.degrees(t.angle):.1f} deg" if t.kind == "grating" else "")
        table.append(f"| {t.word} | {desc} | " + " | ".join("{:.2f} / {:.2f}".format(*rows[t.word][c]) for c in cols) + " |")
    table.append("| mean | | " + " | ".join("{:.2f} / {:.2f}".format(*np.mean([rows[t.word][c] for t in textures], axis=0))
                                            for c in cols) + " |")
    for w in CONTROLS:
        table.append(f"| {w} (control) | the base style | " + " | ".join("{:.2f} / {:.2f}".format(*rows[w][c]) for c in cols) + " |")
    flags = "".join(f" --model {m}" for m in args.model) + (f" --seeds {args.seeds}" if args.seeds != 3 else "")
    text = (f"## Named textures: does the pretrained model draw each texture by its word?\n\nCommand: "
            f"`python bench/world_textures.py{flags}` (revision {git_revision()}; {machine()}). Words of "
            f"`{recipe}` ({len(textures)} textures, seed {config.get('seed', 0)}); {len(COLOURS) * args.seeds} samples a word "
            f"(\"{SENTENCE.format(colour=COLOURS[0], word=textures[0].word)}\", {len(COLOURS)} colours, "
            f"{args.seeds} seeds), read by the spectrum of the object's middle against renders of every named texture "
            f"and of striped and dotted (chance about 1/{len(names)}). The shipped model "
            f"`{EMBEDDED_MODEL.relative_to(EMBEDDED_MODEL.parents[2])}` never saw these words. "
            f"Per model, the renders through its VAE (posterior mode), read the same way, are what its UNet could at best "
            f"draw; the control rows prompt the base styles striped and dotted by their own words.\n\n"
            + "\n".join(table) + "\n")
    print(text)
    write_section("world-textures", text)


if __name__ == "__main__":
    main()
