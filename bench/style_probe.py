"""Style probe: does a style adapter carry a held-out style beyond its own four images?

The content x style grid (``bench/content_style.py``, issue 4) can only tell methods apart on style if a
plain style adapter draws its style on content it was not trained on. This probe measures that alone.
Per held-out style: one DreamBooth LoRA from the grid's four style images (base shapes, each in the
style, captioned ``"a large orange circle in the center on a white background, zxy"``), trained with
the trainer's prior preservation; then the judge reads the first object's style in
``--seeds`` samples of each of

- ``own captions``: the four training captions (does the adapter reproduce its images?);
- ``new pairs``: the same sentence with four other shape/colour pairs (does the style travel?);
- ``grid prompt``: the grid's prompt (``content_style.PROMPT``), without a content adapter;
- ``no adapter``: the base model on the new pairs (the judge's false reading of the style).

Rows per VAE: the model's own, and each ``--vae`` (a diffusers AutoencoderKL folder, e.g. the output
of ``bench/codec.py --refine``) swapped in with the same UNet and text encoders.

    python bench/style_probe.py
    python bench/style_probe.py --vae runs/codec/vae-refined-3000
    python bench/style_probe.py --lora-layers to_q,to_k,to_v,to_out.0,ff.net.0.proj,ff.net.2,proj_in,proj_out,conv1,conv2
    python bench/style_probe.py --style-word dotted    # the captions name a base style, not a new token

Prints a table and writes the ``style-probe`` section of docs/benchmarks.md (``--section NAME``: the section
``style-probe-NAME``, for a variant).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from content_style import PROMPT, STYLE_SHAPES, STYLES, grid_prompts, style_images  # noqa: E402
from report import git_revision, machine, write_section  # noqa: E402

NEW_PAIRS = [("circle", "blue"), ("square", "red"), ("triangle", "green"), ("diamond", "purple")]
SENTENCE = "a large {colour} {shape} in the center on a white background, {word}"


def model_with_vae(model: Path, vae: Path, work: Path) -> Path:
    """A model folder that is ``model`` with ``vae`` in place of its VAE (links, nothing copied)."""
    folder = work / "models" / vae.resolve().name
    folder.mkdir(parents=True, exist_ok=True)
    for part in model.iterdir():
        link = folder / part.name
        if not link.exists() and not link.is_symlink():
            link.symlink_to((vae if part.name == "vae" else part).resolve())
    return folder


def main() -> None:
    import torch
    from studio.trainers.config import build_config
    from studio.trainers.dreambooth import UNET_TARGETS, DreamBooth, DreamBoothConfig
    from studio.trainers.loop import train

    from studio.eval.judge import load_judge
    from studio.families import EMBEDDED_MODEL, load_pipeline
    from studio.plugin import attach, detach
    from studio.sampling import generate

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=str(EMBEDDED_MODEL))
    parser.add_argument("--vae", action="append", default=[], help="also probe with this VAE folder (repeatable)")
    parser.add_argument("--styles", nargs="*", default=STYLES, choices=STYLES)
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--lr", type=float, default=1e-3, help="the content x style grid's rate")
    parser.add_argument("--lora-layers", default=",".join(UNET_TARGETS))
    parser.add_argument("--style-word", default="zxy", help="the word the captions name the style with")
    parser.add_argument("--seeds", type=int, default=3, help="samples per prompt")
    parser.add_argument("--work", default="runs/bench-style-probe")
    parser.add_argument("--section", default="", help="write the section style-probe-SECTION (a variant beside the default run's)")
    args = parser.parse_args()
    work, word = Path(args.work), args.style_word
    judge = load_judge()
    own = [SENTENCE.format(colour=c, shape=s, word=word) for s, c in STYLE_SHAPES]
    new = [SENTENCE.format(colour=c, shape=s, word=word) for s, c in NEW_PAIRS]
    prompt_sets = {"own captions": own, "new pairs": new, "grid prompt": [p.replace("zxy", word) for p in grid_prompts(PROMPT, 4)]}

    def rate(pipe, prompts: list[str], style: str) -> float:
        with torch.no_grad():
            images = generate(pipe, prompts * args.seeds, seed=0)
        objs = [r.objects[0] if r.objects else None for r in judge.read(images)]
        return sum(o is not None and o.style == style for o in objs) / len(objs)

    models = {"the model's own": Path(args.model)}
    models.update({f"`{v}`": model_with_vae(Path(args.model), Path(v), work) for v in args.vae})
    rows = []
    for label, model in models.items():
        pipe = load_pipeline(model)
        for style in args.styles:
            data = style_images(style, work / "data" / word)
            for f in data.glob("*.txt"):  # the grid's captions end in ", zxy"
                f.write_text(f.read_text().replace(", zxy", f", {word}"))
            out = train(DreamBooth(), build_config(DreamBoothConfig, {}, {
                "model": str(model), "data": str(data), "output": str(work / "runs" / model.name / f"{style}-{word}"),
                "steps": args.steps, "lr": args.lr, "checkpoint_every": 0, "captions": True,
                "instance_prompt": "a {class_noun}, " + word, "lora_layers": args.lora_layers,
                "class_data": str(work / "class" / model.name)}))
            row = {"no adapter": rate(pipe, new, style)}
            attach(pipe, [out])
            row.update({name: rate(pipe, prompts, style) for name, prompts in prompt_sets.items()})
            detach(pipe)
            rows.append((label, style, row))
            print(label, style, row, flush=True)

    cols = [*prompt_sets, "no adapter"]
    table = ["| VAE | style | " + " | ".join(cols) + " |", "|---|---|" + "---|" * len(cols)]
    table += [f"| {label} | {style} | " + " | ".join(f"{row[c]:.2f}" for c in cols) + " |" for label, style, row in rows]
    flags = "".join(f" --vae {v}" for v in args.vae)
    for key in ("model", "styles", "steps", "lr", "lora_layers", "style_word", "seeds", "work", "section"):
        value, default = getattr(args, key), parser.get_default(key)
        if value != default:
            flags += f" --{key.replace('_', '-')} " + (" ".join(value) if isinstance(value, list) else str(value))
    variant = f" ({args.section})" if args.section else ""
    text = (f"## Style probe{variant}: does a style adapter carry its style to new content?\n\nCommand: `python bench/style_probe.py{flags}` "
            f"(revision {git_revision()}; {machine()}). Per held-out style, one DreamBooth LoRA ({args.steps} steps, lr "
            f"{args.lr:g}, layers `{args.lora_layers}`) from the content x style grid's four style images, captioned "
            f"\"{own[0]}\" and so on; the judge reads the first object's style in {args.seeds} samples of each prompt: "
            f"the four training captions (own captions), four other shape/colour pairs (new pairs), the grid's prompt "
            f"\"{PROMPT.replace('zxy', word)}\" with four colours (grid prompt), and the new pairs without the adapter (no adapter).\n\n"
            + "\n".join(table) + "\n")
    print(text)
    write_section("style-probe" + (f"-{args.section}" if args.section else ""), text)


if __name__ == "__main__":
    main()
