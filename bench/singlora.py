"""SingLoRA against LoRA at the same parameter count, on the DreamBooth table, at 3 learning rates.

Each held-out shape's 4 references (as in ``bench/dreambooth.py``) train a DreamBooth adapter with
the default settings except the adapter kind, rank and learning rate: LoRA at rank 8 and SingLoRA
at rank 16 (one matrix of ``max(d_out, d_in)`` rows per layer: the same trainable parameters on
the square projections; the table counts them). Stability: the spread of identity similarity over
the learning rates (smaller is steadier) and the worst learning rate's identity.

    python bench/singlora.py                          # star, heart, cross; lr 5e-5, 1e-4, 3e-4
    python bench/singlora.py --shapes star --lrs 1e-4

Prints a table and writes the ``singlora`` section of docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from dreambooth import defaults, score_concept  # noqa: E402
from report import git_revision, machine, write_section  # noqa: E402

METHODS = {"LoRA r8": {"adapter": "lora", "rank": 8}, "SingLoRA r16": {"adapter": "singlora", "rank": 16}}


def trainable_parameters(adapter) -> int:
    """What the trainer optimised: LoRA's down + up, or SingLoRA's one ``max(d_out, d_in) x r`` matrix."""
    if adapter.meta.extra.get("adapter") == "singlora":
        return sum(max(w.up.shape[0], w.down.shape[1]) * w.rank for w in adapter.modules.values())
    return sum(w.down.numel() + w.up.numel() for w in adapter.modules.values())


def main() -> None:
    from studio.adapters import load_adapter
    from studio.eval.judge import load_judge
    from studio.families import EMBEDDED_MODEL, load_pipeline

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", nargs="*", default=["star", "heart", "cross"])
    parser.add_argument("--lrs", nargs="*", type=float, default=[5e-5, 1e-4, 3e-4])
    parser.add_argument("--work", default="runs/bench-singlora")
    args = parser.parse_args()
    judge = load_judge()
    pipe = load_pipeline(EMBEDDED_MODEL)
    results: dict[tuple[str, float], list[dict]] = {}
    params: dict[str, int] = {}
    for name, settings in METHODS.items():
        for lr in args.lrs:
            for shape in args.shapes:
                work = Path(args.work) / f"{settings['adapter']}-r{settings['rank']}-lr{lr:g}" / shape
                r = score_concept(shape, work, pipe, judge, {**settings, "lr": lr}, class_data=Path(args.work) / "class")
                params[name] = trainable_parameters(load_adapter(r["adapter"]))
                results.setdefault((name, lr), []).append(r)
                print(name, lr, shape, {k: v for k, v in r.items() if k != "adapter"}, flush=True)

    def mean(rows, key):
        return statistics.mean(r[key] for r in rows)

    lines = ["| adapter | trainable parameters | lr | identity | identity, base | prompt fidelity | fidelity, base | judge reads the shape |",
             "|---|---|---|---|---|---|---|---|"]
    for (name, lr), rows in results.items():
        lines.append(f"| {name} | {params[name]:,} | {lr:g} | {mean(rows, 'identity'):.3f} | {mean(rows, 'identity_base'):.3f} | {mean(rows, 'fidelity'):.3f} | "
                     f"{mean(rows, 'fidelity_base'):.3f} | {sum(r['shape_read'] for r in rows)} of {10 * len(rows)} |")
    stab = ["| adapter | identity, best lr | identity, worst lr | spread over the lrs |", "|---|---|---|---|"]
    for name in METHODS:
        ids = [mean(results[(name, lr)], "identity") for lr in args.lrs]
        stab.append(f"| {name} | {max(ids):.3f} | {min(ids):.3f} | {max(ids) - min(ids):.3f} |")
    text = (f"## SingLoRA against LoRA at the same parameter count\n\nCommand: `python bench/singlora.py` (revision "
            f"{git_revision()}; {machine()}). Shapes: {', '.join(args.shapes)}; DreamBooth defaults ({defaults()}) but for the "
            f"adapter, its rank and the learning rate; means over the shapes; 10 new prompts each.\n\n" + "\n".join(lines) +
            "\n\nStability across the learning rates (mean identity per learning rate):\n\n" + "\n".join(stab) + "\n")
    print(text)
    write_section("singlora", text)


if __name__ == "__main__":
    main()
