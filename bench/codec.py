"""What the embedded model's VAE keeps of each concept: renders encoded and decoded, read by the judge.

A trainer can only teach the UNet what the VAE can carry: an image whose texture does not survive
``decode(encode(x))`` cannot be sampled, however good the adapter. For every shape and style of the
world (base and held-out), ``--n`` random one-object scenes with that concept (any colour, size,
position and background; the other attribute drawn from the base concepts) are rendered, passed
through the VAE (posterior mode) and read by the world judge; the table gives how often the judge
reads the concept on the render (the judge's own accuracy) and on the reconstruction (the codec's
ceiling for anything sampled through it).

    python bench/codec.py                     # the embedded model's VAE, 50 scenes per concept
    python bench/codec.py --vae runs/x/vae    # another VAE folder (e.g. an experiment)
    python bench/codec.py --refine 3000       # also the VAE refined on generic textures, side by side
    python bench/codec.py --compare runs/codec/vae-refined-3000 --section structural   # an earlier refinement

``--refine N`` fine-tunes the VAE for N steps with :func:`studio.world.pretrain.refine_vae` (generic
textures, latents of the base scenes anchored; saved under ``runs/codec/``) and reads every concept
through both; it also scores the embedded pipeline's prompt fidelity with each VAE (same prompts,
seeds and UNet), which shows whether the denoiser is still served by the refined codec.

Prints a table and writes the ``codec`` section of docs/benchmarks.md (only for the embedded
model's VAE; ``--section NAME``: the section ``codec-NAME``, for a variant).
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from report import ROOT, git_revision, machine, write_section  # noqa: E402


def concept_scenes(kind: str, concept: str, n: int, seed: int) -> list:
    """``n`` one-object scenes whose object has ``concept`` as its ``kind`` (shape or style)."""
    from studio.world.concepts import BASE_SHAPES, BASE_STYLES
    from studio.world.render import sample_scene

    rng = random.Random(f"{seed}-{kind}-{concept}")
    shapes = (concept,) if kind == "shape" else BASE_SHAPES
    styles = (concept,) if kind == "style" else BASE_STYLES
    return [sample_scene(rng, 1, shapes=shapes, styles=styles) for _ in range(n)]


def read_rate(judge, images, scenes, kind: str) -> float:
    """Fraction of images where the judge reads the scene's object's ``kind`` at its position."""
    hits = 0
    for reading, scene in zip(judge.read(images), scenes):
        obj = scene.objects[0]
        here = [o for o in reading.objects if o.position == obj.position] or list(reading.objects[:1])
        hits += bool(here) and getattr(here[0], kind) == getattr(obj, kind)
    return hits / len(scenes)


def through(vae, renders):
    """``decode(encode(x))`` (posterior mode) of uint8 NHWC renders, as uint8, and its pixel MSE."""
    import torch

    from studio.eval.judge import to_tensor

    x = to_tensor(renders)
    with torch.no_grad():
        rec = vae.decode(vae.encode(x).latent_dist.mode()).sample.clamp(-1, 1)
    return ((rec + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy(), float(((rec - x) ** 2).mean())


def main() -> None:
    import numpy as np
    from diffusers import AutoencoderKL

    from studio.eval.judge import load_judge
    from studio.families import EMBEDDED_MODEL
    from studio.world.concepts import BASE_SHAPES, BASE_STYLES, HELD_OUT_SHAPES, HELD_OUT_STYLES
    from studio.world.render import render_array

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vae", default=str(Path(EMBEDDED_MODEL) / "vae"), help="a diffusers AutoencoderKL folder")
    parser.add_argument("--n", type=int, default=50, help="scenes per concept")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--refine", type=int, default=0, help="also refine the VAE for this many steps (0: no)")
    parser.add_argument("--fidelity-n", type=int, default=100, help="prompts per object count for the fidelity check")
    parser.add_argument("--compare", default="", help="also read through this VAE folder (e.g. an earlier --refine's)")
    parser.add_argument("--section", default="", help="write the section codec-SECTION (a variant beside the default run's)")
    args = parser.parse_args()
    vae = AutoencoderKL.from_pretrained(args.vae).eval()
    judge = load_judge()
    vaes = {"the VAE": vae}
    if args.refine:
        from studio.world.pretrain import refine_vae

        t0 = time.perf_counter()
        refined = refine_vae(vae, args.refine, seed=args.seed)
        refine_s = time.perf_counter() - t0
        refined.save_pretrained(ROOT / "runs" / "codec" / f"vae-refined-{args.refine}")
        vaes["the refined VAE"] = refined
    if args.compare:
        vaes[f"`{args.compare}`"] = AutoencoderKL.from_pretrained(args.compare).eval()
    groups = [("shape", "base", BASE_SHAPES), ("shape", "held-out", HELD_OUT_SHAPES),
              ("style", "base", BASE_STYLES), ("style", "held-out", HELD_OUT_STYLES)]
    rows = []
    for kind, group, concepts in groups:
        for concept in concepts:
            scenes = concept_scenes(kind, concept, args.n, args.seed)
            renders = np.stack([render_array(s, seed=args.seed * 7919 + i) for i, s in enumerate(scenes)])
            cells = [f"{read_rate(judge, renders, scenes, kind):.2f}"]
            for v in vaes.values():
                recon, mse = through(v, renders)
                cells += [f"{read_rate(judge, recon, scenes, kind):.2f}", f"{mse:.4f}"]
            rows.append(f"| {kind} | {group} | {concept} | " + " | ".join(cells) + " |")
            print(rows[-1], flush=True)
    head = "| attribute | concepts | concept | judge reads it: render |" + "".join(
        f" judge reads it: through {name} | pixel MSE, {name} |" for name in vaes)
    table = head + "\n|" + "---|" * (4 + 2 * len(vaes)) + "\n" + "\n".join(rows) + "\n"
    extra = ""
    if args.refine:
        from studio.eval.fidelity import evaluate_prompts
        from studio.families import load_pipeline

        pipe = load_pipeline()
        scores = {}
        for name, v in vaes.items():
            pipe.vae = v
            scores[name] = evaluate_prompts(pipe, n_prompts=args.fidelity_n, judge=judge, progress=False)
            print(name, {k: round(x, 3) for k, x in scores[name].items()}, flush=True)
        keys = ["fidelity_1", "fidelity_2", "shape_1", "style_1", "colour_1", "size_1"]
        extra = (f"\n`--refine {args.refine}`: {args.refine} steps of `studio.world.pretrain.refine_vae` ({refine_s:.0f} s; "
                 "half of each batch generic textures, the base scenes' latents anchored). Prompt fidelity of the embedded "
                 f"pipeline with each VAE ({args.fidelity_n} held-out prompts per object count, same seeds, same UNet):\n\n"
                 "| VAE | " + " | ".join(keys) + " |\n|---|" + "---|" * len(keys) + "\n"
                 + "".join(f"| {name} | " + " | ".join(f"{scores[name][k]:.3f}" for k in keys) + " |\n" for name in vaes))
        print(extra)
    if Path(args.vae).resolve() != (Path(EMBEDDED_MODEL) / "vae").resolve():
        print("(another VAE: docs/benchmarks.md not written)")
        return
    body = (
        f"## What the embedded model's VAE keeps of each concept{f' ({args.section})' if args.section else ''}\n\n"
        f"Command: `python bench/codec.py --n {args.n} --seed {args.seed}"
        + (f" --refine {args.refine} --fidelity-n {args.fidelity_n}" if args.refine else "")
        + (f" --compare {args.compare}" if args.compare else "") + (f" --section {args.section}" if args.section else "")
        + f"` (revision {git_revision()}; {machine()}). "
        f"{args.n} random one-object scenes per concept (any colour, size, position and background), rendered, then "
        "encoded and decoded by the VAE (posterior mode) and read by the world judge at the object's position. "
        "A concept that does not survive the VAE cannot be sampled through it, whatever the adapter.\n\n" + table + extra
    )
    write_section("codec" + (f"-{args.section}" if args.section else ""), body)


if __name__ == "__main__":
    main()
