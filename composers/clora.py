"""CLoRA (Meral et al. 2024, "A Contrastive Approach to Compose Multiple LoRA Models").

The prompt names every concept ("a sks1 shape on the left and a sks2 shape on the right"); each concept's
``words`` are found among its tokens (in order: the second "shape" belongs to the second concept).

- **passes** (``mixing="noise"``, the official form and the default): at every step the pipeline's own pass is
  the base model's (no adapter), and concept k gets a pass of its own with only its adapter and its own prompt,
  the global prompt without the other concepts' identifiers ("a sks1 shape on the left and a shape on the
  right"); the noise prediction is the base's where no mask is set and concept k's inside its mask (shared where
  masks overlap), in both halves of the guidance batch: concept k's pass runs on the negative half too (the
  pipeline's negative conditioning, its adapter acting; the same UNet call as its prompt half), as the official
  code runs each LoRA on the whole guidance batch. ``guided=False`` mixes the prompt half only (the studio's form until 2026-12-04, one pass fewer per
  concept): the negative half stays the base's, so guidance multiplies each adapter's whole effect inside its mask. ``mixing="gates"`` is the studio's earlier one-pass form: each
  adapter's layers gated by its mask inside the pipeline's single pass.
- **attention maps**: the cross-attention probabilities of each concept's tokens in its pass, averaged over
  heads and over the layers at :meth:`Run.map_size` (the official code's 16x16 layers for SD1.5 at 512 px),
  read from the prompt half of the guidance batch only (the official code also averages in the negative half,
  which dilutes the maps);
- **contrastive latent update** (the first ``update_fraction`` of the steps): a gradient step on the
  latents against NT-Xent (temperature 0.5, cosine similarity) over the min-max normalised token maps of every
  pass, where maps of the same concept are positives and maps of different concepts negatives; taken in the
  UNet's input scale (unit variance, as the official code's DDIM latents), with the official step size 20;
- **masks**: a pixel belongs to concept k where its map (the mean of its tokens' maps) exceeds
  ``threshold`` (0.4, the official notebook's value) times that map's maximum, both counted from the
  map's minimum.

``refine_steps`` (fractions of the schedule; the paper's steps 0, 10 and 20 of 50 are ``(0.0, 0.2, 0.4)``) adds the
paper's iterative refinement (Attend-and-Excite's schedule): at those steps the latents take up to
``refine_iterations`` updates, each where the previous one left them, before the step's own update; with
``refine_target`` set, they stop once the loss is at or below it (NT-Xent does not reach 0: its floor depends on
how many maps are positives and negatives). Off by default: on the composition benchmark it changed no rate by
more than a seed or two's worth (docs/benchmarks.md, ``clora-refine``).

**Regions** (the studio's, not the paper's): where a concept has a region (``Concept.region``, the same boxes
LoRA-Composer takes), its mask is confined to it: its map is normalised by its minimum and maximum inside the region
and thresholded there, and nothing outside is set. So a concept goes where the user put it even where its tokens'
maps do not say where it is ("What the masks need", below), and still keeps to its tokens' map inside the box
where they do.
``regions=False`` ignores them (the paper's form). ``reinit=True`` (the studio's, off by default) also borrows
LoRA-Composer's latent re-initialisation: before the first step each concept's pass reads its map, and the window of
the start latents where that map is highest, of its region's size, is copied into the region
(:func:`studio.composers.lora_composer.reinitialise`). On the composition benchmark it changed no rate for the better
(docs/benchmarks.md, ``clora-reinit``).

``clause_words=True`` widens each concept's tokens to the content words of the prompt's clause that names it
("sks shape left"). ``exclusive=True`` gives a pixel where masks overlap to the concept whose normalised map is
highest there instead of sharing it. Neither changed the composition benchmark's rates (docs/benchmarks.md).
``layout=True`` (the studio's, not the paper's) takes the masks from the base pass instead: the maps of the words that
place each concept in the global prompt (its clause's content words other than its own, "left"), for models whose
identifiers' maps do not say where a concept goes; measured in docs/benchmarks.md (``clora-layout``).

What the masks need: words whose maps lie on their object. Identifiers split into characters, and on the
embedded model so does the class noun "shape": their maps are flat at every head, with or without the adapter
(measured, docs/benchmarks.md), so the masks cannot place concepts that a prompt names by token alone; named with
a word the model knows ("a blue sks shape"), they do.
"""

from __future__ import annotations

import re

import torch
import torch.nn.functional as F
from studio.composers.base import STOP_WORDS, Composer, Run, concept_clause, default_attention, token_positions


def nt_xent(embeddings: torch.Tensor, labels: torch.Tensor, temperature: float = 0.5) -> torch.Tensor:
    """NT-Xent over ``embeddings`` (M, D) with class ``labels`` (M,): for each positive pair (a, p),
    ``-log(exp(s_ap/T) / (exp(s_ap/T) + sum_n exp(s_an/T)))`` with cosine similarity ``s`` over a's
    negatives n, averaged over pairs. Without a positive pair, the mean of ``exp(s/T)`` over negatives."""
    z = F.normalize(embeddings, dim=-1)
    sim = z @ z.T / temperature
    same = labels[:, None] == labels[None, :]
    eye = torch.eye(len(labels), dtype=torch.bool, device=labels.device)
    pos, neg = same & ~eye, ~same
    if not neg.any():
        return sim.sum() * 0
    if not pos.any():
        return sim[neg].exp().mean()
    neg_sum = (sim.exp() * neg).sum(1, keepdim=True)  # (M, 1)
    losses = -(sim - torch.log(sim.exp() + neg_sum))
    return losses[pos].mean()


def concept_words(run: Run, clause_words: bool) -> list[str]:
    """The words whose tokens stand for each concept: its ``words`` ("sks shape"), or with ``clause_words`` the
    content words of the prompt's clause that names it ("sks shape left" of "a sks shape on the left and ...")."""
    if not clause_words:
        return [c.words for c in run.concepts]
    out = []
    for c in run.concepts:
        clause = concept_clause(run.prompt, c)
        out.append(" ".join(w for w in clause.split() if w.lower() not in STOP_WORDS) if clause else c.words)
    return out


def concept_tokens(run: Run, clause_words: bool = False) -> list[list[int]]:
    """Each concept's token positions in the global prompt; an error names a concept the prompt does not name."""
    found = token_positions(run.pipe.tokenizer, run.prompt, concept_words(run, clause_words))
    for c, positions in zip(run.concepts, found):
        if not positions:
            raise ValueError(f"concept {c.name!r}: none of its words {c.words!r} is in the prompt {run.prompt!r};"
                             " name each concept in the prompt (its token and class noun)")
    return found


class CLoRA(Composer):
    name = "clora"
    needs_attention = True
    places = True
    static_gates = False  # the gates follow each step's attention maps

    def __init__(self, step_size: float = 20.0, update_fraction: float = 0.5, threshold: float = 0.4,
                 temperature: float = 0.5, latent_update: bool = True, clause_words: bool = False,
                 mixing: str = "noise", exclusive: bool = False, layout: bool = False, guided: bool = True,
                 refine_steps: tuple[float, ...] = (), refine_iterations: int = 10, refine_target: float | None = None,
                 regions: bool = True, reinit: bool = False):
        self.regions, self.reinit = regions, reinit
        if reinit and mixing != "noise":
            raise ValueError("CLoRA reinit reads each concept's own pass: it needs mixing='noise'")
        self.step_size, self.update_fraction, self.clause_words = step_size, update_fraction, clause_words
        if any(not 0 <= f < 1 for f in refine_steps) or refine_iterations < 1:
            raise ValueError(f"CLoRA refine_steps {refine_steps!r}: fractions of the schedule in [0, 1);"
                             f" refine_iterations {refine_iterations}: at least 1")
        self.refine_steps, self.refine_iterations, self.refine_target = tuple(refine_steps), refine_iterations, refine_target
        self.guided = guided
        self.exclusive, self.layout = exclusive, layout
        self.threshold, self.temperature, self.latent_update = threshold, temperature, latent_update
        if mixing not in ("noise", "gates"):
            raise ValueError(f"CLoRA mixing {mixing!r}: choose noise (one pass per LoRA, the official) or gates (one pass)")
        self.mixing = mixing
        if layout and mixing != "noise":
            raise ValueError("CLoRA layout masks come from the base pass of mixing='noise'")
        self.plain_pipeline_pass = mixing == "noise"

    def prepare(self, run: Run) -> None:
        run.state["tokens"] = concept_tokens(run, self.clause_words)
        run.state["maps"] = []
        run.state["pass"] = None
        if self.mixing == "noise":
            prompts = [lora_prompt(run.prompt, run.concepts, k) for k in range(len(run.concepts))]
            run.state["lora_prompts"] = prompts
            run.state["lora_cond"] = [run.encode([p], only=k) for k, p in enumerate(prompts)]
            words = concept_words(run, self.clause_words)
            run.state["lora_tokens"] = [token_positions(run.pipe.tokenizer, p, words) for p in prompts]
        if self.layout:  # each concept's clause words that are not its own (its place: "left"), in the global prompt
            own = [set(c.words.lower().split()) for c in run.concepts]
            placing = [" ".join(w for w in ws.split() if w.lower() not in o)
                       for ws, o in zip(concept_words(run, clause_words=True), own)]
            found = token_positions(run.pipe.tokenizer, run.prompt, placing)
            run.state["layout_tokens"] = [f if f else t for f, t in zip(found, run.state["tokens"])]

    def pass_tokens(self, run: Run) -> list[list[int]]:
        """Each concept's token positions in the prompt of the pass being run."""
        k = run.state.get("pass")
        if k is None and self.layout:
            return run.state["layout_tokens"]  # the base pass: the words that place each concept
        return run.state["tokens"] if k is None else run.state["lora_tokens"][k]

    def attention(self, run: Run, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None):
        n_tokens = hidden_states.shape[1] if hidden_states.ndim == 3 else hidden_states.shape[2] * hidden_states.shape[3]
        read = encoder_hidden_states is not None and min(h_w := run.spatial_hw(n_tokens)) == run.map_size()
        if self.mixing == "noise" and run.state.get("pass") is None and not self.layout:
            read = False  # the pipeline's own pass is the base model's: its maps are not the concepts'
        if not read:
            return default_attention(attn, hidden_states, encoder_hidden_states, attention_mask, temb)
        probs: list = []
        out = default_attention(attn, hidden_states, encoder_hidden_states, attention_mask, temb, probs_out=probs)
        p = probs[0][-run.batch :].mean(1)  # prompt half, mean over heads: (B, N, T)
        tokens = [i for ts in self.pass_tokens(run) for i in ts]
        run.state["maps"].append(p[..., tokens].transpose(1, 2).reshape(p.shape[0], len(tokens), *h_w))
        return out

    def token_maps(self, run: Run) -> torch.Tensor:
        """(B, M, h, w): every concept token's map, averaged over the layers of the last pass."""
        maps = torch.stack(run.state["maps"]).mean(0)
        run.state["maps"] = []
        return maps

    def labels(self, run: Run, device, tokens: list[list[int]] | None = None) -> torch.Tensor:
        tokens = run.state["tokens"] if tokens is None else tokens
        return torch.tensor([k for k, ts in enumerate(tokens) for _ in ts], device=device)

    def masks(self, run: Run, maps: torch.Tensor, tokens: list[list[int]] | None = None) -> torch.Tensor:
        """(B, K, h, w) float masks from the token maps of one pass over the global prompt (``tokens``: the
        concepts' tokens there, by default their own)."""
        concept = self.concept_maps(maps, self.labels(run, maps.device, tokens), len(run.concepts))
        return self.threshold_masks(concept, self.region_masks(run, *concept.shape[-2:]))

    def region_masks(self, run: Run, h: int, w: int) -> torch.Tensor | None:
        """(K, h, w) bool: each concept's region, all of the image for one without; None with ``regions`` off or
        no region given."""
        if not self.regions or all(c.region is None for c in run.concepts):
            return None
        key = ("clora-regions", h, w)  # the same for every step of a run
        if key not in run.state:
            run.state[key] = torch.stack([run.region_mask(c.region, h, w) > 0 if c.region is not None
                                          else torch.ones(h, w, dtype=torch.bool) for c in run.concepts])
        return run.state[key]

    @staticmethod
    def concept_maps(maps: torch.Tensor, labels: torch.Tensor, n: int) -> torch.Tensor:
        """(B, n, h, w): each concept's map, the mean of its tokens' maps."""
        return torch.stack([maps[:, labels == k].mean(1) for k in range(n)], 1)

    def threshold_masks(self, concept: torch.Tensor, regions: torch.Tensor | None = None) -> torch.Tensor:
        """Each concept's map above ``threshold`` times its maximum, both counted from the map's minimum; with
        ``regions`` ((K, h, w) bool), minimum and maximum inside concept k's region, and the mask only there. (The
        official code takes the union of per-token masks over raw maps; SD's maps are near zero off the object,
        ours are not, and identifiers that split into many tokens, as rare words do, make that union cover the
        whole image.)"""
        concept = concept.detach().float()
        inside = torch.ones_like(concept, dtype=torch.bool) if regions is None else regions.to(concept.device).expand_as(concept)
        lo = concept.masked_fill(~inside, float("inf")).flatten(2).amin(-1)[..., None, None]
        hi = concept.masked_fill(~inside, float("-inf")).flatten(2).amax(-1)[..., None, None]
        norm = (concept - lo) / (hi - lo).clamp_min(1e-8)
        masks = (norm > self.threshold) & inside
        if self.exclusive:  # each pixel to the concept whose normalised map is highest there: no shared pixels
            masks &= F.one_hot(norm.masked_fill(~inside, float("-inf")).argmax(1), norm.shape[1]).permute(0, 3, 1, 2).bool()
        return masks.float()

    def loss(self, run: Run, maps: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        flat = maps.flatten(2).float()
        lo, hi = flat.amin(-1, keepdim=True), flat.amax(-1, keepdim=True)
        flat = (flat - lo) / (hi - lo).clamp_min(1e-8)
        labels = self.labels(run, maps.device) if labels is None else labels
        return torch.stack([nt_xent(flat[b], labels, self.temperature) for b in range(flat.shape[0])]).mean()

    # -- the official form: one pass per LoRA with its own prompt, noise predictions mixed by the masks ----------
    def lora_passes(self, run: Run, x: torch.Tensor, t, negative: torch.Tensor | None = None):
        """Concept k's pass for every k (its prompt, only its adapter) on the UNet input ``x``: the noise
        predictions, each pass's token maps (B, M_k, h, w), their concept labels, and with ``negative`` (the
        negative half's UNet input) each pass's predictions there too, in the same UNet call (the pipeline's
        negative conditioning for those rows; the maps read from the prompt rows only)."""
        preds, maps, labels, negatives = [], [], [], []
        try:
            for k in range(len(run.concepts)):
                run.state["pass"], run.state["maps"] = k, []
                cond = run.state["lora_cond"][k]
                if negative is None:
                    preds.append(run.unet_call(x, t, scaled=True, cond=cond, only=k))
                else:
                    out = run.pipeline_rows(torch.cat([negative, x]), t, slice(0, len(negative)), only=k, cond=cond)
                    negatives.append(out[: len(negative)])
                    preds.append(out[len(negative):])
                maps.append(self.token_maps(run))
                labels.append(self.labels(run, x.device, run.state["lora_tokens"][k]))
        finally:
            run.state["pass"], run.state["maps"] = None, []
        return preds, maps, labels, negatives

    def pass_masks(self, run: Run, maps: list[torch.Tensor], labels: list[torch.Tensor]) -> torch.Tensor:
        """(B, K, h, w): concept k's mask from its tokens' map in its own pass."""
        n = len(run.concepts)
        concept = torch.stack([self.concept_maps(m, lab, n)[:, k] for k, (m, lab) in enumerate(zip(maps, labels))], 1)
        return self.threshold_masks(concept, self.region_masks(run, *concept.shape[-2:]))

    @staticmethod
    def mix(base: torch.Tensor, preds: list[torch.Tensor], masks: torch.Tensor) -> torch.Tensor:
        """``base`` where no mask is set, concept k's prediction where only its mask is; where masks overlap,
        each at 1/n."""
        m = F.interpolate(masks.to(base.dtype), size=base.shape[-2:], mode="nearest")
        share = m / m.sum(1, keepdim=True).clamp_min(1.0)
        out = base * (1 - share.sum(1, keepdim=True))
        for k, pred in enumerate(preds):
            out = out + share[:, k : k + 1] * pred
        return out

    def unet_output(self, run: Run, latents: torch.Tensor, t, sample: torch.Tensor) -> torch.Tensor | None:
        if self.mixing != "noise":
            return None
        b = run.batch
        base_maps = self.token_maps(run) if self.layout and run.state["maps"] else None  # the pipeline's own pass
        negative = sample[:-b]
        guided = self.guided and len(negative)  # each concept's pass on the negative half too, in the same call
        with torch.no_grad():
            preds, maps, labels, negatives = self.lora_passes(run, latents[-b:], t, latents[:-b] if guided else None)
        if base_maps is not None:
            masks = self.masks(run, base_maps, run.state["layout_tokens"])
        else:
            masks = self.pass_masks(run, maps, labels)
        run.state["masks"] = masks
        if guided:  # mixed by the same masks
            negative = self.mix(negative, negatives, masks)
        return torch.cat([negative, self.mix(sample[-b:], preds, masks)])

    def loss_grad(self, run: Run, x: torch.Tensor, t) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The contrastive loss at the UNet input ``x``, its gradient there, and the maps it was taken over."""
        x = x.detach().requires_grad_(True)
        run.state["maps"] = []
        with torch.enable_grad():
            if self.mixing == "noise":  # the maps of every pass: a concept's maps are positives across passes
                _, maps, labels, _ = self.lora_passes(run, x, t)
                maps, labels = torch.cat(maps, 1), torch.cat(labels)
            else:
                run.unet_call(x, t, scaled=True)
                maps, labels = self.token_maps(run), None
            loss = self.loss(run, maps, labels)
            grad = torch.autograd.grad(loss, x)[0]
        run.state.setdefault("losses", []).append(float(loss.detach()))
        run.state.setdefault("grad_norms", []).append(float(grad.norm()))
        return loss.detach(), grad, maps.detach()

    def refine_at(self, steps: int) -> set[int]:
        """The steps (of ``steps``) where the latents are refined repeatedly."""
        return {min(steps - 1, round(f * steps)) for f in self.refine_steps}

    def reinitialise(self, run: Run, t, latents: torch.Tensor) -> torch.Tensor:
        """LoRA-Composer's latent re-initialisation before the first step (``reinit``, the studio's): each concept's
        map in its own pass decides which window of the start latents is copied into its region."""
        from studio.composers.lora_composer import reinitialise

        x, _ = run.model_input(latents, t)
        with torch.no_grad():
            _, maps, labels, _ = self.lora_passes(run, x, t)
        n = len(run.concepts)
        concept = [self.concept_maps(m, lab, n)[:, k] for k, (m, lab) in enumerate(zip(maps, labels))]
        return reinitialise(latents, concept, [c.region for c in run.concepts])

    def edit_latents(self, run: Run, i: int, t, latents: torch.Tensor) -> torch.Tensor:
        n = len(run.pipe.scheduler.timesteps)
        n_update = round(self.update_fraction * n)
        if i == 0 and self.reinit and any(c.region is not None for c in run.concepts):
            latents = self.reinitialise(run, t, latents)
        if self.latent_update and i < n_update:
            x, factor = run.model_input(latents, t)
            x = x.detach()
            loss, grad, maps = self.loss_grad(run, x, t)
            if i in self.refine_at(n):  # Attend-and-Excite's iterative refinement: update until the loss is low
                for _ in range(self.refine_iterations):
                    if self.refine_target is not None and float(loss) <= self.refine_target:
                        break
                    x = x - self.step_size * grad
                    loss, grad, maps = self.loss_grad(run, x, t)
                run.state.setdefault("refined", []).append(i)
            latents = (x - self.step_size * grad) * factor
            if self.mixing == "gates":
                run.state["masks"] = self.masks(run, maps)
        elif self.mixing == "gates" and run.state["maps"]:
            run.state["masks"] = self.masks(run, self.token_maps(run))
        run.state["maps"] = []
        return latents

    def gate(self, run: Run, stack, x, k):
        masks = run.state.get("masks")
        weight = run.concepts[k].weight
        if masks is None or self.mixing == "noise":  # noise: passes run one adapter each, ungated
            return weight
        h, w = run.layer_hw(x)
        m = F.interpolate(masks, size=(h, w), mode="nearest")
        m = m[:, k] / m.sum(1).clamp_min(1.0)  # (B, h, w); overlaps shared
        if x.shape[0] != m.shape[0]:
            m = m.repeat(x.shape[0] // m.shape[0], 1, 1)  # guidance batch: [negative; prompt]
        return weight * run.token_mask(m, x)


def lora_prompt(prompt: str, concepts, k: int) -> str:
    """Concept ``k``'s pass prompt: the global prompt without the other concepts' identifiers ("a sks shape on the
    left and a shape on the right" for the first of "a sks shape on the left and a zwx shape on the right"), as
    the official code gives each LoRA the prompt with only its own token."""
    out = prompt
    for j, c in enumerate(concepts):
        if j != k and c.words:
            token = c.words.split()[0]
            out = re.sub(rf"(^|\s|,){re.escape(token)}(?=\s|,|$)", r"\1", out)
    out = re.sub(r"\s+", " ", out)
    out = re.sub(r"\s*,(\s*,)+", ",", out).strip(" ,")
    return out.replace(" ,", ",")
