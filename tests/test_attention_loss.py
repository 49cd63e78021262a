"""The attention loss (``--attention-loss``): cross-attention maps recorded in the training attention with their
gradient, the subjects' masks, and the loss in a DreamBooth run."""

import copy
import random

import numpy as np
import pytest
import torch
from PIL import Image
from studio.composers.base import default_attention
from studio.trainers.attention import attention_maps, use_training_attention
from studio.trainers.data import load_images, subject_mask
from studio.trainers.dreambooth import attention_loss, token_weights
from studio.trainers.loop import use_lora_linear
from test_training_attention import _batch, _grads, _unet


class _Probs:
    """diffusers' attention computed explicitly (studio.composers.base.default_attention), keeping every
    cross-attention layer's probabilities."""

    def __init__(self):
        self.probs = []

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kw):
        out = [] if encoder_hidden_states is not None else None
        result = default_attention(attn, hidden_states, encoder_hidden_states, attention_mask, temb, probs_out=out)
        if out:
            self.probs.append(out[0])
        return result


@pytest.mark.parametrize("order", [[0, 0, 0, 1, 1, 1], [0, 1, 0, 1, 1, 0], None])
def test_recorded_maps_are_the_attention_probabilities_with_their_gradient(order):
    reference = _unet(["to_q", "to_k", "to_v", "to_out.0"])
    fused = copy.deepcopy(reference)
    use_lora_linear(fused)
    assert use_training_attention(fused)
    maps = attention_maps(fused, max_queries=10**6)
    probs = _Probs()
    reference.set_attn_processor(probs)
    x, t, embeds, added = _batch()
    if order is not None:  # two prompts, each three times (in runs: one sequence per prompt; interleaved: gathered)
        embeds = embeds[:2][torch.tensor(order)]
    rows = torch.tensor([1, 2, 4])
    weights = torch.zeros(3, 77)
    weights[0, 3], weights[1, [2, 5]], weights[2, 7] = 1.0, 0.5, 1.0
    maps.watch(embeds, rows, weights)
    fused(x, t, embeds, added_cond_kwargs=added)
    maps.close()
    reference(x, t, embeds, added_cond_kwargs=added)
    expected = [(p.mean(1)[rows] * weights[:, None, :]).sum(-1) for p in probs.probs]
    assert len(maps.maps) == len(expected) == 11  # every cross-attention layer
    for got, want in zip(maps.maps, expected):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)
    # the same gradient as through diffusers' explicit attention
    sum(m.square().sum() for m in maps.maps).backward()
    sum(m.square().sum() for m in expected).backward()
    a, b = _grads(reference), _grads(fused)
    assert len(a) > 0 and a.keys() <= b.keys()
    assert any(v.abs().max() > 0 for k, v in b.items() if "attn2.to_k" in k)  # the keys' LoRA learns from the map
    for name in b:  # (a fused k/v GEMM gives v's LoRA a gradient of zeros where the reference gives none)
        torch.testing.assert_close(b[name], a.get(name, torch.zeros_like(b[name])), rtol=1e-3, atol=1e-7, msg=name)


def test_maps_only_for_the_watched_pass_and_small_layers_and_checkpointing_keeps_them():
    unet = _unet(["to_q", "to_k", "to_v", "to_out.0"])
    use_lora_linear(unet)
    use_training_attention(unet)
    maps = attention_maps(unet, max_queries=16)  # the 4x4 layers only (of 8x8 and 4x4)
    x, t, embeds, added = _batch()
    weights = torch.zeros(2, 77)
    weights[:, 4] = 1.0
    unet(x, t, embeds, added_cond_kwargs=added)
    assert maps.maps == []  # nothing watched
    maps.watch(embeds.clone(), torch.tensor([0, 1]), weights)
    unet(x, t, embeds, added_cond_kwargs=added)
    assert maps.maps == []  # another prompt batch than the watched one
    losses, grads = [], []
    for checkpointing in (False, True):
        if checkpointing:
            unet.enable_gradient_checkpointing()
        unet.train()
        unet.zero_grad()
        maps.watch(embeds, torch.tensor([0, 1]), weights)
        out = unet(x, t, embeds, added_cond_kwargs=added).sample
        maps.close()
        assert {m.shape[-1] for m in maps.maps} == {16} and len(maps.maps) == 6
        loss = out.square().mean() + sum(m.square().sum() for m in maps.maps)
        n = len(maps.maps)
        loss.backward()
        assert len(maps.maps) == n  # layers run again for the backward pass add nothing
        losses.append(loss.item())
        grads.append(_grads(unet))
    assert losses[0] == pytest.approx(losses[1], rel=1e-6)
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], rtol=1e-4, atol=1e-7, msg=name)


def test_attention_maps_need_the_training_attention():
    from diffusers.models.attention_processor import AttnProcessor

    unet = _unet(["to_q"])
    unet.set_attn_processor(AttnProcessor())
    with pytest.raises(ValueError, match="training attention"):
        attention_maps(unet)


def test_attention_loss_compares_each_layers_map_with_the_pooled_mask():
    mask = torch.zeros(1, 16, 16)
    mask[:, 4:12, 0:8] = 1.0  # the subject on the left
    exact = [mask.reshape(1, 256) * 0.3, torch.nn.functional.avg_pool2d(mask[None], 2)[0].reshape(1, 64)]
    assert attention_loss(exact, mask, (16, 16)).item() == pytest.approx(0.0, abs=1e-7)  # scale is divided out
    uniform = [torch.full((1, 64), 0.2)]  # normalised to 1 everywhere: wrong on the 3/4 outside the subject
    assert attention_loss(uniform, mask, (16, 16)).item() == pytest.approx(0.75)
    wide = torch.zeros(1, 8, 16)  # a non-square latent: the layer's grid keeps its aspect
    wide[:, :, :4] = 1.0
    assert attention_loss([wide.reshape(1, 128)], wide, (8, 16)).item() == pytest.approx(0.0, abs=1e-7)
    with pytest.raises(ValueError, match="recorded no cross-attention map"):
        attention_loss([], mask, (16, 16))


def test_token_weights_and_a_caption_without_the_token():
    from transformers import CLIPTokenizer

    from studio.families import EMBEDDED_MODEL

    tok = CLIPTokenizer.from_pretrained(EMBEDDED_MODEL / "tokenizer")
    w = token_weights(tok, "a sks shape on the left", "sks")
    pieces = len(tok("sks", add_special_tokens=False)["input_ids"])  # the token's pieces, after "<start> a"
    assert w.shape == (tok.model_max_length,) and w.nonzero()[:, 0].tolist() == list(range(2, 2 + pieces))
    assert w.sum().item() == pytest.approx(1.0)
    with pytest.raises(ValueError, match="star3.png: its prompt 'a blue shape' does not hold the token 'sks'"):
        token_weights(tok, "a blue shape", "sks", "star3.png")


def _image(path, size=(96, 64), box=(10, 20, 40, 50), background=(240, 240, 240)):
    a = np.full((size[1], size[0], 3), background, dtype=np.uint8)
    a[box[1] : box[3], box[0] : box[2]] = (20, 60, 200)
    Image.fromarray(a).save(path)
    return a


def test_subject_masks_from_a_plain_background_or_a_mask_file(tmp_path):
    _image(tmp_path / "a.png", size=(64, 64), box=(8, 16, 24, 48))
    _image(tmp_path / "b.png")  # 96x64: scaled and cropped to the 64x64 square, its mask with it
    m = np.zeros((64, 96), dtype=np.uint8)
    m[:, 48:] = 255  # a mask that says otherwise than the pixels: the file wins
    Image.fromarray(m).save(tmp_path / "b.mask.png")
    images, files = load_images(tmp_path, 64)
    assert [f.name for f in files] == ["a.png", "b.png"]  # the mask is not a training image
    a = subject_mask(images[0], "a.png")
    expected = torch.zeros(64, 64)
    expected[16:48, 8:24] = 1.0
    assert torch.equal(a, expected)
    b = subject_mask(images[1], "b.png")  # centre crop of 96 -> 64 wide: columns 16..80 of the mask
    assert b.shape == (64, 64) and b[:, :30].max() == 0 and b[:, 34:].min() == 1


def test_bad_masks_are_clear_errors(tmp_path):
    busy = tmp_path / "busy"
    busy.mkdir()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(busy / "noise.png")
    images, _ = load_images(busy, 64)
    with pytest.raises(ValueError, match=r"noise.png: the subject's mask .* covers .* accepted: 0.5% to 95%"):
        subject_mask(images[0], "noise.png")
    wrong = tmp_path / "wrong"
    wrong.mkdir()
    _image(wrong / "a.png")
    Image.new("L", (32, 32)).save(wrong / "a.mask.png")
    with pytest.raises(ValueError, match="a.mask.png is 32x32 and its image a.png 96x64"):
        load_images(wrong, 64)


def test_dreambooth_attention_loss_moves_the_tokens_map_onto_the_subject(tmp_path):
    """Trained with the loss, the identifier's cross-attention on the training images lies more on the subject
    than trained without it (the same seed, steps and data)."""
    from studio.trainers.config import build_config
    from studio.trainers.dreambooth import DreamBooth, DreamBoothConfig, _encode
    from studio.trainers.loop import train

    from studio.adapters import load_adapter
    from studio.families import EMBEDDED_MODEL, load_pipeline
    from studio.plugin import attach
    from studio.world.grammar import parse_prompt, scene_from_prompt
    from studio.world.render import render_array

    data = tmp_path / "stars"
    data.mkdir()
    for i, place in enumerate(["on the left", "on the right", "at the top", "at the bottom"]):
        scene = scene_from_prompt(parse_prompt(f"a blue star {place} on a white background"), random.Random(i))
        Image.fromarray(render_array(scene, seed=i)).save(data / f"star{i}.png")
    shares = []
    for weight in (0.0, 5.0):
        out = tmp_path / f"w{weight}"
        cfg = build_config(DreamBoothConfig, {}, {"data": str(data), "output": str(out), "steps": 40, "lr": 1e-3,
                                                  "prior_preservation": False, "checkpoint_every": 0,
                                                  "attention_loss": weight})
        adapter = train(DreamBooth(), cfg)
        pipe = load_pipeline(EMBEDDED_MODEL)
        attach(pipe, [adapter])
        images, _ = load_images(data, 128)
        masks = torch.stack([subject_mask(im) for im in images])
        lat = DreamBooth._latents(pipe, images)
        enc = _encode(pipe, ["a sks shape"] * 4)
        probs = _Probs()
        pipe.unet.set_attn_processor(probs)
        noise = torch.randn(lat.shape, generator=torch.Generator().manual_seed(0))
        t = torch.full((4,), 300)
        from studio.families import sdxl_time_ids

        with torch.no_grad():
            pipe.unet(pipe.scheduler.add_noise(lat, noise, t), t, enc["embeds"],
                      added_cond_kwargs={"text_embeds": enc["pooled"], "time_ids": sdxl_time_ids(128, 128, 4)})
        share = []
        w = token_weights(pipe.tokenizer, "a sks shape", "sks")
        for p in probs.probs:
            m = p.mean(1) @ w  # the token's map
            side = int(m.shape[-1] ** 0.5)
            inside = torch.nn.functional.adaptive_avg_pool2d(masks[:, None], side)[:, 0].reshape(4, -1)
            share.append(((m * inside).sum(-1) / m.sum(-1)).mean().item())
        shares.append(float(np.mean(share)))
        assert load_adapter(adapter).meta.dataset.get("attention_loss", 0.0) == weight
    # the share of the token's attention that falls on the subject (here 0.04 without the loss, 0.15 with it)
    assert shares[1] > 2 * shares[0], shares


def test_attention_loss_is_refused_where_it_cannot_act(tmp_path):
    from studio.trainers.config import build_config
    from studio.trainers.content_style import ContentStyleConfig
    from studio.trainers.dreambooth import DreamBoothConfig

    cfg = build_config(DreamBoothConfig, {}, {"data": str(tmp_path), "attention_loss": 1.0, "compile": True})
    with pytest.raises(ValueError, match="--attention-loss does not work with --compile"):
        cfg.check()
    cfg = build_config(ContentStyleConfig, {}, {"data": str(tmp_path), "style_data": str(tmp_path), "attention_loss": 1.0})
    with pytest.raises(ValueError, match="--attention-loss is not supported by the content-style trainer"):
        cfg.check()
