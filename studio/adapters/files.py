"""Reading and writing adapter files: safetensors only, metadata in the header, atomic writes.

    >>> import torch, tempfile, pathlib
    >>> from studio.adapters import Adapter, LoraWeights, save_adapter, load_adapter
    >>> a = Adapter({"unet.mid_block.attentions.0.proj_in": LoraWeights(torch.ones(2, 8), torch.zeros(8, 2), alpha=2)})
    >>> path = pathlib.Path(tempfile.mkdtemp()) / "a.safetensors"
    >>> save_adapter(a, path, layout="kohya")
    >>> sorted(load_adapter(path).modules)
    ['unet.mid_block.attentions.0.proj_in']
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from studio.adapters.form import COMPONENTS, Adapter, AdapterMeta, LoraWeights
from studio.adapters.keys import SD15_LAYOUT, SDXL_LAYOUT, UNetLayout, canonical_from_kohya, kohya_name

LAYOUTS = ("diffusers", "kohya")
# what an adapter's factors may be written as (kohya's --save_precision, ai-toolkit's save_dtype); alphas stay float32
SAVE_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
STUDIO_KEY = "studio"  # header key holding AdapterMeta as JSON
PEFT_KEY = "lora_adapter_metadata"  # header key diffusers' load_lora_weights reads LoraConfig kwargs from
_PICKLE_SUFFIXES = {".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle"}
_KOHYA_BASE = {"sdxl": "sdxl_base_v1-0", "sd15": "sd_v1"}
# pivotal tuning's token embeddings: written beside the adapter, in NAME_emb.safetensors, as diffusers' advanced
# DreamBooth script writes them (``clip_l``, ``clip_g``: one token's vectors for each encoder; its name in the header),
# so the LoRA file stays one that stock loaders take (diffusers refuses a LoRA file with other keys); several tokens
# (a merged adapter) are keyed ``TOKEN.clip_l``. Read also from kohya/A1111 files that bundle them:
# ``bundle_emb.TOKEN.clip_l`` / ``.clip_g``, ``bundle_emb.TOKEN.string_to_param.*`` for SD1.x.
BUNDLE = "bundle_emb."
EMB_SUFFIX = "_emb.safetensors"
_ENCODER_KEYS = {"text_encoder": "clip_l", "text_encoder_2": "clip_g"}
_BUNDLE_NAMES = {"clip_l": "text_encoder", "clip_g": "text_encoder_2", "string_to_param.*": "text_encoder"}


def embeddings_path(path: str | Path) -> Path:
    """Where the token embeddings of the adapter file ``path`` are kept: ``NAME_emb.safetensors`` beside it."""
    path = Path(path)
    return path.with_name(path.name.removesuffix(".safetensors") + EMB_SUFFIX)


def _embedding_tensors(embeddings: dict[str, dict[str, torch.Tensor]]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    if len(embeddings) == 1:
        (token, per), = embeddings.items()
        return {_ENCODER_KEYS[c]: v for c, v in per.items()}, {"token": token}
    return ({f"{t}.{_ENCODER_KEYS[c]}": v for t, per in embeddings.items() for c, v in per.items()},
            {"tokens": json.dumps(sorted(embeddings))})


def _vectors(value: torch.Tensor) -> torch.Tensor:
    """An embedding as ``(vectors, width)`` (A1111's files may hold one vector as ``(width,)``)."""
    return value if value.ndim == 2 else value.reshape(-1, value.shape[-1])


def _read_embeddings(path: Path) -> dict[str, dict[str, torch.Tensor]]:
    header, tensors = _header(path), load_file(str(path))
    out: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        token, _, encoder = key.rpartition(".")
        token = token or header.get("token", "")
        if encoder not in ("clip_l", "clip_g") or not token:
            raise ValueError(f"{path}: key {key!r} is not a token embedding (clip_l, clip_g, or TOKEN.clip_l with"
                             " several tokens; one token is named in the header)")
        out.setdefault(token, {})[_BUNDLE_NAMES[encoder]] = _vectors(value)
    return out


def _split_bundles(tensors: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    """Take the bundled embeddings out of ``tensors``: ``{token: {component: (vectors, width)}}``."""
    out: dict[str, dict[str, torch.Tensor]] = {}
    for key in [k for k in tensors if k.startswith(BUNDLE)]:
        token, _, rest = key[len(BUNDLE):].partition(".")
        if rest not in _BUNDLE_NAMES:
            raise ValueError(f"unexpected key {key!r}: a bundled embedding is {BUNDLE}TOKEN.clip_l, .clip_g or .string_to_param.*")
        out.setdefault(token, {})[_BUNDLE_NAMES[rest]] = _vectors(tensors.pop(key))
    return out


def family_layout(family: str) -> UNetLayout:
    return SD15_LAYOUT if family == "sd15" else SDXL_LAYOUT


def _refuse_pickle(path: Path) -> None:
    if path.suffix.lower() in _PICKLE_SUFFIXES:
        raise ValueError(f"{path}: pickle files ({path.suffix}) are refused, they can run code when loaded;"
                         " convert the adapter to .safetensors")
    if path.is_file():
        with path.open("rb") as f:
            head = f.read(9)
        # safetensors: an 8-byte header length, then the JSON header's "{"
        is_safetensors = len(head) == 9 and head[8:9] == b"{"
        if not is_safetensors and (head[:1] == b"\x80" or head[:2] == b"PK"):  # pickle protocol / torch zip
            raise ValueError(f"{path}: this is a pickle/torch archive, not safetensors; refused")


def _header(path: Path) -> dict[str, str]:
    try:
        with safe_open(str(path), framework="pt") as f:
            return dict(f.metadata() or {})
    except Exception as e:  # safetensors raises its own error types for corrupt headers
        raise ValueError(f"{path}: not a readable safetensors file ({e})") from None


# --- reading -------------------------------------------------------------------------------------


def _peft_value(patterns: dict, name: str, default):
    """A peft ``rank_pattern``/``alpha_pattern`` lookup: a pattern matches a whole trailing path."""
    import re

    for pattern, value in patterns.items():
        if re.fullmatch(rf"(.*\.)?(?:{pattern})", name):
            return value
    return default


def _from_diffusers(tensors: dict[str, torch.Tensor], configs: dict[str, dict]) -> dict[str, LoraWeights]:
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        for a, b in ((".lora_A.weight", "down"), (".lora_B.weight", "up"),
                     (".lora.down.weight", "down"), (".lora.up.weight", "up")):
            if key.endswith(a):
                pairs.setdefault(key[: -len(a)], {})[b] = value
                break
        else:
            if not key.endswith(".alpha"):
                raise ValueError(f"unexpected key {key!r}: not a LoRA weight in the diffusers/peft layout")
    modules = {}
    for name, pair in pairs.items():
        if set(pair) != {"down", "up"}:
            raise ValueError(f"module {name!r} lacks its {'up' if 'down' in pair else 'down'} weight")
        rank = pair["down"].shape[0]
        component, _, path = name.partition(".")
        config = configs.get(component, {})
        if config.get("use_dora"):
            raise ValueError("DoRA adapters are not supported (only plain LoRA weights)")
        if f"{name}.alpha" in tensors:
            alpha = float(tensors[f"{name}.alpha"])
        else:
            r = _peft_value(config.get("rank_pattern") or {}, path, config.get("r", rank))
            alpha = float(_peft_value(config.get("alpha_pattern") or {}, path, config.get("lora_alpha", r)))
            if config.get("use_rslora"):  # scale alpha/sqrt(r) written as alpha'/r
                alpha = alpha * rank**0.5
        modules[name] = LoraWeights(pair["down"], pair["up"], alpha)
    return modules


def _from_kohya(tensors: dict[str, torch.Tensor], family: str) -> dict[str, LoraWeights]:
    layout, modules = family_layout(family), {}
    names = {k.split(".", 1)[0] for k in tensors}
    for name in sorted(names):
        try:
            down, up = tensors[f"{name}.lora_down.weight"], tensors[f"{name}.lora_up.weight"]
        except KeyError:
            raise ValueError(f"kohya module {name!r} lacks lora_down/lora_up weights (LoCon/LoHa/LoKr are not supported)") from None
        alpha = float(tensors[f"{name}.alpha"]) if f"{name}.alpha" in tensors else down.shape[0]
        modules[canonical_from_kohya(name, layout)] = LoraWeights(down, up, alpha)
    return modules


def _detect_family(header: dict[str, str], modules_hint: list[str]) -> str:
    if STUDIO_KEY in header:
        return json.loads(header[STUDIO_KEY]).get("family", "sdxl")
    base = header.get("ss_base_model_version", "")
    if base.startswith("sd_v1") or base.startswith("sd_v2"):
        return "sd15"
    if base.startswith("sdxl"):
        return "sdxl"
    if any(k.startswith("lora_te_") for k in modules_hint):  # kohya's single SD1.x text encoder
        return "sd15"
    return "sdxl"


def load_adapter(path: str | Path) -> Adapter:
    """Read an adapter from a ``.safetensors`` file (diffusers/peft or kohya keys) or a PEFT folder.

    A PEFT folder (``adapter_model.safetensors`` + ``adapter_config.json``) holds one model's
    adapter; its modules are put on the UNet unless their names are CLIP text-encoder names.
    """
    path = Path(path)
    if path.is_dir():
        return _load_peft_folder(path)
    _refuse_pickle(path)
    if not path.is_file():
        raise FileNotFoundError(f"adapter file not found: {path}")
    if path.suffix != ".safetensors":
        raise ValueError(f"{path}: adapter files must be .safetensors (or a PEFT folder)")
    header = _header(path)
    tensors = load_file(str(path))
    embeddings = _split_bundles(tensors)
    if not tensors:
        raise ValueError(f"{path}: holds no LoRA tensors")
    if embeddings_path(path).is_file():
        embeddings.update(_read_embeddings(embeddings_path(path)))
    family = _detect_family(header, list(tensors))
    meta = AdapterMeta.from_dict(json.loads(header[STUDIO_KEY])) if STUDIO_KEY in header else AdapterMeta(family=family)
    if any(k.startswith("lora_") for k in tensors):
        modules = _from_kohya(tensors, family)
    else:
        flat = json.loads(header.get(PEFT_KEY, "{}"))
        configs = {c: {k[len(c) + 1:]: v for k, v in flat.items() if k.startswith(c + ".")} for c in COMPONENTS}
        modules = _from_diffusers(tensors, configs)
    if meta.extra.get("pivotal") and not embeddings:
        raise ValueError(f"{path} was trained with --pivotal, but its token embeddings ({embeddings_path(path).name}, kept"
                         " beside it) are missing; copy that file next to it")
    return Adapter(modules, meta, embeddings)


def _load_peft_folder(folder: Path) -> Adapter:
    weights, config_path = folder / "adapter_model.safetensors", folder / "adapter_config.json"
    if not weights.is_file() or not config_path.is_file():
        bins = [p.name for p in folder.glob("adapter_model.bin")]
        hint = " (adapter_model.bin is a pickle and is refused)" if bins else ""
        raise FileNotFoundError(f"{folder} is not a PEFT adapter folder: it needs adapter_model.safetensors and adapter_config.json{hint}")
    config = json.loads(config_path.read_text())
    if config.get("peft_type", "LORA") != "LORA":
        raise ValueError(f"{config_path}: peft_type {config.get('peft_type')!r} is not supported (only LORA)")
    tensors = {}
    for key, value in load_file(str(weights)).items():
        key = key.removeprefix("base_model.model.")
        component = "text_encoder" if key.startswith("text_model.") else "unet"
        tensors[f"{component}.{key}"] = value
    components = {k.split(".", 1)[0] for k in tensors}
    return Adapter(_from_diffusers(tensors, {c: config for c in components}), AdapterMeta())


# --- writing -------------------------------------------------------------------------------------


def _peft_config(modules: dict[str, LoraWeights]) -> dict:
    """LoraConfig kwargs that reproduce every module's rank and alpha under peft's pattern rules.

    peft matches names as trailing paths, so text-encoder names drop their ``text_model.`` level:
    they then match CLIP text models with it (transformers 4, or with a projection) and without.
    """
    modules = {k.removeprefix("text_model."): w for k, w in modules.items()}
    r = Counter(w.rank for w in modules.values()).most_common(1)[0][0]
    alpha = Counter(w.alpha for w in modules.values()).most_common(1)[0][0]
    return {
        "r": r,
        "lora_alpha": alpha,
        "target_modules": sorted(modules),
        "rank_pattern": {k: w.rank for k, w in modules.items() if w.rank != r},
        "alpha_pattern": {k: w.alpha for k, w in modules.items() if w.alpha != alpha},
    }


def to_state_dict(adapter: Adapter, layout: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The tensors and header of ``adapter`` in ``layout`` (``diffusers`` or ``kohya``)."""
    header = {"format": "pt", STUDIO_KEY: json.dumps(adapter.meta.to_dict(), sort_keys=True)}
    tensors: dict[str, torch.Tensor] = {}
    if layout == "diffusers":
        flat = {}
        for component in adapter.components:
            for k, v in _peft_config(adapter.component(component)).items():
                flat[f"{component}.{k}"] = v
        header[PEFT_KEY] = json.dumps(flat, sort_keys=True)
        for name, w in sorted(adapter.modules.items()):
            tensors[f"{name}.lora_A.weight"] = w.down
            tensors[f"{name}.lora_B.weight"] = w.up
    elif layout == "kohya":
        family = adapter.meta.family
        layout_ = family_layout(family)
        for name, w in sorted(adapter.modules.items()):
            k = kohya_name(name, family, layout_)
            tensors[f"{k}.lora_down.weight"] = w.down
            tensors[f"{k}.lora_up.weight"] = w.up
            tensors[f"{k}.alpha"] = torch.tensor(w.alpha, dtype=torch.float32)
        header.update({"ss_network_module": "networks.lora", "ss_network_dim": str(adapter.meta.rank),
                       "ss_network_alpha": str(Counter(w.alpha for w in adapter.modules.values()).most_common(1)[0][0]),
                       "ss_base_model_version": _KOHYA_BASE.get(family, family)})
    else:
        raise ValueError(f"unknown layout {layout!r}; choose one of {', '.join(LAYOUTS)}")
    return {k: v.contiguous() for k, v in tensors.items()}, header


def save_adapter(adapter: Adapter, path: str | Path, layout: str = "diffusers", dtype: str | None = None) -> Path:
    """Write ``adapter`` as safetensors in ``layout``, atomically (temp file, then rename); ``dtype`` (``fp32``,
    ``fp16``, ``bf16``): the downs and ups written in that precision (``None``: as they are)."""
    path = Path(path)
    if path.suffix != ".safetensors":
        raise ValueError(f"{path}: adapter files are written as .safetensors")
    if not adapter.modules:
        raise ValueError("the adapter has no modules; nothing to write")
    if dtype is not None and dtype not in SAVE_DTYPES:
        raise ValueError(f"precision {dtype!r} is not one adapters are written in; accepted: {', '.join(SAVE_DTYPES)}")
    tensors, header = to_state_dict(adapter, layout)
    if dtype is not None:
        tensors = {k: v if k.endswith(".alpha") else v.to(SAVE_DTYPES[dtype]) for k, v in tensors.items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp), metadata=header)
    side = embeddings_path(path)
    if adapter.embeddings:  # both files written whole before either replaces what was there
        vectors, side_header = _embedding_tensors(adapter.embeddings)
        side_tmp = side.with_name(side.name + ".tmp")
        save_file({k: v.contiguous() for k, v in vectors.items()}, str(side_tmp), metadata=side_header)
        side_tmp.replace(side)
    else:  # an earlier adapter's embeddings must not be read with this one
        side.unlink(missing_ok=True)
    tmp.replace(path)
    return path
