"""The composer protocol: several adapters in one image, decided per layer, per step and per token.

A :class:`Composer` is asked, while a stock diffusers pipeline samples, three things:

- ``gate(run, stack, x, k)``: the weight adapter ``k`` gets in this layer for this input: a number, or a
  tensor over the layer's tokens (a region mask on the image tokens, a segment mask on the prompt tokens);
- ``attention(run, attn, hidden_states, encoder_hidden_states, ...)`` (only if ``needs_attention``): the
  attention of every UNet attention layer, so a composer can restrict cross-attention to regions,
  isolate self-attention between concepts, or read attention maps;
- ``initial_latents`` / ``edit_latents(run, i, t, latents)``: the latents before step ``i``.

Merging composers (``merges = True``) instead return one adapter from ``merge``. The naive weighted sum
is the base class itself, so every method goes through the same door.

Everything runs in one UNet pass per step: the adapters sit in :class:`studio.plugin.LoraStack` layers
whose ``router`` is the :class:`Run`; which adapter acts where is a mask on the tokens, not a separate
UNet pass per adapter.

    >>> from studio.composers import composing
    >>> # with composing(pipe, "lora-composer", prompt, concepts) as run:
    >>> #     image = pipe(prompt, **run.pipe_kwargs(seed=0)).images[0]
"""

from __future__ import annotations

import contextlib
import math
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from studio.kernels.lora import version

from studio.adapters import Adapter, load_adapter
from studio.adapters.form import multi_vector

Box = tuple[float, float, float, float]  # x0, y0, x1, y1 as fractions of the image

NAMED_REGIONS: dict[str, Box] = {
    "left": (0.0, 0.0, 0.5, 1.0),
    "right": (0.5, 0.0, 1.0, 1.0),
    "top": (0.0, 0.0, 1.0, 0.5),
    "bottom": (0.0, 0.5, 1.0, 1.0),
    "top-left": (0.0, 0.0, 0.5, 0.5),
    "top-right": (0.5, 0.0, 1.0, 0.5),
    "bottom-left": (0.0, 0.5, 0.5, 1.0),
    "bottom-right": (0.5, 0.5, 1.0, 1.0),
    "center": (0.25, 0.25, 0.75, 0.75),
    "all": (0.0, 0.0, 1.0, 1.0),
}


def parse_region(text: str | Box | None) -> Box | None:
    """A region: a name (left, right, top, bottom, top-left, ..., center, all) or ``x0,y0,x1,y1`` fractions."""
    if text is None or isinstance(text, tuple):
        return text
    key = text.strip().lower().replace(" ", "-").replace("_", "-")
    if key in NAMED_REGIONS:
        return NAMED_REGIONS[key]
    try:
        box = tuple(float(v) for v in text.split(","))
    except ValueError:
        box = ()
    if len(box) != 4 or not (0 <= box[0] < box[2] <= 1 and 0 <= box[1] < box[3] <= 1):
        raise ValueError(f"region {text!r} is not a region; accepted: {', '.join(NAMED_REGIONS)}, or x0,y0,x1,y1 as"
                         " fractions of the image with x0 < x1 and y0 < y1, e.g. 0,0,0.5,1")
    return box  # type: ignore[return-value]


STYLE_PLACE = "style"  # the place of a style concept, where a region would go (``-r style``)


def parse_place(text: str | Box | None) -> tuple[Box | None, bool]:
    """A concept's place: ``(region, False)`` for a region (:func:`parse_region`), ``(None, True)`` for
    ``"style"`` (a style concept, acting everywhere: :class:`Concept`)."""
    if isinstance(text, str) and text.strip().lower() == STYLE_PLACE:
        return None, True
    try:
        return parse_region(text), False
    except ValueError as e:
        raise ValueError(f"{e}; or {STYLE_PLACE} (a style adapter: it acts everywhere, on every concept)") from None


def parse_timesteps(text: str | tuple[float, ...] | None) -> tuple[float, ...] | None:
    """A timestep window: ``"START:END"`` (either side may be empty: ``":500"`` is ``0:500``) or a pair, of the
    training timesteps 0-1000 with ``START < END``; ``None``, ``""`` or ``"all"``: every step. ``"START:END,SHARE"``
    (or a triple) also keeps ``SHARE`` (0-1) of the adapter's weight outside the window, e.g. ``"0:500,0.5"``: full
    weight late, half weight in the layout steps; without it the adapter is off outside."""
    if text is None or (isinstance(text, str) and text.strip().lower() in ("", "all")):
        return None
    try:
        if isinstance(text, str):
            span, *rest = text.split(",")
            start, end = span.split(":")
            window = (float(start) if start.strip() else 0.0, float(end) if end.strip() else 1000.0,
                      *(float(v) for v in rest))
        else:
            window = tuple(float(v) for v in text)
    except (ValueError, TypeError, IndexError):
        window = ()
    if not (len(window) in (2, 3) and 0 <= window[0] < window[1] <= 1000 and (len(window) == 2 or 0 <= window[2] <= 1)):
        raise ValueError(f"timesteps {text!r} is not a timestep window; accepted: START:END of the training timesteps"
                         " with 0 <= START < END <= 1000 (0 is the clean image, 1000 pure noise), e.g. 0:500 for the"
                         " late, detail-making steps, optionally ,SHARE: the share 0-1 of the weight kept outside the"
                         " window (e.g. 0:500,0.5), or 'all'")
    return window[:2] if len(window) == 3 and window[2] == 0 else window


@dataclass
class Concept:
    """One adapter in a composition.

    ``prompt``: the concept's own prompt ("a sks1 shape"), used where a method encodes a prompt per concept;
    ``words``: the words of the global prompt that name it ("sks1 shape"), whose tokens a method watches;
    ``region``: where it goes, for region-based methods;
    ``timesteps``: ``(start, end)``, the training timesteps (0 clean, 1000 pure noise) at which its adapter acts in
    the UNet, ``start <= t < end``; ``None``: at every step. A style adapter acting only late, ``(0, 500)``, leaves
    the layout to the other adapters; ``(start, end, share)`` keeps ``share`` of its weight outside the window
    (:func:`parse_timesteps`);
    ``style``: the concept is a style, not a thing to place. A composer that places concepts (``Composer.places``:
    clora, lora-composer, gated) leaves it out of its routing: its adapter acts at its weight in every pass, on every
    pixel and so on every concept, and its ``words`` join each concept's own prompt. The others (naive, klora, the
    merging ones) take it as any concept. ``region="style"`` in :meth:`load` (``-r style`` on the CLI) sets it.
    """

    adapter: Adapter
    name: str
    prompt: str = ""
    words: str = ""
    region: Box | None = None
    weight: float = 1.0
    timesteps: tuple[float, ...] | None = None
    style: bool = False

    def __post_init__(self):
        if self.style and self.region is not None:
            raise ValueError(f"concept {self.name!r} is a style: a style acts everywhere, on every concept; give it no"
                             " region")

    def scale_at(self, t) -> float:
        """The share of its weight the adapter acts with at timestep ``t`` (a number or a tensor; ``None``, outside
        sampling: all of it): 1 inside its window, 0 or the window's share outside."""
        if self.timesteps is None or t is None:
            return 1.0
        t = float(t.flatten()[0]) if isinstance(t, torch.Tensor) else float(t)
        if self.timesteps[0] <= t < self.timesteps[1]:
            return 1.0
        return self.timesteps[2] if len(self.timesteps) == 3 else 0.0

    @classmethod
    def load(cls, item: str | Path | Adapter, name: str | None = None, **kwargs) -> Concept:
        adapter = load_adapter(item) if isinstance(item, (str, Path)) else item
        name = name or adapter.meta.token or (Path(item).stem if isinstance(item, (str, Path)) else "concept")
        token = adapter.meta.token or name
        words = kwargs.pop("words", None) or " ".join(w for w in (token, adapter.meta.class_noun) if w)
        prompt = kwargs.pop("prompt", None) or f"a {words}"
        region, style = parse_place(kwargs.pop("region", None))
        return cls(adapter, name, prompt=prompt, words=words, region=region, style=kwargs.pop("style", False) or style,
                   timesteps=parse_timesteps(kwargs.pop("timesteps", None)), **kwargs)


class Composer:
    """The naive weighted sum: every adapter everywhere with its weight. Methods override the hooks."""

    name = "naive"
    needs_attention = False  # True: every UNet attention layer calls ``attention``
    merges = False  # True: ``merge`` returns one adapter and sampling is plain
    plain_pipeline_pass = False  # True: no adapter acts in the pipeline's own passes, text encoders included (``unet_output`` mixes)
    # True: ``gate`` depends only on the layer and its input's shape, dtype and device during a run (not on the step,
    # the latents or attention maps), so the run asks once per layer and shape and hands back the same list after
    # (each layer's gates then cost a dictionary lookup a call). A composer whose gates change during a run sets False.
    static_gates = True
    # True: ``gate`` is also asked on the cross-attention keys/values (whose input is the prompt's tokens) when no
    # prompt spans are set; for composers whose gates are numbers per layer, not masks over image tokens
    gates_text_layers = False
    # True: the composer places concepts (decides where each acts); style concepts (``Concept.style``) are then left
    # out of ``run.concepts`` and act everywhere at their weight (``run.styles``)
    places = False

    def prepare(self, run: Run) -> None:
        """Called once before sampling (encode per-concept prompts, build masks)."""

    def gate(self, run: Run, stack, x: torch.Tensor, k: int) -> float | torch.Tensor:
        """Concept ``k``'s adapter weight on ``stack`` for input ``x``: a number or a tensor over the output's tokens.
        A tensor is read, never changed in place afterwards; returning the same tensor again lets the layer reuse
        what it built from it."""
        return run.concepts[k].weight

    def attention(self, run: Run, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None):
        raise NotImplementedError

    def initial_latents(self, run: Run, latents: torch.Tensor) -> torch.Tensor:
        return latents

    def edit_latents(self, run: Run, i: int, t, latents: torch.Tensor) -> torch.Tensor:
        """The latents about to be denoised at step ``i`` (called for ``i >= 1``)."""
        return latents

    def unet_output(self, run: Run, latents: torch.Tensor, t, sample: torch.Tensor) -> torch.Tensor | None:
        """The pipeline's UNet output for its input ``latents`` (the guidance batch, when guided) at ``t``, or
        ``None`` to keep it. A composer that mixes its own passes' predictions replaces it here."""
        return None

    def merge(self, concepts: list[Concept]) -> Adapter:
        raise NotImplementedError


def _encode(pipe, prompt: list[str]) -> dict:
    """The UNet's text conditioning for ``prompt`` (no guidance half), as the pipeline computes it."""
    device = pipe.unet.device
    if hasattr(pipe, "text_encoder_2"):
        embeds, _, pooled, _ = pipe.encode_prompt(prompt, device=device, num_images_per_prompt=1,
                                                  do_classifier_free_guidance=False)
        return {"embeds": embeds, "pooled": pooled}
    embeds, _ = pipe.encode_prompt(prompt, device, 1, False)
    return {"embeds": embeds}


def token_positions(tokenizer, prompt: str, words: list[str]) -> list[list[int]]:
    """For each entry of ``words`` ("sks1 shape"), the positions of its tokens in ``prompt`` as ``tokenizer``
    splits it, assigned in order so that no position goes to two entries (the second "shape" of a prompt
    belongs to the second concept that names it). An entry none of whose words is found gets ``[]``. A token with a
    multi-vector embedding stands for all its vectors' positions (:func:`studio.adapters.form.multi_vector`)."""
    ids = tokenizer(multi_vector(tokenizer, prompt), truncation=True, max_length=tokenizer.model_max_length)["input_ids"]
    taken: set[int] = set()
    out = []
    for entry in words:
        found: list[int] = []
        for word in entry.split():
            piece = tokenizer(multi_vector(tokenizer, word), add_special_tokens=False)["input_ids"]
            for start in range(1, len(ids) - len(piece) + 1):
                span = range(start, start + len(piece))
                if ids[start : start + len(piece)] == piece and not taken.intersection(span):
                    found.extend(span)
                    taken.update(span)
                    break
        out.append(found)
    return out


STOP_WORDS = frozenset({"a", "an", "the", "on", "in", "at", "of"})


def concept_clause(prompt: str, concept: Concept) -> str | None:
    """The clause of ``prompt`` (split at commas and " and ") that names ``concept``'s token, the first of
    its ``words`` ("a sks shape on the left" of "a sks shape on the left and a zwx shape on the right");
    ``None`` when no clause names it."""
    if not concept.words:
        return None
    token = concept.words.split()[0]
    for clause in re.split(r",| and ", prompt):
        if re.search(rf"(^|\s){re.escape(token)}(\s|$)", clause.strip()):
            return clause.strip()
    return None


class Run:
    """The state of one composition while the pipeline samples; the router of every adapter layer."""

    def __init__(self, pipe, composer: Composer, prompt: str, concepts: list[Concept], height: int, width: int,
                 names: list[str] | None = None):
        self.pipe, self.composer, self.prompt = pipe, composer, prompt
        names = names or [c.name for c in concepts]  # each concept's adapter name on the pipeline
        # a placing composer routes the concepts that are not styles; styles act everywhere (``Concept.style``)
        styled = [composer.places and c.style for c in concepts]
        self.concepts = [c for c, s in zip(concepts, styled) if not s]
        self.styles = [c for c, s in zip(concepts, styled) if s]
        self.index = {n: k for k, n in enumerate(n for n, s in zip(names, styled) if not s)}  # adapter name -> concept
        self.style_index = {n: k for k, n in enumerate(n for n, s in zip(names, styled) if s)}  # adapter name -> style
        if not self.concepts:
            raise ValueError(f"{composer.name} places concepts and every concept given is a style; give at least one"
                             " concept that is not")
        factor = getattr(pipe, "vae_scale_factor", 8)
        self.latent_hw = (height // factor, width // factor)
        self.height, self.width = height, width
        self.step = -1  # index of the denoising step the UNet is in
        self.timestep = None  # sets ``acting`` too: each concept's share of its weight at the step
        self.pipeline_kwargs: dict = {}  # the keyword arguments of the pipeline's own UNet call this step
        self.only: int | None = None  # while set, only this concept's adapter acts (encoding its prompt)
        self.segments: list[tuple[int, int, int | None]] | None = None  # prompt-token spans -> concept, in expanded attention
        self.extra_unet_call = False  # a composer's own UNet call (not a pipeline step)
        self.state: dict = {}  # the composer's scratch space for this run
        self._gates: dict = {}  # (layer, input shape, dtype, device, only) -> the gates handed out, for static_gates

    # -- where an input sits -------------------------------------------------------------------
    def spatial_hw(self, n: int) -> tuple[int, int]:
        """(h, w) of a layer whose input has ``n`` image tokens (the UNet halves sizes, rounding up)."""
        H, W = self.latent_hw
        f = max(1, round(math.sqrt(H * W / n)))
        h, w = -(-H // f), -(-W // f)
        if h * w != n:
            raise ValueError(f"cannot place {n} tokens on a {H}x{W} latent")
        return h, w

    def region_mask(self, box: Box, h: int, w: int) -> torch.Tensor:
        """(h, w) float mask of a box: the cells whose centre lies inside it (cached per size)."""
        key = ("region", box, h, w)
        if key not in self.state:
            self.state[key] = self._region_mask(box, h, w)
        return self.state[key]

    @staticmethod
    def _region_mask(box: Box, h: int, w: int) -> torch.Tensor:
        x0, y0, x1, y1 = box
        ys = (torch.arange(h) + 0.5) / h
        xs = (torch.arange(w) + 0.5) / w
        inside_y = ((ys >= y0) & (ys < y1)).float()
        inside_x = ((xs >= x0) & (xs < x1)).float()
        return inside_y[:, None] * inside_x[None, :]

    def token_mask(self, mask_hw: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """A (h, w) or (B, h, w) mask shaped to multiply a layer's output for input ``x``."""
        if mask_hw.ndim == 2:
            mask_hw = mask_hw[None]
        mask_hw = mask_hw.to(x.device, x.dtype)
        if x.ndim == 4:  # conv: (B, C, h, w)
            return mask_hw[:, None]
        return mask_hw.flatten(1)[:, :, None]  # (B, N, 1)

    def map_size(self) -> int:
        """Side of the attention maps composers read: the UNet's attention resolution nearest a quarter of the
        latent's side, at least 8 (SD1.5 at 512 px: 16; SDXL at 1024 px: 32; the embedded model: 8)."""
        side = min(self.latent_hw)
        sizes, level = [], side
        for block in self.pipe.unet.config.down_block_types:
            if "CrossAttn" in block:
                sizes.append(level)
            level = -(-level // 2)
        want = max(8, side // 4)
        return min(sizes or [want], key=lambda s: (abs(s - want), -s))

    def layer_hw(self, x: torch.Tensor) -> tuple[int, int]:
        return tuple(x.shape[-2:]) if x.ndim == 4 else self.spatial_hw(x.shape[1])

    # -- the router ----------------------------------------------------------------------------
    def gates(self, stack, x: torch.Tensor) -> list:
        """Every adapter's weight on ``stack`` for input ``x`` (numbers, or tensors over the output's tokens)."""
        if not self.composer.static_gates:
            return self._gates_for(stack, x)
        # the same list for the same question, so that the layer can keep a prepared call; a cross-attention
        # key/value's gates follow the prompt's spans of the pass (``segments``), part of the question
        spans = tuple(self.segments) if stack.text_input and self.segments is not None else None
        key = (stack, x.shape, x.dtype, x.device, self.only, spans, self._windows)
        out = self._gates.get(key)
        if out is None:
            out = self._gates[key] = self._gates_for(stack, x)
        return out

    @property
    def timestep(self):
        """The timestep of the UNet call in progress (``None`` outside sampling)."""
        return self._timestep

    @timestep.setter
    def timestep(self, t) -> None:
        # which concepts act at it, read once per step here rather than per layer (a tensor's value is a device sync)
        self._timestep = t
        self.acting = tuple(c.scale_at(t) for c in self.concepts)
        self.styles_acting = tuple(c.scale_at(t) for c in self.styles)
        self._windows = tuple(a for a, c in zip(self.acting + self.styles_acting, self.concepts + self.styles)
                              if c.timesteps is not None)

    def _gates_for(self, stack, x: torch.Tensor) -> list:
        out = []
        unet = getattr(stack, "component", "unet") == "unet"
        for name, weight in zip(stack.names, stack.weights):
            k = self.index.get(name)
            if k is None:  # a style, or attached outside this composition: keeps its own weight (a style's window's share)
                s = self.style_index.get(name)
                out.append(weight if s is None or not unet else weight * self.styles_acting[s])
                continue
            share = self.acting[k] if unet else 1.0  # its timestep window's: 0 outside it, or the share kept there
            gate = self._gate(stack, x, k, unet) if share else 0.0
            out.append(gate if share in (0, 1) else gate * share)
        return out

    def _gate(self, stack, x: torch.Tensor, k: int, unet: bool):
        """Concept ``k``'s gate on layer ``stack`` before its timestep window's share."""
        if self.only is not None:
            return self.concepts[k].weight if k == self.only else 0.0
        if not unet:  # a text encoder: off where the pipeline's pass is plain
            return 0.0 if self.composer.plain_pipeline_pass else self.concepts[k].weight
        if stack.text_input:  # a cross-attention key/value: per prompt token, not per image token
            if self.segments is None:
                return self.composer.gate(self, stack, x, k) if self.composer.gates_text_layers else self.concepts[k].weight
            key = ("text-gate", tuple(self.segments), k, x.shape[1], x.device, x.dtype)
            if key not in self.state:
                mask = torch.zeros(x.shape[1], device=x.device, dtype=x.dtype)
                for start, end, owner in self.segments:
                    if owner == k:
                        mask[start:end] = 1
                self.state[key] = self.concepts[k].weight * mask[None, :, None]
            return self.state[key]
        return self.composer.gate(self, stack, x, k)

    @contextlib.contextmanager
    def restricted(self, k: int | None):
        """Only concept ``k``'s adapter acts inside (``None``: none of them)."""
        before = self.only
        self.only = k if k is not None else -1
        try:
            yield
        finally:
            self.only = before

    def encode(self, prompts: list[str], only: int | None = None) -> dict:
        """Text conditioning for ``prompts`` with only concept ``only``'s adapter on the text encoders."""
        with self.restricted(only), torch.no_grad():
            return _encode(self.pipe, prompts)

    # -- sampling --------------------------------------------------------------------------------
    def _unet_pre_hook(self, module, args, kwargs):
        if not self.extra_unet_call:
            self.step += 1
            self.timestep = kwargs.get("timestep", args[1] if len(args) > 1 else None)
            self.pipeline_kwargs = kwargs  # the pipeline's own conditioning (both guidance halves), for pipeline_rows
            if self.composer.plain_pipeline_pass:  # the pipeline's own pass is the base model's
                self._only_before, self.only = self.only, -1
        return None

    def _step_end(self, pipe, i, t, callback_kwargs):
        latents = callback_kwargs["latents"]
        timesteps = pipe.scheduler.timesteps
        if i + 1 < len(timesteps):
            latents = self.composer.edit_latents(self, i + 1, timesteps[i + 1], latents)
        return {"latents": latents}

    def pipe_kwargs(self, seed: int = 0, batch: int = 1, steps: int = 25) -> dict:
        """Keyword arguments for ``pipe(prompt, **kwargs)``: the start latents (seed ``seed + i`` per image,
        edited by the composer, also for step 0), the step-end callback that edits them before each later
        step, the number of steps and the size."""
        self.step = -1
        self.batch = batch
        self.state.pop("masks", None)
        unet = self.pipe.unet
        shape = (unet.config.in_channels, *self.latent_hw)
        noise = torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(seed + i)) for i in range(batch)])
        latents = self.composer.initial_latents(self, noise.to(unet.device, unet.dtype))
        scheduler = self.pipe.scheduler
        scheduler.set_timesteps(steps, device=unet.device)
        sigma = getattr(scheduler, "init_noise_sigma", 1.0)
        # the pipeline multiplies the latents it is given by init_noise_sigma; the composer sees them as the UNet will
        latents = self.composer.edit_latents(self, 0, scheduler.timesteps[0], latents * sigma) / sigma
        return {"latents": latents, "callback_on_step_end": self._step_end, "num_inference_steps": steps,
                "callback_on_step_end_tensor_inputs": ["latents"], "height": self.height, "width": self.width}

    def conditioning(self, n: int, cond: dict | None = None) -> dict:
        """The UNet's keyword arguments for ``n`` images of the global prompt, or of ``cond`` (what :meth:`encode`
        returns), without a guidance half."""
        if cond is None:
            if "cond" not in self.state:
                self.state["cond"] = self.encode([self.prompt], only=None)
            cond = self.state["cond"]
        return dict(self.kept(("conditioning", n), (cond,), lambda: self._conditioning(n, cond)))

    def _conditioning(self, n: int, cond: dict) -> dict:
        kwargs = {"encoder_hidden_states": cond["embeds"].repeat(n, 1, 1)}
        if "pooled" in cond:
            from studio.families import sdxl_time_ids

            time_ids = sdxl_time_ids(self.height, self.width, n).to(cond["pooled"].device, cond["pooled"].dtype)
            kwargs["added_cond_kwargs"] = {"text_embeds": cond["pooled"].repeat(n, 1), "time_ids": time_ids}
        return kwargs

    def kept(self, name: tuple, sources: tuple, build):
        """``build()``, built once and handed back as the same object while ``sources`` are the same objects and no
        source tensor changed in place (its version): what the UNet's prompt layers read, so that each keeps its
        adapters' update for it from step to step (``LoraStack.keep_prompt``). Built afresh where a source tensor
        has no version counter (inference mode) or is part of a graph."""
        stamps = tuple(version(s) if isinstance(s, torch.Tensor) else 0 for s in sources)
        if None in stamps or any(isinstance(s, torch.Tensor) and s.requires_grad for s in sources):
            return build()
        key = (name, *map(id, sources))
        entry = self.state.get(key)
        if entry is None or entry[1] != stamps or any(a is not b for a, b in zip(entry[0], sources)):
            entry = self.state[key] = (sources, stamps, build())  # holding the sources keeps their ids theirs
        return entry[2]

    def model_input(self, latents: torch.Tensor, t) -> tuple[torch.Tensor, float]:
        """The UNet's input for ``latents`` at ``t`` (the scheduler's scaling) and the factor back to latents."""
        scaled = self.pipe.scheduler.scale_model_input(latents, t)
        return scaled, float(latents.norm() / scaled.norm().clamp_min(1e-12))

    def unet_call(self, latents: torch.Tensor, t, scaled: bool = False, cond: dict | None = None,
                  only: int | None = None) -> torch.Tensor:
        """The UNet on ``latents`` at ``t`` with the global prompt (or ``cond``), outside the step count (a
        composer's own pass, e.g. for a gradient step on the latents); adapters act as the composer gates them,
        or only concept ``only``'s. ``scaled``: the latents are already the UNet's input (:meth:`model_input`)."""
        if not scaled:
            latents = self.pipe.scheduler.scale_model_input(latents, t)
        return self._extra_call(latents, t, self.conditioning(latents.shape[0], cond), only)

    def pipeline_rows(self, x: torch.Tensor, t, rows: slice, only: int | None = None, cond: dict | None = None
                      ) -> torch.Tensor:
        """The UNet on ``x`` (already its input) at ``t`` with the conditioning rows ``rows`` of the pipeline's own
        pass this step (``slice(0, n)``: the negative half of a guidance batch), only concept ``only``'s adapter
        acting; outside the step count. With ``cond`` (what :meth:`encode` returns) ``x`` has more rows than
        ``rows`` selects, and those that follow are conditioned on ``cond``: one call for a pass's negative half and
        its own prompt."""
        extra = None if cond is None else self.conditioning(x.shape[0] - len(range(*rows.indices(x.shape[0]))), cond)
        kwargs = {}
        for key, value in self.pipeline_kwargs.items():
            if key in ("sample", "timestep"):
                continue
            if key == "added_cond_kwargs" and value is not None:
                value = {k: v[rows] for k, v in value.items()}
                if extra is not None:
                    value = {k: torch.cat([v, extra["added_cond_kwargs"][k]]) for k, v in value.items()}
            elif isinstance(value, torch.Tensor) and value.ndim and key != "timestep_cond":
                then = None if extra is None else extra.get(key)
                value = self.kept(("rows", rows.start, rows.stop, rows.step), (value, then),
                                  lambda v=value, e=then: v[rows] if e is None else torch.cat([v[rows], e]))
            kwargs[key] = value
        return self._extra_call(x, t, kwargs, only)

    def _extra_call(self, x: torch.Tensor, t, kwargs: dict, only: int | None) -> torch.Tensor:
        """A composer's own UNet call (not counted as a step), only concept ``only``'s adapter acting if given."""
        self.extra_unet_call = True
        try:
            with self.restricted(only) if only is not None else contextlib.nullcontext():
                out = self.pipe.unet(x, t, **kwargs)
        finally:
            self.extra_unet_call = False
        return out[0] if isinstance(out, tuple) else out.sample

    def _unet_post_hook(self, module, args, kwargs, output):
        if self.extra_unet_call:
            return None
        if self.composer.plain_pipeline_pass:
            self.only = self._only_before
        sample = output[0] if isinstance(output, tuple) else output.sample
        latents = kwargs.get("sample", args[0] if args else None)
        timestep = kwargs.get("timestep", args[1] if len(args) > 1 else None)
        new = self.composer.unet_output(self, latents, timestep, sample)
        if new is None:
            return None
        if isinstance(output, tuple):
            return (new, *output[1:])
        output.sample = new
        return output


class _Processor:
    """Routes one attention layer to the composer."""

    def __init__(self, run: Run, name: str):
        self.run, self.name = run, name

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, *args, **kwargs):
        self.run.layer = self.name
        return self.run.composer.attention(self.run, attn, hidden_states, encoder_hidden_states, attention_mask, temb)


def default_attention(attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None,
                      bias: torch.Tensor | None = None, probs_out: list | None = None):
    """diffusers' attention (AttnProcessor2_0's steps) with an optional ``bias``: a
    :class:`studio.kernels.attention.RegionMask` (run by :func:`~studio.kernels.attention.region_attention`:
    FlexAttention block masks on CUDA, SDPA here), or an additive/boolean tensor on the scores
    ``(B or 1, heads or 1, Nq, Nk)``. ``probs_out`` receives the attention probabilities when given (then
    the scores are computed explicitly)."""
    residual = hidden_states
    if attn.spatial_norm is not None:
        hidden_states = attn.spatial_norm(hidden_states, temb)
    ndim = hidden_states.ndim
    if ndim == 4:
        b, c, h, w = hidden_states.shape
        hidden_states = hidden_states.view(b, c, h * w).transpose(1, 2)
    batch = hidden_states.shape[0]
    if attn.group_norm is not None:
        hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
    query = attn.to_q(hidden_states)
    context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
    if encoder_hidden_states is not None and attn.norm_cross:
        context = attn.norm_encoder_hidden_states(context)
    key, value = attn.to_k(context), attn.to_v(context)
    head_dim = key.shape[-1] // attn.heads
    query = query.view(batch, -1, attn.heads, head_dim).transpose(1, 2)
    key = key.view(batch, -1, attn.heads, head_dim).transpose(1, 2)
    value = value.view(batch, -1, attn.heads, head_dim).transpose(1, 2)
    if attn.norm_q is not None:
        query = attn.norm_q(query)
    if attn.norm_k is not None:
        key = attn.norm_k(key)
    from studio.kernels.attention import RegionMask, region_attention

    if attention_mask is not None:
        mask = attn.prepare_attention_mask(attention_mask, key.shape[2], batch).view(batch, attn.heads, -1, key.shape[2])
        if isinstance(bias, RegionMask):
            bias = bias.to(mask.device).dense()
        if bias is not None and bias.dtype == torch.bool:
            bias = torch.zeros_like(mask).masked_fill(~bias, float("-inf"))
        bias = mask if bias is None else bias + mask
    if probs_out is not None and isinstance(bias, RegionMask):
        bias = bias.to(query.device).dense()[None, None]
    if probs_out is not None:
        scores = query @ key.transpose(-1, -2) * attn.scale
        if bias is not None:
            scores = scores.masked_fill(~bias, float("-inf")) if bias.dtype == torch.bool else scores + bias
        probs = scores.softmax(-1)
        probs_out.append(probs)
        out = probs @ value
    else:
        out = region_attention(query, key, value, bias, scale=attn.scale)
    out = out.transpose(1, 2).reshape(batch, -1, attn.heads * head_dim).to(query.dtype)
    out = attn.to_out[1](attn.to_out[0](out))
    if ndim == 4:
        out = out.transpose(-1, -2).reshape(b, c, h, w)
    if attn.residual_connection:
        out = out + residual
    return out / attn.rescale_output_factor


@contextlib.contextmanager
def composing(pipe, method: str | Composer, prompt: str, concepts: list[Concept], height: int | None = None,
              width: int | None = None):
    """Attach ``concepts``' adapters to ``pipe`` under ``method`` and yield the :class:`Run`; on exit the
    pipeline is exactly as before (adapters, attention processors and hooks removed)."""
    from studio.composers import get_composer

    from studio.plugin import attach, remove

    composer = get_composer(method)
    if not concepts:
        raise ValueError("a composition needs at least one concept (adapter)")
    names = []
    for c in concepts:  # adapter names on the pipeline: the concept's, numbered where two share one
        name, n = c.name, 1
        while name in names:
            n += 1
            name = f"{c.name}-{n}"
        names.append(name)
    size = pipe.unet.config.sample_size * getattr(pipe, "vae_scale_factor", 8)
    run = Run(pipe, composer, prompt, concepts, height or size, width or size, names)
    if composer.merges:
        merged = composer.merge(concepts)
        handle = attach(pipe, [merged], names=[f"{composer.name}-merge"])
        try:
            yield run
        finally:
            remove(pipe, [f"{composer.name}-merge"])
        return
    handle = attach(pipe, [c.adapter for c in concepts], weights=[max(-2.0, min(2.0, c.weight)) for c in concepts], names=names)
    ours = [s for s in handle.stacks.values() if set(s.names) & set(names)]
    for canonical, stack in handle.stacks.items():
        if stack in ours:
            stack.router = run
            stack.component = canonical.partition(".")[0]
    saved = None
    if composer.needs_attention:
        saved = dict(pipe.unet.attn_processors)
        pipe.unet.set_attn_processor({name: _Processor(run, name) for name in saved})
    hook = pipe.unet.register_forward_pre_hook(run._unet_pre_hook, with_kwargs=True)
    post = pipe.unet.register_forward_hook(run._unet_post_hook, with_kwargs=True)
    try:
        composer.prepare(run)
        yield run
    finally:
        hook.remove()
        post.remove()
        if saved is not None:
            pipe.unet.set_attn_processor(saved)
        for stack in ours:
            stack.router = None
        remove(pipe, names)


def compose(pipe, method: str | Composer, prompt: str, concepts: list[Concept], seed: int = 0, num: int = 1,
            steps: int = 25, guidance: float = 5.0, height: int | None = None, width: int | None = None,
            negative_prompt: str | None = None, batch_size: int = 8):
    """Images of ``prompt`` with ``concepts`` combined by ``method``; image ``i`` uses seed ``seed + i``.
    ``negative_prompt`` None leaves the pipeline's default (for SDXL, zeros); "" is the encoded empty prompt."""
    images = []
    with composing(pipe, method, prompt, concepts, height, width) as run:
        for start in range(0, num, batch_size):
            n = min(batch_size, num - start)
            kwargs = run.pipe_kwargs(seed + start, n, steps)
            out = pipe(prompt=[prompt] * n, negative_prompt=[negative_prompt] * n if negative_prompt is not None else None,
                       guidance_scale=guidance, output_type="pil", **kwargs)
            images.extend(out.images)
    return images
