"""The pretraining recipe at toy size: it runs end to end and resumes to the same result."""

import torch
from diffusers import StableDiffusionXLPipeline
from safetensors.torch import load_file

from studio.world.pretrain import PretrainConfig, pretrain


def _cfg(tmp, name, unet_steps):
    return PretrainConfig(out=str(tmp / name / "model"), work_dir=str(tmp / name / "work"), n_scenes=48,
                          vae_steps=3, vae_batch=4, unet_steps=unet_steps, unet_batch=4, warmup=10,
                          checkpoint_every=2, monitor_every=0, zero_snr_from=2, lr_ends=())  # steps 2, 3: zero-terminal SNR


def test_learning_rate_phases():
    cfg = PretrainConfig(unet_steps=5000, zero_snr_from=3000, lr_ends=())
    assert [cfg.lr_total(s) for s in (0, 2999, 3000, 4999)] == [3000, 3000, 5000, 5000]
    shipped = PretrainConfig()  # the shipped weights' schedule: cosines to 3000, 5000 and 7000
    assert [shipped.lr_total(s) for s in (0, 2999, 3000, 4999, 5000, 6999)] == [3000, 3000, 5000, 5000, 7000, 7000]
    assert [cfg.zero_snr_at(s) for s in (0, 2999, 3000)] == [False, False, True]
    assert not PretrainConfig(zero_snr_from=-1).zero_snr_at(10**6) and PretrainConfig(zero_snr_from=0).zero_snr_at(0)
    assert PretrainConfig(unet_steps=3000, zero_snr_from=-1, lr_ends=()).lr_total(10) == 3000


def test_pretrain_resumes_to_the_same_weights(tmp_path):
    straight = pretrain(_cfg(tmp_path, "a", 4))
    pretrain(_cfg(tmp_path, "b", 2))  # a run that stopped after step 2 ...
    resumed = pretrain(_cfg(tmp_path, "b", 4))  # ... continued with the same work dir
    a = load_file(str(straight / "unet" / "diffusion_pytorch_model.safetensors"))
    b = load_file(str(resumed / "unet" / "diffusion_pytorch_model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6)
    pipe = StableDiffusionXLPipeline.from_pretrained(str(resumed), local_files_only=True)
    # the last phase trained with zero-terminal-SNR betas: the saved sampler uses them, trailing timesteps
    assert pipe.scheduler.config.rescale_betas_zero_snr and pipe.scheduler.config.timestep_spacing == "trailing"
    image = pipe("a red circle", num_inference_steps=2, output_type="pil").images[0]
    assert image.size == (64, 64)
