"""Content x style grid: a subject adapter and a style adapter combined, per method, read by the judge.

Content: 3 held-out shapes (star, heart, cross), 4 renders each, large and centred, of varied
colours, drawn *striped* (a base style the base model knows). Style: 3 held-out styles (shadowed,
ringed, halved), 4 renders each, of base shapes (circle, square, triangle, diamond). Every cell
combines one content adapter with one style adapter and samples the grid prompt, the sentence form of
both adapters' captions with no shape named: "a large {colour} sks shape in the center on a white
background, zxy", ``{colour}`` a different world colour for each of the 10 seeds (one prompt gives
nearly the same image whatever the seed, so a fixed prompt would be about one draw per cell).
``--prompt`` changes it; it must hold both tokens, ``{colour}`` is optional.

- shape acc / style acc: the judge reads the cell's shape / the cell's style (first object);
- leakage: the content adapter alone (same prompt) draws stripes, its images' style; the style
  adapter alone draws a circle, square, triangle or diamond, its images' shapes.

Methods: ``naive`` (two plain DreamBooth LoRAs, prompts "a sks shape" and "a shape, zxy", summed),
``naive+captions`` (the same trained on the images' captions, which name what the base model knows),
``blora`` (content part of a B-LoRA of the content images + style part of a B-LoRA of the style
images), ``content-style`` (the decoupled trainer with ``--orthogonal``: joint training with routed gradients,
fixed orthogonal down-projections, captions), ``content-style-free`` (the same with ``--no-orthogonal``, the
trainer's default: both adapters' down-projections train too), ``ziplora`` (the ``naive+captions`` adapters merged per cell by the decoupled trainer's ZipLoRA
mode: learned per-column merge coefficients, ``--zip-steps`` at lr 0.01, the paper's settings), ``klora`` (the same
adapters combined at sampling time by the ``klora`` composer: K-LoRA's per-layer, per-step choice of one of the two).
``--style-lr-scale`` and ``--interplay`` are the decoupled trainer's flags for the content-style methods (a
non-default ``--interplay`` trains under ``content-style-free-INTERPLAY/``). The captioned
DreamBooth LoRAs are trained once, under ``naive+captions``, and reused while their run's settings match.

``--pivotal style|content|both`` trains the captioned DreamBooth LoRAs of those roles with the trainers' ``--pivotal`` (the
identifier a new token with a learned embedding; ``--embedding-lr`` its rate) under ``METHOD-pivotal/``; ``both`` also
trains the content-style methods with it (both identifiers).

``--style-timesteps START:END`` samples the composed methods' style adapter only at those training timesteps
(``Concept.timesteps``; ``0:500``: the late steps, where this world's texture is made), through the ``naive`` composer
(``0:500,0.5`` keeps half its weight at the other steps); ``--content-timesteps`` the same for the content adapter,
``--style-weight`` / ``--content-weight`` the adapters' weights there.
``--style-train-timesteps 0:500`` trains the captioned style LoRAs on those timesteps only; ``--style-images N`` gives
each style N images (the four above, then the other base shapes and colours); ``--style-steps N`` trains them N steps. ``--combined-only`` samples only the
combined cells (leakage columns blank), so ``--n 30`` reads each cell from 30 seeds at little more than the full run's
cost.
``--style-first style`` trains the captioned style LoRAs on captions that name the style before the noun ("a large
orange zxy circle in the center on a white background"; the grammar's other place for a style word, where the base
model binds it best) under ``METHOD-sf/``, and samples "a large {colour} sks zxy shape in the center on a white
background"; ``both`` captions the content images so too ("a large blue striped sks shape ..."), ``both-after`` with the
style word right after the identifier ("a large blue sks striped shape ...", the slot the prompt gives zxy, so the content
adapter meets a style word where it learned one, and nothing new stands before its identifier).
``--ceiling`` adds a row of what the judge reads of each cell drawn right: the cell's prompts rendered by the world
and passed through the model's VAE, the most any method can read (``--methods`` with no name: that row alone).

- style alone: the style adapter alone draws its style on its own images' shapes ("a large {colour} circle in the
  center on a white background, zxy", circle, square, triangle, diamond in turn): how well it learned its style.

    python bench/content_style.py                       # every method
    python bench/content_style.py --methods naive blora
    python bench/content_style.py --methods content-style-free --interplay apart --cells star-shadowed --section probe
    python bench/content_style.py --model runs/pretrain/model   # another world's weights (class images per model)
    python bench/content_style.py --methods naive+captions --seed 1 --section naive-seed1   # another training seed
    python bench/content_style.py --methods naive+captions --pivotal style --style-timesteps 0:500 --n 30 --combined-only
    python bench/content_style.py --methods naive+captions --pivotal style --style-first style --n 30 --combined-only

Prints a table and writes the ``content-style`` section of docs/benchmarks.md (``--section NAME``: the section
``content-style-NAME``, for a variant).
"""

from __future__ import annotations

import argparse
import math
import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from report import git_revision, machine, write_section  # noqa: E402

SHAPES = ["star", "heart", "cross"]
STYLES = ["shadowed", "ringed", "halved"]
CONTENT_COLOURS = ["blue", "red", "green", "purple"]
STYLE_SHAPES = [("circle", "orange"), ("square", "cyan"), ("triangle", "pink"), ("diamond", "yellow")]
PROMPT = "a large {colour} sks shape in the center on a white background, zxy"
PROMPT_STYLE_FIRST = "a large {colour} sks zxy shape in the center on a white background"  # --style-first: the style word before the noun
GRID_COLOURS = ("red", "orange", "yellow", "green", "cyan", "blue", "purple", "pink", "black", "gray")  # not white


def grid_prompts(template: str, n: int) -> list[str]:
    """``n`` prompts: ``template`` with ``{colour}`` filled by the grid's colours in turn."""
    return [template.replace("{colour}", GRID_COLOURS[i % len(GRID_COLOURS)]) for i in range(n)]
METHODS = ["naive", "naive+captions", "blora", "content-style", "content-style-free", "ziplora", "klora"]
SHARED = ("naive+captions", "ziplora", "klora")  # methods built on the same captioned DreamBooth LoRAs (trained once)


def render(text: str, seed: int):
    """The world's render (uint8 HWC) of a scene text, its layout and texture drawn with ``seed``."""
    from studio.world.grammar import parse_prompt, scene_from_prompt
    from studio.world.render import render_array

    return render_array(scene_from_prompt(parse_prompt(text), random.Random(seed)), seed=seed)


def render_folder(folder: Path, items: list[tuple[str, str]], seed: int) -> Path:
    """Renders of ``(scene text, caption)``, each with its caption sidecar."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    for i, (text, caption) in enumerate(items):
        Image.fromarray(render(text, seed + i)).save(folder / f"{i}.png")
        (folder / f"{i}.txt").write_text(caption)
    return folder


def caption(colour: str, subject: str, style: str, style_first: bool = False) -> str:
    """A grid caption: the style word after the sentence ("..., zxy") or, ``style_first``, before the noun
    ("a large red zxy circle ..."), the grammar's two places for it. Not ``studio.world.grammar.format_prompt``: that
    writes a trailing style before the background ("..., zxy on a white background"), and the grid's adapters were
    trained on captions ending with it."""
    if style_first:
        return f"a large {colour} {style} {subject} in the center on a white background"
    return f"a large {colour} {subject} in the center on a white background, {style}"


CONTENT_ORDERS = {"none": "", "both": "-sf", "both-after": "-sfa"}  # --style-first: the content captions' order, its folders' suffix


def content_images(shape: str, work: Path, order: str = "none") -> Path:
    """The content images of ``shape``, captioned by ``order`` (``--style-first``): ``none`` "a large blue sks shape ...,
    striped", ``both`` "a large blue striped sks shape ...", ``both-after`` "a large blue sks striped shape ..." (the style
    word right after the identifier, the slot the style-first grid prompt gives zxy)."""
    def text(c: str) -> str:
        if order == "both-after":  # the identifier in the adjective's place, the style word after it
            return caption(c, "striped shape", "sks", style_first=True)
        return caption(c, "sks shape", "striped", order == "both")
    return render_folder(work / "data" / f"content-{shape}{CONTENT_ORDERS[order]}",
                         [(caption(c, shape, "striped"), text(c)) for c in CONTENT_COLOURS], 3000)


MORE_STYLE_SHAPES = [("rectangle", "green"), ("semicircle", "purple"), ("circle", "blue"), ("square", "red"),
                     ("triangle", "gray"), ("diamond", "black"), ("rectangle", "pink"), ("semicircle", "yellow")]


def style_images(style: str, work: Path, n: int = 4, style_first: bool = False) -> Path:
    """``n`` images of base shapes in ``style``: the grid's four, then the other base shapes and colours in turn."""
    pairs = (STYLE_SHAPES + MORE_STYLE_SHAPES)[:n]
    return render_folder(work / "data" / (f"style-{style}" + (f"-{n}" if n != 4 else "") + ("-sf" if style_first else "")), [
        (caption(c, s, style), caption(c, s, "zxy", style_first)) for s, c in pairs], 4000)


def train_window_settings(window: tuple[float, float] | None) -> dict:
    """The trainers' settings that draw training timesteps only in ``window`` (``START <= t < END``, from 0 or to 1000):
    the timesteps outside it are ``--timestep-bias-strategy range`` with multiplier 0. ``None``: every timestep."""
    if window is None:
        return {}
    if len(window) == 3:
        raise ValueError(f"training window {window[0]:g}:{window[1]:g},{window[2]:g}: a training window keeps no share outside it")
    if window[0] > 0 and window[1] < 1000:
        raise ValueError(f"training window {window[0]:g}:{window[1]:g}: it must start at 0 or end at 1000 (one range is left out)")
    outside = (0, int(window[0])) if window[0] > 0 else (int(window[1]), 1000)
    return {"timestep_bias_strategy": "range", "timestep_bias_multiplier": 0.0,
            "timestep_bias_begin": outside[0], "timestep_bias_end": outside[1]}


def main() -> None:
    import numpy as np
    import torch
    from studio.composers import Concept, compose, parse_timesteps
    from studio.trainers.blora import BLOCKS, BLoRA, BLoRAConfig, split
    from studio.trainers.config import build_config
    from studio.trainers.content_style import ContentStyle, ContentStyleConfig
    from studio.trainers.dreambooth import DreamBooth, DreamBoothConfig
    from studio.trainers.loop import train

    from studio.adapters import load_adapter
    from studio.eval.judge import load_judge
    from studio.families import EMBEDDED_MODEL, load_pipeline
    from studio.plugin import attach, detach
    from studio.sampling import generate

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=str(EMBEDDED_MODEL), help="a local diffusers folder (default: the embedded model)")
    parser.add_argument("--methods", nargs="*", default=METHODS, choices=METHODS)
    parser.add_argument("--work", default="runs/bench-content-style")
    parser.add_argument("--n", type=int, default=10)
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--lr", type=float, default=1e-3, help="above the trainers' default, so each adapter learns enough to be read")
    parser.add_argument("--section", default="", help="write the section content-style-SECTION (a variant beside the default run's)")
    parser.add_argument("--zip-steps", type=int, default=100, help="ZipLoRA merge steps per cell (lr 0.01)")
    parser.add_argument("--style-lr-scale", type=float, default=1.0, help="the content-style methods' --style-lr-scale")
    parser.add_argument("--interplay", default="present", help="the content-style methods' --interplay (present, apart, cooperative)")
    parser.add_argument("--cells", nargs="*", default=None, metavar="SHAPE-STYLE",
                        help="only these cells of the grid, e.g. star-shadowed heart-ringed (default: all 9)")
    parser.add_argument("--prompt", default=None, help="the prompt every cell and every adapter alone is sampled with"
                        f" (default {PROMPT!r}; with --style-first style|both {PROMPT_STYLE_FIRST!r})")
    parser.add_argument("--pivotal", choices=("none", "content", "style", "both"), default="none",
                        help="the captioned DreamBooth LoRAs (naive+captions, klora) of these roles trained with --pivotal"
                        " (their identifier a new token with a learned embedding), under METHOD-pivotal/; both: the"
                        " content-style methods' too (both identifiers)")
    parser.add_argument("--embedding-lr", type=float, default=0.0,
                        help="with --pivotal: the trainers' --embedding-lr (0: --lr); another trains under METHOD-pivotal-elrX/")
    parser.add_argument("--style-timesteps", default="all", metavar="START:END",
                        help="the composed methods (naive, naive+captions, ziplora, klora) sample the style adapter only at these"
                        " training timesteps (0 clean, 1000 noise), e.g. 0:500 (0:500,0.5: half its weight at the other steps);"
                        " the adapters alone are sampled as trained")
    parser.add_argument("--content-timesteps", default="all", metavar="START:END",
                        help="as --style-timesteps, for the content adapter, e.g. 500:1000 (the layout steps only)")
    parser.add_argument("--style-train-timesteps", default="all", metavar="START:END",
                        help="the captioned DreamBooth style LoRAs (naive+captions, klora) trained only on these timesteps"
                        " (the trainers' --timestep-bias-strategy range with multiplier 0 outside), under METHOD-tSTART-END/;"
                        " e.g. 0:500 with --style-timesteps 0:500, so each style LoRA learns the steps it acts in")
    parser.add_argument("--style-images", type=int, default=4, choices=range(1, 13), metavar="1-12",
                        help="style images per style (base shapes; the grid's four first); another than 4 trains under METHOD-simgN/")
    parser.add_argument("--style-rank", type=int, default=0,
                        help="the DreamBooth style LoRAs' rank (naive, naive+captions, klora; 0: the trainer's default, 8),"
                        " under METHOD-rR/")
    parser.add_argument("--style-steps", type=int, default=0,
                        help="the DreamBooth style LoRAs' steps (naive, naive+captions, klora; 0: --steps), under METHOD-sN/")
    parser.add_argument("--ceiling", action="store_true",
                        help="also a row of what the judge reads of each cell drawn right: its prompts rendered by the world"
                        " and passed through the model's VAE (the most any method can read)")
    parser.add_argument("--combined-only", action="store_true",
                        help="sample only the combined cells, not the adapters alone (leakage columns left blank): a quarter"
                        " of the time, for more seeds per cell with --n")
    parser.add_argument("--style-weight", type=float, default=1.0,
                        help="the composed cells' weight of the style adapter (the adapters alone are sampled at 1.0)")
    parser.add_argument("--content-weight", type=float, default=1.0,
                        help="the composed cells' weight of the content adapter (the adapters alone are sampled at 1.0)")
    parser.add_argument("--style-first", choices=("none", "style", *list(CONTENT_ORDERS)[1:]), default="none",
                        help="the captioned DreamBooth LoRAs of these roles (style: the style LoRAs; both: the content LoRAs too) train"
                        " on captions naming the style before the noun (\"a large orange zxy circle in the center ...\", where"
                        " the base model binds style words best) instead of after the sentence, under METHOD-sf/; both-after: the content"
                        " captions with the style word right after the identifier (\"a large blue sks striped shape ...\"); the grid"
                        f" prompt becomes {PROMPT_STYLE_FIRST!r}")
    parser.add_argument("--seed", type=int, default=0, help="the trainers' --seed (LoRA init, examples, noise, timesteps);"
                        " another than 0 trains under METHOD-seedN/, to read how much the grid moves with it")
    args = parser.parse_args()
    default_prompt = PROMPT_STYLE_FIRST if args.style_first != "none" else PROMPT
    content_order = args.style_first if args.style_first in CONTENT_ORDERS else "none"
    style_first = args.style_first != "none"  # the style LoRAs' captions name the style first
    args.prompt = args.prompt or default_prompt
    if not {"sks", "zxy"} <= set(args.prompt.replace(",", " ").split()):
        parser.error(f"--prompt {args.prompt!r} must name both identifiers, sks (content) and zxy (style)")
    windows = {}
    for flag in ("style_timesteps", "content_timesteps", "style_train_timesteps"):
        try:
            windows[flag] = parse_timesteps(getattr(args, flag))
        except ValueError as e:
            parser.error(f"--{flag.replace('_', '-')}: {e}")
    style_window, content_window, style_train_window = windows.values()
    try:
        train_window_settings(style_train_window)
    except ValueError as e:
        parser.error(f"--style-train-timesteps: {e}, e.g. 0:500 or 500:1000")

    if args.pivotal != "none" and "ziplora" in args.methods:
        parser.error("--pivotal: the ZipLoRA merge takes adapters without token embeddings; leave out ziplora")
    every = [f"{sh}-{st}" for sh in SHAPES for st in STYLES]
    for cell in args.cells or []:
        if cell not in every:
            parser.error(f"--cells {cell!r} is not a cell of the grid; choose among {', '.join(every)}")
    chosen = [(sh, st) for sh in SHAPES for st in STYLES if not args.cells or f"{sh}-{st}" in args.cells]
    shapes = [sh for sh in SHAPES if any(c[0] == sh for c in chosen)]
    styles = [st for st in STYLES if any(c[1] == st for c in chosen)]
    work = Path(args.work)
    judge = load_judge()
    pipe = load_pipeline(args.model)
    common = {"model": args.model, "steps": args.steps, "lr": args.lr, "checkpoint_every": 0, "seed": args.seed,
              "class_data": str(work / "class" / Path(args.model).name)}
    seeded_content = (f"-seed{args.seed}" if args.seed else "") + CONTENT_ORDERS[content_order]  # other captions: own adapters
    seeded = (f"-seed{args.seed}" if args.seed else "") + ("-sf" if style_first else "") + (
        f"-simg{args.style_images}" if args.style_images != 4 else "")  # another style set: its own adapters
    paired = seeded + ("" if content_order == "none" else f"-{content_order}")  # a run trained on both image sets

    def pivot_settings(pivotal: bool) -> dict:
        return ({"pivotal": True, **({"embedding_lr": args.embedding_lr} if args.embedding_lr else {})}) if pivotal else {}

    def pivot_dir(pivotal: bool) -> str:
        return ("-pivotal" + (f"-elr{args.embedding_lr:g}" if args.embedding_lr else "")) if pivotal else ""

    def dreambooth(data: Path, out: Path, prompt: str, token: str, captions: bool, pivotal: bool = False, extra=None) -> Path:
        settings = {**common, "data": str(data), "output": str(out), "instance_prompt": prompt, "token": token, "captions": captions,
                    **pivot_settings(pivotal), **(extra or {})}
        done = out / "adapter.safetensors"
        if done.is_file() and (out / "config.json").is_file():  # trained before with these settings: reuse
            import json

            kept = json.loads((out / "config.json").read_text())
            if all(kept.get(k) == v for k, v in settings.items() if k != "model") and Path(kept["model"]) == Path(args.model).resolve():
                return done
        return train(DreamBooth(), build_config(DreamBoothConfig, {}, settings))

    def blora(data: Path, out: Path, prompt: str) -> Path:
        train(BLoRA(), build_config(BLoRAConfig, {}, {**common, "data": str(data), "output": str(out),
                                                      "instance_prompt": prompt, "captions": False}))
        return out

    def sample(adapters, prompts=None, composer=None) -> list:
        prompts = prompts or grid_prompts(args.prompt, args.n)
        weights = (args.content_weight, args.style_weight) if len(adapters) == 2 else (1.0,)
        with torch.no_grad():
            if composer:  # the adapters combined by a composer, image i with seed i as generate draws it
                windows = (content_window, style_window)
                images = [im for i, p in enumerate(prompts) for im in compose(
                    pipe, composer, p, [Concept.load(a, name=r, timesteps=w, weight=wt)
                                        for a, r, w, wt in zip(adapters, ("content", "style"), windows, weights)], seed=i)]
            else:
                attach(pipe, adapters, weights)
                images = generate(pipe, prompts, seed=0)
                detach(pipe)
        return [r.objects[0] if r.objects else None for r in judge.read(images)]

    own_shapes = [caption(GRID_COLOURS[i % len(GRID_COLOURS)], STYLE_SHAPES[i % len(STYLE_SHAPES)][0], "zxy", style_first)
                  for i in range(args.n)]

    def rate(objs, test) -> float:
        return sum(o is not None and test(o) for o in objs) / len(objs)

    results: dict[str, dict] = {}
    if args.ceiling:  # what the judge reads of each cell drawn right: its renders through the model's VAE
        from codec import through
        from PIL import Image

        cells = {}
        for shape, style in chosen:
            texts = grid_prompts(caption("{colour}", shape, style), args.n)
            renders = [render(t, i) for i, t in enumerate(texts)]
            with torch.no_grad():
                decoded, _ = through(pipe.vae, np.stack(renders))
            objs = [r.objects[0] if r.objects else None for r in judge.read([Image.fromarray(a) for a in decoded])]
            cells[(shape, style)] = (rate(objs, lambda o, sh=shape: o.shape == sh), rate(objs, lambda o, st=style: o.style == st))
            print("ceiling", shape, style, cells[(shape, style)], flush=True)
        results["ceiling: the cells' renders through the model's VAE"] = {
            "cells": cells, "leak_content": math.nan, "leak_style": math.nan, "alone": math.nan}
    style_shape_names = {s for s, _ in STYLE_SHAPES}
    for method in args.methods:
        cells, leaks_c, leaks_s, alone = {}, [], [], []
        content_ad: dict[str, object] = {}
        style_ad: dict[str, object] = {}
        for shape in shapes:
            data = content_images(shape, work, content_order)
            pivotal = method in SHARED and args.pivotal in ("content", "both")
            out = work / (("naive+captions" if method in SHARED else method) + seeded_content + pivot_dir(pivotal)) / f"content-{shape}"
            if method in ("naive", *SHARED):
                content_ad[shape] = dreambooth(data, out, "a {token} {class_noun}", "sks", method != "naive", pivotal)
            elif method == "blora":
                content_ad[shape] = split(load_adapter(blora(data, out, "a sks shape") / "adapter.safetensors"), *BLOCKS["sdxl"])[0]
        for style in styles:
            data = style_images(style, work, args.style_images, style_first)
            pivotal = method in SHARED and args.pivotal in ("style", "both")
            windowed = method in SHARED and style_train_window is not None
            trained = (f"-t{style_train_window[0]:g}-{style_train_window[1]:g}" if windowed else "") + (
                f"-r{args.style_rank}" if args.style_rank else "") + (f"-s{args.style_steps}" if args.style_steps else "")
            out = work / (("naive+captions" if method in SHARED else method) + seeded + pivot_dir(pivotal) + trained) / f"style-{style}"
            if method in ("naive", *SHARED):
                style_ad[style] = dreambooth(data, out, "a {class_noun}, zxy", "zxy", method != "naive", pivotal, {
                    **train_window_settings(style_train_window if windowed else None),
                    **({"rank": args.style_rank} if args.style_rank else {}),
                    **({"steps": args.style_steps} if args.style_steps else {})})
            elif method == "blora":
                style_ad[style] = split(load_adapter(blora(data, out, "a shape, zxy") / "adapter.safetensors"), *BLOCKS["sdxl"])[1]
        for shape, style in chosen:
            if method.startswith("content-style"):
                pivotal = args.pivotal == "both"  # the decoupled trainer's two identifiers together
                run = work / (method + ("" if args.interplay == "present" else f"-{args.interplay}") + paired
                              + pivot_dir(pivotal)) / f"{shape}-{style}"
                train(ContentStyle(), build_config(ContentStyleConfig, {}, {
                    **common, "data": str(content_images(shape, work, content_order)),
                    "style_data": str(style_images(style, work, args.style_images, style_first)),
                    "output": str(run), "orthogonal": method == "content-style", "style_lr_scale": args.style_lr_scale,
                    "interplay": args.interplay, **pivot_settings(pivotal)}))
                c, s = run / "content.safetensors", run / "style.safetensors"
            elif method == "ziplora":
                run = work / (method + paired) / f"{shape}-{style}"
                train(ContentStyle(), build_config(ContentStyleConfig, {}, {
                    **common, "data": str(content_images(shape, work, content_order)),
                    "style_data": str(style_images(style, work, args.style_images, style_first)),
                    "output": str(run), "content_adapter": str(content_ad[shape]), "style_adapter": str(style_ad[style]),
                    "lr": 0.01, "steps": args.zip_steps}))
                c, s = run / "content.safetensors", run / "style.safetensors"
            else:
                c, s = content_ad[shape], style_ad[style]
            composer = "klora" if method == "klora" else "naive" if (style_window or content_window) and method in ("naive", *SHARED) else None
            both = sample([c, s], composer=composer)
            cells[(shape, style)] = (rate(both, lambda o, sh=shape: o.shape == sh), rate(both, lambda o, st=style: o.style == st))
            if not args.combined_only:
                leaks_c.append(rate(sample([c]), lambda o: o.style == "striped"))
                leaks_s.append(rate(sample([s]), lambda o: o.shape in style_shape_names))
                alone.append(rate(sample([s], own_shapes), lambda o, st=style: o.style == st))
            else:  # not sampled: the table says so
                leaks_c.append(math.nan), leaks_s.append(math.nan), alone.append(math.nan)
            print(method, shape, style, cells[(shape, style)], leaks_c[-1], leaks_s[-1], alone[-1], flush=True)
        pivoted = method in SHARED or (method.startswith("content-style") and args.pivotal == "both")
        label = method + (f" (--pivotal {args.pivotal})" if args.pivotal != "none" and pivoted else "")
        if args.style_rank and method in ("naive", *SHARED):
            label += f" (style rank {args.style_rank})"
        if args.style_steps and method in ("naive", *SHARED):
            label += f" (style {args.style_steps} steps)"
        if style_train_window and method in SHARED:
            label += f" (style trained at t in [{style_train_window[0]:g}, {style_train_window[1]:g}))"
        for role, window in (("content", content_window), ("style", style_window)):
            if window and method in ("naive", *SHARED):
                label += f" ({role} at t in [{window[0]:g}, {window[1]:g})" + (
                    f", {window[2]:g} of its weight elsewhere)" if len(window) == 3 else ")")
        for role, weight in (("content", args.content_weight), ("style", args.style_weight)):
            if weight != 1.0:
                label += f" ({role} weight {weight:g})"
        results[label] = {"cells": cells, "leak_content": sum(leaks_c) / len(leaks_c), "leak_style": sum(leaks_s) / len(leaks_s),
                           "alone": sum(alone) / len(alone)}

    summary = ["| method | shape acc | style acc | content adapter draws its images' stripes | style adapter draws its images' shapes"
               " | style adapter alone draws its style (its images' shapes) |",
               "|---|---|---|---|---|---|"]
    for method, r in results.items():
        cells = list(r["cells"].values())
        summary.append(f"| {method} | {sum(c[0] for c in cells) / len(cells):.2f} | {sum(c[1] for c in cells) / len(cells):.2f} | "
                       + " | ".join("-" if math.isnan(r[k]) else f"{r[k]:.2f}" for k in ("leak_content", "leak_style", "alone")) + " |")
    digits = 1 if args.n <= 10 else 2
    grid = ["| cell (shape x style) | " + " | ".join(results) + " |", "|---|" + "---|" * len(results)]
    for shape, style in chosen:
        grid.append(f"| {shape} x {style} | " + " | ".join(
            f"{r['cells'][(shape, style)][0]:.{digits}f} / {r['cells'][(shape, style)][1]:.{digits}f}" for r in results.values()) + " |")
    flags = "".join(f" --{k.replace('_', '-')} {getattr(args, k)}" for k in ("model", "steps", "lr", "n", "zip_steps", "style_lr_scale", "interplay",
                                                                            "pivotal", "embedding_lr", "style_timesteps", "content_timesteps", "style_train_timesteps", "style_images", "style_rank", "style_steps", "content_weight", "style_weight", "style_first", "seed")
                    if getattr(args, k) != parser.get_default(k))
    flags += " --combined-only" if args.combined_only else ""
    flags += " --ceiling" if args.ceiling else ""
    flags += f' --prompt "{args.prompt}"' if args.prompt != default_prompt else ""
    flags += " --cells " + " ".join(args.cells) if args.cells else ""
    flags += " --methods" + "".join(" " + m for m in args.methods) if args.methods != METHODS else ""
    flags += f" --section {args.section}" if args.section else ""
    title = "Content x style: combining a subject adapter with a style adapter" + (f" ({args.section})" if args.section else "")
    text = (f"## {title}\n\nCommand: `python bench/content_style.py{flags}` "
            f"(revision {git_revision()}; {machine()}). {args.steps} steps per adapter at lr {args.lr:g}, training seed {args.seed}; prompt \"{args.prompt}\" ({{colour}}: {', '.join(GRID_COLOURS[:args.n])}, one per seed); {args.n} seeds "
            f"per cell. Content images: each held-out shape striped, 4 colours; style images: base shapes in each held-out "
            f"style. Leakage: each adapter alone with the same prompt.\n\n" + "\n".join(summary) +
            "\n\nPer cell, shape acc / style acc:\n\n" + "\n".join(grid) + "\n")
    print(text)
    write_section("content-style" + (f"-{args.section}" if args.section else ""), text)


if __name__ == "__main__":
    main()
