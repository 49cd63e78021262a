"""The decoupled content/style trainer: routed gradients, orthogonal subspaces, the exact sum, a run."""

import json
import subprocess
import sys

import torch
from studio.trainers.config import build_config
from studio.trainers.content_style import (
    FROZEN,
    INTERPLAY,
    LEARNS,
    OFF,
    ROLES,
    ContentStyle,
    ContentStyleConfig,
    Router,
    attach_pair,
    attach_zip,
    combined,
    merge_penalty,
    orthonormal_rows,
)
from studio.trainers.loop import train
from test_dreambooth import star_folder

from studio.adapters import load_adapter, save_adapter
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
    layer.eval()  # the training loop's UNet is in eval mode (diffusers' from_pretrained sets it): routing must not care
    with torch.no_grad():
        layer.lora_content_up.normal_()
        layer.lora_style_up.normal_()
    x = torch.randn(3, 4)
    free = layer(x)
    want = x @ (layer.weight + layer.lora_content_up @ layer.lora_content_down + layer.lora_style_up @ layer.lora_style_down).T + layer.bias
    torch.testing.assert_close(free, want)  # alpha / rank = 1: the plain sum
    router.states = torch.tensor([[FROZEN, LEARNS]] * 3)  # every example a style example, the content adapter present
    routed = layer(x)
    torch.testing.assert_close(routed, free)
    routed.sum().backward()
    for role in ROLES:
        grads = [getattr(layer, f"lora_{role}_{p}").grad for p in ("up", "down")]
        nonzero = any(g is not None and g.abs().sum() > 0 for g in grads)
        assert nonzero == (role == "style"), role
    # a "both" example (prior preservation) teaches both
    layer.zero_grad()
    router.states = torch.tensor([[LEARNS, LEARNS], [FROZEN, LEARNS], [LEARNS, FROZEN]])
    layer(x).sum().backward()
    assert layer.lora_content_up.grad.abs().sum() > 0 and layer.lora_style_up.grad.abs().sum() > 0
    # an absent adapter adds nothing on that example (apart): example 0 sees the content LoRA alone, example 1 the
    # style LoRA alone, example 2 neither
    layer.zero_grad()
    router.states = torch.tensor([[LEARNS, OFF], [OFF, FROZEN], [OFF, OFF]])
    out = layer(x)
    dc, ds = layer.lora_content_up @ layer.lora_content_down, layer.lora_style_up @ layer.lora_style_down
    base = x @ layer.weight.T + layer.bias
    torch.testing.assert_close(out, torch.stack([base[0] + x[0] @ dc.T, base[1] + x[1] @ ds.T, base[2]]))
    out.sum().backward()
    assert layer.lora_style_up.grad is None or layer.lora_style_up.grad.abs().sum() == 0  # frozen or absent: no gradient
    # the content adapter's gradient comes from example 0 alone: d(sum)/d(up) = scale * sum_rows(ones) x (down x_0)
    torch.testing.assert_close(layer.lora_content_up.grad, torch.ones(3, 1) * (layer.lora_content_down @ x[0])[None, :])


def test_interplay_plans_are_as_documented():
    assert INTERPLAY["present"]["prior"] == [(LEARNS, LEARNS)] and INTERPLAY["present"]["content"] == (LEARNS, FROZEN)
    for mode in ("apart", "cooperative"):  # each adapter alone on its own examples and on the class
        assert INTERPLAY[mode]["content"] == (LEARNS, OFF) and INTERPLAY[mode]["style"] == (OFF, LEARNS)
        assert INTERPLAY[mode]["prior"] == [(LEARNS, OFF), (OFF, LEARNS)]
    # cooperative: on the content examples the style adapter learns with the content adapter present, and back
    assert INTERPLAY["cooperative"]["cross-content"] == (FROZEN, LEARNS)
    assert INTERPLAY["cooperative"]["cross-style"] == (LEARNS, FROZEN)
    bad = {"data": "x", "style_data": "y", "output": "z", "interplay": "together"}
    try:
        build_config(ContentStyleConfig, {}, bad).check()
    except ValueError as e:
        assert "--interplay 'together'" in str(e) and "cooperative" in str(e)
    else:
        raise AssertionError("an unknown --interplay was accepted")


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


def test_interplay_sets_what_each_adapter_does_on_each_example(tmp_path, monkeypatch):
    """The states every UNet pass of a run sees: apart never has an adapter present but frozen; cooperative adds the
    cross examples, whose targets come from a pass with the other adapter alone."""
    import studio.trainers.content_style as cs

    seen: list[tuple[str, tuple]] = []

    class Recording(cs.Router):
        def __setattr__(self, name, value):
            if name == "states" and value is not None:
                seen.append(("pass", tuple(tuple(int(v) for v in row) for row in value)))
            object.__setattr__(self, name, value)

    monkeypatch.setattr(cs, "Router", Recording)
    content = star_folder(tmp_path / "content", 1)
    style = star_folder(tmp_path / "style", 1)
    (style / "star0.txt").write_text("a large blue star in the center on a white background, zxy")
    rows = {}
    for mode in ("apart", "cooperative"):
        seen.clear()
        train(ContentStyle(), build_config(ContentStyleConfig, {}, {
            "data": str(content), "style_data": str(style), "output": str(tmp_path / mode), "steps": 1, "batch_size": 1,
            "rank": 2, "num_class_images": 1, "class_data": str(tmp_path / "class"), "checkpoint_every": 0,
            "interplay": mode}))
        rows[mode] = [r for _, passed in seen for r in passed]
    # apart: content, style, and the prior example (with one, the content adapter's half) each with the other absent
    assert sorted(set(rows["apart"])) == sorted({(LEARNS, OFF), (OFF, LEARNS)})
    # cooperative: the same, the cross examples (the other present and frozen), and the teachers (one adapter alone)
    assert set(rows["cooperative"]) == {(LEARNS, OFF), (OFF, LEARNS), (FROZEN, LEARNS), (LEARNS, FROZEN), (FROZEN, OFF), (OFF, FROZEN)}
    for mode in rows:
        s = load_adapter(tmp_path / mode / "style.safetensors")
        assert any(w.up.abs().max() > 0 for w in s.modules.values()), mode


def test_style_adapter_gets_its_own_layers_and_learning_rate(tmp_path):
    content = star_folder(tmp_path / "content", 1)
    style = star_folder(tmp_path / "style", 1)
    lr, scale = 1e-2, 1e-3
    cfg = build_config(ContentStyleConfig, {}, {
        "data": str(content), "style_data": str(style), "output": str(tmp_path / "run"), "steps": 2, "batch_size": 1,
        "rank": 2, "prior_preservation": False, "checkpoint_every": 0, "lr": lr, "style_lr_scale": scale,
        "style_lora_layers": "to_q,to_k,to_v,to_out.0,ff.net.0.proj"})
    train(ContentStyle(), cfg)
    c, s = (load_adapter(tmp_path / "run" / f"{n}.safetensors") for n in ("content", "style"))
    ff = {k for k in s.modules if k.endswith("ff.net.0.proj")}
    assert ff and set(s.modules) == set(c.modules) | ff and not any(k.endswith("ff.net.0.proj") for k in c.modules)
    # Adam moves each weight by about its lr a step (at most ~1.4x in the first steps): 2 steps from zero ups
    assert max(w.up.abs().max().item() for w in s.modules.values()) <= 2 * 1.5 * lr * scale
    assert max(w.up.abs().max().item() for w in c.modules.values()) > 0.5 * lr


def test_same_token_for_content_and_style_is_refused(tmp_path):
    content = star_folder(tmp_path / "content", 1)
    r = subprocess.run([sys.executable, "-m", "studio.cli", "train", "content-style", "--data", str(content), "--style-data",
                        str(content), "--style-token", "sks", "--output", str(tmp_path / "run")], capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and "--token and --style-token are both 'sks'" in r.stderr
    assert not (tmp_path / "run" / "adapter.safetensors").exists()


def test_ziplora_merge_by_hand():
    """ΔW = ΔW_c·diag(m_c) + ΔW_s·diag(m_s); the teacher gives each example its own adapter alone; the penalty is |cos|."""
    torch.manual_seed(0)
    layer = torch.nn.Linear(3, 2)
    c = LoraWeights(down=torch.tensor([[1.0, 2.0, 0.0]]), up=torch.tensor([[1.0], [1.0]]), alpha=2.0)  # scale 2
    s = LoraWeights(down=torch.tensor([[0.0, 1.0, 1.0]]), up=torch.tensor([[0.0], [3.0]]), alpha=1.0)  # scale 1
    router = Router()
    params = attach_zip(layer, {"content": c, "style": s}, router)
    assert [tuple(p.shape) for p in params] == [(3,), (3,)] and all(p.tolist() == [1.0, 1.0, 1.0] for p in params)
    with torch.no_grad():
        layer.lora_content_merge.copy_(torch.tensor([1.0, 0.5, 0.0]))
        layer.lora_style_merge.copy_(torch.tensor([0.0, 0.5, 1.0]))
    # by hand: ΔW_c = 2·[[1,2,0],[1,2,0]] → columns scaled [1,.5,0]: [[2,2,0],[2,2,0]];
    #          ΔW_s = [[0,0,0],[0,3,3]]   → columns scaled [0,.5,1]: [[0,0,0],[0,1.5,3]]
    delta = torch.tensor([[2.0, 2.0, 0.0], [2.0, 3.5, 3.0]])
    x = torch.tensor([[1.0, 1.0, 1.0], [0.0, 2.0, -1.0]])
    torch.testing.assert_close(layer(x), x @ (layer.weight + delta).T + layer.bias)
    router.states = torch.tensor([[FROZEN, OFF], [OFF, FROZEN]])  # teacher: example 0 sees the content LoRA alone, example 1 the style LoRA
    alone = layer(x)
    router.states = None
    torch.testing.assert_close(alone[0], x[0] @ (layer.weight + c.delta()).T + layer.bias)
    torch.testing.assert_close(alone[1], x[1] @ (layer.weight + s.delta()).T + layer.bias)
    # |cos([1,.5,0], [0,.5,1])| = .25 / 1.25 = 0.2
    torch.testing.assert_close(merge_penalty(layer), torch.tensor(0.2))
    layer(x).sum().backward()
    assert layer.lora_content_merge.grad is not None and layer.lora_style_merge.grad is not None


def test_ziplora_run_merges_two_trained_loras(tmp_path):
    content = star_folder(tmp_path / "content", 2)
    style = star_folder(tmp_path / "style", 1)
    (style / "star0.txt").write_text("a large blue star in the center on a white background, zxy")
    common = {"data": str(content), "style_data": str(style), "steps": 2, "batch_size": 1, "rank": 2,
              "num_class_images": 1, "class_data": str(tmp_path / "class"), "checkpoint_every": 0, "lr": 1e-2}
    train(ContentStyle(), build_config(ContentStyleConfig, {}, {**common, "output": str(tmp_path / "joint")}))
    src = {r: tmp_path / "joint" / f"{r}.safetensors" for r in ROLES}
    cfg = build_config(ContentStyleConfig, {}, {**common, "output": str(tmp_path / "zip"), "lr": 0.1,
                                                "content_adapter": str(src["content"]), "style_adapter": str(src["style"])})
    train(ContentStyle(), cfg)
    assert cfg.prior_preservation is False  # the targets are the adapters' own predictions
    both, c, s = (load_adapter(tmp_path / "zip" / f"{n}.safetensors") for n in ("adapter", "content", "style"))
    assert both.meta.extra["merge"] == "ziplora" and c.meta.extra["part"] == "content"
    for role, merged in (("content", c), ("style", s)):
        source = load_adapter(src[role])
        assert set(merged.modules) == set(source.modules)
        moved = 0
        for k, w in merged.modules.items():
            sw = source.modules[k]
            torch.testing.assert_close(w.up, sw.up)  # only the downs' columns are rescaled
            m = w.down / sw.down.where(sw.down.abs() > 1e-6, torch.ones_like(sw.down))
            per_column = m[0].where(sw.down[0].abs() > 1e-6, torch.ones_like(m[0]))
            torch.testing.assert_close(w.down, sw.down * per_column, rtol=1e-4, atol=1e-6)
            moved += int((per_column - 1).abs().max() > 1e-4)
        assert moved > 0, f"no {role} merge coefficient moved from 1"
    for k in both.modules:
        torch.testing.assert_close(both.modules[k].delta(), c.modules[k].delta() + s.modules[k].delta())


def test_ziplora_refuses_adapters_of_different_base_models(tmp_path):
    content = star_folder(tmp_path / "content", 1)
    a = tmp_path / "a.safetensors"
    b = tmp_path / "b.safetensors"
    w = {"unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q": LoraWeights(torch.zeros(1, 4), torch.zeros(4, 1), 1.0)}
    from studio.adapters import Adapter, AdapterMeta
    save_adapter(Adapter(w, AdapterMeta(base_model="one", base_hash="aaaa")), a)
    save_adapter(Adapter(w, AdapterMeta(base_model="two", base_hash="bbbb")), b)
    base = [sys.executable, "-m", "studio.cli", "train", "content-style", "--data", str(content), "--style-data",
            str(content), "--output", str(tmp_path / "run")]
    r = subprocess.run([*base, "--content-adapter", str(a), "--style-adapter", str(b)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and str(a) in r.stderr and str(b) in r.stderr and "aaaa" in r.stderr and "bbbb" in r.stderr
    r = subprocess.run([*base, "--content-adapter", str(a)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and "--content-adapter and --style-adapter go together" in r.stderr
    assert not (tmp_path / "run" / "adapter.safetensors").exists()


def test_ziplora_resume_gives_the_uninterrupted_merge(tmp_path):
    content = star_folder(tmp_path / "content", 2)
    style = star_folder(tmp_path / "style", 1)
    common = {"data": str(content), "style_data": str(style), "batch_size": 1, "rank": 2, "num_class_images": 1,
              "class_data": str(tmp_path / "class"), "checkpoint_every": 0, "lr": 1e-2}
    train(ContentStyle(), build_config(ContentStyleConfig, {}, {**common, "steps": 2, "output": str(tmp_path / "joint")}))
    zipping = {**common, "lr": 0.1, "checkpoint_every": 2, "content_adapter": str(tmp_path / "joint" / "content.safetensors"),
               "style_adapter": str(tmp_path / "joint" / "style.safetensors")}
    run = tmp_path / "zip"
    train(ContentStyle(), build_config(ContentStyleConfig, {}, {**zipping, "steps": 4, "output": str(run)}))
    assert (run / "checkpoint-2" / "state.json").is_file()  # the full state at step 2 (none at the last step)
    a = load_adapter(run / "adapter.safetensors")
    (run / "adapter.safetensors").unlink()
    train(ContentStyle(), build_config(ContentStyleConfig, {}, {**zipping, "steps": 4, "output": str(run), "resume": "latest"}))
    starts = [r["step"] for r in map(json.loads, (run / "progress.jsonl").read_text().splitlines()) if r.get("event") == "start"]
    assert starts == [0, 2]  # the second run went on from the step-2 checkpoint
    b = load_adapter(run / "adapter.safetensors")
    assert a.meta.steps == b.meta.steps == 4 and set(a.modules) == set(b.modules)
    for k in a.modules:
        torch.testing.assert_close(a.modules[k].down, b.modules[k].down, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(a.modules[k].up, b.modules[k].up)
