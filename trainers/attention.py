"""The UNet's attention while an adapter trains: diffusers' result, in fewer and larger GEMMs.

:class:`TrainingAttnProcessor` replaces diffusers' SDPA processor on every attention layer of the UNet for the
training passes (:func:`use_training_attention`). Projections that read the same input run together:
self-attention's q, k and v read the hidden states, cross-attention's k and v read the prompt. Their frozen base
weights become row blocks of one tensor (the layers' own weights are views of it, so no memory is added), their
LoRA downs are concatenated at every call (a few rows: the gradient reaches each), and their ups act as one
block-diagonal GEMM. Three base GEMMs, three downs and three ups become three calls, forward and backward.
Cross-attention's keys and values are projected once per distinct prompt of the batch
(:func:`distinct_examples`). ``bench/lora_step.py`` measures what each buys.

A :class:`CrossAttentionMaps` given to the processor (:func:`attention_maps`) records, for the examples a trainer
names, how much attention their queries give chosen prompt tokens in every cross-attention layer, with the
gradient: the attention loss (``--attention-loss``) pulls an identifier's map onto its subject.

Layers or states it does not reproduce exactly (an attention mask, group or spatial norms, a projection with
hooks such as SingLoRA's or the content/style trainer's per-example routing, a peft layer that is merged,
disabled, has dropout or several adapters) run each layer's own forward, as diffusers' processor does.
"""

from __future__ import annotations

import weakref
from typing import NamedTuple

import torch
import torch.nn.functional as F


def trainable_lora(layer) -> tuple[torch.Tensor, torch.Tensor, float] | None:
    """``(down, up, scale)`` of a peft ``lora.Linear`` in the state training leaves it in (one active adapter,
    unmerged, no dropout or variant such as DoRA, a plain ``nn.Linear`` base, one dtype or autocast), else
    None: then only peft's own forward computes what the layer does."""
    names = layer.active_adapters
    name = names[0] if len(names) == 1 else None
    base = layer.base_layer
    if (name is None or layer.merged or layer.disable_adapters or name not in layer.lora_A
            or name in getattr(layer, "lora_variant", {}) or not isinstance(layer.lora_dropout[name], torch.nn.Identity)
            or type(base) is not torch.nn.Linear):
        return None
    down, up = layer.lora_A[name].weight, layer.lora_B[name].weight
    if not torch.is_autocast_enabled(down.device.type) and not base.weight.dtype == down.dtype == up.dtype:
        return None
    return down, up, layer.scaling[name]


def _plain(module) -> bool:
    """No hooks on ``module``; for a linear layer (a parametrized one has another class), its forward is F.linear."""
    return not module._forward_hooks and not module._forward_pre_hooks


_PEFT_LINEAR: list[type] = []  # peft's lora.Linear, imported on first use (a plain global: torch.compile traces it)


def _peft_linear() -> type:
    if not _PEFT_LINEAR:
        from peft.tuners.lora import Linear

        _PEFT_LINEAR.append(Linear)
    return _PEFT_LINEAR[0]


def _parts(module) -> tuple[torch.nn.Linear, tuple | None] | None:
    """The base linear of a projection and its trainable LoRA (or None for a plain linear); None when the fused
    path cannot reproduce the module."""
    if type(module) is torch.nn.Linear and _plain(module):
        return module, None
    if type(module) is _peft_linear() and type(module.base_layer) is torch.nn.Linear and _plain(module) \
            and _plain(module.base_layer):
        lora = trainable_lora(module)
        return (module.base_layer, lora) if lora is not None else None
    return None


class _Group:
    """Projections that read one input, their base weights made row blocks of one tensor (``weight``)."""

    def __init__(self, linears: list[torch.nn.Linear]):
        with torch.no_grad():
            self.weight = torch.cat([m.weight for m in linears])
            self.bias = None
            if any(m.bias is not None for m in linears):
                self.bias = torch.cat([m.bias if m.bias is not None else m.weight.new_zeros(m.weight.shape[0])
                                       for m in linears])
        self.sizes = [m.weight.shape[0] for m in linears]
        self.linears = linears
        self.starts = [sum(self.sizes[:i]) for i in range(len(linears))]
        for m, start, n in zip(linears, self.starts, self.sizes):  # the layers keep their parameters, now views
            m.weight.data = self.weight[start : start + n]
            if m.bias is not None:
                m.bias.data = self.bias[start : start + n]

    def intact(self) -> bool:
        """Whether every layer still views the group's rows (nothing reassigned a weight since)."""
        if torch.compiler.is_compiling():  # a compiled graph runs the layers it traced
            return True
        return all(m.weight.data_ptr() == self.weight[start].data_ptr()
                   and (m.bias is None or m.bias.data_ptr() == self.bias[start].data_ptr())
                   for m, start in zip(self.linears, self.starts))


def fused_projections(x: torch.Tensor, group: _Group, loras: list[tuple | None]) -> list[torch.Tensor]:
    """Every projection of ``group`` on ``x`` (..., d_in): ``x W_i^T + b_i + s_i (x A_i^T) B_i^T`` for each i (no
    LoRA term where ``loras[i]`` is None), as one base GEMM, one GEMM into the concatenated rank space and one
    block-diagonal up GEMM."""
    x2 = x.reshape(-1, x.shape[-1])
    out = F.linear(x2, group.weight, group.bias)
    active = [lora for lora in loras if lora is not None]
    if active:
        same = len({s for _, _, s in active}) == 1
        ups = []
        for lora, n in zip(loras, group.sizes):
            if lora is None:  # an empty (d_out, 0) block: these rows get nothing
                ups.append(group.weight.new_zeros(n, 0))
            else:
                ups.append(lora[1] if same else lora[1] * lora[2])
        down = torch.cat([d for d, _, _ in active])
        out = torch.addmm(out, x2 @ down.T, torch.block_diag(*ups).T, alpha=active[0][2] if same else 1.0)
    return [o.view(*x.shape[:-1], n) for o, n in zip(out.split(group.sizes, dim=-1), group.sizes)]


# which projections of an attention layer read one input: self-attention's q, k, v; cross-attention's k, v
_GROUPS = {False: ("qkv", ("to_q", "to_k", "to_v")), True: ("kv", ("to_k", "to_v"))}


class CrossAttentionMaps:
    """Cross-attention maps of chosen tokens, recorded during training passes with their gradient.

    Before a UNet pass, :meth:`watch` names the pass's prompt batch (the ``encoder_hidden_states`` tensor it is
    called with), the examples to read (``rows``) and per example a weight per prompt token (``(len(rows), T)``,
    e.g. 1 on the identifier's tokens, divided by their number). In each cross-attention layer of at most
    ``max_queries`` query positions, each such example's map is then its softmax attention probabilities, averaged
    over heads, weighted by the token weights: ``(len(rows), queries)``, appended to :attr:`maps`. After the pass
    :meth:`close` stops the appending; layers that run again in the backward pass (gradient checkpointing) compute
    the same values, which a checkpoint needs, and drop them."""

    def __init__(self, max_queries: int = 1024):
        self.max_queries = max_queries
        self.maps: list[torch.Tensor] = []
        self._watched: tuple | None = None  # (weakref to the prompt batch, rows, token weights)
        self.closed = True

    def watch(self, prompts: torch.Tensor, rows: torch.Tensor, weights: torch.Tensor) -> None:
        self._watched = (weakref.ref(prompts), rows, weights)
        self.maps, self.closed = [], False

    def close(self) -> None:
        self.closed = True

    def record(self, encoder_hidden_states: torch.Tensor, query: torch.Tensor, key: torch.Tensor,
               inverse: torch.Tensor | None, heads: int) -> None:
        """``query`` (batch, queries, inner) and ``key`` (one row per example, or per distinct prompt with
        ``inverse`` mapping examples to rows) of one cross-attention layer."""
        watched = self._watched
        if watched is None or watched[0]() is not encoder_hidden_states or query.shape[1] > self.max_queries:
            return
        _, rows, weights = watched
        keys = key.index_select(0, inverse.index_select(0, rows)) if inverse is not None else key.index_select(0, rows)
        head_dim = key.shape[-1] // heads
        q = query.index_select(0, rows).view(len(rows), -1, heads, head_dim).transpose(1, 2)
        k = keys.view(len(rows), -1, heads, head_dim).transpose(1, 2)
        probs = torch.softmax((q @ k.transpose(-1, -2)).float() * head_dim**-0.5, dim=-1).mean(1)  # (rows, queries, T)
        maps = (probs @ weights.to(probs)[:, :, None])[..., 0]
        if not self.closed:
            self.maps.append(maps)


class TrainingAttnProcessor:
    """diffusers' SDPA attention with fused projections (see the module's text)."""

    def __init__(self):
        self.maps: CrossAttentionMaps | None = None  # a recorder of cross-attention maps (the attention loss)

    def __call__(self, attn, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, temb: torch.Tensor | None = None, **kwargs) -> torch.Tensor:
        cross = encoder_hidden_states is not None
        if (attention_mask is not None or hidden_states.ndim != 3 or attn.spatial_norm is not None
                or attn.group_norm is not None or (cross and attn.norm_cross) or attn.norm_q is not None
                or attn.norm_k is not None or kwargs):
            from diffusers.models.attention_processor import AttnProcessor2_0

            return AttnProcessor2_0()(attn, hidden_states, encoder_hidden_states, attention_mask, temb, **kwargs)
        residual = hidden_states
        batch = hidden_states.shape[0]
        if cross:
            query = attn.to_q(hidden_states)
            prompts = distinct_examples(encoder_hidden_states)
            fused = _fused(attn, cross, prompts.rows)
            if fused is None:  # the layers' own forwards (a hook may act per example): every example's prompt
                prompts = Prompts(encoder_hidden_states, None, 0)
                fused = attn.to_k(encoder_hidden_states), attn.to_v(encoder_hidden_states)
            key, value = fused
            if self.maps is not None:
                self.maps.record(encoder_hidden_states, query, key, prompts.inverse, attn.heads)
            if prompts.run:  # each prompt's examples in one run: their queries as one sequence against its keys
                query = query.reshape(prompts.rows.shape[0], -1, query.shape[-1])
            elif prompts.inverse is not None:  # each example's keys and values from its prompt's row
                key, value = (torch.index_select(t, 0, prompts.inverse) for t in (key, value))
        else:
            fused = _fused(attn, cross, hidden_states)
            query, key, value = fused or (attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states))
        head_dim = key.shape[-1] // attn.heads
        q, k, v = (t.view(t.shape[0], -1, attn.heads, head_dim).transpose(1, 2) for t in (query, key, value))
        out = F.scaled_dot_product_attention(q, k, v, dropout_p=0.0, is_causal=False)
        out = out.transpose(1, 2).reshape(batch, -1, attn.heads * head_dim).to(query.dtype)
        out = attn.to_out[1](attn.to_out[0](out))
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor


class Prompts(NamedTuple):
    """A batch of prompt embeddings as its distinct rows (:func:`distinct_examples`)."""

    rows: torch.Tensor  # the distinct examples, in the order they first occur (the batch itself where all differ)
    inverse: torch.Tensor | None  # each example's row in ``rows``; None where ``rows`` is the batch
    run: int  # where each row's examples lie in one run and all runs are as long, that length; else 0


_DISTINCT: dict = {}  # the last prompt batch looked at: a weak reference to it, its version and shape, the answer


def distinct_examples(x: torch.Tensor) -> Prompts:
    """``x`` (batch first) as its distinct examples: a training batch holds a few prompts many times (DreamBooth:
    the instance prompt, then the class prompt), and each cross-attention layer projects every example's prompt to
    keys and values. Projecting each distinct prompt once is the same arithmetic, row for row; where the examples
    of each prompt lie in one run of equal length, their queries then attend as one sequence to their prompt's keys
    (attention is per query row, so that too is the same arithmetic), else each example's keys are gathered. The
    batch itself where every example differs, where ``x`` requires a gradient (a text encoder that trains) or
    under ``torch.compile``. The answer for one tensor is kept while it is unchanged, so the layers of one UNet
    pass compare the rows once."""
    if x.requires_grad or x.shape[0] < 2 or torch.compiler.is_compiling():
        return Prompts(x, None, 0)
    last = _DISTINCT.get("last")  # one tuple, read once: another thread may replace it meanwhile
    if last is not None and last[0]() is x and last[1] == x._version and last[2] == x.shape:
        return last[3] or Prompts(x, None, 0)
    firsts: list[int] = []
    inverse = []
    for i in range(x.shape[0]):
        match = next((j for j, f in enumerate(firsts) if torch.equal(x[i], x[f])), None)
        if match is None:
            firsts.append(i)
            match = len(firsts) - 1
        inverse.append(match)
    if len(firsts) == x.shape[0]:
        answer = Prompts(x, None, 0)
    else:
        run = x.shape[0] // len(firsts)
        grouped = inverse == [i // run for i in range(x.shape[0])]
        answer = Prompts(x[firsts], torch.tensor(inverse, device=x.device), run if grouped else 0)
    # kept: the distinct rows (a copy), not ``x`` itself (None where every example differs)
    _DISTINCT["last"] = (weakref.ref(x), x._version, x.shape, answer if answer.inverse is not None else None)
    return answer


def _fused(attn, cross: bool, x: torch.Tensor) -> list[torch.Tensor] | None:
    """The projections of ``attn`` that read ``x``, fused (:func:`fused_projections`), where its group applies:
    each a plain linear or a peft LoRA in its training state, so the same for every example; else None."""
    kind, names = _GROUPS[cross]
    group = getattr(attn, "_studio_groups", {}).get(kind)
    if group is None or (not torch.is_autocast_enabled(x.device.type) and x.dtype != group.weight.dtype):
        return None
    parts = [_parts(getattr(attn, n)) for n in names]
    if any(p is None for p in parts) or [p[0] for p in parts] != group.linears or not group.intact():
        return None
    return fused_projections(x, group, [p[1] for p in parts])


def use_training_attention(unet: torch.nn.Module) -> bool:
    """Give every attention layer of ``unet`` the training processor and its projections' groups (after the
    adapter's layers are in place), where all of them run diffusers' plain SDPA processor now (another processor,
    e.g. xformers', is left alone); returns whether it was installed."""
    from diffusers.models.attention_processor import Attention, AttnProcessor2_0

    processors = getattr(unet, "attn_processors", None)
    if not processors or not all(type(p) is AttnProcessor2_0 for p in processors.values()):
        return False
    for attn in unet.modules():
        if isinstance(attn, Attention):
            kind, names = _GROUPS[attn.is_cross_attention]
            parts = [_parts(getattr(attn, n, None)) for n in names]
            if all(p is not None for p in parts) and len({(p[0].weight.dtype, p[0].weight.device, p[0].in_features)
                                                          for p in parts}) == 1:
                attn._studio_groups = {kind: _Group([p[0] for p in parts])}
    unet.set_attn_processor(TrainingAttnProcessor())
    return True


def attention_maps(unet: torch.nn.Module, max_queries: int = 1024) -> CrossAttentionMaps:
    """A recorder of cross-attention maps (:class:`CrossAttentionMaps`) given to ``unet``'s training attention
    (:func:`use_training_attention`, installed first); a clear error where another processor runs."""
    processors = list(getattr(unet, "attn_processors", {}).values())
    if not processors or not all(isinstance(p, TrainingAttnProcessor) for p in processors):
        raise ValueError("--attention-loss reads cross-attention maps through the studio's training attention, which"
                         " replaces diffusers' default attention processor; this UNet runs another processor")
    recorder = CrossAttentionMaps(max_queries)
    for p in {id(p): p for p in processors}.values():
        p.maps = recorder
    return recorder
