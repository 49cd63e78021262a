"""The image trainers' data options: --random-flip, --caption-dropout and kohya's REPEATS_WORDS folders; what the
trainers draw with them, replayed by hand, and short runs that use them."""

import json
import random
import shutil
from types import SimpleNamespace

import pytest
import torch
from PIL import Image
from studio.trainers.data import TrainImage, kohya_folders, load_images, mirror_caption, mirrored
from studio.trainers.dreambooth import Bucket, DreamBooth, DreamBoothConfig, bucket_prompts
from studio.trainers.loop import Context
from test_dreambooth import star_folder


def test_mirror_caption_swaps_left_and_right_as_words():
    assert mirror_caption("a sks shape on the left and a circle on the right") == \
        "a sks shape on the right and a circle on the left"
    assert mirror_caption("Left: a star; RIGHT: a heart") == "Right: a star; LEFT: a heart"
    assert mirror_caption("leftover rightmost bright") == "leftover rightmost bright"  # only whole words
    assert mirror_caption("a star") == "a star"


def test_mirrored_image_mask_and_caption():
    image = Image.new("RGB", (4, 2), "white")
    image.putpixel((0, 1), (255, 0, 0))
    mask = Image.new("L", (4, 2), 0)
    mask.putpixel((1, 0), 255)
    item = TrainImage(image, (2, 4), (0, 1), "a red dot on the left", mask)
    flipped = mirrored(item)
    assert flipped.image.getpixel((3, 1)) == (255, 0, 0) and flipped.image.getpixel((0, 1)) == (255, 255, 255)
    assert flipped.mask.getpixel((2, 0)) == 255 and flipped.mask.getpixel((1, 0)) == 0
    assert (flipped.caption, flipped.original_size, flipped.crop_top_left) == ("a red dot on the right", (2, 4), (0, 1))
    assert mirrored(TrainImage(image, (2, 4), (0, 0))).caption is None


def _draw_ctx(caption_dropout=0.0):
    """A context whose cached prompt embeddings are one number per prompt (its index), for replaying ``_draw``."""
    prompts = ["a sks shape on the left", "a sks shape", "a sks shape on the right", ""]
    cond = {p: {"embeds": torch.full((1, 2, 3), float(i)), "pooled": None} for i, p in enumerate(prompts)}
    acc = SimpleNamespace(device=torch.device("cpu"), num_processes=1, process_index=0)
    cfg = DreamBoothConfig(data="x", caption_dropout=caption_dropout)
    return Context(cfg, None, acc, None, None, 64, store={"cond": cond}), prompts


def _bucket(flip: bool) -> Bucket:
    latents = torch.arange(2 * 4 * 2 * 2, dtype=torch.float32).reshape(2, 4, 2, 2)
    captions = ["a sks shape on the left", "a sks shape"]
    if not flip:
        return Bucket(latents, torch.zeros(2, 6), captions)
    return Bucket(latents, torch.zeros(2, 6), captions, -latents, [mirror_caption(c) for c in captions])


@pytest.mark.parametrize("dropout", [0.0, 0.5])
def test_draw_mirrors_and_empties_examples_as_its_random_draws_say(dropout):
    """Replay: n example indices, then (with the mirrored bucket) one draw < 0.5 per example to mirror it, then
    (with --caption-dropout p) one draw < p per example to empty its prompt."""
    ctx, prompts = _draw_ctx(dropout)
    n = 16
    latents, cond = DreamBooth()._draw(ctx, [_bucket(flip=True)], random.Random(5), n)
    replay = random.Random(5)
    idx = [replay.randrange(2) for _ in range(n)]
    flips = [replay.random() < 0.5 for _ in range(n)]
    drops = [replay.random() < dropout for _ in range(n)] if dropout else [False] * n
    bucket = _bucket(flip=True)
    expected_lat = torch.stack([bucket.mirrored[i] if f else bucket.latents[i] for i, f in zip(idx, flips)])
    expected_text = ["" if d else (bucket.mirrored_captions[i] if f else bucket.captions[i])
                     for i, f, d in zip(idx, flips, drops)]
    assert 0 < sum(flips) < n and (not dropout or 0 < sum(drops) < n)
    torch.testing.assert_close(latents, expected_lat)
    torch.testing.assert_close(cond["embeds"][:, 0, 0], torch.tensor([float(prompts.index(t)) for t in expected_text]))
    chosen, mine, drawn_flips = cond["drawn"]
    assert chosen == 0 and mine.tolist() == idx and drawn_flips.tolist() == flips
    if not dropout:  # the flips' draws come after the examples': a run without mirroring draws the same examples
        plain, cond = DreamBooth()._draw(ctx, [_bucket(flip=False)], random.Random(5), n)
        assert cond["drawn"][1].tolist() == idx and not cond["drawn"][2].any()
        torch.testing.assert_close(plain, _bucket(flip=False).latents[torch.tensor(idx)])


def test_buckets_cache_the_mirrored_images_latents(tmp_path):
    from studio.families import EMBEDDED_MODEL, load_pipeline

    data = star_folder(tmp_path / "stars", 2)
    (data / "star0.txt").write_text("a large blue sks shape on the left")
    pipe = load_pipeline(EMBEDDED_MODEL)
    images, _ = load_images(data, 64)
    cfg = DreamBoothConfig(data=str(data), random_flip=True)
    ctx = Context(cfg, pipe, None, None, None, 64, store={})
    captions = [im.caption or "a sks shape" for im in images]
    (bucket,) = DreamBooth()._buckets(ctx, images, captions)
    flipped = [im.image.transpose(Image.Transpose.FLIP_LEFT_RIGHT) for im in images]
    torch.testing.assert_close(bucket.latents, DreamBooth._latents(pipe, images))
    torch.testing.assert_close(bucket.mirrored, DreamBooth._latents(pipe, flipped))
    assert not torch.allclose(bucket.mirrored, bucket.latents)
    assert bucket.mirrored_captions == ["a large blue sks shape on the right", "a sks shape"]
    assert bucket_prompts([bucket]) == {"a large blue sks shape on the left", "a large blue sks shape on the right",
                                        "a sks shape"}
    ctx.cfg = DreamBoothConfig(data=str(data))
    (plain,) = DreamBooth()._buckets(ctx, images, captions)
    assert plain.mirrored is None and plain.mirrored_captions is None


def test_runs_with_flips_dropout_and_the_attention_loss(tmp_path):
    """Short DreamBooth runs: mirroring with the attention loss (the masks and token weights follow each mirrored
    example), and caption dropout; both train and record their settings."""

    from studio.trainers.config import build_config
    from studio.trainers.loop import train

    from studio.adapters import load_adapter

    data = star_folder(tmp_path / "stars", 2)
    base = {"data": str(data), "batch_size": 2, "rank": 2, "lr": 1e-3, "prior_preservation": False,
            "checkpoint_every": 0, "steps": 2}
    for name, extra in (("flip", {"random_flip": True, "attention_loss": 0.1}), ("drop", {"caption_dropout": 0.5})):
        out = train(DreamBooth(), build_config(DreamBoothConfig, {}, {**base, "output": str(tmp_path / name), **extra}))
        assert load_adapter(out).meta.steps == 2
        kept = json.loads((tmp_path / name / "config.json").read_text())
        assert all(kept[k] == v for k, v in extra.items())


@pytest.mark.parametrize("extra, message", [
    ({"caption_dropout": 1.0}, "--caption-dropout must be at least 0 (off) and below 1, got 1"),
    ({"caption_dropout": -0.1}, "--caption-dropout must be at least 0 (off) and below 1, got -0.1"),
    ({"caption_dropout": 0.1, "attention_loss": 0.1}, "--caption-dropout does not go with --attention-loss"),
])
def test_bad_augmentation_options_are_refused_by_name(tmp_path, extra, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        DreamBoothConfig(data=str(tmp_path), **extra).check()


def _kohya(tmp_path):
    """data/10_sks shape/ (star0 with its own caption, star1), data/1_sks shape_small/ (star2), data/notes/ (no images)."""
    stars = star_folder(tmp_path / "stars", 3)
    data = tmp_path / "data"
    for sub, names in (("10_sks shape", ["star0", "star1"]), ("1_sks shape_small", ["star2"])):
        (data / sub).mkdir(parents=True)
        for name in names:
            shutil.copy(stars / f"{name}.png", data / sub / f"{name}.png")
    (data / "10_sks shape" / "star0.txt").write_text("a blue sks shape")
    (data / "notes").mkdir()
    return data


def test_kohya_folders_give_repeats_and_their_words_as_captions(tmp_path):
    data = _kohya(tmp_path)
    with pytest.warns(UserWarning, match="skipping .*notes: not a kohya-style REPEATS_WORDS folder name"):
        images, files = load_images(data, 64)
    assert [f.relative_to(data).as_posix() for f in files] == ["10_sks shape/star0.png", "10_sks shape/star1.png",
                                                              "1_sks shape_small/star2.png"]
    assert [(im.repeats, im.caption) for im in images] == [(10, "a blue sks shape"), (10, "sks shape"), (1, "sks shape small")]
    assert mirrored(images[0]).repeats == 10
    assert kohya_folders(tmp_path / "stars") == []  # a plain folder: no repeats
    (data / "star9.png").write_bytes((tmp_path / "stars" / "star0.png").read_bytes())
    with pytest.raises(ValueError, match=r"has images \(star9.png, 1 in all\) beside kohya-style subfolders"):
        load_images(data, 64)
    (data / "star9.png").unlink()
    (data / "0_sks shape").mkdir()
    with pytest.raises(ValueError, match="data subfolder '0_sks shape' repeats its images 0 times; accepted: 1 or more"):
        load_images(data, 64)


def test_draw_weights_each_image_by_its_repeats():
    """Replay: the examples are ``rng.choices`` over the bucket's images weighted by their repeats; with two buckets
    the bucket is drawn in proportion to its repeats' sum, not its image count."""
    ctx, prompts = _draw_ctx()
    weighted = Bucket(torch.arange(2.0)[:, None, None, None].expand(2, 4, 2, 2), torch.zeros(2, 6),
                      ["a sks shape on the left", "a sks shape"], repeats=[9, 1])
    n = 400
    latents, cond = DreamBooth()._draw(ctx, [weighted], random.Random(2), n)
    idx = random.Random(2).choices(range(2), weights=[9, 1], k=n)
    assert cond["drawn"][1].tolist() == idx and 300 < idx.count(0) < 400
    torch.testing.assert_close(latents[:, 0, 0, 0], torch.tensor(idx, dtype=torch.float32))
    small = Bucket(torch.zeros(3, 4, 2, 2), torch.zeros(3, 6), ["a sks shape"] * 3)  # 3 images once each
    assert (weighted.size(), small.size()) == (10, 3)
    picks = [DreamBooth()._draw(ctx, [weighted, small], random.Random(s), 1)[1]["drawn"][0] for s in range(300)]
    replay = [0 if random.Random(s).randrange(13) < 10 else 1 for s in range(300)]
    assert picks == replay


def test_a_run_on_a_kohya_folder_records_its_repeats(tmp_path):
    from studio.trainers.config import build_config
    from studio.trainers.loop import train

    from studio.adapters import load_adapter

    data = _kohya(tmp_path)
    shutil.rmtree(data / "notes")
    out = train(DreamBooth(), build_config(DreamBoothConfig, {}, {
        "data": str(data), "batch_size": 2, "rank": 2, "lr": 1e-3, "prior_preservation": False, "checkpoint_every": 0,
        "steps": 2, "output": str(tmp_path / "run")}))
    dataset = load_adapter(out).meta.dataset
    assert dataset["repeats"] == {"10_sks shape": 10, "1_sks shape_small": 1}
    assert dataset["files"] == ["10_sks shape/star0.png", "10_sks shape/star1.png", "1_sks shape_small/star2.png"]
    assert dataset["captioned"] == 3


def test_content_style_takes_the_data_options_and_refuses_what_its_own_layers_cannot_do(tmp_path, monkeypatch):
    """The content/style trainer holds its style images in the same buckets (mirrored too); --init-adapter and
    --lora-dropout need plain LoRA layers, which it does not train."""
    from studio.trainers.config import build_config
    from studio.trainers.content_style import ContentStyle, ContentStyleConfig
    from studio.trainers.loop import train

    from studio.adapters import load_adapter

    content = star_folder(tmp_path / "content", 2)
    style = star_folder(tmp_path / "style", 1)
    (style / "star0.txt").write_text("a large blue star on the left, zxy")
    common = {"data": str(content), "style_data": str(style), "steps": 2, "batch_size": 2, "rank": 2,
              "num_class_images": 1, "class_data": str(tmp_path / "class"), "checkpoint_every": 0, "lr": 1e-2}
    seen = {}
    original = ContentStyle.prepare

    def prepare(self, ctx):
        original(self, ctx)
        seen.update(style=ctx.store["style"], cond=set(ctx.store["cond"]))

    monkeypatch.setattr(ContentStyle, "prepare", prepare)
    out = train(ContentStyle(), build_config(ContentStyleConfig, {}, {
        **common, "output": str(tmp_path / "run"), "random_flip": True, "caption_dropout": 0.5}))
    assert load_adapter(out).meta.dataset["style_images"] == 1
    (bucket,) = seen["style"]
    assert bucket.mirrored is not None and bucket.mirrored_captions == ["a large blue star on the right, zxy"]
    assert {"a large blue star on the right, zxy", "a large blue star on the left, zxy", ""} <= seen["cond"]
    for extra, message in (({"lora_dropout": 0.1}, "--lora-dropout: the content-style trainer trains its own adapter layers"),
                           ({"init_adapter": str(out)}, "--init-adapter: the content-style trainer trains its own adapter layers")):
        with pytest.raises(ValueError, match=message):
            train(ContentStyle(), build_config(ContentStyleConfig, {}, {**common, "output": str(tmp_path / "x"), **extra}))


def test_shuffle_tags_by_hand():
    from studio.trainers.data import shuffle_tags

    rng, replay = random.Random(4), random.Random(4)
    tail = ["star", "blue", "striped"]
    replay.shuffle(tail)
    assert shuffle_tags("sks,  star ,blue, striped", 1, rng) == ", ".join(["sks", *tail])
    assert shuffle_tags("sks, star", 5, random.Random(0)) == "sks, star"  # keep covers every tag
    assert shuffle_tags("a sks shape", 0, random.Random(0)) == "a sks shape"  # one tag


def test_draw_shuffles_each_examples_tags_after_the_flips():
    """Replay: examples, then per example a shuffle of its tags after the first --keep-tokens, from the same draws."""
    from studio.trainers.data import shuffle_tags

    variants = ["sks, star, blue", "sks, blue, star"]
    cond = {p: {"embeds": torch.full((1, 2, 3), float(i)), "pooled": None} for i, p in enumerate(variants)}
    acc = SimpleNamespace(device=torch.device("cpu"), num_processes=1, process_index=0)
    cfg = DreamBoothConfig(data="x", shuffle_caption=True, keep_tokens=1)
    ctx = Context(cfg, None, acc, None, None, 64, store={"cond": cond})
    bucket = Bucket(torch.zeros(1, 4, 2, 2), torch.zeros(1, 6), ["sks, star, blue"])
    n = 12
    _, got = DreamBooth()._draw(ctx, [bucket], random.Random(9), n)
    replay = random.Random(9)
    idx = [replay.randrange(1) for _ in range(n)]
    texts = [shuffle_tags(bucket.captions[i], 1, replay) for i in idx]
    assert len(set(texts)) == 2
    torch.testing.assert_close(got["embeds"][:, 0, 0], torch.tensor([float(variants.index(t)) for t in texts]))


def test_prompts_outside_the_cache_are_encoded_as_they_come_without_a_graph():
    from studio.trainers.dreambooth import _encode

    from studio.families import EMBEDDED_MODEL, load_pipeline

    pipe = load_pipeline(EMBEDDED_MODEL)
    ctx = Context(DreamBoothConfig(data="x"), pipe, None, None, None, 64, store={"cond": {}})
    got = DreamBooth()._cond(ctx, ["sks, blue, star", "sks, star, blue", "sks, blue, star"])
    with torch.no_grad():
        want = _encode(pipe, ["sks, blue, star", "sks, star, blue"])
    torch.testing.assert_close(got["embeds"], want["embeds"][[0, 1, 0]])
    torch.testing.assert_close(got["added"]["text_embeds"], want["pooled"][[0, 1, 0]])
    assert not got["embeds"].requires_grad and ctx.store["cond"] == {}  # nothing cached


def test_a_run_with_shuffled_tags(tmp_path):
    from studio.trainers.config import build_config
    from studio.trainers.loop import train

    from studio.adapters import load_adapter

    data = star_folder(tmp_path / "stars", 2)
    (data / "star0.txt").write_text("sks, star, blue, large, centered")
    out = train(DreamBooth(), build_config(DreamBoothConfig, {}, {
        "data": str(data), "output": str(tmp_path / "run"), "steps": 2, "batch_size": 2, "rank": 2,
        "prior_preservation": False, "checkpoint_every": 0, "shuffle_caption": True, "keep_tokens": 1}))
    assert load_adapter(out).meta.steps == 2


@pytest.mark.parametrize("extra, message", [
    ({"keep_tokens": -1, "shuffle_caption": True}, "--keep-tokens must be 0 or positive, got -1"),
    ({"keep_tokens": 1}, "--keep-tokens keeps tags in place while --shuffle-caption shuffles the rest; add --shuffle-caption"),
    ({"shuffle_caption": True, "attention_loss": 0.1}, "--shuffle-caption does not go with --attention-loss"),
])
def test_bad_shuffle_options_are_refused_by_name(tmp_path, extra, message):
    with pytest.raises(ValueError, match=message):
        DreamBoothConfig(data=str(tmp_path), **extra).check()
