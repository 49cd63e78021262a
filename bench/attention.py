"""Region-masked attention's throughput: ``studio.kernels.attention.region_attention`` with a region mask against
unmasked SDPA and SDPA with a dense additive mask, side by side in one process.

The masks are LoRA-Composer's (``studio.composers.lora_composer``): N boxes, here N vertical stripes over the latent
grid. Self-attention: the isolation mask (a token in a box sees its own box and the background); cross-attention:
the regional mask over the expanded prompt (77 global keys plus 77 per concept; a token in box k sees concept k's).

Paths, each on the same q, k, v:

- ``region``: ``region_attention(q, k, v, RegionMask)`` as the composers call it (on CUDA FlexAttention with the
  mask's block mask; elsewhere SDPA with the dense boolean mask);
- ``sdpa``: ``scaled_dot_product_attention`` with no mask (what the layer costs without regions: the ceiling);
- ``sdpa+additive``: SDPA with a dense additive mask of shape (B, heads, Nq, Nk) in the inputs' dtype (0 where
  allowed, the dtype's lowest value elsewhere): how diffusers' attention processors take an ``attention_mask``.

Medians over round-robin repeats after a warm-up (on CUDA: CUDA events around ``--iters`` calls). Ratios are
throughputs: ``sdpa / region`` (goal at least 0.9) and ``additive / region`` (goal at least 3) as time ratios.

    python bench/attention.py                        # the CPU: 32x32 and 16x16 latent grids, fp32
    python bench/attention.py --device cuda          # SDXL at 1024x1024: 64x64 (10 heads) and 32x32 (20 heads), bf16

Prints a table and writes the ``attention-<device>`` section of docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from report import DTYPES, default_dtype, git_revision, machine, torch_dtype, write_section  # noqa: E402

TEXT = 77  # tokens per prompt


def stripes(n: int, side: int):
    """(n, side*side) bool: token t lies in stripe k (vertical stripes, row-major tokens)."""
    import torch

    cols = torch.arange(side).repeat(side)
    return torch.stack([(cols * n // side) == k for k in range(n)])


def masks(kind: str, n: int, side: int):
    """The RegionMask of one layer kind (self: isolation; cross: regional over the expanded prompt), keys count."""
    from studio.kernels.attention import isolation_mask, regional_cross_mask

    inside = stripes(n, side)
    if kind == "self":
        return isolation_mask(inside), side * side
    segments = [(0, TEXT, None)] + [(TEXT * (k + 1), TEXT * (k + 2), k) for k in range(n)]
    return regional_cross_mask(inside, segments), TEXT * (n + 1)


def timer(device: str, iters: int):
    import torch

    def run(fn) -> float:
        if device == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(iters):
                fn()
            end.record()
            torch.cuda.synchronize()
            return start.elapsed_time(end) / 1000 / iters
        t0 = time.perf_counter()
        for _ in range(iters):
            fn()
        return (time.perf_counter() - t0) / iters

    return run


def measure(kind: str, n: int, side: int, heads: int, args) -> dict:
    import torch
    import torch.nn.functional as F
    from studio.kernels.attention import region_attention

    dtype = torch_dtype(args.dtype)
    mask, n_keys = masks(kind, n, side)
    mask = mask.to(args.device)
    g = torch.Generator(device=args.device).manual_seed(0)
    shape = (args.batch, heads, side * side, args.head_dim)
    q = torch.randn(shape, generator=g, device=args.device, dtype=dtype)
    k, v = (torch.randn(args.batch, heads, n_keys, args.head_dim, generator=g, device=args.device, dtype=dtype)
            for _ in range(2))
    allowed = mask.dense()
    additive = torch.zeros(args.batch, heads, *allowed.shape, device=args.device, dtype=dtype)
    additive.masked_fill_(~allowed, torch.finfo(dtype).min)
    paths = {
        "region": lambda: region_attention(q, k, v, mask),
        "sdpa": lambda: F.scaled_dot_product_attention(q, k, v),
        "additive": lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=additive),
    }
    with torch.no_grad():
        out = paths["region"]().float()
        ref = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=allowed)
        diff = float((out - ref).abs().max())
        run = timer(args.device, args.iters)
        for fn in paths.values():  # warm-up (FlexAttention compiles here)
            run(fn)
        times: dict[str, list[float]] = {name: [] for name in paths}
        for _ in range(args.repeats):
            for name, fn in paths.items():
                times[name].append(run(fn))
    med = {name: statistics.median(v) for name, v in times.items()}
    return dict(kind=kind, n=n, side=side, heads=heads, keys=n_keys, density=float(allowed.float().mean()), diff=diff, **med)


def section(rows: list[dict], args) -> str:
    flags = f" --device {args.device}" if args.device != "cpu" else ""
    flags += f" --dtype {args.dtype}" if args.dtype != default_dtype(args.device) else ""
    flags += f" --repeats {args.repeats}" if args.repeats != 7 else ""
    flags += f" --iters {args.iters}" if args.iters != default_iters(args.device) else ""
    flags += f" --ns {' '.join(map(str, args.ns))}" if args.ns != [2, 4] else ""
    backend = ("FlexAttention (compiled) with the mask's block mask on the tokens sorted by label where the keys are at "
               "least `FLEX_MIN_KEYS` (2048), SDPA with the dense boolean (Nq, Nk) mask below that" if args.device == "cuda"
               else "SDPA with the dense boolean mask (FlexAttention runs on CUDA only)")
    head = ("| layer | N boxes | query tokens | keys | heads | allowed share | region ms | sdpa ms | sdpa+additive ms |"
            " sdpa / region | additive / region | region vs exact |\n|---|---|---|---|---|---|---|---|---|---|---|---|\n")
    body = "".join(
        f"| {r['kind']} | {r['n']} | {r['side']}x{r['side']} | {r['keys']} | {r['heads']} | {r['density']:.2f} | "
        f"{r['region'] * 1000:.3f} | {r['sdpa'] * 1000:.3f} | {r['additive'] * 1000:.3f} | "
        f"**{r['sdpa'] / r['region']:.2f}** | **{r['additive'] / r['region']:.2f}x** | {r['diff']:.1e} |\n" for r in rows)
    return (f"## Region-masked attention: {args.device}\n\nCommand: `python bench/attention.py{flags}` (revision "
            f"{git_revision()}; {machine()}). Batch {args.batch}, head dim {args.head_dim}, {args.dtype}; medians of "
            f"{args.repeats} round-robin repeats of {args.iters} calls after a warm-up. `region`: "
            f"`region_attention` with LoRA-Composer's masks (N vertical stripes), here {backend}; `sdpa`: unmasked "
            "SDPA; `sdpa+additive`: SDPA with a dense (B, heads, Nq, Nk) additive mask, as diffusers' processors take "
            "one. Goals (issue 6, on the GPU): `sdpa / region` at least 0.9, `additive / region` at least 3. "
            "`region vs exact`: largest difference from the masked softmax in fp32.\n\n" + head + body)


def default_iters(device: str) -> int:
    return 20 if device == "cuda" else 3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--dtype", choices=list(DTYPES), help="default: bf16 on cuda, fp32 on the cpu")
    parser.add_argument("--ns", nargs="*", type=int, default=[2, 4])
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--iters", type=int, help="calls per timing (default: 20 on cuda, 3 on the cpu)")
    args = parser.parse_args()
    args.dtype = args.dtype or default_dtype(args.device)
    args.iters = args.iters or default_iters(args.device)
    # (latent side, heads): SDXL's two attention levels at 1024x1024 on CUDA; a 256x256 image's on the CPU
    levels = [(64, 10), (32, 20)] if args.device == "cuda" else [(32, 10), (16, 20)]
    rows = []
    for side, heads in levels:
        for kind in ("self", "cross"):
            for n in args.ns:
                rows.append(measure(kind, n, side, heads, args))
                r = rows[-1]
                print(f"{kind} N={n} {side}x{side} h{heads}: region {r['region'] * 1e3:.3f} ms, sdpa {r['sdpa'] * 1e3:.3f}, "
                      f"additive {r['additive'] * 1e3:.3f}, diff {r['diff']:.1e}", flush=True)
    text = section(rows, args)
    print(text)
    write_section(f"attention-{args.device}", text)


if __name__ == "__main__":
    main()
