"""Resized DreamBooth adapters on the held-out shapes: what `studio resize` keeps of identity and prompt fidelity.

Each held-out shape's adapter is trained as `bench/dreambooth.py` trains it (default settings, rank 8, 4 references),
then resized to lower ranks (and per layer by `--fro`) and scored again on the same 10 prompts and seeds with the
world judge: identity similarity to the references and prompt fidelity, beside the base model and the adapter as
trained. The share of each layer's update norm that the resized file keeps is printed with it.

    python bench/resize.py                      # all six shapes, ranks 4 2 1 and fro 0.9
    python bench/resize.py --shapes star --ranks 4

Prints a table and writes the `resize` section of docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from dreambooth import defaults, prompts, score_concept  # noqa: E402
from report import git_revision, machine, write_section  # noqa: E402


def score_variant(pipe, judge, adapter, shape: str, work: Path) -> tuple[float, float]:
    """Identity similarity and prompt fidelity of ``adapter`` on the bench's prompts (seeds as bench/dreambooth.py)."""
    import numpy as np
    import torch
    from dreambooth import references

    from studio.eval.fidelity import identity_similarity, prompt_fidelity
    from studio.plugin import attach, detach
    from studio.sampling import generate
    from studio.world.grammar import parse_prompt

    refs = references(shape, work / "data")
    with torch.no_grad():
        attach(pipe, [adapter])
        try:
            images = generate(pipe, prompts("sks shape"), seed=0)
        finally:
            detach(pipe)
    fidelity = float(np.mean([prompt_fidelity(r, parse_prompt(p)) for r, p in zip(judge.read(images), prompts("shape"))]))
    return identity_similarity(judge, images, refs), fidelity


def main() -> None:
    from studio.adapters import load_adapter
    from studio.adapters.resize import resize
    from studio.eval.judge import load_judge
    from studio.families import EMBEDDED_MODEL, load_pipeline
    from studio.world.concepts import HELD_OUT_SHAPES

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", nargs="*", default=list(HELD_OUT_SHAPES))
    parser.add_argument("--ranks", nargs="*", type=int, default=[4, 2, 1])
    parser.add_argument("--fro", nargs="*", type=float, default=[0.9], help="per-layer Frobenius shares (at most rank 8)")
    parser.add_argument("--work", default="runs/bench-resize")
    args = parser.parse_args()
    judge = load_judge()
    pipe = load_pipeline(EMBEDDED_MODEL)
    variants = [(f"rank {r}", {"rank": r}) for r in args.ranks] + [(f"fro {f:g}", {"rank": 8, "fro": f}) for f in args.fro]
    rows: list[tuple] = []  # (shape, variant, identity, fidelity, mean rank, mean kept)
    for shape in args.shapes:
        work = Path(args.work) / shape
        trained = score_concept(shape, work, pipe, judge, class_data=Path(args.work) / "class")
        full = load_adapter(trained["adapter"])
        rows.append((shape, "base model", trained["identity_base"], trained["fidelity_base"], 0.0, float("nan")))
        rows.append((shape, f"as trained (rank {full.meta.rank})", trained["identity"], trained["fidelity"],
                     float(full.meta.rank), 1.0))
        for label, kw in variants:
            small, kept = resize(full, **kw)
            ranks = [w.rank for w in small.modules.values()]
            identity, fidelity = score_variant(pipe, judge, small, shape, work)
            rows.append((shape, label, identity, fidelity, sum(ranks) / len(ranks), kept["mean_kept"]))
            print(rows[-1], flush=True)
    labels = list(dict.fromkeys(r[1].split(" (")[0] for r in rows))
    head = ("| variant | identity | prompt fidelity | mean rank of a layer | share of a layer's update norm kept (mean) |\n"
            "|---|---|---|---|---|\n")
    body = ""
    for label in labels:
        mine = [r for r in rows if r[1].split(" (")[0] == label]
        n = len(mine)
        rank = sum(r[4] for r in mine) / n
        kept = sum(r[5] for r in mine) / n
        body += (f"| {mine[0][1] if label == 'as trained' else label} | {sum(r[2] for r in mine) / n:.3f} |"
                 f" {sum(r[3] for r in mine) / n:.3f} | {'' if label == 'base model' else f'{rank:.1f}'} |"
                 f" {'' if label == 'base model' else f'{kept:.3f}'} |\n")
    per = "| concept | " + " | ".join(labels) + " |\n" + "|---" * (len(labels) + 1) + "|\n"
    for shape in args.shapes:
        cells = {r[1].split(" (")[0]: r for r in rows if r[0] == shape}
        per += f"| {shape} | " + " | ".join(f"{cells[lb][2]:.3f} / {cells[lb][3]:.2f}" for lb in labels) + " |\n"
    flags = "".join(f" --{k} {' '.join(map(str, v))}" for k, v in (("ranks", args.ranks), ("fro", args.fro))
                    if v != parser.get_default(k))
    shapes = f" --shapes {' '.join(args.shapes)}" if args.shapes != list(HELD_OUT_SHAPES) else ""
    text = (f"## Resized DreamBooth adapters (`studio resize`)\n\nCommand: `python bench/resize.py{shapes}{flags}` (revision"
            f" {git_revision()}; {machine()}). Adapters trained with the DreamBooth table's settings ({defaults()}; 4"
            f" references per concept), then resized with `studio.adapters.resize` (the truncated SVD of each layer's"
            f" update; `fro F`: per layer the fewest singular values holding that share of its norm, at most rank 8) and"
            f" sampled on the same 10 prompts and seeds. Means over {len(args.shapes)} concepts:\n\n{head}{body}\n"
            f"Per concept, identity / prompt fidelity:\n\n{per}")
    print(text)
    write_section("resize", text)


if __name__ == "__main__":
    main()
