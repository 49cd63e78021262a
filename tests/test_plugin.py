"""studio.plugin on a stock StableDiffusionXLPipeline: same images as diffusers' own LoRA loader,
clean detach, exact unfuse, weights, and refusals."""

import numpy as np
import pytest
import torch
from conftest import random_adapter
from diffusers import StableDiffusionXLPipeline

from studio.adapters import save_adapter
from studio.families import EMBEDDED_MODEL
from studio.plugin import LoraStack, attach, base_model_hash, detach, fuse, set_weights, unfuse

PROMPT = "a red circle on the left on a white background"


def fresh():
    pipe = StableDiffusionXLPipeline.from_pretrained(str(EMBEDDED_MODEL), local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def sample(pipe, steps: int = 4) -> np.ndarray:
    return pipe(PROMPT, num_inference_steps=steps, generator=torch.Generator().manual_seed(0), output_type="np").images


@pytest.fixture(scope="module")
def pipe():
    return fresh()


@pytest.fixture(scope="module")
def files(pipe, tmp_path_factory):
    d = tmp_path_factory.mktemp("adapters")
    return [save_adapter(random_adapter(pipe, seed=s, scale=0.3), d / f"a{s}.safetensors") for s in (0, 1)]


@pytest.fixture(scope="module")
def base_images(pipe):
    return sample(pipe)


def test_same_images_as_stock_load_lora_weights(pipe, files, base_images):
    stock = fresh()
    stock.load_lora_weights(str(files[0]), adapter_name="a0")
    stock.load_lora_weights(str(files[1]), adapter_name="a1")
    stock.set_adapters(["a0", "a1"], adapter_weights=[0.8, -0.5])
    theirs = sample(stock)
    handle = attach(pipe, files, weights=[0.8, -0.5])
    try:
        ours = sample(pipe)  # the cross-attention keys' and values' updates kept from the first step on
    finally:
        detach(pipe)
    prompt_layers = {name for name, stack in handle.stacks.items() if stack.text_input}
    assert prompt_layers and prompt_layers == {name for name in handle.stacks
                                               if name.startswith("unet.") and name.endswith(("attn2.to_k", "attn2.to_v"))}
    assert np.abs(ours - base_images).max() > 0.05  # the adapters do change the image
    np.testing.assert_allclose(ours, theirs, atol=2e-4)


def test_sampling_under_inference_mode_gives_the_same_images(pipe, files):
    """Inference-mode tensors keep no version counter: the layers then keep nothing derived from them (the prompt's
    update, a merged weight) and still give the images of ``no_grad`` sampling (to rounding: there the layers run
    merged copies of their weights, here the low-rank form)."""
    handle = attach(pipe, files, weights=[0.8, -0.5])
    try:
        plain = sample(pipe, steps=3)
        assert any(s._plan is not None and s._plan.merged is not None for s in handle.stacks.values())
        with torch.inference_mode():
            inference = sample(pipe, steps=3)
    finally:
        detach(pipe)
    np.testing.assert_allclose(inference, plain, atol=2e-4)


def test_a_prompt_tensor_passed_again_follows_the_adapters_taken_out(pipe, files):
    """Without guidance a pipeline hands the UNet the caller's own prompt tensor, so one tensor can come back across
    calls; what a prompt layer kept for it goes when an adapter is taken out."""
    from studio.plugin import remove

    def run(embeds, pooled):
        return pipe(prompt_embeds=embeds, pooled_prompt_embeds=pooled, guidance_scale=1.0, num_inference_steps=2,
                    generator=torch.Generator().manual_seed(0), output_type="np").images

    with torch.no_grad():
        embeds, _, pooled, _ = pipe.encode_prompt(PROMPT, do_classifier_free_guidance=False)
    attach(pipe, files, weights=[0.8, -0.5])
    try:
        both = run(embeds, pooled)
        remove(pipe, [files[0].stem])
        after = run(embeds, pooled)
    finally:
        detach(pipe)
    attach(pipe, files[1:], weights=[-0.5])
    try:
        alone = run(embeds, pooled)
    finally:
        detach(pipe)
    assert np.abs(both - alone).max() > 0.01  # the adapter taken out did change the image
    np.testing.assert_array_equal(after, alone)


BLOCKS = {"text_encoder": 0.5, "unet": {"down": {"block_2": [0.0, 1.5]}, "mid": 0.0, "up": {"block_0": [1.0, 0.2, -1.0], "block_1": 0.7}}}


def test_block_weights_give_the_images_of_stock_set_adapters(pipe, files, base_images):
    """Block weights in diffusers' set_adapters form: the same images as the stock loader given the same dicts."""
    stock = fresh()
    stock.load_lora_weights(str(files[0]), adapter_name="a0")
    stock.load_lora_weights(str(files[1]), adapter_name="a1")
    second = {"unet": {"up": 0.0}, "text_encoder_2": -0.5}
    stock.set_adapters(["a0", "a1"], adapter_weights=[BLOCKS, second])
    theirs = sample(stock)
    attach(pipe, files, weights=[BLOCKS, second])
    try:
        ours = sample(pipe)
        stacks = pipe._studio_attached.stacks
        weight = {k: dict(zip(st.names, st.weights)) for k, st in stacks.items()}
    finally:
        detach(pipe)
    assert np.abs(ours - base_images).max() > 0.05
    np.testing.assert_allclose(ours, theirs, atol=2e-4)
    # by hand, layer by layer
    up01 = next(k for k in weight if k.startswith("unet.up_blocks.0.attentions.1."))
    down20 = next(k for k in weight if k.startswith("unet.down_blocks.2.attentions.0."))
    down21 = next(k for k in weight if k.startswith("unet.down_blocks.2.attentions.1."))
    down1 = next(k for k in weight if k.startswith("unet.down_blocks.1."))
    mid = next(k for k in weight if k.startswith("unet.mid_block."))
    te1 = next(k for k in weight if k.startswith("text_encoder."))
    te2 = next(k for k in weight if k.startswith("text_encoder_2."))
    assert [weight[k]["a0"] for k in (up01, down20, down21, down1, mid, te1, te2)] == [0.2, 0.0, 1.5, 1.0, 0.0, 0.5, 1.0]
    assert [weight[k]["a1"] for k in (up01, down20, mid, te1, te2)] == [0.0, 1.0, 1.0, 1.0, -0.5]


@pytest.mark.parametrize("blocks, message", [
    ({"vae": 1.0}, "block weights for .* name vae; accepted: unet, text_encoder, text_encoder_2"),
    ({"unet": {"middle": 1.0}}, "unet takes down, mid and up; got middle"),
    ({"unet": {"down": {"block_0": 1.0}}}, "unet down has transformer blocks block_1, block_2; got block_0"),
    ({"unet": {"up": {"block_0": [1.0, 1.0]}}}, "unet up block_0 has 3 transformers; got 2 weights"),
    ({"unet": {"mid": 3.0}}, "weight 3.0 for .* \\(unet mid\\) is out of range; accepted: -2.0 to 2.0"),
])
def test_bad_block_weights_are_refused_by_name_and_change_nothing(pipe, files, blocks, message):
    before = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    with pytest.raises(ValueError, match=message):
        attach(pipe, files[:1], weights=[blocks])
    assert getattr(pipe, "_studio_attached", None) is None or not pipe._studio_attached.names
    after = pipe.unet.state_dict()
    assert set(after) == set(before) and all(torch.equal(after[k], v) for k, v in before.items())


def test_detach_restores_the_pipeline_exactly(pipe, files, base_images):
    before = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    attach(pipe, files[:1])
    assert sum(isinstance(m, LoraStack) for m in pipe.unet.modules()) > 10
    detach(pipe)
    assert not any(isinstance(m, LoraStack) for c in (pipe.unet, pipe.text_encoder, pipe.text_encoder_2) for m in c.modules())
    after = pipe.unet.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    np.testing.assert_array_equal(sample(pipe), base_images)


def test_fuse_matches_unfused_and_unfuse_is_exact(pipe, files):
    attach(pipe, files, weights=[1.0, 0.5])
    try:
        unfused = sample(pipe, steps=1)
        q = pipe.unet.down_blocks[1].attentions[0].transformer_blocks[0].attn1.to_q
        original = q.base.weight.detach().clone()
        x = torch.randn(2, 64, q.base.in_features)
        with torch.no_grad():
            layer_unfused = q(x)
        plan = q._plan
        fuse(pipe)
        assert not torch.equal(q.base.weight, original)
        with torch.no_grad():  # one layer: (W + dW) x against W x + dW x, to rounding
            assert torch.allclose(q(x), layer_unfused, rtol=1e-5, atol=1e-5 * layer_unfused.abs().max())
        # the whole pipeline, one sampler step: rounding only (measured: 1e-4 at most). Over several steps
        # these random adapters make sampling chaotic enough to grow rounding to 0.08 by step 4.
        np.testing.assert_allclose(sample(pipe, steps=1), unfused, atol=1e-3)
        unfuse(pipe)
        assert torch.equal(q.base.weight, original)
        with torch.no_grad():  # the plan made before fusing holds again: the weight it was made on is back
            assert torch.equal(q(x), layer_unfused) and q._plan is plan is not None
    finally:
        detach(pipe)


def test_weight_zero_is_the_base_model_and_weights_can_change(pipe, files, base_images):
    attach(pipe, files, weights=[0.0, 0.0])
    try:
        np.testing.assert_allclose(sample(pipe), base_images, atol=1e-6)
        set_weights(pipe, {"a1": 1.0})
        assert np.abs(sample(pipe) - base_images).max() > 0.05
        with pytest.raises(ValueError, match="no attached adapter named nope"):
            set_weights(pipe, {"nope": 1.0})
    finally:
        detach(pipe)


def test_refusals_leave_the_pipeline_untouched(pipe, files, tmp_path):
    from studio.adapters import load_adapter

    with pytest.raises(ValueError, match=r"out of range; accepted: -2.0 to 2.0"):
        attach(pipe, files, weights=[1.0, 7.0])
    other = load_adapter(files[0])
    other.meta.family = "sd15"
    with pytest.raises(ValueError, match="trained for a sd15 model, but this pipeline is sdxl"):
        attach(pipe, [files[1], other])
    other.meta.family, other.meta.base_hash, other.meta.base_model = "sdxl", "0123456789abcdef", "some-other-sdxl"
    with pytest.raises(ValueError, match=rf"some-other-sdxl \(0123456789abcdef\).*{base_model_hash(pipe.unet)}"):
        attach(pipe, [other])
    assert getattr(pipe, "_studio_attached", None) is None
    assert not any(isinstance(m, LoraStack) for m in pipe.unet.modules())
