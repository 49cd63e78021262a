"""--class-prompts captions: class images drawn from each instance caption without the identifier (kohya's captioned
regularisation images), each trained on its own caption."""

import random
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image
from studio.trainers.data import without_token
from studio.trainers.dreambooth import DreamBooth, DreamBoothConfig
from studio.trainers.loop import Context
from test_dreambooth import star_folder


def test_without_token_takes_the_identifier_out_as_a_word():
    assert without_token("a large orange circle in the center on a white background, zxy", "zxy") == \
        "a large orange circle in the center on a white background"
    assert without_token("a large blue sks shape in the center, striped", "sks") == "a large blue shape in the center, striped"
    assert without_token("zxy, a circle", "zxy") == "a circle"
    assert without_token("star, zxy, blue", "zxy") == "star, blue"  # an emptied tag between commas
    assert without_token("a sks-like sks star", "sks") == "a sks-like star"  # only whole words
    assert without_token("sks", "sks") == ""


def test_draw_prior_pairs_each_class_image_with_its_own_prompt():
    """Replay: n class indices from the run's random draws; the latents and the prompts are those indices'."""
    prompts = ["a red circle", "a blue square", "a shape"]
    cond = {p: {"embeds": torch.full((1, 2, 3), float(i)), "pooled": None} for i, p in enumerate(prompts)}
    acc = SimpleNamespace(device=torch.device("cpu"), num_processes=1, process_index=0)
    kept = ["a red circle", "a red circle", "a blue square", "a shape"]
    ctx = Context(DreamBoothConfig(data="x"), None, acc, None, None, 64,
                  store={"cond": cond, "class": torch.arange(4.0).reshape(4, 1, 1, 1), "class_prompts": kept})
    latents, c = DreamBooth()._draw_prior(ctx, random.Random(3), 12)
    replay = random.Random(3)
    idx = [replay.randrange(4) for _ in range(12)]
    assert len(set(idx)) > 2
    assert latents.flatten().tolist() == [float(i) for i in idx]
    assert c["embeds"][:, 0, 0].tolist() == [float(prompts.index(kept[i])) for i in idx]


def test_run_draws_class_images_of_each_caption_without_the_token(tmp_path, monkeypatch):
    from studio.trainers.config import build_config
    from studio.trainers.loop import train

    from studio.adapters import load_adapter
    from studio.sampling import generate

    data = star_folder(tmp_path / "data", 3)
    (data / "star0.txt").write_text("a large blue star in the center, zxy")
    (data / "star1.txt").write_text("zxy, a large blue star on the left")
    (data / "star2.txt").write_text("a large blue star in the center, zxy")  # the same caption as star0: one prompt
    seen = {}
    original = DreamBooth.prepare

    def prepare(self, ctx):
        original(self, ctx)
        # the base model's own images of a caption's prompt, drawn as generate draws them, before LoRA goes in
        fresh = generate(ctx.pipe, ["a large blue star on the left"] * 2, seed=10_000, height=ctx.resolution, width=ctx.resolution)
        seen.update(fresh=fresh, prompts=list(ctx.store["class_prompts"]), cond=set(ctx.store["cond"]))

    monkeypatch.setattr(DreamBooth, "prepare", prepare)
    settings = {"data": str(data), "output": str(tmp_path / "run"), "steps": 2, "batch_size": 2, "rank": 2, "token": "zxy",
                "num_class_images": 3, "class_data": str(tmp_path / "class"), "checkpoint_every": 0,
                "class_prompts": "captions"}
    out = train(DreamBooth(), build_config(DreamBoothConfig, {}, settings))
    pair = ["a large blue star in the center", "a large blue star on the left"]
    assert seen["prompts"] == [pair[0]] * 2 + [pair[1]] * 2  # 3 class images over 2 prompts: 2 each, rounded up
    assert set(pair) <= seen["cond"]  # encoded once, with the instance captions
    assert load_adapter(out).meta.dataset["class_prompts"] == pair
    folders = sorted(p for p in (tmp_path / "class").iterdir())
    assert len(folders) == 2 and all(len(list(f.glob("class-*.png"))) == 2 for f in folders)
    kept = [[np.asarray(Image.open(f / f"class-0000{i}.png")) for i in range(2)] for f in folders]
    assert sum(all((k == np.asarray(im)).all() for k, im in zip(pair_images, seen["fresh"])) for pair_images in kept) == 1
    # a second run reuses them
    stamps = {f: f.stat().st_mtime_ns for f in (tmp_path / "class").rglob("*.png")}
    train(DreamBooth(), build_config(DreamBoothConfig, {}, {**settings, "output": str(tmp_path / "run2")}))
    assert {f: f.stat().st_mtime_ns for f in (tmp_path / "class").rglob("*.png")} == stamps


def test_class_prompts_refuses_an_unknown_value(tmp_path):
    with pytest.raises(ValueError, match="--class-prompts 'caption'; accepted: class, captions"):
        DreamBoothConfig(data=str(tmp_path), class_prompts="caption").check()
    with pytest.raises(ValueError, match="only prior preservation trains on them; drop --no-prior-preservation"):
        DreamBoothConfig(data=str(tmp_path), class_prompts="captions", prior_preservation=False).check()
