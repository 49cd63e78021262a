"""Resize an adapter to a lower rank: the truncated SVD of each layer's update (kohya's ``resize_lora.py``).

A layer's update ``dW = (alpha / r) * up @ down`` has rank at most ``r``; its best rank-``k`` approximation in the
Frobenius norm (Eckart-Young) keeps the ``k`` largest singular triplets. The SVD is taken without forming ``dW``:
with ``up = Q_u R_u`` and ``down^T = Q_d R_d`` (thin QR), ``dW = scale * Q_u (R_u R_d^T) Q_d^T``, so the SVD of the
small ``r x r`` core ``R_u R_d^T = P S V^T`` gives ``dW = (Q_u P) (scale S) (Q_d V)^T``. The kept triplets are written
as a plain LoRA with ``alpha = k`` (scale 1) and ``sqrt(scale * s)`` on each side, so any loader reads the file.

``rank`` caps every layer; ``fro`` (kohya's ``sv_fro``) instead keeps, per layer, the smallest rank whose update
keeps that fraction of the layer's Frobenius norm (``sqrt(sum of kept s^2) / sqrt(sum of all s^2)``), still at most
``rank``. A convolution's down kernel is flattened for the SVD and reshaped back.
"""

from __future__ import annotations

import dataclasses
import math

import torch

from studio.adapters.form import Adapter, LoraWeights


def singular_triplets(lora: LoraWeights) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(U, s, Vt)`` with ``lora.delta()`` (a conv's flattened to ``(out, in * kh * kw)``) ``= U diag(s) Vt``,
    ``s`` descending, in float64; ``r`` triplets for a rank-``r`` layer."""
    up = lora.up.flatten(1).double()
    down = lora.down.flatten(1).double()
    q_u, r_u = torch.linalg.qr(up)
    q_d, r_d = torch.linalg.qr(down.T)
    p, s, vt = torch.linalg.svd(r_u @ r_d.T)
    return q_u @ p, s * lora.scale, vt @ q_d.T


def kept_rank(s: torch.Tensor, rank: int, fro: float | None) -> int:
    """How many of the singular values ``s`` (descending) to keep: at most ``rank``; with ``fro``, the fewest whose
    share of the Frobenius norm reaches it; at least 1."""
    k = min(rank, len(s))
    if fro is not None:
        energy = torch.cumsum(s.square(), 0)
        total = float(energy[-1])
        if total == 0:  # an update of zeros: one zero pair keeps the layer named
            return 1
        reach = int(torch.searchsorted(energy, torch.tensor(fro**2 * total, dtype=energy.dtype) * (1 - 1e-12)))
        k = min(k, reach + 1)
    return max(k, 1)


def resize_layer(lora: LoraWeights, rank: int, fro: float | None = None) -> tuple[LoraWeights, float]:
    """``lora`` at rank ``kept_rank(...)`` (unchanged, not refactored, where that is its own rank and ``fro`` is not
    given) and the share of its update's Frobenius norm the result keeps."""
    if fro is None and lora.rank <= rank:
        return LoraWeights(lora.down.clone(), lora.up.clone(), lora.alpha, lora.kind), 1.0
    u, s, vt = singular_triplets(lora)
    k = kept_rank(s, rank, fro)
    total = float(s.square().sum())
    kept = math.sqrt(float(s[:k].square().sum()) / total) if total > 0 else 1.0
    root = s[:k].sqrt()
    up = (u[:, :k] * root).to(lora.up.dtype)
    down = (root[:, None] * vt[:k]).to(lora.down.dtype)
    if lora.down.ndim == 4:
        up = up.reshape(up.shape[0], k, 1, 1)
        down = down.reshape(k, *lora.down.shape[1:])
    return LoraWeights(down.contiguous(), up.contiguous(), alpha=float(k), kind=lora.kind), kept


def check_resize(rank: int, fro: float | None) -> None:
    if not 1 <= rank <= 256:
        raise ValueError(f"--rank {rank} is out of range; accepted: 1 to 256")
    if fro is not None and not 0 < fro <= 1:
        raise ValueError(f"--fro {fro:g} is out of range; accepted: above 0, at most 1 (the share of each layer's"
                         " Frobenius norm to keep)")


def resize(adapter: Adapter, rank: int, fro: float | None = None) -> tuple[Adapter, dict[str, float]]:
    """``adapter`` with every layer resized (:func:`resize_layer`), and what was kept: the ranks' range and the
    smallest and mean share of a layer's Frobenius norm."""
    check_resize(rank, fro)
    modules, shares = {}, []
    for name, lora in adapter.modules.items():
        modules[name], share = resize_layer(lora, rank, fro)
        shares.append(share)
    ranks = [w.rank for w in modules.values()]
    before = adapter.meta.rank or max(w.rank for w in adapter.modules.values())
    summary = {"from_rank": before, "rank": max(ranks), "min_rank": min(ranks),
               "min_kept": round(min(shares), 6), "mean_kept": round(sum(shares) / len(shares), 6)}
    extra = {**adapter.meta.extra, "resized": {**summary, **({"fro": fro} if fro is not None else {})}}
    meta = dataclasses.replace(adapter.meta, rank=max(ranks), extra=extra)
    return Adapter(modules, meta, adapter.embeddings), summary
