"""DreamBooth-LoRA (Ruiz et al. 2023, with LoRA as in diffusers' example scripts).

An identifier token bound to a class noun ("a sks shape") is taught from a few images; prior
preservation keeps the class itself intact by also training on images the base model draws for
"a <class>", generated once and cached. LoRA goes on the UNet's attention projections (and, with
``--train-text-encoder``, on the text encoders' attention projections).

Headless, same arguments either way::

    studio train dreambooth --data my_star/ --token sks --class-noun shape --output runs/star
    accelerate launch -m studio.trainers.dreambooth --data my_star/ --token sks --class-noun shape
"""

from __future__ import annotations

import hashlib
import random
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from studio.trainers.config import build_config, command_from_config, read_config_file
from studio.trainers.data import load_images, to_tensor
from studio.trainers.loop import Context, TrainConfig, _help, denoise_loss, train

UNET_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
TEXT_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj")


@dataclass
class DreamBoothConfig(TrainConfig):
    token: str = field(default="sks", metadata=_help("Identifier token for the subject."))
    class_noun: str = field(default="shape", metadata=_help("The subject's class, e.g. 'shape', 'dog'."))
    instance_prompt: str = field(default="", metadata=_help("Training prompt; default 'a {token} {class_noun}'."))
    prior_preservation: bool = field(default=True, metadata=_help("Also train on base-model images of the class."))
    prior_weight: float = field(default=1.0, metadata=_help("Weight of the class (prior) loss."))
    num_class_images: int = field(default=32, metadata=_help("Class images to generate and cache."))
    class_data: str = field(default="", metadata=_help("Folder for cached class images; default runs/class-images/<model>/<prompt>."))
    train_text_encoder: bool = field(default=False, metadata=_help("Also put LoRA on the text encoders."))

    def check(self) -> None:
        super().check()
        if not self.data:
            raise ValueError("--data is required: a folder with 3 to 10 images of the subject")
        if not self.token.strip() or not self.class_noun.strip():
            raise ValueError("--token and --class-noun must not be empty")


def _encode(pipe, prompts: list[str]) -> dict[str, Any]:
    """Conditioning for the UNet as the family's stock pipeline computes it."""
    from studio.families import encode_prompt_sdxl

    device = pipe.unet.device
    if hasattr(pipe, "text_encoder_2"):
        embeds, pooled = encode_prompt_sdxl([pipe.tokenizer, pipe.tokenizer_2], [pipe.text_encoder, pipe.text_encoder_2], prompts)
        return {"embeds": embeds, "pooled": pooled}
    ids = pipe.tokenizer(prompts, padding="max_length", max_length=pipe.tokenizer.model_max_length, truncation=True,
                         return_tensors="pt").input_ids.to(device)
    return {"embeds": pipe.text_encoder(ids)[0], "pooled": None}


class DreamBooth:
    name = "dreambooth"

    def prepare(self, ctx: Context) -> None:
        cfg: DreamBoothConfig = ctx.cfg
        pipe = ctx.pipe
        images, files = load_images(cfg.data, ctx.resolution)
        ctx.store["instance"] = self._latents(pipe, images)
        ctx.store["n_images"] = len(images)
        ctx.store["files"] = [f.name for f in files]
        prompt = self.instance_prompt(cfg)
        ctx.store["prompts"] = {"instance": prompt, "class": f"a {cfg.class_noun}"}
        if cfg.prior_preservation:
            class_images = self._class_images(ctx)
            ctx.store["class"] = self._latents(pipe, class_images)
        if not cfg.train_text_encoder:
            with torch.no_grad():
                ctx.store["cond"] = {k: _encode(pipe, [p]) for k, p in ctx.store["prompts"].items()}

    @staticmethod
    def instance_prompt(cfg: DreamBoothConfig) -> str:
        return (cfg.instance_prompt or "a {token} {class_noun}").format(token=cfg.token, class_noun=cfg.class_noun)

    @staticmethod
    @torch.no_grad()
    def _latents(pipe, images) -> torch.Tensor:
        """Cached latents (posterior mean), scaled as the pipeline expects them."""
        vae = pipe.vae
        x = to_tensor(images).to(vae.device, vae.dtype)
        lat = torch.cat([vae.encode(x[i : i + 16]).latent_dist.mode() for i in range(0, len(x), 16)])
        shift = getattr(vae.config, "shift_factor", None) or 0.0
        return ((lat - shift) * vae.config.scaling_factor).float()

    def _class_images(self, ctx: Context):
        from PIL import Image

        from studio.sampling import generate

        cfg: DreamBoothConfig = ctx.cfg
        prompt = ctx.store["prompts"]["class"]
        folder = Path(cfg.class_data) if cfg.class_data else (
            Path("runs/class-images") / Path(cfg.model).name / hashlib.sha1(f"{prompt}|{ctx.resolution}".encode()).hexdigest()[:10])
        folder.mkdir(parents=True, exist_ok=True)
        have = sorted(folder.glob("class-*.png"))
        if len(have) < cfg.num_class_images and ctx.accelerator.is_main_process:
            missing = range(len(have), cfg.num_class_images)
            images = generate(ctx.pipe, [prompt] * len(missing), seed=10_000 + len(have),
                              height=ctx.resolution, width=ctx.resolution)
            for i, im in zip(missing, images):
                tmp = folder / f".class-{i:05d}.tmp.png"
                im.save(tmp)
                tmp.replace(folder / f"class-{i:05d}.png")
        ctx.accelerator.wait_for_everyone()
        files = sorted(folder.glob("class-*.png"))[: cfg.num_class_images]
        return [Image.open(f).convert("RGB").resize((ctx.resolution, ctx.resolution)) for f in files]

    def targets(self, ctx: Context) -> dict[str, list[str]]:
        pipe, cfg = ctx.pipe, ctx.cfg

        def pick(model, leaves):
            return [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and any(n.endswith("." + t) for t in leaves)]

        out = {"unet": pick(pipe.unet, UNET_TARGETS)}
        if cfg.train_text_encoder:
            for c in ("text_encoder", "text_encoder_2"):
                if getattr(pipe, c, None) is not None:
                    out[c] = pick(getattr(pipe, c), TEXT_TARGETS)
        return out

    def _cond(self, ctx: Context, which: str, n: int) -> dict[str, Any]:
        from studio.families import sdxl_time_ids

        if "cond" in ctx.store:
            c = ctx.store["cond"][which]
        else:
            c = _encode(ctx.pipe, [ctx.store["prompts"][which]])
        embeds = c["embeds"].expand(n, -1, -1)
        added = None
        if c["pooled"] is not None:
            added = {"text_embeds": c["pooled"].expand(n, -1),
                     "time_ids": sdxl_time_ids(ctx.resolution, ctx.resolution, n).to(embeds.device)}
        return {"embeds": embeds, "added": added}

    def loss(self, ctx: Context, step: int, micro: int, g: torch.Generator, rng: random.Random) -> torch.Tensor:
        cfg: DreamBoothConfig = ctx.cfg
        n = cfg.batch_size * ctx.accelerator.num_processes  # the global batch; denoise_loss takes our share
        inst = ctx.store["instance"]
        idx = torch.tensor([rng.randrange(len(inst)) for _ in range(n)])
        loss = denoise_loss(ctx, inst[idx], self._cond(ctx, "instance", cfg.batch_size), g)
        if cfg.prior_preservation:
            cls = ctx.store["class"]
            idx = torch.tensor([rng.randrange(len(cls)) for _ in range(n)])
            loss = loss + cfg.prior_weight * denoise_loss(ctx, cls[idx], self._cond(ctx, "class", cfg.batch_size), g)
        return loss

    def metadata(self, ctx: Context) -> dict[str, Any]:
        cfg: DreamBoothConfig = ctx.cfg
        return {"token": cfg.token, "class_noun": cfg.class_noun,
                "dataset": {"images": ctx.store["n_images"], "files": ctx.store["files"],
                            "instance_prompt": ctx.store["prompts"]["instance"],
                            "prior_preservation": cfg.prior_preservation}}


def run(config_file, overrides: dict[str, Any]) -> Path:
    import typer

    try:
        values = read_config_file(config_file) if config_file else {}
        cfg = build_config(DreamBoothConfig, values, overrides)
        with warnings.catch_warnings():
            warnings.simplefilter("default")
            warnings.formatwarning = lambda message, *args, **kwargs: f"warning: {message}\n"
            out = train(DreamBooth(), cfg)
    except (ValueError, FileNotFoundError) as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(2) from None
    typer.echo(f"wrote {out}")
    return out


command = command_from_config(DreamBoothConfig, run, "Train a DreamBooth LoRA on a few images of a subject.")


def main(argv: list[str] | None = None) -> None:
    import typer

    app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)
    app.command()(command)
    app(argv if argv is not None else sys.argv[1:])


if __name__ == "__main__":
    main()
