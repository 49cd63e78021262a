"""Multi-adapter LoRA linear: ``base(x) + sum_i s_i * g_i ⊙ (x A_i^T) B_i^T``.

Three paths, one answer (tests hold them to the reference):

- :func:`multi_lora_reference`: a Python loop over adapters (what a naive implementation does);
- :func:`multi_lora_fused`: all downs stacked into one ``(R, d_in)`` matrix (``R = sum r_i``), one GEMM
  into rank space, the per-adapter scales and per-token gates applied there (a ``(tokens, R)``
  multiply), one GEMM out of rank space added onto the base output (``addmm``). For N adapters of rank
  r the extra work is that of one rank-``N r`` LoRA, whatever N;
- :func:`multi_lora_triton`: the same two steps as Triton kernels (Punica/vLLM-style shrink and expand)
  for CUDA; correct under ``TRITON_INTERPRET=1`` on the CPU, which is how the tests check it.

``gates`` is one entry per adapter: a number, or a tensor broadcastable to ``x``'s token shape with a
trailing 1 (``(B, N, 1)``), e.g. a region mask. :func:`multi_lora_linear` picks the path.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class Packed:
    """One layer's adapters stacked for the fused paths."""

    down: torch.Tensor  # (R, d_in): every adapter's down, one under another
    up: torch.Tensor  # (d_out, R): every adapter's up, side by side
    scale: torch.Tensor  # (R,): each adapter's alpha/rank, repeated over its rank
    ranks: tuple[int, ...]

    @classmethod
    def pack(cls, downs: list[torch.Tensor], ups: list[torch.Tensor], scales: list[float]) -> Packed:
        if not (len(downs) == len(ups) == len(scales)):
            raise ValueError(f"{len(downs)} downs, {len(ups)} ups and {len(scales)} scales: give one of each per adapter")
        ranks = tuple(int(d.shape[0]) for d in downs)
        ref = downs[0]
        scale = torch.cat([torch.full((r,), float(s), device=ref.device, dtype=ref.dtype) for r, s in zip(ranks, scales)])
        return cls(torch.cat(downs).contiguous(), torch.cat(ups, dim=1).contiguous(), scale, ranks)

    def rank_gates(self, gates: list, x: torch.Tensor) -> torch.Tensor | None:
        """Per-adapter gates as one multiplier in rank space: ``(R,)`` or ``(..., R)``; None if all are 1."""
        if gates is None or all(not isinstance(g, torch.Tensor) and g == 1 for g in gates):
            return self.scale
        if all(not isinstance(g, torch.Tensor) for g in gates):
            per = torch.tensor([float(g) for g in gates], device=x.device, dtype=x.dtype)
            return self.scale * per.repeat_interleave(torch.tensor(self.ranks, device=x.device))
        lead = x.shape[:-1]
        cols = []
        for g, r in zip(gates, self.ranks):
            g = g if isinstance(g, torch.Tensor) else torch.tensor(float(g), device=x.device, dtype=x.dtype)
            cols.append(g.to(x.dtype).expand(*lead, 1).expand(*lead, r))
        return torch.cat(cols, dim=-1) * self.scale


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


def multi_lora_fused(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, packed: Packed,
                     gates: list | None = None) -> torch.Tensor:
    """Two GEMMs for all adapters: ``h = (x A^T) * (scales * gates)`` in rank space, ``out = base + h B^T``."""
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])
    h = x2 @ packed.down.T  # (M, R)
    k, r = len(packed.ranks), packed.ranks[0]
    if gates is not None and any(isinstance(g, torch.Tensor) for g in gates) and packed.ranks == (r,) * k:
        # token gates with equal ranks: one (M, K) gate broadcast over each adapter's r rank columns
        cols = [g.to(x.dtype).expand(*lead, 1) if isinstance(g, torch.Tensor) else x.new_full((*lead, 1), float(g))
                for g in gates]
        per_token = torch.cat(cols, dim=-1).reshape(-1, k, 1)
        h = (h.view(-1, k, r) * per_token * packed.scale.view(k, r)).view(-1, k * r)
    else:
        mult = packed.rank_gates(gates, x)
        h = h * (mult.reshape(-1, mult.shape[-1]) if mult.ndim > 1 else mult)
    base = F.linear(x2, weight, bias)
    return torch.addmm(base, h, packed.up.T).reshape(*lead, weight.shape[0])


# -- Triton (CUDA; the CPU under TRITON_INTERPRET=1) -------------------------------------------------

def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


_KERNELS: dict = {}


def _kernels():
    if _KERNELS:
        return _KERNELS["shrink"], _KERNELS["expand"]
    import triton
    import triton.language as tl

    @triton.jit
    def shrink(x_ptr, a_ptr, g_ptr, h_ptr, M, K, R, stride_xm, stride_am, stride_gm, stride_hm,
               GATED: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr):
        # h[m, r] = sum_k x[m, k] a[r, k], times g[m, r] (or g[r])
        pid_m, pid_r = tl.program_id(0), tl.program_id(1)
        rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        rr = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
        acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            rk = k0 + tl.arange(0, BLOCK_K)
            xs = tl.load(x_ptr + rm[:, None] * stride_xm + rk[None, :], mask=(rm[:, None] < M) & (rk[None, :] < K), other=0.0)
            as_ = tl.load(a_ptr + rr[None, :] * stride_am + rk[:, None], mask=(rr[None, :] < R) & (rk[:, None] < K), other=0.0)
            acc += tl.dot(xs.to(tl.float32), as_.to(tl.float32), input_precision="ieee")
        if GATED:
            g = tl.load(g_ptr + rm[:, None] * stride_gm + rr[None, :], mask=(rm[:, None] < M) & (rr[None, :] < R), other=0.0)
        else:
            g = tl.load(g_ptr + rr, mask=rr < R, other=0.0)[None, :]
        acc = acc * g.to(tl.float32)
        tl.store(h_ptr + rm[:, None] * stride_hm + rr[None, :], acc, mask=(rm[:, None] < M) & (rr[None, :] < R))

    @triton.jit
    def expand(h_ptr, b_ptr, o_ptr, M, N, R, stride_hm, stride_bn, stride_om,
               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr):
        # o[m, n] += sum_r h[m, r] b[n, r]
        pid_m, pid_n = tl.program_id(0), tl.program_id(1)
        rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for r0 in range(0, R, BLOCK_R):
            rr = r0 + tl.arange(0, BLOCK_R)
            hs = tl.load(h_ptr + rm[:, None] * stride_hm + rr[None, :], mask=(rm[:, None] < M) & (rr[None, :] < R), other=0.0)
            bs = tl.load(b_ptr + rn[None, :] * stride_bn + rr[:, None], mask=(rn[None, :] < N) & (rr[:, None] < R), other=0.0)
            acc += tl.dot(hs.to(tl.float32), bs.to(tl.float32), input_precision="ieee")
        mask = (rm[:, None] < M) & (rn[None, :] < N)
        ptrs = o_ptr + rm[:, None] * stride_om + rn[None, :]
        out = tl.load(ptrs, mask=mask, other=0.0)
        tl.store(ptrs, (out.to(tl.float32) + acc).to(out.dtype), mask=mask)

    _KERNELS.update(shrink=shrink, expand=expand)
    return shrink, expand


def multi_lora_triton(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, packed: Packed,
                      gates: list | None = None) -> torch.Tensor:
    """:func:`multi_lora_fused` with the shrink (x A^T, scaled and gated in rank space) and the expand
    (added onto the base output) as Triton kernels."""
    import triton

    shrink, expand = _kernels()
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1]).contiguous()
    M, K = x2.shape
    R, N = packed.down.shape[0], weight.shape[0]
    mult = packed.rank_gates(gates, x)
    gated = mult.ndim > 1
    g = (mult.reshape(-1, R) if gated else mult).to(torch.float32).contiguous()
    h = torch.empty(M, R, device=x.device, dtype=torch.float32)
    block_r = max(16, triton.next_power_of_2(min(R, 64)))
    shrink[(triton.cdiv(M, 32), triton.cdiv(R, block_r))](
        x2, packed.down, g, h, M, K, R, x2.stride(0), packed.down.stride(0), g.stride(0) if gated else 0, h.stride(0),
        GATED=gated, BLOCK_M=32, BLOCK_R=block_r, BLOCK_K=32)
    out = F.linear(x2, weight, bias).contiguous()
    expand[(triton.cdiv(M, 32), triton.cdiv(N, 32))](
        h, packed.up, out, M, N, R, h.stride(0), packed.up.stride(0), out.stride(0), BLOCK_M=32, BLOCK_N=32, BLOCK_R=16)
    return out.reshape(*lead, N)


def multi_lora_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, packed: Packed | None,
                      gates: list | None = None) -> torch.Tensor:
    """``x W^T + b + sum_i s_i g_i (x A_i^T) B_i^T`` for the adapters in ``packed`` (:meth:`Packed.pack`, kept
    between calls) by the fastest path here: Triton on CUDA when installed, else the fused two-GEMM path."""
    if packed is None or not packed.ranks:
        return F.linear(x, weight, bias)
    if x.is_cuda and triton_available():
        return multi_lora_triton(x, weight, bias, packed, gates)
    return multi_lora_fused(x, weight, bias, packed, gates)
