"""--scale-weight-norms (kohya's max-norm regularisation): each LoRA layer's update capped after every step."""

from types import SimpleNamespace

import pytest
import torch
from studio.trainers.loop import cap_update_norms
from test_dreambooth import star_folder


def _layer(down, up, scaling):
    """What cap_update_norms reads of a peft LoRA layer: its factors' weights and its scaling."""
    return SimpleNamespace(lora_A={"default": SimpleNamespace(weight=down)}, lora_B={"default": SimpleNamespace(weight=up)},
                           scaling={"default": scaling})


def test_cap_update_norms_by_hand():
    g = torch.Generator().manual_seed(0)
    big = _layer(torch.randn(4, 6, generator=g), torch.randn(5, 4, generator=g), 0.5)
    small = _layer(torch.randn(4, 6, generator=g) * 1e-3, torch.randn(5, 4, generator=g) * 1e-3, 0.5)
    conv = _layer(torch.randn(2, 3, 3, 3, generator=g), torch.randn(4, 2, 1, 1, generator=g), 2.0)  # kxk down, 1x1 up
    norms = [float((m.scaling["default"] * m.lora_B["default"].weight.flatten(1) @ m.lora_A["default"].weight.flatten(1)).norm())
             for m in (big, small, conv)]
    before = [(m.lora_A["default"].weight.clone(), m.lora_B["default"].weight.clone()) for m in (big, small, conv)]
    assert norms[0] > 1 and norms[1] < 1 and norms[2] > 1
    scaled, mean = cap_update_norms([big, small, conv], 1.0)
    assert scaled == 2 and mean == pytest.approx(sum(norms) / 3, rel=1e-5)
    for m, n, (a0, b0) in zip((big, small, conv), norms, before):
        a, b = m.lora_A["default"].weight, m.lora_B["default"].weight
        after = float((m.scaling["default"] * b.flatten(1) @ a.flatten(1)).norm())
        factor = min(1.0, (1.0 / n) ** 0.5)
        torch.testing.assert_close(a, a0 * factor)  # both factors by the same square root
        torch.testing.assert_close(b, b0 * factor)
        assert after == pytest.approx(min(n, 1.0), rel=1e-5)


def test_a_run_keeps_every_layer_under_the_cap_and_refuses_other_layers(tmp_path):
    from studio.trainers.config import build_config
    from studio.trainers.dreambooth import DreamBooth, DreamBoothConfig
    from studio.trainers.loop import train

    from studio.adapters import load_adapter

    data = star_folder(tmp_path / "data", 2)
    common = {"data": str(data), "steps": 3, "batch_size": 2, "rank": 2, "num_class_images": 1, "lr": 3e-2,
              "class_data": str(tmp_path / "class"), "checkpoint_every": 0}

    def norms(path):
        return [float((w.scale * w.up.float().flatten(1) @ w.down.float().flatten(1)).norm())
                for w in load_adapter(path).modules.values()]

    free = norms(train(DreamBooth(), build_config(DreamBoothConfig, {}, {**common, "output": str(tmp_path / "free")})))
    cap = sorted(free)[len(free) // 2]  # the median: half the layers are above it without the cap
    capped = norms(train(DreamBooth(), build_config(DreamBoothConfig, {}, {**common, "output": str(tmp_path / "cap"),
                                                                           "scale_weight_norms": cap})))
    assert max(free) > cap * 1.01 and max(capped) <= cap * (1 + 1e-4)
    with pytest.raises(ValueError, match="--scale-weight-norms scales plain LoRA layers' two factors; the dreambooth"
                                         " trainer with --adapter singlora"):
        train(DreamBooth(), build_config(DreamBoothConfig, {}, {**common, "output": str(tmp_path / "s"),
                                                                "scale_weight_norms": 1.0, "adapter": "singlora"}))
    with pytest.raises(ValueError, match="--scale-weight-norms must be 0 \\(off\\) or positive, got -1"):
        DreamBoothConfig(data="x", scale_weight_norms=-1.0).check()
