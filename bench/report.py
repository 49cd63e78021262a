"""Write a benchmark's section of docs/benchmarks.md, leaving the other sections as they are."""

from __future__ import annotations

import os
import platform
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BENCHMARKS = ROOT / "docs" / "benchmarks.md"
HEADER = "# Benchmarks\n\nEvery figure here is written by a script under `bench/`; each section names the command that\nreproduces it and the machine it ran on.\n"


DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}  # --dtype names -> torch's


def default_dtype(device: str) -> str:
    """The benchmarks' dtype where --dtype is not given: bf16 on CUDA (what sampling there uses), fp32 on the CPU."""
    return "bf16" if device == "cuda" else "fp32"


def torch_dtype(name: str):
    import torch

    return getattr(torch, DTYPES[name])


def machine() -> str:
    """One line describing this machine: CPU model, cores, torch version."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import torch

    gpu = f", GPU {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ", no GPU"
    return f"{cpu}, {os.cpu_count()} cores{gpu}, torch {torch.__version__}"


def git_revision() -> str:
    """The commit measured; "+ uncommitted changes" when the code differs from it (the change that lands next)."""
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                             cwd=ROOT, check=True).stdout.strip()
        # the whole tree but the report itself (run from the repository's root: pathspecs are relative to it)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", ".", ":!docs/benchmarks.md"],
                               capture_output=True, text=True, cwd=ROOT, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):  # a copy without its history (a GPU machine's): as told, if told
        return os.environ.get("STUDIO_REVISION", "unknown")
    return f"{rev} + uncommitted changes" if dirty else rev


def write_section(name: str, body: str) -> None:
    """Replace (or append) the section between ``<!-- bench:name -->`` markers."""
    start, end = f"<!-- bench:{name} -->", f"<!-- /bench:{name} -->"
    text = BENCHMARKS.read_text() if BENCHMARKS.is_file() else HEADER
    block = f"{start}\n{body.rstrip()}\n{end}"
    if start in text and end in text:
        text = text[: text.index(start)] + block + text[text.index(end) + len(end):]
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    BENCHMARKS.parent.mkdir(parents=True, exist_ok=True)
    tmp = BENCHMARKS.with_suffix(".tmp")
    tmp.write_text(text)
    tmp.replace(BENCHMARKS)
