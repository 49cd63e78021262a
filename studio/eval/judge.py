"""The world judge: reads shape, colour, size, style, position and background off any image.

A small CNN trained on rendered scenes of every concept (held-out ones included). It predicts,
for each cell of the 3x3 position grid, whether an object is there and, if so, its attributes,
plus the background colour. Each cell also gets an embedding (the layer its attribute heads read),
which serves as the identity embedding: the studio's analogue of DINO/CLIP-I features.

>>> from studio.eval.judge import load_judge
>>> judge = load_judge()  # the weights shipped in assets/judge/
>>> from studio.world.render import Scene, WorldObject, render
>>> img = render(Scene((WorldObject("star", "red", "large", "left", "ringed"),), "white"))
>>> reading = judge.read([img])[0]
>>> [(o.shape, o.colour, o.position, o.style) for o in reading.objects]
[('star', 'red', 'left', 'ringed')]
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file, save_file
from torch import nn

from studio import ASSETS
from studio.world.concepts import COLOUR_NAMES, SHAPES, SIZE_NAMES, STYLES, cell_of, position_of_cell
from studio.world.render import Scene, render_array, sample_scene

DEFAULT_JUDGE = ASSETS / "judge" / "judge.safetensors"
HEADS: dict[str, tuple[str, ...]] = {"shape": SHAPES, "colour": COLOUR_NAMES, "size": SIZE_NAMES, "style": STYLES}
N_CELLS = 9
EMBED = 128


class JudgeNet(nn.Module):
    """CNN trunk on a 72x72 resize (so the 3x3 grid falls on whole 3x3 blocks of its 9x9 features),
    one MLP shared by all cells that turns a cell's block into its embedding, shared attribute heads,
    and a background head on the pooled trunk."""

    def __init__(self, widths: tuple[int, ...] = (32, 64, 128)) -> None:
        super().__init__()

        def block(cin: int, cout: int) -> nn.Sequential:
            return nn.Sequential(nn.Conv2d(cin, cout, 3, 2, 1), nn.GroupNorm(8, cout), nn.SiLU(),
                                 nn.Conv2d(cout, cout, 3, 1, 1), nn.GroupNorm(8, cout), nn.SiLU())

        w0, w1, w3 = widths
        self.stem = nn.Sequential(nn.Conv2d(3, w0, 3, 2, 1), nn.GroupNorm(8, w0), nn.SiLU())  # 72 -> 36
        self.trunk = nn.Sequential(block(w0, w1), block(w1, w3))  # 36 -> 9
        self.cell_mlp = nn.Sequential(nn.Linear(w3 * 9, 384), nn.SiLU(), nn.Linear(384, EMBED), nn.SiLU())
        self.presence = nn.Linear(EMBED, 1)
        self.heads = nn.ModuleDict({k: nn.Linear(EMBED, len(v)) for k, v in HEADS.items()})
        self.background = nn.Linear(w3, len(COLOUR_NAMES))

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """``x``: (B, 3, 64, 64) in [-1, 1]. Returns logits per cell and the cell embeddings."""
        x = F.interpolate(x, size=(72, 72), mode="bilinear", align_corners=False)
        h = self.trunk(self.stem(x))  # (B, C, 9, 9)
        b, c = h.shape[:2]
        cells = h.view(b, c, 3, 3, 3, 3).permute(0, 2, 4, 1, 3, 5).reshape(b, N_CELLS, c * 9)
        emb = self.cell_mlp(cells)
        out = {k: head(emb) for k, head in self.heads.items()}
        out["presence"] = self.presence(emb).squeeze(-1)
        out["background"] = self.background(h.mean(dim=(2, 3)))
        out["embedding"] = emb
        return out


@dataclass(frozen=True)
class ObjectReading:
    """One object the judge sees."""

    position: str
    shape: str
    colour: str
    size: str
    style: str
    confidence: float
    embedding: np.ndarray

    def attributes(self) -> dict[str, str]:
        return {"shape": self.shape, "colour": self.colour, "size": self.size, "position": self.position,
                "style": self.style}


@dataclass(frozen=True)
class SceneReading:
    """What the judge reads off one image."""

    objects: tuple[ObjectReading, ...]
    background: str


def to_tensor(images: list[Image.Image] | np.ndarray) -> torch.Tensor:
    """PIL images or a uint8 (B, H, W, 3) array -> (B, 3, 64, 64) float tensor in [-1, 1]."""
    if isinstance(images, np.ndarray):
        arr = images
    else:
        arr = np.stack([np.asarray(im.convert("RGB").resize((64, 64), Image.Resampling.BILINEAR)) for im in images])
    return torch.from_numpy(arr).permute(0, 3, 1, 2).float() / 127.5 - 1


class Judge:
    """The trained judge network with reading helpers."""

    def __init__(self, net: JudgeNet) -> None:
        self.net = net.eval()

    @torch.no_grad()
    def read(self, images: list[Image.Image] | np.ndarray, threshold: float = 0.5) -> list[SceneReading]:
        """Read every image: the objects present (one per occupied cell) and the background."""
        out = self.net(to_tensor(images))
        readings = []
        presence = out["presence"].sigmoid()
        for b in range(presence.shape[0]):
            objects = []
            for cell in range(N_CELLS):
                p = float(presence[b, cell])
                if p < threshold:
                    continue
                attrs = {k: HEADS[k][int(out[k][b, cell].argmax())] for k in HEADS}
                objects.append(ObjectReading(position=position_of_cell(cell), confidence=p,
                                             embedding=F.normalize(out["embedding"][b, cell], dim=0).numpy(), **attrs))
            readings.append(SceneReading(tuple(objects), COLOUR_NAMES[int(out["background"][b].argmax())]))
        return readings

    @torch.no_grad()
    def identity_embedding(self, images: list[Image.Image] | np.ndarray) -> torch.Tensor:
        """(B, 128) unit vectors: the embedding of each image's most confident object."""
        out = self.net(to_tensor(images))
        best = out["presence"].argmax(dim=1)
        emb = out["embedding"][torch.arange(best.shape[0]), best]
        return F.normalize(emb, dim=1)


def load_judge(path: str | Path = DEFAULT_JUDGE) -> Judge:
    """Load judge weights (safetensors) written by :func:`train_judge`."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"judge weights not found at {path}; train them with `studio eval train-judge`")
    state = load_file(str(path))
    net = JudgeNet()
    net.load_state_dict({k: v.float() for k, v in state.items()})
    return Judge(net)


def _targets(scenes: list[Scene]) -> dict[str, torch.Tensor]:
    b = len(scenes)
    t = {k: torch.full((b, N_CELLS), -100, dtype=torch.long) for k in HEADS}
    t["presence"] = torch.zeros(b, N_CELLS)
    t["background"] = torch.tensor([COLOUR_NAMES.index(s.background) for s in scenes])
    for i, s in enumerate(scenes):
        for o in s.objects:
            c = cell_of(o.position)
            t["presence"][i, c] = 1
            for k, names in HEADS.items():
                t[k][i, c] = names.index(getattr(o, k))
    return t


def render_batch(rng: random.Random, n: int) -> tuple[np.ndarray, list[Scene]]:
    """``n`` random scenes of every concept (held-out ones included) and their pixels."""
    scenes = [sample_scene(rng, shapes=SHAPES, styles=STYLES) for _ in range(n)]
    return np.stack([render_array(s, rng.randrange(2**31)) for s in scenes]), scenes


def _augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Blur and noise, so the judge reads generated images (softer, grainier) as well as renders."""
    b = x.shape[0]
    sigma = torch.rand(b, generator=gen) * 0.7
    k = torch.arange(-2, 3).float()
    kern = torch.exp(-(k[None] ** 2) / (2 * sigma[:, None].clamp(min=1e-3) ** 2))
    kern = kern / kern.sum(1, keepdim=True)
    blurred = torch.stack([
        F.conv2d(F.conv2d(F.pad(img[:, None], (2, 2, 2, 2), mode="replicate"), kern[i].view(1, 1, 1, 5)),
                 kern[i].view(1, 1, 5, 1))[:, 0]
        for i, img in enumerate(x)
    ])
    use = (torch.rand(b, generator=gen) < 0.4).view(b, 1, 1, 1)
    x = torch.where(use, blurred, x)
    noise = torch.randn(x.shape, generator=gen) * (torch.rand(b, 1, 1, 1, generator=gen) * 0.05)
    return (x + noise).clamp(-1, 1)


def judge_loss(out: dict[str, torch.Tensor], t: dict[str, torch.Tensor]) -> torch.Tensor:
    loss = F.binary_cross_entropy_with_logits(out["presence"], t["presence"])
    loss = loss + F.cross_entropy(out["background"], t["background"])
    for k in HEADS:
        loss = loss + F.cross_entropy(out[k].reshape(-1, out[k].shape[-1]), t[k].reshape(-1), ignore_index=-100)
    return loss


def evaluate_judge(judge: Judge, n: int = 2000, seed: int = 10_000) -> dict[str, float]:
    """Per-attribute accuracy on ``n`` freshly rendered scenes (a seed range training never uses)."""
    rng = random.Random(seed)
    correct = {k: 0 for k in ("position", *HEADS, "background")}
    total_objects = 0
    for start in range(0, n, 250):
        arr, scenes = render_batch(rng, min(250, n - start))
        for reading, scene in zip(judge.read(arr), scenes):
            correct["background"] += reading.background == scene.background
            seen = {o.position: o for o in reading.objects}
            for obj in scene.objects:
                total_objects += 1
                got = seen.get(obj.position)
                correct["position"] += got is not None and len(seen) == len(scene.objects)
                for k in HEADS:
                    correct[k] += got is not None and getattr(got, k) == getattr(obj, k)
    return {k: v / (n if k == "background" else total_objects) for k, v in correct.items()}


def train_judge(out_path: str | Path = DEFAULT_JUDGE, steps: int = 2500, batch: int = 64, seed: int = 0,
                lr: float = 2e-3, init: str | Path | None = None, progress: bool = True) -> dict[str, float]:
    """Train the judge on freshly rendered scenes (or go on training ``init``) and save it.

    Returns its accuracy per attribute on 2000 fresh scenes (:func:`evaluate_judge`).
    """
    from tqdm.auto import tqdm

    torch.manual_seed(seed)
    rng = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    net = load_judge(init).net.train() if init else JudgeNet()
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.05)
    bar = tqdm(range(steps), desc="judge", disable=not progress)
    for _ in bar:
        arr, scenes = render_batch(rng, batch)
        out = net(_augment(to_tensor(arr), gen))
        loss = judge_loss(out, _targets(scenes))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        bar.set_postfix(loss=f"{loss.item():.3f}")
    judge = Judge(net)
    scores = evaluate_judge(judge)
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_path.with_suffix(".tmp")
    # fp16 on disk (half the repository weight); loaded back as fp32.
    save_file({k: v.half().contiguous() for k, v in net.state_dict().items()}, str(tmp),
              metadata={"steps": str(steps), "seed": str(seed), "lr": str(lr), "init": str(init or ""),
                        "accuracy": json.dumps(scores)})
    tmp.replace(out_path)
    return scores
