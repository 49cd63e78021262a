"""The decoupled content/style trainer: routed gradients, orthogonal subspaces, the exact sum, a run."""

import subprocess
import sys

import torch
from studio.trainers.config import build_config
from studio.trainers.content_style import (
    ROLES,
    ContentStyle,
    ContentStyleConfig,
    Router,
    attach_pair,
    combined,
    orthonormal_rows,
)
from studio.trainers.loop import train
from test_dreambooth import star_folder

from studio.adapters import load_adapter
from studio.adapters.form import LoraWeights


def test_combined_is_the_exact_sum_by_hand():
    c = LoraWeights(down=torch.tensor([[1.0, 0.0]]), up=torch.tensor([[2.0], [0.0]]), alpha=2.0)  # scale 2
    s = LoraWeights(down=torch.tensor([[0.0, 1.0]]), up=torch.tensor([[0.0], [3.0]]), alpha=1.0)  # scale 1
    both = combined(c, s)
    assert both.rank == 2 and both.scale == 1.0
    assert both.delta().tolist() == [[4.0, 0.0], [0.0, 3.0]]  # 2*[[2,0],[0,0]] + [[0,0],[0,3]]


def test_orthogonal_downs_make_the_updates_read_orthogonal_inputs():
    rows = orthonormal_rows(6, 4, seed=0)
    torch.testing.assert_close(rows @ rows.T, torch.eye(4), atol=1e-6, rtol=0)
    layer = torch.nn.Linear(6, 5)
    attach_pair(layer, rank=2, alpha=2.0, router=Router(), orthogonal=True, seed=0)
    with torch.no_grad():
        layer.lora_content_up.normal_()
        layer.lora_style_up.normal_()
    dc = layer.lora_content_up @ layer.lora_content_down
    ds = layer.lora_style_up @ layer.lora_style_down
    torch.testing.assert_close(dc @ ds.T, torch.zeros(5, 5), atol=1e-5, rtol=0)
    # only the ups train; the downs are fixed buffers that are not saved in a state dict
    assert {n for n, p in layer.named_parameters() if "lora_" in n} == {"lora_content_up", "lora_style_up"}
    assert not any("_down" in k for k in layer.state_dict())


def test_routing_keeps_the_value_and_sends_each_example_to_its_owner():
    torch.manual_seed(0)
    layer = torch.nn.Linear(4, 3)
    router = Router()
    attach_pair(layer, rank=2, alpha=2.0, router=router, orthogonal=False, seed=0)
    with torch.no_grad():
        layer.lora_content_up.normal_()
        layer.lora_style_up.normal_()
    x = torch.randn(3, 4)
    free = layer(x)
    want = x @ (layer.weight + layer.lora_content_up @ layer.lora_content_down + layer.lora_style_up @ layer.lora_style_down).T + layer.bias
    torch.testing.assert_close(free, want)  # alpha / rank = 1: the plain sum
    router.owner = torch.tensor([1, 1, 1])  # every example is a style example
    routed = layer(x)
    torch.testing.assert_close(routed, free)
    routed.sum().backward()
    for role in ROLES:
        grads = [getattr(layer, f"lora_{role}_{p}").grad for p in ("up", "down")]
        nonzero = any(g is not None and g.abs().sum() > 0 for g in grads)
        assert nonzero == (role == "style"), role
    # a "both" example (prior preservation) teaches both
    layer.zero_grad()
    router.owner = torch.tensor([2, 1, 0])
    layer(x).sum().backward()
    assert layer.lora_content_up.grad.abs().sum() > 0 and layer.lora_style_up.grad.abs().sum() > 0


def test_content_style_run_writes_three_plain_loras(tmp_path):
    content = star_folder(tmp_path / "content", 2)
    style = star_folder(tmp_path / "style", 1)
    (style / "star0.txt").write_text("a large blue star in the center on a white background, zxy")
    cfg = build_config(ContentStyleConfig, {}, {
        "data": str(content), "style_data": str(style), "output": str(tmp_path / "run"), "steps": 2, "batch_size": 1,
        "rank": 2, "num_class_images": 1, "class_data": str(tmp_path / "class"), "checkpoint_every": 0, "lr": 1e-2})
    out = train(ContentStyle(), cfg)
    both, c, s = (load_adapter(tmp_path / "run" / f"{n}.safetensors") for n in ("adapter", "content", "style"))
    assert out.name == "adapter.safetensors" and both.meta.trainer == "content-style"
    assert both.meta.dataset["style_images"] == 1 and both.meta.extra["style_token"] == "zxy"
    assert c.meta.extra["part"] == "content" and s.meta.extra["part"] == "style"
    assert set(both.modules) == set(c.modules) == set(s.modules) and len(both.modules) > 10
    for k in both.modules:
        torch.testing.assert_close(both.modules[k].delta(), c.modules[k].delta() + s.modules[k].delta())
    assert any(w.up.abs().max() > 0 for w in c.modules.values()) and any(w.up.abs().max() > 0 for w in s.modules.values())


def test_same_token_for_content_and_style_is_refused(tmp_path):
    content = star_folder(tmp_path / "content", 1)
    r = subprocess.run([sys.executable, "-m", "studio.cli", "train", "content-style", "--data", str(content), "--style-data",
                        str(content), "--style-token", "sks", "--output", str(tmp_path / "run")], capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and "--token and --style-token are both 'sks'" in r.stderr
    assert not (tmp_path / "run" / "adapter.safetensors").exists()
