"""Adapters written in fp16 / bf16 (kohya's --save_precision): the file's dtypes, what loads back, stock loading,
the trainers' --save-precision and the CLI's."""

import pytest
import torch
from conftest import random_adapter
from diffusers import StableDiffusionXLPipeline
from safetensors import safe_open
from test_cli import run as studio
from test_dreambooth import star_folder

from studio.adapters import SAVE_DTYPES, load_adapter, save_adapter
from studio.adapters.form import resolve_module
from studio.families import EMBEDDED_MODEL


@pytest.fixture(scope="module")
def pipe():
    return StableDiffusionXLPipeline.from_pretrained(str(EMBEDDED_MODEL), local_files_only=True)


@pytest.mark.parametrize("layout", ["diffusers", "kohya"])
@pytest.mark.parametrize("dtype", ["fp16", "bf16"])
def test_factors_are_written_in_the_precision_and_load_back_as_its_rounding(pipe, tmp_path, layout, dtype):
    adapter = random_adapter(pipe)
    full = save_adapter(adapter, tmp_path / "full.safetensors", layout=layout)
    half = save_adapter(adapter, tmp_path / "half.safetensors", layout=layout, dtype=dtype)
    with safe_open(str(half), framework="pt") as f:
        dtypes = {k: f.get_slice(k).get_dtype() for k in f.keys()}
    assert {v for k, v in dtypes.items() if not k.endswith(".alpha")} == {"F16" if dtype == "fp16" else "BF16"}
    assert {v for k, v in dtypes.items() if k.endswith(".alpha")} <= {"F32"}  # kohya's alphas stay exact
    assert half.stat().st_size < 0.6 * full.stat().st_size
    back = load_adapter(half)
    assert back.meta.token == adapter.meta.token and set(back.modules) == set(adapter.modules)
    for name, w in adapter.modules.items():
        got = back.modules[name]
        assert got.alpha == pytest.approx(w.alpha)
        torch.testing.assert_close(got.down, w.down.to(SAVE_DTYPES[dtype]), rtol=0, atol=0)
        torch.testing.assert_close(got.up, w.up.to(SAVE_DTYPES[dtype]), rtol=0, atol=0)


def test_a_half_precision_file_fuses_in_the_stock_loader_to_its_rounded_update(tmp_path):
    stock = StableDiffusionXLPipeline.from_pretrained(str(EMBEDDED_MODEL), local_files_only=True)
    adapter = random_adapter(stock)
    path = save_adapter(adapter, tmp_path / "a.safetensors", dtype="fp16")
    base = {k: v.clone() for k, v in stock.unet.state_dict().items()}
    stock.load_lora_weights(str(path), adapter_name="fp16file")
    stock.fuse_lora(components=["unet"], lora_scale=1.0)
    rounded = load_adapter(path)
    for name, w in rounded.modules.items():
        component, _, module = name.partition(".")
        if component != "unet":
            continue
        fused = resolve_module(stock.unet, module)
        weight = fused.base_layer.weight if hasattr(fused, "base_layer") else fused.weight
        torch.testing.assert_close(weight.detach(), base[f"{module}.weight"] + w.delta(), rtol=1e-5, atol=1e-6, msg=name)


def test_trainers_and_the_cli_write_the_precision_asked(tmp_path):
    from studio.trainers.config import build_config
    from studio.trainers.dreambooth import DreamBooth, DreamBoothConfig
    from studio.trainers.loop import snapshot_path, train

    data = star_folder(tmp_path / "stars", 1)
    out = train(DreamBooth(), build_config(DreamBoothConfig, {}, {
        "data": str(data), "output": str(tmp_path / "run"), "steps": 2, "batch_size": 1, "rank": 2,
        "prior_preservation": False, "checkpoint_every": 0, "save_adapter_every": 1, "save_precision": "bf16"}))
    for path in (out, snapshot_path(tmp_path / "run", 1)):
        assert {w.up.dtype for w in load_adapter(path).modules.values()} == {torch.bfloat16}
    with pytest.raises(ValueError, match="--save-precision 'fp8'; accepted: fp32, fp16, bf16"):
        DreamBoothConfig(data=str(data), save_precision="fp8").check()
    done = studio("export", str(out), "--format", "kohya", "--save-precision", "fp16", "-o", str(tmp_path / "k.safetensors"))
    assert done.returncode == 0 and "kohya layout, fp16" in done.stdout
    assert {w.down.dtype for w in load_adapter(tmp_path / "k.safetensors").modules.values()} == {torch.float16}
    merged = studio("merge", str(out), f"{out}:0.5", "--method", "sum", "--save-precision", "fp16", "-o", str(tmp_path / "m.safetensors"))
    assert merged.returncode == 0, merged.stderr
    assert {w.up.dtype for w in load_adapter(tmp_path / "m.safetensors").modules.values()} == {torch.float16}
    bad = studio("export", str(out), "--save-precision", "fp8", "-o", str(tmp_path / "x.safetensors"))
    assert bad.returncode != 0 and "precision 'fp8' is not one adapters are written in; accepted: fp32, fp16, bf16" in bad.stderr
    assert not (tmp_path / "x.safetensors").exists()
