"""B-LoRA (Frenkel et al. 2024, "Implicit Style-Content Separation using B-LoRA").

LoRA is trained on one image (or a few) on only two transformer blocks of SDXL's UNet: the paper
finds that ``up_blocks.0.attentions.0`` carries the image's content and ``up_blocks.0.attentions.1``
its style. After training, the LoRA is split by block into a content adapter and a style adapter,
and the content of one image combines with the style of another by attaching both::

    studio train blora --data my_dog/ --output runs/dog        # runs/dog/content.safetensors, style.safetensors
    studio train blora --data painting/ --output runs/painting
    studio compose --content runs/dog/content.safetensors --style runs/painting/style.safetensors \\
        "a sks" -o dog_as_painting.png

The blocks are a per-family setting (:data:`BLOCKS`); ``--content-block``/``--style-block``
override them (docs/benchmarks.md reports how the blocks separate on the embedded model).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from studio.trainers.config import command_from_config, run_command
from studio.trainers.dreambooth import DreamBooth, DreamBoothConfig, run_trainer
from studio.trainers.loop import Context, _help

from studio.adapters import Adapter, save_adapter

# (content block, style block) per model family: the paper's choice for SDXL
BLOCKS: dict[str, tuple[str, str]] = {"sdxl": ("up_blocks.0.attentions.0", "up_blocks.0.attentions.1")}


@dataclass
class BLoRAConfig(DreamBoothConfig):
    instance_prompt: str = field(default="a {token}", metadata=_help("Training prompt (the paper's 'A [v]')."))
    prior_preservation: bool = field(default=False, metadata=_help("Also train on base-model images of the class."))
    rank: int = field(default=16, metadata=_help("LoRA rank (1-256)."))
    content_block: str = field(
        default="",
        metadata=_help("UNet block of the content part; default: the family's (SDXL: up_blocks.0.attentions.0)."),
    )
    style_block: str = field(
        default="",
        metadata=_help("UNet block of the style part; default: the family's (SDXL: up_blocks.0.attentions.1)."),
    )

    def check(self) -> None:
        super().check()
        if self.train_text_encoder:
            raise ValueError("--train-text-encoder: B-LoRA trains only the two UNet blocks")
        if self.pivotal:
            raise ValueError("--pivotal: B-LoRA trains only the two UNet blocks (its parts carry no token embedding)")
        if self.content_block and self.content_block == self.style_block:
            raise ValueError(
                f"--content-block and --style-block are both {self.content_block!r}; give two different blocks"
            )


def blocks(ctx: Context) -> tuple[str, str]:
    """The (content, style) blocks for this run: the flags, else the family's setting."""
    cfg: BLoRAConfig = ctx.cfg
    family = "sdxl" if hasattr(ctx.pipe, "text_encoder_2") else "sd15"
    default = BLOCKS.get(family)
    content, style = cfg.content_block or (default and default[0]), cfg.style_block or (default and default[1])
    if not content or not style:
        raise ValueError(
            f"B-LoRA's blocks are known for {', '.join(BLOCKS)} only; give --content-block and --style-block"
        )
    names = {n for n, _ in ctx.pipe.unet.named_modules()}
    for flag, block in (("--content-block", content), ("--style-block", style)):
        if block not in names:
            raise ValueError(f"{flag} {block!r} is not a module of this UNet (e.g. up_blocks.0.attentions.0)")
    return content, style


def split(adapter: Adapter, content: str, style: str) -> tuple[Adapter, Adapter]:
    """The adapter's modules under the content block and under the style block, as two adapters."""
    import copy

    parts = []
    for role, block in (("content", content), ("style", style)):
        prefix = f"unet.{block}."
        meta = copy.deepcopy(adapter.meta)
        meta.extra.update(blora_part=role, blora_block=block)
        parts.append(Adapter({k: w for k, w in adapter.modules.items() if k.startswith(prefix)}, meta))
    return parts[0], parts[1]


class BLoRA(DreamBooth):
    name = "blora"

    def targets(self, ctx: Context) -> dict[str, list[str]]:
        content, style = blocks(ctx)
        return {"unet": self.unet_lora_targets(ctx, within=(content, style))}

    def metadata(self, ctx: Context) -> dict[str, Any]:
        content, style = blocks(ctx)
        meta = super().metadata(ctx)
        meta["extra"] = {"blora_blocks": {"content": content, "style": style}}
        return meta

    def finalize(self, ctx: Context, adapter: Adapter, out: Path) -> None:
        """Write ``content.safetensors`` and ``style.safetensors`` beside the whole adapter."""
        content, style = split(adapter, *blocks(ctx))
        save_adapter(content, out.with_name("content.safetensors"), dtype=ctx.cfg.save_precision)
        save_adapter(style, out.with_name("style.safetensors"), dtype=ctx.cfg.save_precision)


command = command_from_config(
    BLoRAConfig,
    lambda config_file, overrides: run_trainer(BLoRA(), BLoRAConfig, config_file, overrides),
    "Train a B-LoRA on one image (or a few): a content adapter and a style adapter.",
)


def main(argv: list[str] | None = None) -> None:
    run_command(command, argv)


if __name__ == "__main__":
    main()
