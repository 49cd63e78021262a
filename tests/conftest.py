"""Tests run offline, on the CPU, with tiny or embedded models only."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
# Triton kernels run under Triton's interpreter on the CPU; it must be set before anything imports triton
os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402

from studio.adapters import Adapter, AdapterMeta, LoraWeights  # noqa: E402
from studio.adapters.form import canonical_name  # noqa: E402


def random_adapter(pipe, rank: int = 4, seed: int = 0, scale: float = 0.1) -> Adapter:
    """LoRA on every attention projection of the UNet and both text encoders, varied ranks/alphas."""
    g = torch.Generator().manual_seed(seed)
    modules = {}
    for component in ("unet", "text_encoder", "text_encoder_2"):
        model = getattr(pipe, component)
        for name, m in model.named_modules():
            if isinstance(m, torch.nn.Linear) and name.rsplit(".", 1)[-1] in {"to_q", "to_k", "to_v", "0", "q_proj", "v_proj"}:
                r = rank if len(modules) % 5 else rank // 2
                alpha = float(r) if len(modules) % 3 else 0.7 * r
                modules[canonical_name(component, model, name)] = LoraWeights(
                    torch.randn(r, m.in_features, generator=g) * scale, torch.randn(m.out_features, r, generator=g) * scale, alpha)
    meta = AdapterMeta(family="sdxl", base_model="tiny-sdxl-world", trainer="test", token="sks", class_noun="shape",
                       steps=10, dataset={"images": 4})
    return Adapter(modules, meta)
