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

import contextlib
import dataclasses
import hashlib
import itertools
import random
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import torch
from studio.trainers.attention import CrossAttentionMaps, attention_maps
from studio.trainers.config import build_config, command_from_config, read_config_file, run_command
from studio.trainers.data import (
    TrainImage,
    group_by_size,
    load_images,
    mirrored,
    shuffle_tags,
    subject_mask,
    to_tensor,
    without_token,
)
from studio.trainers.loop import Cancelled, Context, TrainConfig, _help, denoise_losses, shard, train
from studio.trainers.pivotal import add_token

UNET_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
TEXT_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj")
# what --lora-layers names beside the attention projections (kohya's LoCon trains the convolutions too)
WIDE_TARGETS = (*UNET_TARGETS, "ff.net.0.proj", "ff.net.2", "proj_in", "proj_out", "conv1", "conv2")


def unet_targets(unet: torch.nn.Module, layers: tuple[str, ...], within: tuple[str, ...] = (),
                 linear_only: bool = False) -> list[str]:
    """The UNet's module paths that end with one of ``layers`` (``to_q``, ``ff.net.2``, ``conv1`` ...), under one
    of the prefixes ``within`` if given; every entry must name a LoRA-able layer (Linear, or Conv2d unless
    ``linear_only``), else a ValueError names it."""
    kinds = (torch.nn.Linear,) if linear_only else (torch.nn.Linear, torch.nn.Conv2d)
    found: dict[str, list[str]] = {t: [] for t in layers}
    for n, m in unet.named_modules():
        if within and not n.startswith(tuple(w + "." for w in within)):
            continue
        for t in layers:
            if n.endswith("." + t):
                if not isinstance(m, kinds):
                    what = "Linear" if linear_only else "Linear or Conv2d"
                    raise ValueError(f"--lora-layers {t!r} names {n}, a {type(m).__name__}; accepted: {what} layers"
                                     f" (this trainer), e.g. {', '.join(WIDE_TARGETS if not linear_only else UNET_TARGETS)}")
                found[t].append(n)
    missing = [t for t, paths in found.items() if not paths]
    if missing:
        raise ValueError(f"--lora-layers {', '.join(map(repr, missing))}: no such layer in the UNet"
                         f"{' blocks ' + ', '.join(within) if within else ''}; accepted: module name endings such as"
                         f" {', '.join(WIDE_TARGETS)}")
    chosen = {n for paths in found.values() for n in paths}
    return [n for n, _ in unet.named_modules() if n in chosen]


def parse_layers(text: str) -> tuple[str, ...]:
    """``--lora-layers``' comma-separated list (diffusers' example scripts' form)."""
    layers = tuple(dict.fromkeys(t.strip() for t in text.split(",") if t.strip()))
    if not layers:
        raise ValueError(f"--lora-layers {text!r}: give module name endings separated by commas, e.g. {','.join(UNET_TARGETS)}")
    return layers


CLASS_PROMPTS = ("class", "captions")


@dataclass
class DreamBoothConfig(TrainConfig):
    token: str = field(default="sks", metadata=_help("Identifier token for the subject."))
    class_noun: str = field(default="shape", metadata=_help("The subject's class, e.g. 'shape', 'dog'."))
    instance_prompt: str = field(default="", metadata=_help("Training prompt; default 'a {token} {class_noun}'."))
    prior_preservation: bool = field(default=True, metadata=_help("Also train on base-model images of the class."))
    prior_weight: float = field(default=1.0, metadata=_help("Weight of the class (prior) loss."))
    num_class_images: int = field(default=32, metadata=_help("Class images to generate and cache."))
    class_prompts: str = field(
        default="class",
        metadata=_help("What the class images are drawn from: 'class', the one prompt 'a {class_noun}' (diffusers'"
                       " --class_prompt); 'captions', each instance caption with the identifier taken out, an equal share"
                       " of --num-class-images for each (rounded up: at least one each), each class image trained on its own caption (kohya's captioned"
                       " regularisation images): the prior then holds at the base model everything the captions name"
                       " but the identifier."),
    )
    class_data: str = field(
        default="", metadata=_help("Folder for cached class images; default runs/class-images/<model>-<weights hash>/<prompt>.")
    )
    captions: bool = field(
        default=True, metadata=_help("Use a sidecar NAME.txt beside an image as its prompt (kohya's convention).")
    )
    train_text_encoder: bool = field(default=False, metadata=_help("Also put LoRA on the text encoders."))
    text_encoder_lr: float = field(
        default=0.0, metadata=_help("With --train-text-encoder: the text encoders' learning rate (diffusers' and kohya's"
                                    " --text_encoder_lr, e.g. 5e-6); 0: --lr."))
    pivotal: bool = field(
        default=False,
        metadata=_help("Pivotal tuning (diffusers' advanced script's --train_text_encoder_ti): the identifier (--token)"
                       " becomes a new token of its own in each tokenizer, and its embedding in each text encoder trains"
                       " beside the LoRA; the embeddings are written beside the adapter (NAME_emb.safetensors, keys"
                       " clip_l and clip_g as diffusers' script writes them) and the studio's loaders add the token when"
                       " they attach the adapter."),
    )
    embedding_lr: float = field(
        default=0.0, metadata=_help("With --pivotal: the token embeddings' learning rate; 0: --lr."))
    embedding_vectors: int = field(
        default=1, metadata=_help("With --pivotal: how many new tokens (embedding vectors) the identifier gets, 1 to 16"
                                  " (diffusers' --num_new_tokens_per_abstraction, 2 there): 'zxy', 'zxy_1', ...; prompts"
                                  " that name 'zxy' are encoded as all of them, as diffusers' pipelines do."))
    lora_layers: str = field(
        default=",".join(UNET_TARGETS),
        metadata=_help("The UNet layers that get LoRA: module name endings, comma-separated (as diffusers' --lora_layers);"
                       " add ff.net.0.proj,ff.net.2,proj_in,proj_out for the transformer blocks' other linears,"
                       " conv1,conv2 for the ResNet convolutions (kohya's LoCon)."),
    )
    random_flip: bool = field(
        default=False,
        metadata=_help("Train on each image mirrored left to right half the time (diffusers' --random_flip, kohya's"
                       " --flip_aug); the mirrored images' latents are cached beside the originals, and 'left' and"
                       " 'right' swap in their captions. Not for subjects whose left and right differ (text, logos)."),
    )
    caption_dropout: float = field(
        default=0.0,
        metadata=_help("Share of training examples whose prompt is emptied (kohya's --caption_dropout_rate, diffusers'"
                       " --proportion_empty_prompts; ai-toolkit uses 0.05), so the adapter also learns the images"
                       " unprompted, as guidance's unconditional pass sees them; 0: off, below 1."),
    )
    shuffle_caption: bool = field(
        default=False,
        metadata=_help("Shuffle each example's comma-separated caption tags (kohya's --shuffle_caption, for tag"
                       " captions); the shuffled prompts are encoded as they come, not cached."),
    )
    keep_tokens: int = field(
        default=0, metadata=_help("With --shuffle-caption: the first N tags stay in place (kohya's --keep_tokens; e.g. 1"
                                  " keeps the trigger word first)."))
    masked_loss: bool = field(
        default=False,
        metadata=_help("Weigh each instance example's denoising loss by where its subject is (kohya's --masked_loss,"
                       " ai-toolkit's alpha mask): a mask NAME.mask.png beside an image (white: the subject; grey"
                       " between), else the pixels that differ from its plain background; the loss is the mask-weighted"
                       " mean, so its scale does not depend on the subject's size. Prior examples are not masked."),
    )
    mask_min_value: float = field(
        default=0.0,
        metadata=_help("With --masked-loss: the weight the background keeps (ai-toolkit's mask_min_value), 0 to 1;"
                       " 0 trains on the subject alone, 1 is no mask."),
    )
    attention_loss: float = field(
        default=0.0,
        metadata=_help("Weight of an attention loss (Break-A-Scene): the token's cross-attention map is pulled onto"
                       " the subject (a mask NAME.mask.png beside an image, else the pixels that differ from its plain"
                       " background), so that composers which read the map (CLoRA) find the subject; 0: off."),
    )

    def check(self) -> None:
        super().check()
        if not self.data:
            raise ValueError("--data is required: a folder with 3 to 10 images of the subject")
        if not self.token.strip() or not self.class_noun.strip():
            raise ValueError("--token and --class-noun must not be empty")
        if self.text_encoder_lr < 0:
            raise ValueError(f"--text-encoder-lr must be 0 (= --lr) or positive, got {self.text_encoder_lr:g}")
        if self.text_encoder_lr and not self.train_text_encoder:
            raise ValueError("--text-encoder-lr needs --train-text-encoder (the text encoders get no LoRA without it)")
        if self.embedding_lr < 0:
            raise ValueError(f"--embedding-lr must be 0 (= --lr) or positive, got {self.embedding_lr:g}")
        if self.embedding_lr and not self.pivotal:
            raise ValueError("--embedding-lr is the token embeddings' rate under --pivotal; add --pivotal")
        if not 1 <= self.embedding_vectors <= 16:
            raise ValueError(f"--embedding-vectors must be 1 to 16, got {self.embedding_vectors}")
        if self.embedding_vectors > 1 and not self.pivotal:
            raise ValueError("--embedding-vectors is how many tokens --pivotal gives the identifier; add --pivotal")
        if self.pivotal and (not self.token.strip() or len(self.token.split()) != 1 or "." in self.token):
            raise ValueError(f"--pivotal makes --token one new token, so it must be one word without dots; got {self.token!r}")
        if not 0 <= self.mask_min_value <= 1:
            raise ValueError(f"--mask-min-value must be between 0 and 1, got {self.mask_min_value:g}")
        if self.mask_min_value and not self.masked_loss:
            raise ValueError("--mask-min-value weighs the background under --masked-loss; add --masked-loss")
        if self.attention_loss < 0:
            raise ValueError(f"--attention-loss must be 0 (off) or positive, got {self.attention_loss}")
        if self.keep_tokens < 0:
            raise ValueError(f"--keep-tokens must be 0 or positive, got {self.keep_tokens}")
        if self.keep_tokens and not self.shuffle_caption:
            raise ValueError("--keep-tokens keeps tags in place while --shuffle-caption shuffles the rest; add --shuffle-caption")
        if self.shuffle_caption and self.attention_loss:
            raise ValueError("--shuffle-caption does not go with --attention-loss (the loss reads the token's place in"
                             " each caption, which shuffling moves); drop one of them")
        if self.class_prompts not in CLASS_PROMPTS:
            raise ValueError(f"--class-prompts {self.class_prompts!r}; accepted: {', '.join(CLASS_PROMPTS)}")
        if self.class_prompts == "captions" and not self.prior_preservation:
            raise ValueError("--class-prompts captions chooses what the class images show, and only prior preservation"
                             " trains on them; drop --no-prior-preservation or --class-prompts")
        if not 0 <= self.caption_dropout < 1:
            raise ValueError(f"--caption-dropout must be at least 0 (off) and below 1, got {self.caption_dropout:g}")
        if self.caption_dropout and self.attention_loss:
            raise ValueError("--caption-dropout does not go with --attention-loss (an emptied prompt has no token whose"
                             " attention the loss could pull onto the subject); drop one of them")
        layers = parse_layers(self.lora_layers)
        if self.adapter == "singlora" and any("conv" in t for t in layers):
            raise ValueError(f"--lora-layers {self.lora_layers!r} with --adapter singlora: SingLoRA takes linear"
                             " layers only; drop the convolutions or use --adapter lora")
        if self.attention_loss and self.compile:
            raise ValueError("--attention-loss does not work with --compile (its maps are recorded outside the"
                             " compiled graph); drop one of them")


def _encode(pipe, prompts: list[str]) -> dict[str, Any]:
    """Conditioning for the UNet as the family's stock pipeline computes it (a multi-vector token written out)."""
    from studio.adapters.form import multi_vector
    from studio.families import encode_prompt_sdxl

    device = pipe.unet.device
    prompts = [multi_vector(pipe.tokenizer, p) for p in prompts]
    if hasattr(pipe, "text_encoder_2"):
        embeds, pooled = encode_prompt_sdxl(
            [pipe.tokenizer, pipe.tokenizer_2], [pipe.text_encoder, pipe.text_encoder_2], prompts
        )
        return {"embeds": embeds, "pooled": pooled}
    ids = pipe.tokenizer(
        prompts, padding="max_length", max_length=pipe.tokenizer.model_max_length, truncation=True, return_tensors="pt"
    ).input_ids.to(device)
    return {"embeds": pipe.text_encoder(ids)[0], "pooled": None}


class Bucket(NamedTuple):
    """One size of training image: cached latents, SDXL micro-conditioning (original size, crop, target size) and
    prompts, one row each; with --random-flip, the mirrored images' latents and captions."""

    latents: torch.Tensor
    time_ids: torch.Tensor
    captions: list[str]
    mirrored: torch.Tensor | None = None
    mirrored_captions: list[str] | None = None
    repeats: list[int] | None = None  # kohya's folder repeats, per image (None: every image once)

    def size(self) -> int:
        """How many draws' worth of images it holds: its images, each counted its repeats."""
        return sum(self.repeats) if self.repeats else len(self.captions)


def bucket_prompts(buckets: list[Bucket]) -> set[str]:
    """Every prompt ``buckets`` may train on (mirrored captions included)."""
    return {t for b in buckets for t in (*b.captions, *(b.mirrored_captions or ()))}


class DreamBooth:
    name = "dreambooth"
    linear_only = False  # a trainer whose branches are linear-only (the content/style pair) sets this

    def unet_lora_targets(self, ctx: Context, within: tuple[str, ...] = ()) -> list[str]:
        """The UNet layers ``--lora-layers`` names (under the blocks ``within``, if given); convolutions refused
        where the adapter or the trainer takes linears only."""
        cfg = ctx.cfg
        return unet_targets(ctx.pipe.unet, parse_layers(cfg.lora_layers), within,
                            linear_only=self.linear_only or cfg.adapter == "singlora")

    def prepare(self, ctx: Context) -> None:
        cfg: DreamBoothConfig = ctx.cfg
        pipe = ctx.pipe
        if cfg.pivotal:  # before any prompt is tokenized: each identifier is one token from here on
            ctx.store["pivotal"] = {t: add_token(pipe, t, cfg.embedding_vectors) for t in self.identifiers(cfg)}
        images, files = load_images(cfg.data, ctx.resolution, ctx.size_multiple if cfg.aspect_buckets else 0)
        prompt = self.instance_prompt(cfg)
        captions = [(im.caption if cfg.captions and im.caption else prompt) for im in images]
        groups = group_by_size(images)
        ctx.store["instance"] = self._buckets(ctx, images, captions)
        if cfg.attention_loss or cfg.masked_loss:  # per bucket: the subjects' masks
            ctx.store["masks"] = [torch.stack([subject_mask(images[i], files[i].name) for i in idx]) for idx in groups.values()]
        if cfg.attention_loss:  # per bucket and example: the token's weight per position
            # (of its caption, then of its mirrored caption: swapping left and right may move the token)
            ctx.store["attend"] = [
                (torch.stack([token_weights(pipe.tokenizer, b.captions[j], cfg.token, files[i].name) for j, i in enumerate(idx)]),
                 torch.stack([token_weights(pipe.tokenizer, (b.mirrored_captions or b.captions)[j], cfg.token, files[i].name)
                              for j, i in enumerate(idx)]))
                for b, idx in zip(ctx.store["instance"], groups.values())
            ]
        ctx.store["buckets"] = {f"{w}x{h}": len(idx) for (w, h), idx in groups.items()}
        ctx.store["n_images"] = len(images)
        ctx.store["n_captions"] = sum(c != prompt for c in captions)
        ctx.store["files"] = [f.relative_to(cfg.data).as_posix() for f in files]
        if any(im.repeats != 1 for im in images):  # kohya's layout: the repeats of each subfolder
            ctx.store["repeats"] = {f.parent.name: im.repeats for f, im in zip(files, images)}
        ctx.store["prompts"] = {"instance": prompt, "class": f"a {cfg.class_noun}"}
        if cfg.prior_preservation:
            self._prior(ctx, captions)
        if not cfg.train_text_encoder and not cfg.pivotal:  # the prompts' conditioning does not change: cache it
            with torch.no_grad():
                texts = ({*bucket_prompts(ctx.store["instance"]), *ctx.store["prompts"].values(), *ctx.store.get("class_prompts", ())}
                         | ({""} if cfg.caption_dropout else set()))
                ctx.store["cond"] = {p: _encode(pipe, [p]) for p in texts}

    def _buckets(self, ctx: Context, images: list[TrainImage], captions: list[str]) -> list[Bucket]:
        """``images`` grouped by size, one :class:`Bucket` a group, latents cached (mirrored too with --random-flip)."""
        cfg = ctx.cfg
        out = []
        for (w, h), idx in group_by_size(images).items():
            ids = torch.tensor([[*images[i].original_size, *images[i].crop_top_left, h, w] for i in idx], dtype=torch.float32)
            chosen = [images[i] for i in idx]
            texts = [captions[i] for i in idx]
            repeats = [im.repeats for im in chosen] if any(im.repeats != 1 for im in images) else None
            if cfg.random_flip:
                flipped = [mirrored(dataclasses.replace(im, caption=t)) for im, t in zip(chosen, texts)]
                out.append(Bucket(self._latents(ctx.pipe, chosen), ids, texts, self._latents(ctx.pipe, flipped),
                                  [f.caption for f in flipped], repeats))
            else:
                out.append(Bucket(self._latents(ctx.pipe, chosen), ids, texts, repeats=repeats))
        return out

    @staticmethod
    def identifiers(cfg: DreamBoothConfig) -> list[str]:
        """The identifier tokens this trainer's prompts carry (``--pivotal`` gives each a learned embedding)."""
        return [cfg.token]

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

    def _prior(self, ctx: Context, captions: list[str]) -> None:
        """The class images' latents (``store["class"]``) and, one per image, their prompts (``store["class_prompts"]``):
        ``a {class_noun}`` for all, or with ``--class-prompts captions`` each distinct caption without the identifier."""
        cfg: DreamBoothConfig = ctx.cfg
        if cfg.class_prompts == "class":
            prompts = [ctx.store["prompts"]["class"]]
        else:
            # a caption that is only the identifier leaves nothing: the class prompt stands in
            prompts = list(dict.fromkeys(without_token(c, cfg.token) or ctx.store["prompts"]["class"] for c in captions))
        share = -(-cfg.num_class_images // len(prompts))  # an equal share each, rounded up
        images, kept = [], []
        for p in prompts:
            got = self._class_images(ctx, p, share, keyed=cfg.class_prompts == "captions")
            images += got
            kept += [p] * len(got)
        ctx.store["class"] = self._latents(ctx.pipe, images)
        ctx.store["class_prompts"] = kept

    def _class_images(self, ctx: Context, prompt: str, count: int, keyed: bool = False):
        """``count`` base-model images of ``prompt``, cached under ``--class-data`` (in a subfolder per prompt when
        ``keyed``: the captions' prompts share it) or the default folder for the weights and prompt."""
        from PIL import Image

        from studio.sampling import generate

        cfg: DreamBoothConfig = ctx.cfg
        key = hashlib.sha1(f"{prompt}|{ctx.resolution}".encode()).hexdigest()[:10]
        if cfg.class_data:
            folder = Path(cfg.class_data) / key if keyed else Path(cfg.class_data)
        else:  # the weights' fingerprint, not only the folder's name: new weights in the same folder draw new images
            folder = Path("runs/class-images") / f"{Path(cfg.model).name}-{ctx.store['base_hash']}" / key
        folder.mkdir(parents=True, exist_ok=True)
        have = sorted(folder.glob("class-*.png"))
        if len(have) < count and ctx.accelerator.is_main_process:
            missing = range(len(have), count)
            images = generate(
                ctx.pipe, [prompt] * len(missing), seed=10_000 + len(have), height=ctx.resolution, width=ctx.resolution
            )
            for i, im in zip(missing, images):
                tmp = folder / f".class-{i:05d}.tmp.png"
                im.save(tmp)
                tmp.replace(folder / f"class-{i:05d}.png")
        ctx.accelerator.wait_for_everyone()
        files = sorted(folder.glob("class-*.png"))[:count]
        return [Image.open(f).convert("RGB").resize((ctx.resolution, ctx.resolution)) for f in files]

    def _draw_prior(self, ctx: Context, rng: random.Random, n: int) -> tuple[torch.Tensor, dict[str, Any]]:
        """A global batch of ``n`` class images and this process's share of their conditioning."""
        cls, prompts = ctx.store["class"], ctx.store["class_prompts"]
        idx = torch.tensor([rng.randrange(len(cls)) for _ in range(n)])
        return cls[idx], self._cond(ctx, [prompts[i] for i in idx[shard(ctx, n)].tolist()])

    def targets(self, ctx: Context) -> dict[str, list[str]]:
        pipe, cfg = ctx.pipe, ctx.cfg

        def pick(model, leaves):
            return [
                n
                for n, m in model.named_modules()
                if isinstance(m, torch.nn.Linear) and any(n.endswith("." + t) for t in leaves)
            ]

        out = {"unet": self.unet_lora_targets(ctx)}
        if cfg.train_text_encoder:
            for c in ("text_encoder", "text_encoder_2"):
                if getattr(pipe, c, None) is not None:
                    out[c] = pick(getattr(pipe, c), TEXT_TARGETS)
        return out

    def _cond(self, ctx: Context, prompts: list[str], time_ids: torch.Tensor | None = None) -> dict[str, Any]:
        """Conditioning for this process's examples, one prompt each (cached embeddings unless the
        text encoders train); ``time_ids`` default to an uncropped square at the training resolution."""
        from studio.families import sdxl_time_ids

        unique = list(dict.fromkeys(prompts))
        cache = ctx.store.get("cond", {})
        encoded = {p: cache[p] for p in unique if p in cache}
        fresh = [p for p in unique if p not in encoded]  # the text encoders train, or a shuffled caption
        if fresh:
            with torch.no_grad() if "cond" in ctx.store else contextlib.nullcontext():  # frozen encoders: no graph
                both = _encode(ctx.pipe, fresh)
            encoded.update({p: {k: (v[i : i + 1] if v is not None else None) for k, v in both.items()} for i, p in enumerate(fresh)})
        embeds = torch.cat([encoded[p]["embeds"] for p in prompts])
        added = None
        if encoded[unique[0]]["pooled"] is not None:
            ids = time_ids if time_ids is not None else sdxl_time_ids(ctx.resolution, ctx.resolution, len(prompts))
            added = {"text_embeds": torch.cat([encoded[p]["pooled"] for p in prompts]), "time_ids": ids.to(embeds.device)}
        return {"embeds": embeds, "added": added}

    def _draw(self, ctx: Context, groups, rng: random.Random, n: int) -> tuple[torch.Tensor, dict[str, Any]]:
        """A global batch of ``n`` from one bucket of ``groups`` (chosen with probability proportional to
        its images): its latents and this process's share of the conditioning."""
        chosen = 0
        if len(groups) > 1:
            pick = rng.randrange(sum(g.size() for g in groups))
            chosen = next(i for i, end in enumerate(itertools.accumulate(g.size() for g in groups)) if pick < end)
        bucket: Bucket = groups[chosen]
        if bucket.repeats:  # kohya's repeats: an image of a 10_ folder is drawn 10 times as often as one of a 1_ folder
            idx = torch.tensor(rng.choices(range(len(bucket.latents)), weights=bucket.repeats, k=n))
        else:
            idx = torch.tensor([rng.randrange(len(bucket.latents)) for _ in range(n)])
        latents, texts = bucket.latents[idx], [bucket.captions[i] for i in idx]
        flips = torch.zeros(n, dtype=torch.bool)
        if bucket.mirrored is not None:  # drawn after the examples, so a run without it draws what it drew before
            flips = torch.tensor([rng.random() < 0.5 for _ in range(n)])
            latents = torch.where(flips[:, None, None, None], bucket.mirrored[idx], latents)
            texts = [bucket.mirrored_captions[i] if f else t for i, f, t in zip(idx.tolist(), flips.tolist(), texts)]
        if ctx.cfg.shuffle_caption:
            texts = [shuffle_tags(t, ctx.cfg.keep_tokens, rng) for t in texts]
        if ctx.cfg.caption_dropout:
            texts = ["" if rng.random() < ctx.cfg.caption_dropout else t for t in texts]
        part = shard(ctx, n)
        cond = self._cond(ctx, texts[part], bucket.time_ids[idx[part]])
        # which bucket, examples and mirrorings (this process's), for what the trainer keeps per image
        cond["drawn"] = (chosen, idx[part], flips[part])
        return latents, cond

    def loss(self, ctx: Context, step: int, micro: int, g: torch.Generator, rng: random.Random) -> torch.Tensor:
        cfg: DreamBoothConfig = ctx.cfg
        n = cfg.batch_size * ctx.accelerator.num_processes  # the global batch; denoise_loss takes our share
        parts = [self._draw(ctx, ctx.store["instance"], rng, n)]
        if cfg.prior_preservation:
            parts.append(self._draw_prior(ctx, rng, n))
        masks = None
        if cfg.attention_loss or cfg.masked_loss:  # this process's examples' subject masks, mirrored with them
            chosen, mine, flips = parts[0][1]["drawn"]
            masks = ctx.store["masks"][chosen][mine]
            masks = torch.where(flips[:, None, None], masks.flip(-1), masks).to(ctx.accelerator.device)
        if cfg.masked_loss:
            parts[0][1]["loss_weight"] = loss_weights(masks, parts[0][0].shape[-2:], cfg.mask_min_value)
        # one UNet pass for both when the sizes agree (the class images are square; a bucket may not be)
        if not cfg.attention_loss:
            losses = denoise_losses(ctx, parts, g)
            return losses[0] + cfg.prior_weight * losses[1] if cfg.prior_preservation else losses[0]
        maps: CrossAttentionMaps = ctx.store["maps"]
        weights, weights_mirrored = (t[mine] for t in ctx.store["attend"][chosen])
        weights = torch.where(flips[:, None], weights_mirrored, weights).to(ctx.accelerator.device)

        def watch(members: list[int], embeds: torch.Tensor) -> None:  # the instance examples lead their pass
            if members[0] == 0:
                maps.watch(embeds, torch.arange(len(mine), device=embeds.device), weights)

        try:
            losses = denoise_losses(ctx, parts, g, before_pass=watch)
        finally:
            maps.close()
        total = losses[0] + cfg.prior_weight * losses[1] if cfg.prior_preservation else losses[0]
        return total + cfg.attention_loss * attention_loss(maps.maps, masks, parts[0][0].shape[-2:])

    def metadata(self, ctx: Context) -> dict[str, Any]:
        cfg: DreamBoothConfig = ctx.cfg
        return {
            "token": cfg.token,
            "class_noun": cfg.class_noun,
            "dataset": {
                "images": ctx.store["n_images"],
                "files": ctx.store["files"],
                "buckets": ctx.store["buckets"],
                "instance_prompt": ctx.store["prompts"]["instance"],
                "captioned": ctx.store["n_captions"],
                **({"repeats": ctx.store["repeats"]} if "repeats" in ctx.store else {}),
                "prior_preservation": cfg.prior_preservation,
                **({"class_prompts": list(dict.fromkeys(ctx.store["class_prompts"]))}
                   if cfg.prior_preservation and cfg.class_prompts == "captions" else {}),
                **({"attention_loss": cfg.attention_loss} if cfg.attention_loss else {}),
                **({"masked_loss": cfg.mask_min_value} if cfg.masked_loss else {}),
            },
        }

    def after_inject(self, ctx: Context) -> None:
        """With the attention loss: a recorder of the token's cross-attention maps in the training attention."""
        if ctx.cfg.attention_loss:
            ctx.store["maps"] = attention_maps(ctx.pipe.unet)


def token_weights(tokenizer, prompt: str, token: str, name: str = "prompt") -> torch.Tensor:
    """A weight per prompt position (the tokenizer's length): 1 / n on the n positions of ``token`` in
    ``prompt``, 0 elsewhere; an error naming ``name`` where the prompt does not hold the token."""
    from studio.composers.base import token_positions

    positions = token_positions(tokenizer, prompt, [token])[0]
    if not positions:
        raise ValueError(f"{name}: its prompt {prompt!r} does not hold the token {token!r}, whose attention"
                         " --attention-loss trains; name the token in every caption")
    w = torch.zeros(tokenizer.model_max_length)
    w[positions] = 1.0 / len(positions)
    return w


def loss_weights(masks: torch.Tensor, latent_size, min_value: float = 0.0) -> torch.Tensor:
    """``--masked-loss``'s per-pixel weights of the denoising loss, ``(examples, 1, h, w)`` at the latents' size
    ``(h, w)``: each subject mask (examples, H, W) averaged over the pixels each latent covers, lifted to at least
    ``min_value`` (``min + (1 - min) · mask``)."""
    import torch.nn.functional as F

    pooled = F.adaptive_avg_pool2d(masks[:, None].float(), tuple(latent_size))
    return min_value + (1 - min_value) * pooled


def attention_loss(maps: list[torch.Tensor], masks: torch.Tensor, latent_size) -> torch.Tensor:
    """Break-A-Scene's attention loss: for each recorded layer's maps (examples, queries), each example's map
    divided by its maximum against its subject's mask (examples, H, W) averaged to the layer's grid; the mean
    squared error, averaged over layers."""
    import torch.nn.functional as F

    if not maps:
        raise ValueError("--attention-loss recorded no cross-attention map: the UNet's cross-attention layers did"
                         " not run the studio's training attention (an attention mask or a norm it does not"
                         " reproduce) or all have more than 1024 query positions")
    h, w = latent_size
    total = masks.new_zeros(())
    for m in maps:
        factor = round((h * w / m.shape[-1]) ** 0.5)
        grid = m.view(m.shape[0], h // factor, w // factor)
        grid = grid / grid.amax(dim=(1, 2), keepdim=True).clamp_min(1e-8)
        target = F.adaptive_avg_pool2d(masks[:, None].float(), grid.shape[-2:])[:, 0]
        total = total + F.mse_loss(grid.float(), target.to(grid.device))
    return total / len(maps)


def run_trainer(trainer, config_class, config_file, overrides: dict[str, Any]) -> Path:
    """Build ``config_class`` from a file and flags and train; bad input exits 2 with one line."""
    import typer

    try:
        values = read_config_file(config_file) if config_file else {}
        cfg = build_config(config_class, values, overrides)
        with warnings.catch_warnings():
            warnings.simplefilter("default")
            warnings.formatwarning = lambda message, *args, **kwargs: f"warning: {message}\n"
            out = train(trainer, cfg)
    except (ValueError, FileNotFoundError) as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(2) from None
    except Cancelled as e:
        typer.echo(f"cancelled: {e}", err=True)
        raise typer.Exit(3) from None
    typer.echo(f"wrote {out}")
    return out


def run(config_file, overrides: dict[str, Any]) -> Path:
    return run_trainer(DreamBooth(), DreamBoothConfig, config_file, overrides)


command = command_from_config(DreamBoothConfig, run, "Train a DreamBooth LoRA on a few images of a subject.")


def main(argv: list[str] | None = None) -> None:
    run_command(command, argv)


if __name__ == "__main__":
    main()
