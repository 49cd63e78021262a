"""The pretraining recipe at toy size: it runs end to end and resumes to the same result."""

import numpy as np
import torch
from diffusers import StableDiffusionXLPipeline
from safetensors.torch import load_file

from studio.world.pretrain import PretrainConfig, object_masks, pretrain
from studio.world.render import Scene, WorldObject, render_array


def _cfg(tmp, name, unet_steps):
    return PretrainConfig(out=str(tmp / name / "model"), work_dir=str(tmp / name / "work"), n_scenes=48,
                          vae_steps=3, vae_batch=4, unet_steps=unet_steps, unet_batch=4, warmup=10,
                          checkpoint_every=2, monitor_every=0, zero_snr_from=2, lr_ends=(),  # steps 2, 3: zero-terminal SNR
                          object_weight=4.0)


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


def test_object_masks_cover_objects_and_their_inside():
    scenes = [Scene((WorldObject("square", "red", "large", "top left", "outlined"),), "white"),
              Scene((WorldObject("circle", "blue", "small", "bottom right", "flat"),
                     WorldObject("diamond", "green", "medium", "center", "striped")), "black")]
    images = torch.from_numpy(np.stack([render_array(s, 0) for s in scenes]))
    masks = object_masks(images, scenes, factor=4)
    assert masks.shape == (2, 1, 16, 16) and masks.dtype == torch.bool
    # a large outlined square at the top left spans about 19 px (5 latent pixels) around (10.7, 10.7) px:
    # its outline and the background-coloured inside are both covered; the far corner is not
    assert masks[0, 0, 1:4, 1:4].all() and not masks[0, 0, 8:, 8:].any()
    assert masks[1, 0, 13, 13] and masks[1, 0, 8, 8] and not masks[1, 0, 0, 15] and not masks[1, 0, 15, 0]
    # objects are a small part of a scene: that is why the loss weights them up
    assert 0.05 < masks.float().mean() < 0.4
