"""Multi-adapter LoRA linear: ``base(x) + sum_i s_i * g_i ⊙ (x A_i^T) B_i^T``.

Three paths, one answer (tests hold them to the reference):

- :func:`multi_lora_reference`: a Python loop over adapters (what a naive implementation does);
- :func:`multi_lora_fused`: all downs stacked into one ``(R, d_in)`` matrix (``R = sum r_i``), one GEMM
  into rank space, the per-token gates applied there (a ``(tokens, R)`` multiply), one GEMM out of rank
  space added onto the base output, whose ups carry each adapter's scale. For N adapters of rank r the extra
  work is that of one rank-``N r`` LoRA, whatever N. Where the gates leave most (token, adapter) pairs at
  zero (region masks: each token belongs to one adapter's box) and the layer is big enough for it to pay,
  the *segmented* form (Punica's SGMV on the CPU) runs each adapter on its own tokens only: one gather, a
  rank-``r_i`` LoRA per adapter on its tokens, one scatter-add, so the extra work is about one rank-r LoRA
  over the image whatever N;
- :func:`multi_lora_triton`: the dense form as Triton kernels (Punica/vLLM-style shrink and expand) for
  CUDA; correct under ``TRITON_INTERPRET=1`` on the CPU, which is how the tests check it, and on an H200 (bench/gpu.sh).
  Not the default on CUDA (``CUDA_PATH``): there the torch path measured faster in most cases.

:class:`LinearPlan` and :class:`GatedPlan` are :func:`multi_lora_fused`'s numeric-gate and dense token-gate forms
prepared once for a layer (the plugin's layer keeps one while its weights or its router's gates stay the same):
the same ops, without the per-call dispatch and checks, which cost more than the GEMMs on small layers and are
what a launch-bound GPU waits on. :class:`RoutedPlan` is the prepared form for region masks that put each token
under one adapter at most: each token through its own adapter's merged weight, where those copies stay small.

:func:`multi_lora_delta` is the dense form's update alone (no base layer), for a layer whose input comes back
unchanged from call to call (the plugin keeps it for the prompt's tokens at a cross-attention key/value).

:func:`lora_linear` is the one-adapter form that training differentiates through (three GEMMs, the scale and
the sum folded into the last).

``gates`` is one entry per adapter: a number, or a tensor broadcastable to ``x``'s token shape with a
trailing 1 (``(B, N, 1)``), e.g. a region mask; or a :class:`TokenGates` made from such a list once and
reused across calls (what the plugin does: a composer's gates for a layer are fixed during a run).
Gate tensors are read, never changed. :func:`multi_lora_linear` picks the path.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

# When the segmented form runs (measured on a 2-core CPU, SDXL-sized layers: the gather and scatter cost about what
# a rank-64 to -128 dense update does, and on small layers the extra calls cost more than they save)
SEGMENT_DENSITY = 0.5  # at most this share of (token, adapter) pairs gated on
SEGMENT_MIN_RANK = 96  # all adapters' ranks together at least this
SEGMENT_MIN_WORK = 2**25  # the dense update at least this many multiply-adds
# Where a prepared call keeps merged copies of a layer's weight (W + the update: one GEMM, no low-rank work): where a
# copy takes at most this many times the memory of the factors merged into it (:func:`merge_fits`)
MERGE_MEMORY = 4


@dataclass
class Packed:
    """One layer's adapters stacked for the fused paths."""

    down: torch.Tensor  # (R, d_in): every adapter's down, one under another
    up_t: torch.Tensor  # (R, d_out): every adapter's up times its scale (alpha/rank), transposed, one under another
    ranks: tuple[int, ...]
    bounds: tuple[tuple[int, int], ...]  # each adapter's rows in ``down`` and ``up_t``
    _weighted: dict = field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def pack(cls, downs: list[torch.Tensor], ups: list[torch.Tensor], scales: list[float]) -> Packed:
        if not (len(downs) == len(ups) == len(scales)):
            raise ValueError(f"{len(downs)} downs, {len(ups)} ups and {len(scales)} scales: give one of each per adapter")
        ranks = tuple(int(d.shape[0]) for d in downs)
        up_t = torch.cat([(u * float(s)).T for u, s in zip(ups, scales)])
        edges = [0]
        for r in ranks:
            edges.append(edges[-1] + r)
        return cls(torch.cat(downs).contiguous(), up_t.contiguous(), ranks, tuple(zip(edges, edges[1:])))

    def merged_each(self, weight: torch.Tensor) -> torch.Tensor:
        """``(K + 1, d_in, d_out)``: each adapter merged into ``weight``, ``W^T + s_k A_k^T B_k^T``, then ``W^T``
        itself (kept while ``weight`` is the same tensor at the same version; equal ranks or not)."""
        key = (id(weight), version(weight), weight.dtype, weight.device)
        if self._weighted.get("merged_key") != key:
            with torch.no_grad():
                w_t = weight.T
                each = [torch.addmm(w_t, self.down[a:b].T, self.up_t[a:b]) for a, b in self.bounds]
                self._weighted.update(merged_key=key, merged=torch.stack([*each, w_t]))
        return self._weighted["merged"]

    def weighted_up(self, weights: tuple[float, ...]) -> torch.Tensor:
        """``up_t`` with each adapter's rows times its weight (kept for the last weights asked)."""
        if all(w == 1 for w in weights):
            return self.up_t
        if self._weighted.get("weights") != weights:
            per = torch.tensor(weights, device=self.up_t.device, dtype=self.up_t.dtype)
            rows = per.repeat_interleave(torch.tensor(self.ranks, device=self.up_t.device))
            self._weighted.update(weights=weights, up=self.up_t * rows[:, None])
        return self._weighted["up"]


@dataclass
class Segments:
    """The (token, adapter) pairs a :class:`TokenGates` leaves on, grouped by adapter."""

    index: torch.Tensor  # (S,): flat token index of each pair, adapter 0's first
    values: torch.Tensor  # (S,): the gate there
    bounds: list[tuple[int, int]]  # each adapter's pairs in ``index``
    density: float  # S / (tokens * adapters)
    binary: bool  # every gate there is 1 (region masks without overlaps or weights): no multiply


@dataclass
class Routes:
    """Every token of a layer under at most one adapter, gated 1 (region masks without overlaps or weights): the
    tokens grouped by their adapter, those under none last."""

    perm: torch.Tensor  # (tokens,): every token once, group by group
    inverse: torch.Tensor  # (tokens,): where each token is in ``perm`` (the output gathered back: faster than a scatter)
    groups: list[int]  # each group's adapter; K (the number of adapters) for the tokens under none
    bounds: list[tuple[int, int]]  # each group's tokens in ``perm``


class TokenGates:
    """K adapters' gates over a layer's tokens as one ``(..., tokens, K)`` matrix that broadcasts to the input's
    token shape, with what the paths derive from it (per-rank columns, segments) kept for reuse."""

    def __init__(self, matrix: torch.Tensor):
        self.matrix = matrix
        self._derived: dict = {}

    @classmethod
    def of(cls, gates: list, x: torch.Tensor) -> TokenGates:
        lead = x.shape[:-1]
        tensors = [g for g in gates if isinstance(g, torch.Tensor)]
        try:
            shape = torch.broadcast_shapes(*(g.shape for g in tensors), (1,))  # a 0-d tensor is one number for every token
            if shape[-1] != 1 or torch.broadcast_shapes(shape[:-1], lead) != lead:
                raise RuntimeError
        except RuntimeError:
            raise ValueError(f"gates of shapes {[tuple(g.shape) for g in tensors]} do not fit tokens of shape {tuple(lead)};"
                             " accepted: numbers, or tensors broadcastable to (*tokens, 1)") from None
        cols = [g.to(x.dtype).expand(shape) if isinstance(g, torch.Tensor) else x.new_full(shape, float(g)) for g in gates]
        return cls(torch.cat(cols, dim=-1))

    def over_ranks(self, ranks: tuple[int, ...]) -> torch.Tensor:
        """``(..., R)``: each adapter's gate repeated over its rank columns."""
        key = ("ranks", ranks)
        if key not in self._derived:
            reps = torch.tensor(ranks, device=self.matrix.device)
            self._derived[key] = self.matrix.repeat_interleave(reps, dim=-1)
        return self._derived[key]

    def routes(self, lead: tuple[int, ...]) -> Routes | None:
        """The tokens grouped by the one adapter on for each, or None where some gate is neither 0 nor 1 or some
        token is under two adapters."""
        key = ("routes", tuple(lead))
        if key not in self._derived:
            seg = self.segments(lead)
            tokens = math.prod(lead)
            free = torch.ones(tokens, dtype=torch.bool, device=seg.index.device)
            free[seg.index] = False
            routes = None
            if seg.binary and len(seg.index) + int(free.sum()) == tokens:  # no token twice
                parts = [(k, seg.index[a:b]) for k, (a, b) in enumerate(seg.bounds)] + [(len(seg.bounds), free.nonzero().flatten())]
                parts = [(k, idx) for k, idx in parts if len(idx)]
                edges = [0]
                for _, idx in parts:
                    edges.append(edges[-1] + len(idx))
                perm = torch.cat([idx for _, idx in parts])
                inverse = torch.empty_like(perm)
                inverse[perm] = torch.arange(tokens, device=perm.device)
                routes = Routes(perm, inverse, [k for k, _ in parts], list(zip(edges, edges[1:])))
            self._derived[key] = routes
        return self._derived[key]

    def segments(self, lead: tuple[int, ...]) -> Segments:
        key = ("segments", tuple(lead))
        if key not in self._derived:
            k = self.matrix.shape[-1]
            full = self.matrix.expand(*lead, k).reshape(-1, k)
            index, values, bounds, total = [], [], [], 0
            for i in range(k):
                on = full[:, i].nonzero().flatten()
                bounds.append((total, total + len(on)))
                total += len(on)
                index.append(on)
                values.append(full[on, i])
            values = torch.cat(values)
            self._derived[key] = Segments(torch.cat(index), values, bounds, total / max(1, full.numel()),
                                          bool((values == 1).all()))
        return self._derived[key]


def _check(x: torch.Tensor, weight: torch.Tensor, downs, ups) -> None:
    if x.shape[-1] != weight.shape[1]:
        raise ValueError(f"input has {x.shape[-1]} features, the layer takes {weight.shape[1]}")
    for i, (d, u) in enumerate(zip(downs, ups)):
        if d.shape[1] != weight.shape[1] or u.shape[0] != weight.shape[0] or d.shape[0] != u.shape[1]:
            raise ValueError(f"adapter {i}: down {tuple(d.shape)} and up {tuple(u.shape)} do not fit a layer of"
                             f" weight {tuple(weight.shape)}")


def multi_lora_reference(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, downs: list[torch.Tensor],
                         ups: list[torch.Tensor], scales: list[float], gates: list | None = None) -> torch.Tensor:
    """The loop over adapters: ``x W^T + b + sum_i s_i g_i (x A_i^T) B_i^T``."""
    _check(x, weight, downs, ups)
    out = F.linear(x, weight, bias)
    for i, (d, u, s) in enumerate(zip(downs, ups, scales)):
        g = 1.0 if gates is None else gates[i]
        if not isinstance(g, torch.Tensor) and g == 0:
            continue
        out = out + (s * g) * F.linear(F.linear(x, d), u)
    return out


def lora_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, down: torch.Tensor, up: torch.Tensor,
                scale: float) -> torch.Tensor:
    """One trainable adapter, ``x W^T + b + s (x A^T) B^T``, differentiable in every argument: the base GEMM,
    the GEMM into rank space, and one ``addmm`` that applies the scale and adds onto the base output. The
    training path (peft's layer spends a multiply, an add and their backward nodes per layer on the same sum)."""
    _check(x, weight, [down], [up])
    x2 = x.reshape(-1, x.shape[-1])
    out = torch.addmm(F.linear(x2, weight, bias), x2 @ down.T, up.T, alpha=scale)
    return out.view(*x.shape[:-1], weight.shape[0])


def version(t: torch.Tensor) -> int | None:
    """``t``'s version counter (bumped by every in-place change), or ``None`` for an inference-mode tensor, which
    keeps none: nothing derived from it can be kept."""
    return None if t.is_inference() else t._version


class LinearPlan:
    """One layer's adapters at fixed per-adapter weights, prepared for repeated calls: ``x W^T + b + (x A^T) U``
    with every adapter's down stacked (``A``) and its up times its scale and weight (``U``), as three ops and no
    per-call bookkeeping. What the plugin calls per layer while nothing routes its adapters (sampling with fixed
    weights); the same arithmetic as :func:`multi_lora_fused` with numeric gates. Where a merged copy of the weight
    is small beside the adapters' factors (:func:`merge_fits` for their ranks together), the plan keeps ``W + A^T U``
    and runs one GEMM under ``no_grad``; ``version`` is the base weight's when the plan was made."""

    __slots__ = ("weight", "bias", "down_t", "up", "weights", "device", "dtype", "d_out", "merged", "version")

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, packed: Packed, weights: list[float]):
        self.weight, self.bias = weight, bias
        self.down_t, self.up = packed.down.T, packed.weighted_up(tuple(float(w) for w in weights))
        self.weights, self.device, self.dtype = list(weights), packed.down.device, packed.down.dtype
        self.d_out, d_in = weight.shape
        self.version = version(weight)  # an inference-mode weight: no merged copy, whose staleness could not be seen
        dense = self.version is not None and merge_fits(packed.down.shape[0], d_in, self.d_out)
        with torch.no_grad():
            self.merged = torch.addmm(weight, self.up.T, packed.down) if dense else None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged is not None and not torch.is_grad_enabled():  # with autograd on, the factors (grads reach W)
            return F.linear(x, self.merged, self.bias)
        x2 = x.reshape(-1, x.shape[-1])
        base = F.linear(x2, self.weight, self.bias)
        if torch.is_grad_enabled():
            out = torch.addmm(base, x2 @ self.down_t, self.up)
        else:
            out = torch.addmm(base, x2 @ self.down_t, self.up, out=base)
        return out.view(*x.shape[:-1], self.d_out)


class GatedPlan:
    """One layer's adapters under fixed per-token gates (a composer's region masks, the same for a whole run), for
    inputs of one shape, prepared for repeated calls while sampling: the dense form of :func:`multi_lora_fused`
    (the gates multiplied in rank space) as four ops and no per-call bookkeeping. :meth:`build` gives a
    :class:`RoutedPlan` instead where each token is under one adapter at most and the merged weights are small enough
    (:func:`merge_fits` for each adapter's rank), and ``None`` where :func:`multi_lora_fused` would take its segmented form."""

    __slots__ = ("weight", "bias", "down_t", "up_t", "gate", "h_shape", "out_shape", "shape", "dtype", "device",
                 "gates")

    @classmethod
    def build(cls, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, packed: Packed,
              routed: TokenGates, gates: list) -> GatedPlan | RoutedPlan | None:
        lead = x.shape[:-1]
        if (merge_fits(min(packed.ranks), x.shape[-1], weight.shape[0]) and version(weight) is not None
                and (routes := routed.routes(lead)) is not None):
            return RoutedPlan(x, weight, bias, packed, routes, gates)
        if _segments_if_paying(routed, lead, packed, x.shape[-1], weight.shape[0]) is not None:
            return None
        plan = cls.__new__(cls)
        plan.weight, plan.bias, plan.down_t, plan.up_t = weight, bias, packed.down.T, packed.up_t
        plan.h_shape, plan.gate = _rank_gates(packed, routed, lead)
        plan.out_shape, plan.shape = (*lead, weight.shape[0]), x.shape
        plan.dtype, plan.device, plan.gates = x.dtype, x.device, gates
        return plan

    def fits(self, x: torch.Tensor, gates: list) -> bool:
        """Whether this plan computes the layer for ``x`` under ``gates`` (the very list it was built for)."""
        return (gates is self.gates and x.shape == self.shape and x.dtype == self.dtype and x.device == self.device
                and not torch.is_grad_enabled())

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        x2 = x.reshape(-1, x.shape[-1])
        base = F.linear(x2, self.weight, self.bias)
        h = x2 @ self.down_t
        h.view(self.h_shape).mul_(self.gate)
        return torch.addmm(base, h, self.up_t, out=base).view(self.out_shape)


class RoutedPlan:
    """One layer's adapters under fixed region masks that put each token under one adapter at most (gated 1), for
    inputs of one shape, prepared for repeated calls while sampling: each token through its own adapter's merged
    weight, ``x_t (W + s_k B_k A_k)^T + b`` (:meth:`Packed.merged_each`), the tokens under none through ``W``. So the
    adapters cost no multiply-adds per token at all: one gather, one batched GEMM (one GEMM per group where the groups
    differ in size) and the output gathered back, against the dense form's rank-R update of every token. Where the
    merged copies stay small (:func:`merge_fits` for each adapter's rank: the embedded model's layers at rank 16)."""

    __slots__ = ("weight", "bias", "perm", "inverse", "bounds", "each", "batched", "out_shape", "shape", "dtype",
                 "device", "gates", "version")

    def __init__(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, packed: Packed, routes: Routes,
                 gates: list):
        merged = packed.merged_each(weight)  # (K + 1, d_in, d_out)
        groups = routes.groups
        self.weight, self.bias, self.perm, self.inverse, self.bounds = weight, bias, routes.perm, routes.inverse, routes.bounds
        self.each = [merged[g] for g in groups]
        self.batched = None
        if len(groups) > 1 and len({b - a for a, b in routes.bounds}) == 1:  # groups of one size: one batched GEMM
            runs = groups == list(range(groups[0], groups[0] + len(groups)))
            self.batched = merged[groups[0] : groups[0] + len(groups)] if runs else merged[groups]
        self.out_shape, self.shape = (*x.shape[:-1], weight.shape[0]), x.shape
        self.dtype, self.device, self.gates, self.version = x.dtype, x.device, gates, version(weight)

    def fits(self, x: torch.Tensor, gates: list) -> bool:
        """Whether this plan computes the layer for ``x`` under ``gates`` (the very list it was built for), its
        weight unchanged since."""
        return (gates is self.gates and x.shape == self.shape and x.dtype == self.dtype and x.device == self.device
                and not torch.is_grad_enabled() and version(self.weight) == self.version)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if len(self.each) == 1:  # one group holds every token, in order: no gather
            x2 = x.reshape(-1, x.shape[-1])
            out = x2 @ self.each[0] if self.bias is None else torch.addmm(self.bias, x2, self.each[0])
            return out.view(self.out_shape)
        xs = x.reshape(-1, x.shape[-1]).index_select(0, self.perm)
        if self.batched is not None:
            xs = xs.view(len(self.bounds), -1, xs.shape[1])
            ys = torch.bmm(xs, self.batched) if self.bias is None else torch.baddbmm(self.bias, xs, self.batched)
            ys = ys.view(-1, ys.shape[-1])
        else:
            ys = xs.new_empty(xs.shape[0], self.out_shape[-1])
            for (a, b), w in zip(self.bounds, self.each):
                if self.bias is None:
                    torch.mm(xs[a:b], w, out=ys[a:b])
                else:
                    torch.addmm(self.bias, xs[a:b], w, out=ys[a:b])
        return ys.index_select(0, self.inverse).view(self.out_shape)


def plan_fits(x: torch.Tensor, packed: Packed) -> bool:
    """Whether a :class:`LinearPlan` computes what :func:`multi_lora_linear` would for ``x`` (by the same path):
    anywhere but on CUDA with the Triton kernels chosen."""
    return bool(packed.ranks) and not (x.is_cuda and CUDA_PATH == "triton" and triton_available())


def _token_gates(gates, x: torch.Tensor, k: int) -> TokenGates | tuple[float, ...]:
    """``gates`` as a TokenGates, or as one number per adapter when none is a tensor."""
    if isinstance(gates, TokenGates):
        return gates
    if gates is None:
        return (1.0,) * k
    if len(gates) != k:
        raise ValueError(f"{len(gates)} gates for {k} adapters: give one per adapter")
    if any(isinstance(g, torch.Tensor) for g in gates):
        return TokenGates.of(gates, x)
    return tuple(float(g) for g in gates)


def _big_enough(tokens: int, packed: Packed, d_in: int, d_out: int) -> bool:
    """Several adapters of SEGMENT_MIN_RANK ranks together, and a dense update of SEGMENT_MIN_WORK multiply-adds."""
    rank = packed.down.shape[0]
    return len(packed.ranks) > 1 and rank >= SEGMENT_MIN_RANK and tokens * rank * (d_in + d_out) >= SEGMENT_MIN_WORK


def use_segments(tokens: int, packed: Packed, d_in: int, d_out: int, density: float) -> bool:
    """Whether the segmented form runs for a layer: big enough (:func:`_big_enough`), and gates on for at most
    SEGMENT_DENSITY of the (token, adapter) pairs."""
    return _big_enough(tokens, packed, d_in, d_out) and density <= SEGMENT_DENSITY


def merge_fits(rank: int, d_in: int, d_out: int) -> bool:
    """Whether a merged copy of a ``d_out x d_in`` weight takes at most MERGE_MEMORY times the memory of the rank-``rank``
    factors merged into it: ``d_in d_out <= MERGE_MEMORY rank (d_in + d_out)`` (the embedded model's layers from rank
    16; SDXL's 640-wide layers from rank 80, its 1280-wide ones from 160). A merged weight costs one GEMM, the
    low-rank form the base GEMM and ``rank (d_in + d_out)`` more multiply-adds per token, in more calls."""
    return d_in * d_out <= MERGE_MEMORY * rank * (d_in + d_out)


def _segments_if_paying(routed: TokenGates, lead: tuple[int, ...], packed: Packed, d_in: int, d_out: int) -> Segments | None:
    """The gates' segments where the segmented form runs (big enough and sparse enough), else None."""
    if not _big_enough(math.prod(lead), packed, d_in, d_out):  # checked first: building segments costs
        return None
    seg = routed.segments(lead)
    return seg if seg.density <= SEGMENT_DENSITY else None


def _rank_gates(packed: Packed, routed: TokenGates, lead: tuple[int, ...]) -> tuple[tuple[int, ...], torch.Tensor]:
    """How the rank-space activations ``(tokens, R)`` are viewed and what they are multiplied by: with equal ranks a
    ``(..., K)`` gate broadcast over each adapter's columns, else the gates repeated over the rank columns."""
    k = len(packed.ranks)
    if packed.ranks == (packed.ranks[0],) * k:
        return (*lead, k, packed.ranks[0]), routed.matrix.unsqueeze(-1)
    return (*lead, packed.down.shape[0]), routed.over_ranks(packed.ranks)


def multi_lora_fused(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, packed: Packed,
                     gates: list | TokenGates | None = None) -> torch.Tensor:
    """Two GEMMs for all adapters (``h = (x A^T) * gates`` in rank space, ``out = base + h (s B)^T``), or the
    segmented form where the gates are sparse and the layer big (see the module's text)."""
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])
    routed = _token_gates(gates, x, len(packed.ranks))
    inplace = not torch.is_grad_enabled()  # sampling; with autograd on (fitting gates) every step is out of place
    base = F.linear(x2, weight, bias)
    if inplace and isinstance(routed, TokenGates) and (
            seg := _segments_if_paying(routed, lead, packed, x2.shape[1], weight.shape[0])) is not None:
        return _segmented(x2, base, packed, seg).reshape(*lead, weight.shape[0])
    h, up = _low_rank(x2, packed, routed, lead, inplace)
    return _add_mm(base, h, up, inplace).reshape(*lead, weight.shape[0])


def _low_rank(x2: torch.Tensor, packed: Packed, routed: TokenGates | tuple[float, ...], lead: tuple[int, ...],
              inplace: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The dense form's two factors: the rank-space activations ``x A^T`` (times the token gates, in place when
    allowed) and the ups they multiply (numeric gates folded into them)."""
    h = x2 @ packed.down.T
    if isinstance(routed, tuple):  # one number per adapter: folded into the ups
        return h, packed.weighted_up(routed)
    h_shape, g = _rank_gates(packed, routed, lead)
    hv = h.view(h_shape)
    return (hv.mul_(g) if inplace else hv * g).reshape(-1, packed.down.shape[0]), packed.up_t


def multi_lora_delta(x: torch.Tensor, packed: Packed, gates: list | TokenGates | None = None) -> torch.Tensor:
    """The adapters' update alone, ``sum_i s_i g_i (x A_i^T) B_i^T`` (the dense form, no base layer): what the plugin
    keeps for a layer whose input stays the same from step to step (the prompt's tokens)."""
    lead = x.shape[:-1]
    h, up = _low_rank(x.reshape(-1, x.shape[-1]), packed, _token_gates(gates, x, len(packed.ranks)), lead,
                      not torch.is_grad_enabled())
    return (h @ up).reshape(*lead, up.shape[1])


def _add_mm(base: torch.Tensor, h: torch.Tensor, up_t: torch.Tensor, inplace: bool) -> torch.Tensor:
    """``base + h up_t``, into ``base`` when allowed (``out=`` rather than ``addmm_``: the same GEMM, and one
    that ``torch.utils.flop_counter`` counts)."""
    return torch.addmm(base, h, up_t, out=base) if inplace else torch.addmm(base, h, up_t)


def _segmented(x2: torch.Tensor, base: torch.Tensor, packed: Packed, seg: Segments) -> torch.Tensor:
    """Each adapter on its own tokens: gather the gated-on rows (times their gates), a rank-r_i LoRA per
    adapter on its rows, scatter-add onto the base output."""
    xs = x2.index_select(0, seg.index)
    if not seg.binary:
        xs.mul_(seg.values.to(x2.dtype)[:, None])
    delta = base.new_empty(xs.shape[0], base.shape[1])
    for (a, b), (r0, r1) in zip(seg.bounds, packed.bounds):
        if b > a:
            torch.mm(xs[a:b] @ packed.down[r0:r1].T, packed.up_t[r0:r1], out=delta[a:b])
    return base.index_add_(0, seg.index, delta)


# -- Triton (CUDA; the CPU under TRITON_INTERPRET=1) -------------------------------------------------

def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


_KERNELS: dict = {}


def _configs(names: tuple[str, str]) -> list:
    """Autotuned tile sizes on a GPU (tuned once per layer shape and rank, not per token count: a UNet's first call
    tunes each of its layer shapes once); one small tile under the interpreter (the tests), where tuning only costs
    time."""
    import triton

    if os.environ.get("TRITON_INTERPRET") == "1":
        return [triton.Config({names[0]: 32, names[1]: 32})]
    return [triton.Config({names[0]: m, names[1]: n}, num_warps=w)
            for m, n, w in [(32, 32, 4), (64, 64, 4), (128, 64, 4), (128, 128, 8)]]


def _kernels():
    if _KERNELS:
        return _KERNELS["shrink"], _KERNELS["expand"]
    import triton
    import triton.language as tl

    @triton.autotune(configs=_configs(("BLOCK_M", "BLOCK_K")), key=["K", "R", "GATED", "PRECISION"])
    @triton.jit
    def shrink(x_ptr, a_ptr, g_ptr, h_ptr, M, K, R, stride_xm, stride_am, stride_gm, stride_hm,
               GATED: tl.constexpr, PRECISION: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_M: tl.constexpr,
               BLOCK_K: tl.constexpr):
        # h[m, r] = sum_k x[m, k] a[r, k], times g[m, r] (or g[r]), accumulated in fp32. PRECISION "ieee" (fp32
        # inputs): the products in full fp32; "tf32" (bf16/fp16 inputs, which tf32 holds exactly): on the tensor cores.
        # Widening in registers rather than a 16-bit dot: Triton's interpreter reads a 16-bit dot's operands as raw
        # bits, so that form could not be tested on the CPU; the loads, the traffic that bounds a low-rank GEMM, are
        # the same.
        pid_m, pid_r = tl.program_id(0), tl.program_id(1)
        rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        rr = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
        acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            rk = k0 + tl.arange(0, BLOCK_K)
            xs = tl.load(x_ptr + rm[:, None] * stride_xm + rk[None, :], mask=(rm[:, None] < M) & (rk[None, :] < K), other=0.0)
            as_ = tl.load(a_ptr + rr[None, :] * stride_am + rk[:, None], mask=(rr[None, :] < R) & (rk[:, None] < K), other=0.0)
            acc += tl.dot(xs.to(tl.float32), as_.to(tl.float32), input_precision=PRECISION)
        if GATED:
            g = tl.load(g_ptr + rm[:, None] * stride_gm + rr[None, :], mask=(rm[:, None] < M) & (rr[None, :] < R), other=0.0)
        else:
            g = tl.load(g_ptr + rr, mask=rr < R, other=0.0)[None, :]
        acc = acc * g.to(tl.float32)
        tl.store(h_ptr + rm[:, None] * stride_hm + rr[None, :], acc.to(h_ptr.dtype.element_ty),
                 mask=(rm[:, None] < M) & (rr[None, :] < R))

    @triton.autotune(configs=_configs(("BLOCK_M", "BLOCK_N")), key=["N", "R", "PRECISION"])
    @triton.jit
    def expand(h_ptr, b_ptr, base_ptr, o_ptr, M, N, R, stride_hm, stride_br, stride_om,
               PRECISION: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
        # o[m, n] = base[m, n] + sum_r h[m, r] b[r, n] (base and o of one layout; o is written, never read, so
        # the autotuner may run it repeatedly)
        pid_m, pid_n = tl.program_id(0), tl.program_id(1)
        rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for r0 in range(0, R, BLOCK_R):
            rr = r0 + tl.arange(0, BLOCK_R)
            hs = tl.load(h_ptr + rm[:, None] * stride_hm + rr[None, :], mask=(rm[:, None] < M) & (rr[None, :] < R), other=0.0)
            bs = tl.load(b_ptr + rr[:, None] * stride_br + rn[None, :], mask=(rn[None, :] < N) & (rr[:, None] < R), other=0.0)
            acc += tl.dot(hs.to(tl.float32), bs.to(tl.float32), input_precision=PRECISION)
        mask = (rm[:, None] < M) & (rn[None, :] < N)
        offs = rm[:, None] * stride_om + rn[None, :]
        base = tl.load(base_ptr + offs, mask=mask, other=0.0)
        tl.store(o_ptr + offs, (base.to(tl.float32) + acc).to(o_ptr.dtype.element_ty), mask=mask)

    _KERNELS.update(shrink=shrink, expand=expand)
    return shrink, expand


def multi_lora_triton(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, packed: Packed,
                      gates: list | TokenGates | None = None) -> torch.Tensor:
    """The dense form of :func:`multi_lora_fused` with the shrink (x A^T, gated in rank space) and the expand
    (times the scaled ups, added onto the base output) as Triton kernels. fp32 inputs are multiplied in full
    fp32; bf16/fp16 ones in tf32 on the tensor cores (exact for 16-bit values), accumulated in fp32, rank space
    held in the inputs' 16-bit type (as the torch path holds it)."""
    import triton

    shrink, expand = _kernels()
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1]).contiguous()
    M, K = x2.shape
    R, N = packed.down.shape[0], weight.shape[0]
    precision = "ieee" if x2.dtype == torch.float32 else "tf32"
    routed = _token_gates(gates, x, len(packed.ranks))
    gated = isinstance(routed, TokenGates)
    if gated:
        mult = routed.over_ranks(packed.ranks).expand(*lead, R).reshape(M, R)
    else:
        per = torch.tensor(routed, device=x.device, dtype=torch.float32)
        mult = per.repeat_interleave(torch.tensor(packed.ranks, device=x.device))
    g = mult.to(torch.float32).contiguous()
    h = torch.empty(M, R, device=x.device, dtype=x2.dtype)
    block_r = max(16, triton.next_power_of_2(min(R, 64)))
    shrink[lambda meta: (triton.cdiv(M, meta["BLOCK_M"]), triton.cdiv(R, block_r))](
        x2, packed.down, g, h, M, K, R, x2.stride(0), packed.down.stride(0), g.stride(0) if gated else 0, h.stride(0),
        GATED=gated, PRECISION=precision, BLOCK_R=block_r)
    base = F.linear(x2, weight, bias).contiguous()
    out = torch.empty_like(base)
    expand[lambda meta: (triton.cdiv(M, meta["BLOCK_M"]), triton.cdiv(N, meta["BLOCK_N"]))](
        h, packed.up_t, base, out, M, N, R, h.stride(0), packed.up_t.stride(0), out.stride(0), PRECISION=precision,
        BLOCK_R=16)
    return out.reshape(*lead, N)


# The path multi_lora_linear takes on CUDA: "torch" (the fused path's cuBLAS GEMMs, or the segmented form) or
# "triton" (the kernels above). torch by measurement: on an H200, SDXL at 1024x1024 in bf16, a denoising step with
# the Triton kernels took 1.2 to 1.9 times as long as with the torch path in six of the seven cases measured (rank 16
# and 64, N = 1 to 8), the exception rank 16, N = 8 (0.83x); docs/benchmarks.md, speed-sdxl-cuda. The environment
# variable STUDIO_LORA_CUDA_PATH chooses at import.
CUDA_PATH = os.environ.get("STUDIO_LORA_CUDA_PATH", "torch")
if CUDA_PATH not in ("torch", "triton"):
    raise ValueError(f"STUDIO_LORA_CUDA_PATH={CUDA_PATH!r}: choose torch or triton")


def multi_lora_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, packed: Packed | None,
                      gates: list | TokenGates | None = None) -> torch.Tensor:
    """``x W^T + b + sum_i s_i g_i (x A_i^T) B_i^T`` for the adapters in ``packed`` (:meth:`Packed.pack`, kept
    between calls) by the fused path (two GEMMs, or segmented), or on CUDA the Triton kernels where ``CUDA_PATH``
    says so."""
    if packed is None or not packed.ranks:
        return F.linear(x, weight, bias)
    if x.is_cuda and CUDA_PATH == "triton" and triton_available():
        return multi_lora_triton(x, weight, bias, packed, gates)
    return multi_lora_fused(x, weight, bias, packed, gates)
