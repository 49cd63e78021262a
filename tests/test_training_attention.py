"""The training path's attention (studio.trainers.attention): the same outputs and gradients as diffusers'
processor with peft's layers, from fused projections."""

import copy

import pytest
import torch
from peft import LoraConfig, inject_adapter_in_model
from studio.trainers import attention
from studio.trainers.attention import TrainingAttnProcessor, use_training_attention
from studio.trainers.loop import use_lora_linear

from studio.families import sdxl_time_ids
from studio.world.model import build_unet


def _unet(targets):
    torch.manual_seed(0)
    unet = build_unet().requires_grad_(False)
    inject_adapter_in_model(LoraConfig(r=4, lora_alpha=8, target_modules=targets), unet)
    for n, p in unet.named_parameters():
        if "lora_" in n:
            p.requires_grad_(True)
            if "lora_B" in n:
                torch.nn.init.normal_(p, std=0.05)  # B starts at zero: make the adapter act
    return unet


def _batch(n=6):
    g = torch.Generator().manual_seed(1)
    return (torch.randn(n, 16, 16, 16, generator=g), torch.randint(0, 1000, (n,), generator=g),
            torch.randn(n, 77, 128, generator=g),
            {"text_embeds": torch.randn(n, 64, generator=g), "time_ids": sdxl_time_ids(64, 64, n)})


def _grads(unet):
    return {n: p.grad.clone() for n, p in unet.named_parameters() if p.grad is not None}


# q and v adapted, k plain: a group mixes LoRA and plain projections
@pytest.mark.parametrize("targets", [["to_q", "to_k", "to_v", "to_out.0"], ["to_q", "to_v"]])
def test_fused_attention_matches_diffusers_in_value_and_gradients(targets, monkeypatch):
    calls = []
    real = attention.fused_projections
    monkeypatch.setattr(attention, "fused_projections", lambda *a: calls.append(1) or real(*a))
    reference = _unet(targets)
    fused = copy.deepcopy(reference)
    use_lora_linear(fused)
    assert use_training_attention(fused)
    x, t, embeds, added = _batch()
    ref = reference(x, t, embeds, added_cond_kwargs=added).sample
    out = fused(x, t, embeds, added_cond_kwargs=added).sample
    n_attention = sum(type(p) is TrainingAttnProcessor for p in fused.attn_processors.values())
    assert n_attention == len(fused.attn_processors) == 22 and len(calls) == n_attention  # every layer fused
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    ref.square().mean().backward()
    out.square().mean().backward()
    a, b = _grads(reference), _grads(fused)
    assert a.keys() == b.keys() and len(a) == 2 * len(targets) * 22
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=1e-4, atol=1e-6, msg=name)


def test_projections_view_one_tensor_and_states_it_cannot_reproduce_fall_back():
    unet = _unet(["to_q", "to_k", "to_v", "to_out.0"])
    reference = copy.deepcopy(unet)
    use_training_attention(unet)
    attn = unet.down_blocks[1].attentions[0].transformer_blocks[0].attn1
    group = attn._studio_groups["qkv"]
    storage = group.weight.untyped_storage().data_ptr()
    assert all(m.weight.untyped_storage().data_ptr() == storage for m in group.linears)  # no copy of the weights
    x, t, embeds, added = _batch()
    # a merged adapter is outside the training state: every layer runs its own forward, with the same result
    for module in list(unet.modules()) + list(reference.modules()):
        if hasattr(module, "merge") and hasattr(module, "lora_A"):
            module.merge()
    torch.testing.assert_close(unet(x, t, embeds, added_cond_kwargs=added).sample,
                               reference(x, t, embeds, added_cond_kwargs=added).sample, rtol=1e-5, atol=1e-5)
    # a layer with a hook (as SingLoRA's or the content/style trainer's routing) runs its own forward, hook included
    def per_example(module, args, out):
        return out * torch.arange(1, 7, dtype=out.dtype).view(6, 1, 1)

    for module in list(unet.modules()) + list(reference.modules()):
        if hasattr(module, "unmerge") and hasattr(module, "lora_A"):
            module.unmerge()
    for net in (unet, reference):
        net.up_blocks[0].attentions[0].transformer_blocks[0].attn2.to_v.base_layer.register_forward_hook(per_example)
    torch.testing.assert_close(unet(x, t, embeds, added_cond_kwargs=added).sample,
                               reference(x, t, embeds, added_cond_kwargs=added).sample, rtol=1e-5, atol=1e-5)
    # a weight reassigned after the groups were made: the group steps aside
    attn.to_k.base_layer.weight = torch.nn.Parameter(attn.to_k.base_layer.weight.detach().clone())
    assert not group.intact()


def test_another_processor_is_left_alone():
    from diffusers.models.attention_processor import AttnProcessor

    unet = _unet(["to_q"])
    unet.set_attn_processor(AttnProcessor())
    assert not use_training_attention(unet)
    assert all(type(p) is AttnProcessor for p in unet.attn_processors.values())


@pytest.mark.parametrize("order", [[0, 0, 0, 1, 1, 1], [0, 1, 0, 1, 1, 0]])
def test_a_prompt_repeated_in_the_batch_is_projected_once_with_the_same_result(order, monkeypatch):
    rows = []
    real = attention.fused_projections
    monkeypatch.setattr(attention, "fused_projections", lambda x, *a: rows.append(x.shape[:-1].numel()) or real(x, *a))
    reference = _unet(["to_q", "to_k", "to_v", "to_out.0"])
    fused = copy.deepcopy(reference)
    use_lora_linear(fused)
    assert use_training_attention(fused)
    x, t, embeds, added = _batch()
    embeds = embeds[:2][torch.tensor(order)]  # two prompts, each three times: in runs, or interleaved
    assert attention.distinct_examples(embeds).run == (3 if order == sorted(order) else 0)
    ref = reference(x, t, embeds, added_cond_kwargs=added).sample
    out = fused(x, t, embeds, added_cond_kwargs=added).sample
    assert sorted(set(rows)) == [6 * 16, 2 * 77, 6 * 64] and rows.count(2 * 77) == 11  # every cross k/v on 2 prompts
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    ref.square().mean().backward()
    out.square().mean().backward()
    a, b = _grads(reference), _grads(fused)
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=1e-4, atol=1e-6, msg=name)
    # a hook on a cross-attention projection sees every example's prompt, as with diffusers' processor
    seen = []
    fused.up_blocks[0].attentions[0].transformer_blocks[0].attn2.to_v.register_forward_hook(
        lambda module, args, out: seen.append(args[0].shape[0]))
    fused(x, t, embeds, added_cond_kwargs=added)
    assert seen == [6]


def test_distinct_examples_only_where_it_is_the_same_arithmetic():
    prompts = torch.randn(3, 77, 8)
    assert attention.distinct_examples(prompts).inverse is None  # all differ
    assert attention.distinct_examples(prompts).rows is prompts  # the same answer from what was kept
    repeated = prompts[torch.tensor([0, 0, 1, 1, 2])]
    answer = attention.distinct_examples(repeated)
    assert answer.run == 0 and answer.inverse.tolist() == [0, 0, 1, 1, 2] and torch.equal(answer.rows, prompts)
    assert attention.distinct_examples(repeated) is answer  # one comparison per tensor
    repeated.add_(0)  # changed in place: compared again
    assert attention.distinct_examples(repeated) is not answer
    trained = repeated.clone().requires_grad_(True)  # a text encoder that trains: left whole
    assert attention.distinct_examples(trained).rows is trained
