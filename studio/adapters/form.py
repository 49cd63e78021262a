"""The one in-memory adapter form every trainer writes and every loader reads.

An :class:`Adapter` maps *canonical module names* to low-rank weights. A canonical name is the
pipeline component followed by the module's path inside it, as diffusers and transformers name
it: ``unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q``,
``text_encoder.text_model.encoder.layers.0.self_attn.q_proj``, ``text_encoder_2.…``. Whatever
layout a file uses on disk (diffusers/peft, kohya), it is read into this form and written from it.

The update a module gets is ``delta_W = (alpha / rank) * up @ down`` (LoRA, Hu et al. 2021, eq. 3
with the scale of the reference implementation)::

    >>> import torch
    >>> lora = LoraWeights(down=torch.ones(2, 3), up=torch.ones(4, 2), alpha=1.0)
    >>> lora.delta().tolist()[0]
    [1.0, 1.0, 1.0]
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

COMPONENTS = ("unet", "text_encoder", "text_encoder_2")
TEXT_ENCODERS = ("text_encoder", "text_encoder_2")


def tokenizer_of(component: str) -> str:
    """The pipeline attribute of the tokenizer that feeds the text encoder ``component``."""
    return component.replace("text_encoder", "tokenizer")


def token_names(token: str, n: int) -> list[str]:
    """The tokens of an ``n``-vector embedding of ``token``, named as diffusers' textual inversion loader names them:
    "zxy", "zxy_1", ...; a pipeline encodes "zxy" in a prompt as all of them."""
    return [token] + [f"{token}_{i}" for i in range(1, n)]


def multi_vector(tokenizer, text: str) -> str:
    """``text`` as the pipeline encodes it when a token of it has a multi-vector embedding (diffusers' textual
    inversion loader adds "zxy", "zxy_1", ... and the pipeline's ``maybe_convert_prompt`` writes "zxy zxy_1 ..." for
    "zxy"): the same replacement (written again here because diffusers' is a pipeline method and trainers and
    composers hold a tokenizer), so that training prompts and token positions match what sampling encodes."""
    added = tokenizer.added_tokens_encoder
    for token in set(tokenizer.tokenize(text)):
        if token in added and f"{token}_1" in added:
            n = 1
            while f"{token}_{n}" in added:
                n += 1
            text = text.replace(token, " ".join([token] + [f"{token}_{i}" for i in range(1, n)]))
    return text


KINDS = ("lora",)  # every kind we write must be expressible as a plain LoRA on disk


def as_float32(value: float) -> float:
    """``value`` rounded to float32, the precision an ``.alpha`` tensor keeps on disk."""
    return float(np.float32(value))


@dataclass
class LoraWeights:
    """One target module's low-rank pair.

    ``down``: ``(rank, in_features)`` for a linear layer, ``(rank, in_channels, kh, kw)`` for a conv;
    ``up``: ``(out_features, rank)`` or ``(out_channels, rank, 1, 1)``.
    """

    down: torch.Tensor
    up: torch.Tensor
    alpha: float
    kind: str = "lora"

    def __post_init__(self) -> None:
        if self.down.shape[0] != self.up.shape[1]:
            raise ValueError(f"LoRA down has rank {self.down.shape[0]} but up has rank {self.up.shape[1]}")
        if self.kind not in KINDS:
            raise ValueError(f"unknown adapter kind {self.kind!r}; known: {', '.join(KINDS)}")
        self.alpha = as_float32(self.alpha)

    @property
    def rank(self) -> int:
        return int(self.down.shape[0])

    @property
    def shape(self) -> tuple[int, ...]:
        """The shape of the target module's weight (what :meth:`delta` returns)."""
        return (int(self.up.shape[0]), *map(int, self.down.shape[1:]))

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def delta(self) -> torch.Tensor:
        """The dense weight update, shaped like the target module's weight."""
        down, up = self.down.float(), self.up.float()
        if down.ndim == 2:
            return self.scale * up @ down
        # conv: up is 1x1, so the update is a conv kernel of down's spatial size
        return self.scale * torch.einsum("or,rikl->oikl", up.flatten(1), down)


@dataclass
class AdapterMeta:
    """What an adapter file says about itself (stored as JSON under the ``studio`` header key)."""

    family: str = "sdxl"
    base_model: str = ""
    base_hash: str = ""
    trainer: str = ""
    token: str = ""
    class_noun: str = ""
    rank: int = 0
    steps: int = 0
    dataset: dict[str, Any] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> AdapterMeta:
        known = {f.name for f in dataclasses.fields(cls)}
        extra = dict(data.get("extra", {}))
        extra.update({k: v for k, v in data.items() if k not in known})
        return cls(**{k: v for k, v in data.items() if k in known and k != "extra"}, extra=extra)


@dataclass
class Adapter:
    """Low-rank weights per canonical module name, plus metadata and, from pivotal tuning, token embeddings:
    ``embeddings[token][text encoder component]`` is the ``(vectors, width)`` input embedding of the token in that
    encoder (one vector per token as the studio trains them)."""

    modules: dict[str, LoraWeights]
    meta: AdapterMeta = field(default_factory=AdapterMeta)
    embeddings: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name in self.modules:
            if name.split(".", 1)[0] not in COMPONENTS:
                raise ValueError(f"adapter module {name!r} names no pipeline component; expected one of {COMPONENTS}")
        for token, per in self.embeddings.items():
            if not token or any(c in token for c in ". \t\n"):
                raise ValueError(f"embedded token {token!r} must be one word without dots")
            for component, vectors in per.items():
                if component not in TEXT_ENCODERS or vectors.ndim != 2:
                    raise ValueError(f"the embedding of {token!r} for {component!r} must be a (vectors, width) tensor of"
                                     f" one of {', '.join(TEXT_ENCODERS)}")
        if not self.meta.rank and self.modules:
            self.meta.rank = max(w.rank for w in self.modules.values())

    def component(self, name: str) -> dict[str, LoraWeights]:
        """The modules of one pipeline component, keyed by their path inside it."""
        prefix = name + "."
        return {k[len(prefix):]: v for k, v in self.modules.items() if k.startswith(prefix)}

    @property
    def components(self) -> list[str]:
        return [c for c in COMPONENTS if any(k.startswith(c + ".") for k in self.modules)]


def joined_embeddings(adapters: list[Adapter]) -> dict[str, dict[str, torch.Tensor]]:
    """The token embeddings of several adapters together (an adapter merged from them keeps every token); refuses a
    token two of them embed differently, naming it."""
    out: dict[str, dict[str, torch.Tensor]] = {}
    for a in adapters:
        for token, per in a.embeddings.items():
            if token in out and (out[token].keys() != per.keys()
                                 or any(not torch.equal(out[token][c], per[c]) for c in per)):
                raise ValueError(f"two adapters embed the token {token!r} differently; one merged adapter can keep only"
                                 " one embedding per token (retrain one with another --token)")
            out[token] = per
    return out


# transformers 5 dropped the ``text_model`` level from ``CLIPTextModel`` (not from the model with a
# projection); adapter files, diffusers and kohya alike, keep naming it, so canonical names do too.
_CLIP_INNER = ("embeddings.", "encoder.", "final_layer_norm")


def canonical_name(component: str, model: torch.nn.Module, path: str) -> str:
    """The canonical name of the module at ``path`` inside ``model`` (the pipeline's ``component``)."""
    if component != "unet" and not hasattr(model, "text_model") and path.startswith(_CLIP_INNER):
        path = "text_model." + path
    return f"{component}.{path}"


def module_path(model: torch.nn.Module, path: str) -> str:
    """The path inside ``model`` of the module a canonical path (without its component) names."""
    try:
        model.get_submodule(path)
        return path
    except AttributeError:
        if path.startswith("text_model.") and not hasattr(model, "text_model"):
            return module_path(model, path[len("text_model."):])
        raise ValueError(f"{type(model).__name__} has no module {path!r}") from None


def resolve_module(model: torch.nn.Module, path: str) -> torch.nn.Module:
    """The module a canonical path (without its component) names in ``model``, whatever its version."""
    return model.get_submodule(module_path(model, path))
