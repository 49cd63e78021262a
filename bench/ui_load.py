"""Load on the Gradio app: rounds of N generate requests submitted at once from a script.

Starts ``studio ui`` on a fresh data folder, trains one adapter through the app's own workspace (the
"quick" preset, as the Train tab would), then sends ``--rounds`` rounds of ``--requests`` concurrent
``/generate`` calls with gradio's client, every request with the adapter attached. Reports per round:
requests completed, errors, wall seconds, requests per second, and the server's resident memory after
the round. Prints the table and writes the ``ui-load`` section of docs/benchmarks.md.

    python bench/ui_load.py --requests 20 --rounds 6 --steps 10
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from dreambooth import references  # noqa: E402
from report import git_revision, machine, write_section  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--steps", type=int, default=10, help="Sampling steps per request.")
    args = parser.parse_args()

    from studio.ui.load import hammer, rss_mb, server
    from studio.ui.workspace import Workspace

    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "data"
        ws = Workspace(data)
        references("star", Path(tmp) / "star")
        ws.add_dataset("stars", [(p.name, p) for p in sorted((Path(tmp) / "star").glob("*.png"))])
        ws.start_run(ws.train_config("dreambooth", "quick", "stars", "star"))
        while ws.status("star").state in ("running", "queued"):
            time.sleep(1)
        assert ws.status("star").state == "done", ws.status("star")
        ws.collect("star")
        with server(data) as (proc, url):
            start_rss = rss_mb(proc.pid)
            rows = [hammer(url, args.requests, args.steps, proc.pid, seed=r * args.requests, adapter="star")
                    for r in range(args.rounds)]
    table = ("| round | requests | completed | errors | seconds | requests/s | server RSS after, MiB |\n"
             "|---|---|---|---|---|---|---|\n"
             f"| (started) | | | | | | {start_rss:.0f} |\n")
    for i, r in enumerate(rows):
        table += (f"| {i + 1} | {r.requests} | {r.completed} | {len(r.errors)} | {r.seconds:.1f} |"
                  f" {r.completed / r.seconds:.2f} | {r.rss_mb:.0f} |\n")
    growth = rows[-1].rss_mb - rows[1].rss_mb
    text = (f"## The app under load: {args.requests} concurrent generate requests\n\n"
            f"Command: `python bench/ui_load.py --requests {args.requests} --rounds {args.rounds} --steps {args.steps}` "
            f"(revision {git_revision()}; {machine()}).\n\n{table}\n"
            f"Each round submits {args.requests} `/generate` calls at once with gradio's client (64x64, {args.steps} steps,"
            f" one adapter attached); the app queues them (one worker) and answers every one. Round 1 includes loading"
            f" the pipeline. Memory from round 2 to round {args.rounds}: {growth:+.0f} MiB"
            f" ({growth / max(1, args.rounds - 2):+.1f} MiB per round of {args.requests}).\n")
    print(text)
    errors = [e for r in rows for e in r.errors]
    for e in errors[:5]:
        print("error:", e)
    write_section("ui-load", text)


if __name__ == "__main__":
    main()
