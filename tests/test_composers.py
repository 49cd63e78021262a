"""Composers: the protocol on a stock pipeline, each method's math against a hand computation, and
that a composition leaves the pipeline exactly as it was."""

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from conftest import random_adapter
from diffusers import StableDiffusionXLPipeline
from diffusers.models.attention_processor import AttnProcessor2_0
from studio.composers import Concept, compose, composing, get_composer, parse_region, parse_timesteps
from studio.composers.base import Run, default_attention, token_positions
from studio.composers.clora import CLoRA, nt_xent
from studio.composers.orthogonal import merge, merge_layer

from studio.adapters import Adapter, LoraWeights
from studio.families import EMBEDDED_MODEL
from studio.plugin import LoraStack

PROMPT = "a sks shape on the left and a zwx shape on the right"


@pytest.fixture(scope="module")
def pipe():
    pipe = StableDiffusionXLPipeline.from_pretrained(str(EMBEDDED_MODEL), local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def concepts(pipe):
    out = []
    for seed, (token, region) in enumerate([("sks", "left"), ("zwx", "right")]):
        adapter = random_adapter(pipe, seed=seed, scale=0.3)
        adapter.meta.token = token
        out.append(Concept.load(adapter, name=token, region=region))
    return out


def test_regions_by_name_or_box_and_clear_errors():
    assert parse_region("left") == (0.0, 0.0, 0.5, 1.0)
    assert parse_region("Top Right") == (0.5, 0.0, 1.0, 0.5)
    assert parse_region("0.1,0.2,0.6,0.9") == (0.1, 0.2, 0.6, 0.9)
    for bad in ("middle-ish", "0.5,0,0.2,1", "0,0,1"):
        with pytest.raises(ValueError, match="accepted: left, right"):
            parse_region(bad)
    with pytest.raises(ValueError, match="unknown composer 'bogus'; choose one of naive, clora"):
        get_composer("bogus")


def test_token_positions_assign_repeated_words_in_order(pipe):
    tok = pipe.tokenizer
    ids = tok(PROMPT)["input_ids"]
    first, second = token_positions(tok, PROMPT, ["sks shape", "zwx shape"])
    shape = tok("shape", add_special_tokens=False)["input_ids"]  # split into characters: not a world word
    at = [i for i in range(len(ids)) if ids[i : i + len(shape)] == shape]
    assert len(at) == 2
    assert set(range(at[0], at[0] + len(shape))) <= set(first)
    assert set(range(at[1], at[1] + len(shape))) <= set(second)
    assert not set(first) & set(second)


def test_token_positions_cover_every_vector_of_a_multi_vector_token(pipe):
    """An identifier with a 2-vector embedding (diffusers' advanced script's default) is encoded as "zwx zwx_1": its
    positions are both vectors', and the words after it keep theirs in the prompt the pipeline encodes."""
    tok = pipe.tokenizer
    pipe.load_textual_inversion(torch.randn(2, pipe.text_encoder.get_input_embeddings().weight.shape[1]), token="zwx",
                                text_encoder=pipe.text_encoder, tokenizer=tok)
    try:
        encoded = tok(pipe.maybe_convert_prompt(PROMPT, tok))["input_ids"]
        assert pipe.maybe_convert_prompt(PROMPT, tok) != PROMPT  # the pipeline does expand it
        first, second = token_positions(tok, PROMPT, ["sks shape", "zwx shape"])
        zwx = tok.convert_tokens_to_ids(["zwx", "zwx_1"])
        shape = tok("shape", add_special_tokens=False)["input_ids"]
        assert [encoded[i] for i in second] == zwx + shape
        assert [encoded[i] for i in first] == tok("sks", add_special_tokens=False)["input_ids"] + shape
    finally:
        pipe.unload_textual_inversion(["zwx", "zwx_1"], tokenizer=tok, text_encoder=pipe.text_encoder)
    assert "zwx_1" not in tok.get_vocab()


def test_nt_xent_matches_a_hand_computation():
    e = torch.tensor([[1.0, 0.0], [0.8, 0.6], [0.0, 1.0]])
    labels = torch.tensor([0, 0, 1])
    t = 0.5
    cos = lambda a, b: float(e[a] @ e[b] / (e[a].norm() * e[b].norm()))  # noqa: E731
    # pairs (0,1) and (1,0); negatives: 0 -> {2}, 1 -> {2}
    l01 = -math.log(math.exp(cos(0, 1) / t) / (math.exp(cos(0, 1) / t) + math.exp(cos(0, 2) / t)))
    l10 = -math.log(math.exp(cos(1, 0) / t) / (math.exp(cos(1, 0) / t) + math.exp(cos(1, 2) / t)))
    assert float(nt_xent(e, labels, t)) == pytest.approx((l01 + l10) / 2, rel=1e-6)
    # pulling the negative further away lowers the loss
    e2 = e.clone()
    e2[2] = torch.tensor([-0.5, 1.0])
    assert float(nt_xent(e2, labels, t)) < float(nt_xent(e, labels, t))


def test_orthogonal_merge_on_small_tensors():
    g = torch.Generator().manual_seed(0)
    a = LoraWeights(torch.randn(2, 5, generator=g), torch.randn(6, 2, generator=g), alpha=1.0)
    b = LoraWeights(torch.randn(3, 5, generator=g), torch.randn(6, 3, generator=g), alpha=3.0)
    # the plain sum is exact
    summed = merge_layer([(a, 0.5), (b, 2.0)], orthogonalize=False)
    assert torch.allclose(summed.delta(), 0.5 * a.delta() + 2.0 * b.delta(), atol=1e-5)
    merged = merge_layer([(a, 0.5), (b, 2.0)])
    assert merged.rank == 5 and merged.scale == 1.0
    ua, ub = merged.up[:, :2], merged.up[:, 2:]
    # orthogonal output subspaces, each part's own Gram matrix kept (in the scaled factors)
    assert torch.allclose(ua.T @ ub, torch.zeros(2, 3), atol=1e-5)
    sa, sb = a.up * 0.5 * a.scale, b.up * 2.0 * b.scale
    assert torch.allclose(ua.T @ ua, sa.T @ sa, atol=1e-4)
    assert torch.allclose(ub.T @ ub, sb.T @ sb, atol=1e-4)
    # each part keeps the original update's column norms (magnitude), only its direction changed
    part_a = ua @ merged.down[:2]
    assert torch.allclose(part_a.norm(dim=0), (0.5 * a.delta()).norm(dim=0), atol=1e-4)
    assert torch.allclose(merged.delta(), part_a + ub @ merged.down[2:], atol=1e-5)
    # conv layers keep their shapes
    c = LoraWeights(torch.randn(2, 4, 3, 3, generator=g), torch.randn(8, 2, 1, 1, generator=g), alpha=2.0)
    d = LoraWeights(torch.randn(2, 4, 3, 3, generator=g), torch.randn(8, 2, 1, 1, generator=g), alpha=2.0)
    conv = merge_layer([(c, 1.0), (d, 1.0)])
    assert conv.shape == c.shape and conv.down.shape == (4, 4, 3, 3)


def test_merge_refuses_adapters_of_different_base_models(pipe):
    a, b = random_adapter(pipe, seed=0), random_adapter(pipe, seed=1)
    a.meta.base_hash, b.meta.base_hash = "aaaa", "bbbb"
    with pytest.raises(ValueError, match="different base models"):
        merge([a, b])
    with pytest.raises(ValueError, match="at least one adapter"):
        merge([])


def test_default_attention_is_diffusers_attention(pipe):
    attn = pipe.unet.down_blocks[1].attentions[0].transformer_blocks[0].attn2
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 64, attn.to_q.in_features, generator=g)
    ctx = torch.randn(2, 77, attn.to_k.in_features, generator=g)
    with torch.no_grad():
        ref = AttnProcessor2_0()(attn, x, ctx)
        probs: list = []
        assert torch.allclose(default_attention(attn, x, ctx), ref, atol=1e-5)
        assert torch.allclose(default_attention(attn, x, ctx, probs_out=probs), ref, atol=1e-5)
        assert probs[0].shape == (2, attn.heads, 64, 77)
        # a boolean bias that allows only the first 5 keys equals attention over those keys alone
        allowed = torch.zeros(64, 77, dtype=torch.bool)
        allowed[:, :5] = True
        assert torch.allclose(default_attention(attn, x, ctx, bias=allowed[None, None]),
                              AttnProcessor2_0()(attn, x, ctx[:, :5]), atol=1e-5)


def _stack(pipe, leaf: str) -> LoraStack:
    return next(m for n, m in pipe.unet.named_modules() if isinstance(m, LoraStack) and n.endswith(leaf))


def test_static_gates_are_asked_once_per_layer_and_shape(pipe, concepts):
    """LoRA-Composer's gates depend on the layer and the input's shape only: the run asks the composer once and hands
    back the same list (what the layer then reuses without comparing); restricting to one concept, or another
    shape, is another entry. Composers whose gates change during a run are not cached."""
    from studio.composers.clora import CLoRA
    from studio.composers.gated import Gated

    def same(a, b):
        return torch.equal(a, b) if isinstance(a, torch.Tensor) else a == b

    with composing(pipe, "lora-composer", PROMPT, concepts) as run:
        stack = _stack(pipe, "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q")
        x = torch.randn(1, 64, stack.base.in_features)
        first = run.gates(stack, x)
        assert run.gates(stack, torch.randn_like(x)) is first
        assert any(isinstance(g, torch.Tensor) for g in first)
        assert all(same(a, b) for a, b in zip(first, run._gates_for(stack, x)))
        with run.restricted(0):
            only = run.gates(stack, x)
        assert only is not first and only[1] == 0.0 and only[0] == concepts[0].weight
        assert run.gates(stack, torch.randn(2, 64, stack.base.in_features)) is not first
    assert not CLoRA.static_gates and not Gated.static_gates


def test_region_gates_leave_the_outside_to_the_base_model(pipe, concepts):
    with composing(pipe, "lora-composer", PROMPT, concepts) as run:
        run.batch = 1
        stack = _stack(pipe, "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q")
        x = torch.randn(1, 64, stack.base.in_features)
        with torch.no_grad():
            out, base = stack(x), stack.base(x)
        left = run.region_mask(concepts[0].region, 8, 8).flatten() > 0
        right = run.region_mask(concepts[1].region, 8, 8).flatten() > 0
        assert left.sum() == 32 and right.sum() == 32 and not (left & right).any()
        # each half gets exactly its own adapter
        sks = (stack.scales[0]) * stack.ups[0](stack.downs[0](x))
        zwx = (stack.scales[1]) * stack.ups[1](stack.downs[1](x))
        assert torch.allclose(out[0, left], (base + sks)[0, left], atol=1e-5)
        assert torch.allclose(out[0, right], (base + zwx)[0, right], atol=1e-5)
        # a cross-attention key sees adapter k only on concept k's prompt tokens
        key = _stack(pipe, "down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k")
        assert key.text_input
        ctx, segments = run.composer.expanded_context(run, torch.randn(1, 77, key.base.in_features))
        assert [s[2] for s in segments] == [None, 0, 1] and ctx.shape[1] == 3 * 77
        run.segments = segments
        with torch.no_grad():
            k_out = key(ctx)
        run.segments = None
        plain = key.base(ctx)
        assert torch.allclose(k_out[:, :77], plain[:, :77], atol=1e-6)
        k_sks = key.scales[0] * key.ups[0](key.downs[0](ctx))
        assert torch.allclose(k_out[:, 77:154], (plain + k_sks)[:, 77:154], atol=1e-5)


def test_a_composition_leaves_the_pipeline_as_it_was(pipe, concepts):
    state = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    processors = {k: type(v) for k, v in pipe.unet.attn_processors.items()}
    for method in ("naive", "lora-composer", "clora", "orthogonal"):
        with composing(pipe, method, PROMPT, concepts):
            assert getattr(pipe, "_studio_attached", None) is not None
        assert getattr(pipe, "_studio_attached", None) is None
        assert {k: type(v) for k, v in pipe.unet.attn_processors.items()} == processors
        assert not pipe.unet._forward_pre_hooks
        after = pipe.unet.state_dict()
        assert after.keys() == state.keys() and all(torch.equal(after[k], state[k]) for k in state)


def test_every_method_samples_reproducibly(pipe, concepts):
    for method in ("naive", "lora-composer", "clora", "orthogonal"):
        first = compose(pipe, method, PROMPT, concepts, seed=3, num=2, steps=3)
        again = compose(pipe, method, PROMPT, concepts, seed=3, num=2, steps=3)
        assert len(first) == 2 and first[0].size == (64, 64)
        assert all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(first, again)), method
        assert not np.array_equal(np.asarray(first[0]), np.asarray(first[1])), method


def test_prompt_layers_work_once_per_prompt_not_per_step_and_give_the_same_images(pipe, concepts, monkeypatch):
    """The cross-attention keys' and values' low-rank update of each prompt tensor (the pipeline's, and each concept
    pass's own in CLoRA) is computed once, whatever the number of steps, and the images are those computed afresh."""
    import studio.plugin as plugin

    calls = []
    real = plugin.multi_lora_delta
    monkeypatch.setattr(plugin, "multi_lora_delta", lambda *a: calls.append(1) or real(*a))
    for method in ("naive", "lora-composer", "clora"):
        counts = []
        for steps in (3, 6):
            calls.clear()
            kept = compose(pipe, method, PROMPT, concepts, seed=2, steps=steps)[0]
            counts.append(len(calls))
        assert counts[0] == counts[1] > 0, (method, counts)
        monkeypatch.setattr(plugin.LoraStack, "keep_prompt", False)
        afresh = compose(pipe, method, PROMPT, concepts, seed=2, steps=6)[0]
        monkeypatch.setattr(plugin.LoraStack, "keep_prompt", True)
        assert np.array_equal(np.asarray(kept), np.asarray(afresh)), method
        if method != "clora":  # (CLoRA's latent update needs autograd, which inference mode does not have)
            with torch.inference_mode():  # tensors without a version counter: nothing kept, the same images
                inference = compose(pipe, method, PROMPT, concepts, seed=2, steps=6)[0]
            assert np.array_equal(np.asarray(inference), np.asarray(afresh)), method


def test_naive_composer_equals_plain_attach(pipe, concepts):
    from studio.plugin import attach, detach
    from studio.sampling import generate

    composed = compose(pipe, "naive", PROMPT, concepts, seed=0, num=1, steps=3)[0]
    attach(pipe, [c.adapter for c in concepts])
    plain = generate(pipe, [PROMPT], seed=0, steps=3)[0]
    detach(pipe)
    assert np.abs(np.asarray(composed, dtype=int) - np.asarray(plain, dtype=int)).max() <= 1


def test_timestep_windows_parse_and_refuse_bad_input():
    assert parse_timesteps("0:500") == (0.0, 500.0)
    assert parse_timesteps(":300") == (0.0, 300.0) and parse_timesteps("700:") == (700.0, 1000.0)
    assert parse_timesteps("all") is None and parse_timesteps(None) is None and parse_timesteps((100, 200)) == (100.0, 200.0)
    assert parse_timesteps("0:500,0.25") == (0.0, 500.0, 0.25) and parse_timesteps("0:500,0") == (0.0, 500.0)
    for bad in ("500:100", "0:2000", "late", "1:2:3", "-5:10", "0:500,1.5", "0:500,half", "0:500,0.5,1"):
        with pytest.raises(ValueError, match="accepted: START:END"):
            parse_timesteps(bad)


def test_a_timestep_window_turns_the_adapter_off_outside_it(pipe, concepts):
    """A concept with ``timesteps=(0, 500)`` gets its weight at t < 500 and 0 at t >= 500 (with ``0:500,0.3``, 0.3 of
    it), in the naive composer's cached gates too; a window holding every step is the plain composition, one holding
    none leaves the other adapter alone (the window is the UNet's: text-encoder layers encode the prompt once, so they
    act throughout)."""
    # outside the window: nothing of the weight 0.7, or the share 0.3 of it kept there; all of it inside
    for window, outside in (("0:500", 0.0), ("0:500,0.3", 0.21)):
        late = [concepts[0], Concept.load(concepts[1].adapter, name="zwx", timesteps=window, weight=0.7)]
        with composing(pipe, "naive", PROMPT, late) as run:
            stack = _stack(pipe, "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q")
            x = torch.randn(1, 64, stack.base.in_features)
            k = stack.names.index("zwx")
            run.timestep = torch.tensor(800)
            assert run.gates(stack, x)[k] == pytest.approx(outside) and run.gates(stack, x)[1 - k] == 1.0
            run.timestep = torch.tensor(499)
            assert run.gates(stack, x)[k] == 0.7
            run.timestep = 500
            assert run.gates(stack, x)[k] == pytest.approx(outside)
    plain = compose(pipe, "naive", PROMPT, concepts, seed=1, steps=3)[0]
    everywhere = [concepts[0], Concept.load(concepts[1].adapter, name="zwx", timesteps="0:1000")]
    assert np.array_equal(np.asarray(compose(pipe, "naive", PROMPT, everywhere, seed=1, steps=3)[0]), np.asarray(plain))
    unet_only = Adapter({k: v for k, v in concepts[1].adapter.modules.items() if k.startswith("unet.")}, concepts[1].adapter.meta)
    never = [concepts[0], Concept.load(unet_only, name="zwx", timesteps="0:1")]  # 3 steps: t >= 1 always
    alone = compose(pipe, "naive", PROMPT, concepts[:1], seed=1, steps=3)[0]
    off = np.asarray(compose(pipe, "naive", PROMPT, never, seed=1, steps=3)[0], dtype=int)
    assert np.abs(off - np.asarray(alone, dtype=int)).max() <= 1  # the same sum, the zero term kept: rounding only
    assert np.abs(np.asarray(alone, dtype=int) - np.asarray(plain, dtype=int)).max() > 10


@pytest.mark.parametrize("mixing", ["noise", "gates"])
def test_clora_latent_step_lowers_the_contrastive_loss(pipe, concepts, mixing):
    composer = CLoRA(step_size=0.0, update_fraction=1.0, mixing=mixing)  # first: the gradient's size only
    with composing(pipe, composer, PROMPT, concepts) as run:
        run.batch = 1
        pipe.scheduler.set_timesteps(10)
        t = pipe.scheduler.timesteps[3]
        latents = torch.randn(1, pipe.unet.config.in_channels, 16, 16, generator=torch.Generator().manual_seed(0))
        latents = latents * float(pipe.scheduler.sigmas[3])

        def loss_at(z):
            run.state["maps"] = []
            with torch.no_grad():
                if mixing == "noise":  # every concept's pass, its own prompt and adapter
                    _, maps, labels, _ = composer.lora_passes(run, run.model_input(z, t)[0], t)
                    return float(composer.loss(run, torch.cat(maps, 1), torch.cat(labels)))
                run.unet_call(z, t)
            return float(composer.loss(run, composer.token_maps(run)))

        before = loss_at(latents)
        x = run.model_input(latents, t)[0]
        torch.testing.assert_close(composer.edit_latents(run, 3, t, latents), latents)  # step 0: nothing moves
        run.state.pop("masks", None)  # so the next step's gradient is of the loss taken here, every adapter everywhere
        # a step in the linear regime: on the step-24,000 weights a step of 1e-3 of the input's norm already raises
        # the loss (2.1894 -> 2.1975 for the gates form), one of 1e-5 lowers it by about the first-order amount
        composer.step_size = 1e-5 * float(x.norm()) / run.state["grad_norms"][0]
        edited = composer.edit_latents(run, 3, t, latents)
        if mixing == "gates":  # the noise form makes its masks in the step's own passes
            masks = run.state["masks"]
            assert masks.shape == (1, 2, 8, 8) and set(masks.unique().tolist()) <= {0.0, 1.0}
            run.state.pop("masks")  # the loss before was taken with every adapter everywhere; compare alike
        assert run.state["losses"][0] == pytest.approx(before, rel=1e-4)
        # lower, and by about what the gradient predicts (first order: step x |grad|^2)
        assert before - loss_at(edited) > 0.25 * composer.step_size * run.state["grad_norms"][0] ** 2
    with pytest.raises(ValueError, match="concept 'sks': none of its words 'sks shape' is in the prompt"):
        with composing(pipe, "clora", "a red circle", concepts):
            pass


def test_clora_refinement_repeats_the_update_at_its_steps_only(pipe, concepts):
    assert CLoRA(refine_steps=(0.0, 0.2, 0.4)).refine_at(50) == {0, 10, 20}  # the paper's steps of 50
    assert CLoRA(refine_steps=(0.0, 0.2, 0.4)).refine_at(25) == {0, 5, 10}
    for bad in ({"refine_steps": (1.0,)}, {"refine_iterations": 0}):
        with pytest.raises(ValueError, match="refine_steps .*fractions of the schedule in \\[0, 1\\)"):
            CLoRA(**bad)
    composer = CLoRA(update_fraction=1.0, refine_steps=(0.0, 0.5), refine_iterations=3)
    with composing(pipe, composer, PROMPT, concepts) as run:
        run.batch = 1
        pipe.scheduler.set_timesteps(10)
        latents = torch.randn(1, pipe.unet.config.in_channels, 16, 16, generator=torch.Generator().manual_seed(0))
        t = pipe.scheduler.timesteps[3]
        latents = latents * float(pipe.scheduler.sigmas[3])
        x = run.model_input(latents, t)[0]
        composer.step_size = 1e-5 * float(x.norm())  # small steps: each one lowers the loss
        composer.edit_latents(run, 3, t, latents)  # not a refinement step: one update
        assert len(run.state["losses"]) == 1 and "refined" not in run.state
        run.state["losses"] = []
        refined = composer.edit_latents(run, 5, t, latents)  # 5 of 10: three refinement updates, then the step's own
        losses = run.state["losses"]
        assert run.state["refined"] == [5] and len(losses) == 4
        assert losses[0] > losses[1] > losses[2] > losses[3]  # each update taken where the previous one left
        moved = float((refined - latents).norm())
        run.state["losses"] = []
        composer.refine_target = losses[0] + 1.0  # already below the target: no refinement update, one loss taken
        once = composer.edit_latents(run, 5, t, latents)
        assert len(run.state["losses"]) == 1
        assert float((once - latents).norm()) < moved


def test_a_style_is_placed_nowhere_and_acts_in_every_pass_and_everywhere(pipe, concepts):
    """A style concept (``region="style"``) is not routed by a placing composer: clora runs no pass for it and its
    adapter acts in every pass (the base one too), lora-composer gives it no region and adds its words to each
    concept's region prompt; its timestep window still holds. Naive takes it as any concept."""
    adapter = random_adapter(pipe, seed=7, scale=0.3)
    adapter.meta.token = "zxy"
    style = Concept.load(adapter, name="zxy", region="style", words="zxy", timesteps="0:500")
    assert style.style and style.region is None
    styled = [concepts[0], style, concepts[1]]
    prompt = PROMPT + ", zxy"
    seen = []
    with composing(pipe, CLoRA(latent_update=False), prompt, styled) as run:
        assert [c.name for c in run.concepts] == ["sks", "zwx"] and [c.name for c in run.styles] == ["zxy"]
        assert run.state["lora_prompts"] == ["a sks shape on the left and a shape on the right, zxy",
                                             "a shape on the left and a zwx shape on the right, zxy"]
        te = next(m for m in pipe.text_encoder.modules() if isinstance(m, LoraStack))
        x = torch.randn(1, 77, te.base.in_features)
        assert te.names == ["sks", "zxy", "zwx"]
        assert run.gates(te, x) == [0.0, 1.0, 0.0]  # the base pass's prompt: the style only
        with run.restricted(1):  # concept zwx's own prompt: its adapter and the style
            assert run.gates(te, x) == [0.0, 1.0, 1.0]
        stack = _stack(pipe, "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q")
        hook = stack.register_forward_pre_hook(lambda m, a: seen.append(
            (run.extra_unet_call, [k for k, g in enumerate(run.gates(stack, a[0])) if not isinstance(g, float) or g])))
        try:
            pipe(prompt=[prompt], guidance_scale=5.0, **run.pipe_kwargs(0, 1, 2))
        finally:
            hook.remove()
        assert run.state["masks"].shape == (1, 2, 8, 8)  # one mask per placed concept
        run.timestep = torch.tensor(800)  # outside the style's window: off in the UNet
        with run.restricted(0):
            assert run.gates(stack, torch.randn(1, 64, stack.base.in_features)) == [1.0, 0.0, 0.0]
    # two steps, each: the base pass, then one pass per placed concept; the style (adapter 1) acts in all, but only
    # at timesteps below 500 (the second step's)
    assert seen == [(False, []), (True, [0]), (True, [2]), (False, [1]), (True, [0, 1]), (True, [1, 2])]
    with composing(pipe, "lora-composer", prompt, styled) as run:
        assert run.state["region_prompts"] == ["a sks shape on the left, zxy", "a zwx shape on the right, zxy"]
        stack = _stack(pipe, "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q")
        gates = run.gates(stack, torch.randn(1, 64, stack.base.in_features))
        assert isinstance(gates[0], torch.Tensor) and gates[1] == 1.0  # the subjects by region, the style everywhere
    with composing(pipe, "naive", prompt, styled) as run:
        assert len(run.concepts) == 3 and run.styles == []
    with pytest.raises(ValueError, match="'zxy' is a style: a style acts everywhere, on every concept; give it no region"):
        Concept.load(adapter, name="zxy", region="left", style=True)
    with pytest.raises(ValueError, match="clora places concepts and every concept given is a style"):
        with composing(pipe, "clora", "a shape, zxy", [style]):
            pass
    with pytest.raises(ValueError, match="accepted: left, right.*; or style"):
        Concept.load(adapter, region="middle-ish")


def test_lora_composer_needs_regions_and_reinitialises_inside_them(pipe, concepts):
    no_region = [Concept(c.adapter, c.name, c.prompt, c.words, None) for c in concepts]
    with pytest.raises(ValueError, match="needs a region for every concept; none for sks, zwx"):
        with composing(pipe, "lora-composer", PROMPT, no_region):
            pass
    with composing(pipe, "lora-composer", PROMPT, concepts) as run:
        run.batch = 1
        pipe.scheduler.set_timesteps(10)
        latents = torch.randn(1, pipe.unet.config.in_channels, 16, 16, generator=torch.Generator().manual_seed(1))
        out = run.composer.edit_latents(run, 0, pipe.scheduler.timesteps[0], latents)
    assert out.mean().item() == pytest.approx(latents.mean().item(), abs=1e-5)
    assert out.std().item() == pytest.approx(latents.std().item(), rel=1e-4)
    # inside the left box (columns 0-7) is an affine image of some 16x8 window of the start latents
    inside = out[0, :, :, :8].flatten()
    best = max(float(torch.corrcoef(torch.stack([inside, latents[0, :, :, x:x + 8].flatten()]))[0, 1]) for x in range(9))
    assert best == pytest.approx(1.0, abs=1e-4)


@pytest.mark.parametrize("negative", [None, "", "a red shape"])
def test_lora_composer_boxes_take_the_negative_prompt_and_for_none_the_encoded_empty_prompt(pipe, concepts, negative):
    """One concept boxed over the whole image, its region prompt the global prompt: with a negative prompt, or with
    ``negative="pipeline"``, the box's attention is the pipeline's own and the images the naive sum's. With none, the
    embedded pipeline feeds zeros as its negative half, and the official form gives the boxes the encoded "" instead."""
    whole = [Concept(concepts[0].adapter, "sks", "a sks shape", "sks shape", (0.0, 0.0, 1.0, 1.0))]
    prompt = "a sks shape on the left"

    def image(method):
        return np.asarray(compose(pipe, method, prompt, whole, seed=0, num=1, steps=3, negative_prompt=negative)[0], dtype=int)

    naive = image("naive")
    pipeline = image(get_composer("lora-composer", reinit=False, negative="pipeline"))
    official = image(get_composer("lora-composer", reinit=False))
    assert np.abs(pipeline - naive).max() <= 1
    if negative is not None:  # "" too: the pipeline encodes it, as the boxes do
        assert np.abs(official - naive).max() <= 1
    else:
        assert np.abs(official - naive).max() > 10
    with pytest.raises(ValueError, match="negative 'zeros': choose prompt or pipeline"):
        get_composer("lora-composer", negative="zeros")


def test_reinitialise_copies_the_window_where_the_map_peaks_into_the_box():
    from studio.composers.lora_composer import reinitialise

    latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    peak = torch.zeros(2, 4, 4)
    peak[:, 2:, 2:] = 1  # on a 4x4 grid: the bottom-right quarter, rows and columns 4-7 of the latents
    out = reinitialise(latents, [peak, None], [(0.0, 0.0, 0.5, 0.5), (0.5, 0.0, 1.0, 0.5)])
    copied = latents.clone()
    copied[:, :, :4, :4] = latents[:, :, 4:, 4:]  # the second concept has no map: its box keeps its latents
    mean, std = latents.mean(dim=(1, 2, 3), keepdim=True), latents.std(dim=(1, 2, 3), keepdim=True)
    expected = (copied - copied.mean(dim=(1, 2, 3), keepdim=True)) / copied.std(dim=(1, 2, 3), keepdim=True) * std + mean
    assert torch.allclose(out, expected, atol=1e-5)
    assert torch.allclose(out.mean(dim=(1, 2, 3)), latents.mean(dim=(1, 2, 3)), atol=1e-5)


def test_clora_reinit_moves_a_window_of_the_start_latents_into_each_region(pipe, concepts):
    with pytest.raises(ValueError, match="reinit reads each concept's own pass: it needs mixing='noise'"):
        CLoRA(reinit=True, mixing="gates")
    latents = torch.randn(1, pipe.unet.config.in_channels, 16, 16, generator=torch.Generator().manual_seed(1))
    outs = {}
    for reinit in (False, True):
        with composing(pipe, CLoRA(reinit=reinit, latent_update=False), PROMPT, concepts) as run:
            run.batch = 1
            pipe.scheduler.set_timesteps(10)
            outs[reinit] = run.composer.edit_latents(run, 0, pipe.scheduler.timesteps[0], latents)
    assert torch.equal(outs[False], latents)  # off: untouched
    out = outs[True]
    assert out.std().item() == pytest.approx(latents.std().item(), rel=1e-4)
    shifts = []
    for x0 in (0, 8):  # each half (the concepts' regions: left, right) is an affine image of some 16x8 window
        inside = out[0, :, :, x0:x0 + 8].flatten()
        corr = [float(torch.corrcoef(torch.stack([inside, latents[0, :, :, x:x + 8].flatten()]))[0, 1]) for x in range(9)]
        assert max(corr) == pytest.approx(1.0, abs=1e-4)
        shifts.append(corr.index(max(corr)) - x0)
    assert any(shifts)  # at least one window came from elsewhere than its own box


def test_token_gates_on_small_tensors(pipe, concepts):
    from studio.composers.gated import Gated

    composer = Gated(sharpness=2.0)
    with composing(pipe, composer, PROMPT, concepts) as run:
        run.timestep = torch.tensor(999)
        stack = _stack(pipe, "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q")
        x = torch.randn(1, 64, stack.base.in_features, generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            r0 = (stack.scales[0] * stack.ups[0](stack.downs[0](x))).norm(dim=-1, keepdim=True)
            r1 = (stack.scales[1] * stack.ups[1](stack.downs[1](x))).norm(dim=-1, keepdim=True)
            top = torch.maximum(r0, r1)
            g0, g1 = run.gates(stack, x)
        assert torch.allclose(g0, (r0 / top) ** 2, atol=1e-6) and torch.allclose(g1, (r1 / top) ** 2, atol=1e-6)
        assert torch.all(torch.maximum(g0, g1) == 1)  # the stronger adapter keeps its full weight on each token
        assert composer.logits.shape == (2, len(run.state["layer"]), 4)
        assert composer.bucket(run) == 3
        run.timestep = torch.tensor(10)
        assert composer.bucket(run) == 0


def test_untrained_gates_without_token_gates_are_the_naive_sum(pipe, concepts):
    from studio.composers.gated import Gated

    naive = compose(pipe, "naive", PROMPT, concepts, seed=0, steps=3)[0]
    gated = compose(pipe, Gated(token_gates=False), PROMPT, concepts, seed=0, steps=3)[0]
    assert np.abs(np.asarray(naive, dtype=int) - np.asarray(gated, dtype=int)).max() <= 1


def test_gate_training_learns_from_the_concepts_images(pipe, concepts, tmp_path):
    from PIL import Image
    from studio.composers.gated import Gated

    folders = []
    for k, colour in enumerate(["blue", "red"]):
        folder = tmp_path / f"c{k}"
        folder.mkdir()
        for i in range(2):
            Image.new("RGB", (64, 64), colour).save(folder / f"{i}.png")
        folders.append(folder)
    composer = Gated(token_gates=False, buckets=2)
    held = lambda: np.mean(composer.fit(pipe, concepts, folders, steps=20, lr=0.0, seed=7, progress=False))  # noqa: E731
    before = held()  # the same 20 noised examples each time; lr 0 leaves the gates as they are
    losses = composer.fit(pipe, concepts, folders, steps=30, lr=0.1, progress=False)
    assert len(losses) == 30 and not composer.logits.requires_grad
    assert composer.logits.abs().max() > 0.05  # the gates moved
    # the strong random adapters disturb plain-colour images: training closes gates on average
    assert float(composer.logits.mean()) < 0
    assert held() < before
    with pytest.raises(ValueError, match="one image folder per concept: 2 concepts, 1 folders"):
        composer.fit(pipe, concepts, folders[:1], steps=1)
    assert pipe.unet.state_dict().keys() == StableDiffusionXLPipeline.from_pretrained(
        str(EMBEDDED_MODEL), local_files_only=True).unet.state_dict().keys()


def test_regions_outside_the_image_are_refused_and_overlaps_shared(pipe, concepts):
    for bad in ("-0.1,0,0.5,1", "0.5,0,1.2,1"):
        with pytest.raises(ValueError, match="fractions of the image"):
            parse_region(bad)
    overlapping = [Concept(c.adapter, c.name, c.prompt, c.words, box)
                   for c, box in zip(concepts, [(0.0, 0.0, 0.75, 1.0), (0.25, 0.0, 1.0, 1.0)])]
    with composing(pipe, "lora-composer", PROMPT, overlapping) as run:
        stack = _stack(pipe, "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q")
        x = torch.randn(1, 64, stack.base.in_features)
        g0, g1 = run.gates(stack, x)
        g0, g1 = g0.reshape(8, 8), g1.reshape(8, 8)
        # columns 0-1: only the first; 2-5: both at one half; 6-7: only the second
        assert torch.equal(g0[:, 0], torch.ones(8)) and torch.equal(g1[:, 0], torch.zeros(8))
        assert torch.equal(g0[:, 3], torch.full((8,), 0.5)) and torch.equal(g1[:, 3], torch.full((8,), 0.5))
        assert torch.equal(g0[:, 7], torch.zeros(8)) and torch.equal(g1[:, 7], torch.ones(8))


def test_clora_masks_on_a_hand_built_case():
    class FakeRun:
        concepts = [SimpleNamespace(region=None)] * 2
        state = {"tokens": [[3, 4], [8]]}

    maps = torch.tensor([[[[1.0, 0.0], [0.0, 0.0]],    # concept 0, token 3
                          [[0.6, 0.2], [0.0, 0.6]],    # concept 0, token 4: mean with token 3 = [[.8, .1], [0, .3]]
                          [[0.3, 0.9], [0.5, 1.0]]]])  # concept 1: 0.5 and up (0.3 < 0.4 * 1.0)
    masks = CLoRA(threshold=0.4).masks(FakeRun(), maps)
    # concept 0 (min 0, max 0.8): only the top-left passes 0.32; concept 1 (min 0.3, max 1.0): above 0.3 + 0.28
    assert masks.tolist() == [[[[1.0, 0.0], [0.0, 0.0]], [[0.0, 1.0], [0.0, 1.0]]]]


def test_clora_masks_keep_to_the_concepts_regions():
    class FakeRun:
        concepts = [SimpleNamespace(region=(0.0, 0.0, 0.5, 1.0)), SimpleNamespace(region=(0.5, 0.0, 1.0, 1.0))]
        region_mask = staticmethod(Run._region_mask)

        def __init__(self):
            self.state = {"tokens": [[3], [8]]}  # a run's own (what it builds is kept there for the run)

    maps = torch.tensor([[[[0.50, 0.52, 0.9, 0.9], [0.51, 0.50, 0.9, 0.9]],    # concept 0: nearly flat on the left
                          [[1.0, 0.0, 0.2, 0.8], [0.0, 0.0, 0.1, 0.6]]]])        # concept 1
    # without regions: each map's range over the image; concept 0 lands on the right, concept 1 in both halves
    assert CLoRA(threshold=0.4, regions=False).masks(FakeRun(), maps).tolist() == [
        [[[0.0, 0.0, 1.0, 1.0], [0.0, 0.0, 1.0, 1.0]], [[1.0, 0.0, 0.0, 1.0], [0.0, 0.0, 0.0, 1.0]]]]
    # with them: the range inside each region (0.50-0.52: above 0.508; 0.1-0.8: above 0.38), nothing outside
    assert CLoRA(threshold=0.4).masks(FakeRun(), maps).tolist() == [
        [[[0.0, 1.0, 0.0, 0.0], [1.0, 0.0, 0.0, 0.0]], [[0.0, 0.0, 0.0, 1.0], [0.0, 0.0, 0.0, 1.0]]]]
    run = FakeRun()
    run.concepts = [run.concepts[0], SimpleNamespace(region=None)]  # a concept without a region: the whole image
    assert CLoRA().region_masks(run, 2, 4).tolist() == [[[True, True, False, False]] * 2, [[True] * 4] * 2]
    run.concepts = [SimpleNamespace(region=None)] * 2
    assert CLoRA().region_masks(run, 2, 4) is None and CLoRA(regions=False).region_masks(FakeRun(), 2, 4) is None


def test_clora_exclusive_masks_keep_a_pixel_for_the_concept_whose_region_holds_it():
    concept = torch.tensor([[[[1.0, 0.8, 0.0, 0.0]], [[0.0, 5.0, 0.0, 1.0]]]])  # concept 1's map peaks at pixel 1
    regions = torch.tensor([[[True, True, True, False]], [[False, False, True, True]]])  # outside its region
    assert CLoRA(threshold=0.4, exclusive=True).threshold_masks(concept, regions).tolist() == [
        [[[1.0, 1.0, 0.0, 0.0]], [[0.0, 0.0, 0.0, 1.0]]]]


def test_clora_exclusive_masks_give_an_overlapping_pixel_to_the_higher_map():
    concept = torch.tensor([[[[1.0, 0.8, 0.0]], [[0.0, 0.9, 1.0]]]])  # (B, K, h, w): both pass 0.4 in the middle
    assert CLoRA(threshold=0.4).threshold_masks(concept).tolist() == [[[[1.0, 1.0, 0.0]], [[0.0, 1.0, 1.0]]]]
    assert CLoRA(threshold=0.4, exclusive=True).threshold_masks(concept).tolist() == [[[[1.0, 0.0, 0.0]],
                                                                                       [[0.0, 1.0, 1.0]]]]
    flat = torch.zeros(1, 2, 1, 3)  # a flat map is nowhere: no mask, exclusive or not
    assert CLoRA(exclusive=True).threshold_masks(flat).sum() == 0


def test_concepts_sharing_a_name_are_numbered(pipe, concepts):
    twins = [Concept(c.adapter, "sks", c.prompt, c.words, c.region) for c in concepts]
    with composing(pipe, "naive", PROMPT, twins) as run:
        assert run.index == {"sks": 0, "sks-2": 1}
        assert pipe._studio_attached.names == ["sks", "sks-2"]


def test_lora_composer_options_are_checked():
    from studio.composers.lora_composer import LoRAComposer

    with pytest.raises(ValueError, match="replace_ratio 2: give a number from 0 to 1"):
        LoRAComposer(replace_ratio=2)
    with pytest.raises(ValueError, match="scope 'some': choose all or cross"):
        LoRAComposer(scope="some")


def test_lora_composer_with_part_of_the_global_prompt_samples(pipe, concepts):
    from studio.composers.lora_composer import LoRAComposer

    full = compose(pipe, LoRAComposer(reinit=False), PROMPT, concepts, seed=0, steps=3)[0]
    mixed = compose(pipe, LoRAComposer(reinit=False, replace_ratio=0.5), PROMPT, concepts, seed=0, steps=3)[0]
    assert full.size == mixed.size == (64, 64)
    assert not np.array_equal(np.asarray(full), np.asarray(mixed))


def test_lora_composer_region_prompts_keep_the_clause_that_names_the_concept(concepts):
    from studio.composers.lora_composer import LoRAComposer

    sks, zwx = concepts
    assert LoRAComposer().region_prompt(PROMPT, sks) == "a sks shape on the left"
    assert LoRAComposer().region_prompt(PROMPT, zwx) == "a zwx shape on the right"
    assert LoRAComposer().region_prompt("a sks shape in the center, zwx", zwx) == "zwx"
    assert LoRAComposer().region_prompt("a red circle", sks) == "a sks shape"  # not named: its own prompt
    assert LoRAComposer(positional_prompts=False).region_prompt(PROMPT, sks) == "a sks shape"


def test_clora_clause_words_are_the_content_words_of_the_clause_naming_the_concept(concepts):
    from types import SimpleNamespace

    from studio.composers.clora import concept_words

    run = SimpleNamespace(prompt=PROMPT, concepts=concepts)
    assert concept_words(run, clause_words=False) == ["sks shape", "zwx shape"]
    assert concept_words(run, clause_words=True) == ["sks shape left", "zwx shape right"]
    run = SimpleNamespace(prompt="a red circle and a sks shape in the center", concepts=concepts)
    assert concept_words(run, clause_words=True) == ["sks shape center", "zwx shape"]  # zwx unnamed: its own words


def test_clora_mixes_each_loras_noise_prediction_inside_its_mask():
    base = torch.zeros(1, 2, 4, 4)
    preds = [torch.ones(1, 2, 4, 4), torch.full((1, 2, 4, 4), 3.0)]
    masks = torch.zeros(1, 2, 2, 2)  # on a 2x2 grid, upsampled (nearest) to the 4x4 latents
    masks[0, 0, :, 0] = 1  # concept 0: the left column
    masks[0, 1, 0, :] = 1  # concept 1: the top row (overlaps concept 0 at the top left)
    out = CLoRA.mix(base, preds, masks)[0, 0]
    assert out[:2, :2].unique().tolist() == [2.0]  # both: each at 1/2
    assert out[:2, 2:].unique().tolist() == [3.0]  # concept 1 alone
    assert out[2:, :2].unique().tolist() == [1.0]  # concept 0 alone
    assert out[2:, 2:].unique().tolist() == [0.0]  # neither: the base model


def test_clora_pass_prompts_keep_only_their_own_identifier():
    from types import SimpleNamespace

    from studio.composers.clora import lora_prompt

    pair = [SimpleNamespace(words="sks shape"), SimpleNamespace(words="zwx shape")]
    assert lora_prompt(PROMPT, pair, 0) == "a sks shape on the left and a shape on the right"
    assert lora_prompt(PROMPT, pair, 1) == "a shape on the left and a zwx shape on the right"
    styled = [SimpleNamespace(words="sks shape"), SimpleNamespace(words="zxy")]
    assert lora_prompt("a sks shape in the center, zxy", styled, 0) == "a sks shape in the center"
    assert lora_prompt("a sks shape in the center, zxy", styled, 1) == "a shape in the center, zxy"


def test_clora_passes_run_one_adapter_each_and_the_pipeline_pass_none(pipe, concepts):
    seen = []  # (extra call?, which concepts' adapters act) at one UNet layer, per call
    with composing(pipe, CLoRA(latent_update=False), PROMPT, concepts) as run:
        assert run.state["lora_prompts"] == ["a sks shape on the left and a shape on the right",
                                             "a shape on the left and a zwx shape on the right"]
        te = next(m for m in pipe.text_encoder.modules() if isinstance(m, LoraStack))
        x = torch.randn(1, 77, te.base.in_features)
        assert run.gates(te, x) == [0.0, 0.0]  # the pipeline encodes the global prompt for the base pass: no adapter
        with run.restricted(1):  # a concept's own prompt: its adapter only
            assert run.gates(te, x) == [0.0, concepts[1].weight]
        stack = _stack(pipe, "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q")
        hook = stack.register_forward_pre_hook(lambda m, a: seen.append(
            (run.extra_unet_call, [k for k, g in enumerate(run.gates(stack, a[0])) if not isinstance(g, float) or g])))
        try:
            image = pipe(prompt=[PROMPT], guidance_scale=5.0, **run.pipe_kwargs(0, 1, 2)).images[0]
        finally:
            hook.remove()
        masks = run.state["masks"]
        assert masks.shape == (1, 2, 8, 8)
        assert masks[0, 0, :, 4:].sum() == 0 and masks[0, 1, :, :4].sum() == 0  # each inside its region: left, right
        assert masks[0, 0].sum() > 0 and masks[0, 1].sum() > 0
    assert image.size == (64, 64)
    # per step: the base, then one pass per concept on both halves (one call each)
    assert seen == [(False, []), (True, [0]), (True, [1])] * 2


def _sample(output):
    return output[0] if isinstance(output, tuple) else output.sample


def test_clora_guided_mixes_both_guidance_halves_from_the_concepts_passes(pipe, concepts):
    # the official form: each concept's pass on the negative half too (the pipeline's negative conditioning, its
    # adapter only), mixed by the same masks; the prompt half as before
    calls, final = [], []
    holder = {}

    def raw(module, args, kwargs, output):  # registered first: every UNet call's own output
        run = holder["run"]
        calls.append((run.extra_unet_call, run.only, args[0].clone(), kwargs["encoder_hidden_states"].clone(),
                       _sample(output).clone()))

    first = pipe.unet.register_forward_hook(raw, with_kwargs=True)
    try:
        with composing(pipe, CLoRA(latent_update=False, guided=True), PROMPT, concepts) as run:
            holder["run"] = run
            last = pipe.unet.register_forward_hook(lambda m, a, k, out: final.append((run.extra_unet_call, _sample(out).clone())),
                                                   with_kwargs=True)
            try:
                pipe(prompt=[PROMPT], guidance_scale=5.0, **run.pipe_kwargs(0, 1, 1))
            finally:
                last.remove()
            masks = run.state["masks"]
            # the rows of one call are independent: concept 0's prompt row as a call of its own gives the same
            alone = run.unet_call(calls[1][2][1:], pipe.scheduler.timesteps[0], scaled=True,
                                  cond=run.state["lora_cond"][0], only=0)
            calls.pop()
    finally:
        first.remove()
    (_, _, x, cond, base), (_, o0, x0, c0, out0), (_, o1, x1, c1, out1) = calls
    assert [c[0] for c in calls] == [False, True, True] and [o0, o1] == [0, 1]
    for k, (xk, ck) in enumerate(((x0, c0), (x1, c1))):  # each concept's call: the pipeline's negative row of input and
        assert torch.equal(xk, x) and torch.equal(ck[:1], cond[:1])  # conditioning, then the prompt row with its own
        torch.testing.assert_close(ck[1:], run.state["lora_cond"][k]["embeds"])  # prompt
    (n0, p0), (n1, p1) = (out0[:1], out0[1:]), (out1[:1], out1[1:])
    torch.testing.assert_close(alone, p0, atol=1e-5 * float(p0.abs().max()), rtol=0)
    mixed = [out for extra, out in final if not extra][0]
    torch.testing.assert_close(mixed[:1], CLoRA.mix(base[:1], [n0, n1], masks))
    torch.testing.assert_close(mixed[1:], CLoRA.mix(base[1:], [p0, p1], masks))
    assert not torch.allclose(mixed[:1], base[:1])  # the masks are set somewhere: the negative half did change


def test_clora_layout_masks_come_from_the_base_pass_maps_of_the_placing_words(pipe, concepts, monkeypatch):
    from studio.composers.base import token_positions

    composer = CLoRA(latent_update=False, layout=True)
    monkeypatch.setattr(composer, "pass_masks", lambda *a: pytest.fail("the concepts' passes gave the masks"))
    read = []
    real = composer.concept_maps
    monkeypatch.setattr(composer, "concept_maps", lambda maps, labels, n: read.append((maps.shape, labels.tolist()))
                        or real(maps, labels, n))
    with composing(pipe, composer, PROMPT, concepts) as run:
        left, right = token_positions(pipe.tokenizer, PROMPT, ["left", "right"])
        assert run.state["layout_tokens"] == [left, right]  # "a sks shape on the left": the word that places it
        pipe(prompt=[PROMPT], guidance_scale=5.0, **run.pipe_kwargs(0, 1, 2))
        masks = run.state["masks"]
        assert masks.shape == (1, 2, 8, 8)
        assert masks[0, 0, :, 4:].sum() == 0 and masks[0, 1, :, :4].sum() == 0  # each inside its region
    labels = [0] * len(left) + [1] * len(right)
    assert read == [((1, len(labels), 8, 8), labels)] * 2  # per step: the base pass's maps of those words
    with pytest.raises(ValueError, match="layout masks come from the base pass"):
        CLoRA(layout=True, mixing="gates")


def test_klora_selects_one_adapter_per_layer_and_step_by_hand(pipe, concepts):
    """K-LoRA on random adapters: per layer, S = the k largest |scale U D| summed, gamma = the mean over layers of
    sum|dW_c| / sum|dW_s|; content acts where S_c / gamma > S_s (1.5 p + 0.5), p = 1 - t/1000, else style."""
    from studio.composers.klora import KLoRA

    k = 5
    with composing(pipe, KLoRA(k=k), PROMPT, concepts) as run:
        stacks = [m for m in pipe.unet.modules() if isinstance(m, LoraStack) and m.router is run]
        deltas = []
        for s in stacks:
            pos = [s.names.index(c) for c in ("sks", "zwx")]
            deltas.append([s.scales[i] * s.ups[i].weight.float() @ s.downs[i].weight.float() for i in pos])
        gamma = sum(float(c.abs().sum() / s_.abs().sum()) for c, s_ in deltas) / len(deltas)
        assert math.isclose(run.state["gamma"], gamma, rel_tol=1e-4)
        flips, text_layers = 0, 0
        for stack, (dc, ds) in zip(stacks, deltas):
            s_c = float(dc.abs().flatten().sort(descending=True).values[:k].sum())
            s_s = float(ds.abs().flatten().sort(descending=True).values[:k].sum())
            picks = []
            for t, p in ((999, 0.001), (500, 0.5), (0, 1.0)):
                run.timestep = torch.tensor(t)
                want = 0 if s_c / gamma > s_s * (1.5 * p + 0.5) else 1
                x = torch.randn(1, 4, stack.base.in_features)
                gates = run.gates(stack, x)
                assert gates == ([1.0, 0.0] if want == 0 else [0.0, 1.0]), (stack.path, t)
                picks.append(want)
            flips += picks[0] != picks[-1]
            text_layers += stack.text_input
        assert flips > 0 and text_layers > 0  # the style adapter takes layers over as sampling goes on; keys/values too


def test_klora_takes_two_adapters_and_samples_reproducibly(pipe, concepts):
    from studio.composers.klora import KLoRA, top_k_mass

    assert top_k_mass(torch.tensor([[1.0, -4.0], [2.0, 0.5]]), 2) == 6.0 and top_k_mass(torch.tensor([3.0]), 64) == 3.0
    with pytest.raises(ValueError, match="two adapters"):
        compose(pipe, "klora", PROMPT, concepts[:1], steps=2)
    with pytest.raises(ValueError, match="k must be at least 1"):
        KLoRA(k=0)
    first = compose(pipe, "klora", PROMPT, concepts, seed=3, num=2, steps=3)
    again = compose(pipe, "klora", PROMPT, concepts, seed=3, num=2, steps=3)
    naive = compose(pipe, "naive", PROMPT, concepts, seed=3, num=2, steps=3)
    assert all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(first, again))
    assert not np.array_equal(np.asarray(first[0]), np.asarray(naive[0]))
