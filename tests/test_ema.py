"""--ema-decay: the adapter written is the moving average of the trained weights, replayed by hand from the raw
weights of the same run; a resumed run keeps its average."""

import shutil

import pytest
import torch
from studio.trainers.config import build_config
from studio.trainers.dreambooth import DreamBooth, DreamBoothConfig
from studio.trainers.loop import EMA, snapshot_path, train
from test_dreambooth import star_folder

from studio.adapters import load_adapter


def test_ema_rate_follows_diffusers_schedule_and_averages_by_hand():
    p = torch.nn.Parameter(torch.tensor([1.0, 2.0]))
    ema = EMA([p], 0.5)
    assert [ema.rate(t) for t in (0, 1, 2, 8, 100)] == pytest.approx([0.1, 2 / 11, 0.25, 0.5, 0.5])
    expected = p.detach().clone()
    for t, value in enumerate(([3.0, 0.0], [5.0, 1.0], [-1.0, 4.0])):
        with torch.no_grad():
            p.copy_(torch.tensor(value))
        ema.update(t)
        d = ema.rate(t)
        expected = d * expected + (1 - d) * torch.tensor(value)
        torch.testing.assert_close(ema.shadow[0], expected)
    with ema.applied():
        torch.testing.assert_close(p.detach(), expected)
    torch.testing.assert_close(p.detach(), torch.tensor([-1.0, 4.0]))  # the raw weights are back


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ema")
    data = star_folder(tmp / "stars", 2)
    base = {"data": str(data), "batch_size": 1, "rank": 2, "lr": 1e-2, "prior_preservation": False,
            "checkpoint_every": 0, "seed": 3}

    def run(name, **extra):
        return train(DreamBooth(), build_config(DreamBoothConfig, {}, {**base, "output": str(tmp / name), **extra}))

    return run, tmp


def test_the_adapter_is_the_average_of_the_raw_weights_of_each_step(runs):
    """The raw weights after steps 1-3 are a run without EMA's snapshots (EMA does not change training); the
    starting weights a step at a vanishing rate; the EMA run's adapter is their average by the schedule."""
    run, tmp = runs
    raw_dir = tmp / "raw"
    run("raw", steps=3, save_adapter_every=1)
    raws = [load_adapter(snapshot_path(raw_dir, s)) for s in (1, 2)] + [load_adapter(raw_dir / "adapter.safetensors")]
    start = load_adapter(run("start", steps=1, lr=1e-12))
    averaged = load_adapter(run("ema", steps=3, ema_decay=0.5))
    assert averaged.meta.extra["ema_decay"] == 0.5
    for key, w0 in start.modules.items():
        for part in ("down", "up"):
            expected = getattr(w0, part)
            for t, raw in enumerate(raws):
                d = min(0.5, (1 + t) / (10 + t))
                expected = d * expected + (1 - d) * getattr(raw.modules[key], part)
            torch.testing.assert_close(getattr(averaged.modules[key], part), expected, rtol=1e-5, atol=1e-8)
    # not just the last raw weights
    assert any(not torch.allclose(averaged.modules[k].up, raws[-1].modules[k].up) for k in averaged.modules)


def test_a_resumed_ema_run_ends_as_an_uninterrupted_one(runs):
    run, tmp = runs
    whole = load_adapter(run("whole", steps=4, ema_decay=0.6, checkpoint_every=2))
    resumed = load_adapter(run("resumed", steps=4, ema_decay=0.6, resume=str(tmp / "whole" / "checkpoint-2")))
    for key, w in whole.modules.items():
        torch.testing.assert_close(resumed.modules[key].up, w.up, rtol=1e-5, atol=1e-8)
        torch.testing.assert_close(resumed.modules[key].down, w.down, rtol=1e-5, atol=1e-8)
    shutil.copytree(tmp / "whole" / "checkpoint-2", tmp / "plain-ckpt")
    (tmp / "plain-ckpt" / "ema.safetensors").unlink()
    with pytest.raises(ValueError, match="--ema-decay 0.6: checkpoint .*plain-ckpt holds no moving average"):
        run("again", steps=4, ema_decay=0.6, resume=str(tmp / "plain-ckpt"))


@pytest.mark.parametrize("decay", [1.0, -0.1])
def test_bad_ema_decay_is_refused_by_name(decay):
    with pytest.raises(ValueError, match=f"--ema-decay must be at least 0 \\(off\\) and below 1, got {decay:g}"):
        DreamBoothConfig(data="x", ema_decay=decay).check()
