"""--lora-dropout: peft's dropout on each LoRA layer's input, by hand on one layer, and in runs (it acts, validation
does not turn it off, a resumed run agrees with an uninterrupted one)."""

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from studio.trainers.config import build_config
from studio.trainers.dreambooth import DreamBooth, DreamBoothConfig
from studio.trainers.loop import Context, TrainConfig, inject_lora, train
from test_dreambooth import star_folder

from studio.adapters import load_adapter


def test_a_layer_drops_its_input_before_the_down_projection_by_hand():
    model = torch.nn.Sequential()
    model.add_module("proj", torch.nn.Linear(6, 5))
    ctx = Context(TrainConfig(lora_dropout=0.5, rank=2), SimpleNamespace(unet=model), None, None, None, 64)
    torch.manual_seed(0)
    inject_lora(ctx, {"unet": ["proj"]}, 2, 2.0)
    layer = model.proj
    with torch.no_grad():
        layer.lora_B["default"].weight.copy_(torch.randn(5, 2))
    down, up, base = layer.lora_A["default"].weight, layer.lora_B["default"].weight, layer.base_layer
    x = torch.randn(4, 6)
    layer.train()
    torch.manual_seed(7)
    got = layer(x)
    torch.manual_seed(7)
    expected = base(x) + F.dropout(x, 0.5, training=True) @ down.T @ up.T  # scale alpha / rank = 1
    torch.testing.assert_close(got, expected)
    assert not torch.allclose(got, base(x) + x @ down.T @ up.T)  # something was dropped
    layer.eval()
    torch.testing.assert_close(layer(x), base(x) + x @ down.T @ up.T)  # never at sampling


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("dropout")
    data = star_folder(tmp / "stars", 2)
    base = {"data": str(data), "batch_size": 2, "rank": 2, "lr": 1e-2, "prior_preservation": False,
            "checkpoint_every": 0, "steps": 4, "seed": 1}

    def go(name, **extra):
        return load_adapter(train(DreamBooth(), build_config(DreamBoothConfig, {}, {**base, "output": str(tmp / name), **extra})))

    go.tmp = tmp
    return go


def _same(a, b) -> bool:
    return all(torch.allclose(a.modules[k].up, b.modules[k].up, rtol=1e-5, atol=1e-7)
               and torch.allclose(a.modules[k].down, b.modules[k].down, rtol=1e-5, atol=1e-7) for k in a.modules)


def test_dropout_acts_in_runs_survives_validation_and_resumes_exactly(run):
    plain = run("plain")
    dropped = run("dropped", lora_dropout=0.5, checkpoint_every=2)
    assert not _same(dropped, plain)
    # validation images after every step (the UNet in eval mode while they are drawn) change nothing of training
    assert _same(run("validated", lora_dropout=0.5, validation_every=1, validation_prompts=["a sks shape"]), dropped)
    assert _same(run("resumed", lora_dropout=0.5, resume=str(run.tmp / "dropped" / "checkpoint-2")), dropped)


@pytest.mark.parametrize("extra, message", [
    ({"lora_dropout": 1.0}, "--lora-dropout must be at least 0 (off) and below 1, got 1"),
    ({"lora_dropout": 0.1, "adapter": "singlora"}, "--lora-dropout works with --adapter lora only"),
])
def test_bad_lora_dropout_is_refused_by_name(extra, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        TrainConfig(**extra).check()
