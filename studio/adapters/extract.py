"""Extract a LoRA from a fine-tuned model: the truncated SVD of each layer's weight difference (kohya's
``extract_lora_from_models.py``).

For every UNet layer ``layers`` names (the attention projections by default, the transformer blocks' other linears
and, with ``conv``, the ResNet convolutions), ``dW = W_tuned - W_base`` is factored as ``U S V^T`` and its ``rank``
largest singular triplets are written as a plain LoRA (``alpha = k``, ``sqrt(s)`` on each side), so the file on the
base model approximates the fine-tuned one as well as any rank-``rank`` update can (Eckart-Young). ``fro`` keeps per
layer the fewest values that hold that share of the difference's Frobenius norm, as ``studio resize`` does; singular
values below ``RELATIVE_FLOOR`` (1e-5) of a layer's largest are float rounding and never kept, so a difference of
rank 2 is written at rank 2 whatever ``rank``. Layers whose largest difference is at most ``min_diff`` are left out. Both models are read from safetensors only.

    studio extract --base runs/base-model --tuned runs/finetuned-model --rank 16 -o finetune-lora.safetensors
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from studio.adapters.form import Adapter, AdapterMeta, LoraWeights, canonical_name
from studio.adapters.resize import check_resize, kept_rank

RELATIVE_FLOOR = 1e-5


def factor(delta: torch.Tensor, rank: int, fro: float | None = None) -> tuple[LoraWeights, float]:
    """The best approximation of ``delta`` (a linear's ``(out, in)`` or a conv's ``(out, in, kh, kw)`` weight) at the
    rank :func:`~studio.adapters.resize.kept_rank` picks, as a LoRA with scale 1, and the share of its Frobenius
    norm kept."""
    flat = delta.flatten(1).double()
    u, s, vt = torch.linalg.svd(flat, full_matrices=False)
    # values below RELATIVE_FLOOR of the largest are the two models' float rounding, not an update: never kept
    real = max(1, int((s > s[0] * RELATIVE_FLOOR).sum()))
    k = min(kept_rank(s, rank, fro), real)
    total = float(s.square().sum())
    kept = math.sqrt(float(s[:k].square().sum()) / total) if total > 0 else 1.0
    root = s[:k].sqrt()
    up, down = (u[:, :k] * root).float(), (root[:, None] * vt[:k]).float()
    if delta.ndim == 4:
        up, down = up.reshape(up.shape[0], k, 1, 1), down.reshape(k, *delta.shape[1:])
    return LoraWeights(down.contiguous(), up.contiguous(), alpha=float(k)), kept


def _unet(folder: Path, what: str):
    from diffusers import UNet2DConditionModel

    if not (folder / "unet").is_dir():
        raise FileNotFoundError(f"{what} {folder}: no unet/ folder; give a diffusers model folder")
    try:
        return UNet2DConditionModel.from_pretrained(str(folder), subfolder="unet", use_safetensors=True,
                                                    local_files_only=True)
    except OSError as e:  # no .safetensors weights (a pickle is never read)
        raise ValueError(f"{what} {folder}: its UNet has no safetensors weights ({type(e).__name__}); pickled"
                         " weights are not read") from None


def extract(base: str | Path, tuned: str | Path, rank: int = 16, fro: float | None = None,
            layers: tuple[str, ...] | None = None, conv: bool = False,
            min_diff: float = 1e-6) -> tuple[Adapter, dict[str, float]]:
    """The LoRA that takes ``base``'s UNet towards ``tuned``'s (both diffusers folders of one architecture), and a
    summary: layers compared and written, the smallest and mean share of a written layer's difference kept.
    ``layers``: module name endings (default: the attention projections, the trainers' default)."""
    from studio.families import detect_family
    from studio.plugin import base_model_hash
    from studio.trainers.dreambooth import UNET_TARGETS, unet_targets

    layers = layers or UNET_TARGETS

    check_resize(rank, fro)
    if min_diff < 0:
        raise ValueError(f"--min-diff must be 0 or positive, got {min_diff:g}")
    base, tuned = Path(base), Path(tuned)
    family = detect_family(base)
    if detect_family(tuned).name != family.name:
        raise ValueError(f"--base {base} is a {family.name} model but --tuned {tuned} a {detect_family(tuned).name} one")
    unet_b, unet_t = _unet(base, "--base"), _unet(tuned, "--tuned")
    sd_b, sd_t = unet_b.state_dict(), unet_t.state_dict()
    for key, tensor in sd_b.items():
        if key not in sd_t or sd_t[key].shape != tensor.shape:
            got = "missing" if key not in sd_t else f"of shape {tuple(sd_t[key].shape)}"
            raise ValueError(f"--tuned {tuned} is not the same architecture as --base {base}: its {key} is {got},"
                             f" the base's {tuple(tensor.shape)}")
    paths = unet_targets(unet_b, (*layers, *(("conv1", "conv2") if conv else ())))
    modules, shares = {}, []
    for path in paths:
        delta = sd_t[f"{path}.weight"].float() - sd_b[f"{path}.weight"].float()
        if float(delta.abs().max()) <= min_diff:
            continue
        modules[canonical_name("unet", unet_b, path)], share = factor(delta, rank, fro)
        shares.append(share)
    if not modules:
        raise ValueError(f"--tuned {tuned} does not differ from --base {base} by more than {min_diff:g} in any of the"
                         f" {len(paths)} layers compared; nothing to extract")
    meta = AdapterMeta(family=family.name, base_model=base.name, base_hash=base_model_hash(unet_b), trainer="extract",
                       rank=max(w.rank for w in modules.values()),
                       extra={"tuned_model": tuned.name, **({"fro": fro} if fro is not None else {})})
    summary = {"compared": len(paths), "written": len(modules), "min_kept": min(shares),
               "mean_kept": sum(shares) / len(shares)}
    return Adapter(modules, meta), summary
