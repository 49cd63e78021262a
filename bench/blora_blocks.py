"""Which UNet blocks carry content and which carry style, on the embedded model (B-LoRA's question).

For each training image (one held-out shape in one held-out style, large, centred, on white):

1. a LoRA on every attention block of the UNet (DreamBooth without prior preservation, prompt
   "a sks") is trained, then each block's part is attached alone and 10 images of "a sks" are
   sampled: the judge reads the first object's shape (content) and surface style (style);
2. a B-LoRA (only the content and style blocks of the family setting) is trained and its content
   part and its style part are sampled alone the same way.

A block separates well when its part alone gives the shape without the style (content) or the
style without the shape (style). Prints a table and writes the ``blora-blocks`` section of
docs/benchmarks.md.

    python bench/blora_blocks.py
"""

from __future__ import annotations

import argparse
import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from report import git_revision, machine, write_section  # noqa: E402

IMAGES = [("star", "shadowed", "blue"), ("heart", "ringed", "red"), ("cross", "halved", "green")]


def reference(shape: str, style: str, colour: str, folder: Path, n: int = 1):
    from PIL import Image

    from studio.world.grammar import parse_prompt, scene_from_prompt
    from studio.world.render import render_array

    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        text = f"a large {colour} {shape} in the center on a white background, {style}"
        scene = scene_from_prompt(parse_prompt(text), random.Random(i))
        Image.fromarray(render_array(scene, seed=2000 + i)).save(folder / f"{shape}-{style}-{i}.png")
    return folder


def read(judge, images, shape: str, style: str) -> tuple[float, float]:
    """(fraction whose first object has ``shape``, fraction whose first object has ``style``)."""
    readings = [r.objects[0] if r.objects else None for r in judge.read(images)]
    n = len(readings)
    return (sum(o is not None and o.shape == shape for o in readings) / n,
            sum(o is not None and o.style == style for o in readings) / n)


def main() -> None:
    import torch
    from studio.trainers.blora import BLOCKS, BLoRA, BLoRAConfig, split
    from studio.trainers.config import build_config
    from studio.trainers.dreambooth import DreamBooth, DreamBoothConfig
    from studio.trainers.loop import train

    from studio.adapters import Adapter, load_adapter
    from studio.eval.judge import load_judge
    from studio.families import EMBEDDED_MODEL, load_pipeline
    from studio.plugin import attach, detach
    from studio.sampling import generate

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", default="runs/bench-blora")
    parser.add_argument("--n", type=int, default=10, help="images per configuration")
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--lr", type=float, default=1e-3, help="above the trainers' default, so each part learns enough to be read")
    args = parser.parse_args()
    judge = load_judge()
    pipe = load_pipeline(EMBEDDED_MODEL)
    attention_blocks = sorted({n.split(".transformer_blocks")[0] for n, _ in pipe.unet.named_modules() if ".transformer_blocks." in n})
    prompts = ["a sks"] * args.n
    per_block: dict[str, list[tuple[float, float]]] = {b: [] for b in ["(none)", "(all)", *attention_blocks]}
    parts: dict[str, list[tuple[float, float]]] = {"content": [], "style": [], "both": []}
    for shape, style, colour in IMAGES:
        work = Path(args.work) / f"{shape}-{style}"
        data = reference(shape, style, colour, work / "data")
        common = {"data": str(data), "steps": args.steps, "batch_size": 4, "checkpoint_every": 0, "rank": 16, "lr": args.lr}
        full = train(DreamBooth(), build_config(DreamBoothConfig, {}, {
            **common, "output": str(work / "all-blocks"), "prior_preservation": False, "instance_prompt": "a {token}"}))
        adapter = load_adapter(full)
        for block in per_block:
            mods = {} if block == "(none)" else adapter.modules if block == "(all)" else {
                k: w for k, w in adapter.modules.items() if k.startswith(f"unet.{block}.")}
            with torch.no_grad():
                if mods:
                    attach(pipe, [Adapter(mods, adapter.meta)])
                images = generate(pipe, prompts, seed=0)
                if mods:
                    detach(pipe)
            per_block[block].append(read(judge, images, shape, style))
        blora = load_adapter(train(BLoRA(), build_config(BLoRAConfig, {}, {**common, "output": str(work / "blora")})))
        content, style_part = split(blora, *BLOCKS["sdxl"])
        for name, part in (("content", content), ("style", style_part), ("both", blora)):
            with torch.no_grad():
                attach(pipe, [part])
                images = generate(pipe, prompts, seed=0)
                detach(pipe)
            parts[name].append(read(judge, images, shape, style))
        print(shape, style, {b: v[-1] for b, v in per_block.items()}, {p: v[-1] for p, v in parts.items()}, flush=True)

    def mean(rows):
        return sum(r[0] for r in rows) / len(rows), sum(r[1] for r in rows) / len(rows)

    content_block, style_block = BLOCKS["sdxl"]
    lines = ["| LoRA part attached alone | shape read (content) | style read | content - style |", "|---|---|---|---|"]
    for block, rows in per_block.items():
        s, t = mean(rows)
        mark = " (B-LoRA content)" if block == content_block else " (B-LoRA style)" if block == style_block else ""
        lines.append(f"| {block}{mark} | {s:.2f} | {t:.2f} | {s - t:+.2f} |")
    blines = ["| B-LoRA part | shape read | style read |", "|---|---|---|"]
    for name, rows in parts.items():
        s, t = mean(rows)
        blines.append(f"| {name} | {s:.2f} | {t:.2f} |")
    images = ", ".join(f"{c} {s} {st}" for s, st, c in IMAGES)
    text = (f"## B-LoRA: which blocks carry content and style on the embedded model\n\n"
            f"Command: `python bench/blora_blocks.py` (revision {git_revision()}; {machine()}). One training image each: "
            f"{images} (large, centred, on white); {args.steps} steps, lr {args.lr:g}, rank 16, prompt \"a sks\"; {args.n} samples per row "
            f"and image, means over the {len(IMAGES)} images. The judge reads the first object's shape and style.\n\n"
            "A LoRA on every attention block, each block's part attached alone:\n\n" + "\n".join(lines) +
            "\n\nB-LoRA trained on the family's two blocks only, each part alone and both:\n\n" + "\n".join(blines) + "\n")
    print(text)
    write_section("blora-blocks", text)


if __name__ == "__main__":
    main()
