"""The pretraining recipe's knobs (:class:`PretrainConfig`), apart from the code that runs them
(:mod:`studio.world.pretrain`), so that the CLI reads its defaults without importing the models."""

from __future__ import annotations

from dataclasses import dataclass

from studio.families import EMBEDDED_MODEL


@dataclass
class PretrainConfig:
    """Every knob of the recipe; saved as ``recipe.json`` next to the weights. The defaults are the budget recipe
    (about 2 h on 2 CPU cores); the model card lists the flags of the longer legs the shipped weights ran."""

    out: str = str(EMBEDDED_MODEL)
    work_dir: str = "runs/pretrain"
    seed: int = 0
    n_scenes: int = 50_000
    # each rendered scene's object count is drawn from this list (repeat a count to weight it). The budget recipe
    # draws more composite scenes than the world's own mix (OBJECT_COUNTS, 1,1,2,2,3, what the shipped weights saw):
    # its runs on the world's mix drew shapes in two-object prompts about half as often as the shipped weights
    object_counts: tuple[int, ...] = (1, 2, 2, 3)
    vae_steps: int = 3000
    vae_batch: int = 32
    vae_lr: float = 2e-3
    vae_kl_weight: float = 1e-6
    vae_warmup: int = 100
    # 18,000 steps of batch 16 (the sixth budget run): in the same time as 10,000 of batch 32 (a step of 16 cost 0.35 s
    # here against 0.62 s), 1.8x the updates for 0.9x the samples; both draws of held-out prompts met the bars
    unet_steps: int = 18000
    unet_batch: int = 16
    unet_lr: float = 5e-4
    warmup: int = 200
    cond_dropout: float = 0.1
    min_snr_gamma: float = 5.0
    ema_decay: float = 0.999
    checkpoint_every: int = 500
    monitor_every: int = 0  # each check costs about a minute of the budget (0: none, as the budget runs)
    # From this UNet step on: zero-terminal-SNR betas with trailing timesteps, and the min-SNR weight
    # counted from SNR + 1 (so the pure-noise step is learned). Before it, SDXL's schedule.
    # 0: zero-SNR from the start; -1: never (the first shipped weights: 3000 steps, never).
    zero_snr_from: int = 3600
    # the learning rate's cosine restarts: up to each listed step it follows the cosine of a run that
    # long, then the next (the shipped weights' legs: to 3000, to 5000, ...). Empty: one cosine over the run.
    lr_ends: tuple[int, ...] = ()
    standardize_latents: bool = False  # variant: per-channel latent standardization folded into the VAE
    # Loss weight of the latent pixels on and around objects, relative to the background (1: plain
    # loss). Objects cover a tenth of a scene, and what tells shapes apart a small part of that, so
    # the plain loss is dominated by backgrounds and colours; each sample's weights are normalised
    # to mean 1, so the learning rate keeps its meaning.
    object_weight: float = 8.0
    # Weight of an auxiliary loss on the text encoders' output (0: none): at every shape, colour, style and
    # size word of a caption, a cosine classifier (scale PROBE_SCALE, trained beside the model, not
    # shipped) must name the word from the hidden state the UNet reads there. Trained only through the
    # UNet, the encoders had let shape words collapse (at the shape word, "square" and "circle" differed
    # by about 13% of the state's norm, colours by over 100%), so the UNet could not be told the shape.
    text_probe_weight: float = 0.1
    # The chance that a training caption names an object's size, and separately its style (0.5: the rate of the
    # evaluation prompts, and of every run before this knob). Captions that leave them out teach the model to choose
    # them itself; captions that name them are the only ones that teach the words. 0.8 (the fourth budget run on):
    # style 0.48 -> 0.70 on one-object prompts, at some cost in colour.
    caption_detail: float = 0.8
    # A model folder this recipe saved (e.g. the shipped weights) to continue from instead of starting fresh: its
    # tokenizer, VAE (and latent scale), text encoders and UNet are the starting point; UNet steps count from 0
    # again, with a fresh optimizer. Empty: train everything from scratch.
    init_from: str = ""
    # How many of the catalogue's named generic textures (studio.world.render.TEXTURE_CATALOGUE: horizontal gratings,
    # dot lattices, a grid, brightness tiles; none the judge reads as a held-out style) the scenes also show, each
    # called by a made-up word in the captions where a style word goes (0: none, the budget recipe and the shipped
    # weights). Why: an adapter cannot teach the base-styles-only UNet a held-out style from a few images
    # (bench/style_probe.py); a UNet that binds many textures to words may learn a new one as it learns a new word.
    textures: int = 0
    texture_rate: float = 0.25  # the chance that an object wears a named texture instead of its style
    # A diffusers AutoencoderKL folder to use as the VAE instead of training one (e.g. the shipped VAE refined on
    # generic textures, ``bench/codec.py --refine 3000``); the latent scale is still set from the latents.
    vae_from: str = ""

    # the knobs the rendered scenes, and so every cache in the work dir (images, VAE, latents), depend on
    DATA_KEYS = ("seed", "n_scenes", "object_counts", "textures", "texture_rate", "vae_from")

    def zero_snr_at(self, step: int) -> bool:
        return 0 <= self.zero_snr_from <= step

    def lr_total(self, step: int) -> int:
        """The length of the cosine the learning rate follows at ``step`` (see ``lr_ends``)."""
        return min([e for e in self.lr_ends if step < e < self.unet_steps] + [self.unet_steps])
