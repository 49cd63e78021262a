"""--multires-noise-iterations (kohya's pyramid noise) and --debiased-estimation (kohya's debiased estimation loss):
the noise and the weights, replayed by hand."""

import math

import pytest
import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler
from studio.trainers.loop import TrainConfig, debiased_weights, denoise_losses, multires_noise
from test_training_options import _ctx, _draws, _scaled_linear_abar


def _pyramid_by_hand(noise, levels, discount, g):
    """The pyramid replayed: per level a scale r in [2, 4), then a coarse draw, upsampled and added."""
    h, w = noise.shape[-2:]
    total = noise.clone()
    sizes = []
    for i in range(1, levels + 1):
        r = 2 + 2 * float(torch.rand((), generator=g))
        hi, wi = max(1, int(h / r**i)), max(1, int(w / r**i))
        sizes.append((hi, wi))
        coarse = torch.randn(noise.shape[0], noise.shape[1], hi, wi, generator=g)
        total += discount**i * F.interpolate(coarse, size=(h, w), mode="bilinear", align_corners=False)
        if min(hi, wi) == 1:
            break
    return total / total.std(dim=(1, 2, 3), keepdim=True), sizes


def test_multires_noise_by_hand():
    noise = torch.randn(3, 4, 32, 32, generator=torch.Generator().manual_seed(0))
    got = multires_noise(noise, 6, 0.3, torch.Generator().manual_seed(1))
    expected, sizes = _pyramid_by_hand(noise, 6, 0.3, torch.Generator().manual_seed(1))
    torch.testing.assert_close(got, expected)
    assert 1 < len(sizes) < 6 and min(sizes[-1]) == 1  # stops at the level one latent across
    assert got.std(dim=(1, 2, 3)) == pytest.approx([1.0] * 3, rel=1e-5)
    # the coarse levels make neighbouring latents agree more than white noise's do
    corr = lambda x: float((x[..., 1:] * x[..., :-1]).mean() / (x * x).mean())  # noqa: E731
    assert abs(corr(noise)) < 0.02 and corr(got) > 0.03
    assert corr(multires_noise(noise, 6, 0.8, torch.Generator().manual_seed(1))) > 0.3  # heavier coarse levels: more


def test_denoise_losses_draw_the_pyramid_after_everything_else():
    """ε-prediction with the ZeroUNet: the loss is the mean square of the multi-resolution noise, whose white part is
    the run's usual noise (drawn first, then the timesteps, the offset and the perturbation, then the pyramid)."""
    latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(2))
    cond = {"embeds": torch.zeros(2, 2, 8)}
    ctx = _ctx(noise_offset=0.1, ip_noise_gamma=0.1, multires_noise_iterations=3, multires_noise_discount=0.5)
    (loss,) = denoise_losses(ctx, [(latents, cond)], torch.Generator().manual_seed(3), reduction="none")
    g = torch.Generator().manual_seed(3)
    noise = torch.randn(latents.shape, generator=g)
    torch.randint(0, 1000, (2,), generator=g)
    noise = noise + 0.1 * torch.randn(2, 4, 1, 1, generator=g)
    torch.randn(latents.shape, generator=g)  # the perturbation's draw
    expected, _ = _pyramid_by_hand(noise, 3, 0.5, g)
    assert loss == pytest.approx((expected**2).mean(dim=(1, 2, 3)), rel=1e-5)
    first, _ = _draws(3, latents.shape, offset=0.1)
    torch.testing.assert_close(first, noise)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_debiased_weights_by_hand(prediction_type):
    latents = torch.randn(6, 4, 3, 3, generator=torch.Generator().manual_seed(1))
    cond = {"embeds": torch.zeros(6, 2, 8)}
    (loss,) = denoise_losses(_ctx(prediction_type, debiased_estimation=True), [(latents, cond)],
                             torch.Generator().manual_seed(7), reduction="none")
    (plain,) = denoise_losses(_ctx(prediction_type), [(latents, cond)], torch.Generator().manual_seed(7), reduction="none")
    _, t = _draws(7, latents.shape)
    abar = _scaled_linear_abar(t)
    snr = (abar / (1 - abar)).clamp(max=1000)
    weight = 1 / (snr + 1).sqrt() if prediction_type == "v_prediction" else 1 / snr.clamp(min=1e-3).sqrt()
    assert loss.double() == pytest.approx((plain.double() * weight), rel=1e-4)


def test_debiased_weight_is_finite_at_zero_terminal_snr():
    for kind, last in (("epsilon", 1 / math.sqrt(1e-3)), ("v_prediction", 1.0)):
        sched = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", prediction_type=kind,
                              rescale_betas_zero_snr=True)
        w = debiased_weights(sched, torch.tensor([0, 999]))
        assert torch.isfinite(w).all() and float(w[1]) == pytest.approx(last, rel=1e-4) and float(w[0]) < 0.1


@pytest.mark.parametrize("cfg, message", [
    ({"multires_noise_iterations": -1}, "--multires-noise-iterations must be 0 \\(off\\) or positive, got -1"),
    ({"multires_noise_discount": 0.0}, "--multires-noise-discount must be above 0 and at most 1, got 0"),
])
def test_bad_values_are_refused_by_name(cfg, message):
    with pytest.raises(ValueError, match=message):
        TrainConfig(data="x", **cfg).check()
