"""The loop's schedule, loss and optimizer options (--lr-scheduler, --snr-gamma, --noise-offset, --max-grad-norm, --timestep-bias-*,
--loss-type / --huber-*, --ip-noise-gamma, --loraplus-ratio, --optimizer) against hand computations on small tensors, and tiny DreamBooth runs that use them."""

import json
import math
import subprocess
from types import SimpleNamespace

import pytest
import torch
from diffusers import DDPMScheduler
from studio.trainers.loop import Context, TrainConfig, denoise_losses, lr_factor
from test_dreambooth import TRAIN, star_folder, tiny_args


@pytest.mark.parametrize(
    "name, expected",
    [
        # warm-up 2 of 10 steps: (step + 1) / 2, then the schedule from its start at step 2
        ("constant", [0.5, 1, 1, 1, 1, 1, 1, 1, 1, 1]),
        ("linear", [0.5, 1] + [(10 - s) / 8 for s in range(2, 10)]),
        ("cosine", [0.5, 1] + [0.5 * (1 + math.cos(math.pi * (s - 2) / 8)) for s in range(2, 10)]),
        # two cycles of 4 steps each
        ("cosine_with_restarts", [0.5, 1] + [0.5 * (1 + math.cos(math.pi * ((s - 2) % 4) / 4)) for s in range(2, 10)]),
    ],
)
def test_lr_schedules_by_hand(name, expected):
    factor = lr_factor(TrainConfig(steps=10, warmup=2, lr_scheduler=name, lr_cycles=2 if "restarts" in name else 1))
    assert [factor(s) for s in range(10)] == pytest.approx(expected, abs=1e-6)


def test_no_warmup_starts_at_the_full_rate():
    assert lr_factor(TrainConfig(steps=4, lr_scheduler="linear"))(0) == 1.0
    assert [lr_factor(TrainConfig(steps=4))(s) for s in range(4)] == [1.0] * 4


class ZeroUNet(torch.nn.Module):
    """Predicts 0 everywhere: each example's loss is then the mean square of its target."""

    def forward(self, x, t, embeds, added_cond_kwargs=None):
        return SimpleNamespace(sample=torch.zeros_like(x))


def _ctx(prediction_type="epsilon", **cfg):
    sched = DDPMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                          prediction_type=prediction_type)  # SDXL's
    acc = SimpleNamespace(device=torch.device("cpu"), num_processes=1, process_index=0)
    return Context(TrainConfig(**cfg), None, acc, None, sched, 64, store={"unet": ZeroUNet()})


def _draws(seed, shape, offset=0.0):
    """The noise and timesteps ``denoise_losses`` draws from a generator seeded with ``seed``, replayed."""
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn(shape, generator=g)
    t = torch.randint(0, 1000, (shape[0],), generator=g)
    if offset:
        noise = noise + offset * torch.randn(shape[0], shape[1], 1, 1, generator=g)
    return noise, t


def _scaled_linear_abar(t):
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2  # SDXL's scaled linear
    return torch.cumprod(1 - betas, 0)[t]


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_min_snr_weights_each_examples_loss_by_hand(prediction_type):
    latents = torch.randn(6, 4, 3, 3, generator=torch.Generator().manual_seed(1))
    cond = {"embeds": torch.zeros(6, 2, 8)}
    ctx = _ctx(prediction_type, snr_gamma=1.0)
    (loss,) = denoise_losses(ctx, [(latents, cond)], torch.Generator().manual_seed(7), reduction="none")
    noise, t = _draws(7, latents.shape)
    abar = _scaled_linear_abar(t)
    snr = abar / (1 - abar)
    if prediction_type == "epsilon":
        target, weight = noise.double(), torch.clamp(snr, max=1.0) / snr
    else:  # v = sqrt(abar) noise - sqrt(1 - abar) x0
        a, s = abar.sqrt()[:, None, None, None], (1 - abar).sqrt()[:, None, None, None]
        target, weight = a * noise.double() - s * latents.double(), torch.clamp(snr, max=1.0) / (snr + 1)
    expected = (target**2).mean(dim=(1, 2, 3)) * weight
    assert loss.double() == pytest.approx(expected, rel=1e-4)
    assert not torch.allclose(weight, torch.ones_like(weight))  # the draw has timesteps where the weight bites
    (plain,) = denoise_losses(_ctx(prediction_type), [(latents, cond)], torch.Generator().manual_seed(7), reduction="none")
    assert plain.double() == pytest.approx((target**2).mean(dim=(1, 2, 3)), rel=1e-4)


def test_min_snr_weight_is_finite_at_zero_terminal_snr():
    """The embedded model's schedule (rescaled to zero terminal SNR): ε's weight min(SNR, γ) / SNR is 1 as SNR -> 0,
    v's is 0 there."""
    from studio.trainers.loop import min_snr_weights

    t = torch.tensor([0, 500, 999])
    for kind, last in (("epsilon", 1.0), ("v_prediction", 0.0)):
        sched = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", prediction_type=kind,
                              rescale_betas_zero_snr=True)
        assert float(sched.alphas_cumprod[-1]) == 0.0
        w = min_snr_weights(sched, t, 5.0)
        assert torch.isfinite(w).all() and float(w[-1]) == last, (kind, w)
        abar = sched.alphas_cumprod[t[:2]].double()
        snr = abar / (1 - abar)
        hand = torch.clamp(snr, max=5.0) / (snr if kind == "epsilon" else snr + 1)
        assert w[:2].double() == pytest.approx(hand, rel=1e-5)


def test_noise_offset_adds_one_draw_per_example_and_channel_by_hand():
    latents = torch.randn(3, 4, 5, 5, generator=torch.Generator().manual_seed(2))
    cond = {"embeds": torch.zeros(3, 2, 8)}
    (loss,) = denoise_losses(_ctx(noise_offset=0.5), [(latents, cond)], torch.Generator().manual_seed(3),
                             reduction="none")
    noise, _ = _draws(3, latents.shape, offset=0.5)
    assert loss == pytest.approx((noise**2).mean(dim=(1, 2, 3)), rel=1e-5)
    plain_noise, _ = _draws(3, latents.shape)
    shift = (noise - plain_noise)[:, :, :1, :1]
    assert torch.allclose(noise - plain_noise, shift.expand_as(noise))  # constant over each channel's pixels
    assert shift.abs().min() > 0


@pytest.mark.parametrize(
    "cfg, message",
    [
        ({"lr_scheduler": "step"}, "--lr-scheduler 'step'; accepted: constant, linear, cosine, cosine_with_restarts"),
        ({"lr_cycles": 0}, "--lr-cycles must be at least 1, got 0"),
        ({"warmup": -1}, "--warmup must be 0 (none) or positive, got -1"),
        ({"snr_gamma": -1.0}, "--snr-gamma must be 0 (off) or positive, got -1.0"),
        ({"noise_offset": -0.1}, "--noise-offset must be 0 (off) or positive"),
        ({"max_grad_norm": -1.0}, "--max-grad-norm must be 0 (off) or positive"),
        ({"ip_noise_gamma": -0.1}, "--ip-noise-gamma must be 0 (off) or positive, got -0.1"),
        ({"loss_type": "l1"}, "--loss-type 'l1'; accepted: l2, huber, smooth_l1"),
        ({"huber_schedule": "linear"}, "--huber-schedule 'linear'; accepted: snr, exponential, constant"),
        ({"huber_c": 0.0}, "--huber-c must be above 0 and at most 1, got 0.0"),
        ({"huber_c": 1.5}, "--huber-c must be above 0 and at most 1, got 1.5"),
        ({"save_adapter_every": -1}, "--save-adapter-every must be 0 (never) or positive, got -1"),
        ({"optimizer": "sgd"}, "--optimizer 'sgd'; accepted: adamw, adamw8bit, prodigy"),
        ({"optimizer": "prodigy"}, "--optimizer prodigy finds its own step size and --lr multiplies it: use about 1.0"
                                   " (accepted 0.1 to 10), got 0.0001"),
        ({"optimizer": "prodigy", "lr": 1.0, "prodigy_d_coef": 0.0}, "--prodigy-d-coef must be positive, got 0"),
        ({"optimizer": "prodigy", "lr": 1.0, "loraplus_ratio": 16.0},
         "--loraplus-ratio does not go with --optimizer prodigy (one step size for every parameter)"),
        ({"optimizer": "prodigy", "lr": 1.0, "use_8bit_adam": True},
         "--use-8bit-adam is --optimizer adamw8bit; it does not go with --optimizer prodigy"),
    ],
)
def test_bad_options_are_refused_by_name(cfg, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        TrainConfig(**cfg).check()


@pytest.mark.parametrize("loss_type", ["huber", "smooth_l1"])
@pytest.mark.parametrize("schedule", ["snr", "exponential", "constant"])
def test_pseudo_huber_loss_of_each_example_by_hand(loss_type, schedule):
    """The ZeroUNet's error is the noise itself: each example's loss is the mean of 2c(sqrt(n² + c²) - c) (huber)
    or that over c (smooth_l1), with kohya's threshold schedules computed here from the betas."""
    latents = torch.randn(6, 4, 3, 3, generator=torch.Generator().manual_seed(1))
    cond = {"embeds": torch.zeros(6, 2, 8)}
    ctx = _ctx(loss_type=loss_type, huber_schedule=schedule, huber_c=0.3)
    (loss,) = denoise_losses(ctx, [(latents, cond)], torch.Generator().manual_seed(7), reduction="none")
    noise, t = _draws(7, latents.shape)
    if schedule == "snr":
        abar = _scaled_linear_abar(t)
        c = 0.3 + 0.7 / (1 + ((1 - abar) / abar).sqrt()) ** 2
    elif schedule == "exponential":
        c = 0.3 ** (t.double() / 1000)
    else:
        c = torch.full((6,), 0.3, dtype=torch.float64)
    c4 = c[:, None, None, None]
    per = 2 * ((noise.double() ** 2 + c4**2).sqrt() - c4)
    expected = (per * c4 if loss_type == "huber" else per).mean(dim=(1, 2, 3))
    assert loss.double() == pytest.approx(expected, rel=1e-4)
    (l2,) = denoise_losses(_ctx(), [(latents, cond)], torch.Generator().manual_seed(7), reduction="none")
    assert not torch.allclose(loss, l2, rtol=0.05)  # unit-size errors: far from the squared error


def test_huber_threshold_is_c_at_zero_terminal_snr():
    """The embedded model's schedule ends at ᾱ = 0 (σ infinite): the snr schedule's threshold is c there, not NaN."""
    from studio.trainers.loop import huber_thresholds

    sched = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", rescale_betas_zero_snr=True)
    c = huber_thresholds(SimpleNamespace(huber_c=0.1, huber_schedule="snr"), sched, torch.tensor([0, 999]))
    assert float(c[1]) == pytest.approx(0.1) and 0.9 < float(c[0]) <= 1.0


def test_pseudo_huber_is_the_squared_error_for_errors_far_below_c():
    """2c(sqrt(d² + c²) - c) = d² - d⁴/(4c²) + ...: with c = 1 and errors of 1e-2 the huber loss is l2's to 1e-4."""
    latents = torch.zeros(4, 4, 3, 3)
    cond = {"embeds": torch.zeros(4, 2, 8)}

    class SmallError(ZeroUNet):
        """Predicts the noise (zero latents: x_t = sqrt(1 - ᾱ_t) noise) off by errors of 1e-2 or less."""

        def __init__(self, abar):
            super().__init__()
            self.abar = abar

        def forward(self, x, t, embeds, added_cond_kwargs=None):
            error = 1e-2 * torch.cos(torch.arange(x.numel(), dtype=x.dtype)).view_as(x)
            return SimpleNamespace(sample=x / (1 - self.abar[t]).sqrt()[:, None, None, None] + error)

    losses = []
    for kind in ("l2", "huber"):
        ctx = _ctx(loss_type=kind, huber_schedule="constant", huber_c=1.0)
        ctx.store["unet"] = SmallError(ctx.noise_scheduler.alphas_cumprod)
        losses.append(denoise_losses(ctx, [(latents, cond)], torch.Generator().manual_seed(3), reduction="none")[0])
    assert float(losses[0].max()) < 1e-4  # the errors are the small ones
    assert losses[1] == pytest.approx(losses[0], rel=1e-3)


def test_a_run_with_every_option_follows_its_schedule(tmp_path):
    data, out = star_folder(tmp_path / "stars", 2), tmp_path / "run"
    extra = {"lr": 0.01, "warmup": 1, "lr_scheduler": "cosine", "snr_gamma": 5, "noise_offset": 0.1,
             "max_grad_norm": 0.5, "timestep_bias_strategy": "later", "timestep_bias_multiplier": 2.0,
             "loss_type": "huber", "huber_schedule": "exponential", "huber_c": 0.2, "ip_noise_gamma": 0.1}
    r = subprocess.run([*TRAIN, *tiny_args(data, out, steps=4, **extra)], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    config = json.loads((out / "config.json").read_text())
    assert {k: config[k] for k in extra} == extra
    steps = [json.loads(line) for line in (out / "progress.jsonl").read_text().splitlines()]
    lrs = [e["lr"] for e in steps if "loss" in e]
    # warm-up of 1 (full rate at step 0), then cosine over steps 1-3
    expected = [0.01] + [0.01 * 0.5 * (1 + math.cos(math.pi * (s - 1) / 3)) for s in range(1, 4)]
    assert lrs == pytest.approx(expected, rel=1e-6)
    assert all(math.isfinite(e["loss"]) for e in steps if "loss" in e)
    assert (out / "adapter.safetensors").is_file()


def test_max_grad_norm_clips_at_that_norm_and_zero_turns_clipping_off(tmp_path, monkeypatch):
    from accelerate import Accelerator
    from studio.trainers.config import build_config
    from studio.trainers.dreambooth import DreamBooth, DreamBoothConfig
    from studio.trainers.loop import train

    norms: list[float] = []
    clip = Accelerator.clip_grad_norm_

    def recording(self, parameters, max_norm, *args, **kwargs):
        norms.append(max_norm)
        return clip(self, parameters, max_norm, *args, **kwargs)

    monkeypatch.setattr(Accelerator, "clip_grad_norm_", recording)
    data = star_folder(tmp_path / "stars", 1)
    seen = {}
    for norm in (0.25, 0.0):
        norms.clear()
        train(DreamBooth(), build_config(DreamBoothConfig, {}, {
            "data": str(data), "output": str(tmp_path / f"run{norm}"), "steps": 2, "batch_size": 1, "rank": 2,
            "prior_preservation": False, "checkpoint_every": 0, "max_grad_norm": norm}))
        seen[norm] = list(norms)
    assert seen == {0.25: [0.25, 0.25], 0.0: []}


def test_scaled_groups_put_the_ups_apart_at_ratio_times_their_groups_rate():
    from studio.trainers.loop import scaled_groups

    a, b, c, d = (torch.nn.Parameter(torch.zeros(1)) for _ in range(4))
    groups = scaled_groups([{"params": [a, b], "lr_scale": 1.0}, {"params": [c, d], "lr_scale": 3.0}], {id(b), id(d)}, 16)
    assert [([id(p) for p in g["params"]], g["lr_scale"]) for g in groups] == [
        ([id(a)], 1.0), ([id(b)], 16.0), ([id(c)], 3.0), ([id(d)], 48.0)]
    assert scaled_groups([{"params": [a], "lr_scale": 1.0}], {id(a)}, 4) == [{"params": [a], "lr_scale": 4.0}]


def test_loraplus_first_step_moves_the_ups_by_ratio_times_the_rate(tmp_path):
    """peft's B starts at 0, so A gets no gradient on step 1 and AdamW's first step moves each B entry by lr times
    its group's scale (m / sqrt(v) = sign of the gradient); with LoRA+ that is ratio x lr."""
    from studio.trainers.config import build_config
    from studio.trainers.dreambooth import DreamBooth, DreamBoothConfig
    from studio.trainers.loop import train

    from studio.adapters import load_adapter

    data = star_folder(tmp_path / "stars", 1)
    lr, ratio = 1e-3, 8.0
    tops = {}
    for k in (1.0, ratio):
        out = train(DreamBooth(), build_config(DreamBoothConfig, {}, {
            "data": str(data), "output": str(tmp_path / f"run{k}"), "steps": 1, "batch_size": 1, "rank": 2, "lr": lr,
            "prior_preservation": False, "checkpoint_every": 0, "loraplus_ratio": k}))
        ups = torch.cat([w.up.flatten() for w in load_adapter(out).modules.values()]).abs()
        tops[k] = (float(ups.max()), float(ups[ups > 0].median()))
    for k, (top, median) in tops.items():
        assert top == pytest.approx(k * lr, rel=0.02) and median == pytest.approx(k * lr, rel=0.05), (k, tops)


def test_prodigy_first_step_moves_the_ups_by_its_starting_estimate_times_the_rate(tmp_path):
    """Prodigy's step is d x lr in Adam's direction, d starting at d0 = 1e-6 (with bias correction, the first step's
    m / sqrt(v) is the gradient's sign, as AdamW's): so on step 1 each B entry moves by 1e-6 x lr, where AdamW's
    moves by lr (a plain AdamW at --lr 2 would move them by 2). The run's config keeps the keys, and --prodigy-d-coef does not change the first step (it scales
    the estimate Prodigy makes from then on)."""
    from studio.trainers.config import build_config
    from studio.trainers.dreambooth import DreamBooth, DreamBoothConfig
    from studio.trainers.loop import train

    from studio.adapters import load_adapter

    data = star_folder(tmp_path / "stars", 1)
    lr = 2.0
    out = train(DreamBooth(), build_config(DreamBoothConfig, {}, {
        "data": str(data), "output": str(tmp_path / "run"), "steps": 1, "batch_size": 1, "rank": 2, "lr": lr,
        "prior_preservation": False, "checkpoint_every": 0, "optimizer": "prodigy", "prodigy_d_coef": 2.0}))
    ups = torch.cat([w.up.flatten() for w in load_adapter(out).modules.values()]).abs()
    # the entries with the largest gradients move by exactly that; those with gradients near Adam's eps (relative
    # to d) a little less, none more
    assert float(ups.max()) == pytest.approx(1e-6 * lr, rel=0.01)
    assert 0.5e-6 * lr < float(ups[ups > 0].median()) <= 1e-6 * lr
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert (config["optimizer"], config["prodigy_d_coef"], config["lr"]) == ("prodigy", 2.0, 2.0)
    steps = [json.loads(line) for line in (tmp_path / "run" / "progress.jsonl").read_text().splitlines()]
    assert [e["lr"] for e in steps if "loss" in e] == pytest.approx([1e-6 * lr])  # the step size applied: d x lr


def test_prodigy_refuses_groups_at_different_rates_before_training():
    from studio.trainers.loop import _optimizer

    a, b = (torch.nn.Parameter(torch.zeros(1)) for _ in range(2))
    cfg = TrainConfig(optimizer="prodigy", lr=1.0)
    with pytest.raises(ValueError, match="groups step at 1, 3 x --lr"):
        _optimizer([{"params": [a], "lr_scale": 1.0}, {"params": [b], "lr_scale": 3.0}], cfg)
    assert type(_optimizer([{"params": [a, b], "lr_scale": 2.0}], cfg)).__name__ == "Prodigy"


def test_adapter_snapshots_are_the_adapter_a_shorter_run_ends_with(tmp_path):
    """--save-adapter-every 2 on a 5-step run writes the adapters of steps 2 and 4 (the last step's is the run's
    adapter.safetensors); the step-2 file is what a 2-step run with the same seed writes."""
    from studio.trainers.config import build_config
    from studio.trainers.dreambooth import DreamBooth, DreamBoothConfig
    from studio.trainers.loop import snapshot_path, train

    from studio.adapters import load_adapter

    data = star_folder(tmp_path / "stars", 1)
    base = {"data": str(data), "batch_size": 1, "rank": 2, "lr": 1e-3, "prior_preservation": False, "checkpoint_every": 0}
    long_run = tmp_path / "long"
    train(DreamBooth(), build_config(DreamBoothConfig, {}, {**base, "output": str(long_run), "steps": 5,
                                                            "save_adapter_every": 2}))
    assert sorted(p.name for p in (long_run / "adapters").iterdir()) == ["adapter-000002.safetensors",
                                                                          "adapter-000004.safetensors"]
    short = train(DreamBooth(), build_config(DreamBoothConfig, {}, {**base, "output": str(tmp_path / "short"), "steps": 2}))
    snap, two, five = (load_adapter(p) for p in (snapshot_path(long_run, 2), short, long_run / "adapter.safetensors"))
    assert (snap.meta.steps, snap.meta.token, snap.meta.base_hash) == (2, "sks", two.meta.base_hash)
    assert set(snap.modules) == set(two.modules)
    for k in two.modules:
        torch.testing.assert_close(snap.modules[k].up, two.modules[k].up, rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(snap.modules[k].down, two.modules[k].down, rtol=1e-5, atol=1e-7)
    assert any(not torch.equal(snap.modules[k].up, five.modules[k].up) for k in five.modules)  # it went on training


def test_text_encoder_lr_steps_the_text_encoders_lora_at_its_own_rate(tmp_path):
    """AdamW's first step moves each B entry by its group's rate: the UNet's by --lr, the text encoders' by
    --text-encoder-lr."""
    from studio.trainers.config import build_config
    from studio.trainers.dreambooth import DreamBooth, DreamBoothConfig
    from studio.trainers.loop import train

    from studio.adapters import load_adapter

    data = star_folder(tmp_path / "stars", 1)
    out = train(DreamBooth(), build_config(DreamBoothConfig, {}, {
        "data": str(data), "output": str(tmp_path / "run"), "steps": 1, "batch_size": 1, "rank": 2, "lr": 1e-3,
        "prior_preservation": False, "checkpoint_every": 0, "train_text_encoder": True, "text_encoder_lr": 1e-5}))
    adapter = load_adapter(out)
    for component, rate in (("unet", 1e-3), ("text_encoder", 1e-5), ("text_encoder_2", 1e-5)):
        ups = torch.cat([w.up.flatten() for w in adapter.component(component).values()]).abs()
        assert float(ups.max()) == pytest.approx(rate, rel=0.02), component
    for bad, message in (({"text_encoder_lr": 1e-5}, "--text-encoder-lr needs --train-text-encoder"),
                         ({"text_encoder_lr": -1.0, "train_text_encoder": True}, "--text-encoder-lr must be 0")):
        with pytest.raises(ValueError, match=message):
            DreamBoothConfig(data="x", **bad).check()


def test_loraplus_is_refused_where_there_is_no_up_projection():
    with pytest.raises(ValueError, match="--loraplus-ratio works with --adapter lora only"):
        TrainConfig(loraplus_ratio=16, adapter="singlora").check()
    with pytest.raises(ValueError, match="--loraplus-ratio must be positive"):
        TrainConfig(loraplus_ratio=0).check()


def test_timestep_weights_by_hand():
    from studio.trainers.loop import timestep_weights

    def weights(**cfg):
        return timestep_weights(TrainConfig(**cfg), 1000)

    assert weights() is None and weights(timestep_bias_strategy="later") is None  # multiplier 1: no bias
    w = weights(timestep_bias_strategy="earlier", timestep_bias_multiplier=3.0)  # portion 0.25: t < 250
    assert w.sum() == pytest.approx(1.0)
    assert w[0] == pytest.approx(3 / (250 * 3 + 750)) and w[249] == w[0] and w[250] == pytest.approx(1 / 1500)
    w = weights(timestep_bias_strategy="later", timestep_bias_multiplier=0.0, timestep_bias_portion=0.1)
    assert (w[900:] == 0).all() and w[:900] == pytest.approx(torch.full((900,), 1 / 900, dtype=torch.float64))
    w = weights(timestep_bias_strategy="range", timestep_bias_multiplier=2.0, timestep_bias_begin=100, timestep_bias_end=300)
    assert w[100] == pytest.approx(2 / 1200) and w[299] == w[100] and w[99] == w[300] == pytest.approx(1 / 1200)


class RecordingUNet(ZeroUNet):
    def __init__(self):
        super().__init__()
        self.timesteps, self.inputs = [], []

    def forward(self, x, t, embeds, added_cond_kwargs=None):
        self.timesteps.append(t.clone())
        self.inputs.append(x.clone())
        return super().forward(x, t, embeds, added_cond_kwargs)


def test_timestep_bias_draws_from_its_weights_after_the_noise():
    from studio.trainers.loop import timestep_weights

    latents = torch.randn(64, 4, 2, 2, generator=torch.Generator().manual_seed(4))
    cond = {"embeds": torch.zeros(64, 2, 8)}
    bias = {"timestep_bias_strategy": "later", "timestep_bias_multiplier": 0.0, "timestep_bias_portion": 0.5}
    ctx = _ctx("v_prediction", **bias)
    unet = ctx.store["unet"] = RecordingUNet()
    (loss,) = denoise_losses(ctx, [(latents, cond)], torch.Generator().manual_seed(9), reduction="none")
    g = torch.Generator().manual_seed(9)
    noise = torch.randn(latents.shape, generator=g)
    t = torch.multinomial(timestep_weights(ctx.cfg, 1000), 64, replacement=True, generator=g)
    assert torch.equal(unet.timesteps[0], t) and int(t.max()) < 500  # only the first half: the later half weighs 0
    abar = ctx.noise_scheduler.alphas_cumprod[t].double()[:, None, None, None]
    v = abar.sqrt() * noise.double() - (1 - abar).sqrt() * latents.double()
    assert loss.double() == pytest.approx((v**2).mean(dim=(1, 2, 3)), rel=1e-4)
    # no bias: the uniform draw as before the option existed
    plain = _ctx("v_prediction")
    plain.store["unet"] = RecordingUNet()
    denoise_losses(plain, [(latents, cond)], torch.Generator().manual_seed(9))
    assert torch.equal(plain.store["unet"].timesteps[0], _draws(9, latents.shape)[1])


@pytest.mark.parametrize(
    "cfg, message",
    [
        ({"timestep_bias_strategy": "middle"}, "--timestep-bias-strategy 'middle'; accepted: none, earlier, later, range"),
        ({"timestep_bias_multiplier": -1.0}, "--timestep-bias-multiplier must be 0 or positive"),
        ({"timestep_bias_portion": 0.0}, "--timestep-bias-portion must be above 0 and at most 1, got 0.0"),
        ({"timestep_bias_begin": 500, "timestep_bias_end": 500}, "--timestep-bias-begin 500 and --timestep-bias-end 500"),
        ({"timestep_bias_strategy": "earlier", "timestep_bias_portion": 1.0, "timestep_bias_multiplier": 0.0},
         "--timestep-bias-multiplier 0 with every timestep biased leaves none to draw"),
    ],
)
def test_bad_timestep_bias_is_refused_by_name(cfg, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        TrainConfig(**cfg).check()


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_input_perturbation_noises_the_input_with_a_second_draw_and_keeps_the_target(prediction_type):
    latents = torch.randn(5, 4, 3, 3, generator=torch.Generator().manual_seed(2))
    cond = {"embeds": torch.zeros(5, 2, 8)}
    runs = {}
    for gamma in (0.0, 0.1):
        ctx = _ctx(prediction_type, ip_noise_gamma=gamma, noise_offset=0.05)
        unet = ctx.store["unet"] = RecordingUNet()
        (loss,) = denoise_losses(ctx, [(latents, cond)], torch.Generator().manual_seed(3), reduction="none")
        runs[gamma] = (loss, unet.timesteps[0], unet.inputs[0])
    g = torch.Generator().manual_seed(3)  # replay: noise, timesteps, the offset's draw, then the perturbation's
    noise = torch.randn(latents.shape, generator=g)
    t = torch.randint(0, 1000, (5,), generator=g)
    noise = noise + 0.05 * torch.randn(5, 4, 1, 1, generator=g)
    second = torch.randn(latents.shape, generator=g)
    abar = _scaled_linear_abar(t)[:, None, None, None]
    a, s = abar.sqrt(), (1 - abar).sqrt()
    assert torch.equal(runs[0.0][1], t) and torch.equal(runs[0.1][1], t)
    assert runs[0.0][2].double() == pytest.approx(a * latents.double() + s * noise.double(), abs=1e-5)
    assert runs[0.1][2].double() == pytest.approx(a * latents.double() + s * (noise + 0.1 * second).double(), abs=1e-5)
    # the ZeroUNet's loss is its target's mean square: the same target with and without the perturbation
    target = noise.double() if prediction_type == "epsilon" else a * noise.double() - s * latents.double()
    assert runs[0.1][0].double() == pytest.approx((target**2).mean(dim=(1, 2, 3)), rel=1e-4)
    assert torch.equal(runs[0.0][0], runs[0.1][0])
