"""CLoRA (Meral et al. 2024, "A Contrastive Approach to Compose Multiple LoRA Models"), in the studio's
one-pass form.

The prompt names every concept ("a sks1 shape on the left and a sks2 shape on the right"); each concept's
``words`` are found among its tokens (in order: the second "shape" belongs to the second concept).

- **attention maps**: the cross-attention probabilities of each concept's tokens, averaged over heads and
  over the layers at :meth:`Run.map_size` (the official code's 16x16 layers for SD1.5 at 512 px), read
  from the prompt half of the guidance batch only (the official code also averages in the negative half,
  which dilutes the maps);
- **contrastive latent update** (the first ``update_fraction`` of the steps): a gradient step on the
  latents against NT-Xent (temperature 0.5, cosine similarity) over the min-max normalised token maps,
  where maps of the same concept are positives and maps of different concepts negatives; taken in the
  UNet's input scale (unit variance, as the official code's DDIM latents), with the official step size 20;
- **masks**: a pixel belongs to concept k where its map (the mean of its tokens' maps) exceeds
  ``threshold`` (0.4, the official notebook's value) times that map's maximum, both counted from the
  map's minimum; adapter k acts only there (where masks overlap,
  each at 1/number), and the background gets the base model. The masks of step i come from the update
  pass of step i, or later from the pipeline's own pass of step i - 1.

``clause_words=True`` widens each concept's tokens to the content words of the prompt's clause that names it
("sks shape left"), so that a position word's map can place the concept; on the embedded model it does not help
(its cross-attention maps are nearly flat for every word, position words included: docs/benchmarks.md).

The official code runs one UNet pass per prompt (base prompt without LoRA, each LoRA with its own prompt)
and mixes the noise predictions with the masks; here the masks gate each adapter's layers inside a single
pass (the kernels issue's premise), and the contrastive loss compares the token maps of that one pass.
"""

from __future__ import annotations

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

    def __init__(self, step_size: float = 20.0, update_fraction: float = 0.5, threshold: float = 0.4,
                 temperature: float = 0.5, latent_update: bool = True, clause_words: bool = False):
        self.step_size, self.update_fraction, self.clause_words = step_size, update_fraction, clause_words
        self.threshold, self.temperature, self.latent_update = threshold, temperature, latent_update

    def prepare(self, run: Run) -> None:
        run.state["tokens"] = concept_tokens(run, self.clause_words)
        run.state["maps"] = []

    def attention(self, run: Run, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None):
        n_tokens = hidden_states.shape[1] if hidden_states.ndim == 3 else hidden_states.shape[2] * hidden_states.shape[3]
        if encoder_hidden_states is None or min(h_w := run.spatial_hw(n_tokens)) != run.map_size():
            return default_attention(attn, hidden_states, encoder_hidden_states, attention_mask, temb)
        probs: list = []
        out = default_attention(attn, hidden_states, encoder_hidden_states, attention_mask, temb, probs_out=probs)
        p = probs[0][-run.batch :].mean(1)  # prompt half, mean over heads: (B, N, T)
        tokens = [i for ts in run.state["tokens"] for i in ts]
        run.state["maps"].append(p[..., tokens].transpose(1, 2).reshape(p.shape[0], len(tokens), *h_w))
        return out

    def token_maps(self, run: Run) -> torch.Tensor:
        """(B, M, h, w): every concept token's map, averaged over the layers of the last pass."""
        maps = torch.stack(run.state["maps"]).mean(0)
        run.state["maps"] = []
        return maps

    def labels(self, run: Run, device) -> torch.Tensor:
        return torch.tensor([k for k, ts in enumerate(run.state["tokens"]) for _ in ts], device=device)

    def masks(self, run: Run, maps: torch.Tensor) -> torch.Tensor:
        """(B, K, h, w) float masks: each concept's map (the mean of its tokens' maps) above ``threshold`` times
        its maximum, both counted from the map's minimum. (The official code takes the union of per-token masks
        over raw maps; SD's maps are near zero off the object, ours are not, and identifiers that split into
        many tokens, as rare words do, make that union cover the whole image.)"""
        maps = maps.detach().float()
        labels = self.labels(run, maps.device)
        concept = torch.stack([maps[:, labels == k].mean(1) for k in range(len(run.concepts))], 1)  # (B, K, h, w)
        flat = concept.flatten(2)
        lo, hi = flat.amin(-1)[..., None, None], flat.amax(-1)[..., None, None]
        return ((concept - lo) > self.threshold * (hi - lo)).float()

    def loss(self, run: Run, maps: torch.Tensor) -> torch.Tensor:
        flat = maps.flatten(2).float()
        lo, hi = flat.amin(-1, keepdim=True), flat.amax(-1, keepdim=True)
        flat = (flat - lo) / (hi - lo).clamp_min(1e-8)
        labels = self.labels(run, maps.device)
        return torch.stack([nt_xent(flat[b], labels, self.temperature) for b in range(flat.shape[0])]).mean()

    def edit_latents(self, run: Run, i: int, t, latents: torch.Tensor) -> torch.Tensor:
        n_update = round(self.update_fraction * len(run.pipe.scheduler.timesteps))
        if self.latent_update and i < n_update:
            x, factor = run.model_input(latents, t)
            x = x.detach().requires_grad_(True)
            run.state["maps"] = []
            with torch.enable_grad():
                run.unet_call(x, t, scaled=True)
                maps = self.token_maps(run)
                loss = self.loss(run, maps)
                grad = torch.autograd.grad(loss, x)[0]
            run.state.setdefault("losses", []).append(float(loss.detach()))
            latents = (x.detach() - self.step_size * grad) * factor
            run.state["masks"] = self.masks(run, maps)
        elif run.state["maps"]:
            run.state["masks"] = self.masks(run, self.token_maps(run))
        run.state["maps"] = []
        return latents

    def gate(self, run: Run, stack, x, k):
        masks = run.state.get("masks")
        weight = run.concepts[k].weight
        if masks is None:
            return weight
        h, w = run.layer_hw(x)
        m = F.interpolate(masks, size=(h, w), mode="nearest")
        m = m[:, k] / m.sum(1).clamp_min(1.0)  # (B, h, w); overlaps shared
        if x.shape[0] != m.shape[0]:
            m = m.repeat(x.shape[0] // m.shape[0], 1, 1)  # guidance batch: [negative; prompt]
        return weight * run.token_mask(m, x)
