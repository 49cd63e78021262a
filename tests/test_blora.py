"""B-LoRA: block targets, the content/style split, one-image training, compose and its refusals."""

import subprocess
import sys

import torch
from studio.trainers.blora import BLoRA, BLoRAConfig, split
from studio.trainers.config import build_config
from studio.trainers.loop import train
from test_dreambooth import star_folder

from studio.adapters import load_adapter, save_adapter
from studio.adapters.form import Adapter, AdapterMeta, LoraWeights

STUDIO = [sys.executable, "-m", "studio.cli"]


def lora(seed):
    g = torch.Generator().manual_seed(seed)
    return LoraWeights(torch.randn(2, 4, generator=g), torch.randn(4, 2, generator=g), 2.0)


def test_split_by_block_keeps_every_module_once():
    mods = {
        "unet.up_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q": lora(0),
        "unet.up_blocks.0.attentions.1.transformer_blocks.0.attn2.to_k": lora(1),
        "unet.up_blocks.0.attentions.10.transformer_blocks.0.attn1.to_q": lora(2),
    }  # not block 1: a prefix trap
    content, style = split(
        Adapter(mods, AdapterMeta(family="sdxl")), "up_blocks.0.attentions.0", "up_blocks.0.attentions.1"
    )
    assert list(content.modules) == ["unet.up_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"]
    assert list(style.modules) == ["unet.up_blocks.0.attentions.1.transformer_blocks.0.attn2.to_k"]
    assert content.meta.extra["blora_part"] == "content" and style.meta.extra["blora_part"] == "style"
    assert content.modules[next(iter(content.modules))] is mods[next(iter(content.modules))]


def test_one_image_trains_the_two_blocks_and_writes_content_and_style(tmp_path):
    data = star_folder(tmp_path / "one", 1)  # one image is allowed: that is B-LoRA's point
    cfg = build_config(
        BLoRAConfig,
        {},
        {
            "data": str(data),
            "output": str(tmp_path / "run"),
            "steps": 2,
            "batch_size": 1,
            "rank": 4,
            "checkpoint_every": 0,
        },
    )
    out = train(BLoRA(), cfg)
    whole = load_adapter(out)
    content, style = (
        load_adapter(tmp_path / "run" / "content.safetensors"),
        load_adapter(tmp_path / "run" / "style.safetensors"),
    )
    assert whole.meta.trainer == "blora" and whole.meta.dataset["images"] == 1
    assert whole.meta.dataset["instance_prompt"] == "a sks" and not whole.meta.dataset["prior_preservation"]
    assert content.modules and all(k.startswith("unet.up_blocks.0.attentions.0.") for k in content.modules)
    assert style.modules and all(k.startswith("unet.up_blocks.0.attentions.1.") for k in style.modules)
    assert set(whole.modules) == set(content.modules) | set(style.modules)
    leaves = {k.rsplit(".", 2)[-2] + "." + k.rsplit(".", 1)[-1] for k in whole.modules}
    assert leaves == {"attn1.to_q", "attn1.to_k", "attn1.to_v", "to_out.0", "attn2.to_q", "attn2.to_k", "attn2.to_v"}


def test_bad_blocks_are_clear_errors(tmp_path):
    data = star_folder(tmp_path / "one", 1)
    r = subprocess.run(
        [
            *STUDIO,
            "train",
            "blora",
            "--data",
            str(data),
            "--output",
            str(tmp_path / "run"),
            "--steps",
            "1",
            "--content-block",
            "up_blocks.9.attentions.0",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 2 and "--content-block 'up_blocks.9.attentions.0' is not a module of this UNet" in r.stderr
    assert not (tmp_path / "run" / "adapter.safetensors").exists()


def test_compose_refuses_adapters_of_different_base_models_naming_both(tmp_path):
    a = Adapter(
        {"unet.up_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q": lora(0)},
        AdapterMeta(family="sdxl", base_model="tiny-sdxl-world", base_hash="aaaa"),
    )
    b = Adapter(
        {"unet.up_blocks.0.attentions.1.transformer_blocks.0.attn1.to_q": lora(1)},
        AdapterMeta(family="sdxl", base_model="other-sdxl", base_hash="bbbb"),
    )
    save_adapter(a, tmp_path / "content.safetensors")
    save_adapter(b, tmp_path / "style.safetensors")
    out = tmp_path / "x.png"
    r = subprocess.run(
        [
            *STUDIO,
            "compose",
            "a sks",
            "--content",
            str(tmp_path / "content.safetensors"),
            "--style",
            str(tmp_path / "style.safetensors"),
            "-o",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 2, r.stderr
    line = r.stderr.strip().splitlines()[-1]
    assert line.startswith("error:") and "content.safetensors" in line and "style.safetensors" in line
    assert "tiny-sdxl-world" in line and "other-sdxl" in line
    assert not out.exists()


def test_compose_writes_an_image_from_a_content_and_a_style_part(tmp_path):
    data = star_folder(tmp_path / "one", 1)
    cfg = build_config(
        BLoRAConfig,
        {},
        {
            "data": str(data),
            "output": str(tmp_path / "run"),
            "steps": 1,
            "batch_size": 1,
            "rank": 2,
            "checkpoint_every": 0,
        },
    )
    train(BLoRA(), cfg)
    out = tmp_path / "c.png"
    r = subprocess.run(
        [
            *STUDIO,
            "compose",
            "a sks",
            "--content",
            str(tmp_path / "run" / "content.safetensors"),
            "--style",
            str(tmp_path / "run" / "style.safetensors"),
            "--content-weight",
            "1.0",
            "--style-weight",
            "0.8",
            "--steps",
            "2",
            "-o",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr
    from PIL import Image

    assert Image.open(out).size == (64, 64)
    pair = ["--content", str(tmp_path / "run" / "content.safetensors"), "--style", str(tmp_path / "run" / "style.safetensors")]
    late = tmp_path / "late.png"
    r = subprocess.run([*STUDIO, "compose", "a sks", *pair, "--style-timesteps", "0:500", "--steps", "2", "-o", str(late)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert Image.open(late).size == (64, 64)
    r = subprocess.run([*STUDIO, "compose", "a sks", *pair, "--style-timesteps", "late", "-o", str(tmp_path / "bad.png")],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and "--style-timesteps: timesteps 'late' is not a timestep window" in r.stderr
    assert not (tmp_path / "bad.png").exists()
