"""--masked-loss (kohya's --masked_loss, ai-toolkit's alpha mask): each instance example's denoising loss weighted by
its subject's mask; the weights, the weighted mean, and what a run draws, checked by hand."""

import random
from types import SimpleNamespace

import pytest
import torch
from PIL import Image
from studio.trainers.dreambooth import Bucket, DreamBooth, DreamBoothConfig, loss_weights
from studio.trainers.loop import Context, denoise_losses
from test_dreambooth import star_folder
from test_training_options import _ctx, _draws


def test_loss_weights_average_the_mask_over_each_latent_and_keep_the_floor():
    mask = torch.zeros(1, 4, 4)
    mask[0, :2, :2] = 1.0  # the top-left latent fully, the top-right a quarter
    mask[0, 0, 2] = 1.0
    torch.testing.assert_close(loss_weights(mask, (2, 2)), torch.tensor([[[[1.0, 0.25], [0.0, 0.0]]]]))
    torch.testing.assert_close(loss_weights(mask, (2, 2), 0.2), torch.tensor([[[[1.0, 0.4], [0.2, 0.2]]]]))
    assert (loss_weights(mask, (2, 2), 1.0) == 1).all()


def test_weighted_loss_of_each_example_by_hand():
    """The ZeroUNet's error is the noise (ε-prediction): each example's loss is sum(w · n²) / (C · sum(w)) over its
    latents, w broadcast over the channels; the prior part, without weights, keeps the plain mean."""
    latents = torch.randn(3, 4, 2, 2, generator=torch.Generator().manual_seed(1))
    weight = torch.tensor([[1.0, 0.0], [0.5, 0.0]]).expand(3, 1, 2, 2).clone()
    weight[2] = 1.0
    cond = {"embeds": torch.zeros(3, 2, 8)}
    masked, plain = denoise_losses(_ctx(), [(latents, {**cond, "loss_weight": weight}), (latents, cond)],
                                   torch.Generator().manual_seed(7), reduction="none")
    g = torch.Generator().manual_seed(7)
    noises = []
    for _ in range(2):  # one draw of noise and timesteps per part, in order
        noises.append(torch.randn(latents.shape, generator=g))
        torch.randint(0, 1000, (3,), generator=g)
    first, second = noises
    expected = (first**2 * weight).sum(dim=(1, 2, 3)) / (4 * weight.sum(dim=(1, 2, 3)))
    torch.testing.assert_close(masked, expected)
    torch.testing.assert_close(plain, (second**2).mean(dim=(1, 2, 3)))
    torch.testing.assert_close(masked[2], (first[2] ** 2).mean())  # all ones: the plain mean
    noise, _ = _draws(7, latents.shape)
    torch.testing.assert_close(noise, first)


def test_loss_puts_each_examples_mask_mirrored_with_it_on_the_instance_part(monkeypatch):
    """DreamBooth.loss with --masked-loss: the instance part carries the drawn examples' masks (mirrored where the
    example is), pooled to the latents with the floor; the prior part carries none."""
    cfg = DreamBoothConfig(data="x", masked_loss=True, mask_min_value=0.1, random_flip=True, batch_size=8)
    cond = {p: {"embeds": torch.zeros(1, 2, 3), "pooled": None} for p in ("a", "a shape")}
    acc = SimpleNamespace(device=torch.device("cpu"), num_processes=1, process_index=0)
    masks = torch.zeros(2, 4, 4)
    masks[0, :, :2] = 1  # image 0: the left half; image 1: the top row
    masks[1, 0] = 1
    latents = torch.zeros(2, 4, 2, 2)
    bucket = Bucket(latents, torch.zeros(2, 6), ["a", "a"], latents, ["a", "a"])
    ctx = Context(cfg, None, acc, None, None, 64, store={"cond": cond, "instance": [bucket], "masks": [masks],
                                                        "class": torch.zeros(3, 4, 2, 2), "class_prompts": ["a shape"] * 3})
    seen = {}

    def fake(ctx, parts, g, **_):
        seen["parts"] = parts
        return [torch.tensor(1.0), torch.tensor(2.0)]

    monkeypatch.setattr("studio.trainers.dreambooth.denoise_losses", fake)
    assert float(DreamBooth().loss(ctx, 0, 0, torch.Generator(), random.Random(3))) == 3.0
    instance, prior = seen["parts"]
    _, idx, flips = instance[1]["drawn"]
    assert 0 < int(flips.sum()) < 8 and len(set(idx.tolist())) == 2
    expected = torch.stack([masks[i].flip(-1) if f else masks[i] for i, f in zip(idx.tolist(), flips.tolist())])
    torch.testing.assert_close(instance[1]["loss_weight"], loss_weights(expected, (2, 2), 0.1))
    assert "loss_weight" not in prior[1]


def test_a_run_with_a_mask_file_and_the_refusals(tmp_path):
    from studio.trainers.config import build_config
    from studio.trainers.content_style import ContentStyle, ContentStyleConfig
    from studio.trainers.loop import train

    from studio.adapters import load_adapter

    data = star_folder(tmp_path / "data", 2)
    mask = Image.new("L", Image.open(data / "star0.png").size, 0)
    mask.paste(255, (0, 0, mask.width // 2, mask.height))
    mask.save(data / "star0.mask.png")
    common = {"data": str(data), "steps": 2, "batch_size": 2, "rank": 2, "num_class_images": 1,
              "class_data": str(tmp_path / "class"), "checkpoint_every": 0}
    out = train(DreamBooth(), build_config(DreamBoothConfig, {}, {**common, "output": str(tmp_path / "run"),
                                                                  "masked_loss": True, "mask_min_value": 0.05}))
    assert load_adapter(out).meta.dataset["masked_loss"] == 0.05
    for settings, message in (({"mask_min_value": 0.5}, "--mask-min-value weighs the background under --masked-loss"),
                              ({"masked_loss": True, "mask_min_value": 1.5}, "--mask-min-value must be between 0 and 1, got 1.5")):
        with pytest.raises(ValueError, match=message):
            build_config(DreamBoothConfig, {}, {**common, "output": str(tmp_path / "x"), **settings}).check()
    with pytest.raises(ValueError, match="--masked-loss is not supported by the content-style trainer"):
        train(ContentStyle(), build_config(ContentStyleConfig, {}, {**common, "style_data": str(data),
                                                                    "output": str(tmp_path / "y"), "masked_loss": True}))
