"""Key layouts on disk, and the name mapping between them (kept apart from the adapter math).

* diffusers/peft: ``unet.<module>.lora_A.weight`` / ``.lora_B.weight`` (``text_encoder.…``,
  ``text_encoder_2.…``); alphas in the ``lora_adapter_metadata`` header that
  ``pipe.load_lora_weights`` reads.
* kohya: ``lora_unet_<module>.lora_down.weight`` / ``.lora_up.weight`` / ``.alpha``, text encoders
  as ``lora_te1_…``/``lora_te2_…`` (SDXL) or ``lora_te_…`` (SD1.5), dots written as underscores.
  kohya's SDXL UNet uses the original (LDM/SGM) module names, ``input_blocks.4.1.…``, while its SD1.5
  UNet uses the diffusers names; ComfyUI and A1111 accept both. We write what kohya writes and read
  either.

Turning a kohya name back into a dotted path is done by joining underscore-separated words into the
known module-name atoms (``transformer_blocks``, ``to_q``, ``self_attn``…); the tests check that this
inverts the forward mapping for every module of the embedded model and of a tiny SD1.5 UNet.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

# Module-name words that themselves contain underscores (diffusers, transformers CLIP, LDM).
_ATOMS = {
    "transformer_blocks", "to_q", "to_k", "to_v", "to_out", "proj_in", "proj_out", "down_blocks",
    "up_blocks", "mid_block", "time_emb_proj", "conv_shortcut", "conv_in", "conv_out", "conv_norm_out",
    "time_embedding", "add_embedding", "linear_1", "linear_2", "input_blocks", "output_blocks",
    "middle_block", "in_layers", "out_layers", "emb_layers", "skip_connection", "time_embed", "label_emb",
    "text_model", "self_attn", "q_proj", "k_proj", "v_proj", "out_proj", "final_layer_norm", "layer_norm1",
    "layer_norm2", "text_projection", "token_embedding", "position_embedding", "add_k_proj", "add_v_proj",
    "to_add_out", "add_q_proj",
}
_MAX_ATOM_WORDS = max(len(a.split("_")) for a in _ATOMS)


def underscored(path: str) -> str:
    return path.replace(".", "_")


def dotted(name: str) -> str:
    """Invert :func:`underscored` for module paths made of known atoms, numbers and plain words."""
    words, parts, i = name.split("_"), [], 0
    while i < len(words):
        for n in range(min(_MAX_ATOM_WORDS, len(words) - i), 0, -1):
            candidate = "_".join(words[i : i + n])
            if n == 1 or candidate in _ATOMS:
                parts.append(candidate)
                i += n
                break
    return ".".join(parts)


@dataclass(frozen=True)
class UNetLayout:
    """What the diffusers <-> LDM block numbering depends on."""

    layers_per_block: int
    up_has_attention: tuple[bool, ...]

    @classmethod
    def from_config(cls, config) -> UNetLayout:
        get = config.get if isinstance(config, dict) else lambda k: getattr(config, k)
        layers = get("layers_per_block")
        if not isinstance(layers, int):
            raise ValueError(f"per-block layer counts {layers} have no LDM numbering; give an int layers_per_block")
        return cls(layers, tuple("CrossAttn" in t for t in get("up_block_types")))


SDXL_LAYOUT = UNetLayout(2, (True, True, False))
SD15_LAYOUT = UNetLayout(2, (False, True, True, True))

_RESNET_TO_LDM = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
                  "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}
_RESNET_FROM_LDM = {v: k for k, v in _RESNET_TO_LDM.items()}
_TOP_TO_LDM = {"conv_in": "input_blocks.0.0", "time_embedding.linear_1": "time_embed.0",
               "time_embedding.linear_2": "time_embed.2", "add_embedding.linear_1": "label_emb.0.0",
               "add_embedding.linear_2": "label_emb.0.2", "conv_norm_out": "out.0", "conv_out": "out.2"}
_TOP_FROM_LDM = {v: k for k, v in _TOP_TO_LDM.items()}


def _resnet(rest: str, table: dict[str, str]) -> str:
    head, _, tail = rest.partition(".")
    two = ".".join(rest.split(".")[:2])
    if two in table:
        return table[two] + rest[len(two):]
    if head in table:
        return table[head] + (("." + tail) if tail else "")
    raise KeyError(rest)


def _swap_prefix(path: str, table: dict[str, str]) -> str | None:
    for old, new in table.items():
        if path == old or path.startswith(old + "."):
            return new + path[len(old):]
    return None


def unet_to_ldm(path: str, layout: UNetLayout) -> str:
    """``down_blocks.1.attentions.0.proj_in`` -> ``input_blocks.4.1.proj_in`` (SDXL numbering)."""
    L = layout.layers_per_block
    if (top := _swap_prefix(path, _TOP_TO_LDM)) is not None:
        return top
    if m := re.fullmatch(r"(down|up)_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)", path):
        side, i, kind, j, rest = m[1], int(m[2]), m[3], int(m[4]), m[5]
        # input_blocks.0 is conv_in, so down blocks count from 1; each has L layers + a downsampler,
        # each up block L + 1 layers (its upsampler shares the last one)
        n = (1 if side == "down" else 0) + i * (L + 1) + j
        head = "input_blocks" if side == "down" else "output_blocks"
        return f"{head}.{n}.1.{rest}" if kind == "attentions" else f"{head}.{n}.0.{_resnet(rest, _RESNET_TO_LDM)}"
    if m := re.fullmatch(r"down_blocks\.(\d+)\.downsamplers\.0\.conv(.*)", path):
        return f"input_blocks.{(int(m[1]) + 1) * (L + 1)}.0.op{m[2]}"
    if m := re.fullmatch(r"mid_block\.(resnets|attentions)\.(\d+)\.(.+)", path):
        kind, j, rest = m[1], int(m[2]), m[3]
        return f"middle_block.1.{rest}" if kind == "attentions" else f"middle_block.{2 * j}.{_resnet(rest, _RESNET_TO_LDM)}"
    if m := re.fullmatch(r"up_blocks\.(\d+)\.upsamplers\.0\.conv(.*)", path):
        i = int(m[1])
        slot = 2 if layout.up_has_attention[i] else 1
        return f"output_blocks.{i * (L + 1) + L}.{slot}.conv{m[2]}"
    raise KeyError(f"no LDM name for UNet module {path!r}")


def unet_from_ldm(path: str, layout: UNetLayout) -> str:
    """Inverse of :func:`unet_to_ldm`."""
    L = layout.layers_per_block
    if (top := _swap_prefix(path, _TOP_FROM_LDM)) is not None:
        return top
    if m := re.fullmatch(r"input_blocks\.(\d+)\.(\d)\.(.+)", path):
        n, slot, rest = int(m[1]), int(m[2]), m[3]
        i, j = divmod(n - 1, L + 1)
        if j == L:
            return f"down_blocks.{i}.downsamplers.0.conv{rest[len('op'):]}"
        return f"down_blocks.{i}.attentions.{j}.{rest}" if slot == 1 else f"down_blocks.{i}.resnets.{j}.{_resnet(rest, _RESNET_FROM_LDM)}"
    if m := re.fullmatch(r"middle_block\.(\d)\.(.+)", path):
        slot, rest = int(m[1]), m[2]
        return f"mid_block.attentions.0.{rest}" if slot == 1 else f"mid_block.resnets.{slot // 2}.{_resnet(rest, _RESNET_FROM_LDM)}"
    if m := re.fullmatch(r"output_blocks\.(\d+)\.(\d)\.(.+)", path):
        n, slot, rest = int(m[1]), int(m[2]), m[3]
        i, j = divmod(n, L + 1)
        if slot == 0:
            return f"up_blocks.{i}.resnets.{j}.{_resnet(rest, _RESNET_FROM_LDM)}"
        if slot == 1 and layout.up_has_attention[i]:
            return f"up_blocks.{i}.attentions.{j}.{rest}"
        return f"up_blocks.{i}.upsamplers.0.{rest}"
    raise KeyError(f"no diffusers name for LDM UNet module {path!r}")


# --- kohya ---------------------------------------------------------------------------------------

_KOHYA_TE = {"sdxl": {"text_encoder": "lora_te1", "text_encoder_2": "lora_te2"},
             "sd15": {"text_encoder": "lora_te"}}
_LDM_HEADS = ("input_blocks", "middle_block", "output_blocks", "time_embed", "label_emb", "out")


def kohya_name(canonical: str, family: str, layout: UNetLayout) -> str:
    """The kohya module name (without ``.lora_down.weight``) for a canonical module name."""
    component, _, path = canonical.partition(".")
    if component == "unet":
        return "lora_unet_" + underscored(unet_to_ldm(path, layout) if family == "sdxl" else path)
    try:
        return _KOHYA_TE[family][component] + "_" + underscored(path)
    except KeyError:
        raise ValueError(f"family {family!r} has no text encoder {component!r} in kohya's layout") from None


def canonical_from_kohya(name: str, layout: UNetLayout) -> str:
    """The canonical module name for a kohya module name (either UNet naming is accepted)."""
    if name.startswith("lora_unet_"):
        path = dotted(name[len("lora_unet_"):])
        if path.split(".", 1)[0] in _LDM_HEADS:
            path = unet_from_ldm(path, layout)
        return "unet." + path
    for prefix, component in (("lora_te1_", "text_encoder"), ("lora_te2_", "text_encoder_2"),
                              ("lora_te_", "text_encoder")):
        if name.startswith(prefix):
            return f"{component}.{dotted(name[len(prefix):])}"
    raise ValueError(f"{name!r} is not a kohya LoRA module name (expected lora_unet_…, lora_te1_…, lora_te2_… or lora_te_…)")
