"""SingLoRA: the math against a hand computation, the training hook, the plain-LoRA export."""

import pytest
import torch
from studio.trainers import singlora

from studio.adapters import load_adapter, save_adapter
from studio.adapters.form import Adapter, AdapterMeta

A = torch.tensor([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]])  # 3 rows, rank 2


def test_ramp_is_min_t_over_T():
    assert [singlora.ramp(t, 4) for t in (0, 1, 2, 4, 9)] == [0.0, 0.25, 0.5, 1.0, 1.0]
    assert singlora.ramp(0, 0) == 1.0


def test_delta_by_hand_for_both_non_square_shapes():
    # W: (d_out=2, d_in=3): delta = (alpha/r) * u * A[:2] @ A[:3]^T, alpha/r = 2, u = 0.5
    hand = [[1 * 1 + 2 * 2, 1 * 3 + 2 * 4, 1 * 5 + 2 * 6], [3 * 1 + 4 * 2, 3 * 3 + 4 * 4, 3 * 5 + 4 * 6]]
    assert singlora.delta(A, d_out=2, d_in=3, alpha=4.0, u=0.5).tolist() == hand
    # W: (d_out=3, d_in=2): the transpose of the same products
    assert singlora.delta(A, d_out=3, d_in=2, alpha=4.0, u=0.5).tolist() == torch.tensor(hand).T.tolist()
    # square: symmetric A A^T
    sq = singlora.delta(A, d_out=3, d_in=3, alpha=2.0, u=1.0)
    assert sq.tolist() == (A @ A.T).tolist()
    with pytest.raises(ValueError, match="needs 4"):
        singlora.delta(A, d_out=4, d_in=2, alpha=1.0, u=1.0)


def test_hook_adds_delta_to_the_layer_and_detaches_cleanly():
    torch.manual_seed(0)
    layer = torch.nn.Linear(3, 2)
    x = torch.randn(5, 3)
    base = layer(x)
    clock = singlora.Clock(ramp_steps=4)
    param = singlora.attach(layer, rank=2, alpha=4.0, clock=clock)
    assert param.shape == (3, 2) and dict(layer.named_parameters())["singlora_A"] is param
    torch.testing.assert_close(layer(x), base)  # u(0) = 0: the base layer
    with torch.no_grad():
        param.copy_(A)
    clock.step = 2
    want = x @ (layer.weight + singlora.delta(A, 2, 3, 4.0, 0.5)).T + layer.bias
    torch.testing.assert_close(layer(x), want)
    layer(x).sum().backward()
    assert param.grad is not None and param.grad.abs().sum() > 0
    singlora.detach(layer)
    assert not hasattr(layer, "singlora_A")
    torch.testing.assert_close(layer(x), base)


def test_export_is_a_plain_lora_with_the_same_delta(tmp_path):
    torch.manual_seed(1)
    big = torch.randn(40, 4)
    for d_out, d_in in ((40, 24), (24, 40), (40, 40)):
        lora = singlora.to_lora(big, d_out, d_in, alpha=3.0, u=0.7)
        assert lora.kind == "lora" and lora.down.shape == (4, d_in) and lora.up.shape == (d_out, 4)
        adapter = Adapter(
            {"unet.mid_block.attentions.0.transformer_blocks.0.attn1.to_q": lora}, AdapterMeta(family="sdxl")
        )
        save_adapter(adapter, tmp_path / "a.safetensors")
        back = load_adapter(tmp_path / "a.safetensors").modules[
            "unet.mid_block.attentions.0.transformer_blocks.0.attn1.to_q"
        ]
        torch.testing.assert_close(back.delta(), singlora.delta(big, d_out, d_in, 3.0, 0.7))


def test_dreambooth_with_singlora_writes_a_lora_file_that_reproduces_the_trained_model(tmp_path):
    """Train with --adapter singlora, then the exported file attached through the plugin gives the
    same UNet output as the SingLoRA hooks at the end of training."""
    from studio.trainers.config import build_config
    from studio.trainers.dreambooth import DreamBooth, DreamBoothConfig
    from studio.trainers.loop import train
    from test_dreambooth import star_folder

    from studio.families import EMBEDDED_MODEL, load_pipeline
    from studio.plugin import attach

    data = star_folder(tmp_path / "stars", 2)
    cfg = build_config(
        DreamBoothConfig,
        {},
        {
            "data": str(data),
            "output": str(tmp_path / "run"),
            "steps": 3,
            "batch_size": 2,
            "rank": 4,
            "num_class_images": 2,
            "class_data": str(tmp_path / "class"),
            "adapter": "singlora",
            "singlora_ramp": 2,
            "lr": 1e-2,
            "checkpoint_every": 0,
        },
    )
    trainer = DreamBooth()
    out = train(trainer, cfg)
    adapter = load_adapter(out)
    assert adapter.meta.extra["adapter"] == "singlora" and adapter.meta.extra["singlora_ramp"] == 2
    # SingLoRA has half LoRA's parameters on square layers: the file's rank-4 pairs come from one matrix
    q = next(w for k, w in adapter.modules.items() if k.endswith("attn1.to_q"))
    torch.testing.assert_close(q.up / q.up.norm(), q.down.T / q.down.norm())  # u * A and A^T: the same A
    assert any(w.delta().abs().max() > 1e-3 for w in adapter.modules.values())

    # the hooks of a fresh SingLoRA model loaded with the trained matrices == the exported plain LoRA
    pipe_hooks, pipe_file = load_pipeline(EMBEDDED_MODEL), load_pipeline(EMBEDDED_MODEL)
    clock = singlora.Clock(2)
    clock.step = 3
    for key, w in adapter.modules.items():
        layer = pipe_hooks.unet.get_submodule(key.removeprefix("unet."))
        param = singlora.attach(layer, rank=4, alpha=w.alpha, clock=clock)
        d_out, d_in = layer.weight.shape
        with torch.no_grad():
            param.copy_((w.up if d_out >= d_in else w.down.T)[: max(d_out, d_in)])
    attach(pipe_file, [out])
    g = torch.Generator().manual_seed(0)
    x, t = torch.randn(1, 16, 16, 16, generator=g), torch.tensor([500])
    cond = torch.randn(1, 77, pipe_file.unet.config.cross_attention_dim, generator=g)
    added = {
        "text_embeds": torch.randn(
            1,
            pipe_file.unet.config.projection_class_embeddings_input_dim
            - 6 * pipe_file.unet.config.addition_time_embed_dim,
            generator=g,
        ),
        "time_ids": torch.tensor([[64.0, 64, 0, 0, 64, 64]]),
    }
    with torch.no_grad():
        a = pipe_hooks.unet(x, t, cond, added_cond_kwargs=added).sample
        b = pipe_file.unet(x, t, cond, added_cond_kwargs=added).sample
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
