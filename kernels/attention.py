"""Region-masked attention: which keys each query may see, decided by region labels, in one call per layer.

A :class:`RegionMask` gives every query token and every key token a small integer label (for image tokens:
the set of boxes the token lies in, as a bit mask; for expanded prompt keys: which prompt segment it is) and
a table ``allowed[query label, key label]``. That describes LoRA-Composer's regional cross-attention and
its isolated self-attention, for any number of regions, without a call per region. :func:`region_attention`
runs it:

- on CUDA, for layers with many keys (``FLEX_MIN_KEYS``), with FlexAttention
  (``torch.nn.attention.flex_attention``), the table read inside the kernel as a block mask, on the tokens sorted by label (a gather in, one out) so that whole blocks are hidden and skipped
  or allowed without a mask lookup, rather than every block mixed;
- else with ``scaled_dot_product_attention`` and the dense boolean mask (the table expanded to
  ``(Nq, Nk)``, shared by the batch and the heads);
- unmasked attention on CUDA goes to xformers' memory-efficient attention when xformers is installed.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F


@dataclass(eq=False)
class RegionMask:
    q_labels: torch.Tensor  # (Nq,) int64
    k_labels: torch.Tensor  # (Nk,) int64
    table: torch.Tensor  # (Lq, Lk) bool: may a query of label a see a key of label b
    _cache: dict = field(default_factory=dict, repr=False)

    def dense(self) -> torch.Tensor:
        """(Nq, Nk) bool."""
        key = ("dense", self.q_labels.device)
        if key not in self._cache:
            self._cache[key] = self.table[self.q_labels][:, self.k_labels]
        return self._cache[key]

    def to(self, device) -> RegionMask:
        if self.q_labels.device == torch.device(device):
            return self
        return RegionMask(self.q_labels.to(device), self.k_labels.to(device), self.table.to(device))

    def order(self):
        """(query order, its inverse, key order): the tokens sorted by label (stably), so that each label's tokens
        are contiguous and FlexAttention's blocks are mostly all allowed or all hidden (skipped) rather than mixed.
        Attention is the same on permuted tokens: queries are rows, and a softmax over keys does not see their order."""
        key = ("order", self.q_labels.device)
        if key not in self._cache:
            order_q = torch.argsort(self.q_labels, stable=True)
            self._cache[key] = (order_q, torch.argsort(order_q), torch.argsort(self.k_labels, stable=True))
        return self._cache[key]

    def block_mask(self, heads: int):
        """FlexAttention's block mask over the tokens in :meth:`order` (cached per head count)."""
        from torch.nn.attention.flex_attention import create_block_mask

        key = ("block", heads, self.q_labels.device)
        if key not in self._cache:
            order_q, _, order_k = self.order()
            q_labels, k_labels, table = self.q_labels[order_q], self.k_labels[order_k], self.table

            def mask_mod(b, h, q_idx, kv_idx):
                return table[q_labels[q_idx], k_labels[kv_idx]]

            self._cache[key] = create_block_mask(mask_mod, None, None, len(q_labels), len(k_labels),
                                                 device=str(self.q_labels.device))
        return self._cache[key]


def box_labels(inside: torch.Tensor) -> torch.Tensor:
    """(K, N) bool (token n in box k) -> (N,) labels: the bit mask of the boxes each token lies in."""
    weights = 2 ** torch.arange(inside.shape[0], device=inside.device)
    return (inside.long() * weights[:, None]).sum(0)


def isolation_mask(inside: torch.Tensor) -> RegionMask:
    """Self-attention isolation: a token inside a box does not see tokens that are inside boxes but share
    none with it; it sees its own boxes and the background (and background tokens see everything)."""
    labels = box_labels(inside)
    n_labels = 2 ** inside.shape[0]
    a = torch.arange(n_labels, device=inside.device)
    # key b is hidden from query a when b is in some box and shares no box with a, while a is in a box
    table = ~((a[:, None] != 0) & (a[None, :] != 0) & ((a[:, None] & a[None, :]) == 0))
    return RegionMask(labels, labels, table)


def regional_cross_mask(inside: torch.Tensor, segments: list[tuple[int, int, int | None]]) -> RegionMask:
    """Expanded cross-attention: tokens outside every box see the global segment (owner None); a token in
    box k sees concept k's segment (and those of every box it lies in)."""
    q_labels = box_labels(inside)
    n_keys = segments[-1][1]
    k_labels = torch.zeros(n_keys, dtype=torch.long, device=inside.device)
    for start, end, owner in segments:
        k_labels[start:end] = 0 if owner is None else owner + 1
    n_q = 2 ** inside.shape[0]
    a = torch.arange(n_q, device=inside.device)
    table = torch.zeros(n_q, inside.shape[0] + 1, dtype=torch.bool, device=inside.device)
    table[:, 0] = a == 0
    for k in range(inside.shape[0]):
        table[:, k + 1] = (a >> k) & 1 == 1
    return RegionMask(q_labels, k_labels, table)


# FlexAttention where the keys are at least this many (SDXL's 64x64 self-attention at 1024x1024); with fewer (its
# 32x32 level, the expanded prompts of cross-attention) SDPA with the dense boolean mask is faster, the mask being
# small: on an H200, bf16, bench/attention.py measured 0.15-0.26 ms a call for FlexAttention at 1024 keys and less,
# most of it the compiled call's fixed cost, and 0.055-0.11 ms for SDPA with the dense boolean mask on those layers.
FLEX_MIN_KEYS = 2048


def _flex():
    try:
        from torch.nn.attention.flex_attention import flex_attention
    except ImportError:  # older torch
        return None
    if "compiled" not in _FLEX:
        _FLEX["compiled"] = torch.compile(flex_attention, dynamic=False)
    return _FLEX["compiled"]


_FLEX: dict = {}


def _xformers():
    try:
        import xformers.ops as xops
    except ImportError:
        return None
    return xops


def region_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: RegionMask | torch.Tensor | None = None,
                     scale: float | None = None, backend: str = "auto") -> torch.Tensor:
    """Attention of ``q (B, H, Nq, D)`` over ``k, v (B, H, Nk, D)`` where ``mask`` allows (a
    :class:`RegionMask`, a boolean tensor broadcastable to ``(B, H, Nq, Nk)``, or None). ``backend``:
    auto, flex, sdpa or xformers."""
    if backend == "auto":
        if q.is_cuda and isinstance(mask, RegionMask) and k.shape[-2] >= FLEX_MIN_KEYS and _flex() is not None:
            backend = "flex"
        elif q.is_cuda and mask is None and _xformers() is not None:
            backend = "xformers"
        else:
            backend = "sdpa"
    if backend == "flex":
        if not isinstance(mask, RegionMask):
            raise ValueError("the flex backend takes a RegionMask")
        mask = mask.to(q.device)
        order_q, back, order_k = mask.order()
        q, k, v = q.index_select(2, order_q), k.index_select(2, order_k), v.index_select(2, order_k)
        out = _flex()(q, k, v, block_mask=mask.block_mask(q.shape[1]), scale=scale)
        return out.index_select(2, back)
    if backend == "xformers":
        xops = _xformers()
        if xops is None:
            raise ValueError("backend xformers: xformers is not installed (the [gpu] extra has it)")
        if mask is not None:
            raise ValueError("the xformers backend here is for unmasked attention")
        out = xops.memory_efficient_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), scale=scale)
        return out.transpose(1, 2)
    if backend != "sdpa":
        raise ValueError(f"backend {backend!r}: choose auto, flex, sdpa or xformers")
    dense = mask.to(q.device).dense() if isinstance(mask, RegionMask) else mask
    return F.scaled_dot_product_attention(q, k, v, attn_mask=dense, scale=scale)
