import subprocess
import sys

import pytest
from PIL import Image

STUDIO = [sys.executable, "-m", "studio.cli"]


def run(*args, **kw):
    return subprocess.run([*STUDIO, *args], capture_output=True, text=True, timeout=300, **kw)


@pytest.mark.parametrize("verb", [[], ["generate"], ["world"], ["world", "render"], ["world", "pretrain"],
                                  ["eval"], ["eval", "prompts"], ["eval", "judge"], ["eval", "train-judge"]])
def test_help_on_every_verb(verb):
    r = run(*verb, "--help")
    assert r.returncode == 0, r.stderr
    assert "Usage" in r.stdout


def test_generate_writes_an_image_and_warns_once_on_unknown_words(tmp_path):
    out = tmp_path / "out.png"
    r = run("generate", "a sks circle on the left", "a sks square", "-o", str(out), "--steps", "4")
    assert r.returncode == 0, r.stderr
    assert Image.open(out).size == (64, 128)  # one row per prompt
    assert r.stderr.count("warning: unknown word") == 1
    assert "sks" in r.stderr


@pytest.mark.parametrize("args,message", [
    (["generate", ""], "error: the prompt is empty"),
    (["generate", "a red circle", "--steps", "0"], "error: --steps must be a positive integer, got 0"),
    (["generate", "a red circle", "--steps", "-3"], "error: --steps must be a positive integer, got -3"),
    (["generate", "a red circle", "--model", "/no/such/folder"], "error: model folder not found"),
    (["eval", "prompts", "--model", "/no/such/folder"], "error: model folder not found"),
    (["world", "render", "a red blob"], "error: unknown word(s)"),
])
def test_bad_input_gives_one_line_error(args, message, tmp_path):
    r = run(*args, "-o", str(tmp_path / "x.png")) if args[0] != "eval" else run(*args)
    assert r.returncode == 2
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith(message), r.stderr
    assert not (tmp_path / "x.png").exists()


def test_world_render_grid(tmp_path):
    out = tmp_path / "w.png"
    r = run("world", "render", "a large blue square at the top right, striped", "-n", "4", "-o", str(out))
    assert r.returncode == 0, r.stderr
    assert Image.open(out).size == (256, 64)
