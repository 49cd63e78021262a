"""Load on a running app: many generate requests at once through gradio's client, as scripts send them.

    python -m studio.ui.load http://127.0.0.1:7860/ --requests 20 --rounds 3 --pid PID

Every request is submitted before any finishes, so the app's queue holds them; each round reports how
many completed, the errors, the seconds and (with ``--pid``) the server's resident memory after it.
``bench/ui_load.py`` starts a server and runs this; the app's tests run it too.
"""

from __future__ import annotations

import argparse
import contextlib
import time
from dataclasses import dataclass
from pathlib import Path


@dataclass
class Round:
    requests: int
    completed: int
    errors: list[str]
    seconds: float
    rss_mb: float | None


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def server(data_dir: str | Path, port: int | None = None, log: str | Path | None = None, startup: float = 180,
           args: tuple[str, ...] = ()):
    """``studio ui`` on ``data_dir`` (plus ``args``) as its own process, as a user starts it; yields
    ``(process, url)`` once it answers, and stops it afterwards."""
    import os
    import subprocess
    import sys
    import urllib.request

    port = port or free_port()
    log_path = Path(log) if log else Path(data_dir).parent / f"studio-ui-{port}.log"
    with open(log_path, "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "studio.cli", "ui", "--data-dir", str(data_dir), "--port", str(port), *args],
                                stdout=out, stderr=subprocess.STDOUT, env={**os.environ, "GRADIO_ANALYTICS_ENABLED": "False"})
    url = f"http://127.0.0.1:{port}/"
    try:
        deadline = time.time() + startup
        while True:
            try:
                urllib.request.urlopen(url, timeout=2)
                break
            except OSError:
                if proc.poll() is not None or time.time() > deadline:
                    raise RuntimeError(f"studio ui did not start:\n{log_path.read_text()[-3000:]}") from None
                time.sleep(0.5)
        yield proc, url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()


def generate_args(prompt: str, seed: int, steps: int, adapter: str = "", weight: float = 1.0) -> list:
    """The positional inputs of the app's ``/generate`` endpoint (prompt, negative, seed, steps, guidance,
    width, height, images, composer, then adapter/weight/region/timesteps for each concept slot)."""
    from studio.ui.app import SLOTS

    slots = [adapter, weight, "", ""] + ["", 1.0, "", ""] * (SLOTS - 1)
    return [prompt, "", seed, steps, 5.0, 0, 0, 1, "naive", *slots]


def rss_mb(pid: int | None) -> float | None:
    if pid is None:
        return None
    import psutil

    return psutil.Process(pid).memory_info().rss / 2**20


def hammer(url: str, requests: int = 20, steps: int = 10, pid: int | None = None, seed: int = 0,
           prompt: str = "a red circle on the left", adapter: str = "", timeout: float = 600) -> Round:
    """``requests`` generate calls submitted at once; waits for all of them."""
    from gradio_client import Client

    client = Client(url, verbose=False)
    t0 = time.time()
    jobs = [client.submit(*generate_args(prompt, seed + i, steps, adapter), api_name="/generate") for i in range(requests)]
    completed, errors = 0, []
    for job in jobs:
        try:
            gallery = job.result(timeout=timeout)
            if not gallery:
                raise RuntimeError("empty gallery")
            completed += 1
        except Exception as e:  # every failure is reported, none stops the round
            errors.append(f"{type(e).__name__}: {e}")
    seconds = time.time() - t0
    client.close()
    return Round(requests, completed, errors, seconds, rss_mb(pid))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("url")
    parser.add_argument("--requests", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--adapter", default="", help="A library adapter every request uses.")
    parser.add_argument("--pid", type=int, default=None, help="The server's process id, to read its memory.")
    args = parser.parse_args(argv)
    print("| round | requests | completed | errors | seconds | server RSS (MB) |\n|---|---|---|---|---|---|")
    for r in range(args.rounds):
        res = hammer(args.url, args.requests, args.steps, args.pid, seed=r * args.requests, adapter=args.adapter)
        rss = f"{res.rss_mb:.0f}" if res.rss_mb is not None else "-"
        print(f"| {r + 1} | {res.requests} | {res.completed} | {len(res.errors)} | {res.seconds:.1f} | {rss} |")
        for e in res.errors[:3]:
            print(f"  error: {e}")


if __name__ == "__main__":
    main()
