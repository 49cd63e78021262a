"""DreamBooth-LoRA on the six held-out shapes: identity similarity and prompt fidelity, adapter vs base.

For each held-out shape: 4 renders of one instance (a large shape of one colour in the centre on
white, renderer jitter between them) train an adapter with the default settings; then 10 new
prompts ("a sks shape on the left on a yellow background", …) are sampled with the adapter, and the
same prompts with the class noun ("a shape on the left on a yellow background") with the base
model. The world judge scores identity similarity to the 4 references and prompt fidelity.

    python bench/dreambooth.py                 # all six shapes, default settings
    python bench/dreambooth.py --shapes star   # one
    python bench/dreambooth.py --set snr_gamma=5 --set noise_offset=0.05   # trainer settings over the defaults

Prints a table and writes the `dreambooth` section of docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from report import git_revision, machine, write_section  # noqa: E402

COLOURS = {"star": "blue", "heart": "red", "cross": "green", "crescent": "yellow", "arrow": "purple", "hourglass": "orange"}
PLACES = ["on the left", "on the right", "at the top", "at the bottom", "at the top left", "at the bottom right",
          "in the center", "at the top right", "at the bottom left", "on the left"]
BACKGROUNDS = ["yellow", "white", "black", "gray", "cyan", "pink", "white", "green", "black", "blue"]


NOTE = ('Prompt fidelity here counts position and background (the prompts name no shape the grammar knows). Identity similarity is the judge\'s identity-embedding cosine to the 4 references; "judge reads the shape" counts images whose first detected object has the concept\'s shape.')


def references(shape: str, folder: Path, n: int = 4, places: list[str] | None = None):
    """``n`` renders of a large ``shape`` in its colour on white, in the center, or at ``places`` in turn ("on the
    left", ...); written to ``folder`` and returned."""
    from PIL import Image

    from studio.world.grammar import parse_prompt, scene_from_prompt
    from studio.world.render import render_array

    folder.mkdir(parents=True, exist_ok=True)
    images = []
    for i in range(n):
        place = places[i % len(places)] if places else "in the center"
        text = f"a large {COLOURS[shape]} {shape} {place} on a white background"
        scene = scene_from_prompt(parse_prompt(text), random.Random(i))
        im = Image.fromarray(render_array(scene, seed=1000 + i))
        im.save(folder / f"{shape}{i}.png")
        images.append(im)
    return images


def prompts(noun: str) -> list[str]:
    return [f"a {noun} {place} on a {bg} background" for place, bg in zip(PLACES, BACKGROUNDS)]


def defaults() -> str:
    """The trainer's defaults the table ran with, as a reader needs them to compare runs."""
    from studio.trainers.dreambooth import DreamBoothConfig

    d = DreamBoothConfig()
    return (f"{d.steps} steps, batch {d.batch_size}, lr {d.lr:g}, rank {d.rank}"
            f"{', prior preservation' if d.prior_preservation else ''}")


def score_concept(shape: str, work: Path, pipe, judge, overrides: dict | None = None, class_data: Path | None = None) -> dict:
    """Train one concept's adapter (default settings plus ``overrides``) and score it and the base
    model on the 10 prompts: identity similarity, prompt fidelity, shape read, seconds."""
    import numpy as np
    import torch
    from studio.trainers.config import build_config
    from studio.trainers.dreambooth import DreamBooth, DreamBoothConfig
    from studio.trainers.loop import train

    from studio.eval.fidelity import identity_similarity, prompt_fidelity
    from studio.plugin import attach, detach
    from studio.sampling import generate
    from studio.world.grammar import parse_prompt

    refs = references(shape, work / "data")
    cfg = build_config(DreamBoothConfig, {}, {"data": str(work / "data"), "output": str(work / "run"),
                                              "class_data": str(class_data or work.parent / "class"), **(overrides or {})})
    t0 = time.time()
    adapter = train(DreamBooth(), cfg)
    seconds = time.time() - t0
    with torch.no_grad():
        base = generate(pipe, prompts("shape"), seed=0)
        attach(pipe, [adapter])
        tuned = generate(pipe, prompts("sks shape"), seed=0)
        detach(pipe)
    fid = {name: float(np.mean([prompt_fidelity(r, parse_prompt(p)) for r, p in zip(judge.read(ims), prompts("shape"))]))
           for name, ims in (("base", base), ("adapter", tuned))}
    return {"identity_base": identity_similarity(judge, base, refs), "identity": identity_similarity(judge, tuned, refs),
            "fidelity_base": fid["base"], "fidelity": fid["adapter"],
            "shape_read": sum(o.shape == shape for r in judge.read(tuned) for o in r.objects[:1]), "seconds": seconds,
            "adapter": adapter}


def trainer_settings(items: list[str]) -> dict:
    """``["snr_gamma=5", ...]`` as DreamBooth config values of their fields' types; a bad item is an error naming it."""
    import dataclasses

    from studio.trainers.dreambooth import DreamBoothConfig

    fields = {f.name: f for f in dataclasses.fields(DreamBoothConfig)}
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or key not in fields:
            raise SystemExit(f"--set {item!r}: give KEY=VALUE with KEY a DreamBooth setting ({', '.join(sorted(fields))})")
        kind = type(fields[key].default)
        if kind not in (bool, int, float, str):
            raise SystemExit(f"--set {item!r}: {key} is not a single value; set it in a config file")
        try:
            out[key] = value in ("1", "true", "True") if kind is bool else kind(value)
        except ValueError:
            raise SystemExit(f"--set {item!r}: {key} takes a {kind.__name__}") from None
    return out


def main() -> None:
    from studio.eval.judge import load_judge
    from studio.families import EMBEDDED_MODEL, load_pipeline
    from studio.world.concepts import HELD_OUT_SHAPES

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", nargs="*", default=list(HELD_OUT_SHAPES))
    parser.add_argument("--work", default="runs/bench-dreambooth")
    parser.add_argument("--captions", action="store_true",
                        help="give each reference a caption file naming its context ('a large blue sks shape in the center on a white background')")
    parser.add_argument("--lora-layers", default="", help="the trainer's --lora-layers (default: its own, the attention"
                        " projections); writes the section dreambooth-layers")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="a DreamBooth trainer setting over the defaults (repeatable), e.g. snr_gamma=5; writes the"
                        " section dreambooth-KEY-VALUE-...")
    args = parser.parse_args()
    section, title = ("dreambooth-captions", " (references with caption files)") if args.captions else ("dreambooth", "")
    if args.lora_layers:
        section, title = section + "-layers", title + f" (LoRA layers `{args.lora_layers}`)"
    overrides = {"lora_layers": args.lora_layers} if args.lora_layers else {}
    settings = trainer_settings(args.set)
    if settings:
        overrides.update(settings)
        section += "".join(f"-{k}-{v}" for k, v in settings.items())
        title += " (" + ", ".join(f"`{k}={v}`" for k, v in settings.items()) + ")"
    judge = load_judge()
    pipe = load_pipeline(EMBEDDED_MODEL)
    rows = []
    for shape in args.shapes:
        if args.captions:
            data = Path(args.work) / shape / "data"
            data.mkdir(parents=True, exist_ok=True)
            for i in range(4):
                (data / f"{shape}{i}.txt").write_text(f"a large {COLOURS[shape]} sks shape in the center on a white background")
        r = score_concept(shape, Path(args.work) / shape, pipe, judge, overrides or None, class_data=Path(args.work) / "class")
        rows.append((shape, r["identity_base"], r["identity"], r["fidelity_base"], r["fidelity"], r["shape_read"], r["seconds"]))
        print(rows[-1], flush=True)
    head = "| concept | identity, base | identity, adapter | fidelity, base | fidelity, adapter | judge reads the shape (of 10) | train s |\n|---|---|---|---|---|---|---|\n"
    body = "".join(f"| {s} | {a:.3f} | {b:.3f} | {c:.3f} | {d:.3f} | {e} | {t:.0f} |\n" for s, a, b, c, d, e, t in rows)
    n = len(rows)
    mean = [sum(r[i] for r in rows) / n for i in (1, 2, 3, 4)]
    summary = (f"Means over the {n} concepts: identity {mean[0]:.3f} -> {mean[1]:.3f} ({mean[1] - mean[0]:+.3f}); prompt fidelity "
               f"{mean[2]:.3f} -> {mean[3]:.3f} ({mean[3] - mean[2]:+.3f}; the issue asks for at most 0.05 below the base model).")
    flag = (" --captions" if args.captions else "") + (f" --lora-layers {args.lora_layers}" if args.lora_layers else "")
    flag += "".join(f" --set {k}={v}" for k, v in settings.items())
    text = (f"## DreamBooth-LoRA on the held-out shapes{title}\n\nCommand: `python bench/dreambooth.py{flag}` (revision "
            f"{git_revision()}; {machine()}). Default settings ({defaults()}); 4 references per concept; 10 new prompts; base model prompted "
            f"with the class noun.\n\n{head}{body}\n{summary}\n\n{NOTE}\n")
    print(text)
    write_section(section, text)


if __name__ == "__main__":
    main()
