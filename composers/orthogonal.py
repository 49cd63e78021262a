"""Orthogonal merging: several adapters into one file whose parts do not interfere.

In the manner of DO-Merging (decouple magnitude and direction, orthogonalise the directions, data-free),
per target layer with adapters ``dW_i = w_i (alpha_i/r_i) U_i A_i``:

1. **orthogonalise** the output subspaces: with ``Q = [U_1 .. U_K]`` and ``G`` the block diagonal of the
   ``U_i^T U_i``, ``Q' = Q (Q^T Q)^(-1/2) G^(1/2)``. Then ``U'_i^T U'_j = 0`` for ``i != j`` (no adapter's
   output lies along another's) while each ``U'_i^T U'_i = U_i^T U_i`` (each adapter's own geometry is
   kept); it is the block form of Löwdin's symmetric orthogonalisation, a closed form where the paper
   runs a few data-free gradient steps;
2. **restore magnitudes**: each merged part's column norms (its magnitude vector, as in DoRA/DO-Merging)
   are scaled back to the original ``dW_i``'s, so orthogonalising changes directions only;
3. the merged layer is the exact sum, stored as one LoRA of rank ``sum r_i`` (ups side by side, downs
   stacked), so any LoRA loader reads it.

A layer only one adapter targets is copied as it is. The training-time counterpart (each concept's
down-projection drawn from its own slice of one orthonormal basis, Orthogonal Adaptation) is
``studio train dreambooth --orthogonal-basis SEED:INDEX``.
"""

from __future__ import annotations

import torch
from studio.composers.base import Composer, Concept

from studio.adapters import Adapter, AdapterMeta, LoraWeights
from studio.adapters.form import joined_embeddings


def _inv_sqrt(m: torch.Tensor, eps: float = 1e-10) -> torch.Tensor:
    vals, vecs = torch.linalg.eigh(m)
    return vecs @ torch.diag(vals.clamp_min(eps).rsqrt()) @ vecs.T


def _sqrt(m: torch.Tensor) -> torch.Tensor:
    vals, vecs = torch.linalg.eigh(m)
    return vecs @ torch.diag(vals.clamp_min(0).sqrt()) @ vecs.T


def orthogonal_ups(ups: list[torch.Tensor]) -> list[torch.Tensor]:
    """Block-Löwdin: ups with mutually orthogonal column spaces and each block's Gram matrix kept."""
    q = torch.cat(ups, dim=1).double()
    if q.shape[1] > q.shape[0]:  # more rank than output features: the subspaces cannot all be orthogonal
        return ups
    blocks = torch.block_diag(*[u.double().T @ u.double() for u in ups])
    q2 = q @ _inv_sqrt(q.T @ q) @ _sqrt(blocks)
    out, start = [], 0
    for u in ups:
        out.append(q2[:, start : start + u.shape[1]].to(u.dtype))
        start += u.shape[1]
    return out


def merge_layer(parts: list[tuple[LoraWeights, float]], orthogonalize: bool = True) -> LoraWeights:
    """One layer's adapters (each with its weight) merged as described in the module's docstring;
    ``orthogonalize=False`` is the plain weighted sum (the naive merge), also exact."""
    if len(parts) == 1:
        lora, w = parts[0]
        return LoraWeights(lora.down.clone(), lora.up * w, lora.alpha, lora.kind)
    conv = parts[0][0].down.ndim == 4
    downs = [lora.down.flatten(1).float() for lora, _ in parts]
    ups = [lora.up.flatten(1).float() * (w * lora.scale) for lora, w in parts]
    new_ups = orthogonal_ups(ups) if orthogonalize else ups
    new_downs = []
    for up, new_up, down in zip(ups, new_ups, downs):
        before = (up @ down).norm(dim=0)
        after = (new_up @ down).norm(dim=0)
        ratio = torch.where(after > 1e-12, before / after.clamp_min(1e-12), torch.ones_like(after))
        new_downs.append(down * ratio[None, :])  # column magnitudes of the part back to the original's
    down = torch.cat(new_downs)
    up = torch.cat(new_ups, dim=1)
    rank = down.shape[0]
    if conv:
        down = down.reshape(rank, *parts[0][0].down.shape[1:])
        up = up.reshape(up.shape[0], rank, 1, 1)
    return LoraWeights(down, up, alpha=float(rank))  # alpha = rank: scale 1, the factors carry the weights


def merge(adapters: list[Adapter], weights: list[float] | None = None, orthogonalize: bool = True) -> Adapter:
    """The orthogonal merge of ``adapters`` (with ``weights``, 1.0 each by default) as one adapter
    (``orthogonalize=False``: their weighted sum)."""
    if not adapters:
        raise ValueError("nothing to merge: give at least one adapter")
    weights = weights or [1.0] * len(adapters)
    layers: dict[str, list] = {}
    for adapter, w in zip(adapters, weights):
        for name, lora in adapter.modules.items():
            layers.setdefault(name, []).append((lora, w))
    first = adapters[0].meta
    for a in adapters[1:]:
        if a.meta.base_hash and first.base_hash and a.meta.base_hash != first.base_hash:
            raise ValueError(f"adapters {first.token or 'first'} and {a.meta.token or 'another'} were trained on different"
                             f" base models ({first.base_hash}, {a.meta.base_hash}); merge adapters of one base model")
    merged = {name: merge_layer(parts, orthogonalize) for name, parts in layers.items()}
    meta = AdapterMeta(family=first.family, base_model=first.base_model, base_hash=first.base_hash,
                       trainer=f"merge:{'orthogonal' if orthogonalize else 'sum'}",
                       token=" ".join(a.meta.token for a in adapters if a.meta.token),
                       extra={"merged": [a.meta.to_dict() for a in adapters], "weights": list(weights)})
    return Adapter(merged, meta, joined_embeddings(adapters))


class Orthogonal(Composer):
    """Merges the concepts' adapters into one (``merges``); sampling then uses that one adapter everywhere."""

    name = "orthogonal"
    merges = True

    def merge(self, concepts: list[Concept]) -> Adapter:
        return merge([c.adapter for c in concepts], [c.weight for c in concepts])
