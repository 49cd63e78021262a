import json
import subprocess
import sys
from collections import Counter

import numpy as np
import pytest
from PIL import Image

from studio.eval.fidelity import held_out_prompts
from studio.world.grammar import parse_prompt

STUDIO = [sys.executable, "-m", "studio.cli"]


def run(*args, **kw):
    return subprocess.run([*STUDIO, *args], capture_output=True, text=True, timeout=300, **kw)


@pytest.mark.parametrize("verb", [[], ["generate"], ["world"], ["world", "render"], ["world", "pretrain"],
                                  ["export"], ["merge"], ["resize"], ["extract"], ["bench"], ["ui"], ["repeat"], ["eval"], ["eval", "prompts"], ["eval", "judge"], ["eval", "train-judge"]])
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
    (["eval", "prompts", "--by", "hue"], "error: --by 'hue' is not an attribute; accepted: shape, colour"),
    (["world", "render", "a red blob"], "error: unknown word(s)"),
    (["world", "pretrain", "--init-from", "/no/such/folder"], "error: init_from /no/such/folder: not a model folder saved by this recipe (no unet"),
    (["world", "pretrain", "--init-from", "assets/models/tiny-sdxl-world", "--standardize-latents"],
     "error: init_from with standardize_latents"),
    (["world", "pretrain", "--object-counts", "1,4"], "error: --object-counts '1,4': give object counts of 1, 2 or 3"),
    (["world", "pretrain", "--caption-detail", "1.5"], "error: --caption-detail must be a chance between 0 and 1, got 1.5"),
    (["world", "pretrain", "--textures", "99"], "error: textures: 99 asked for; accepted: 0 to 14"),
    (["world", "pretrain", "--texture-rate", "-0.1"], "error: --texture-rate must be a chance between 0 and 1, got -0.1"),
    (["world", "pretrain", "--vae-from", "/no/such/folder"], "error: vae_from /no/such/folder: not a diffusers AutoencoderKL"),
    (["world", "pretrain", "--vae-from", "assets/models/tiny-sdxl-world/unet"], "error: vae_from assets/models/tiny-sdxl-world/unet: its"),
    (["world", "pretrain", "--vae-from", "assets/models/tiny-sdxl-world/vae", "--init-from", "assets/models/tiny-sdxl-world"],
     "error: vae_from with init_from"),
])
def test_bad_input_gives_one_line_error(args, message, tmp_path):
    if args[:2] == ["world", "pretrain"]:  # nothing may be written: the work dir and the model folder stay absent
        r = run(*args, "--work-dir", str(tmp_path / "work"), "--out", str(tmp_path / "x.png"))
        assert not (tmp_path / "work").exists()
    else:
        r = run(*args, "-o", str(tmp_path / "x.png")) if args[0] != "eval" else run(*args)
    assert r.returncode == 2
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith(message), r.stderr
    assert not (tmp_path / "x.png").exists()


def test_eval_prompts_breaks_an_attribute_down_by_value(tmp_path):
    out = tmp_path / "scores.json"
    r = run("eval", "prompts", "--n", "4", "--steps", "3", "--by", "colour", "--json", str(out))
    assert r.returncode == 0, r.stderr
    assert "| prompts | colour named | mentions | shown | read instead |" in r.stdout
    scores = json.loads(out.read_text())
    for k in (1, 2):
        values = {key.split("=")[1].split("_")[0] for key in scores if key.startswith("colour=") and key.endswith(f"_{k}_n")}
        mentions = sum(scores[f"colour={v}_{k}_n"] for v in values)
        # the per-colour counts add up to the colour column, and every mention has one confusion entry
        shown = sum(scores[f"colour={v}_{k}"] * scores[f"colour={v}_{k}_n"] for v in values)
        assert shown == pytest.approx(scores[f"colour_{k}"] * mentions)
        assert sum(c for kk, _, _, c in scores["confusions"] if kk == k) == mentions
        named = Counter(o.colour for t in held_out_prompts(4, k, 0) for o in parse_prompt(t).objects if o.colour)
        assert {v: scores[f"colour={v}_{k}_n"] for v in values} == dict(named)  # the same prompts as the scores
        for kk, value, read, _ in scores["confusions"]:
            assert value == read or kk != k or scores[f"colour={value}_{k}"] < 1


def test_world_render_grid(tmp_path):
    out = tmp_path / "w.png"
    r = run("world", "render", "a large blue square at the top right, striped", "-n", "4", "-o", str(out))
    assert r.returncode == 0, r.stderr
    assert Image.open(out).size == (256, 64)


def test_export_converts_and_round_trips(tmp_path):
    import torch

    from studio.adapters import Adapter, LoraWeights, load_adapter, save_adapter

    g = torch.Generator().manual_seed(0)
    name = "unet.up_blocks.0.attentions.1.transformer_blocks.0.attn2.to_k"
    src = save_adapter(Adapter({name: LoraWeights(torch.randn(4, 128, generator=g), torch.randn(96, 4, generator=g), 3.0)}),
                       tmp_path / "a.safetensors")
    r = run("export", str(src), "--format", "kohya")
    assert r.returncode == 0, r.stderr
    kohya = tmp_path / "a.kohya.safetensors"
    from safetensors.torch import load_file

    assert set(load_file(str(kohya))) == {f"lora_unet_output_blocks_1_1_transformer_blocks_0_attn2_to_k.{k}"
                                          for k in ("lora_down.weight", "lora_up.weight", "alpha")}
    r = run("export", str(kohya), "--format", "diffusers", "-o", str(tmp_path / "back.safetensors"))
    assert r.returncode == 0, r.stderr
    a, b = load_adapter(src).modules[name], load_adapter(tmp_path / "back.safetensors").modules[name]
    assert torch.equal(a.down, b.down) and torch.equal(a.up, b.up) and a.alpha == b.alpha == 3.0


@pytest.mark.parametrize("make,message", [
    (lambda p: __import__("torch").save({}, p / "a.pt"), "pickle"),
    (lambda p: (p / "a.safetensors").write_bytes(b"junk"), "not a readable safetensors file"),
])
def test_export_refuses_bad_files_and_writes_nothing(tmp_path, make, message):
    make(tmp_path)
    src = next(tmp_path.iterdir())
    r = run("export", str(src), "-o", str(tmp_path / "out.safetensors"))
    assert r.returncode == 2
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and message in lines[0], r.stderr
    assert not (tmp_path / "out.safetensors").exists()


def test_generate_with_adapters(tmp_path):
    import numpy as np
    import torch

    from studio.adapters import Adapter, LoraWeights, save_adapter

    g = torch.Generator().manual_seed(0)
    q = "unet.mid_block.attentions.0.proj_out"  # writes straight into the residual stream
    path = save_adapter(Adapter({q: LoraWeights(torch.randn(4, 128, generator=g), torch.randn(128, 4, generator=g), 4.0)}),
                        tmp_path / "a.safetensors")
    outs = {}
    for name, extra in (("base", []), ("zero", ["--adapter", f"{path}:0"]), ("on", ["-a", f"{path}:1.5"])):
        outs[name] = tmp_path / f"{name}.png"
        r = run("generate", "a red circle", "--steps", "3", "-o", str(outs[name]), *extra)
        assert r.returncode == 0, r.stderr
    pixels = {k: np.asarray(Image.open(v)).astype(int) for k, v in outs.items()}
    assert np.array_equal(pixels["base"], pixels["zero"])
    assert np.abs(pixels["base"] - pixels["on"]).max() > 10
    r = run("generate", "a red circle", "-o", str(tmp_path / "x.png"), "--adapter", f"{path}:9")
    assert r.returncode == 2 and "out of range" in r.stderr and not (tmp_path / "x.png").exists()


def _two_adapters(tmp_path):
    import torch

    from studio.adapters import Adapter, AdapterMeta, LoraWeights, save_adapter

    g = torch.Generator().manual_seed(0)
    q = "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q"
    paths = []
    for token in ("sks", "zwx"):
        adapter = Adapter({q: LoraWeights(torch.randn(4, 96, generator=g), torch.randn(96, 4, generator=g), 4.0)},
                          AdapterMeta(token=token, class_noun="shape"))
        paths.append(save_adapter(adapter, tmp_path / f"{token}.safetensors"))
    return paths


def test_generate_composed_and_its_errors(tmp_path):
    a, b = _two_adapters(tmp_path)
    out = tmp_path / "pair.png"
    prompt = "a sks shape on the left and a zwx shape on the right"
    r = run("generate", prompt, "-a", str(a), "-a", str(b), "--compose", "lora-composer", "-r", "left", "-r", "right",
            "--steps", "3", "-n", "2", "-o", str(out))
    assert r.returncode == 0, r.stderr
    assert Image.open(out).size == (128, 64)
    for extra, message in (
        (["--compose", "magic"], "--compose 'magic' is not a composer; choose one of naive, clora"),
        (["--compose", "lora-composer", "-r", "left"], "give one --region per --adapter: 2 adapters, 1 regions"),
        (["--compose", "lora-composer", "-r", "left", "-r", "0.7,0,0.2,1"], "--region: region '0.7,0,0.2,1' is not a region"),
        (["--compose", "lora-composer", "-r", "left", "-r", "styled"], "x0,y0,x1,y1 as fractions of the image with x0 < x1 and y0 < y1, e.g. 0,0,0.5,1; or style"),
        (["--compose", "lora-composer"], "lora-composer needs a region for every concept; none for sks, zwx"),
        (["--compose", "clora", "-r", "style", "-r", "style"], "clora places concepts and every concept given is a style"),
        (["-t", "0:500"], "give one --timesteps per --adapter: 2 adapters, 1 windows"),
        (["-t", "all", "-t", "500:100"], "--timesteps: timesteps '500:100' is not a timestep window; accepted: START:END"),
    ):
        r = run("generate", prompt, "-a", str(a), "-a", str(b), *extra, "-o", str(tmp_path / "x.png"), "--steps", "2")
        lines = [ln for ln in r.stderr.splitlines() if ln.strip() and not ln.startswith("warning")]
        assert r.returncode == 2 and len(lines) == 1 and message in lines[0], r.stderr
    r = run("generate", "a sks shape on the left, zwx", "-a", str(a), "-a", str(b), "--compose", "lora-composer", "-r",
            "left", "-r", "style", "--steps", "2", "-o", str(out))
    assert r.returncode == 0, r.stderr  # the second adapter a style: placed nowhere, acting everywhere
    r = run("generate", prompt, "-a", str(a), "-a", str(b), "-t", "all", "-t", ":500", "--steps", "3", "-o", str(out))
    assert r.returncode == 0, r.stderr  # the naive sum with the second adapter acting late only
    assert Image.open(out).size == (64, 64)  # one image now: rewritten
    r = run("generate", "a red circle", "-a", str(a), "-a", str(b), "--compose", "clora", "-o", str(tmp_path / "x.png"))
    assert r.returncode == 2 and "concept 'sks': none of its words 'sks shape' is in the prompt" in r.stderr
    assert not (tmp_path / "x.png").exists()


def test_merge_writes_one_adapter_with_the_summed_update(tmp_path):
    import torch

    from studio.adapters import load_adapter

    a, b = _two_adapters(tmp_path)
    out = tmp_path / "merged.safetensors"
    r = run("merge", str(a), f"{b}:0.5", "--method", "sum", "-o", str(out))
    assert r.returncode == 0, r.stderr
    merged, la, lb = (next(iter(load_adapter(p).modules.values())) for p in (out, a, b))
    assert merged.rank == 8
    assert torch.allclose(merged.delta(), la.delta() + 0.5 * lb.delta(), atol=1e-5)
    r = run("merge", str(a), str(b), "-o", str(tmp_path / "orth.safetensors"))
    assert r.returncode == 0, r.stderr
    assert load_adapter(tmp_path / "orth.safetensors").meta.trainer == "merge:orthogonal"
    r = run("merge", str(a), str(b), "--method", "average", "-o", str(tmp_path / "y.safetensors"))
    assert r.returncode == 2 and "--method 'average': choose orthogonal or sum" in r.stderr
    r = run("merge", str(a), str(b), "-o", str(a))
    assert r.returncode == 2 and "is one of the inputs" in r.stderr


def test_bench_runs_a_script_from_the_bench_folder():
    r = run("bench", "nope")
    assert r.returncode == 2 and "no benchmark 'nope'; choose one of" in r.stderr and "speed" in r.stderr
    r = run("bench", "speed", "--", "--help")  # the script's own help: arguments after -- pass through
    assert r.returncode == 0 and "--models" in r.stdout and "--repeats" in r.stdout


@pytest.mark.parametrize("args,message", [
    (["--auth", "nocolon"], "error: --auth 'nocolon': give USER:PASSWORD"),
    (["--model", "/no/such/folder"], "error: model folder not found"),
    (["--port", "0"], "error: --max-upload-mb and --concurrency must be positive"),
])
def test_ui_bad_input_gives_one_line_error(args, message, tmp_path):
    r = run("ui", "--data-dir", str(tmp_path / "data"), *args)
    assert r.returncode == 2
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith(message), r.stderr


def test_generate_takes_block_weights_per_adapter(tmp_path):
    """--block-weights: all blocks at 0 draws the base model's image; '1' the plain adapter's; bad input refused."""
    from conftest import random_adapter

    from studio.adapters import save_adapter
    from studio.families import load_pipeline

    adapter = save_adapter(random_adapter(load_pipeline(), scale=0.3), tmp_path / "a.safetensors")
    common = ["a red circle on the left", "--steps", "3"]

    def pixels(*extra):
        out = tmp_path / f"{len(list(tmp_path.iterdir()))}.png"
        r = run("generate", *common, "-o", str(out), *extra)
        assert r.returncode == 0, r.stderr
        return np.asarray(Image.open(out), dtype=np.int16)

    base, plain = pixels(), pixels("-a", str(adapter))
    off = '{"unet": {"down": 0, "mid": 0, "up": 0}, "text_encoder": 0, "text_encoder_2": 0}'
    assert np.abs(plain - base).max() > 10  # the adapter changes the image
    assert np.array_equal(pixels("-a", str(adapter), "--block-weights", off), base)
    assert np.array_equal(pixels("-a", str(adapter), "--block-weights", "1"), plain)
    for extra, message in (
        (["--block-weights", off, "--block-weights", off], "give one --block-weights per --adapter: 1 adapters, 2 block weights"),
        (["--block-weights", "{unet: 0}"], "is not JSON"),
        (["--block-weights", '"up"'], "give a JSON object (diffusers' set_adapters form) or a number"),
        (["--block-weights", off, "--compose", "naive"], "--block-weights go with plain attaching, not with --compose"),
        (["--block-weights", '{"unet": {"middle": 1}}'], "unet takes down, mid and up; got middle"),
    ):
        r = run("generate", *common, "-a", str(adapter), *extra, "-o", str(tmp_path / "bad.png"))
        assert r.returncode != 0 and message in r.stderr, r.stderr
    r = run("generate", *common, "-a", f"{adapter}:0.5", "--block-weights", off, "-o", str(tmp_path / "bad.png"))
    assert r.returncode != 0 and "give the weight in one of them" in r.stderr
    assert not (tmp_path / "bad.png").exists()
