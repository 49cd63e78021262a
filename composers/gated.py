"""Gated fusion, in the manner of AutoLoRA's fine-grained gates.

Adapter k's weight in a layer at a step is ``w_k * gate[k, layer, bucket(t)] * token_gate_k(x)``:

- ``gate``: ``2 * sigmoid(logit)`` per adapter, per layer (every UNet layer an adapter targets) and per
  timestep bucket (``buckets`` equal slices of the 1000 training timesteps); logits start at 0, so the
  untrained gate is 1 everywhere;
- ``token_gate`` (``token_gates=True``, the training-free default): on every token, each adapter's update
  ``|dW_k x|`` is compared with the strongest one's; adapter k keeps ``(|dW_k x| / max_j |dW_j x|)^sharpness``
  of its weight. Where one adapter clearly responds to a token (its subject) the others step back; where
  they respond alike all act, as in the naive sum.

:meth:`Gated.fit` is the short gate-training step: the adapters stay frozen and only the gate logits learn,
from the denoising loss on each concept's own training images with every adapter attached (each image's
prompt is its concept's prompt), so a gate closes where an adapter disturbs another concept's images.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from studio.composers.base import Composer, Concept, Run
from tqdm.auto import tqdm

NUM_TRAIN_TIMESTEPS = 1000


class Gated(Composer):
    name = "gated"
    static_gates = False  # the gates follow the timestep and each token's adapter responses
    places = True

    def __init__(self, token_gates: bool = True, sharpness: float = 2.0, buckets: int = 4,
                 logits: torch.Tensor | None = None):
        if buckets < 1:
            raise ValueError(f"buckets must be at least 1, got {buckets}")
        self.token_gates, self.sharpness, self.buckets = token_gates, sharpness, buckets
        self.logits = logits  # (K, layers, buckets), set by ``fit`` or given

    def prepare(self, run: Run) -> None:
        from studio.plugin import LoraStack

        stacks = [m for m in run.pipe.unet.modules() if isinstance(m, LoraStack) and m.router is run]
        run.state["layer"] = {id(s): i for i, s in enumerate(stacks)}
        shape = (len(run.concepts), len(stacks), self.buckets)
        if self.logits is None or tuple(self.logits.shape) != shape:
            if self.logits is not None:
                raise ValueError(f"gate logits have shape {tuple(self.logits.shape)}, this composition needs {shape}"
                                 " (concepts, adapted layers, timestep buckets); fit the gates for these adapters")
            self.logits = torch.zeros(shape)

    def bucket(self, run: Run) -> int:
        t = run.timestep
        t = float(t.flatten()[0]) if isinstance(t, torch.Tensor) else float(t or 0)
        return min(self.buckets - 1, max(0, int(t * self.buckets / NUM_TRAIN_TIMESTEPS)))

    def gate(self, run: Run, stack, x, k):
        layer = run.state["layer"].get(id(stack))
        weight = run.concepts[k].weight
        if layer is not None:
            weight = weight * 2 * torch.sigmoid(self.logits[k, layer, self.bucket(run)]).to(x.dtype)
        if not self.token_gates or len(run.concepts) < 2:
            return weight
        responses = self._responses(run, stack, x)
        if responses is None or k not in responses:
            return weight
        top = torch.stack(list(responses.values())).amax(0).clamp_min(1e-12)
        return weight * (responses[k] / top) ** self.sharpness

    def _responses(self, run: Run, stack, x) -> dict[int, torch.Tensor] | None:
        """|dW_k x| per token for every composed adapter on this layer (computed once per call).

        On a Linear layer without the up-projection: ``|s U z| = sqrt(z^T ((sU)^T (sU)) z)`` with ``z = D x``, all
        adapters' ``z`` from one GEMM with the layer's packed downs and each ``(sU)^T (sU)`` (rank x rank) kept per
        layer, so a token costs ``d_in R + sum r^2`` instead of ``(d_in + d_out) R``."""
        cache = run.state.get("responses")
        if cache is not None and cache[0] is stack and cache[1] is x:
            return cache[2]
        out = {}
        with torch.no_grad():
            if isinstance(stack.base, torch.nn.Linear):
                packed = stack.packed()
                grams = run.state.setdefault("grams", {})
                entry = grams.get(id(stack))
                if entry is None or entry[0] is not packed:
                    up = packed.up_t.float()  # rows: each adapter's (s U)^T
                    entry = grams[id(stack)] = (packed, [up[a:b] @ up[a:b].T for a, b in packed.bounds])
                _, gram = entry
                z = (x @ packed.down.T).float()
                for i, (name, (a, b)) in enumerate(zip(stack.names, packed.bounds)):
                    k = run.index.get(name)
                    if k is None:
                        continue
                    zk = z[..., a:b]
                    out[k] = ((zk @ gram[i]) * zk).sum(-1, keepdim=True).clamp_min(0).sqrt().to(x.dtype)
            else:  # a convolution: its output channels are on dim 1
                for name, d, u, s in zip(stack.names, stack.downs, stack.ups, stack.scales):
                    k = run.index.get(name)
                    if k is not None:
                        out[k] = (s * u(d(x))).norm(dim=1, keepdim=True)
        run.state["responses"] = (stack, x, out)
        return out

    def fit(self, pipe, concepts: list[Concept], folders: list[str | Path], steps: int = 100, lr: float = 0.05,
            seed: int = 0, progress: bool = True) -> list[float]:
        """Train the gate logits on each concept's images (``folders[k]`` for concept k); returns the losses. Style
        concepts (``Concept.style``) have no gates: they and their folders are left out."""
        from diffusers import DDPMScheduler
        from studio.composers.base import composing
        from studio.trainers.data import load_images

        if len(folders) != len(concepts):
            raise ValueError(f"give one image folder per concept: {len(concepts)} concepts, {len(folders)} folders")
        folders = [f for c, f in zip(concepts, folders) if not c.style]
        concepts = [c for c in concepts if not c.style]
        size = pipe.unet.config.sample_size * getattr(pipe, "vae_scale_factor", 8)
        vae = pipe.vae
        latents = []
        for folder in folders:
            images, _ = load_images(folder, size)
            if not images:
                raise ValueError(f"no readable images in {folder}")
            pixels = torch.stack([torch.from_numpy(np.array(im.image)).permute(2, 0, 1) for im in images])
            with torch.no_grad():
                dist = vae.encode(pixels.to(vae.device, vae.dtype) / 127.5 - 1).latent_dist
            latents.append(dist.mean * vae.config.scaling_factor)
        sched = DDPMScheduler.from_config(pipe.scheduler.config)
        g = torch.Generator().manual_seed(seed)
        losses = []
        with composing(pipe, self, " ", concepts) as run:
            conds = [run.encode([c.prompt], only=None) for c in concepts]
            self.logits = self.logits.clone().requires_grad_(True)
            opt = torch.optim.Adam([self.logits], lr=lr)
            for step in tqdm(range(steps), desc="gates", disable=not progress):
                k = step % len(concepts)
                x0 = latents[k][torch.randint(0, len(latents[k]), (1,), generator=g)]
                noise = torch.randn(x0.shape, generator=g).to(x0)
                t = torch.randint(0, sched.config.num_train_timesteps, (1,), generator=g).to(x0.device)
                target = sched.get_velocity(x0, noise, t) if sched.config.prediction_type == "v_prediction" else noise
                kwargs = {"encoder_hidden_states": conds[k]["embeds"]}
                if "pooled" in conds[k]:
                    from studio.families import sdxl_time_ids

                    kwargs["added_cond_kwargs"] = {"text_embeds": conds[k]["pooled"],
                                                   "time_ids": sdxl_time_ids(size, size, 1).to(x0)}
                pred = pipe.unet(sched.add_noise(x0, noise, t), t, **kwargs).sample
                loss = torch.nn.functional.mse_loss(pred.float(), target.float())
                opt.zero_grad()
                loss.backward()
                opt.step()
                losses.append(float(loss.detach()))
        self.logits = self.logits.detach()
        return losses
