"""The embedded model: time of `studio generate` for one image, and prompt fidelity on held-out prompts.

    python bench/embedded_model.py            # 200 prompts per object count (about 5 minutes on 2 cores)
    python bench/embedded_model.py --n 50     # quicker

Prints a table and writes the `embedded_model` section of docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from report import git_revision, machine, write_section  # noqa: E402


def time_generate(runs: int = 3) -> list[float]:
    """Wall time of the whole `studio generate` command (process start, model load, 25 steps, PNG)."""
    times = []
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(runs):
            t0 = time.perf_counter()
            subprocess.run([sys.executable, "-m", "studio.cli", "generate", "a red circle on the left",
                            "-o", f"{tmp}/out{i}.png"], check=True, capture_output=True)
            times.append(time.perf_counter() - t0)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=200, help="held-out prompts per object count")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    from studio.eval.fidelity import REPORTED, evaluate_prompts
    from studio.families import EMBEDDED_MODEL, load_pipeline

    times = time_generate()
    t0 = time.perf_counter()
    scores = evaluate_prompts(load_pipeline(EMBEDDED_MODEL), n_prompts=args.n, seed=args.seed)
    eval_s = time.perf_counter() - t0

    rows = [
        ("`studio generate` one image, 25 steps (median of 3, whole command)", f"{statistics.median(times):.1f} s"),
        (f"prompt fidelity, 1-object held-out prompts (n={args.n})", f"{scores['fidelity_1']:.3f}"),
        (f"prompt fidelity, 2-object held-out prompts (n={args.n})", f"{scores['fidelity_2']:.3f}"),
        (f"time for the fidelity evaluation ({2 * args.n} images)", f"{eval_s:.0f} s"),
    ]
    table = "| measure | value |\n|---|---|\n" + "\n".join(f"| {a} | {b} |" for a, b in rows)
    per = "| attribute | shown, 1-object prompts | shown, 2-object prompts |\n|---|---|---|\n" + "\n".join(
        f"| {a} | {scores.get(f'{a}_1', float('nan')):.2f} | {scores.get(f'{a}_2', float('nan')):.2f} |"
        for a in REPORTED)
    print(table + "\n\n" + per)
    write_section("embedded_model", f"""## Embedded model (`assets/models/tiny-sdxl-world`)

Command: `python bench/embedded_model.py --n {args.n} --seed {args.seed}` (revision {git_revision()}).
Machine: {machine()}.
Prompt fidelity is the fraction of the attributes a prompt names that the world judge reads off the
generated image (25 Euler steps, guidance 5.0, one seed per prompt); the prompts come from the
caption split that pretraining never used (`studio eval prompts` gives the same figures).

{table}

Per attribute, the fraction of the prompts' mentions of it that the images show (under the object
matching that prompt fidelity scores; a prompt names the shape always, the other attributes at random):

{per}
""")


if __name__ == "__main__":
    main()
