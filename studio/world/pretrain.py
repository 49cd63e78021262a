"""The embedded model's recipe: pretrain a tiny SDXL on the synthetic world, from scratch.

Stages, each resumable (``studio world pretrain`` picks up where a killed run stopped):

1. ``tokenizer``: the CLIP BPE tokenizer learned from the caption grammar.
2. ``render``: ``n_scenes`` random scenes of the base concepts (never the held-out ones); with ``textures``, some
   objects wear a named generic texture instead of their style (:func:`texture_words`), called by its word.
3. ``vae``: the KL autoencoder, trained on 32x32 crops around objects (it is fully convolutional), or ``vae_from``.
4. ``latents``: every scene encoded once; the latent scale is set to 1/std (or, with
   ``standardize_latents``, each channel is standardized inside the VAE's 1x1 convolutions).
5. ``unet``: UNet and both text encoders jointly, v-prediction with min-SNR weighting (SDXL's betas
   until ``zero_snr_from``, then zero-terminal-SNR betas so that sampling from pure noise matches
   training, e.g. for the background colour), captions
   redrawn from each scene at every visit (random attribute subsets), 10% empty conditioning
   as zeros (what ``force_zeros_for_empty_prompt`` feeds at sampling time), EMA weights.
6. ``save``: the EMA weights as a stock ``StableDiffusionXLPipeline`` folder, written atomically.

Captions in the evaluation split (:func:`studio.world.grammar.is_held_out`) are never trained on.
"""

from __future__ import annotations

import dataclasses
import json
import math
import random
import shutil
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from studio.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from studio.families import encode_prompt_sdxl, sdxl_time_ids
from studio.world.concepts import BASE_SHAPES, BASE_STYLES, COLOUR_NAMES, COLOURS, IMAGE_SIZE, POSITIONS, SIZE_NAMES
from studio.world.grammar import VOCABULARY, caption_scene, format_prompt, is_held_out
from studio.world.model import build_schedulers, build_text_encoders, build_unet, build_vae, standardize_latents
from studio.world.recipe import PretrainConfig
from studio.world.render import TEXTURE_CATALOGUE, Scene, Texture, render_array, sample_scene
from studio.world.tokenizer import build_tokenizer

PROBE_SCALE = 10.0


def probe_vocabulary(tok) -> torch.Tensor:
    """Token ids of the attribute words the text probe names (base shapes, colours, base styles, sizes), in
    that order; each is one token of the world's tokenizer."""
    words = [*BASE_SHAPES, *COLOUR_NAMES, *BASE_STYLES, *SIZE_NAMES]
    ids = [tok(w, add_special_tokens=False)["input_ids"] for w in words]
    split = [w for w, i in zip(words, ids) if len(i) != 1]
    if split:
        raise ValueError(f"attribute words {split} are not single tokens of this tokenizer")
    return torch.tensor([i[0] for i in ids])


def text_probe_loss(probe: torch.Tensor, vocab: torch.Tensor, input_ids: torch.Tensor,
                    hidden: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of naming each attribute word in ``input_ids`` (B, T) from ``hidden`` (B, T, D) at its
    position, with cosine logits ``PROBE_SCALE * cos(hidden, probe[c])`` over the words of ``vocab``
    (``probe``: (len(vocab), D)). The scale is fixed, so only states that point apart can be told apart."""
    where = (input_ids[..., None] == vocab).nonzero()  # (n, 3): batch, position, class
    if len(where) == 0:
        return hidden.sum() * 0
    states = F.normalize(hidden[where[:, 0], where[:, 1]], dim=-1)
    logits = PROBE_SCALE * states @ F.normalize(probe, dim=-1).T
    return F.cross_entropy(logits, where[:, 2])


def _lr(step: int, total: int, base: float, warmup: int) -> float:
    if step < warmup:
        return base * (step + 1) / warmup
    frac = (step - warmup) / max(1, total - warmup)
    return base * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac)))


def _scenes(cfg: PretrainConfig) -> list[Scene]:
    rng = random.Random(cfg.seed)
    return [sample_scene(rng, rng.choice(cfg.object_counts)) for _ in range(cfg.n_scenes)]


# identifiers the studio's defaults and benches give new concepts: never a texture's word
RESERVED_WORDS = frozenset({"sks", "zxy", "zwx", "qpv"})
_CONSONANTS = "bcdfghjklmnpqrstvwxz"


def texture_words(n: int, seed: int = 0) -> tuple[Texture, ...]:
    """The first ``n`` textures of the catalogue, each named by a made-up three-consonant word (as the studio's
    identifiers are: "sks", "zxy"), none a grammar word or a reserved identifier; the same ``seed``, the same words."""
    if not 0 <= n <= len(TEXTURE_CATALOGUE):
        raise ValueError(f"textures: {n} asked for; accepted: 0 to {len(TEXTURE_CATALOGUE)}, the catalogue's size")
    rng = random.Random(seed * 7_777 + 1)
    words: list[str] = []
    while len(words) < n:
        word = "".join(rng.choice(_CONSONANTS) for _ in range(3))
        if word not in RESERVED_WORDS and word not in VOCABULARY and word not in words:
            words.append(word)
    return tuple(Texture(w, *spec) for w, spec in zip(words, TEXTURE_CATALOGUE))


def _scene_textures(cfg: PretrainConfig, scenes: list[Scene]) -> list[tuple[Texture | None, ...] | None]:
    """Per scene, the named texture each object wears (``None``: its style), or ``None`` for a scene with none."""
    if not cfg.textures:
        return [None] * len(scenes)
    catalogue, rng = texture_words(cfg.textures, cfg.seed), random.Random(cfg.seed * 31 + 7)
    out = []
    for scene in scenes:
        picks = tuple(rng.choice(catalogue) if rng.random() < cfg.texture_rate else None for _ in scene.objects)
        out.append(picks if any(picks) else None)
    return out


def check_work_dir(cfg: PretrainConfig, work: Path) -> None:
    """Refuse to resume in a work dir whose caches were made for other scenes (``PretrainConfig.DATA_KEYS``)."""
    saved = work / "config.json"
    if not saved.is_file():
        return
    old = json.loads(saved.read_text())
    new = json.loads(json.dumps(dataclasses.asdict(cfg)))  # tuples as JSON lists, as saved
    changed = [k for k in PretrainConfig.DATA_KEYS if k in old and old[k] != new[k]]
    if changed:
        raise ValueError(f"work dir {work}: its rendered scenes and caches were made with "
                         + ", ".join(f"{k}={old[k]}" for k in changed) + ", not "
                         + ", ".join(f"{k}={new[k]}" for k in changed) + "; start it afresh (--fresh) or use another work dir")


def _render_all(cfg: PretrainConfig, work: Path, scenes: list[Scene], textures: list) -> torch.Tensor:
    path = work / "images.safetensors"
    if path.is_file():
        return load_file(str(path))["images"]
    arr = np.stack([render_array(s, seed=cfg.seed * 1_000_003 + i, textures=textures[i])
                    for i, s in enumerate(tqdm(scenes, desc="render"))])
    images = torch.from_numpy(arr)
    save_file({"images": images}, str(path.with_suffix(".tmp")))
    path.with_suffix(".tmp").replace(path)
    return images


def object_masks(images: torch.Tensor, scenes: list[Scene], factor: int) -> torch.Tensor:
    """Per latent pixel, 1 where an object is within one latent pixel (``images``: uint8 NHWC).

    A pixel belongs to an object where it differs from the scene's background colour; the mask is
    pooled to the latent grid (``factor`` pixels per latent pixel) and grown by one latent pixel,
    which also covers the inside of outlined shapes.
    """
    masks = []
    for start in range(0, len(scenes), 2048):
        chunk = images[start : start + 2048].to(torch.int16)
        bg = torch.tensor([COLOURS[s.background] for s in scenes[start : start + 2048]], dtype=torch.int16)
        on = ((chunk - bg[:, None, None, :]).abs().amax(dim=-1) > 40).float()[:, None]
        on = F.max_pool2d(F.max_pool2d(on, factor), 3, stride=1, padding=1)
        masks.append(on.to(torch.bool))
    return torch.cat(masks)


def _to_pixels(u8: torch.Tensor) -> torch.Tensor:
    return u8.permute(0, 3, 1, 2).float() / 127.5 - 1


def _object_crop(image: torch.Tensor, scene: Scene, g: torch.Generator, size: int = 32) -> torch.Tensor:
    """A ``size`` crop around one of the scene's objects (most of a random crop is background)."""
    obj = scene.objects[int(torch.randint(len(scene.objects), (1,), generator=g))]
    row, col = POSITIONS[obj.position]
    cell = IMAGE_SIZE / 3
    jx, jy = (int(v) for v in torch.randint(-6, 7, (2,), generator=g))
    x0 = min(max(int((col + 0.5) * cell) - size // 2 + jx, 0), IMAGE_SIZE - size)
    y0 = min(max(int((row + 0.5) * cell) - size // 2 + jy, 0), IMAGE_SIZE - size)
    return image[y0 : y0 + size, x0 : x0 + size]


def _vae_loss(vae, x: torch.Tensor, g: torch.Generator, kl_weight: float):
    """The VAE's training loss on pixels ``x`` (L1 + MSE + weighted KL) and the posterior it drew from."""
    posterior = vae.encode(x).latent_dist
    rec = vae.decode(posterior.sample(generator=g)).sample
    # KL per pixel value, as in SD's VAE loss (summed reconstruction + 1e-6 * summed KL): a KL
    # weighted against a *mean* reconstruction error would blur everything.
    kl = posterior.kl().mean() / x[0].numel()
    return F.l1_loss(rec, x) + F.mse_loss(rec, x) + kl_weight * kl, posterior


def _train_vae(cfg: PretrainConfig, work: Path, images: torch.Tensor, scenes: list[Scene]):
    vae = build_vae()
    final = work / "vae-final.safetensors"
    if final.is_file():
        vae.load_state_dict(load_file(str(final)))
        return vae
    run = work / "vae"
    opt = torch.optim.AdamW(vae.parameters(), lr=cfg.vae_lr, weight_decay=0.0)
    start = 0
    if (ckpt := latest_checkpoint(run)) is not None:
        start = load_checkpoint(ckpt, {"vae": vae}, {"opt": opt})["step"]
    bar = tqdm(range(start, cfg.vae_steps), desc="vae", initial=start, total=cfg.vae_steps)
    for step in bar:
        g = torch.Generator().manual_seed(cfg.seed * 7919 + step)
        idx = torch.randint(len(images), (cfg.vae_batch,), generator=g).tolist()
        x = _to_pixels(torch.stack([_object_crop(images[i], scenes[i], g) for i in idx]))
        for group in opt.param_groups:
            group["lr"] = _lr(step, cfg.vae_steps, cfg.vae_lr, cfg.vae_warmup)
        loss, _ = _vae_loss(vae, x, g, cfg.vae_kl_weight)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        bar.set_postfix(loss=f"{loss.item():.4f}")
        if (step + 1) % cfg.checkpoint_every == 0:
            save_checkpoint(run, step + 1, {"vae": vae}, {"opt": opt})
    save_file(vae.state_dict(), str(final.with_suffix(".tmp")))
    final.with_suffix(".tmp").replace(final)
    return vae


def refine_vae(vae, steps: int, n_scenes: int = 3000, lr: float = 2e-3, anchor_weight: float = 1.0, batch: int = 32,
               seed: int = 0, progress: bool = True):
    """Fine-tune a trained VAE on generic textures, keeping its latents of the world's scenes (a copy is returned).

    Each batch is half 32x32 crops of base-concept scenes, half crops of the same kind of scenes whose
    objects are filled with generic textures (``render(..., generic_textures=True)``: gratings,
    binary cell noise, tile noise; none of the world's styles). The loss is the VAE's own
    (L1 + MSE + KL per pixel value) plus ``anchor_weight`` times the squared change of the posterior
    mode on the base crops, relative to the latents' variance: the denoiser trained on the old
    latents stays valid, while textures the old encoder lost get codes. Why: the recipe's VAE saw
    only the base styles (period-4 stripes and dots, on the latent grid), and carries the held-out
    styles badly (``bench/codec.py``), so no adapter could sample them through it.
    """
    import copy

    rng = random.Random(seed)
    scenes = [sample_scene(rng) for _ in range(n_scenes)]
    base = torch.from_numpy(np.stack([render_array(sc, seed=seed * 7919 + 2 * i) for i, sc in enumerate(scenes)]))
    textured = torch.from_numpy(np.stack([render_array(sc, seed=seed * 7919 + 2 * i + 1, generic_textures=True)
                                          for i, sc in enumerate(scenes)]))
    old = copy.deepcopy(vae).eval().requires_grad_(False)
    new = copy.deepcopy(vae).train().requires_grad_(True)
    opt = torch.optim.AdamW(new.parameters(), lr=lr, weight_decay=0.0)
    half = batch // 2
    for step in tqdm(range(steps), desc="refine vae", disable=not progress):
        g = torch.Generator().manual_seed(seed * 1_000_003 + step)
        idx = torch.randint(n_scenes, (batch,), generator=g).tolist()
        xb = _to_pixels(torch.stack([_object_crop(base[i], scenes[i], g) for i in idx[:half]]))
        xt = _to_pixels(torch.stack([_object_crop(textured[i], scenes[i], g) for i in idx[half:]]))
        x = torch.cat([xb, xt])
        for group in opt.param_groups:
            group["lr"] = _lr(step, steps, lr, min(50, steps // 10))
        loss, posterior = _vae_loss(new, x, g, PretrainConfig.vae_kl_weight)
        if anchor_weight:
            with torch.no_grad():
                ref = old.encode(xb).latent_dist.mode()
            loss = loss + anchor_weight * F.mse_loss(posterior.mode()[:half], ref) / ref.var()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(new.parameters(), 1.0)
        opt.step()
    return new.eval().requires_grad_(False)


@torch.no_grad()
def _encode_all(work: Path, vae, images: torch.Tensor) -> torch.Tensor:
    path = work / "latents.safetensors"
    if path.is_file():
        return load_file(str(path))["latents"]
    vae.eval()
    chunks = [vae.encode(_to_pixels(images[i : i + 256])).latent_dist.mode() for i in tqdm(
        range(0, len(images), 256), desc="encode")]
    latents = torch.cat(chunks).contiguous()
    save_file({"latents": latents}, str(path.with_suffix(".tmp")))
    path.with_suffix(".tmp").replace(path)
    return latents


def check_init_from(cfg: PretrainConfig) -> Path:
    """``cfg.init_from`` as a path, refused (before anything is written) unless it is a model folder this recipe
    could have saved, or when it comes with ``standardize_latents``."""
    if cfg.standardize_latents:
        raise ValueError("init_from with standardize_latents: a continuation keeps its source's VAE and latent scale;"
                         " accepted: one or the other")
    source = Path(cfg.init_from)
    missing = [part for part in ("unet", "vae", "text_encoder", "text_encoder_2", "tokenizer") if not (source / part).is_dir()]
    if missing:
        raise FileNotFoundError(f"init_from {source}: not a model folder saved by this recipe (no {', '.join(missing)})")
    return source


def check_vae_from(cfg: PretrainConfig) -> Path:
    """``cfg.vae_from`` as a path, refused (before anything is written) unless it is a diffusers AutoencoderKL folder
    of the embedded model's architecture, or when it comes with ``init_from`` (which keeps its source's VAE)."""
    from diffusers import AutoencoderKL

    if cfg.init_from:
        raise ValueError("vae_from with init_from: a continuation keeps its source's VAE; accepted: one or the other")
    folder = Path(cfg.vae_from)
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"vae_from {folder}: not a diffusers AutoencoderKL folder (no config.json)")
    config, reference = AutoencoderKL.load_config(folder), build_vae().config
    differ = [k for k in ("latent_channels", "block_out_channels", "down_block_types")
              if list(np.atleast_1d(config.get(k))) != list(np.atleast_1d(reference[k]))]
    if differ:
        raise ValueError(f"vae_from {folder}: its {', '.join(differ)} differ from the embedded model's VAE")
    return folder


def _use_vae(folder: Path, work: Path) -> None:
    """Put the VAE of the diffusers folder ``folder`` where the recipe's VAE stage finds a finished VAE, so that stage
    is skipped."""
    from diffusers import AutoencoderKL

    final = work / "vae-final.safetensors"
    if not final.is_file():
        save_file(AutoencoderKL.from_pretrained(folder).state_dict(), str(final.with_suffix(".tmp")))
        final.with_suffix(".tmp").replace(final)


def _load_weights(source: Path, unet, te1, te2) -> None:
    """The UNet's and the text encoders' weights from the model folder ``source``."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    for model, cls, part in ((unet, UNet2DConditionModel, "unet"), (te1, CLIPTextModel, "text_encoder"),
                             (te2, CLIPTextModelWithProjection, "text_encoder_2")):
        model.load_state_dict(cls.from_pretrained(source / part).state_dict())


def _caption(scene: Scene, rng: random.Random, detail: float, textures: tuple[Texture | None, ...] | None = None,
             ) -> str | None:
    """A training caption for ``scene``: any caption outside the evaluation split (``detail``: see
    :func:`caption_scene`). An object that wears a named texture (``textures``) is always called by its word, where
    a style word goes."""
    for _ in range(20):
        prompt = caption_scene(scene, rng, detail)
        if textures is not None:
            prompt = dataclasses.replace(prompt, objects=tuple(
                o if t is None else dataclasses.replace(o, style=t.word) for o, t in zip(prompt.objects, textures)))
        text = format_prompt(prompt, style_first=rng.random() < 0.3)
        if not is_held_out(text):
            return text
    return None


def _assemble(vae, te1, te2, tok, unet, zero_terminal_snr: bool = False):
    from diffusers import StableDiffusionXLPipeline

    _, sampler = build_schedulers(zero_terminal_snr)
    pipe = StableDiffusionXLPipeline(vae=vae, text_encoder=te1, text_encoder_2=te2, tokenizer=tok,
                                     tokenizer_2=tok, unet=unet, scheduler=sampler)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _monitor(pipe, step: int, n: int = 32) -> str:
    """Prompt fidelity of the current weights on a few held-out prompts (needs the judge)."""
    from studio.eval.fidelity import DEFAULT_JUDGE, evaluate_prompts

    if not DEFAULT_JUDGE.is_file():
        return "no judge"
    scores = evaluate_prompts(pipe, n_prompts=n, seed=123, progress=False)
    return f"step {step}: " + ", ".join(f"{k}={v:.3f}" for k, v in scores.items() if k.startswith("fidelity"))


def pretrain(cfg: PretrainConfig) -> Path:
    """Run (or resume) the whole recipe; returns the saved model folder."""
    from diffusers import AutoencoderKL
    from diffusers.training_utils import EMAModel, compute_snr
    from transformers import CLIPTokenizer

    source = check_init_from(cfg) if cfg.init_from else None
    vae_folder = source / "vae" if source else (check_vae_from(cfg) if cfg.vae_from else None)
    if not 0 <= cfg.texture_rate <= 1:
        raise ValueError(f"texture_rate must be a chance between 0 and 1, got {cfg.texture_rate}")
    texture_words(cfg.textures, cfg.seed)  # refuses a count the catalogue does not have, before anything is written
    t0 = time.time()
    torch.manual_seed(cfg.seed)
    work = Path(cfg.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    check_work_dir(cfg, work)
    (work / "config.json").write_text(json.dumps(dataclasses.asdict(cfg), indent=2))
    log = (work / "log.txt").open("a")
    if vae_folder is not None:
        _use_vae(vae_folder, work)
    tok = CLIPTokenizer.from_pretrained(source / "tokenizer") if source else build_tokenizer(work / "tokenizer")
    scenes = _scenes(cfg)
    textures = _scene_textures(cfg, scenes)
    images = _render_all(cfg, work, scenes, textures)
    vae = _train_vae(cfg, work, images, scenes)
    latents = _encode_all(work, vae, images)
    masks = object_masks(images, scenes, IMAGE_SIZE // latents.shape[-1]) if cfg.object_weight != 1 else None
    if cfg.standardize_latents:
        mean, std = latents.mean(dim=(0, 2, 3)), latents.std(dim=(0, 2, 3))
        standardize_latents(vae, mean, std)
        latents = (latents - mean.view(1, -1, 1, 1)) / std.view(1, -1, 1, 1)
        vae.register_to_config(scaling_factor=1.0)
    else:
        # a continuation keeps the latent scale its UNet was trained with
        scale = float(AutoencoderKL.load_config(source / "vae")["scaling_factor"]) if source else float(1.0 / latents.std())
        latents = latents * scale
        vae.register_to_config(scaling_factor=scale)
    del images

    unet = build_unet()
    te1, te2 = build_text_encoders(tok)
    if source:
        _load_weights(source, unet, te1, te2)
    params = [p for m in (unet, te1, te2) for p in m.parameters()]
    # fused: one kernel over the 605 tensors (31 -> 8 ms a step here, about 4% of it); a checkpoint of an unfused run
    # resumes unfused (the flag is part of the saved param groups)
    opt = torch.optim.AdamW(params, lr=cfg.unet_lr, betas=(0.9, 0.99), weight_decay=0.01, fused=True)
    ema = EMAModel(params, decay=cfg.ema_decay, use_ema_warmup=True, power=2 / 3)
    schedules = {False: build_schedulers(False)[0], True: build_schedulers(True)[0]}
    probe = probe_opt = vocab = None
    if cfg.text_probe_weight:
        vocab = probe_vocabulary(tok)
        width = te1.config.hidden_size + te2.config.hidden_size
        probe = torch.nn.Linear(width, len(vocab), bias=False)
        probe_opt = torch.optim.Adam(probe.parameters(), lr=1e-3)
    run = work / "unet"
    start = 0
    if (ckpt := latest_checkpoint(run)) is not None:
        modules, optimizers = {"unet": unet, "te1": te1, "te2": te2}, {"opt": opt}
        if probe is not None and (ckpt / "probe.safetensors").is_file():  # else a fresh probe from here on
            modules["probe"], optimizers["probe"] = probe, probe_opt
        state = load_checkpoint(ckpt, modules, optimizers)
        shadow = load_file(str(ckpt / "ema.safetensors"))
        ema.shadow_params = [shadow[str(i)] for i in range(len(params))]
        ema.optimization_step = state["ema_step"]
        start = state["step"]
    time_ids = sdxl_time_ids(IMAGE_SIZE, IMAGE_SIZE, cfg.unet_batch)
    bar = tqdm(range(start, cfg.unet_steps), desc="unet", initial=start, total=cfg.unet_steps)
    for step in bar:
        g = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step)
        rng = random.Random(cfg.seed * 1_000_003 + step)
        captions, idx = [], []
        while len(captions) < cfg.unet_batch:
            i = rng.randrange(len(scenes))
            if (text := _caption(scenes[i], rng, cfg.caption_detail, textures[i])) is not None:
                captions.append(text)
                idx.append(i)
        zero_snr = cfg.zero_snr_at(step)
        noise_sched = schedules[zero_snr]
        batch = torch.tensor(idx)
        x0 = latents[batch]
        embeds, pooled = encode_prompt_sdxl([tok, tok], [te1, te2], captions)
        probe_loss = None
        if probe is not None:
            ids = tok(captions, padding="max_length", max_length=tok.model_max_length, truncation=True,
                      return_tensors="pt").input_ids
            probe_loss = text_probe_loss(probe.weight, vocab, ids, embeds)
        keep = (torch.rand(cfg.unet_batch, generator=g) >= cfg.cond_dropout).float()
        embeds, pooled = embeds * keep[:, None, None], pooled * keep[:, None]
        noise = torch.randn(x0.shape, generator=g)
        t = torch.randint(0, noise_sched.config.num_train_timesteps, (cfg.unet_batch,), generator=g)
        noisy = noise_sched.add_noise(x0, noise, t)
        target = noise_sched.get_velocity(x0, noise, t)
        pred = unet(noisy, t, embeds, added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids}).sample
        snr = compute_snr(noise_sched, t)
        if zero_snr:
            # min-SNR-gamma on the x0 error counted from SNR + 1: weight 1 at the noisiest steps
            # (zero SNR at t=999 must still be learned; plain min(SNR, gamma) gives it 0)
            weight = torch.clamp(snr + 1, max=cfg.min_snr_gamma) / (snr + 1)
        else:
            weight = torch.clamp(snr, max=cfg.min_snr_gamma) / (snr + 1)  # min-SNR-gamma for v-prediction
        err = F.mse_loss(pred, target, reduction="none")
        if masks is not None:
            pixel_w = 1 + (cfg.object_weight - 1) * masks[batch].float()
            err = err * (pixel_w / pixel_w.mean(dim=(1, 2, 3), keepdim=True))
        loss = (weight * err.mean(dim=(1, 2, 3))).mean()
        for group in opt.param_groups:
            group["lr"] = _lr(step, cfg.lr_total(step), cfg.unet_lr, cfg.warmup)
        opt.zero_grad(set_to_none=True)
        if probe is not None:
            probe_opt.zero_grad(set_to_none=True)
            (loss + cfg.text_probe_weight * probe_loss).backward()
        else:
            loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        if probe is not None:
            probe_opt.step()
        ema.step(params)
        bar.set_postfix(loss=f"{loss.item():.4f}", **({"probe": f"{probe_loss.item():.3f}"} if probe is not None else {}))
        done = step + 1
        if done % cfg.checkpoint_every == 0 or done == cfg.unet_steps:
            modules = {"unet": unet, "te1": te1, "te2": te2, "ema": {str(i): p for i, p in enumerate(ema.shadow_params)}}
            optimizers = {"opt": opt}
            if probe is not None:
                modules["probe"], optimizers["probe"] = probe, probe_opt
            ckpt = save_checkpoint(run, done, modules, optimizers, {"ema_step": ema.optimization_step})
        if cfg.monitor_every and done % cfg.monitor_every == 0:
            ema.store(params)
            ema.copy_to(params)
            line = _monitor(_assemble(vae, te1, te2, tok, unet, zero_snr), done)
            ema.restore(params)
            extra = f" probe={probe_loss.item():.3f}" if probe is not None else ""
            log.write(f"{line} loss={loss.item():.4f}{extra} elapsed={time.time() - t0:.0f}s\n")
            log.flush()
            tqdm.write(line)

    ema.copy_to(params)
    out = Path(cfg.out)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    _assemble(vae, te1, te2, tok, unet, cfg.zero_snr_at(cfg.unet_steps - 1)).save_pretrained(tmp)
    if source:  # the source's tokenizer files as they were (saving a used tokenizer writes its padding state too)
        for part in ("tokenizer", "tokenizer_2"):
            shutil.rmtree(tmp / part)
            shutil.copytree(source / part if (source / part).is_dir() else source / "tokenizer", tmp / part)
    recipe = {"config": dataclasses.asdict(cfg), "seconds_this_run": round(time.time() - t0),
              "torch_threads": torch.get_num_threads()}
    (tmp / "recipe.json").write_text(json.dumps(recipe, indent=2))
    card = out / "README.md"
    if card.is_file():  # keep the model card across a re-run
        shutil.copy(card, tmp / "README.md")
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return out
