"""SingLoRA (Bensaïd et al. 2025, "SingLoRA: Low Rank Adaptation Using a Single Matrix").

One matrix ``A`` per target layer instead of LoRA's pair: ``delta_W = (alpha / r) * u(t) * A Aᵀ``,
with the ramp ``u(t) = min(t / T, 1)`` that makes the first step the base model (``A`` itself is
initialised like a linear layer's weight, not at zero). For a non-square weight
``W: (d_out, d_in)`` the paper keeps one ``A`` of ``max(d_out, d_in)`` rows and truncates it for
the shorter side: ``delta_W = (alpha / r) * u(t) * A[:d_out] @ A[:d_in]ᵀ``. Half the parameters of a
LoRA of the same rank on a square layer.

On disk it is a plain LoRA (``up = u * A[:d_out]``, ``down = A[:d_in]ᵀ``, the same alpha), which
any LoRA loader reads and which gives exactly the same ``delta_W``::

    >>> import torch
    >>> A = torch.arange(6.).reshape(3, 2)              # d_out = 3, d_in = 2, rank 2
    >>> delta(A, d_out=3, d_in=2, alpha=2.0, u=1.0)[0].tolist()   # row 0 of A[:3] @ A[:2].T
    [1.0, 3.0]
    >>> to_lora(A, d_out=3, d_in=2, alpha=2.0, u=1.0).delta()[0].tolist()
    [1.0, 3.0]

``--adapter singlora`` selects it in every trainer; ``--singlora-ramp T`` sets the ramp (default:
a tenth of the steps).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from studio.adapters.form import LoraWeights

PARAM = "singlora_A"  # the parameter's name on each target module (checkpoints use it)


def ramp(step: int, ramp_steps: int) -> float:
    """The paper's ``u(t) = min(t / T, 1)``; ``T = 0`` means no ramp."""
    return 1.0 if ramp_steps <= 0 else min(step / ramp_steps, 1.0)


def factors(A: torch.Tensor, d_out: int, d_in: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(A[:d_out], A[:d_in])``: the output-side and input-side factors of one ``A``."""
    if A.shape[0] != max(d_out, d_in):
        raise ValueError(f"SingLoRA matrix has {A.shape[0]} rows; a ({d_out}, {d_in}) weight needs {max(d_out, d_in)}")
    return A[:d_out], A[:d_in]


def delta(A: torch.Tensor, d_out: int, d_in: int, alpha: float, u: float) -> torch.Tensor:
    """The dense update ``(alpha / r) * u * A[:d_out] @ A[:d_in]ᵀ``."""
    a_out, a_in = factors(A, d_out, d_in)
    return (alpha / A.shape[1]) * u * a_out @ a_in.T


def to_lora(A: torch.Tensor, d_out: int, d_in: int, alpha: float, u: float) -> LoraWeights:
    """A plain LoRA pair with exactly the same ``delta_W``."""
    a_out, a_in = factors(A.detach().float().cpu(), d_out, d_in)
    return LoraWeights(down=a_in.T.contiguous().clone(), up=(u * a_out).contiguous().clone(), alpha=alpha)


class Clock:
    """The optimizer step the ramp reads; the training loop advances it."""

    def __init__(self, ramp_steps: int) -> None:
        self.step = 0
        self.ramp_steps = ramp_steps

    @property
    def u(self) -> float:
        return ramp(self.step, self.ramp_steps)


def attach(layer: torch.nn.Linear, rank: int, alpha: float, clock: Clock) -> torch.nn.Parameter:
    """Give ``layer`` a SingLoRA matrix (Kaiming-uniform, fan-in ``max(d_out, d_in)``) and a forward hook
    that adds ``(alpha / r) * u(t) * x A[:d_in] A[:d_out]ᵀ``; returns the new parameter."""
    if not isinstance(layer, torch.nn.Linear):
        raise TypeError(f"SingLoRA targets linear layers, got {type(layer).__name__}")
    if hasattr(layer, PARAM):
        raise ValueError("layer already has a SingLoRA matrix")
    d_out, d_in = layer.weight.shape
    n = max(d_out, d_in)
    # Kaiming-uniform as for a LoRA down-projection of this layer (fan-in n, bound 1/sqrt(n)). Taking the
    # fan-in from the rank instead (the (n, r) tensor's own second dimension) makes (alpha/r) A Aᵀ larger
    # than W itself on small layers: measured, it halved the prompt fidelity of the embedded model.
    A = torch.empty(n, rank, device=layer.weight.device, dtype=layer.weight.dtype).uniform_(-1 / math.sqrt(n), 1 / math.sqrt(n))
    param = torch.nn.Parameter(A)
    layer.register_parameter(PARAM, param)
    layer._singlora_alpha = float(alpha)  # type: ignore[attr-defined]
    scale = alpha / rank

    def hook(module, args, out):
        x = args[0]
        a = getattr(module, PARAM)
        a_out, a_in = a[:d_out], a[:d_in]
        return out + (scale * clock.u) * F.linear(F.linear(x.to(a.dtype), a_in.T), a_out).to(out.dtype)

    layer._singlora_hook = layer.register_forward_hook(hook)  # type: ignore[attr-defined]
    return param


def detach(layer: torch.nn.Linear) -> None:
    """Remove the matrix and the hook (the base layer is as it was)."""
    layer._singlora_hook.remove()  # type: ignore[attr-defined]
    del layer._singlora_hook, layer._singlora_alpha
    delattr(layer, PARAM)
