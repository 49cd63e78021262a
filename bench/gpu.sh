#!/usr/bin/env bash
# Issue 6's GPU figures in one go, on a machine with CUDA (python3 with torch, triton, diffusers, peft and this
# package importable): the Triton kernels against the reference on the GPU, then bench/attention.py and
# bench/speed.py (SDXL at 1024x1024) on CUDA, as CUDA graph replays and eagerly. Each benchmark writes its section of docs/benchmarks.md; logs and a
# copy of that file go to $OUT (default gpu-out/). STUDIO_REVISION names the commit where the copy has no git history.
#
#     bash bench/gpu.sh                  # about 10 minutes on one H200 (each part has a timeout)
#
# Where the package is not installed (a bare GPU machine with torch, triton and peft but no diffusers, no network),
# as it ran on this workplace's H200: carry wheels of diffusers and importlib_metadata, then
#     pip install --no-index --no-deps --target /tmp/site WHEELS && mkdir -p /tmp/site/studio && cp -r studio/. /tmp/site/studio/ \
#       && for w in trainers composers kernels ui assets; do ln -sfn $PWD/$w /tmp/site/studio/$w; done && export PYTHONPATH=/tmp/site
# (the package-dir mapping of pyproject.toml, by hand). Python runs with -P or from bench/: this checkout's root on
# sys.path would put kernels/ in the place of Hugging Face's kernels package.
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv 2>&1 | tee "$OUT/gpu.log"
python3 -P - <<'PY' 2>&1 | tee -a "$OUT/gpu.log"
import torch
from studio.kernels.lora import Packed, multi_lora_reference, multi_lora_triton
print("torch", torch.__version__, "triton", __import__("triton").__version__)
g = torch.Generator(device="cuda").manual_seed(0)
for dtype, tol in [(torch.float32, 1e-5), (torch.bfloat16, 2**-6)]:
    for tokens, d_in, d_out, ranks in [(8192, 640, 640, [16] * 4), (154, 2048, 1280, [64, 1]), (37, 33, 65, [4, 1, 7])]:
        x = torch.randn(2, tokens // 2, d_in, device="cuda", generator=g)
        w, b = torch.randn(d_out, d_in, device="cuda", generator=g) / d_in**0.5, torch.randn(d_out, device="cuda", generator=g)
        downs = [torch.randn(r, d_in, device="cuda", generator=g) / d_in**0.5 for r in ranks]
        ups = [torch.randn(d_out, r, device="cuda", generator=g) for r in ranks]
        gates = [(torch.rand(2, tokens // 2, 1, device="cuda", generator=g) > 0.5).float() for _ in ranks]
        c = lambda t: t.to(dtype)
        ref = multi_lora_reference(*(t.to(dtype).float() for t in (x, w, b)), [c(d).float() for d in downs],
                                   [c(u).float() for u in ups], [1.0] * len(ranks), gates)
        with torch.no_grad():
            out = multi_lora_triton(c(x), c(w), c(b), Packed.pack([c(d) for d in downs], [c(u) for u in ups], [1.0] * len(ranks)),
                                    [c(m) for m in gates])
        err = float((out.float() - ref).abs().max() / ref.abs().max())
        print(f"triton vs reference on cuda, {dtype}, {tokens}x{d_in}->{d_out}, ranks {ranks}: {err:.1e}",
              "ok" if err <= tol else f"OVER {tol:.0e}")
PY
timeout "${ATTENTION_TIMEOUT:-200}" python3 bench/attention.py --device cuda 2>&1 | tee "$OUT/attention.log"
cp docs/benchmarks.md "$OUT/"
timeout "${GRAPHS_TIMEOUT:-330}" python3 bench/speed.py --models sdxl --device cuda --resolution 1024 --repeats 5 --cuda-graphs 2>&1 | tee "$OUT/graphs.log"
cp docs/benchmarks.md "$OUT/"
timeout "${SPEED_TIMEOUT:-330}" python3 bench/speed.py --models sdxl --device cuda --resolution 1024 --repeats 5 2>&1 | tee "$OUT/speed.log"
cp docs/benchmarks.md "$OUT/"
