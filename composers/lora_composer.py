"""LoRA-Composer (Yang et al. 2024, "Leveraging Low-Rank Adaptation for Multi-Concept Customization in
Training-Free Diffusion Models"), in the studio's one-pass form.

Each concept has a region (a box) and its own prompt. In every UNet pass:

- **concept injection** (cross-attention): the keys are expanded to ``[global prompt | concept 1's prompt |
  concept 2's prompt | ...]``; an image token inside concept k's box attends only to concept k's tokens
  (their keys and values made with adapter k), a token outside every box only to the global prompt. This is
  the official code's per-region attention (softmax over the region prompt's own tokens, the global output
  replaced inside the boxes) computed as one attention call with a block mask instead of one per region.
  In the negative half of the guidance batch a box's prompt is the negative prompt, encoded as the box's own
  prompt is (``negative="prompt"``, the default: the official code encodes each region's negative prompt, ""
  unless given). Where the pipeline feeds zeros for an empty negative prompt (SDXL's
  ``force_zeros_for_empty_prompt``, the embedded model's) the boxes still get the encoded "", as the official code
  (SD1.5, which has no zeros) and ComfyUI's SDXL do. ``negative="pipeline"`` keeps the pipeline's own negative
  conditioning in the boxes (zeros there): then one concept boxed over the whole image is the naive sum. On the
  embedded model, trained with zeros as its unconditional, the encoded "" guides the boxes harder (larger, darker
  objects) and reads far better on the composition benchmark (docs/benchmarks.md, ``lora-composer-pos-pipeline-negative``).
  ``replace_ratio`` (the official code's, default 1) below 1 keeps that share of the global prompt's output
  inside the boxes (one more attention call).
- **concept isolation** (self-attention): an image token inside a box may not attend to tokens inside boxes
  it does not share (it still sees its own boxes and the background).
- **overlapping boxes**: an image token inside several boxes attends to all their concepts' prompts (one
  softmax over them) and each of their adapters acts there at 1/n of its weight (the official code averages
  the region outputs); it sees, in self-attention, every token that shares one of its boxes.

Both masks are :class:`studio.kernels.attention.RegionMask` label tables: one attention call per layer
(FlexAttention block masks on CUDA, SDPA with the dense mask on the CPU), however many regions. A box must lie inside the
  image (``parse_region`` refuses one that does not).
- **adapters only in their regions**: adapter k acts on the image tokens of box k (every layer it targets)
  and on concept k's prompt tokens; the background and the global prompt see the base model. The
  official code applies each LoRA through cross-attention's key/value/output only; ``scope="cross"`` does
  that, ``scope="all"`` (default) also keeps the adapter's other layers (query, self-attention, feed-forward)
  inside the box, because the studio's trainers adapt those too.
- **latent re-initialisation** (before the first step): one probe pass reads where each concept's prompt
  tokens attend over the whole image (unrestricted, at about a quarter of the latent's size), finds the
  window of the box's size where that attention is strongest, and copies that window of the start latents
  into the box; the latents are then standardised back to their mean and variance.

Region prompts: the official code takes one prompt per region from the user. Here a concept's region prompt is,
by default (``positional_prompts``), the clause of the global prompt that names it ("a sks shape on the left"),
else the concept's own prompt ("a sks shape"). On the embedded model the position words matter: objects go
where the prompt says, not where the box is, and with the concept's bare prompt inside the box and the global
prompt nowhere there, positions are lost (docs/benchmarks.md, the composition section).

Not carried over: the official code's gradient guidance on attention maps (its enhancement, fill and region
losses), which needs a backward pass through the UNet at every early step.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from studio.composers.base import Composer, Run, concept_clause, default_attention, token_positions
from studio.kernels.attention import isolation_mask, regional_cross_mask


class LoRAComposer(Composer):
    name = "lora-composer"
    needs_attention = True
    places = True

    def __init__(self, isolate: bool = True, reinit: bool = True, scope: str = "all", replace_ratio: float = 1.0,
                 positional_prompts: bool = True, negative: str = "prompt"):
        if scope not in ("all", "cross"):
            raise ValueError(f"scope {scope!r}: choose all or cross")
        if negative not in ("prompt", "pipeline"):
            raise ValueError(f"negative {negative!r}: choose prompt or pipeline")
        self.negative = negative
        if not 0.0 <= replace_ratio <= 1.0:
            raise ValueError(f"replace_ratio {replace_ratio}: give a number from 0 to 1")
        self.isolate, self.reinit, self.scope, self.replace_ratio = isolate, reinit, scope, replace_ratio
        self.positional_prompts = positional_prompts

    def prepare(self, run: Run) -> None:
        missing = [c.name for c in run.concepts if c.region is None]
        if missing:
            raise ValueError(f"lora-composer needs a region for every concept; none for {', '.join(missing)}"
                             " (give e.g. left, right, top-left, or x0,y0,x1,y1)")
        prompts = [self.region_prompt(run.prompt, c, run.styles) for c in run.concepts]
        run.state["region_prompts"] = prompts
        run.state["region_cond"] = [run.encode([p], only=k)["embeds"] for k, p in enumerate(prompts)]
        if self.negative == "prompt":  # for a pipeline that feeds zeros for an empty negative prompt
            run.state["region_uncond"] = [run.encode([""], only=k)["embeds"] for k in range(len(run.concepts))]
        run.state["region_tokens"] = [token_positions(run.pipe.tokenizer, p, [c.words])[0] for p, c in zip(prompts, run.concepts)]

    def region_prompt(self, prompt: str, concept, styles=()) -> str:
        """Concept k's region prompt: with ``positional_prompts``, the clause of the global prompt that names it
        ("a sks shape on the left" of "a sks shape on the left and a zwx shape on the right"), which keeps where
        it goes; else (or when no clause names it) the concept's own prompt. The words of every style
        (``Concept.style``) follow it: a style acts on every concept ("a sks shape on the left, zxy")."""
        clause = concept_clause(prompt, concept) if self.positional_prompts else None
        text = clause or concept.prompt
        return ", ".join([text, *(s.words for s in styles if s.words and s.words.split()[0] not in text.split())])

    def boxes(self, run: Run, h: int, w: int, device) -> torch.Tensor:
        """(K, h*w) bool: which image tokens of an h x w layer lie in each concept's box."""
        key = ("boxes", h, w, device)
        if key not in run.state:
            run.state[key] = torch.stack([run.region_mask(c.region, h, w) > 0 for c in run.concepts]).flatten(1).to(device)
        return run.state[key]

    def gate(self, run: Run, stack, x, k):
        if self.scope == "cross" and not _is_cross_out(stack):
            return 0.0
        h, w = run.layer_hw(x)
        key = ("share", h, w, x.ndim, x.device, x.dtype)
        if key not in run.state:  # each adapter's weight times its share of every token, shaped for this layer's output
            masks = torch.stack([run.region_mask(c.region, h, w) for c in run.concepts])
            shares = masks / masks.sum(0).clamp_min(1.0)  # where boxes overlap, each adapter acts at 1/n
            run.state[key] = [c.weight * run.token_mask(m, x) for c, m in zip(run.concepts, shares)]
        return run.state[key][k]  # the same tensor every call: the plugin builds the layer's gates once

    def attention(self, run: Run, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None):
        n_tokens = hidden_states.shape[1] if hidden_states.ndim == 3 else hidden_states.shape[2] * hidden_states.shape[3]
        h, w = run.spatial_hw(n_tokens)
        inside = self.boxes(run, h, w, hidden_states.device)
        if encoder_hidden_states is None:
            if not self.isolate:
                return default_attention(attn, hidden_states, None, attention_mask, temb)
            key = ("isolation", h, w)
            if key not in run.state:
                run.state[key] = isolation_mask(inside)
            return default_attention(attn, hidden_states, None, attention_mask, temb, bias=run.state[key])
        context, segments = self.expanded_context(run, encoder_hidden_states)
        key = ("cross", h, w, tuple(segments))
        if key not in run.state:
            run.state[key] = regional_cross_mask(inside, segments)
        allowed = run.state[key]
        run.segments = segments
        try:
            if run.state.get("probe") is not None:
                self._probe(run, attn, hidden_states, context, segments, h, w)
            out = default_attention(attn, hidden_states, context, None, temb, bias=allowed)
            if self.replace_ratio < 1.0:  # the official replace_ratio: inside the boxes, mix in the global prompt's output
                run.segments = segments[:1]
                plain = default_attention(attn, hidden_states, encoder_hidden_states, attention_mask, temb)
                share = self.replace_ratio * inside.any(0).to(out.dtype)
                share = share.view(1, 1, h, w) if out.ndim == 4 else share.view(1, -1, 1)
                out = plain + share * (out - plain)
            return out
        finally:
            run.segments = None

    def expanded_context(self, run: Run, encoder_hidden_states: torch.Tensor):
        """``[global | concept 1 | ...]`` prompt embeddings for this batch, and the spans (start, end, concept): built
        once for each prompt tensor the pipeline passes (the same at every layer and step), so that the same expanded
        tensor comes back and each cross-attention key/value keeps its adapters' update for it."""
        rows = encoder_hidden_states.shape[0]
        n = getattr(run, "batch", rows)
        return run.kept(("expanded", rows, n, run.extra_unet_call), (encoder_hidden_states,),
                        lambda: self._expand(run, encoder_hidden_states, rows, n))

    @staticmethod
    def _expand(run: Run, encoder_hidden_states: torch.Tensor, rows: int, n: int):
        parts, segments = [encoder_hidden_states], [(0, encoder_hidden_states.shape[1], None)]
        pos = encoder_hidden_states.shape[1]
        for k in range(len(run.concepts)):
            cond = run.state["region_cond"][k].to(encoder_hidden_states)
            if rows == 2 * n and not run.extra_unet_call:  # guidance batch: [negative; prompt]
                uncond = encoder_hidden_states[:n]  # the negative prompt as the pipeline encoded it
                if "region_uncond" in run.state and not uncond.any():  # zeros for an empty one: the encoded ""
                    uncond = run.state["region_uncond"][k].to(encoder_hidden_states).expand(n, -1, -1)
                emb = torch.cat([uncond, cond.expand(n, -1, -1)])
            else:
                emb = cond.expand(rows, -1, -1)
            parts.append(emb)
            segments.append((pos, pos + emb.shape[1], k))
            pos += emb.shape[1]
        return torch.cat(parts, dim=1), segments

    # -- latent re-initialisation ------------------------------------------------------------------
    def _probe(self, run: Run, attn, hidden_states, context, segments, h, w) -> None:
        probs: list = []
        default_attention(attn, hidden_states, context, probs_out=probs)
        p = probs[0].mean(1)  # (B, N, T) over heads
        maps = run.state["probe"].setdefault((h, w), [[] for _ in run.concepts])
        for (start, end, k) in segments[1:]:
            seg = p[..., start:end]
            seg = seg / seg.sum(-1, keepdim=True).clamp_min(1e-8)  # softmax over this prompt's tokens only
            cols = [i for i in run.state["region_tokens"][k] if i < seg.shape[-1]]
            if cols:
                maps[k].append(seg[..., cols].sum(-1).reshape(-1, h, w))

    def edit_latents(self, run: Run, i: int, t, latents: torch.Tensor) -> torch.Tensor:
        if i != 0 or not self.reinit:
            return latents
        run.state["probe"] = {}
        with torch.no_grad():
            run.unet_call(latents, t)
        found = run.state.pop("probe")
        if not found:
            return latents
        size = min(found, key=lambda hw: abs(hw[0] - run.map_size()))
        maps = [torch.stack(m).mean(0) if m else None for m in found[size]]
        return reinitialise(latents, maps, [c.region for c in run.concepts])


def reinitialise(latents: torch.Tensor, maps: list, regions: list) -> torch.Tensor:
    """LoRA-Composer's latent re-initialisation: for each concept k with a map (``maps[k]``, (B, h, w): where it
    attends; ``None`` to skip it) and a region (``regions[k]``, a box), the window of its box's size where the map's
    mean is highest is copied from ``latents`` (B, C, H, W) into the box; the result is then standardised back to
    each image's mean and variance."""
    H, W = latents.shape[-2:]
    out = latents.clone()
    for attn_map, box in zip(maps, regions):
        if attn_map is None or box is None:
            continue
        attn_map = F.interpolate(attn_map[:, None].float(), size=(H, W), mode="nearest")  # (B, 1, H, W)
        x0, y0, x1, y1 = box
        ty0, ty1 = round(y0 * H), max(round(y1 * H), round(y0 * H) + 1)
        tx0, tx1 = round(x0 * W), max(round(x1 * W), round(x0 * W) + 1)
        bh, bw = ty1 - ty0, tx1 - tx0
        score = F.avg_pool2d(attn_map, (bh, bw), stride=1)  # (B, 1, H-bh+1, W-bw+1)
        best = score.flatten(1).argmax(1)
        for b in range(latents.shape[0]):
            sy, sx = divmod(int(best[b]), score.shape[-1])
            out[b, :, ty0:ty1, tx0:tx1] = latents[b, :, sy : sy + bh, sx : sx + bw]
    mean, std = latents.mean(dim=(1, 2, 3), keepdim=True), latents.std(dim=(1, 2, 3), keepdim=True)
    out = (out - out.mean(dim=(1, 2, 3), keepdim=True)) / out.std(dim=(1, 2, 3), keepdim=True).clamp_min(1e-6)
    return out * std + mean


def _is_cross_out(stack) -> bool:
    """A cross-attention key/value/output projection (where the official LoRA-Composer applies adapters)."""
    path = stack.path
    return stack.text_input or (".attn2." in path and path.endswith("to_out.0"))
