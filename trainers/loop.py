"""The one training loop every trainer runs, on accelerate.

A trainer adds only what is its own (see :class:`Trainer`): which modules get LoRA, what a batch
is and what the loss is. The loop owns everything else: LoRA injection (peft), mixed precision,
gradient checkpointing and accumulation, the optimizer (AdamW, 8-bit AdamW where bitsandbytes works, Prodigy), the learning-rate warm-up
and schedule (diffusers'), gradient clipping, Min-SNR loss weighting, the (pseudo-Huber) loss type, the noise offset, input perturbation and timestep bias, checkpoints of the
full state every N steps (safetensors + JSON, atomic), ``--resume latest`` that ends exactly where
an uninterrupted run ends, validation images, TensorBoard, a progress bar, and the final adapter.

Determinism: the examples, noise and timesteps of step ``s`` are drawn for the global batch from
generators seeded by ``(seed, s, micro-batch)``, never from a stream that a resume would have to
replay, and each process takes its slice. So a run killed at any point and resumed gives the same
adapter as one that never stopped, and N processes with batch B train what one process with batch
N*B trains.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from studio.kernels import lora as kernels_lora
from studio.trainers.attention import trainable_lora, use_training_attention
from studio.trainers.pivotal import embeddings
from tqdm.auto import tqdm

from studio.adapters import SAVE_DTYPES, Adapter, AdapterMeta, LoraWeights, save_adapter
from studio.adapters.form import canonical_name
from studio.checkpoint import latest_checkpoint, list_checkpoints, load_checkpoint, save_checkpoint
from studio.families import EMBEDDED_MODEL


def _help(text: str) -> dict:
    return {"help": text}


# --lr-scheduler: diffusers' schedule names ("constant" is theirs with a warm-up)
LR_SCHEDULES = ("constant", "linear", "cosine", "cosine_with_restarts")
# --timestep-bias-strategy: diffusers' SDXL training scripts' names ("earlier": the low-noise end, small t)
TIMESTEP_BIASES = ("none", "earlier", "later", "range")
# --loss-type and --huber-schedule: kohya's sd-scripts' names (scheduled pseudo-Huber loss, Khrapov & Popov 2024)
LOSS_TYPES = ("l2", "huber", "smooth_l1")
OPTIMIZERS = ("adamw", "adamw8bit", "prodigy")
HUBER_SCHEDULES = ("snr", "exponential", "constant")


@dataclass
class TrainConfig:
    """Knobs every trainer shares (each trainer's config adds its own)."""

    model: str = field(default=str(EMBEDDED_MODEL), metadata=_help("Base model: a local diffusers folder."))
    data: str = field(default="", metadata=_help("Folder of training images (any size, RGB/RGBA/greyscale, EXIF-rotated)."))
    output: str = field(default="runs/train", metadata=_help("Run folder: checkpoints, validation images, config, the adapter."))
    resolution: int = field(default=0, metadata=_help("Training size in pixels; 0: the model's native size."))
    aspect_buckets: bool = field(
        default=True,
        metadata=_help(
            "Keep each image's aspect ratio (buckets of about resolution² pixels); off: centre-crop squares."
        ),
    )
    steps: int = field(default=500, metadata=_help("Optimizer steps (500: as diffusers' SDXL DreamBooth-LoRA example)."))
    batch_size: int = field(default=4, metadata=_help("Examples per step and process (before accumulation)."))
    grad_accum: int = field(default=1, metadata=_help("Gradient accumulation: micro-batches per optimizer step."))
    lr: float = field(default=1e-4, metadata=_help("Learning rate (AdamW)."))
    warmup: int = field(default=0, metadata=_help("Linear learning-rate warm-up steps (then --lr-scheduler)."))
    lr_scheduler: str = field(
        default="constant",
        metadata=_help("Learning rate after the warm-up: " + ", ".join(LR_SCHEDULES) + " (diffusers' schedules; all but"
                       " constant decay to 0 at --steps)."),
    )
    lr_cycles: int = field(default=1, metadata=_help("cosine_with_restarts: how many cosine cycles the run holds."))
    snr_gamma: float = field(
        default=0.0,
        metadata=_help("Min-SNR loss weighting (Hang et al. 2023): each example's loss times min(SNR, γ) / SNR"
                       " (ε-prediction) or / (SNR + 1) (v-prediction) at its timestep; 5 is the paper's; 0: off."),
    )
    noise_offset: float = field(
        default=0.0,
        metadata=_help("Noise offset: add this times one normal draw per example and channel to the training noise"
                       " (lets the model shift an image's mean brightness); 0.05-0.1 are usual; 0: off."),
    )
    ip_noise_gamma: float = field(
        default=0.0,
        metadata=_help("Input perturbation (Ning et al. 2023; kohya's --ip_noise_gamma, diffusers' --input_perturbation):"
                       " noise the latents with noise + γ·(a second draw) while the target stays the first noise, against"
                       " the exposure bias of sampling; 0.1 is the paper's; 0: off."),
    )
    multires_noise_iterations: int = field(
        default=0,
        metadata=_help("Multi-resolution (pyramid) noise (kohya's --multires_noise_iterations): add N levels of coarser"
                       " noise to the training noise, level i drawn at 1/r^i of the latents' size (r drawn in [2, 4) per"
                       " level), upsampled and weighted discount^i, the sum rescaled to unit variance per example; lets"
                       " the model change an image's large-scale layout and contrast. 6-10 are usual; 0: off."),
    )
    multires_noise_discount: float = field(
        default=0.3, metadata=_help("With --multires-noise-iterations: each level's weight is this to the level's power.")
    )
    debiased_estimation: bool = field(
        default=False,
        metadata=_help("Debiased estimation loss (Yu et al. 2024; kohya's --debiased_estimation_loss): each example's"
                       " loss times 1/sqrt(SNR) at its timestep (ε-prediction; SNR taken in [0.001, 1000]) or"
                       " 1/sqrt(SNR + 1) (v-prediction; SNR at most 1000), so the low-noise steps, where the loss is"
                       " small, count for less."),
    )
    max_grad_norm: float = field(default=1.0, metadata=_help("Clip the gradients' norm to this; 0: no clipping."))
    scale_weight_norms: float = field(
        default=0.0,
        metadata=_help("Max-norm regularisation (kohya's --scale_weight_norms): after every optimizer step, each LoRA"
                       " layer whose update scale·B·A has a Frobenius norm above this has both its factors scaled down"
                       " to bring it to this, so no layer's update runs away (and adapters mix more evenly); 1 is"
                       " usual; 0: off. Plain LoRA layers only."),
    )
    loss_type: str = field(
        default="l2",
        metadata=_help("The denoising loss: l2 (mean squared error), huber (pseudo-Huber, 2c(sqrt(d² + c²) - c): like"
                       " l2 for small errors, like l1 for large ones, so outlier images pull less), or smooth_l1"
                       " (the same divided by c); kohya's sd-scripts' options."),
    )
    huber_schedule: str = field(
        default="snr",
        metadata=_help("huber/smooth_l1: how c follows the timestep: snr (c + (1 - c) / (1 + σ_t)²: near 1, l2-like, at"
                       " low noise, down to c at high noise), exponential (c^(t/T)), or constant (c)."),
    )
    huber_c: float = field(default=0.1, metadata=_help("huber/smooth_l1: the Huber threshold c (0 to 1; 0.1 is kohya's default)."))
    timestep_bias_strategy: str = field(
        default="none",
        metadata=_help("Draw training timesteps with a bias (diffusers' SDXL scripts' option): earlier (the low-noise"
                       " end: fine detail, texture), later (the noisy end: layout, shape), range (--timestep-bias-begin"
                       " to --timestep-bias-end), or none (uniform)."),
    )
    timestep_bias_multiplier: float = field(
        default=1.0, metadata=_help("How many times likelier the biased timesteps are drawn (1: no bias; 0: only the others).")
    )
    timestep_bias_portion: float = field(
        default=0.25, metadata=_help("earlier/later: the fraction of the timesteps that is biased (0 to 1).")
    )
    timestep_bias_begin: int = field(default=0, metadata=_help("range: the first biased timestep."))
    timestep_bias_end: int = field(default=1000, metadata=_help("range: the biased timesteps end before this one."))
    loraplus_ratio: float = field(
        default=1.0,
        metadata=_help("LoRA+ (Hayou et al. 2024): the up-projections (B) learn at this multiple of the learning rate"
                       " (16 is the paper's; 1: off)."),
    )
    adapter: str = field(
        default="lora", metadata=_help("lora, or singlora (one matrix per layer; exported as a plain LoRA).")
    )
    singlora_ramp: int = field(
        default=0, metadata=_help("SingLoRA's ramp u(t) = min(t/T, 1): T in steps; 0: a tenth of --steps.")
    )
    orthogonal_basis: str = field(
        default="", metadata=_help("SEED:INDEX: fix each LoRA down-projection to slice INDEX of one seeded orthonormal"
                                   " basis per layer and train only the ups (Orthogonal Adaptation): concepts trained with"
                                   " the same SEED and different INDEX merge without interfering.")
    )
    rank: int = field(default=8, metadata=_help("LoRA rank (1-256)."))
    alpha: float = field(default=0.0, metadata=_help("LoRA alpha; 0: equal to the rank (scale 1)."))
    seed: int = field(default=0, metadata=_help("Seed for LoRA init, examples, noise and timesteps."))
    mixed_precision: str = field(default="auto", metadata=_help("no, fp16, bf16, or auto (bf16/fp16 on a GPU, no on a CPU)."))
    gradient_checkpointing: bool = field(default=False, metadata=_help("Recompute activations to save memory."))
    compile: bool = field(
        default=False,
        metadata=_help("torch.compile the UNet for training: faster steps after a one-time compilation (about"
                       " 40 s for the embedded model on a CPU; needs a C++ compiler there) and more memory."),
    )
    compile_backend: str = field(
        default="inductor",
        metadata=_help("torch.compile's backend for --compile: inductor (generated kernels), or another of"
                       " torch._dynamo.list_backends(), e.g. aot_eager (traced, no code generation)."),
    )
    optimizer: str = field(
        default="adamw",
        metadata=_help("adamw; adamw8bit (bitsandbytes, CUDA only; else adamw with a warning); prodigy (Prodigy, which"
                       " finds its own step size: --lr multiplies it, use 1.0)."),
    )
    prodigy_d_coef: float = field(
        default=1.0, metadata=_help("prodigy: scales the step size it estimates (its d_coef; below 1 for a smaller step)."))
    use_8bit_adam: bool = field(default=False, metadata=_help("The same as --optimizer adamw8bit (diffusers' flag)."))
    checkpoint_every: int = field(default=100, metadata=_help("Write the full training state every N steps (0: never)."))
    keep_checkpoints: int = field(default=2, metadata=_help("Checkpoints kept in the run folder."))
    save_adapter_every: int = field(
        default=0, metadata=_help("Also write the adapter as it stands every N steps, adapters/adapter-STEP.safetensors in"
                                  " the run folder, all kept (kohya's --save_every_n_steps; 0: only the final one)."))
    lora_dropout: float = field(
        default=0.0, metadata=_help("Dropout on each LoRA layer's input while training (peft's lora_dropout, ai-toolkit's"
                                    " network dropout; e.g. 0.1 against overfitting a few images); never at sampling;"
                                    " 0: off, below 1. The layers then run peft's own forward, a little slower."))
    ema_decay: float = field(
        default=0.0, metadata=_help("Keep an exponential moving average of the adapter's weights at this decay (e.g. 0.99;"
                                    " ai-toolkit's ema_config, diffusers' EMAModel schedule: min(decay, (1+t)/(10+t)) at"
                                    " update t) and write it, in the final adapter, snapshots and validation images;"
                                    " training goes on from the raw weights; 0: off."))
    save_precision: str = field(
        default="fp32", metadata=_help("Precision the adapter files are written in: fp32, fp16 (half the size; what kohya"
                                       " and ai-toolkit write by default) or bf16; checkpoints stay fp32."))
    init_adapter: str = field(
        default="", metadata=_help("Start from this LoRA file's weights instead of zero (kohya's --network_weights): train"
                                   " an adapter further on new images or settings. Its rank must be --rank; the layers it"
                                   " has must be among those this run trains."))
    validation_every: int = field(default=0, metadata=_help("Save validation images every N steps (0: never)."))
    validation_prompts: list[str] = field(default_factory=list, metadata=_help("Prompts for validation images (repeatable)."))
    tensorboard: bool = field(default=False, metadata=_help("Log losses to TensorBoard in the run folder."))
    resume: str = field(default="", metadata=_help("'latest' or a checkpoint folder to continue from."))

    def check(self) -> None:
        if not 1 <= self.rank <= 256:
            raise ValueError(f"--rank {self.rank} is out of range; accepted: 1 to 256")
        if self.compile:
            import torch._dynamo

            if self.compile_backend not in torch._dynamo.list_backends(exclude_tags=()):
                main = [*torch._dynamo.list_backends(), "aot_eager", "eager"]
                raise ValueError(f"--compile-backend {self.compile_backend!r} is not a torch.compile backend here;"
                                 f" accepted: {', '.join(main)} (or any of torch._dynamo.list_backends(exclude_tags=()))")
        if self.save_adapter_every < 0:
            raise ValueError(f"--save-adapter-every must be 0 (never) or positive, got {self.save_adapter_every}")
        for name in ("steps", "batch_size", "grad_accum"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be a positive integer, got {getattr(self, name)}")
        if self.lr <= 0:
            raise ValueError(f"--lr must be positive, got {self.lr}")
        if self.lr_scheduler not in LR_SCHEDULES:
            raise ValueError(f"--lr-scheduler {self.lr_scheduler!r}; accepted: {', '.join(LR_SCHEDULES)}")
        if self.warmup < 0:
            raise ValueError(f"--warmup must be 0 (none) or positive, got {self.warmup}")
        if self.lr_cycles < 1:
            raise ValueError(f"--lr-cycles must be at least 1, got {self.lr_cycles}")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"--optimizer {self.optimizer!r}; accepted: {', '.join(OPTIMIZERS)}")
        if self.use_8bit_adam and self.optimizer == "prodigy":
            raise ValueError("--use-8bit-adam is --optimizer adamw8bit; it does not go with --optimizer prodigy")
        if self.optimizer == "prodigy" and not 0.1 <= self.lr <= 10:
            raise ValueError(f"--optimizer prodigy finds its own step size and --lr multiplies it: use about 1.0"
                             f" (accepted 0.1 to 10), got {self.lr:g}")
        if self.prodigy_d_coef <= 0:
            raise ValueError(f"--prodigy-d-coef must be positive, got {self.prodigy_d_coef:g}")
        if self.optimizer == "prodigy" and self.loraplus_ratio != 1:
            raise ValueError("--loraplus-ratio does not go with --optimizer prodigy (one step size for every parameter)")
        if self.loraplus_ratio <= 0:
            raise ValueError(f"--loraplus-ratio must be positive (1: off), got {self.loraplus_ratio}")
        if self.loraplus_ratio != 1 and self.adapter == "singlora":
            raise ValueError("--loraplus-ratio works with --adapter lora only (SingLoRA has one matrix per layer)")
        for name in ("snr_gamma", "noise_offset", "ip_noise_gamma", "max_grad_norm", "scale_weight_norms"):
            if getattr(self, name) < 0:
                raise ValueError(f"--{name.replace('_', '-')} must be 0 (off) or positive, got {getattr(self, name)}")
        if self.multires_noise_iterations < 0:
            raise ValueError(f"--multires-noise-iterations must be 0 (off) or positive, got {self.multires_noise_iterations}")
        if not 0 < self.multires_noise_discount <= 1:
            raise ValueError(f"--multires-noise-discount must be above 0 and at most 1, got {self.multires_noise_discount:g}")
        check_timestep_bias(self)
        if self.loss_type not in LOSS_TYPES:
            raise ValueError(f"--loss-type {self.loss_type!r}; accepted: {', '.join(LOSS_TYPES)}")
        if self.huber_schedule not in HUBER_SCHEDULES:
            raise ValueError(f"--huber-schedule {self.huber_schedule!r}; accepted: {', '.join(HUBER_SCHEDULES)}")
        if not 0 < self.huber_c <= 1:
            raise ValueError(f"--huber-c must be above 0 and at most 1, got {self.huber_c}")
        if self.alpha < 0:
            raise ValueError(f"--alpha must be 0 (= rank) or positive, got {self.alpha}")
        if self.adapter not in ("lora", "singlora"):
            raise ValueError(f"--adapter {self.adapter!r}; accepted: lora, singlora")
        if self.orthogonal_basis:
            parse_basis(self.orthogonal_basis)
            if self.adapter != "lora":
                raise ValueError("--orthogonal-basis works with --adapter lora only")
        if self.singlora_ramp < 0:
            raise ValueError(f"--singlora-ramp must be 0 (a tenth of the steps) or positive, got {self.singlora_ramp}")
        if self.mixed_precision not in ("auto", "no", "fp16", "bf16"):
            raise ValueError(f"--mixed-precision {self.mixed_precision!r}; accepted: auto, no, fp16, bf16")
        if self.tensorboard:
            from accelerate.utils import is_tensorboard_available

            if not is_tensorboard_available():
                raise ValueError(
                    "--tensorboard needs TensorBoard: pip install tensorboard (or the lighter tensorboardX)"
                )
        if self.save_precision not in SAVE_DTYPES:
            raise ValueError(f"--save-precision {self.save_precision!r}; accepted: {', '.join(SAVE_DTYPES)}")
        if not 0 <= self.lora_dropout < 1:
            raise ValueError(f"--lora-dropout must be at least 0 (off) and below 1, got {self.lora_dropout:g}")
        if self.lora_dropout and self.adapter != "lora":
            raise ValueError("--lora-dropout works with --adapter lora only")
        if not 0 <= self.ema_decay < 1:
            raise ValueError(f"--ema-decay must be at least 0 (off) and below 1, got {self.ema_decay:g}")
        if self.init_adapter:
            if not Path(self.init_adapter).is_file():
                raise FileNotFoundError(f"--init-adapter {self.init_adapter}: no such file")
            if self.adapter != "lora" or self.orthogonal_basis:
                raise ValueError("--init-adapter starts a plain LoRA from a file's weights; it does not go with"
                                 f" {'--adapter singlora' if self.adapter != 'lora' else '--orthogonal-basis'}")
        if not Path(self.model, "model_index.json").is_file():
            raise FileNotFoundError(f"model folder not found or not a diffusers folder: {self.model}")


@dataclass
class Context:
    """What the loop hands a trainer."""

    cfg: Any
    pipe: Any
    accelerator: Any
    run_dir: Path
    noise_scheduler: Any
    resolution: int
    size_multiple: int = 8  # image sides the model takes: VAE factor x UNet downsampling
    store: dict[str, Any] = field(default_factory=dict)  # the trainer's caches


class Trainer(Protocol):
    name: str

    def prepare(self, ctx: Context) -> None:
        """Load data, fill caches (runs before LoRA is injected, so the base model is clean)."""

    def targets(self, ctx: Context) -> dict[str, list[str]]:
        """Module paths to put LoRA on, per pipeline component."""

    def loss(self, ctx: Context, step: int, micro: int, g: torch.Generator, rng: random.Random) -> torch.Tensor:
        """The loss of one micro-batch."""

    def metadata(self, ctx: Context) -> dict[str, Any]:
        """Trainer-specific adapter metadata (token, class noun, dataset summary…)."""


def _mixed_precision(choice: str) -> str:
    if choice != "auto":
        return choice
    if torch.cuda.is_available():
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "no"


def _optimizer(params, cfg: TrainConfig):
    name = "adamw8bit" if cfg.use_8bit_adam else cfg.optimizer
    if name == "prodigy":
        from prodigyopt import Prodigy

        scales = {gr["lr_scale"] for gr in params if isinstance(gr, dict)}
        if len(scales) > 1:  # Prodigy refuses groups at different rates mid-step; say so before training
            raise ValueError("--optimizer prodigy takes one learning rate for every parameter; this trainer's groups"
                             f" step at {', '.join(f'{x:g}' for x in sorted(scales))} x --lr (--text-encoder-lr, --style-lr-scale): set"
                             " them equal or use --optimizer adamw")

        # diffusers' example script's Prodigy settings (bias correction, safeguarded warm-up, decoupled decay)
        return Prodigy(params, lr=cfg.lr, weight_decay=1e-4, decouple=True, use_bias_correction=True,
                       safeguard_warmup=True, d_coef=cfg.prodigy_d_coef)
    if name == "adamw8bit":
        try:
            import bitsandbytes as bnb

            if torch.cuda.is_available():
                return bnb.optim.AdamW8bit(params, lr=cfg.lr, weight_decay=1e-4)
        except ImportError:
            pass
        import warnings

        warnings.warn("--optimizer adamw8bit needs bitsandbytes and a CUDA GPU; using plain AdamW", stacklevel=2)
    # fused: one kernel for all parameters instead of a dozen ops each (the embedded model's LoRA: 5.1 -> 1.7 ms a step)
    flat = [p for gr in params for p in gr["params"]] if params and isinstance(params[0], dict) else params
    fused = all(p.device.type in ("cpu", "cuda") for p in flat)
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=1e-4, fused=fused)


def parse_basis(text: str) -> tuple[int, int]:
    """``SEED:INDEX`` of ``--orthogonal-basis``."""
    seed, sep, index = text.partition(":")
    try:
        if not sep:
            raise ValueError
        seed_i, index_i = int(seed), int(index)
        if index_i < 0:
            raise ValueError
    except ValueError:
        raise ValueError(f"--orthogonal-basis {text!r}: give SEED:INDEX with whole numbers, INDEX >= 0, e.g. 7:0") from None
    return seed_i, index_i


def orthonormal_rows(d_in: int, n: int, seed: int) -> torch.Tensor:
    """``n`` orthonormal rows of length ``d_in`` (a seeded random basis: the same on resume, and the same
    for every run that uses the seed)."""
    if n > d_in:
        raise ValueError(f"an orthonormal basis of {n} rows needs at least {n} inputs; the layer has {d_in}"
                         " (lower the rank or the basis index)")
    g = torch.Generator().manual_seed(seed)
    # drawn row by row, so the first k rows are the same whatever n: slices of one basis agree across runs
    q, _ = torch.linalg.qr(torch.randn(n, d_in, generator=g).T)
    return q.T.contiguous()


def fix_orthogonal_downs(model: torch.nn.Module, rank: int, seed: int, index: int) -> None:
    """Orthogonal Adaptation: every peft LoRA down-projection in ``model`` becomes rows
    ``index*rank .. (index+1)*rank`` of the layer's seeded orthonormal basis, frozen."""
    for module in model.modules():
        lora_a = getattr(module, "lora_A", None)
        if not isinstance(lora_a, torch.nn.ModuleDict) or "default" not in lora_a:
            continue
        layer = lora_a["default"]
        if not isinstance(layer, torch.nn.Linear):
            continue
        rows = orthonormal_rows(layer.in_features, (index + 1) * rank, seed)[index * rank :]
        with torch.no_grad():
            layer.weight.copy_(rows.to(layer.weight))
        layer.weight.requires_grad_(False)


def _lora_linear_forward(layer, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    """A peft ``lora.Linear``'s forward through :func:`studio.kernels.lora.lora_linear` while the layer is in the
    state training leaves it in (:func:`studio.trainers.attention.trainable_lora`); peft's own forward otherwise.
    The same sum in fewer ops (``bench/lora_step.py``: with fused AdamW, 1.06x on a training step of the embedded
    model)."""
    lora = None if args or kwargs else trainable_lora(layer)
    if lora is None or (not torch.is_autocast_enabled(x.device.type) and x.dtype != layer.base_layer.weight.dtype):
        return type(layer).forward(layer, x, *args, **kwargs)
    base = layer.base_layer
    return kernels_lora.lora_linear(x, base.weight, base.bias, *lora)


def use_lora_linear(model: torch.nn.Module) -> None:
    """Route every peft ``lora.Linear`` of ``model`` through :func:`_lora_linear_forward` (an instance attribute:
    the layers, their parameters and their state-dict names stay peft's)."""
    import types

    from peft.tuners.lora import Linear

    for module in model.modules():
        if type(module) is Linear:
            module.forward = types.MethodType(_lora_linear_forward, module)


def inject_lora(ctx: Context, targets: dict[str, list[str]], rank: int, alpha: float) -> list[torch.nn.Parameter]:
    """The adapter on the target modules: peft LoRA (B starts at zero: the first step is the base
    model) or, with ``--adapter singlora``, one SingLoRA matrix per module (its ramp starts at 0)."""
    from peft import LoraConfig, inject_adapter_in_model
    from studio.trainers import singlora

    params = []
    kind = getattr(ctx.cfg, "adapter", "lora")
    if kind == "singlora":
        ctx.store["clock"] = singlora.Clock(ctx.cfg.singlora_ramp or max(1, ctx.cfg.steps // 10))
    for component, paths in targets.items():
        if not paths:
            continue
        model = getattr(ctx.pipe, component)
        model.requires_grad_(False)
        if kind == "singlora":
            for path in paths:
                singlora.attach(model.get_submodule(path), rank, alpha, ctx.store["clock"])
        else:
            # peft directly, not ``model.add_adapter``: transformers' integration refuses peft releases older than
            # the one it was built against (transformers 5.24 wants peft 0.22, which the registry may not have)
            inject_adapter_in_model(LoraConfig(r=rank, lora_alpha=alpha, target_modules=paths, init_lora_weights=True,
                                               lora_dropout=getattr(ctx.cfg, "lora_dropout", 0.0)), model)
            use_lora_linear(model)
        if getattr(ctx.cfg, "orthogonal_basis", ""):
            fix_orthogonal_downs(model, rank, *parse_basis(ctx.cfg.orthogonal_basis))
            params += [p for n, p in model.named_parameters() if "lora_" in n and "lora_A" not in n]
        else:
            params += [p for n, p in model.named_parameters() if "lora_" in n]
    for p in params:
        p.requires_grad_(True)
    return params


def peft_layers(pipe, components: list[str]):
    """``(canonical name, layer)`` of every peft LoRA layer (adapter ``default``) in ``pipe``'s ``components``."""
    for component in components:
        model = getattr(pipe, component)
        for path, module in model.named_modules():
            if hasattr(module, "lora_A") and "default" in getattr(module, "lora_A", {}):
                yield canonical_name(component, model, path), module


def init_from_adapter(ctx: Context, components: list[str], path: str | Path) -> int:
    """Set the run's peft LoRA layers to the adapter file ``path``'s weights, so that each layer's update
    ``scale · B A`` is the file's (B rescaled where the run's alpha differs from the file's); layers the file lacks stay
    at zero. Refuses, by name, a file for another base model, a layer of another rank, and a layer this run does not
    train. Returns how many layers were set."""
    from studio.adapters import load_adapter
    from studio.plugin import check_base

    adapter = load_adapter(path)
    what = f"--init-adapter {path}"
    check_base(ctx.pipe, adapter, what, ctx.store["base_hash"])
    layers = dict(peft_layers(ctx.pipe, components))
    extra = sorted(set(adapter.modules) - set(layers))
    if extra:
        hint = "; add --train-text-encoder" if any(not k.startswith("unet.") for k in extra) else ""
        raise ValueError(f"{what} has LoRA on {extra[0]} ({len(extra)} layer(s) in all), which this run does not"
                         f" train; name those layers in --lora-layers{hint}")
    for key, weights in adapter.modules.items():
        module = layers[key]
        down, up = module.lora_A["default"].weight, module.lora_B["default"].weight
        if weights.down.shape != down.shape or weights.up.shape != up.shape:
            raise ValueError(f"{what}: layer {key} has rank {weights.rank} (down {tuple(weights.down.shape)}), this run's"
                             f" is {down.shape[0]} (down {tuple(down.shape)}); use --rank {weights.rank}, or"
                             f" `studio resize` the file to rank {down.shape[0]}")
        with torch.no_grad():
            down.copy_(weights.down.to(down.dtype))
            up.copy_((weights.up.float() * (weights.scale / module.scaling["default"])).to(up.dtype))
    pivotal = ctx.store.get("pivotal") or {}
    if adapter.embeddings and not pivotal:
        raise ValueError(f"{what} was trained with --pivotal (it embeds {', '.join(sorted(adapter.embeddings))}); add"
                         " --pivotal, so that its tokens are read as it learned them")
    for token, per in pivotal.items():  # the file's embeddings of this run's tokens are where they start
        for component, param in per.items():
            vectors = adapter.embeddings.get(token, {}).get(component)
            if vectors is not None:
                if vectors.shape != param.shape:
                    raise ValueError(f"{what}: its embedding of {token!r} for {component} is {tuple(vectors.shape)}, this"
                                     f" run's is {tuple(param.shape)}")
                with torch.no_grad():
                    param.copy_(vectors.to(param.dtype))
    return len(adapter.modules)


@torch.no_grad()
def cap_update_norms(layers, max_norm: float) -> tuple[int, float]:
    """Max-norm regularisation of peft LoRA ``layers``: each layer whose update ``scaling · B A`` (convolutions'
    factors flattened) has a Frobenius norm above ``max_norm`` gets both factors times ``sqrt(max_norm / norm)``.
    The norm comes from the factors' rank-size Gram matrices, ``‖B A‖² = Σ (BᵀB) ∘ (A Aᵀ)``, not from the full
    update, and stays on the layers' device (one host read per call, for the returned figures). Returns how many
    layers were scaled and the mean norm before scaling."""
    norms = []
    for module in layers:
        down, up = module.lora_A["default"].weight, module.lora_B["default"].weight
        a, b = down.flatten(1).float(), up.flatten(1).float()
        norm = ((b.T @ b) * (a @ a.T)).sum().clamp_min(0).sqrt() * abs(module.scaling["default"])
        factor = (max_norm / norm.clamp_min(1e-12)).clamp(max=1.0).sqrt()  # 1 where the layer is under the cap
        down.mul_(factor.to(down.dtype))
        up.mul_(factor.to(up.dtype))
        norms.append(norm)
    if not norms:
        return 0, 0.0
    every = torch.stack([n.to(norms[0].device) for n in norms])
    return int((every > max_norm).sum()), float(every.mean())


def extract_adapter(pipe, components: list[str], meta: AdapterMeta, clock=None) -> Adapter:
    """The trained adapter layers (peft LoRA, or SingLoRA at the clock's ramp value), as the
    studio's adapter form."""
    from studio.trainers import singlora

    modules = {}
    for component in components:
        model = getattr(pipe, component)
        for path, module in model.named_modules():
            if hasattr(module, singlora.PARAM):
                d_out, d_in = module.weight.shape
                A = getattr(module, singlora.PARAM)
                modules[canonical_name(component, model, path)] = singlora.to_lora(
                    A, d_out, d_in, alpha=module._singlora_alpha, u=clock.u
                )
    for name, module in peft_layers(pipe, components):
        down = module.lora_A["default"].weight.detach().float().cpu().clone()
        up = module.lora_B["default"].weight.detach().float().cpu().clone()
        modules[name] = LoraWeights(down, up, module.scaling["default"] * down.shape[0])
    return Adapter(modules, meta)


def adapter_at(trainer: Trainer, ctx: Context, components: list[str], step: int) -> Adapter:
    """The adapter as it stands after ``step`` optimizer steps, with its metadata (SingLoRA's ramp at that step)."""
    cfg, pipe = ctx.cfg, ctx.pipe
    meta = AdapterMeta(family="sdxl" if hasattr(pipe, "text_encoder_2") else "sd15", base_model=Path(cfg.model).name,
                       trainer=trainer.name, rank=cfg.rank, steps=step, **trainer.metadata(ctx))
    meta.base_hash = ctx.store["base_hash"]
    clock = ctx.store.get("clock")
    if clock is not None:
        clock.step = step  # the ramp's value after that step
        meta.extra.update(adapter="singlora", singlora_ramp=clock.ramp_steps)
    if cfg.orthogonal_basis:
        meta.extra.update(orthogonal_basis=cfg.orthogonal_basis)
    if cfg.init_adapter:
        meta.extra.update(init_adapter=Path(cfg.init_adapter).name)
    if cfg.ema_decay:
        meta.extra.update(ema_decay=cfg.ema_decay)
    pivotal = ctx.store.get("pivotal")
    if pivotal:
        meta.extra.update(pivotal=True)
    adapter = trainer.extract(ctx, components, meta) if hasattr(trainer, "extract") else extract_adapter(pipe, components, meta, clock)
    if pivotal:
        adapter.embeddings = embeddings(pivotal)
    return adapter


def lora_state(pipe, components: list[str]) -> dict[str, torch.Tensor]:
    return {f"{c}.{n}": p for c in components for n, p in getattr(pipe, c).named_parameters() if "lora_" in n}


def trained_state(ctx: Context, components: list[str]) -> dict[str, torch.Tensor]:
    """Every trained tensor by name, as a checkpoint keeps it: the LoRA layers' and, with --pivotal, the tokens'
    embeddings (``pivotal.TOKEN.text_encoder``, ``pivotal.TOKEN.text_encoder_2``)."""
    pivotal = ctx.store.get("pivotal") or {}
    return {**lora_state(ctx.pipe, components), **{f"pivotal.{t}.{c}": p for t, per in pivotal.items() for c, p in per.items()}}


def shard(ctx: Context, n_global: int) -> slice:
    """This process's share of a global batch of ``n_global`` examples."""
    acc = ctx.accelerator
    per = n_global // acc.num_processes
    return slice(acc.process_index * per, (acc.process_index + 1) * per)


def denoise_loss(ctx: Context, latents: torch.Tensor, cond: dict[str, torch.Tensor], g: torch.Generator,
                 reduction: str = "mean") -> torch.Tensor:
    """The standard diffusion loss on this process's share of the global batch ``latents``.

    Noise and timesteps are drawn for the whole global batch from ``g`` (seeded by the step), then
    sliced: N processes with batch B compute exactly what one process with batch N*B computes.
    ``cond`` is already this process's share.
    """
    return denoise_losses(ctx, [(latents, cond)], g, reduction)[0]


def denoise_losses(ctx: Context, parts: list[tuple[torch.Tensor, dict[str, Any]]], g: torch.Generator,
                   reduction: str = "mean", before_pass=None, teacher=None) -> list[torch.Tensor]:
    """:func:`denoise_loss` of several global batches (e.g. instance and prior examples), drawn from
    ``g`` in order; those with the same latent size go through the UNet as one batch.
    ``before_pass(indices, embeds)`` is called before each UNet pass with the parts it concatenates, in order, and
    the prompt embeddings the pass is given. ``teacher(indices, noisy, t, embeds, added)``, if given, returns the
    target of that pass (run without gradients, before ``before_pass``) in place of the noise (distillation): one
    tensor for the whole pass, or a dict ``{part index: target}`` for only some of its parts. Timesteps follow
    ``--timestep-bias-*`` (:func:`timestep_weights`), the same for every part."""
    sched = ctx.noise_scheduler
    if sched.config.prediction_type not in ("v_prediction", "epsilon"):
        raise ValueError(f"prediction type {sched.config.prediction_type!r} is not supported (epsilon, v_prediction)")
    device = ctx.accelerator.device
    offset, gamma = getattr(ctx.cfg, "noise_offset", 0.0), getattr(ctx.cfg, "snr_gamma", 0.0)
    perturb = getattr(ctx.cfg, "ip_noise_gamma", 0.0)
    levels, discount = getattr(ctx.cfg, "multires_noise_iterations", 0), getattr(ctx.cfg, "multires_noise_discount", 0.3)
    debiased = getattr(ctx.cfg, "debiased_estimation", False)
    prepared = []
    if "timestep_weights" not in ctx.store:  # once per run, not per step
        ctx.store["timestep_weights"] = (timestep_weights(ctx.cfg, sched.config.num_train_timesteps)
                                         if hasattr(ctx.cfg, "timestep_bias_strategy") else None)
    weights = ctx.store["timestep_weights"]
    for latents, cond in parts:
        noise = torch.randn(latents.shape, generator=g)
        if weights is None:
            t = torch.randint(0, sched.config.num_train_timesteps, (latents.shape[0],), generator=g)
        else:
            t = torch.multinomial(weights, latents.shape[0], replacement=True, generator=g)
        if offset:  # drawn after the noise and timesteps, which stay those of a run without it
            noise = noise + offset * torch.randn((*latents.shape[:2], *[1] * (latents.dim() - 2)), generator=g)
        # input perturbation: what noises the latents (the target stays ``noise``), drawn after the noise, timesteps
        # and offset, which stay those of a run without it
        extra = perturb * torch.randn(latents.shape, generator=g) if perturb else None
        if levels:  # drawn after the perturbation, so the draws before stay those of a run without it
            noise = multires_noise(noise, levels, discount, g)
        applied = noise + extra if perturb else noise
        part = shard(ctx, latents.shape[0])
        x0, t = latents[part].to(device), t[part].to(device)
        noise = noise[part].to(device, latents.dtype)
        applied = applied[part].to(device, latents.dtype) if perturb else noise
        target = sched.get_velocity(x0, noise, t) if sched.config.prediction_type == "v_prediction" else noise
        prepared.append((sched.add_noise(x0, applied, t), t, cond, target))
    unet = ctx.store["unet"]
    losses: list[torch.Tensor | None] = [None] * len(parts)
    by_size: dict[tuple[int, ...], list[int]] = {}
    for i, (noisy, *_rest) in enumerate(prepared):
        by_size.setdefault(tuple(noisy.shape[1:]), []).append(i)
    for members in by_size.values():
        noisy = torch.cat([prepared[i][0] for i in members])
        t = torch.cat([prepared[i][1] for i in members])
        embeds = torch.cat([prepared[i][2]["embeds"] for i in members])
        added = None
        if prepared[members[0]][2].get("added") is not None:
            added = {k: torch.cat([prepared[i][2]["added"][k] for i in members]) for k in prepared[members[0]][2]["added"]}
        taught = None
        if teacher is not None:
            with torch.no_grad():
                taught = teacher(members, noisy, t, embeds, added)
        if before_pass is not None:
            before_pass(members, embeds)
        pred = unet(noisy, t, embeds, added_cond_kwargs=added).sample
        start = 0
        for i in members:
            n_i = len(prepared[i][3])
            if isinstance(taught, dict):
                target = taught.get(i, prepared[i][3])
            else:
                target = prepared[i][3] if taught is None else taught[start : start + n_i]
            piece = pred[start : start + n_i]
            start += n_i
            loss = element_losses(ctx.cfg, sched, piece.float(), target.float(), prepared[i][1])
            dims = tuple(range(1, loss.dim()))
            weight = prepared[i][2].get("loss_weight")  # --masked-loss: a weighted mean over each example's pixels
            if weight is None:
                loss = loss.mean(dim=dims)
            else:
                weight = weight.to(loss.device)
                loss = (loss * weight).mean(dim=dims) / weight.mean(dim=dims).clamp_min(1e-8)
            if gamma:
                loss = loss * min_snr_weights(sched, prepared[i][1], gamma)
            if debiased:
                loss = loss * debiased_weights(sched, prepared[i][1])
            losses[i] = loss if reduction == "none" else loss.mean()
    return losses  # type: ignore[return-value]


def is_up(name: str) -> bool:
    """Whether parameter ``name`` is a LoRA up-projection (B): peft's ``lora_B``, the pair layers' ``lora_*_up``."""
    return "lora_B" in name or name.endswith("_up")


def scaled_groups(groups: list[dict], chosen: set[int], ratio: float) -> list[dict]:
    """``groups`` (each ``{"params", "lr_scale"}``) with each one's ``chosen`` parameters (by ``id``) moved to a group
    of their own at ``ratio`` times its ``lr_scale`` (LoRA+: the up-projections; --text-encoder-lr: the text
    encoders' LoRA); empty groups are left out."""
    out = []
    for group in groups:
        rest = [p for p in group["params"] if id(p) not in chosen]
        mine = [p for p in group["params"] if id(p) in chosen]
        out += [{"params": ps, "lr_scale": group["lr_scale"] * k} for ps, k in ((rest, 1.0), (mine, ratio)) if ps]
    return out


def lr_factor(cfg: TrainConfig):
    """``step -> `` the multiple of ``--lr`` that optimizer step ``step`` (0-based) uses: a linear warm-up that
    reaches the full rate at step ``warmup - 1`` (``(step + 1) / warmup``), then diffusers' schedule
    ``--lr-scheduler`` (its factor at ``step``: 1 at the warm-up's end, decaying towards 0 at ``--steps``)."""
    from diffusers.optimization import get_scheduler

    name = "constant_with_warmup" if cfg.lr_scheduler == "constant" else cfg.lr_scheduler
    dummy = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)  # only the schedule's lambda is used
    schedule = get_scheduler(name, dummy, num_warmup_steps=cfg.warmup, num_training_steps=cfg.steps,
                             num_cycles=cfg.lr_cycles).lr_lambdas[0]
    return lambda step: float(schedule(step + 1) if step < cfg.warmup else schedule(step))


def check_timestep_bias(cfg: TrainConfig) -> None:
    """Refuse a bad ``--timestep-bias-*`` setting, naming the flag and what it accepts."""
    if cfg.timestep_bias_strategy not in TIMESTEP_BIASES:
        raise ValueError(f"--timestep-bias-strategy {cfg.timestep_bias_strategy!r}; accepted: {', '.join(TIMESTEP_BIASES)}")
    if cfg.timestep_bias_multiplier < 0:
        raise ValueError(f"--timestep-bias-multiplier must be 0 or positive (1: no bias), got {cfg.timestep_bias_multiplier}")
    if not 0 < cfg.timestep_bias_portion <= 1:
        raise ValueError(f"--timestep-bias-portion must be above 0 and at most 1, got {cfg.timestep_bias_portion}")
    if not 0 <= cfg.timestep_bias_begin < cfg.timestep_bias_end <= 1000:
        raise ValueError(f"--timestep-bias-begin {cfg.timestep_bias_begin} and --timestep-bias-end {cfg.timestep_bias_end}:"
                         " need 0 <= begin < end <= 1000 (the training schedule's timesteps)")
    timestep_weights(cfg, 1000)  # a multiplier of 0 over every timestep leaves none to draw


def timestep_weights(cfg: TrainConfig, num_timesteps: int) -> torch.Tensor | None:
    """The probability of drawing each training timestep under ``cfg``'s timestep bias, as diffusers' SDXL scripts
    weight them: the biased timesteps' weight times ``--timestep-bias-multiplier``, normalised. ``None``: uniform (no
    bias), drawn as without the option."""
    strategy, multiplier = cfg.timestep_bias_strategy, float(cfg.timestep_bias_multiplier)
    if strategy == "none" or multiplier == 1:
        return None
    n = max(1, int(cfg.timestep_bias_portion * num_timesteps))
    biased = {"earlier": slice(0, n), "later": slice(num_timesteps - n, num_timesteps),
              "range": slice(int(cfg.timestep_bias_begin), min(int(cfg.timestep_bias_end), num_timesteps))}[strategy]
    weights = torch.ones(num_timesteps, dtype=torch.float64)
    weights[biased] *= multiplier
    if weights.sum() == 0:
        raise ValueError("--timestep-bias-multiplier 0 with every timestep biased leaves none to draw;"
                         " bias a part of them, or give a multiplier above 0")
    return weights / weights.sum()


def huber_thresholds(cfg, sched, t: torch.Tensor) -> torch.Tensor:
    """The pseudo-Huber threshold ``c_t`` of each timestep in ``t`` under ``--huber-schedule`` (kohya's): ``snr``
    ``c + (1 - c) / (1 + σ_t)²`` with ``σ_t = sqrt((1 - ᾱ_t) / ᾱ_t)``, ``exponential`` ``c^(t / T)``, ``constant`` ``c``."""
    c = float(cfg.huber_c)
    if cfg.huber_schedule == "snr":  # float32 throughout (MPS has no float64); ᾱ_t = 0 gives σ_t = inf and c_t = c
        abar = sched.alphas_cumprod.to(t.device, torch.float32)[t]
        return c + (1 - c) / (1 + ((1 - abar) / abar).sqrt()) ** 2
    if cfg.huber_schedule == "exponential":
        return c ** (t.float() / sched.config.num_train_timesteps)
    return torch.full(t.shape, c, device=t.device)


def element_losses(cfg, sched, pred: torch.Tensor, target: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Per-element denoising loss of predictions ``pred`` at timesteps ``t`` under ``--loss-type``: squared error
    (``l2``), or pseudo-Huber with the threshold of :func:`huber_thresholds`, ``2 c (sqrt(d² + c²) - c)`` (``huber``)
    and the same over ``c`` (``smooth_l1``)."""
    kind = getattr(cfg, "loss_type", "l2")
    if kind == "l2":
        return torch.nn.functional.mse_loss(pred, target, reduction="none")
    c = huber_thresholds(cfg, sched, t).view(-1, *[1] * (pred.dim() - 1))
    d2 = (pred - target) ** 2
    loss = 2 * d2 / (torch.sqrt(d2 + c**2) + c)  # = 2(sqrt(d² + c²) - c), without its cancellation for small d
    return loss * c if kind == "huber" else loss


def multires_noise(noise: torch.Tensor, levels: int, discount: float, g: torch.Generator) -> torch.Tensor:
    """``noise`` (examples, ..., H, W) plus ``levels`` coarser noises: level i (1, 2, ...) a normal draw from ``g`` at
    ``max(1, int(size / r_i^i))`` of each of H and W, ``r_i`` drawn uniformly in [2, 4) before it, upsampled bilinearly
    and weighted ``discount^i``; stops after the first level that is one latent wide or high. The sum is rescaled to
    unit standard deviation per example."""
    import torch.nn.functional as F

    h, w = noise.shape[-2:]
    out = noise.clone()
    for i in range(1, levels + 1):
        r = 2 + 2 * float(torch.rand((), generator=g))
        hi, wi = max(1, int(h / r**i)), max(1, int(w / r**i))
        coarse = torch.randn((*noise.shape[:-2], hi, wi), generator=g)
        up = F.interpolate(coarse.reshape(-1, 1, hi, wi), size=(h, w), mode="bilinear", align_corners=False)
        out = out + discount**i * up.reshape(noise.shape).to(noise.dtype)
        if hi == 1 or wi == 1:
            break
    return out / out.flatten(1).std(dim=1).view(-1, *[1] * (noise.dim() - 1))


def debiased_weights(sched, t: torch.Tensor) -> torch.Tensor:
    """Debiased estimation's weights of timesteps ``t``: ``1 / sqrt(SNR)`` for ε-prediction with SNR taken in
    [0.001, 1000] (finite where a zero-terminal-SNR schedule's last step has SNR 0), ``1 / sqrt(SNR + 1)`` for
    v-prediction with SNR at most 1000."""
    from diffusers.training_utils import compute_snr

    snr = compute_snr(sched, t).float().clamp(max=1000.0)
    if sched.config.prediction_type == "v_prediction":
        return 1 / torch.sqrt(snr + 1)
    return 1 / torch.sqrt(snr.clamp(min=1e-3))


def min_snr_weights(sched, t: torch.Tensor, gamma: float) -> torch.Tensor:
    """Min-SNR-γ weights of timesteps ``t``: ``min(SNR, γ) / SNR`` for ε-prediction (taken as ``min(γ / SNR, 1)``,
    so 1 where a zero-terminal-SNR schedule's last step has SNR 0), ``min(SNR, γ) / (SNR + 1)`` for v-prediction,
    with ``SNR = ᾱ_t / (1 - ᾱ_t)`` (diffusers' ``compute_snr``)."""
    from diffusers.training_utils import compute_snr

    snr = compute_snr(sched, t).float()
    if sched.config.prediction_type == "v_prediction":
        return torch.clamp(snr, max=gamma) / (snr + 1)
    return torch.clamp(gamma / snr, max=1.0)


def train(trainer: Trainer, cfg: TrainConfig) -> Path:
    """Run (or resume) ``trainer`` with ``cfg``; returns the written adapter file."""
    from accelerate import Accelerator
    from diffusers import DDPMScheduler

    from studio.families import load_pipeline

    cfg.check()
    run_dir = Path(cfg.output)
    # cpu=True on a machine without CUDA: that is what makes accelerate form a gloo process group
    # (MULTI_CPU) when a launcher starts several processes
    accelerator = Accelerator(cpu=not torch.cuda.is_available(), mixed_precision=_mixed_precision(cfg.mixed_precision),
                              log_with="tensorboard" if cfg.tensorboard else None, project_dir=str(run_dir))
    resume_from = None
    if cfg.resume:
        resume_from = latest_checkpoint(run_dir) if cfg.resume == "latest" else Path(cfg.resume)
        if cfg.resume != "latest" and not (resume_from / "state.json").is_file():
            raise FileNotFoundError(f"--resume {cfg.resume}: not a checkpoint folder (no state.json)")
    if accelerator.is_main_process:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / STOP_FILE).unlink(missing_ok=True)  # a stop asked of an earlier attempt
        (run_dir / "config.json").write_text(json.dumps({"trainer": trainer.name, **dataclasses.asdict(cfg)}, indent=2))
    pipe = load_pipeline(cfg.model)
    pipe.to(accelerator.device)
    vae_scale = 2 ** (len(pipe.vae.config.block_out_channels) - 1)
    resolution = cfg.resolution or pipe.unet.config.sample_size * vae_scale
    multiple = vae_scale * 2 ** (len(pipe.unet.config.block_out_channels) - 1)
    if resolution % multiple:
        raise ValueError(f"--resolution {resolution} is not a multiple of {multiple} (this model's size step)")
    ctx = Context(
        cfg, pipe, accelerator, run_dir, DDPMScheduler.from_config(pipe.scheduler.config), resolution, multiple
    )
    from studio.plugin import base_model_hash

    # the base weights' fingerprint, before LoRA layers change the state dict's names: the adapter's metadata, and
    # trainers key caches on it (DreamBooth's class images)
    ctx.store["base_hash"] = base_model_hash(pipe.unet)
    trainer.prepare(ctx)
    torch.manual_seed(cfg.seed)  # LoRA init
    targets = trainer.targets(ctx)
    components = [c for c, paths in targets.items() if paths]
    inject = getattr(trainer, "inject", inject_lora)  # a trainer may bring its own adapter layers
    params = inject(ctx, targets, cfg.rank, cfg.alpha or cfg.rank)
    if cfg.lora_dropout and inject is not inject_lora:
        raise ValueError(f"--lora-dropout: the {trainer.name} trainer trains its own adapter layers, which have no dropout")
    if cfg.scale_weight_norms and (inject is not inject_lora or cfg.adapter != "lora"):
        raise ValueError(f"--scale-weight-norms scales plain LoRA layers' two factors; the {trainer.name} trainer with"
                         f" --adapter {cfg.adapter} trains other layers")
    capped = dict(peft_layers(pipe, components)) if cfg.scale_weight_norms else {}
    # peft's dropout layers: put in training mode before every step (validation sampling leaves the UNet in eval mode)
    dropouts = [m for c in components for n, m in getattr(pipe, c).named_modules()
                if isinstance(m, torch.nn.Dropout) and ".lora_dropout." in f".{n}."] if cfg.lora_dropout else []
    if cfg.init_adapter:
        if inject is not inject_lora:
            raise ValueError(f"--init-adapter: the {trainer.name} trainer trains its own adapter layers, not a plain"
                             " LoRA that a file could start")
        init_from_adapter(ctx, components, cfg.init_adapter)
    groups = None
    if params and isinstance(params[0], dict):  # param groups, each with an ``lr_scale`` (a multiple of --lr)
        groups = [{"params": list(gr["params"]), "lr_scale": float(gr.get("lr_scale", 1.0))} for gr in params]
        params = [p for gr in groups for p in gr["params"]]
    te_lr = getattr(cfg, "text_encoder_lr", 0.0)  # DreamBooth's, with --train-text-encoder
    te = {id(p) for c in components if c != "unet" for n, p in getattr(pipe, c).named_parameters() if p.requires_grad}
    if te_lr and te:
        groups = scaled_groups(groups or [{"params": params, "lr_scale": 1.0}], te, te_lr / cfg.lr)
    if cfg.loraplus_ratio != 1:
        ups = {id(p) for c in components for n, p in getattr(pipe, c).named_parameters() if is_up(n) and p.requires_grad}
        if not ups:
            raise ValueError(f"--loraplus-ratio {cfg.loraplus_ratio:g} needs LoRA up-projections to train; this run has"
                             " none (SingLoRA has one matrix per layer, ZipLoRA trains merge coefficients)")
        groups = scaled_groups(groups or [{"params": params, "lr_scale": 1.0}], ups, cfg.loraplus_ratio)
    pivotal = ctx.store.get("pivotal")  # {token: its embedding per text encoder}: --pivotal
    if pivotal:
        embeds = [p for per in pivotal.values() for p in per.values()]
        scale = (getattr(cfg, "embedding_lr", 0.0) or cfg.lr) / cfg.lr
        groups = [*(groups or [{"params": params, "lr_scale": 1.0}]), {"params": embeds, "lr_scale": scale}]
        params = [*params, *embeds]
    use_training_attention(pipe.unet)  # the UNet's attention with fused projections
    if hasattr(trainer, "after_inject"):  # e.g. DreamBooth's attention loss: a recorder in that attention
        trainer.after_inject(ctx)
    if cfg.gradient_checkpointing:
        pipe.unet.enable_gradient_checkpointing()
    opt = _optimizer(groups or params, cfg)
    unet, opt = accelerator.prepare(pipe.unet, opt)
    # the compiled module only runs the training passes; pipe.unet (validation, the adapter's weights) stays as is
    ctx.store["unet"] = torch.compile(unet, backend=cfg.compile_backend) if cfg.compile else unet
    # LoRA on the text encoders is trained outside DDP's wrapper: average its gradients by hand
    te_grads = [p for c in components if c != "unet" for n, p in getattr(pipe, c).named_parameters() if "lora_" in n]
    te_grads += embeds if pivotal else []
    ema = EMA(params, cfg.ema_decay) if cfg.ema_decay else None
    averaged = ema.applied if ema else contextlib.nullcontext  # what the adapter and validation images are made with

    def kept() -> dict[str, dict[str, torch.Tensor]]:  # the checkpoint's tensors
        return {"lora": trained_state(ctx, components), **({"ema": ema.state()} if ema else {})}

    start = 0
    if resume_from is not None:
        holder = {"lora": _Holder(trained_state(ctx, components))}
        if ema:
            if not (resume_from / "ema.safetensors").is_file():
                raise ValueError(f"--ema-decay {cfg.ema_decay:g}: checkpoint {resume_from} holds no moving average (its"
                                 " run had no --ema-decay); resume without it, or start a new run")
            holder["ema"] = _Holder(ema.state())
        start = load_checkpoint(resume_from, holder, {"opt": opt})["step"]
    if cfg.tensorboard:
        accelerator.init_trackers("studio")
    bar = tqdm(range(start, cfg.steps), desc=trainer.name, initial=start, total=cfg.steps,
               disable=not accelerator.is_main_process)
    progress = Progress(run_dir, cfg.steps, accelerator.is_main_process)
    progress.event("start", start)
    t0, loss_value, factor = time.time(), float("nan"), lr_factor(cfg)
    for step in bar:
        if "clock" in ctx.store:
            ctx.store["clock"].step = step
        for group in opt.param_groups:
            group["lr"] = cfg.lr * group.get("lr_scale", 1.0) * factor(step)
        total = 0.0
        for m in dropouts:
            m.train()
        for micro in range(cfg.grad_accum):
            key = (cfg.seed * 1_000_003 + step) * 1009 + micro  # the same on every process (see denoise_loss)
            g, rng = torch.Generator().manual_seed(key), random.Random(key)
            if dropouts:  # the dropout masks come from torch's global generator: seeded per step, so a resumed run agrees
                torch.manual_seed(key)
            sync = micro == cfg.grad_accum - 1
            with (accelerator.no_sync(unet) if not sync and accelerator.num_processes > 1 else contextlib.nullcontext()):
                with accelerator.autocast():
                    loss = trainer.loss(ctx, step, micro, g, rng) / cfg.grad_accum
                accelerator.backward(loss)
            total += loss.item()
        if accelerator.num_processes > 1:
            for p in te_grads:
                if p.grad is not None:
                    p.grad.copy_(accelerator.reduce(p.grad, reduction="mean"))
        if cfg.max_grad_norm:
            accelerator.clip_grad_norm_(params, cfg.max_grad_norm)
        opt.step()
        opt.zero_grad(set_to_none=True)
        norms = cap_update_norms(capped.values(), cfg.scale_weight_norms) if capped else None
        if ema:
            ema.update(step)
        loss_value = total
        # the step size applied: Prodigy's is its estimate d times --lr (kohya logs it as d*lr)
        rate = opt.param_groups[0]["lr"] * opt.param_groups[0].get("d", 1.0)
        bar.set_postfix(loss=f"{loss_value:.4f}")
        done = step + 1
        if cfg.tensorboard:
            accelerator.log({"loss": loss_value, "lr": rate, **({"keys_scaled": norms[0], "average_key_norm": norms[1]}
                                                                 if norms else {})}, step=done)
        if cfg.checkpoint_every and done % cfg.checkpoint_every == 0 and done < cfg.steps and accelerator.is_main_process:
            save_checkpoint(run_dir, done, kept(), {"opt": opt}, keep=cfg.keep_checkpoints)
        if cfg.save_adapter_every and done % cfg.save_adapter_every == 0 and done < cfg.steps and accelerator.is_main_process:
            with averaged():
                save_adapter(adapter_at(trainer, ctx, components, done), snapshot_path(run_dir, done), dtype=cfg.save_precision)
        if cfg.validation_every and done % cfg.validation_every == 0 and accelerator.is_main_process:
            if "clock" in ctx.store:
                ctx.store["clock"].step = done  # sample with the ramp as it stands after this step
            with averaged():
                progress.event("validation", done, image=str(validate(ctx, done)))
        progress.step(done, loss_value, rate)
        accelerator.wait_for_everyone()
        if done < cfg.steps and _stop_requested(accelerator, run_dir):
            if accelerator.is_main_process:
                if done not in list_checkpoints(run_dir):  # not already written at this step
                    save_checkpoint(run_dir, done, kept(), {"opt": opt}, keep=cfg.keep_checkpoints)
                progress.event("cancelled", done)
                (run_dir / STOP_FILE).unlink(missing_ok=True)
            accelerator.wait_for_everyone()
            accelerator.end_training()
            raise Cancelled(f"stopped at step {done} of {cfg.steps} ({STOP_FILE} in {run_dir}); a checkpoint is"
                            " saved: continue with --resume latest")
    out = run_dir / "adapter.safetensors"
    if accelerator.is_main_process:
        pipe.unet.eval()
        with averaged():
            adapter = adapter_at(trainer, ctx, components, cfg.steps)
        adapter.meta.extra["seconds"] = round(time.time() - t0, 1)
        save_adapter(adapter, out, dtype=cfg.save_precision)
        if hasattr(trainer, "finalize"):  # e.g. B-LoRA writes its content and style parts
            trainer.finalize(ctx, adapter, out)
        progress.event("done", cfg.steps, adapter=str(out))
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return out


STOP_FILE = "STOP"


class EMA:
    """An exponential moving average of the trained parameters: after optimizer step ``t`` (0-based),
    ``ema <- d·ema + (1 - d)·param`` with ``d = min(decay, (1 + t) / (10 + t))`` (diffusers' ``EMAModel`` without
    its power warm-up), starting from the parameters' initial values. :meth:`applied` puts the average in the
    parameters for a while (writing the adapter, sampling validation images) and the raw weights back after."""

    def __init__(self, params: list[torch.nn.Parameter], decay: float):
        self.params, self.decay = list(params), decay
        self.shadow = [p.detach().float().clone() for p in self.params]

    def rate(self, step: int) -> float:
        return min(self.decay, (1 + step) / (10 + step))

    @torch.no_grad()
    def update(self, step: int) -> None:
        torch._foreach_lerp_(self.shadow, [p.detach().float() for p in self.params], 1 - self.rate(step))

    def state(self) -> dict[str, torch.Tensor]:
        return {str(i): t for i, t in enumerate(self.shadow)}

    @contextlib.contextmanager
    def applied(self):
        raw = [p.detach().clone() for p in self.params]
        with torch.no_grad():
            for p, e in zip(self.params, self.shadow):
                p.copy_(e.to(p.dtype))
        try:
            yield
        finally:
            with torch.no_grad():
                for p, r in zip(self.params, raw):
                    p.copy_(r)


def snapshot_path(run_dir: Path, step: int) -> Path:
    """Where ``--save-adapter-every`` writes the adapter of ``step``."""
    return run_dir / "adapters" / f"adapter-{step:06d}.safetensors"


class Cancelled(Exception):
    """Training stopped on request (a ``STOP`` file in the run folder) after saving a checkpoint."""


def _stop_requested(accelerator, run_dir: Path) -> bool:
    """True when someone asked this run to stop; all processes agree (the main process's view wins)."""
    flag = torch.tensor([float((run_dir / STOP_FILE).exists()) if accelerator.is_main_process else 0.0],
                        device=accelerator.device)
    if accelerator.num_processes > 1:
        flag = accelerator.reduce(flag, reduction="sum")
    return bool(flag.item())


class Progress:
    """``progress.jsonl`` in the run folder: one JSON line per step (step, total, loss, lr: the step size applied,
    Prodigy's d x --lr, seconds) and
    per event (start, validation, cancelled, done); what the app and any other watcher read. Appended, so
    a resumed run goes on in the same file (a reader keeps the last line of each step)."""

    def __init__(self, run_dir: Path, total: int, enabled: bool):
        self.path, self.total, self.enabled, self.t0 = run_dir / "progress.jsonl", total, enabled, time.time()

    def _write(self, record: dict) -> None:
        if self.enabled:
            with self.path.open("a") as f:
                f.write(json.dumps(record) + "\n")

    def step(self, step: int, loss: float, lr: float) -> None:
        self._write({"step": step, "total": self.total, "loss": round(loss, 6), "lr": lr,
                     "seconds": round(time.time() - self.t0, 2)})

    def event(self, name: str, step: int, **info) -> None:
        self._write({"event": name, "step": step, "total": self.total, **info})


class _Holder(torch.nn.Module):
    """Lets :func:`load_checkpoint` write a flat dict of parameters in place."""

    def __init__(self, params: dict[str, torch.Tensor]):
        super().__init__()
        self._params = params

    def load_state_dict(self, state, strict: bool = True):  # type: ignore[override]
        missing = set(self._params) - set(state)
        if missing:
            raise ValueError(f"checkpoint lacks {len(missing)} LoRA tensors (was it written by another config?)")
        with torch.no_grad():
            for k, p in self._params.items():
                p.copy_(state[k])


@torch.no_grad()
def validate(ctx: Context, step: int) -> Path | None:
    """Validation images for the configured prompts, as one grid in ``validation/step-N.png``."""
    from studio.sampling import generate, image_grid

    prompts = ctx.cfg.validation_prompts
    if not prompts:
        return None
    unet = ctx.pipe.unet
    was_training = unet.training
    unet.eval()
    images = generate(ctx.pipe, prompts, seed=ctx.cfg.seed, steps=25)
    unet.train(was_training)
    out = ctx.run_dir / "validation" / f"step-{step:06d}.png"
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.stem + ".tmp.png")
    image_grid(images, cols=min(len(images), 8), scale=max(1, 256 // images[0].width)).save(tmp)
    tmp.replace(out)
    return out
