"""Decoupled content/style training: a subject adapter and a style adapter that combine cleanly.

Two LoRAs on the same UNet projections are trained *together*, each from its own images:

- **joint training with routed gradients**: both adapters are active in every forward pass, so
  each learns in the presence of the other (what they will meet when combined), but the content
  adapter learns only from content examples and the style adapter only from style examples
  (prior-preservation examples teach both to leave the class alone). Routing is exact: a
  non-owning adapter's branch is evaluated with detached weights, so its value is the same and
  only the owner's weights get the gradient.
- **separate subspaces** (``--orthogonal``, on by default; Orthogonal Adaptation, Po et al. 2024, and
  Break-for-Make's split subspaces): each adapter's down-projection is a fixed slice of one random
  orthonormal basis per layer, content and style slices disjoint, and only the up-projections
  train. Then ``ΔW_c ΔW_sᵀ = 0``: the two updates read orthogonal input directions.
- captions: a sidecar ``NAME.txt`` is an image's prompt (kohya's convention), so what the base model
  already knows (a circle's shape in a style image, "striped" in a content image) can be named
  and is not learned into the wrong adapter.

Writes ``content.safetensors``, ``style.safetensors`` and ``adapter.safetensors`` (both, summed
exactly as one LoRA of rank 2r). Every file is a plain LoRA::

    studio train content-style --data my_star/ --style-data ringed_examples/ --output runs/cs
    studio generate "a sks shape, zxy" --adapter runs/cs/adapter.safetensors -o out.png
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from studio.trainers.config import command_from_config, run_command
from studio.trainers.data import group_by_size, load_images
from studio.trainers.dreambooth import DreamBooth, DreamBoothConfig, run_trainer
from studio.trainers.loop import Context, _help, denoise_losses, orthonormal_rows

from studio.adapters import Adapter, AdapterMeta, LoraWeights, save_adapter
from studio.adapters.form import canonical_name

ROLES = ("content", "style")
BOTH = len(ROLES)  # router value: an example every adapter learns from (prior preservation)


@dataclass
class ContentStyleConfig(DreamBoothConfig):
    data: str = field(default="", metadata=_help("Folder of content (subject) images."))
    style_data: str = field(default="", metadata=_help("Folder of style images (one image is enough)."))
    style_token: str = field(default="zxy", metadata=_help("Identifier token for the style."))
    style_prompt: str = field(default="", metadata=_help("Style images' prompt; default 'a {class_noun}, {style_token}'."))
    orthogonal: bool = field(default=True, metadata=_help("Disjoint fixed orthonormal down-projections; only ups train."))

    def check(self) -> None:
        super().check()
        if not self.style_data:
            raise ValueError("--style-data is required: a folder with one or more images of the style")
        if not self.style_token.strip():
            raise ValueError("--style-token must not be empty")
        if self.style_token == self.token:
            raise ValueError(f"--token and --style-token are both {self.token!r}; give two different identifiers")
        if self.train_text_encoder:
            raise ValueError("--train-text-encoder is not supported by the content-style trainer")
        if self.adapter != "lora":
            raise ValueError("--adapter: the content-style trainer trains LoRA pairs (use --orthogonal to fix the downs)")
        if self.attention_loss:
            raise ValueError("--attention-loss is not supported by the content-style trainer (DreamBooth and B-LoRA)")


class Router:
    """Per example of the current batch: which adapter learns from it (0 content, 1 style, 2 both)."""

    def __init__(self) -> None:
        self.owner: torch.Tensor | None = None


def attach_pair(layer: torch.nn.Linear, rank: int, alpha: float, router: Router, orthogonal: bool, seed: int) -> list[torch.nn.Parameter]:
    """Content and style LoRA branches on ``layer`` with routed gradients; returns trainable params."""
    import math

    d_out, d_in = layer.weight.shape
    dev, dt = layer.weight.device, layer.weight.dtype
    params = []
    if orthogonal:
        rows = orthonormal_rows(d_in, 2 * rank, seed).to(dev, dt)
    for k, role in enumerate(ROLES):
        if orthogonal:
            layer.register_buffer(f"lora_{role}_down", rows[k * rank : (k + 1) * rank].clone(), persistent=False)
        else:
            down = torch.empty(rank, d_in, device=dev, dtype=dt)
            torch.nn.init.kaiming_uniform_(down, a=math.sqrt(5))
            layer.register_parameter(f"lora_{role}_down", torch.nn.Parameter(down))
            params.append(getattr(layer, f"lora_{role}_down"))
        layer.register_parameter(f"lora_{role}_up", torch.nn.Parameter(torch.zeros(d_out, rank, device=dev, dtype=dt)))
        params.append(getattr(layer, f"lora_{role}_up"))
    layer._cs_alpha = float(alpha)  # type: ignore[attr-defined]
    scale = alpha / rank

    def hook(module, args, out):
        x = args[0]
        total = out
        for k, role in enumerate(ROLES):
            down, up = getattr(module, f"lora_{role}_down"), getattr(module, f"lora_{role}_up")
            y = F.linear(F.linear(x, down), up) * scale
            if router.owner is not None and module.training:
                frozen = F.linear(F.linear(x, down.detach()), up.detach()) * scale
                learns = ((router.owner == k) | (router.owner == BOTH)).to(y.dtype).view(-1, *([1] * (y.ndim - 1)))
                y = learns * y + (1 - learns) * frozen
            total = total + y
        return total

    layer._cs_hook = layer.register_forward_hook(hook)  # type: ignore[attr-defined]
    return params


def combined(content: LoraWeights, style: LoraWeights) -> LoraWeights:
    """One LoRA of rank ``r_c + r_s`` whose update is exactly the sum of the two."""
    up = torch.cat([content.scale * content.up, style.scale * style.up], dim=1)
    down = torch.cat([content.down, style.down], dim=0)
    return LoraWeights(down, up, alpha=float(down.shape[0]))


class ContentStyle(DreamBooth):
    name = "content-style"
    linear_only = True  # attach_pair's branches are linear; the targets are DreamBooth's (no text encoders here)

    def prepare(self, ctx: Context) -> None:
        cfg: ContentStyleConfig = ctx.cfg
        super().prepare(ctx)  # content images, class images, cached prompt embeddings
        from studio.trainers.dreambooth import _encode

        images, files = load_images(cfg.style_data, ctx.resolution, ctx.size_multiple if cfg.aspect_buckets else 0)
        prompt = (cfg.style_prompt or "a {class_noun}, {style_token}").format(
            token=cfg.token, class_noun=cfg.class_noun, style_token=cfg.style_token)
        captions = [(im.caption if cfg.captions and im.caption else prompt) for im in images]
        groups = group_by_size(images)
        ctx.store["style"] = [
            (self._latents(ctx.pipe, [images[i] for i in idx]),
             torch.tensor([[*images[i].original_size, *images[i].crop_top_left, h, w] for i in idx], dtype=torch.float32),
             [captions[i] for i in idx])
            for (w, h), idx in groups.items()]
        ctx.store["prompts"]["style"] = prompt
        ctx.store["style_files"] = [f.name for f in files]
        with torch.no_grad():
            ctx.store["cond"].update({p: _encode(ctx.pipe, [p]) for p in set(captions) - set(ctx.store["cond"])})
        ctx.store["router"] = Router()

    def inject(self, ctx: Context, targets: dict[str, list[str]], rank: int, alpha: float) -> list[torch.nn.Parameter]:
        cfg: ContentStyleConfig = ctx.cfg
        unet = ctx.pipe.unet
        unet.requires_grad_(False)
        params = []
        for i, path in enumerate(targets["unet"]):
            params += attach_pair(unet.get_submodule(path), rank, alpha, ctx.store["router"], cfg.orthogonal, cfg.seed * 100_003 + i)
        return params

    def loss(self, ctx: Context, step: int, micro: int, g: torch.Generator, rng) -> torch.Tensor:
        cfg: ContentStyleConfig = ctx.cfg
        n = cfg.batch_size * ctx.accelerator.num_processes
        parts = [self._draw(ctx, ctx.store["instance"], rng, n), self._draw(ctx, ctx.store["style"], rng, n)]
        owners = [0, 1]
        if cfg.prior_preservation:
            cls = ctx.store["class"]
            idx = torch.tensor([rng.randrange(len(cls)) for _ in range(n)])
            parts.append((cls[idx], self._cond(ctx, [ctx.store["prompts"]["class"]] * cfg.batch_size)))
            owners.append(BOTH)
        router: Router = ctx.store["router"]

        def route(members: list[int], embeds=None) -> None:  # before each UNet pass: who owns which example
            router.owner = torch.cat([torch.full((cfg.batch_size,), owners[i]) for i in members]).to(ctx.accelerator.device)

        losses = denoise_losses(ctx, parts, g, before_pass=route)
        router.owner = None
        total = losses[0] + losses[1]
        if cfg.prior_preservation:
            total = total + cfg.prior_weight * losses[2]
        return total

    def extract(self, ctx: Context, components: list[str], meta: AdapterMeta) -> Adapter:
        unet = ctx.pipe.unet
        parts: dict[str, dict[str, LoraWeights]] = {role: {} for role in ROLES}
        for path, module in unet.named_modules():
            if hasattr(module, "_cs_alpha"):
                name = canonical_name("unet", unet, path)
                for role in ROLES:
                    down = getattr(module, f"lora_{role}_down").detach().float().cpu().clone()
                    up = getattr(module, f"lora_{role}_up").detach().float().cpu().clone()
                    parts[role][name] = LoraWeights(down, up, module._cs_alpha)
        ctx.store["parts"] = parts
        return Adapter({k: combined(parts["content"][k], parts["style"][k]) for k in parts["content"]}, meta)

    def metadata(self, ctx: Context) -> dict[str, Any]:
        cfg: ContentStyleConfig = ctx.cfg
        meta = super().metadata(ctx)
        meta["dataset"].update(style_images=len(ctx.store["style_files"]), style_files=ctx.store["style_files"],
                               style_prompt=ctx.store["prompts"]["style"])
        meta["extra"] = {"style_token": cfg.style_token, "orthogonal": cfg.orthogonal}
        return meta

    def finalize(self, ctx: Context, adapter: Adapter, out: Path) -> None:
        import copy

        for role in ROLES:
            meta = copy.deepcopy(adapter.meta)
            meta.extra["part"] = role
            save_adapter(Adapter(ctx.store["parts"][role], meta), out.with_name(f"{role}.safetensors"))


command = command_from_config(
    ContentStyleConfig, lambda config_file, overrides: run_trainer(ContentStyle(), ContentStyleConfig, config_file, overrides),
    "Train a content adapter and a style adapter together, so that they combine without interference.")


def main(argv: list[str] | None = None) -> None:
    run_command(command, argv)


if __name__ == "__main__":
    main()
