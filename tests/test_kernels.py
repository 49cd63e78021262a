"""Kernels: the fused and Triton multi-adapter LoRA paths against the reference loop, on random shapes
(odd sizes, rank 1, empty masks, all tokens masked), fp32 and bf16. The Triton kernels run on the CPU
under TRITON_INTERPRET=1 (set in conftest.py, before anything imports triton)."""

import pytest
import torch
from studio.kernels.lora import (
    Packed,
    lora_linear,
    multi_lora_delta,
    multi_lora_fused,
    multi_lora_linear,
    multi_lora_reference,
)


def _with_delta(x, w, bias, packed, gates):
    """The base layer plus :func:`multi_lora_delta`: the update alone, as the plugin keeps it for a prompt."""
    return torch.nn.functional.linear(x, w, bias).add_(multi_lora_delta(x, packed, gates))

SHAPES = [  # (batch, tokens, d_in, d_out, ranks)
    (1, 1, 8, 8, [1]),
    (2, 37, 33, 65, [4, 1, 7]),
    (1, 64, 96, 96, [16, 16, 16, 16]),
    (3, 5, 17, 9, [2, 64]),
    (1, 16, 64, 64, [2, 3]),  # low ranks on a wider layer: no merged copies (the low-rank form)
]


def _case(b, n, d_in, d_out, ranks, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, n, d_in, generator=g)
    w = torch.randn(d_out, d_in, generator=g) / d_in**0.5
    bias = torch.randn(d_out, generator=g)
    downs = [torch.randn(r, d_in, generator=g) / d_in**0.5 for r in ranks]
    ups = [torch.randn(d_out, r, generator=g) for r in ranks]
    scales = [0.5 + i for i in range(len(ranks))]
    return [t.to(dtype) for t in (x, w, bias)] + [[d.to(dtype) for d in downs], [u.to(dtype) for u in ups], scales]


def _gates(kind, b, n, k, seed=1):
    g = torch.Generator().manual_seed(seed)
    if kind == "none":
        return None
    if kind == "scalar":
        return [0.3 * (i + 1) for i in range(k)]
    if kind == "regions":  # 0/1 masks per token, one of them empty
        masks = [(torch.rand(b, n, 1, generator=g) > 0.5).float() for _ in range(k)]
        masks[0].zero_()
        return masks
    if kind == "all-masked":
        return [torch.zeros(b, n, 1) for _ in range(k)]
    return [torch.rand(b, n, 1, generator=g) for _ in range(k)]  # soft gates


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("kind", ["none", "scalar", "regions", "all-masked", "soft"])
@pytest.mark.parametrize("path", ["fused", "segmented", "triton", "delta"])
def test_every_path_matches_the_reference(shape, kind, path, monkeypatch):
    """The fused torch path (dense, and segmented: each adapter on its own tokens, forced here on small shapes),
    and the Triton kernels run by Triton's interpreter on the CPU (the [dev] extra installs triton), against the
    loop over adapters. The inputs are left as they were."""
    from studio.kernels import lora

    x, w, bias, downs, ups, scales = _case(*shape)
    gates = _gates(kind, shape[0], shape[1], len(downs))
    kept = [t.clone() for t in [x, w, bias] + (gates if kind in ("regions", "all-masked", "soft") else [])]
    ref = multi_lora_reference(x, w, bias, downs, ups, scales, gates)
    segmented = []
    if path == "segmented":
        for name, value in [("SEGMENT_MIN_WORK", 0), ("SEGMENT_MIN_RANK", 0), ("SEGMENT_DENSITY", 1.0)]:
            monkeypatch.setattr(lora, name, value)
        real = lora._segmented
        monkeypatch.setattr(lora, "_segmented", lambda *a: segmented.append(1) or real(*a))
    run = {"triton": lora.multi_lora_triton, "delta": _with_delta}.get(path, multi_lora_fused)
    with torch.no_grad():  # sampling: the in-place steps run
        out = run(x, w, bias, Packed.pack(downs, ups, scales), gates)
    assert torch.allclose(out, ref, atol=1e-4 if path == "triton" else 1e-5, rtol=1e-4 if path == "triton" else 1e-5)
    assert all(torch.equal(a, b) for a, b in zip(kept, [x, w, bias] + (gates if len(kept) > 3 else [])))
    if path == "segmented":  # the form ran wherever some gate is a tensor and there are several adapters
        assert bool(segmented) == (kind in ("regions", "all-masked", "soft") and len(downs) > 1)
    if kind == "all-masked":
        assert torch.allclose(ref, torch.nn.functional.linear(x, w, bias), atol=1e-6)
    if path == "fused":
        assert torch.allclose(multi_lora_linear(x, w, bias, Packed.pack(downs, ups, scales), gates), ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("shape", SHAPES[1:3])
@pytest.mark.parametrize("path", ["fused", "triton", "delta"])
def test_bf16_is_close_to_the_fp32_reference(shape, path):
    """bf16 through the torch path and through the Triton kernels (their 16-bit branch: the products in bf16,
    accumulated in fp32, rank space held in bf16)."""
    from studio.kernels import lora

    xb, wb, bb, db, ub, scales = _case(*shape, dtype=torch.bfloat16)
    gates = _gates("regions", shape[0], shape[1], len(db))
    # the reference in fp32 on the same (bf16-rounded) inputs: what is left is bf16 arithmetic
    ref = multi_lora_reference(xb.float(), wb.float(), bb.float(), [d.float() for d in db], [u.float() for u in ub], scales, gates)
    run = {"triton": lora.multi_lora_triton, "delta": _with_delta}.get(path, multi_lora_fused)
    with torch.no_grad():
        out = run(xb, wb, bb, Packed.pack(db, ub, scales), [g.bfloat16() for g in gates])
    assert out.dtype == torch.bfloat16
    assert (out.float() - ref).abs().max() <= 2**-6 * ref.abs().max()


def test_no_adapters_is_the_base_layer_and_bad_shapes_are_named():
    x, w, bias, downs, ups, scales = _case(2, 5, 8, 6, [2])
    assert torch.equal(multi_lora_linear(x, w, bias, None), torch.nn.functional.linear(x, w, bias))
    with pytest.raises(ValueError, match=r"adapter 0: down \(2, 7\) and up \(6, 2\) do not fit a layer of weight \(6, 8\)"):
        multi_lora_reference(x, w, bias, [torch.zeros(2, 7)], ups, scales)
    with pytest.raises(ValueError, match="2 downs, 1 ups and 1 scales"):
        Packed.pack(downs * 2, ups, scales)


@pytest.mark.parametrize("shape", [(1, 1, 8, 8, [1]), (2, 37, 33, 65, [7]), (3, 5, 17, 9, [64])])
@pytest.mark.parametrize("with_bias", [True, False])
def test_the_training_path_matches_the_reference_in_value_and_gradients(shape, with_bias):
    x, w, bias, downs, ups, _ = _case(*shape)
    bias = bias if with_bias else None
    leaves = [t.clone().requires_grad_(True) for t in (x, w, downs[0], ups[0])] + ([bias.clone().requires_grad_(True)] if with_bias else [])
    ref_leaves = [t.detach().clone().requires_grad_(True) for t in leaves]
    out = lora_linear(leaves[0], leaves[1], leaves[4] if with_bias else None, leaves[2], leaves[3], 0.75)
    ref = multi_lora_reference(ref_leaves[0], ref_leaves[1], ref_leaves[4] if with_bias else None, [ref_leaves[2]],
                               [ref_leaves[3]], [0.75])
    assert out.shape == ref.shape == (*x.shape[:-1], w.shape[0])
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(3))
    out.backward(g)
    ref.backward(g)
    for a, b in zip(leaves, ref_leaves):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-5, atol=1e-4)
    with pytest.raises(ValueError, match=r"adapter 0: down \(2, 7\)"):
        lora_linear(x, w, bias, torch.zeros(2, 7), torch.zeros(w.shape[0], 2), 1.0)


def _boxes():
    # 4x4 image tokens; box 0 = columns 0-2, box 1 = columns 2-3 (column 2 in both); row 3 outside both
    inside = torch.zeros(2, 4, 4, dtype=torch.bool)
    inside[0, :3, :3] = True
    inside[1, :3, 2:] = True
    return inside.flatten(1)


def test_isolation_mask_by_hand():
    from studio.kernels.attention import box_labels, isolation_mask

    inside = _boxes()
    labels = box_labels(inside)
    assert labels.reshape(4, 4).tolist() == [[1, 1, 3, 2], [1, 1, 3, 2], [1, 1, 3, 2], [0, 0, 0, 0]]
    dense = isolation_mask(inside).dense()
    only0, both, only1, bg = 0, 2, 3, 12
    assert not dense[only0, only1] and not dense[only1, only0]  # the two boxes do not see each other
    assert dense[only0, both] and dense[only1, both] and dense[both, only0] and dense[both, only1]  # the overlap shares
    assert dense[only0, bg] and dense[bg].all()  # the background is seen and sees everything
    assert dense.diagonal().all()


def test_regional_cross_mask_by_hand():
    from studio.kernels.attention import regional_cross_mask

    inside = _boxes()
    segments = [(0, 3, None), (3, 5, 0), (5, 9, 1)]
    dense = regional_cross_mask(inside, segments).dense()
    assert dense.shape == (16, 9)
    assert dense[12].tolist() == [True] * 3 + [False] * 6  # background: the global prompt only
    assert dense[0].tolist() == [False] * 3 + [True] * 2 + [False] * 4  # box 0: its concept's prompt only
    assert dense[3].tolist() == [False] * 5 + [True] * 4
    assert dense[2].tolist() == [False] * 3 + [True] * 6  # the overlap: both concepts


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_region_attention_matches_masked_softmax(dtype, tol):
    from studio.kernels.attention import isolation_mask, region_attention

    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, 16, 8, generator=g).to(dtype) for _ in range(3))
    mask = isolation_mask(_boxes())
    out = region_attention(q, k, v, mask)
    scores = (q.float() @ k.float().transpose(-1, -2)) / 8**0.5
    ref = scores.masked_fill(~mask.dense(), float("-inf")).softmax(-1) @ v.float()
    assert torch.allclose(out.float(), ref, atol=tol, rtol=tol)
    assert torch.allclose(region_attention(q, k, v, None).float(), scores.softmax(-1) @ v.float(), atol=tol, rtol=tol)
    with pytest.raises(ValueError, match="backend 'magic': choose auto, flex, sdpa or xformers"):
        region_attention(q, k, v, mask, backend="magic")


def test_segmented_form_runs_only_where_it_pays():
    from studio.kernels.lora import SEGMENT_MIN_WORK, use_segments

    big = Packed.pack([torch.zeros(64, 640)] * 4, [torch.zeros(640, 64)] * 4, [1.0] * 4)  # rank 256 together
    small = Packed.pack([torch.zeros(16, 640)] * 2, [torch.zeros(640, 16)] * 2, [1.0] * 2)  # rank 32
    assert use_segments(2048, big, 640, 640, density=0.25)  # four stripes on an SDXL-sized layer
    assert not use_segments(2048, big, 640, 640, density=0.75)  # most tokens under most adapters: dense
    assert not use_segments(2048, small, 640, 640, density=0.5)  # gather and scatter cost more than rank 32 saves
    assert not use_segments(128, big, 96, 96, density=0.25)  # an embedded-model layer: too small to pay
    assert 128 * 256 * 192 < SEGMENT_MIN_WORK <= 2048 * 256 * 1280


def test_token_gates_are_built_once_and_checked():
    from studio.kernels.lora import TokenGates

    x, w, bias, downs, ups, scales = _case(2, 6, 8, 5, [3, 3])
    masks = [torch.tensor([1.0, 1, 1, 0, 0, 0]).view(1, 6, 1), 0.5]  # a region and a plain weight
    routed = TokenGates.of(masks, x)
    assert routed.matrix.shape == (1, 6, 2)  # kept at the gates' own batch size, broadcast at use
    assert routed.matrix[0, :, 1].tolist() == [0.5] * 6
    seg = routed.segments(x.shape[:-1])
    assert seg.bounds == [(0, 6), (6, 18)] and seg.index[:6].tolist() == [0, 1, 2, 6, 7, 8] and not seg.binary
    assert routed.segments(x.shape[:-1]) is seg
    assert TokenGates.of([torch.tensor(0.3), 1.0], x).matrix.tolist() == [pytest.approx(0.3), 1.0]  # 0-d: every token
    ref = multi_lora_reference(x, w, bias, downs, ups, scales, masks)
    assert torch.allclose(multi_lora_fused(x, w, bias, Packed.pack(downs, ups, scales), routed), ref, atol=1e-5)
    with pytest.raises(ValueError, match=r"gates of shapes \[\(1, 7, 1\)\] do not fit tokens of shape \(2, 6\)"):
        TokenGates.of([torch.ones(1, 7, 1), 1.0], x)
    with pytest.raises(ValueError, match="3 gates for 2 adapters"):
        multi_lora_fused(x, w, bias, Packed.pack(downs, ups, scales), [1.0, 1.0, 1.0])


def test_gates_learn_through_the_fused_path():
    """With autograd on (the gated composer fitting its gates) the fused path gives the reference's gradients."""
    x, w, bias, downs, ups, scales = _case(2, 9, 12, 7, [4, 4])
    grads = []
    for run in ("reference", "fused"):
        logits = torch.zeros(2, requires_grad=True)
        gates = [torch.sigmoid(logits[i]) * torch.ones(1, 9, 1) for i in range(2)]
        out = (multi_lora_reference(x, w, bias, downs, ups, scales, gates) if run == "reference" else
               multi_lora_fused(x, w, bias, Packed.pack(downs, ups, scales), gates))
        out.square().sum().backward()
        grads.append(logits.grad)
    assert grads[0].abs().min() > 0 and torch.allclose(grads[0], grads[1], rtol=1e-4)


def test_the_plugin_reuses_a_layers_gates_while_the_router_returns_the_same():
    from studio.plugin import LoraStack

    stack = LoraStack(torch.nn.Linear(8, 5), "layer")
    x = torch.randn(2, 6, 8)
    mask = torch.ones(1, 6, 1)
    first = stack.routed([mask, 0.5], x)
    assert stack.routed([mask, 0.5], x) is first
    assert stack.routed([mask.clone(), 0.5], x) is not first  # another tensor: built again
    assert stack.routed([1.0, 0.5], x) == [1.0, 0.5]  # plain weights pass through


class _Router:
    """A composer's router that hands back one list of gates per layer and input shape, as a run does."""

    def __init__(self, gates):
        self.gates_list, self.calls = gates, 0

    def gates(self, stack, x):
        self.calls += 1
        return self.gates_list


def _close(out: torch.Tensor, ref: torch.Tensor) -> None:
    """Within 1e-5 of the reference's largest value (fp32): a plan may merge the update into the weight, which sums in
    another order."""
    assert (out - ref).abs().max() <= 1e-5 * ref.abs().max(), float((out - ref).abs().max() / ref.abs().max())


@pytest.mark.parametrize("shape", SHAPES)
def test_the_plugins_prepared_calls_give_the_reference_and_follow_every_change(shape):
    """The plugin's layer prepares its call after the first (``LinearPlan`` for fixed weights, ``GatedPlan`` for a
    router's fixed gates): the same output as the reference, and a change of weights, gates, input shape or dtype,
    fusing or grad mode gets a fresh answer, not the plan's."""
    from studio.kernels.lora import GatedPlan, LinearPlan, RoutedPlan

    from studio.plugin import LoraStack

    b, n, d_in, d_out, ranks = shape
    x, w, bias, downs, ups, scales = _case(b, n, d_in, d_out, ranks)
    stack = LoraStack(torch.nn.Linear(d_in, d_out), "layer")
    with torch.no_grad():
        stack.base.weight.copy_(w)
        stack.base.bias.copy_(bias)
    for i, (d, u, s) in enumerate(zip(downs, ups, scales)):
        stack.add(f"a{i}", d, u, s, 1.0)
    k = len(ranks)
    with torch.no_grad():
        for _ in range(3):  # the first call prepares, the later ones run the plan
            out = stack(x)
            _close(out, multi_lora_reference(x, w, bias, downs, ups, scales))
        assert isinstance(stack._plan, LinearPlan)
        plan = stack._plan
        assert (plan.merged is not None) == (d_in * d_out <= 4 * sum(ranks) * (d_in + d_out))  # merged where the copy is small
        stack.base.weight.mul_(1.5)  # the base weight changed in place: not the plan's (nor its merged copy)
        _close(stack(x), multi_lora_reference(x, 1.5 * w, bias, downs, ups, scales))
        stack.base.weight.copy_(w)
        plan = stack._plan
        LoraStack.prepared = False  # the general path on every call, and no plan built for it
        try:
            stack.weights = [1.0] * k
            _close(stack(x), multi_lora_reference(x, w, bias, downs, ups, scales))
            assert stack._plan is plan
        finally:
            LoraStack.prepared = True
        stack.weights = [0.5 * (i + 1) for i in range(k)]  # set_weights hands the layer a new list
        _close(stack(x), multi_lora_reference(x, w, bias, downs, ups, scales, stack.weights))
        stack.weights[0] = 2.0  # changed in place: the plan sees it too
        _close(stack(x), multi_lora_reference(x, w, bias, downs, ups, scales, stack.weights))
        stack.fused_from = stack.base.weight.clone()  # fused (the base weight would hold the update): the base layer
        torch.testing.assert_close(stack(x), torch.nn.functional.linear(x, w, bias))
        stack.fused_from = None
        wider = torch.cat([x, x[:1]])  # another batch size
        _close(stack(wider), multi_lora_reference(wider, w, bias, downs, ups, scales, stack.weights))
    x.requires_grad_(True)  # grad mode: out of place, and the input's gradient reaches x
    stack(x).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    x = x.detach()

    g = torch.Generator().manual_seed(3)
    masks = [(torch.rand(1, n, 1, generator=g) > 0.5).float() for _ in range(k)]
    router = stack.router = _Router(masks)
    with torch.no_grad():
        for _ in range(3):  # the second call (the same list again) prepares, the third runs the plan
            _close(stack(x), multi_lora_reference(x, w, bias, downs, ups, scales, masks))
        disjoint = bool((torch.stack(masks).sum(0) <= 1).all())  # each token under one adapter at most: routed
        routed = disjoint and d_in * d_out <= 4 * min(ranks) * (d_in + d_out)
        assert isinstance(stack._gated, RoutedPlan if routed else GatedPlan) and router.calls == 3
        stack.base.weight.mul_(1.5)  # changed in place: not the plan's merged weights
        _close(stack(x), multi_lora_reference(x, 1.5 * w, bias, downs, ups, scales, masks))
        stack.base.weight.copy_(w)
        router.gates_list = other = [1.0 - m for m in masks]  # new gates (another run): not the plan's
        for _ in range(3):
            _close(stack(x), multi_lora_reference(x, w, bias, downs, ups, scales, other))
        assert stack._gated.gates is other
    stack.router = None
    with torch.no_grad():
        _close(stack(x), multi_lora_reference(x, w, bias, downs, ups, scales, stack.weights))
        stack.to(torch.bfloat16)  # the model in another dtype: packed again for it, not the fp32 plan
        ref = multi_lora_reference(x, w, bias, downs, ups, scales, stack.weights)
        assert (stack(x.to(torch.bfloat16)).float() - ref).abs().max() < 0.05 * ref.abs().max()
        assert stack._plan.dtype == torch.bfloat16


def test_a_prompt_layer_keeps_its_update_while_the_same_prompt_comes_back_and_recomputes_on_any_change():
    """A cross-attention key/value (``text_input``) keeps the adapters' update of a prompt tensor under ``no_grad``:
    the same tensor, unchanged, with the same gates gets the kept update (the reference's output, no new low-rank
    work); a change of gates, the tensor's values in place, another tensor, new adapters or grad mode is computed
    afresh; a prompt tensor that is gone takes its update with it."""
    import gc

    import studio.plugin as plugin

    x, w, bias, downs, ups, scales = _case(2, 7, 12, 10, [3, 5])
    stack = plugin.LoraStack(torch.nn.Linear(12, 10), "layer")
    with torch.no_grad():
        stack.base.weight.copy_(w)
        stack.base.bias.copy_(bias)
    for i, (d, u, s) in enumerate(zip(downs, ups, scales)):
        stack.add(f"a{i}", d, u, s, 1.0)
    stack.text_input = True
    calls = []
    real = plugin.multi_lora_delta
    plugin.multi_lora_delta = lambda *a: calls.append(1) or real(*a)
    try:
        def check(inp, gates=None):
            torch.testing.assert_close(stack(inp), multi_lora_reference(inp, w, bias, downs, ups, scales, gates),
                                       atol=1e-5, rtol=1e-5)

        with torch.no_grad():
            for _ in range(3):
                check(x)
            assert len(calls) == 1  # computed once, then kept
            stack.weights = [0.5, 2.0]
            check(x, stack.weights)
            assert len(calls) == 2
            mask = (torch.arange(7) < 3).float().view(1, 7, 1)  # a router's per-token gates (a prompt's spans)
            stack.router = _Router([mask, 1.0])
            check(x, [mask, 1.0])
            check(x, [mask, 1.0])
            assert len(calls) == 3
            stack.router = _Router([mask.clone(), 1.0])  # another gate tensor: its values are not compared
            check(x, [mask, 1.0])
            assert len(calls) == 4
            stack.router = None
            x.mul_(2.0)  # the prompt changed in place
            check(x, stack.weights)
            y = x.clone()  # the same values in another tensor
            check(y, stack.weights)
            assert len(calls) == 6 and any(entry[0]() is y for entry in stack._kept.values())
            kept = len(stack._kept)
            del y
            gc.collect()
            assert len(stack._kept) == kept - 1 and all(entry[0]() is x for entry in stack._kept.values())  # gone with y
            stack.weights = [0.0, 0.0]  # no adapter acting: the base layer alone, nothing computed
            torch.testing.assert_close(stack(x), torch.nn.functional.linear(x, w, bias))
            for weights in ([1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [0.0, 1.0]):  # one prompt under two gate settings in
                stack.weights = weights  # turn (CLoRA's passes): both kept
                check(x, weights)
            assert len(calls) == 8
            stack.add("a2", downs[0], ups[0], 1.0, 1.0)  # another adapter: nothing kept from before
            assert not stack._kept
            torch.testing.assert_close(stack(x), multi_lora_reference(x, w, bias, [*downs, downs[0]], [*ups, ups[0]],
                                                                      [*scales, 1.0], stack.weights), atol=1e-5, rtol=1e-5)
            assert len(calls) == 9
            prompts = [x + i for i in range(stack.KEPT + 2)]  # more prompts than a layer keeps: the oldest go first
            for p in prompts:
                stack(p)
            assert len(stack._kept) == stack.KEPT and len(calls) == 9 + len(prompts)
            stack(prompts[-1])
            stack(prompts[0])  # evicted: computed again
            assert len(calls) == 10 + len(prompts)
        x.requires_grad_(True)  # grad mode: the general path, nothing kept
        before = len(calls)
        stack(x).sum().backward()
        assert len(calls) == before and x.grad is not None
    finally:
        plugin.multi_lora_delta = real


def test_no_gated_plan_where_the_segmented_form_runs(monkeypatch):
    import studio.kernels.lora as lora

    from studio.plugin import LoraStack

    monkeypatch.setattr(lora, "SEGMENT_MIN_WORK", 0)
    monkeypatch.setattr(lora, "SEGMENT_MIN_RANK", 0)
    monkeypatch.setattr(lora, "MERGE_MEMORY", 0)  # no merged weights (else the tokens are routed through them)
    x, w, bias, downs, ups, scales = _case(1, 8, 12, 10, [3, 3])
    stack = LoraStack(torch.nn.Linear(12, 10), "layer")
    with torch.no_grad():
        stack.base.weight.copy_(w)
        stack.base.bias.copy_(bias)
    for i, (d, u, s) in enumerate(zip(downs, ups, scales)):
        stack.add(f"a{i}", d, u, s, 1.0)
    masks = [(torch.arange(8) < 4).float().view(1, 8, 1), (torch.arange(8) >= 4).float().view(1, 8, 1)]  # halves
    stack.router = _Router(masks)
    with torch.no_grad():
        for _ in range(3):
            torch.testing.assert_close(stack(x), multi_lora_reference(x, w, bias, downs, ups, scales, masks),
                                       atol=1e-5, rtol=1e-5)
    assert stack._gated is None  # each adapter on its own tokens: the general path's segmented form


def test_routes_group_each_token_under_its_one_adapter():
    from studio.kernels.lora import TokenGates

    x = torch.zeros(1, 6, 4)
    on = [torch.tensor([1, 0, 0, 1, 0, 0.0]).view(1, 6, 1), torch.tensor([0, 1, 0, 0, 0, 1.0]).view(1, 6, 1)]
    routes = TokenGates.of(on, x).routes((1, 6))
    assert routes.groups == [0, 1, 2] and routes.bounds == [(0, 2), (2, 4), (4, 6)]  # 2: the tokens under none
    assert routes.perm.tolist() == [0, 3, 1, 5, 2, 4] and routes.inverse.tolist() == [0, 2, 4, 1, 5, 3]
    assert TokenGates.of([on[0], on[0]], x).routes((1, 6)) is None  # a token under two adapters
    assert TokenGates.of([on[0] * 0.5, on[1]], x).routes((1, 6)) is None  # a gate that is not 0 or 1
    assert TokenGates.of([on[0], torch.zeros(1, 6, 1)], x).routes((1, 6)).groups == [0, 2]  # no empty group
    whole = TokenGates.of([torch.ones(1, 6, 1)], x).routes((1, 6))  # one adapter over every token: one group, in order
    assert whole.groups == [0] and whole.perm.tolist() == list(range(6))


@pytest.mark.parametrize("case", ["equal groups", "unequal groups, ranks and no bias", "one group"])
def test_routed_plan_sends_each_token_through_its_adapters_merged_weight(case):
    """Region masks without overlaps: each token through ``W + s_k B_k A_k`` of its one adapter (or ``W``), one batched
    GEMM where the groups are of one size, one GEMM per group otherwise; the reference's output either way."""
    from studio.kernels.lora import RoutedPlan

    from studio.plugin import LoraStack

    equal = case == "equal groups"
    ranks = [2, 2, 2] if equal else [2, 3]
    x, w, bias, downs, ups, scales = _case(2, 12, 8, 6, ranks)
    stack = LoraStack(torch.nn.Linear(8, 6, bias=equal), "layer")
    bias = bias if equal else None
    with torch.no_grad():
        stack.base.weight.copy_(w)
        if equal:
            stack.base.bias.copy_(bias)
    for i, (d, u, s) in enumerate(zip(downs, ups, scales)):
        stack.add(f"a{i}", d, u, s, 1.0)
    t = torch.arange(12)
    if equal:  # every fourth token to adapter 0, 1, 2, and one in four under none: four groups of 6 (batch 2)
        masks = [(t % 4 == k).float().view(1, 12, 1) for k in range(3)]
    elif case == "one group":  # every token under the second adapter: one merged weight, no gather
        masks = [torch.zeros(1, 12, 1), torch.ones(1, 12, 1)]
    else:  # 4 tokens, 5 tokens, 3 under none
        masks = [(t < 4).float().view(1, 12, 1), ((t >= 4) & (t < 9)).float().view(1, 12, 1)]
    stack.router = _Router(masks)
    with torch.no_grad():
        for _ in range(3):
            _close(stack(x), multi_lora_reference(x, w, bias, downs, ups, scales, masks))
        plan = stack._gated
        assert isinstance(plan, RoutedPlan) and (plan.batched is not None) == equal
        assert len(plan.bounds) == (1 if case == "one group" else len(ranks) + 1)  # each adapter's tokens, those under none
        ref = multi_lora_reference(x, w, bias, downs, ups, scales, masks)
        _close(plan(x), ref)


def test_checkout_root_on_sys_path_does_not_shadow_hugging_face_kernels():
    """From the repository root (``python -m ...``, ``accelerate launch -m ...``) the folder kernels/ is on sys.path
    under the name ``kernels``, which transformers imports when Hugging Face's package of that name is installed."""
    import importlib.metadata
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    code = ("import sys, transformers.activations\n"
            "try:\n    import kernels\nexcept ModuleNotFoundError:\n    print('absent')\n"
            "else:\n    print(kernels.__file__)\n"
            "import studio.kernels.lora as lora\nprint(lora.__file__)\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    first, second = out.stdout.split()
    try:
        importlib.metadata.distribution("kernels")
    except importlib.metadata.PackageNotFoundError:
        assert first == "absent"
    else:
        assert Path(first).resolve().parent != root / "kernels"
        assert "site-packages" in first or "dist-packages" in first
    assert Path(second).resolve() == root / "kernels" / "lora.py"


def test_flex_backend_matches_the_dense_mask():
    """FlexAttention (compiled; on the CPU too in recent torch) on the tokens sorted by label, against SDPA with the
    dense mask: regions that interleave token by token (stripes), both mask kinds, a key count off the block size."""
    from studio.kernels.attention import isolation_mask, region_attention, regional_cross_mask

    pytest.importorskip("torch.nn.attention.flex_attention")
    cols = torch.arange(16).repeat(16)
    inside = torch.stack([cols < 6, (cols >= 4) & (cols < 11)])  # two overlapping stripes and a background
    g = torch.Generator().manual_seed(0)
    for mask, n_keys in [(isolation_mask(inside), 256), (regional_cross_mask(inside, [(0, 7, None), (7, 12, 0), (12, 19, 1)]), 19)]:
        q = torch.randn(2, 3, 256, 16, generator=g)
        k, v = (torch.randn(2, 3, n_keys, 16, generator=g) for _ in range(2))
        out = region_attention(q, k, v, mask, backend="flex")
        ref = region_attention(q, k, v, mask, backend="sdpa")
        assert torch.allclose(out, ref, atol=1e-5, rtol=1e-5), (out - ref).abs().max()


def test_a_bad_cuda_path_is_named_at_import():
    import os
    import subprocess
    import sys

    env = {**os.environ, "STUDIO_LORA_CUDA_PATH": "cutlass"}
    run = subprocess.run([sys.executable, "-c", "import studio.kernels.lora"], env=env, capture_output=True, text=True,
                         cwd="/")
    assert run.returncode != 0
    assert "STUDIO_LORA_CUDA_PATH='cutlass': choose torch or triton" in run.stderr
