"""Sampling speed with several adapters: the studio's fused multi-LoRA path (with region masks) against
the base model, peft's multi-adapter path and merged weights, side by side in one process.

What is timed is one denoising step: a UNet forward with a guidance batch of 2 (sampling is that,
times the number of steps, plus one VAE decode; the ratios per step are what adapters change).
Every configuration is warmed up with two steps (the second makes the prepared calls), then all are run
round-robin ``--repeats`` times (the single adapter's configurations, which fuse weights into the shared base layers,
in a round-robin of their own); the table gives medians and ratios. ``--cuda-graphs`` (CUDA) instead captures each configuration's step in a CUDA graph and
times its replays: what the step costs without Python and per-kernel launch costs.

Models: the embedded model's UNet at 64x64 (``embedded``); a full-size SDXL UNet built from SDXL's
configuration with random weights at 512x512, or ``--resolution`` (``sdxl``; speed needs no trained weights).
Adapters: random LoRA on every attention projection (to_q, to_k, to_v, to_out.0), rank 16 or 64.
``--device cuda`` runs it on the GPU (bf16 by default, timed between synchronizations); a ``studio, triton``
column then times the same layers on the Triton kernels beside the default path (``studio.kernels.lora.CUDA_PATH``),
so the dispatch can be checked.

- ``studio, masked``: N adapters attached with ``studio.plugin`` and routed by a LoRA-Composer region
  gate (N vertical stripes), i.e. ``base(x) + sum_i m_i ⊙ s_i (x A_i^T) B_i^T`` in two GEMMs per layer, or,
  on layers where it pays (``studio.kernels.lora.use_segments``), each adapter on its stripe's tokens only, or,
  from the second step, where the merged weights are small (``studio.kernels.lora.merge_fits``), each token
  through its own adapter's merged weight (``RoutedPlan``: no low-rank work at all);
- ``peft``: the same adapters as peft LoRA layers on the UNet, ``set_adapters`` with weights, unfused;
- ``merged``: one adapter fused into the weights (for N = 1: the unfused single adapter against it);
- ``general path``: the studio's layers with ``LoraStack.prepared`` off, every call through the general dispatch
  (``multi_lora_linear``) instead of the prepared call a layer keeps after its first (``LinearPlan``, ``GatedPlan``).
- ``prompt update per step``: the studio's layers with ``LoraStack.keep_prompt`` off: each cross-attention key/value
  projection computes the adapters' update of the prompt's tokens at every step, instead of once for the prompt
  tensor the pipeline passes at every step.

Also: the FLOPs of the studio's masked forward (``torch.utils.flop_counter``) against the analytical
count (base FLOPs + ``2 M R (d_in + d_out)`` per adapted layer with M tokens, or ``2 sum_k M_k r (d_in + d_out)``
where each adapter runs on its own M_k tokens, or none where the tokens are routed through merged weights), and the largest difference
between the studio's and peft's outputs (unmasked, same adapters).

    python bench/speed.py                         # embedded model, N = 1 2 4 8, ranks 16 64
    python bench/speed.py --models sdxl --repeats 3
    python bench/speed.py --models sdxl --device cuda --resolution 1024
    python bench/speed.py --models sdxl --repeats 3 --ns 4 --label n4   # some cases, in a section of their own

Prints a table and writes the ``speed-<model>`` section of docs/benchmarks.md (``speed-<model>-cuda`` on the GPU;
``--label L`` appends ``-L``).
"""

from __future__ import annotations

import argparse
import contextlib
import math
import statistics
import sys
import time
from pathlib import Path
from types import SimpleNamespace

sys.path.insert(0, str(Path(__file__).resolve().parent))
from report import DTYPES, default_dtype, git_revision, machine, torch_dtype, write_section  # noqa: E402

TARGETS = ("to_q", "to_k", "to_v", "to_out.0")

SDXL_UNET = dict(  # stabilityai/stable-diffusion-xl-base-1.0 unet/config.json
    sample_size=128, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20), cross_attention_dim=2048,
    use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2816, norm_num_groups=32,
)


def build(model: str, device: str = "cpu", dtype: str = "fp32", resolution: int = 512):
    """(unet, sample input kwargs, latent side)."""
    import torch
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    if model == "embedded":
        from studio.families import EMBEDDED_MODEL

        unet = UNet2DConditionModel.from_pretrained(str(EMBEDDED_MODEL), subfolder="unet")
        side = 16
    else:
        with torch.device(device):  # built where it runs: a full-size UNet's random init is slow on few cores
            unet = UNet2DConditionModel(**SDXL_UNET)
        side = resolution // 8
    unet.eval().requires_grad_(False).to(device, torch_dtype(dtype))
    cfg = unet.config
    batch = 2
    g = torch.Generator().manual_seed(1)
    time_ids = torch.tensor([[side * 8, side * 8, 0, 0, side * 8, side * 8]], dtype=torch.float32).repeat(batch, 1)
    pooled = cfg.projection_class_embeddings_input_dim - 6 * cfg.addition_time_embed_dim
    inputs = dict(sample=torch.randn(batch, cfg.in_channels, side, side, generator=g), timestep=torch.tensor(500),
                  encoder_hidden_states=torch.randn(batch, 77, cfg.cross_attention_dim, generator=g),
                  added_cond_kwargs={"text_embeds": torch.randn(batch, pooled, generator=g), "time_ids": time_ids})
    inputs = {k: (v.to(device, unet.dtype) if v.is_floating_point() else v.to(device)) if isinstance(v, torch.Tensor)
              else {kk: vv.to(device, unet.dtype) for kk, vv in v.items()} for k, v in inputs.items()}
    return unet, inputs, side


@contextlib.contextmanager
def cuda_path(path: str):
    """The studio's layers on CUDA on ``path`` (torch: cuBLAS GEMMs or the segmented form; triton: the kernels)."""
    from studio.kernels import lora

    real = lora.CUDA_PATH
    lora.CUDA_PATH = path
    try:
        yield
    finally:
        lora.CUDA_PATH = real


def random_adapters(unet, n: int, rank: int):
    import torch

    from studio.adapters import Adapter, AdapterMeta, LoraWeights

    out = []
    for i in range(n):
        g = torch.Generator().manual_seed(100 + i)
        modules = {}
        for name, m in unet.named_modules():
            if isinstance(m, torch.nn.Linear) and name.endswith(TARGETS) and ("attn1" in name or "attn2" in name):
                modules[f"unet.{name}"] = LoraWeights(torch.randn(rank, m.in_features, generator=g) * 0.01,
                                                      torch.randn(m.out_features, rank, generator=g) * 0.01, float(rank))
        out.append(Adapter(modules, AdapterMeta(token=f"c{i}")))
    return out


class Studio:
    """The plugin's adapters on the UNet, gated by region stripes through a composer's router."""

    def __init__(self, unet, adapters, side: int, masked: bool = True):
        from studio.composers import Concept
        from studio.composers.base import Run
        from studio.composers.lora_composer import LoRAComposer

        from studio.plugin import attach

        self.pipe = SimpleNamespace(unet=unet, text_encoder_2=None, vae_scale_factor=8)  # an SDXL-family holder
        self.handle = attach(self.pipe, adapters, names=[f"c{i}" for i in range(len(adapters))])
        n = len(adapters)
        concepts = [Concept(a, f"c{i}", region=(i / n, 0.0, (i + 1) / n, 1.0)) for i, a in enumerate(adapters)]
        self.run = Run(self.pipe, LoRAComposer(), "", concepts, side * 8, side * 8) if masked else None
        for stack in self.handle.stacks.values():
            stack.router = self.run

    def off(self):
        """The UNet's own modules back in place; the adapter layers (and what they built on their first call: the
        packed adapters, the region gates) are kept for :meth:`on`."""
        from studio.plugin import _put

        for stack in self.handle.stacks.values():
            _put(self.pipe.unet, stack.path, stack.base)

    def on(self):
        from studio.plugin import _put

        for stack in self.handle.stacks.values():
            _put(self.pipe.unet, stack.path, stack)

    def close(self):
        from studio.plugin import detach

        self.on()
        detach(self.pipe)


def lora_flops(stack, lead: tuple[int, ...], n: int, run, later: bool) -> int:
    """FLOPs of one adapted layer's low-rank work in a step, by hand: dense, ``2 M R (d_in + d_out)`` for M tokens;
    where the kernel runs each adapter on its own tokens (N stripes, each a rank-r update on its columns' tokens),
    ``2 sum_k M_k r (d_in + d_out)``; at a later step (``later``, once the prepared calls are made), none on a
    cross-attention key/value (the prompt's update is kept) nor where each token goes through its own adapter's
    merged weight (``studio.kernels.lora.merge_fits``: the stripes put each token under one adapter)."""
    from studio.kernels.lora import merge_fits, use_segments

    d = stack.base.in_features + stack.base.out_features
    tokens, rank = math.prod(lead), stack.packed().down.shape[0]
    if later and (stack.text_input or merge_fits(min(stack.packed().ranks), stack.base.in_features, stack.base.out_features)):
        return 0
    if stack.text_input or n == 1:
        return 2 * tokens * rank * d
    h, w = run.spatial_hw(lead[-1])
    centres = [(j + 0.5) / w for j in range(w)]
    per = [lead[0] * h * sum(k / n <= c < (k + 1) / n for c in centres) for k in range(n)]  # tokens in stripe k
    if not use_segments(tokens, stack.packed(), stack.base.in_features, stack.base.out_features, sum(per) / (tokens * n)):
        return 2 * tokens * rank * d
    return sum(2 * m * (rank // n) * d for m in per)


def capture(forward):
    """``forward`` captured in a CUDA graph (after two runs on a side stream, as torch's documentation does it):
    its replay launches every kernel of the step at once, without Python or per-kernel launch costs."""
    import torch

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):
            forward()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        forward()
    return graph


def measure_case(unet, inputs, side: int, rank: int, n: int, repeats: int, base_flops: int, graphs: bool = False):
    """Median seconds per configuration for N adapters of one rank, and the (rank, N, FLOP ratio, output
    difference) checks. ``graphs`` (CUDA): each configuration set up in turn, its step captured in a CUDA graph
    and replayed ``repeats`` times, then taken down (a graph holds its configuration's weights, so configurations
    cannot be swapped under it round-robin)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    cuda = unet.device.type == "cuda"

    def forward():
        with torch.no_grad():
            return unet(**inputs).sample

    def counted_flops() -> int:  # on the torch path: the flop counter does not see inside Triton kernels
        with FlopCounterMode(display=False) as counter, cuda_path("torch"):
            forward()
        return counter.get_total_flops()

    adapters = random_adapters(unet, n, rank)
    names = [f"a{i}" for i in range(n)]
    # each adapter's (down, up) per layer, for peft; later read from the studio's own layers, so that a full-size
    # UNet with eight rank-64 adapters holds them three times at most (studio, its packed form, peft), not four
    factors = [{key: (lora.down, lora.up) for key, lora in adapter.modules.items()} for adapter in adapters]

    def peft_on():
        from peft import LoraConfig

        for name, layers in zip(names, factors):
            unet.add_adapter(LoraConfig(r=rank, lora_alpha=rank,
                                        target_modules=[k[len("unet."):] for k in layers]), adapter_name=name)
            with torch.no_grad():
                for key, (down, up) in layers.items():
                    layer = unet.get_submodule(key[len("unet."):])
                    layer.lora_A[name].weight.copy_(down)
                    layer.lora_B[name].weight.copy_(up)
        unet.set_adapters(names, [1.0] * n)
        unet.to(unet.dtype)  # peft keeps 16-bit models' adapters in fp32 (casting each input up): here in the model's dtype

    timings: dict[str, list[float]] = {"base": [], "studio": [], "studio_general": [], "studio_per_step": [], "peft": []}
    if cuda:
        timings["studio_triton"] = []
    if n == 1:
        timings.update(single=[], single_general=[], merged=[])

    def timed(label, run=forward):
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        run()
        if cuda:
            torch.cuda.synchronize()
        timings[label].append(time.perf_counter() - t0)

    @contextlib.contextmanager
    def peft():
        peft_on()
        try:
            yield
        finally:
            unet.unload_lora()  # peft's layers out: the UNet's own modules back

    @contextlib.contextmanager
    def studio(kept, fuse=False, path=None, prepared=True, keep_prompt=True):
        from studio.plugin import LoraStack, unfuse
        from studio.plugin import fuse as fuse_weights

        kept.on()
        if fuse:
            fuse_weights(kept.pipe)
        LoraStack.prepared, LoraStack.keep_prompt = prepared, keep_prompt
        try:
            with cuda_path(path) if path else contextlib.nullcontext():
                yield
        finally:
            LoraStack.prepared = LoraStack.keep_prompt = True
            if fuse:
                unfuse(kept.pipe)
            kept.off()

    # correctness: the studio's unmasked sum against peft's; the masked forward's FLOPs
    peft_on()
    peft_out = forward()
    unet.unload_lora()
    s = Studio(unet, adapters, side, masked=False)
    ours = forward()
    s.close()
    s = Studio(unet, adapters, side, masked=True)
    leads = {}
    hooks = [st.register_forward_pre_hook(lambda m, a, _n=name: leads.__setitem__(_n, tuple(a[0].shape[:-1])))
             for name, st in s.handle.stacks.items()]
    # the first step, and the third (the second makes the prepared calls: the prompt's update kept, merged weights)
    flops = counted_flops(), counted_flops(), counted_flops()
    flops = flops[0], flops[2]
    analytic = tuple(base_flops + sum(lora_flops(st, leads[name], n, s.run, later) for name, st in s.handle.stacks.items())
                     for later in (False, True))
    for h in hooks:
        h.remove()
    s.close()
    diff = float((ours - peft_out).abs().max() / peft_out.abs().max())
    # each studio configuration attached once and swapped in for its runs: a sampling step after the first two, which
    # build the packed adapters, the region gates and the prepared calls (the two warm-up rounds below)
    masked = Studio(unet, adapters, side, masked=True)
    masked.off()
    plan = {"base": contextlib.nullcontext, "studio": lambda: studio(masked),  # label -> its setting
            "studio_general": lambda: studio(masked, prepared=False),
            "studio_per_step": lambda: studio(masked, keep_prompt=False), "peft": peft}
    if cuda:
        plan["studio_triton"] = lambda: studio(masked, path="triton")
    if n == 1:
        single = Studio(unet, adapters, side, masked=False)
        single.off()
        plan.update(single=lambda: studio(single), single_general=lambda: studio(single, prepared=False),
                    merged=lambda: studio(single, fuse=True))
    factors[:] = [{key: (st.downs[i].weight, st.ups[i].weight) for key, st in masked.handle.stacks.items()}
                  for i in range(n)]
    del adapters
    if graphs:
        for label, setting in plan.items():
            with setting():
                graph = capture(forward)
                for _ in range(repeats + 1):  # the first replay is the warm-up
                    timed(label, graph.replay)
                timings[label].pop(0)
                del graph
    else:
        # the single adapter's configurations in a round-robin of their own: fusing writes into the base layers that
        # the masked configuration's prepared calls were made on (its merged weights would be made again each round)
        singles = {k: plan.pop(k) for k in ("single", "single_general", "merged") if k in plan}
        for group in (plan, singles):
            for label, setting in group.items():  # warm-up: the first step, and the second (it makes the prepared calls)
                with setting():
                    timed(label)
                    timed(label)
                timings[label].clear()
            for _ in range(repeats):
                for label, setting in group.items():
                    with setting():
                        timed(label)
    masked.close()
    if n == 1:
        single.close()
    med = {k: statistics.median(v) for k, v in timings.items()}
    return med, (rank, n, tuple(f / a for f, a in zip(flops, analytic)), diff, flops[1] / base_flops)


def section(model: str, args, rows: list, checks: list, total: int) -> str:
    """The benchmark's section of docs/benchmarks.md for the cases measured so far."""
    partial = f" (partial: {len(rows)} of {total} cases measured)" if len(rows) < total else ""
    cuda = args.device == "cuda"
    triton_col = (" studio triton / base |", "---|") if cuda else ("", "")
    head = (f"| rank | N | base ms | studio masked ms | peft ms | studio / base |{triton_col[0]} FLOPs studio / base | "
            f"peft / studio | general path / studio | prompt update per step / studio | FLOPs counted / analytical "
            f"(first step / later) | studio vs peft output |\n"
            f"|---|---|---|---|---|---|{triton_col[1]}---|---|---|---|---|---|\n")
    body = ""
    for (rank, n, med), (_, _, flop_ratio, diff, over_base) in zip(rows, checks):
        triton_cell = f" {med['studio_triton'] / med['base']:.3f} |" if cuda else ""
        body += (f"| {rank} | {n} | {med['base'] * 1000:.1f} | {med['studio'] * 1000:.1f} | {med['peft'] * 1000:.1f} | "
                 f"**{med['studio'] / med['base']:.3f}** |{triton_cell} {over_base:.3f} | **{med['peft'] / med['studio']:.2f}x** | "
                 f"{med['studio_general'] / med['studio']:.2f}x | {med['studio_per_step'] / med['studio']:.2f}x | "
                 f"{flop_ratio[0]:.4f} / {flop_ratio[1]:.4f} | {diff:.1e} |\n")
    singles = [(rank, med) for rank, n, med in rows if n == 1]
    single = "".join(f"- rank {rank}: one unmasked adapter, unfused {med['single'] * 1000:.1f} ms vs fused into the weights "
                     f"{med['merged'] * 1000:.1f} ms: **{med['single'] / med['merged']:.3f}x** (goal at most 1.05; the "
                     f"general path {med['single_general'] * 1000:.1f} ms, {med['single_general'] / med['merged']:.3f}x)\n"
                     for rank, med in singles)
    res = args.resolution
    where = ("the embedded model's UNet, 64x64 (16x16 latents)" if model == "embedded"
             else f"a full-size SDXL UNet (random weights), {res}x{res} ({res // 8}x{res // 8} latents)")
    flags = f" --models {model}" + (f" --repeats {args.repeats}" if args.repeats != 7 else "")
    flags += (f" --device {args.device}" if cuda else "") + (f" --dtype {args.dtype}" if args.dtype != default_dtype(args.device) else "")
    flags += f" --resolution {res}" if model == "sdxl" and res != 512 else ""
    flags += " --cuda-graphs" if args.cuda_graphs else ""
    flags += (f" --ns {' '.join(map(str, args.ns))}" if args.ns != [1, 2, 4, 8] else "")
    flags += (f" --ranks {' '.join(map(str, args.ranks))}" if args.ranks != [16, 64] else "")
    flags += f" --label {args.label}" if args.label else ""
    text = (f"## Sampling speed with N adapters: {model}{' on the GPU' if cuda else ''}{' (CUDA graphs)' if args.cuda_graphs else ''}{f' ({args.label})' if args.label else ''}{partial}\n\nCommand: `python bench/speed.py{flags}` (revision {git_revision()}; "
            f"{machine()}). One denoising step (UNet forward, guidance batch 2) of {where}, {args.dtype}; medians of "
            + (f"{args.repeats} CUDA graph replays of each configuration's step, one configuration after another"
               if args.cuda_graphs else f"{args.repeats} round-robin repeats") + " after a two-step warm-up (the single adapter's configurations, which fuse into the shared base layers, in a round-robin of their own). Adapters: random LoRA on every attention projection. "
            "`studio masked`: the plugin's fused path with a region gate per adapter (N vertical stripes; on layers where "
            "it pays, each adapter on its stripe's tokens only; from the second step, where the merged weights are small, each "
            "token through its own adapter's merged weight)" + ("; `studio triton`: the same layers on the Triton "
            "kernels" if cuda else "") + "; `peft`: the "
            "same adapters as peft layers with `set_adapters`, unfused" + (", in the model's dtype" if args.dtype != "fp32"
            else "") + "; `general path / studio`: the same studio layers with `LoraStack.prepared` off (every call "
            "through the general dispatch, as before the prepared calls) over the default; `prompt update per step / "
            "studio`: the same with `LoraStack.keep_prompt` off (the cross-attention keys' and values' low-rank update "
            "of the prompt computed at every step instead of kept from the first) over the default. Goals (issue 6): studio / base at most 1.10 at "
            "N = 4; peft / studio at least 2x at N = 4; FLOPs within 1% of the analytical count.\n\n"
            f"{head}{body}\n{single}\n`FLOPs studio / base`: the masked multi-adapter forward's FLOPs over the base model's, "
            "at a later step (the third: the second makes the prepared calls; the time ratio's floor where compute "
            "bounds it)" + ("; counted on the torch path, since the flop counter does not see "
            "inside Triton kernels" if cuda else "") + ". `studio vs peft output`: the largest difference between "
            "the two paths' outputs (unmasked, same adapters), relative to the output's largest value.\n")
    return text


def main() -> None:
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="*", default=["embedded"], choices=["embedded", "sdxl"])
    parser.add_argument("--ns", nargs="*", type=int, default=[1, 2, 4, 8])
    parser.add_argument("--ranks", nargs="*", type=int, default=[16, 64])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--dtype", choices=list(DTYPES), help="default: bf16 on cuda, fp32 on the cpu")
    parser.add_argument("--resolution", type=int, default=512, help="the SDXL UNet's image side (default 512)")
    parser.add_argument("--cuda-graphs", action="store_true",
                        help="CUDA: time each configuration's step as a CUDA graph replay (no per-call launch costs)")
    parser.add_argument("--label", default="", help="a suffix for the section's name and title (e.g. n4), so that a run "
                        "of some cases does not replace the full table")
    args = parser.parse_args()
    args.dtype = args.dtype or default_dtype(args.device)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device here")
    if args.cuda_graphs and args.device != "cuda":
        parser.error("--cuda-graphs needs --device cuda")
    if args.resolution % 64:
        parser.error(f"--resolution {args.resolution}: give a multiple of 64")
    suffix = ("-cuda" if args.device == "cuda" else "") + ("-graphs" if args.cuda_graphs else "")
    suffix += f"-{args.label}" if args.label else ""
    for model in args.models:
        unet, inputs, side = build(model, args.device, args.dtype, args.resolution)
        with FlopCounterMode(display=False) as counter, torch.no_grad():
            unet(**inputs)
        base_flops = counter.get_total_flops()
        rows, checks = [], []
        total = len(args.ranks) * len(args.ns)
        for rank in args.ranks:
            for n in args.ns:
                med, check = measure_case(unet, inputs, side, rank, n, args.repeats, base_flops, args.cuda_graphs)
                rows.append((rank, n, med))
                checks.append(check)
                print(model, rank, n, {k: round(v * 1000, 1) for k, v in med.items()}, check, flush=True)
                if len(rows) < total:  # a long grid keeps what it measured if it is stopped
                    write_section(f"speed-{model}{suffix}", section(model, args, rows, checks, total))
        text = section(model, args, rows, checks, total)
        print(text)
        write_section(f"speed-{model}{suffix}", text)


if __name__ == "__main__":
    main()
