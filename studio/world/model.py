"""The embedded model's architecture: a tiny SDXL (same block layout, far fewer channels).

Every part is a stock diffusers/transformers class built from a config, so the saved folder is
a standard ``StableDiffusionXLPipeline`` folder. Latents are 16x16x16 for a 64x64 image (the VAE
downsamples by 4, not 8: at 64 px an 8x8 latent cannot hold the surface styles).
"""

from __future__ import annotations

import torch
from diffusers import AutoencoderKL, DDPMScheduler, EulerDiscreteScheduler, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

TEXT_HIDDEN = 64  # each text encoder's width; the UNet's cross-attention reads both: 128
TIME_EMBED = 16  # SDXL's addition_time_embed_dim (256 in the real model)
PREDICTION_TYPE = "v_prediction"
# 16 latent channels (as SD3/Flux), not SDXL's 4: a 4x4 patch of 48 values then needs only 3x
# compression, which a tiny VAE learns in minutes and which keeps 2-px stripes and outlines.
LATENT_CHANNELS = 16

# SDXL's noise schedule (scaled_linear 0.00085..0.012 over 1000 steps), what the shipped model uses.
SCHEDULE = dict(
    num_train_timesteps=1000,
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    prediction_type=PREDICTION_TYPE,
    steps_offset=1,
    timestep_spacing="leading",
)
# The same betas rescaled to zero terminal SNR with trailing timesteps (Lin et al. 2023, "Common
# Diffusion Noise Schedules and Sample Steps are Flawed"). With SDXL's schedule the last training
# step keeps 7% of the image, and on a 16x16 latent the model reads the background colour from it;
# sampling starts from pure noise, so backgrounds come out wrong. This variant fixes backgrounds
# (see the model card for what it did to objects). v-prediction is required by it.
ZERO_SNR_SCHEDULE = {**SCHEDULE, "rescale_betas_zero_snr": True, "timestep_spacing": "trailing", "steps_offset": 0}


@torch.no_grad()
def standardize_latents(vae: AutoencoderKL, mean: torch.Tensor, std: torch.Tensor) -> None:
    """Fold a per-channel standardization of the latent space into ``vae``'s 1x1 convolutions.

    Afterwards ``vae.encode`` gives ``(z - mean) / std`` and ``vae.decode`` undoes it, so every stock
    pipeline (which only knows one global ``scaling_factor``, and whose ``latents_mean`` support is
    hard-wired to 4 channels) sees unit-variance, zero-mean channels without any special code.
    """
    c = vae.config.latent_channels
    q = vae.quant_conv  # 2c -> 2c: the posterior's mean, then its log-variance
    q.weight[:c] /= std.view(c, 1, 1, 1)
    q.bias[:c] = (q.bias[:c] - mean) / std
    q.bias[c:] -= 2 * std.log()
    p = vae.post_quant_conv  # c -> c
    p.bias += p.weight[:, :, 0, 0] @ mean
    p.weight *= std.view(1, c, 1, 1)


def build_unet() -> UNet2DConditionModel:
    """SDXL's UNet layout: DownBlock2D + two CrossAttn down blocks, mirrored up, text_time conditioning."""
    return UNet2DConditionModel(
        sample_size=16,
        in_channels=LATENT_CHANNELS,
        out_channels=LATENT_CHANNELS,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        block_out_channels=(32, 96, 128),
        layers_per_block=2,
        transformer_layers_per_block=(1, 1, 1),
        attention_head_dim=(1, 3, 4),  # diffusers' name for the number of heads, as in SDXL's config
        cross_attention_dim=2 * TEXT_HIDDEN,
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=TIME_EMBED,
        projection_class_embeddings_input_dim=TEXT_HIDDEN + 6 * TIME_EMBED,
        norm_num_groups=32,
    )


def build_vae() -> AutoencoderKL:
    """A three-level KL autoencoder: 64x64x3 <-> 16x16x16."""
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        block_out_channels=(16, 32, 64),
        layers_per_block=1,
        latent_channels=LATENT_CHANNELS,
        norm_num_groups=8,
        sample_size=64,
        force_upcast=False,
        mid_block_add_attention=False,  # fully convolutional, so it can train on crops
    )


def build_text_encoders(tokenizer: CLIPTokenizer) -> tuple[CLIPTextModel, CLIPTextModelWithProjection]:
    """SDXL's pair: a plain CLIP text model and one with a projection (the pooled embedding)."""

    def config(layers: int) -> CLIPTextConfig:
        return CLIPTextConfig(
            vocab_size=len(tokenizer),
            hidden_size=TEXT_HIDDEN,
            intermediate_size=4 * TEXT_HIDDEN,
            num_hidden_layers=layers,
            num_attention_heads=4,
            max_position_embeddings=tokenizer.model_max_length,
            projection_dim=TEXT_HIDDEN,
            hidden_act="gelu",
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )

    return CLIPTextModel(config(3)), CLIPTextModelWithProjection(config(3))


def build_schedulers(zero_terminal_snr: bool = False) -> tuple[DDPMScheduler, EulerDiscreteScheduler]:
    """The training scheduler (adds noise) and the sampling one saved with the model (SDXL's default)."""
    schedule = ZERO_SNR_SCHEDULE if zero_terminal_snr else SCHEDULE
    return DDPMScheduler(**schedule), EulerDiscreteScheduler(**schedule)
