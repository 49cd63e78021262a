"""K-LoRA's training-free selection of a subject and a style adapter (Ouyang et al. 2025, "K-LoRA: Unlocking
Training-Free Fusion of Any Subject and Style LoRAs").

Two adapters: the content (subject) adapter first, the style adapter second. In every adapted layer, at
every denoising step, only one of the two acts, the one whose update has the larger top-``k`` mass:

- ``S_c = sum of the k largest |ΔW_c|``, ``S_s`` the same for the style adapter, with ``ΔW = scale · U D`` the
  layer's update as it acts (a convolution's kernel flattened);
- the content adapter acts where ``S_c / γ > S_s · (alpha · p + beta)``, the style adapter elsewhere;
- ``γ``: the mean over the layers both adapt of ``Σ|ΔW_c| / Σ|ΔW_s|`` (the two adapters' overall size ratio,
  so that neither wins every layer because it was trained larger);
- ``p``: how far sampling is, ``1 - t / 1000`` (0 at the first, noisiest step, near 1 at the last): the style
  adapter's share grows from ``beta`` to ``alpha + beta`` as sampling goes on, so the subject's layout forms
  first and the style's detail comes after. The paper's defaults: ``k = 64``, ``alpha = 1.5``, ``beta = 0.5``.

A layer only one of them adapts keeps that adapter. Gates are numbers per layer and step (the same on every
token), so the cross-attention keys and values are selected too.

    studio generate "a sks shape, zxy" --compose klora --adapter runs/star/adapter.safetensors \\
        --adapter runs/ringed/adapter.safetensors
"""

from __future__ import annotations

import torch
from studio.composers.base import Composer, Run

NUM_TRAIN_TIMESTEPS = 1000


def update(stack, i: int) -> torch.Tensor:
    """Adapter ``i``'s update on ``stack`` as a matrix (out, in·kh·kw), float32."""
    down = stack.downs[i].weight.detach().float().flatten(1)
    up = stack.ups[i].weight.detach().float().flatten(1)
    return stack.scales[i] * up @ down


def top_k_mass(delta: torch.Tensor, k: int) -> float:
    """The sum of the ``k`` largest absolute entries of ``delta`` (all of them where it has fewer)."""
    flat = delta.abs().flatten()
    return float(flat.topk(min(k, flat.numel())).values.sum())


class KLoRA(Composer):
    name = "klora"
    static_gates = False  # the selection follows the timestep
    gates_text_layers = True  # scalar gates: the cross-attention keys/values are selected as well

    def __init__(self, k: int = 64, alpha: float = 1.5, beta: float = 0.5):
        if k < 1:
            raise ValueError(f"k must be at least 1, got {k}")
        if alpha < 0 or beta < 0 or alpha + beta <= 0:
            raise ValueError(f"alpha and beta must be 0 or positive and not both 0, got alpha={alpha}, beta={beta}")
        self.k, self.alpha, self.beta = k, alpha, beta

    def prepare(self, run: Run) -> None:
        from studio.plugin import LoraStack

        if len(run.concepts) != 2:
            raise ValueError(f"klora selects between two adapters, a content (subject) adapter then a style adapter;"
                             f" got {len(run.concepts)}")
        masses: dict[int, tuple[float, float]] = {}  # id(stack) -> (S_c, S_s), layers both adapt
        ratios = []
        for stack in run.pipe.unet.modules():
            if not isinstance(stack, LoraStack) or stack.router is not run:
                continue
            at = {run.index[n]: i for i, n in enumerate(stack.names) if n in run.index}
            if len(at) != 2:
                continue
            dc, ds = update(stack, at[0]), update(stack, at[1])
            masses[id(stack)] = (top_k_mass(dc, self.k), top_k_mass(ds, self.k))
            total_s = float(ds.abs().sum())
            if total_s > 0:
                ratios.append(float(dc.abs().sum()) / total_s)
        run.state["masses"] = masses
        run.state["gamma"] = sum(ratios) / len(ratios) if ratios else 1.0

    def progress(self, run: Run) -> float:
        t = run.timestep
        t = float(t.flatten()[0]) if isinstance(t, torch.Tensor) else float(t or 0)
        return min(1.0, max(0.0, 1.0 - t / NUM_TRAIN_TIMESTEPS))

    def winner(self, run: Run, stack) -> int | None:
        """0 (content) or 1 (style) on ``stack`` at the current step; None where only one adapter is there."""
        masses = run.state["masses"].get(id(stack))
        if masses is None:
            return None
        s_c, s_s = masses
        gamma = run.state["gamma"] or 1.0
        return 0 if s_c / gamma > s_s * (self.alpha * self.progress(run) + self.beta) else 1

    def gate(self, run: Run, stack, x: torch.Tensor, k: int):
        won = self.winner(run, stack)
        weight = run.concepts[k].weight
        return weight if won is None or won == k else 0.0
