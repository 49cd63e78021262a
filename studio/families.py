"""Model families: how to load a checkpoint folder, encode prompts and condition the denoiser.

A family is data plus a few functions. ``sdxl`` is the default (and the embedded model's);
``sd15`` goes through the same code. Prompt encoding mirrors the stock diffusers pipelines
exactly, so what a trainer optimises is what ``pipe(prompt)`` samples.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from studio import ASSETS

EMBEDDED_MODEL = ASSETS / "models" / "tiny-sdxl-world"


@dataclass(frozen=True)
class Family:
    name: str
    pipeline_class: str  # the diffusers class name written in model_index.json
    text_encoders: tuple[str, ...]  # pipeline attribute names, in order


FAMILIES: dict[str, Family] = {
    "sdxl": Family("sdxl", "StableDiffusionXLPipeline", ("text_encoder", "text_encoder_2")),
    "sd15": Family("sd15", "StableDiffusionPipeline", ("text_encoder",)),
}


def detect_family(model_dir: str | Path) -> Family:
    """The family of a diffusers folder, read from its ``model_index.json``."""
    index = Path(model_dir) / "model_index.json"
    if not index.is_file():
        raise FileNotFoundError(
            f"model folder {model_dir} has no model_index.json; give a diffusers pipeline folder"
            f" (e.g. {EMBEDDED_MODEL})"
        )
    cls = json.loads(index.read_text()).get("_class_name", "")
    for fam in FAMILIES.values():
        if fam.pipeline_class == cls:
            return fam
    raise ValueError(f"{index} names pipeline {cls!r}; supported: {', '.join(f.pipeline_class for f in FAMILIES.values())}")


def load_pipeline(model: str | Path = EMBEDDED_MODEL, dtype: torch.dtype = torch.float32):
    """Load a local diffusers folder with the stock pipeline class of its family (never the network)."""
    import diffusers

    path = Path(model)
    if not path.is_dir():
        raise FileNotFoundError(f"model folder not found: {model}; give a local diffusers folder")
    family = detect_family(path)
    cls = getattr(diffusers, family.pipeline_class)
    pipe = cls.from_pretrained(str(path), torch_dtype=dtype, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def encode_prompt_sdxl(tokenizers, text_encoders, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """SDXL conditioning as ``StableDiffusionXLPipeline.encode_prompt`` computes it (clip_skip=None).

    Returns ``(prompt_embeds, pooled)``: the penultimate hidden states of both encoders
    concatenated on the feature axis, and the second encoder's projected pooled output.
    """
    embeds, pooled = [], None
    for tokenizer, encoder in zip(tokenizers, text_encoders):
        ids = tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length,
                        truncation=True, return_tensors="pt").input_ids
        out = encoder(ids.to(encoder.device), output_hidden_states=True)
        if pooled is None and out[0].ndim == 2:
            pooled = out[0]
        embeds.append(out.hidden_states[-2])
    return torch.cat(embeds, dim=-1), pooled


def sdxl_time_ids(height: int, width: int, batch: int) -> torch.Tensor:
    """SDXL's micro-conditioning for an uncropped image generated at its own size."""
    return torch.tensor([[height, width, 0, 0, height, width]], dtype=torch.float32).repeat(batch, 1)
