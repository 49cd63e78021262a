"""Attach studio adapters to a stock diffusers pipeline, change their weights, fuse, detach.

Every targeted ``nn.Linear``/``nn.Conv2d`` is swapped for a :class:`LoraStack` that keeps the
original module and adds ``sum_i weight_i * (alpha_i / rank_i) * up_i(down_i(x))``; an adapter's token
embeddings (pivotal tuning) are added to the tokenizers and text encoders with diffusers' textual inversion
loader. Detaching puts the original modules back and takes the tokens out, so the pipeline is exactly what it was. Composers (``studio.composers``)
set a stack's ``router`` to gate each adapter per token or region; ``compose``/``composing`` are
re-exported here for plugin users.

    >>> from studio.families import load_pipeline
    >>> from studio.plugin import attach, detach
    >>> pipe = load_pipeline()
    >>> handle = attach(pipe, [])  # adapter files or Adapter objects, optionally with weights
    >>> detach(pipe)
"""

from __future__ import annotations

import hashlib
import weakref
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from studio.adapters import Adapter, load_adapter
from studio.adapters.form import TEXT_ENCODERS, module_path, token_names, tokenizer_of
from studio.kernels.lora import (
    GatedPlan,
    LinearPlan,
    Packed,
    TokenGates,
    multi_lora_delta,
    multi_lora_linear,
    plan_fits,
    version,
)

WEIGHT_RANGE = (-2.0, 2.0)


def base_model_hash(unet: nn.Module) -> str:
    """A cheap fingerprint of a UNet's weights: names, shapes and the first 256 values of each tensor."""
    h = hashlib.sha256()
    for name, tensor in sorted(unet.state_dict().items()):
        h.update(f"{name}{tuple(tensor.shape)}".encode())
        h.update(tensor.detach().flatten()[:256].float().cpu().numpy().tobytes())
    return h.hexdigest()[:16]


def pipeline_family(pipe) -> str:
    return "sdxl" if hasattr(pipe, "text_encoder_2") else "sd15"


class LoraStack(nn.Module):
    """A base layer plus any number of low-rank updates, each with its own weight."""

    prepared = True  # keep a prepared call after the first (LinearPlan / GatedPlan / RoutedPlan); False: the general path
    keep_prompt = True  # text-input layers keep the adapters' update for a prompt tensor that comes back (see forward)
    KEPT = 8  # (prompt tensor, gates) pairs kept per layer (CLoRA's passes bring 2 per concept and 1 for the base)

    def __init__(self, base: nn.Linear | nn.Conv2d, path: str):
        super().__init__()
        self.base = base
        self.path = path  # where it sits in its model, for detaching
        self.downs = nn.ModuleList()
        self.ups = nn.ModuleList()
        self.names: list[str] = []
        self.scales: list[float] = []  # alpha / rank
        self.weights: list[float] = []
        self.fused_from: torch.Tensor | None = None  # the base weight before fusing, kept for an exact unfuse
        self.fused_version = 0  # the base weight's version before fusing (a plan made on it holds again after unfuse)
        # a composer's router (``studio.composers.base.Run``) sets each adapter's weight per call: a number or
        # a tensor over the output's tokens (per region, per text token); None: the fixed ``weights``
        self.router = None
        self._packed = None  # the adapters stacked for the fused kernel (studio.kernels.lora.Packed), rebuilt on change
        self._routed = None  # (key, the router's gates, their TokenGates): reused while the router returns the same gates
        self._plan = None  # a LinearPlan for fixed weights (no router), rebuilt on any change
        self._gated = None  # a GatedPlan or RoutedPlan for the router's fixed gates (a composer's masks during a run)
        self.text_input = False  # True for a cross-attention key/value projection (its input is the prompt's tokens)
        self._kept: dict[tuple, tuple] = {}  # text input: (id(prompt), gates) -> (weakref, check, gates, the update)

    def add(self, name: str, down: torch.Tensor, up: torch.Tensor, scale: float, weight: float) -> None:
        ref = self.base.weight
        if isinstance(self.base, nn.Conv2d):
            d = nn.Conv2d(self.base.in_channels, down.shape[0], self.base.kernel_size, self.base.stride,
                          self.base.padding, self.base.dilation, bias=False)
            u = nn.Conv2d(down.shape[0], self.base.out_channels, 1, bias=False)
            up = up.reshape(up.shape[0], up.shape[1], 1, 1)
        else:
            d = nn.Linear(down.shape[1], down.shape[0], bias=False)
            u = nn.Linear(down.shape[0], up.shape[0], bias=False)
        if d.weight.shape != down.shape or u.weight.shape != up.shape:
            raise ValueError(f"adapter {name!r} does not fit this layer: down {tuple(down.shape)}, up {tuple(up.shape)},"
                             f" layer weight {tuple(ref.shape)}")
        with torch.no_grad():
            d.weight.copy_(down)
            u.weight.copy_(up)
        self.downs.append(d.to(ref.device, ref.dtype).requires_grad_(False))
        self.ups.append(u.to(ref.device, ref.dtype).requires_grad_(False))
        self.names.append(name)
        self.scales.append(scale)
        self.weights.append(weight)
        self.changed()

    def changed(self) -> None:
        """Forget everything built from the adapters (after one is added or taken out)."""
        self._packed = self._routed = self._plan = self._gated = None
        self._kept.clear()

    def delta(self) -> torch.Tensor:
        total = torch.zeros_like(self.base.weight, dtype=torch.float32)
        for d, u, s, w in zip(self.downs, self.ups, self.scales, self.weights):
            down, up = d.weight.float(), u.weight.float().flatten(1)
            total += w * s * (up @ down if down.ndim == 2 else torch.einsum("or,rikl->oikl", up, down))
        return total

    def packed(self) -> Packed:
        p = self._packed
        ref = self.downs[0].weight
        if p is None or p.down.device != ref.device or p.down.dtype != ref.dtype:
            p = self._packed = Packed.pack([d.weight for d in self.downs], [u.weight for u in self.ups], self.scales)
            self._kept.clear()
            for d, (a, b) in zip(self.downs, p.bounds):  # the downs kept once: each adapter's is a view of its rows
                d.weight.data = p.down[a:b]
        return p

    def routed(self, gates: list, x: torch.Tensor):
        """The router's gates for the kernel: a TokenGates built once and reused while the router hands back the
        same gate tensors (composers keep a layer's masks for a run) for inputs of the same shape."""
        r = self._routed
        if r is not None and r[1] is gates and r[0][1:] == (x.shape[:-1], x.dtype, x.device):
            return r[2]  # the router handed back the very list it did last time (static gates): nothing to compare
        if not any(isinstance(g, torch.Tensor) for g in gates):
            return gates
        if any(isinstance(g, torch.Tensor) and g.requires_grad for g in gates):
            return TokenGates.of(gates, x)  # learning gates: a fresh graph every call
        key = (tuple(id(g) if isinstance(g, torch.Tensor) else g for g in gates), x.shape[:-1], x.dtype, x.device)
        if self._routed is None or self._routed[0] != key:
            self._routed = (key, gates, TokenGates.of(gates, x))  # holding the gates keeps their ids theirs
        return self._routed[2]

    def _prompt_update(self, x: torch.Tensor, weights: list) -> torch.Tensor | None:
        """The adapters' update for prompt tokens ``x`` under ``weights`` (``None`` where every weight is 0), computed
        once and kept while the same tensor, unchanged, comes back with the same gates: a pipeline passes one prompt
        tensor to the UNet at every denoising step, so a cross-attention key/value's low-rank work is done once per
        prompt (and per gate setting: a composer's passes may each bring their own) instead of once per step."""
        gates = tuple(id(g) if isinstance(g, torch.Tensor) else float(g) for g in weights)
        if not any(gates):
            return None
        if x.is_inference():  # keeps no version counter: an in-place change could not be seen
            return multi_lora_delta(x, self.packed(), self.routed(weights, x))
        slot, check = (id(x), gates), (x._version, x.shape, x.dtype, x.device)
        kept = self._kept
        entry = kept.get(slot)
        if entry is not None and entry[0]() is x and entry[1] == check:
            return entry[3]
        delta = multi_lora_delta(x, self.packed(), self.routed(weights, x))

        def forget(ref):  # the prompt tensor is gone: so is its update
            if kept.get(slot, (None,))[0] is ref:
                kept.pop(slot, None)

        kept.pop(slot, None)
        for old in list(kept)[: max(0, len(kept) - self.KEPT + 1)]:  # the oldest out (a copy of the keys: a callback
            kept.pop(old, None)  # may take an entry out meanwhile)
        kept[slot] = (weakref.ref(x, forget), check, weights, delta)  # holding the gates keeps their ids theirs
        return delta

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (self.text_input and self.keep_prompt and self.downs and self.fused_from is None
                and isinstance(self.base, nn.Linear) and not torch.is_grad_enabled()):
            delta = self._prompt_update(x, self.weights if self.router is None else self.router.gates(self, x))
            return self.base(x) if delta is None else self.base(x).add_(delta)
        plan = self._plan  # the last call's prepared form, while nothing changed since: no per-call bookkeeping
        if (plan is not None and self.router is None and self.fused_from is None and self.prepared
                and plan.weights == self.weights and plan.device == x.device and plan.dtype == x.dtype
                and plan.version == version(self.base.weight)):
            return plan(x)
        if self.fused_from is not None or not self.downs:
            return self.base(x)
        weights = self.weights if self.router is None else self.router.gates(self, x)
        gated = self._gated
        if gated is not None and self.router is not None and self.prepared and gated.fits(x, weights):
            return gated(x)
        if isinstance(self.base, nn.Linear):  # every adapter in two GEMMs (studio.kernels), gates in rank space
            packed = self.packed()
            seen = self._routed is not None and self._routed[1] is weights  # the router's gates of the last call again
            routed = self.routed(weights, x)
            if self.prepared and plan_fits(x, packed):
                if self.router is None:
                    self._plan = LinearPlan(self.base.weight, self.base.bias, packed, weights)
                elif seen and isinstance(routed, TokenGates) and not torch.is_grad_enabled():
                    self._gated = GatedPlan.build(x, self.base.weight, self.base.bias, packed, routed, weights)
            return multi_lora_linear(x, self.base.weight, self.base.bias, packed, routed)
        out = self.base(x)
        for d, u, s, w in zip(self.downs, self.ups, self.scales, weights):
            if isinstance(w, torch.Tensor):
                out = out + (s * w) * u(d(x))
            elif w:
                out = out + (w * s) * u(d(x))
        return out


def reads_prompt(model: nn.Module, path: str) -> bool:
    """Whether the layer at ``path`` is a cross-attention key/value projection: its input is the prompt's tokens."""
    parent, _, leaf = path.rpartition(".")
    return leaf in ("to_k", "to_v") and getattr(model.get_submodule(parent), "is_cross_attention", False)


@dataclass
class Attached:
    """What :func:`attach` did, for :func:`set_weights`, :func:`fuse` and :func:`detach`."""

    names: list[str]
    stacks: dict[str, LoraStack]  # canonical module name -> the stack installed there
    tokens: dict[str, list[str]] = field(default_factory=dict)  # adapter name -> the tokens its embeddings added


def _check_weight(weight: float, what: str) -> float:
    lo, hi = WEIGHT_RANGE
    if not lo <= weight <= hi:
        raise ValueError(f"weight {weight} for {what} is out of range; accepted: {lo} to {hi}")
    return float(weight)


def block_scales(unet: nn.Module, weight: dict, what: str) -> dict[str, float]:
    """A block-wise weight in diffusers' ``set_adapters`` form, ``{"text_encoder": w, "text_encoder_2": w, "unet": w
    or {"down": w or {"block_1": w or [w per transformer]}, "mid": w, "up": ...}}``, as a weight per prefix:
    ``"text_encoder"``, ``"unet"`` (a number for the whole UNet) or ``"down_blocks.1.attentions.0"``,
    ``"mid_block"``, ...; a part left out weighs 1. Refuses unknown parts, blocks without transformers, lists of the
    wrong length and weights out of range, naming them."""
    unknown = set(weight) - {"unet", "text_encoder", "text_encoder_2"}
    if unknown:
        raise ValueError(f"block weights for {what} name {', '.join(sorted(unknown))}; accepted: unet, text_encoder,"
                         " text_encoder_2")
    out = {c: _check_weight(float(weight[c]), f"{what} ({c})") for c in ("text_encoder", "text_encoder_2") if c in weight}
    parts = weight.get("unet", 1.0)
    if not isinstance(parts, dict):
        out["unet"] = _check_weight(float(parts), f"{what} (unet)")
        return out
    if set(parts) - {"down", "mid", "up"}:
        raise ValueError(f"block weights for {what}: unet takes down, mid and up; got {', '.join(sorted(set(parts) - {'down', 'mid', 'up'}))}")
    out["mid_block"] = _check_weight(float(parts.get("mid", 1.0)), f"{what} (unet mid)")
    for side in ("down", "up"):
        blocks = getattr(unet, f"{side}_blocks")
        with_attention = [i for i, b in enumerate(blocks) if getattr(b, "attentions", None)]
        given = parts.get(side, 1.0)
        given = given if isinstance(given, dict) else {f"block_{i}": given for i in with_attention}
        stray = set(given) - {f"block_{i}" for i in with_attention}
        if stray:
            raise ValueError(f"block weights for {what}: unet {side} has transformer blocks"
                             f" {', '.join(f'block_{i}' for i in with_attention)}; got {', '.join(sorted(stray))}")
        for i in with_attention:
            n = len(blocks[i].attentions)
            value = given.get(f"block_{i}", 1.0)
            values = list(value) if isinstance(value, (list, tuple)) else [value] * n
            if len(values) != n:
                raise ValueError(f"block weights for {what}: unet {side} block_{i} has {n} transformers; got"
                                 f" {len(values)} weights")
            for j, v in enumerate(values):
                out[f"{side}_blocks.{i}.attentions.{j}"] = _check_weight(float(v), f"{what} (unet {side} block_{i} #{j})")
    return out


def block_weight(scales: dict[str, float], canonical: str) -> float:
    """The weight :func:`block_scales`' ``scales`` give the layer ``canonical`` ("unet.up_blocks.0.attentions.1...."),
    as diffusers gives it: the first prefix found in its name; in a block with transformers, a layer outside them
    (a ResNet) takes the transformer of its own index; anything else 1."""
    component, _, path = canonical.partition(".")
    if component != "unet":
        return scales.get(component, 1.0)
    if "unet" in scales:
        return scales["unet"]
    for prefix, value in scales.items():
        if f"{prefix}." in f"{path}." and prefix.startswith(("down_blocks", "up_blocks", "mid_block")):
            return value
    parts = path.split(".")
    if len(parts) > 3:
        return scales.get(f"{parts[0]}.{parts[1]}.attentions.{parts[3]}", 1.0)
    return 1.0


def check_base(pipe, adapter: Adapter, what: str, base_hash: str | None = None) -> None:
    """Refuse ``adapter`` (called ``what`` in the message) if it was trained for another family or base UNet than ``pipe``'s
    (``base_hash``: that UNet's hash, taken before adapter layers went into it)."""
    family = pipeline_family(pipe)
    if adapter.meta.family and adapter.meta.family != family:
        raise ValueError(f"{what} was trained for a {adapter.meta.family} model, but this pipeline is {family}")
    if adapter.meta.base_hash and adapter.meta.base_hash != (ours := base_hash or base_model_hash(pipe.unet)):
        raise ValueError(f"{what} was trained on base model {adapter.meta.base_model or '?'} ({adapter.meta.base_hash}),"
                         f" but this pipeline's UNet is {ours}")


def check_same_base(named: dict[str, str | Path]) -> None:
    """Refuse adapters trained on different base models, naming each adapter and its base model.

    ``named`` maps a role ("content adapter") to a file; adapters without a recorded base hash pass.
    """
    from studio.adapters import load_adapter

    seen = []
    for role, path in named.items():
        meta = load_adapter(path).meta
        for other_role, other_path, other in seen:
            if meta.base_hash and other.base_hash and meta.base_hash != other.base_hash:
                raise ValueError(
                    f"{other_role} {other_path} was trained on base model {other.base_model or '?'} ({other.base_hash}) but "
                    f"{role} {path} on {meta.base_model or '?'} ({meta.base_hash}); use adapters trained on the same base model"
                )
            if meta.family and other.family and meta.family != other.family:
                raise ValueError(
                    f"{other_role} {other_path} is for a {other.family} model but {role} {path} for a {meta.family} model"
                )
        seen.append((role, path, meta))


def attach(pipe, adapters: list, weights: list[float] | None = None, names: list[str] | None = None) -> Attached:
    """Attach adapters (paths or :class:`Adapter` objects) to ``pipe``'s UNet and text encoders.

    ``weights`` default to 1.0 each; a weight may instead be block weights in diffusers' ``set_adapters`` form
    (:func:`block_scales`), e.g. ``{"unet": {"down": 0, "mid": 0, "up": {"block_0": [0, 1, 0]}}}``. Attaching again
    adds to what is attached.
    """
    weights = [1.0] * len(adapters) if weights is None else list(weights)  # numbers, or block weights (dicts)
    if len(weights) != len(adapters):
        raise ValueError(f"{len(adapters)} adapters but {len(weights)} weights")
    handle: Attached = getattr(pipe, "_studio_attached", None) or Attached([], {})
    loaded = []
    for i, item in enumerate(adapters):
        what = str(item) if isinstance(item, (str, Path)) else f"adapter {i}"
        adapter = load_adapter(item) if isinstance(item, (str, Path)) else item
        check_base(pipe, adapter, what)
        given = names[i] if names else None
        name = given or (Path(item).stem if isinstance(item, (str, Path)) else f"adapter{len(handle.names) + i}")
        taken = set(handle.names) | {n for n, _, _ in loaded}
        if given and name in taken:
            raise ValueError(f"an adapter named {name!r} is already attached")
        stem, k = name, 1
        while name in taken:  # files of the same name (run folders' adapter.safetensors): numbered
            k += 1
            name = f"{stem}-{k}"
        weight = block_scales(pipe.unet, weights[i], what) if isinstance(weights[i], dict) else _check_weight(weights[i], what)
        loaded.append((name, adapter, weight))
    # check every target before changing anything, so a bad adapter leaves the pipeline as it was
    targets: dict[str, nn.Module] = {}
    for name, adapter, _ in loaded:
        for canonical, lora in adapter.modules.items():
            component, _, path = canonical.partition(".")
            model = getattr(pipe, component, None)
            if model is None:
                raise ValueError(f"adapter {name!r} targets {component}, which this pipeline does not have")
            module = handle.stacks[canonical].base if canonical in handle.stacks else model.get_submodule(module_path(model, path))
            if not isinstance(module, (nn.Linear, nn.Conv2d)):
                raise ValueError(f"adapter {name!r} targets {canonical}, a {type(module).__name__}; only Linear and Conv2d layers take LoRA")
            if lora.shape != tuple(module.weight.shape):
                raise ValueError(f"adapter {name!r} does not fit {canonical}: its update is {lora.shape},"
                                 f" the layer's weight {tuple(module.weight.shape)} (another base model?)")
            targets[canonical] = module
    _check_embeddings(pipe, handle, loaded)
    if handle.stacks:
        unfuse(pipe)
    for name, adapter, weight in loaded:
        for canonical, lora in adapter.modules.items():
            model = getattr(pipe, canonical.partition(".")[0])
            stack = handle.stacks.get(canonical)
            if stack is None:
                stack = LoraStack(targets[canonical], module_path(model, canonical.partition(".")[2]))
                stack.text_input = reads_prompt(model, stack.path)
                _put(model, stack.path, stack)
                handle.stacks[canonical] = stack
            stack.add(name, lora.down, lora.up, lora.scale, block_weight(weight, canonical) if isinstance(weight, dict) else weight)
        handle.names.append(name)
        if adapter.embeddings:
            handle.tokens[name] = _load_embeddings(pipe, adapter.embeddings)
    pipe._studio_attached = handle
    return handle


def _check_embeddings(pipe, handle: Attached, loaded: list) -> None:
    """Refuse, before anything changes, token embeddings the pipeline cannot take: a text encoder it lacks, another
    width, a token already in its vocabulary or given by another adapter."""
    seen = {t: n for n, tokens in handle.tokens.items() for t in tokens}
    for name, adapter, _ in loaded:
        for token, per in adapter.embeddings.items():
            if token in seen:
                raise ValueError(f"adapters {seen[token]!r} and {name!r} both embed the token {token!r}; attach one of"
                                 " them, or retrain one with another --token")
            for component, vectors in per.items():
                encoder, tokenizer = getattr(pipe, component, None), getattr(pipe, tokenizer_of(component), None)
                if encoder is None or tokenizer is None:
                    raise ValueError(f"adapter {name!r} embeds {token!r} for {component}, which this pipeline does not have")
                width = encoder.get_input_embeddings().weight.shape[1]
                if vectors.shape[1] != width:
                    raise ValueError(f"adapter {name!r} embeds {token!r} for {component} in width {vectors.shape[1]}, but"
                                     f" that encoder's embeddings are {width} wide (another base model?)")
                taken = [t for t in token_names(token, len(vectors)) if t in tokenizer.get_vocab()]
                if taken:
                    raise ValueError(f"adapter {name!r} embeds {token!r}, but {', '.join(taken)} is already a token of"
                                     f" this pipeline's {tokenizer_of(component)}")
            seen[token] = name
    if seen and not hasattr(pipe, "load_textual_inversion"):
        raise ValueError(f"{type(pipe).__name__} cannot load token embeddings (no load_textual_inversion); the adapters"
                         f" embedding {', '.join(sorted(seen))} need a pipeline with diffusers' textual inversion loader")


def _load_embeddings(pipe, embeddings: dict[str, dict[str, torch.Tensor]]) -> list[str]:
    """Add each token and its embedding to the tokenizer and text encoder they are for (diffusers' textual inversion
    loader); returns the tokens added."""
    added = []
    for token, per in embeddings.items():
        for component, vectors in per.items():
            encoder = getattr(pipe, component)
            weight = encoder.get_input_embeddings().weight
            pipe.load_textual_inversion(vectors.to(weight.device, weight.dtype), token=token, text_encoder=encoder,
                                        tokenizer=getattr(pipe, tokenizer_of(component)))
        added += token_names(token, len(next(iter(per.values()))))
    return added


def _unload_embeddings(pipe, tokens: list[str]) -> None:
    """Take ``tokens`` out of every tokenizer and text encoder that has them."""
    for component in TEXT_ENCODERS:
        encoder, tokenizer = getattr(pipe, component, None), getattr(pipe, tokenizer_of(component), None)
        if encoder is None or tokenizer is None:
            continue
        present = [t for t in tokens if t in tokenizer.get_vocab()]
        if present:
            device, dtype = encoder.get_input_embeddings().weight.device, encoder.get_input_embeddings().weight.dtype
            pipe.unload_textual_inversion(present, tokenizer=tokenizer, text_encoder=encoder)
            encoder.get_input_embeddings().to(device, dtype)


def _put(model: nn.Module, path: str, module: nn.Module) -> None:
    parent, _, leaf = path.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, module)


def set_weights(pipe, weights: dict[str, float]) -> None:
    """Change attached adapters' weights by name (unfuses first if fused)."""
    handle = _handle(pipe)
    unknown = set(weights) - set(handle.names)
    if unknown:
        raise ValueError(f"no attached adapter named {', '.join(sorted(unknown))}; attached: {', '.join(handle.names)}")
    unfuse(pipe)
    for stack in handle.stacks.values():
        stack.weights = [_check_weight(weights[n], n) if n in weights else w for n, w in zip(stack.names, stack.weights)]


def fuse(pipe) -> None:
    """Add every attached update into its base weight (faster sampling; weights fixed until unfused)."""
    for stack in _handle(pipe).stacks.values():
        if stack.fused_from is None:
            w = stack.base.weight
            stack.fused_from, stack.fused_version = w.detach().clone(), version(w)
            with torch.no_grad():
                w += stack.delta().to(w.dtype)


def unfuse(pipe) -> None:
    """Restore the base weights exactly (they were kept when fusing)."""
    for stack in _handle(pipe).stacks.values():
        if stack.fused_from is not None:
            with torch.no_grad():
                stack.base.weight.copy_(stack.fused_from)
            stack.fused_from = None
            if stack._plan is not None and stack._plan.version == stack.fused_version:  # made on the weight now back
                stack._plan.version = version(stack.base.weight)


def detach(pipe) -> None:
    """Remove every attached adapter; the pipeline's modules are the originals again."""
    handle = getattr(pipe, "_studio_attached", None)
    if handle is None:
        return
    unfuse(pipe)
    for canonical, stack in handle.stacks.items():
        _put(getattr(pipe, canonical.partition(".")[0]), stack.path, stack.base)
    _unload_embeddings(pipe, [t for tokens in handle.tokens.values() for t in tokens])
    pipe._studio_attached = None


def remove(pipe, names: list[str]) -> None:
    """Remove the named adapters; a layer left without adapters gets its original module back."""
    handle = _handle(pipe)
    unknown = set(names) - set(handle.names)
    if unknown:
        raise ValueError(f"no attached adapter named {', '.join(sorted(unknown))}; attached: {', '.join(handle.names)}")
    unfuse(pipe)
    for canonical, stack in list(handle.stacks.items()):
        keep = [i for i, n in enumerate(stack.names) if n not in names]
        if not keep:
            _put(getattr(pipe, canonical.partition(".")[0]), stack.path, stack.base)
            del handle.stacks[canonical]
            continue
        stack.changed()
        stack.downs = nn.ModuleList([stack.downs[i] for i in keep])
        stack.ups = nn.ModuleList([stack.ups[i] for i in keep])
        for attr in ("names", "scales", "weights"):
            setattr(stack, attr, [getattr(stack, attr)[i] for i in keep])
    _unload_embeddings(pipe, [t for n in names for t in handle.tokens.pop(n, [])])
    handle.names = [n for n in handle.names if n not in names]
    if not handle.names:
        pipe._studio_attached = None


def _handle(pipe) -> Attached:
    handle = getattr(pipe, "_studio_attached", None)
    if handle is None:
        raise ValueError("no adapters are attached to this pipeline")
    return handle


def compose(pipe, method, prompt, concepts, **kwargs):
    """Sample ``prompt`` with several adapters combined by a composer (see :func:`studio.composers.compose`)."""
    from studio.composers import compose as _compose

    return _compose(pipe, method, prompt, concepts, **kwargs)


def composing(pipe, method, prompt, concepts, **kwargs):
    """Context manager: adapters + composer installed on ``pipe`` (see :func:`studio.composers.composing`)."""
    from studio.composers import composing as _composing

    return _composing(pipe, method, prompt, concepts, **kwargs)
