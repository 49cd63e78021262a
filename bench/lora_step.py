"""One LoRA training step, side by side in one process: peft's layer forward and the default AdamW (what
diffusers' example script runs) against the studio's training path (peft's layers routed through
``studio.kernels.lora.lora_linear``, fused AdamW, and the attention of ``studio.trainers.attention``: fused
projections, the keys and values of each distinct prompt of the batch projected once).

The step is the DreamBooth trainer's on the embedded model: rank-8 LoRA on every attention projection of the
UNet (to_q, to_k, to_v, to_out.0), a batch of 8 (4 instance + 4 prior examples) at 64x64, fp32,
UNet forward, MSE loss, backward, optimizer step. Inputs are random (the cost does not depend on the values).
Every configuration is warmed up, then all run round-robin ``--repeats`` times ``--steps`` steps each; the table
gives medians and ratios. The outputs and LoRA gradients of each studio path are compared with peft's on the same
input.

    python bench/lora_step.py

Prints a table and writes the ``lora-step`` section of docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from report import git_revision, machine, write_section  # noqa: E402


def main() -> None:
    import torch
    from diffusers import UNet2DConditionModel
    from diffusers.models.attention_processor import AttnProcessor2_0
    from peft import LoraConfig, inject_adapter_in_model
    from peft.tuners.lora import Linear as PeftLinear
    from studio.trainers import attention
    from studio.trainers.attention import Prompts, TrainingAttnProcessor, use_training_attention
    from studio.trainers.dreambooth import UNET_TARGETS
    from studio.trainers.loop import use_lora_linear

    from studio.families import EMBEDDED_MODEL

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--steps", type=int, default=5, help="steps per timed run")
    args = parser.parse_args()

    torch.manual_seed(0)
    unet = UNet2DConditionModel.from_pretrained(str(EMBEDDED_MODEL), subfolder="unet").requires_grad_(False)
    paths = [n for n, _ in unet.named_modules() if n.endswith(UNET_TARGETS)]
    inject_adapter_in_model(LoraConfig(r=8, lora_alpha=8, target_modules=paths), unet)
    params = [p.requires_grad_(True) for n, p in unet.named_parameters() if "lora_" in n]
    for p in params:  # B starts at zero; make the adapter act, as it does after the first steps
        torch.nn.init.normal_(p, std=0.02)
    layers = [m for m in unet.modules() if type(m) is PeftLinear]
    cfg = unet.config
    g = torch.Generator().manual_seed(1)
    batch, side = 8, cfg.sample_size
    x = torch.randn(batch, cfg.in_channels, side, side, generator=g)
    t = torch.randint(0, 1000, (batch,), generator=g)
    prompts = torch.randn(2, 77, cfg.cross_attention_dim, generator=g)  # the instance prompt and the class prompt
    text = prompts[torch.tensor([0, 0, 0, 0, 1, 1, 1, 1])]
    use_training_attention(unet)  # the fused groups (the layers' weights become views: the same values for all)
    added = {"text_embeds": torch.randn(batch, cfg.projection_class_embeddings_input_dim - 6 * cfg.addition_time_embed_dim,
                                        generator=g),
             "time_ids": torch.tensor([[64.0, 64.0, 0.0, 0.0, 64.0, 64.0]]).repeat(batch, 1)}

    # the floor: the same UNet without LoRA, the backward reaching each adapted projection's output as with LoRA
    plain = UNet2DConditionModel.from_pretrained(str(EMBEDDED_MODEL), subfolder="unet").requires_grad_(False)
    plain.set_attn_processor(AttnProcessor2_0())

    def needs_grad(module, args, output):
        return output if output.requires_grad else output.requires_grad_(True)

    for name, module in plain.named_modules():
        if name in paths:
            module.register_forward_hook(needs_grad)

    distinct = attention.distinct_examples

    def whole(x):
        return Prompts(x, None, 0)

    def route(path: str) -> None:  # peft, layers (lora_linear), attention(-all) (lora_linear + the training attention)
        if path == "peft":
            for layer in layers:
                layer.__dict__.pop("forward", None)
        else:
            use_lora_linear(unet)
        unet.set_attn_processor(TrainingAttnProcessor() if path.startswith("attention") else AttnProcessor2_0())
        # attention-all: the training attention projecting every example's prompt (no distinct prompts)
        attention.distinct_examples = whole if path == "attention-all" else distinct

    def loss(path: str):
        if path == "floor":
            return (plain(x, t, text, added_cond_kwargs=added).sample - x).square().mean()
        return (unet(x, t, text, added_cond_kwargs=added).sample - x).square().mean()

    # the same sum: outputs and gradients of each path against peft's
    grads = {}
    for path in ("peft", "layers", "attention"):
        route(path)
        unet.zero_grad(set_to_none=True)
        value = loss(path)
        value.backward()
        grads[path] = (value.detach(), [p.grad.clone() for p in params])
    diffs = {path: ((grads[path][0] - grads["peft"][0]).abs().item(),
                    max((a - b).abs().max().item() / (b.abs().max().item() or 1.0)
                        for a, b in zip(grads[path][1], grads["peft"][1]))) for path in ("layers", "attention")}

    def adamw(fused: bool):
        return torch.optim.AdamW(params, lr=1e-4, weight_decay=1e-4, fused=fused)

    configs = {  # label: (path, optimizer)
        "peft layer, AdamW (diffusers' script)": ("peft", adamw(False)),
        "peft layer, fused AdamW": ("peft", adamw(True)),
        "studio: `lora_linear`, fused AdamW": ("layers", adamw(True)),
        "studio: `lora_linear`, fused AdamW, training attention, every example's prompt projected": ("attention-all",
                                                                                                     adamw(True)),
        "studio: `lora_linear`, fused AdamW, training attention (the trainer's path: each distinct prompt projected "
        "once)": ("attention", adamw(True)),
        "floor: the UNet without LoRA, forward and backward (no adapter, no optimizer)": ("floor", None),
    }

    def run(label: str, steps: int) -> float:
        path, opt = configs[label]
        if opt is not None:
            route(path)
        start = time.perf_counter()
        for _ in range(steps):
            value = loss(path)
            if opt is not None:
                opt.zero_grad(set_to_none=True)
            value.backward()
            if opt is not None:
                opt.step()
        return (time.perf_counter() - start) / steps

    for label in configs:
        run(label, 3)
    times: dict[str, list[float]] = {label: [] for label in configs}
    for rep in range(args.repeats):
        for label in configs:
            times[label].append(run(label, args.steps))
        print(f"repeat {rep}: " + ", ".join(f"{v[-1] * 1000:.0f}" for v in times.values()) + " ms/step", flush=True)
    base = statistics.median(next(iter(times.values())))
    table = "| step | ms per step (median) | vs peft layer + AdamW |\n|---|---|---|\n"
    for label, v in times.items():
        table += f"| {label} | {statistics.median(v) * 1000:.1f} | **{base / statistics.median(v):.2f}x** |\n"
    studio, floor = (statistics.median(times[label]) for label in list(configs)[-2:])
    text = (
        f"## One LoRA training step: peft's layer and AdamW against the studio's training path\n\n"
        f"Command: `python bench/lora_step.py --repeats {args.repeats} --steps {args.steps}` (revision "
        f"{git_revision()}; {machine()}). The embedded model's UNet, rank-8 LoRA on its {len(layers)} attention "
        f"projections, batch 8 at 64x64, fp32: forward, MSE loss, backward, optimizer step; {args.repeats} round-robin "
        f"repeats of {args.steps} steps after a warm-up, medians.\n\n{table}\n"
        + "".join(f"Against peft's path on the same input, `{path}` ({what}): loss differs by {diffs[path][0]:.1e}, LoRA "
                  f"gradients by at most {diffs[path][1]:.1e} of each gradient's largest entry.\n"
                  for path, what in (("layers", "lora_linear"), ("attention", "lora_linear and the training attention")))
        + f"\nThe floor (the same UNet without LoRA, its backward reaching every adapted projection's output): "
        f"{floor * 1000:.1f} ms. The studio's path costs {(studio - floor) * 1000:.1f} ms a step over it "
        f"({studio / floor:.2f}x the floor); peft's layer with AdamW {(base - floor) * 1000:.1f} ms "
        f"({base / floor:.2f}x). A trainer that keeps this arithmetic (eager, fp32) is at most "
        f"{base / floor:.2f}x faster than peft's path on this step, however cheap its LoRA; the studio's path leaves "
        f"out part of it (the cross-attention keys and values of 6 of the batch's 8 prompts, repeats of the other "
        f"two).\n"
    )
    print(text)
    write_section("lora-step", text)


if __name__ == "__main__":
    main()
