"""Decoupled content/style training: a subject adapter and a style adapter that combine cleanly.

Two LoRAs on the same UNet projections are trained *together*, each from its own images:

- **one run, routed gradients**: each example says what each adapter does on it (``Router.states``: absent,
  present but frozen, or present and learning), so each adapter learns only from its own images. What the other
  adapter does on them is ``--interplay``:

  - ``present`` (default): it acts, frozen, so each adapter learns in the presence of the other; prior-preservation
    examples teach both together. The grid of docs/benchmarks.md shows what this costs: each adapter learns to undo
    the other's effect on its own images (a style adapter trained so draws its style alone far less than one trained
    apart), and the combined image keeps the shape but loses style;
  - ``apart``: it is absent, and half the prior examples keep each adapter alone to the class: in effect two DreamBooth
    LoRAs trained side by side in one run (the grid's captioned naive sum, with shared class images and caches; each
    adapter sees half the prior examples a DreamBooth run of the same batch would);
  - ``cooperative``: ``apart``, plus on fresh draws of the other adapter's images each adapter learns, with the other
    present and frozen, to leave what the other alone predicts unchanged (a distillation target, as ZipLoRA's). On the
    grid this raises the combined shape and lowers its style: the style adapter learns to stay out of subject images.
  Routing is exact: a frozen branch is evaluated with detached weights, so its value is the same and only the
  learning adapters get the gradient.
- **separate subspaces** (``--orthogonal``; off by default, as the content x style grid of docs/benchmarks.md
  reads worse with it; Orthogonal Adaptation, Po et al. 2024, and Break-for-Make's split subspaces): each
  adapter's down-projection is a fixed slice of one random orthonormal basis per layer, content and
  style slices disjoint, and only the up-projections train. Then ``ΔW_c ΔW_sᵀ = 0``: the two updates read orthogonal input directions.
- captions: a sidecar ``NAME.txt`` is an image's prompt (kohya's convention), so what the base model
  already knows (a circle's shape in a style image, "striped" in a content image) can be named
  and is not learned into the wrong adapter;
- the style adapter's own pace and layers: ``--style-lr-scale`` (its learning rate as a multiple of ``--lr``) and
  ``--style-lora-layers`` (default: ``--lora-layers``, the content adapter's).

With ``--content-adapter`` and ``--style-adapter`` (two LoRAs trained apart, e.g. two DreamBooth runs) it
trains no new adapter but **ZipLoRA's learned merge** (Shah et al. 2023): per layer, one coefficient per
input column for each adapter, ``ΔW = ΔW_c·diag(m_c) + ΔW_s·diag(m_s)``, from ``m = 1``, fitted so the merged
model predicts on the content images' captions what the content adapter alone predicts and on the style
images' what the style adapter alone predicts, with ``--merge-penalty``·Σ_layers |cos(m_c, m_s)| pushing the two
to use different columns. The paper's settings: ``--lr 0.01 --steps 100``. Prior preservation does not apply.

Writes ``content.safetensors``, ``style.safetensors`` and ``adapter.safetensors`` (both, summed
exactly as one LoRA of rank 2r). Every file is a plain LoRA::

    studio train content-style --data my_star/ --style-data ringed_examples/ --output runs/cs
    studio generate "a sks shape, zxy" --adapter runs/cs/adapter.safetensors -o out.png
    studio train content-style --data my_star/ --style-data ringed_examples/ --output runs/zip \
        --content-adapter runs/star/adapter.safetensors --style-adapter runs/ringed/adapter.safetensors --lr 0.01 --steps 100
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from studio.trainers.config import command_from_config, run_command
from studio.trainers.data import load_images
from studio.trainers.dreambooth import (
    DreamBooth,
    DreamBoothConfig,
    bucket_prompts,
    parse_layers,
    run_trainer,
    unet_targets,
)
from studio.trainers.loop import Context, _help, denoise_losses, orthonormal_rows

from studio.adapters import Adapter, AdapterMeta, LoraWeights, save_adapter
from studio.adapters.form import canonical_name

ROLES = ("content", "style")


@dataclass
class ContentStyleConfig(DreamBoothConfig):
    data: str = field(default="", metadata=_help("Folder of content (subject) images."))
    style_data: str = field(default="", metadata=_help("Folder of style images (one image is enough)."))
    style_token: str = field(default="zxy", metadata=_help("Identifier token for the style."))
    style_prompt: str = field(default="", metadata=_help("Style images' prompt; default 'a {class_noun}, {style_token}'."))
    orthogonal: bool = field(default=False, metadata=_help(
        "Disjoint fixed orthonormal down-projections; only ups train (off: both adapters' downs and ups train, which"
        " read better on the content x style grid of docs/benchmarks.md)."))
    content_adapter: str = field(default="", metadata=_help(
        "ZipLoRA: a trained content LoRA (.safetensors); with --style-adapter, learn how to merge the two instead of"
        " training new adapters."))
    style_adapter: str = field(default="", metadata=_help("ZipLoRA: a trained style LoRA (.safetensors)."))
    style_lr_scale: float = field(default=1.0, metadata=_help("The style adapter's learning rate as a multiple of --lr."))
    style_lora_layers: str = field(default="", metadata=_help(
        "The UNet layers of the style adapter (as --lora-layers, which then names the content adapter's);"
        " default: the same as --lora-layers."))
    interplay: str = field(default="present", metadata=_help(
        "What the other adapter does on an adapter's examples: present (acts, frozen: each learns in the other's"
        " presence), apart (absent: two DreamBooth LoRAs trained in one run, each kept to the class alone), or"
        " cooperative (apart, plus each learns on the other's examples to leave what the other alone predicts"
        " unchanged)."))
    merge_penalty: float = field(default=0.01, metadata=_help("ZipLoRA: weight of Σ_layers |cos(m_content, m_style)|."))

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
        if self.pivotal and self.content_adapter:
            raise ValueError("--pivotal trains the identifiers' embeddings with the adapters; the ZipLoRA merge"
                             " (--content-adapter/--style-adapter) trains merge coefficients only")
        if self.pivotal and (len(self.style_token.split()) != 1 or "." in self.style_token):
            raise ValueError(f"--pivotal makes --style-token one new token, so it must be one word without dots; got"
                             f" {self.style_token!r}")
        if self.adapter != "lora":
            raise ValueError("--adapter: the content-style trainer trains LoRA pairs (use --orthogonal to fix the downs)")
        if self.attention_loss:
            raise ValueError("--attention-loss is not supported by the content-style trainer (DreamBooth and B-LoRA)")
        if self.masked_loss:
            raise ValueError("--masked-loss is not supported by the content-style trainer (DreamBooth and B-LoRA)")
        if bool(self.content_adapter) != bool(self.style_adapter):
            raise ValueError("--content-adapter and --style-adapter go together (ZipLoRA: merge two trained LoRAs);"
                             " give both, or neither to train new adapters")
        if self.interplay not in INTERPLAY:
            raise ValueError(f"--interplay {self.interplay!r}: choose one of {', '.join(INTERPLAY)}")
        if not self.style_lr_scale > 0:
            raise ValueError(f"--style-lr-scale must be positive, got {self.style_lr_scale}")
        if self.style_lora_layers:
            parse_layers(self.style_lora_layers)
        if self.merge_penalty < 0:
            raise ValueError(f"--merge-penalty must be 0 or positive, got {self.merge_penalty}")
        if self.content_adapter:
            from studio.plugin import check_same_base

            for flag, path in (("--content-adapter", self.content_adapter), ("--style-adapter", self.style_adapter)):
                if not Path(path).is_file():
                    raise ValueError(f"{flag} {path}: no such file; give a LoRA .safetensors, e.g. a DreamBooth run's"
                                     " adapter.safetensors")
            check_same_base({"content adapter": self.content_adapter, "style adapter": self.style_adapter})
            self.prior_preservation = False  # the targets are the adapters' own predictions, not the class's images


OFF, FROZEN, LEARNS = 0, 1, 2  # what an adapter does on an example: absent, present without gradient, present and learning
INTERPLAY = {
    # per kind of example, (content adapter, style adapter); see ContentStyleConfig.interplay
    "present": {"content": (LEARNS, FROZEN), "style": (FROZEN, LEARNS), "prior": [(LEARNS, LEARNS)]},
    "apart": {"content": (LEARNS, OFF), "style": (OFF, LEARNS), "prior": [(LEARNS, OFF), (OFF, LEARNS)]},
    "cooperative": {"content": (LEARNS, OFF), "style": (OFF, LEARNS), "prior": [(LEARNS, OFF), (OFF, LEARNS)],
                    # the other adapter's examples: learn to leave what that adapter alone predicts as it is
                    "cross-content": (FROZEN, LEARNS), "cross-style": (LEARNS, FROZEN)},
}


class Router:
    """What each adapter does on each example of the current UNet pass.

    ``states``: ``(batch, len(ROLES))`` of ``OFF``, ``FROZEN``, ``LEARNS``. Unset: every adapter acts, as when
    sampling (and, in ZipLoRA's merge, merged)."""

    def __init__(self) -> None:
        self.states: torch.Tensor | None = None


def attach_pair(layer: torch.nn.Linear, rank: int, alpha: float, router: Router, orthogonal: bool, seed: int,
                roles: tuple[str, ...] = ROLES) -> dict[str, list[torch.nn.Parameter]]:
    """LoRA branches of ``roles`` (content and style) on ``layer`` with routed gradients; returns the trainable
    params of each role."""
    import math

    d_out, d_in = layer.weight.shape
    dev, dt = layer.weight.device, layer.weight.dtype
    params: dict[str, list[torch.nn.Parameter]] = {role: [] for role in roles}
    if orthogonal:
        rows = orthonormal_rows(d_in, 2 * rank, seed).to(dev, dt)
    for k, role in enumerate(ROLES):
        if role not in roles:
            continue
        if orthogonal:
            layer.register_buffer(f"lora_{role}_down", rows[k * rank : (k + 1) * rank].clone(), persistent=False)
        else:
            down = torch.empty(rank, d_in, device=dev, dtype=dt)
            torch.nn.init.kaiming_uniform_(down, a=math.sqrt(5))
            layer.register_parameter(f"lora_{role}_down", torch.nn.Parameter(down))
            params[role].append(getattr(layer, f"lora_{role}_down"))
        layer.register_parameter(f"lora_{role}_up", torch.nn.Parameter(torch.zeros(d_out, rank, device=dev, dtype=dt)))
        params[role].append(getattr(layer, f"lora_{role}_up"))
    layer._cs_alpha = float(alpha)  # type: ignore[attr-defined]
    layer._cs_roles = roles  # type: ignore[attr-defined]
    scale = alpha / rank

    def hook(module, args, out):
        x = args[0]
        total = out
        for k, role in enumerate(ROLES):
            if role not in roles:
                continue
            down, up = getattr(module, f"lora_{role}_down"), getattr(module, f"lora_{role}_up")
            # routed whenever the router holds the batch's states: the loop trains with the UNet in eval mode (diffusers'
            # from_pretrained sets it; no dropout), so ``module.training`` says nothing here
            if router.states is None:
                total = total + F.linear(F.linear(x, down), up) * scale
                continue
            state = router.states[:, k].to(x.device).view(-1, *([1] * (x.ndim - 1)))
            for kind, weights in ((LEARNS, (down, up)), (FROZEN, (down.detach(), up.detach()))):
                on = state == kind
                if on.any():  # a frozen branch has the same value, without the gradient; absent: nothing
                    total = total + on.to(x.dtype) * F.linear(F.linear(x, weights[0]), weights[1]) * scale
        return total

    layer._cs_hook = layer.register_forward_hook(hook)  # type: ignore[attr-defined]
    return params


def attach_zip(layer: torch.nn.Linear, sources: dict[str, LoraWeights], router: Router) -> list[torch.nn.Parameter]:
    """ZipLoRA on ``layer``: each source LoRA (by role) fixed, with a trainable merge coefficient per input column
    (``lora_ROLE_merge``, from 1); returns those. With ``router.states`` set, each example sees only the LoRAs not ``OFF`` on it,
    unmerged (the teacher); otherwise the merged sum."""
    dev, dt = layer.weight.device, layer.weight.dtype
    params = []
    for role, w in sources.items():
        if w.down.ndim != 2 or w.shape != tuple(layer.weight.shape):
            raise ValueError(f"the {role} adapter's LoRA has shape {w.shape} but the layer is {tuple(layer.weight.shape)}"
                             " (ZipLoRA here merges linear layers of the same base model)")
        layer.register_buffer(f"lora_{role}_down", w.down.to(dev, dt), persistent=False)
        layer.register_buffer(f"lora_{role}_up", (w.scale * w.up).to(dev, dt), persistent=False)
        merge = torch.nn.Parameter(torch.ones(w.down.shape[1], device=dev, dtype=dt))
        layer.register_parameter(f"lora_{role}_merge", merge)
        params.append(merge)
    layer._zip_sources = sources  # type: ignore[attr-defined]

    def hook(module, args, out):
        x, total = args[0], out
        for k, role in enumerate(ROLES):
            if role not in module._zip_sources:
                continue
            down, up = getattr(module, f"lora_{role}_down"), getattr(module, f"lora_{role}_up")
            if router.states is None:
                total = total + F.linear(F.linear(x, down * getattr(module, f"lora_{role}_merge")), up)
            else:
                alone = (router.states[:, k] != OFF).to(x.device, out.dtype).view(-1, *([1] * (out.ndim - 1)))
                total = total + alone * F.linear(F.linear(x, down), up)
        return total

    layer._zip_hook = layer.register_forward_hook(hook)  # type: ignore[attr-defined]
    return params


def merge_penalty(unet: torch.nn.Module) -> torch.Tensor:
    """ZipLoRA's Σ over layers with both adapters of |cos(m_content, m_style)|."""
    terms = [F.cosine_similarity(m.lora_content_merge, m.lora_style_merge, dim=0).abs()
             for m in unet.modules() if hasattr(m, "lora_content_merge") and hasattr(m, "lora_style_merge")]
    return torch.stack(terms).sum() if terms else torch.zeros(())


def combined(content: LoraWeights | None, style: LoraWeights | None) -> LoraWeights:
    """One LoRA of rank ``r_c + r_s`` whose update is exactly the sum of the two (or the one there is)."""
    if content is None or style is None:
        return content or style  # type: ignore[return-value]
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
        ctx.store["style"] = self._buckets(ctx, images, captions)
        ctx.store["prompts"]["style"] = prompt
        ctx.store["style_files"] = [f.relative_to(cfg.style_data).as_posix() for f in files]
        if "cond" in ctx.store:  # cached prompts (not with --pivotal: the encoders then run every step)
            with torch.no_grad():
                ctx.store["cond"].update({p: _encode(ctx.pipe, [p]) for p in bucket_prompts(ctx.store["style"]) - set(ctx.store["cond"])})
        ctx.store["router"] = Router()

    @staticmethod
    def identifiers(cfg: ContentStyleConfig) -> list[str]:
        return [cfg.token, cfg.style_token]

    def inject(self, ctx: Context, targets: dict[str, list[str]], rank: int, alpha: float) -> list[torch.nn.Parameter]:
        cfg: ContentStyleConfig = ctx.cfg
        unet = ctx.pipe.unet
        unet.requires_grad_(False)
        if cfg.content_adapter:
            return self._inject_zip(ctx)
        content = set(targets["unet"])
        style = set(self.style_targets(ctx)) if cfg.style_lora_layers else content
        params: dict[str, list[torch.nn.Parameter]] = {role: [] for role in ROLES}
        for i, path in enumerate(sorted(content | style, key=self._order(unet))):
            roles = tuple(r for r, paths in zip(ROLES, (content, style)) if path in paths)
            got = attach_pair(unet.get_submodule(path), rank, alpha, ctx.store["router"], cfg.orthogonal, cfg.seed * 100_003 + i, roles)
            for role in roles:
                params[role] += got[role]
        return [{"params": params["content"], "lr_scale": 1.0}, {"params": params["style"], "lr_scale": cfg.style_lr_scale}]

    @staticmethod
    def _order(unet: torch.nn.Module):
        rank = {n: i for i, (n, _) in enumerate(unet.named_modules())}
        return rank.__getitem__

    def style_targets(self, ctx: Context) -> list[str]:
        return unet_targets(ctx.pipe.unet, parse_layers(ctx.cfg.style_lora_layers), (), linear_only=True)

    def _inject_zip(self, ctx: Context) -> list[torch.nn.Parameter]:
        from studio.adapters import load_adapter
        from studio.adapters.form import resolve_module
        from studio.plugin import check_base

        cfg: ContentStyleConfig = ctx.cfg
        unet = ctx.pipe.unet
        loaded = {"content": load_adapter(cfg.content_adapter), "style": load_adapter(cfg.style_adapter)}
        for role, path in (("content", cfg.content_adapter), ("style", cfg.style_adapter)):
            check_base(ctx.pipe, loaded[role], f"--{role}-adapter {path}")
            if loaded[role].embeddings:
                raise ValueError(f"--{role}-adapter {path} carries token embeddings (trained with --pivotal); the ZipLoRA"
                                 " merge here takes adapters without them")
            others = [k for k in loaded[role].modules if not k.startswith("unet.")]
            if others:
                raise ValueError(f"--{role}-adapter {path} has LoRA outside the UNet ({others[0]}, {len(others)} in all);"
                                 " the ZipLoRA merge here takes UNet-only adapters")
        units = {role: a.component("unet") for role, a in loaded.items()}
        params = []
        for name in sorted(set(units["content"]) | set(units["style"])):
            layer = resolve_module(unet, name)
            if type(layer) is not torch.nn.Linear:
                raise ValueError(f"unet.{name} is a {type(layer).__name__}; the ZipLoRA merge here takes linear layers only")
            params += attach_zip(layer, {r: units[r][name] for r in ROLES if name in units[r]}, ctx.store["router"])
        return params

    def loss(self, ctx: Context, step: int, micro: int, g: torch.Generator, rng) -> torch.Tensor:
        cfg: ContentStyleConfig = ctx.cfg
        n = cfg.batch_size * ctx.accelerator.num_processes
        parts = [self._draw(ctx, ctx.store["instance"], rng, n), self._draw(ctx, ctx.store["style"], rng, n)]
        alone = [(FROZEN, OFF), (OFF, FROZEN)]  # ZipLoRA's teacher: each adapter alone on its own examples
        if cfg.content_adapter:  # ZipLoRA: the merged model fits each adapter alone on that adapter's examples
            router: Router = ctx.store["router"]
            unet = ctx.store["unet"]

            def teacher(members, noisy, t, embeds, added):
                router.states = torch.cat([torch.tensor([alone[i]] * cfg.batch_size) for i in members])
                try:
                    return unet(noisy, t, embeds, added_cond_kwargs=added).sample
                finally:
                    router.states = None

            losses = denoise_losses(ctx, parts, g, teacher=teacher)
            return losses[0] + losses[1] + cfg.merge_penalty * merge_penalty(ctx.pipe.unet).to(losses[0].device)
        plan = INTERPLAY[cfg.interplay]
        kinds = ["content", "style"]
        if cfg.prior_preservation:
            parts.append(self._draw_prior(ctx, rng, n))
            kinds.append("prior")
        if "cross-content" in plan:  # fresh draws of each adapter's examples, for the other adapter's term
            parts += [self._draw(ctx, ctx.store["instance"], rng, n), self._draw(ctx, ctx.store["style"], rng, n)]
            kinds += ["cross-content", "cross-style"]
        states = []
        for kind in kinds:  # (local batch, roles); the prior's states split its examples evenly
            each = plan[kind] if isinstance(plan[kind], list) else [plan[kind]]
            states.append(torch.tensor([each[j * len(each) // cfg.batch_size] for j in range(cfg.batch_size)]))
        router: Router = ctx.store["router"]
        unet = ctx.store["unet"]

        def teacher(members, noisy, t, embeds, added):  # the cross terms' target: the other adapter alone
            taught, start = {}, 0
            for i in members:
                size = len(states[i])
                if kinds[i].startswith("cross-"):
                    router.states = torch.tensor([alone[0] if kinds[i] == "cross-content" else alone[1]] * size)
                    cut = slice(start, start + size)
                    part_added = None if added is None else {k: v[cut] for k, v in added.items()}
                    taught[i] = unet(noisy[cut], t[cut], embeds[cut], added_cond_kwargs=part_added).sample
                start += size
            router.states = None
            return taught

        def route(members: list[int], embeds=None) -> None:  # before each UNet pass: what each adapter does
            router.states = torch.cat([states[i] for i in members])

        try:
            losses = denoise_losses(ctx, parts, g, before_pass=route, teacher=teacher if "cross-content" in plan else None)
        finally:
            router.states = None
        total = losses[0] + losses[1]
        for kind, loss in zip(kinds[2:], losses[2:]):
            total = total + (cfg.prior_weight if kind == "prior" else 1.0) * loss
        return total

    def extract(self, ctx: Context, components: list[str], meta: AdapterMeta) -> Adapter:
        unet = ctx.pipe.unet
        parts: dict[str, dict[str, LoraWeights]] = {role: {} for role in ROLES}
        for path, module in unet.named_modules():
            if hasattr(module, "_zip_sources"):
                name = canonical_name("unet", unet, path)
                for role, w in module._zip_sources.items():
                    merge = getattr(module, f"lora_{role}_merge").detach().float().cpu()
                    parts[role][name] = LoraWeights(w.down.float() * merge, w.up.float().clone(), w.alpha)
            if hasattr(module, "_cs_alpha"):
                name = canonical_name("unet", unet, path)
                for role in module._cs_roles:
                    down = getattr(module, f"lora_{role}_down").detach().float().cpu().clone()
                    up = getattr(module, f"lora_{role}_up").detach().float().cpu().clone()
                    parts[role][name] = LoraWeights(down, up, module._cs_alpha)
        ctx.store["parts"] = parts
        names = sorted(set(parts["content"]) | set(parts["style"]))
        return Adapter({k: combined(parts["content"].get(k), parts["style"].get(k)) for k in names}, meta)

    def metadata(self, ctx: Context) -> dict[str, Any]:
        cfg: ContentStyleConfig = ctx.cfg
        meta = super().metadata(ctx)
        meta["dataset"].update(style_images=len(ctx.store["style_files"]), style_files=ctx.store["style_files"],
                               style_prompt=ctx.store["prompts"]["style"])
        meta["extra"] = {"style_token": cfg.style_token, "orthogonal": cfg.orthogonal}
        if cfg.content_adapter:
            meta["extra"] = {"style_token": cfg.style_token, "merge": "ziplora", "content_adapter": cfg.content_adapter,
                             "style_adapter": cfg.style_adapter, "merge_penalty": cfg.merge_penalty}
        return meta

    def finalize(self, ctx: Context, adapter: Adapter, out: Path) -> None:
        import copy

        for role in ROLES:
            meta = copy.deepcopy(adapter.meta)
            meta.extra["part"] = role
            token = ctx.cfg.token if role == "content" else ctx.cfg.style_token  # each part keeps its own token's embedding
            kept = {token: adapter.embeddings[token]} if token in adapter.embeddings else {}
            save_adapter(Adapter(ctx.store["parts"][role], meta, kept), out.with_name(f"{role}.safetensors"),
                         dtype=ctx.cfg.save_precision)


command = command_from_config(
    ContentStyleConfig, lambda config_file, overrides: run_trainer(ContentStyle(), ContentStyleConfig, config_file, overrides),
    "Train a content adapter and a style adapter together, so that they combine without interference.")


def main(argv: list[str] | None = None) -> None:
    run_command(command, argv)


if __name__ == "__main__":
    main()
