"""The pretraining recipe at toy size: it runs end to end and resumes to the same result."""

import dataclasses
import json
import random

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionXLPipeline
from safetensors.torch import load_file

from studio.world.concepts import OBJECT_COUNTS
from studio.world.pretrain import (
    PROBE_SCALE,
    PretrainConfig,
    _scenes,
    check_work_dir,
    object_masks,
    pretrain,
    probe_vocabulary,
    text_probe_loss,
)
from studio.world.render import Scene, WorldObject, render_array, sample_scene


def _cfg(tmp, name, unet_steps):
    return PretrainConfig(out=str(tmp / name / "model"), work_dir=str(tmp / name / "work"), n_scenes=48,
                          vae_steps=3, vae_batch=4, unet_steps=unet_steps, unet_batch=4, warmup=10,
                          checkpoint_every=2, monitor_every=0, zero_snr_from=2, lr_ends=(),  # steps 2, 3: zero-terminal SNR
                          object_weight=4.0, text_probe_weight=0.5)


def test_learning_rate_phases():
    budget = PretrainConfig()  # the default recipe: one cosine over the run, zero-terminal SNR from step 3600
    assert [budget.lr_total(s) for s in (0, 3599, 3600, 17999)] == [18000] * 4
    assert [budget.zero_snr_at(s) for s in (0, 3599, 3600)] == [False, False, True]
    legs = PretrainConfig(unet_steps=7000, lr_ends=(3000, 5000))  # the shipped weights' legs to step 7000
    assert [legs.lr_total(s) for s in (0, 2999, 3000, 4999, 5000, 6999)] == [3000, 3000, 5000, 5000, 7000, 7000]
    assert not PretrainConfig(zero_snr_from=-1).zero_snr_at(10**6) and PretrainConfig(zero_snr_from=0).zero_snr_at(0)
    assert PretrainConfig(unet_steps=3000, lr_ends=(5000,)).lr_total(10) == 3000  # an end past the run is ignored


def test_pretrain_resumes_to_the_same_weights(tmp_path):
    straight = pretrain(_cfg(tmp_path, "a", 4))
    pretrain(_cfg(tmp_path, "b", 2))  # a run that stopped after step 2 ...
    resumed = pretrain(_cfg(tmp_path, "b", 4))  # ... continued with the same work dir
    for part in ("unet/diffusion_pytorch_model", "text_encoder/model", "text_encoder_2/model"):
        a = load_file(str(straight / f"{part}.safetensors"))
        b = load_file(str(resumed / f"{part}.safetensors"))
        assert a.keys() == b.keys()
        for k in a:
            torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6)
    assert (tmp_path / "b" / "work" / "unet" / "checkpoint-2" / "probe.safetensors").is_file()  # the probe resumes too
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


def test_text_probe_loss_by_hand():
    vocab = torch.tensor([5, 7])
    ids = torch.tensor([[1, 5, 9, 7], [1, 9, 9, 9]])  # row 0: words 5 and 7 at positions 1 and 3; row 1: none
    probe = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    hidden = torch.zeros(2, 4, 2)
    hidden[0, 1], hidden[0, 3] = torch.tensor([3.0, 0.0]), torch.tensor([0.0, 0.5])  # each along its own row
    right = torch.log1p(torch.exp(torch.tensor(-PROBE_SCALE)))  # -log softmax with cosines 1 and 0
    torch.testing.assert_close(text_probe_loss(probe, vocab, ids, hidden), right)
    hidden[0, 1], hidden[0, 3] = hidden[0, 3].clone(), hidden[0, 1].clone()  # swapped: each names the other word
    torch.testing.assert_close(text_probe_loss(probe, vocab, ids, hidden), right + PROBE_SCALE)
    assert float(text_probe_loss(probe, vocab, ids[1:], hidden[1:])) == 0.0  # no attribute word: nothing to name


def test_probe_vocabulary_is_one_token_per_attribute_word():
    from transformers import CLIPTokenizer

    from studio.families import EMBEDDED_MODEL
    from studio.world.concepts import BASE_SHAPES, BASE_STYLES, COLOUR_NAMES, SIZE_NAMES

    tok = CLIPTokenizer.from_pretrained(str(EMBEDDED_MODEL / "tokenizer"))
    vocab = probe_vocabulary(tok)
    words = [*BASE_SHAPES, *COLOUR_NAMES, *BASE_STYLES, *SIZE_NAMES]
    assert len(vocab) == len(set(vocab.tolist())) == len(words)
    assert tok.convert_ids_to_tokens(vocab.tolist()) == [f"{w}</w>" for w in words]


def test_refine_vae_keeps_the_latents_it_is_anchored_to():
    from studio.world.model import build_vae
    from studio.world.pretrain import _to_pixels, refine_vae

    torch.manual_seed(0)
    vae = build_vae().eval()
    before = {k: v.clone() for k, v in vae.state_dict().items()}
    scenes = [Scene((WorldObject(s, "red", "large", "center", st),), "white")
              for s, st in (("circle", "flat"), ("square", "striped"), ("triangle", "dotted"))]
    x = _to_pixels(torch.from_numpy(np.stack([render_array(s, 0) for s in scenes])))
    with torch.no_grad():
        ref = vae.encode(x).latent_dist.mode()

    def drift(anchor):
        new = refine_vae(vae, steps=4, n_scenes=8, batch=4, lr=1e-2, anchor_weight=anchor, progress=False)
        with torch.no_grad():
            return float((new.encode(x).latent_dist.mode() - ref).pow(2).mean() / ref.var()), new

    free, new = drift(0.0)
    anchored, _ = drift(1000.0)
    assert all(torch.equal(before[k], v) for k, v in vae.state_dict().items())  # the input VAE is left as it was
    assert new.config == vae.config and not all(torch.equal(before[k], v) for k, v in new.state_dict().items())
    assert anchored < free / 2  # the anchor holds the base scenes' latents where the denoiser expects them


def test_pretrain_continues_from_a_saved_model(tmp_path):
    source = pretrain(_cfg(tmp_path, "source", 2))
    cfg = dataclasses.replace(_cfg(tmp_path, "cont", 1), init_from=str(source), unet_lr=1e-6, seed=1)
    cont = pretrain(cfg)
    # the source's VAE, latent scale and tokenizer are kept as they are; the VAE stage does not run
    a, b = load_file(str(source / "vae/diffusion_pytorch_model.safetensors")), load_file(str(cont / "vae/diffusion_pytorch_model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    src, new = (StableDiffusionXLPipeline.from_pretrained(str(p), local_files_only=True) for p in (source, cont))
    assert new.vae.config.scaling_factor == src.vae.config.scaling_factor
    assert new.tokenizer.get_vocab() == src.tokenizer.get_vocab()
    for part in ("tokenizer", "tokenizer_2"):
        for f in (source / part).iterdir():
            assert (cont / part / f.name).read_bytes() == f.read_bytes()
    assert not (tmp_path / "cont" / "work" / "vae").exists()
    # one step at a tiny learning rate from the source's weights: the UNet and text encoders stay next to them
    # (a fresh start, with another seed, would be nowhere near)
    for part in ("unet/diffusion_pytorch_model", "text_encoder/model", "text_encoder_2/model"):
        a, b = load_file(str(source / f"{part}.safetensors")), load_file(str(cont / f"{part}.safetensors"))
        assert a.keys() == b.keys()
        assert max(float((a[k] - b[k]).abs().max()) for k in a) < 1e-3
    fresh = load_file(str(pretrain(dataclasses.replace(cfg, init_from="", out=str(tmp_path / "fresh" / "model"),
                                                       work_dir=str(tmp_path / "fresh" / "work")))
                          / "unet/diffusion_pytorch_model.safetensors"))
    a = load_file(str(source / "unet/diffusion_pytorch_model.safetensors"))
    assert max(float((a[k] - fresh[k]).abs().max()) for k in a) > 1e-2
    with pytest.raises(FileNotFoundError, match="no unet"):
        pretrain(dataclasses.replace(cfg, init_from=str(tmp_path), work_dir=str(tmp_path / "bad")))
    assert not (tmp_path / "bad").exists()  # refused before anything is written
    with pytest.raises(ValueError, match="init_from with standardize_latents"):
        pretrain(dataclasses.replace(cfg, standardize_latents=True, work_dir=str(tmp_path / "bad2")))
    assert not (tmp_path / "bad2").exists()  # refused before anything is written


def test_object_counts_mix_the_scenes_and_the_worlds_mix_keeps_the_old_draw():
    # the world's own mix draws the very scenes the shipped weights and earlier runs rendered
    rng = random.Random(0)
    assert _scenes(PretrainConfig(n_scenes=300, object_counts=OBJECT_COUNTS)) == [sample_scene(rng) for _ in range(300)]
    counts = [len(s.objects) for s in _scenes(PretrainConfig(n_scenes=300, object_counts=(2, 3)))]
    assert set(counts) == {2, 3}


def test_a_work_dir_made_for_other_scenes_is_refused(tmp_path):
    cfg = PretrainConfig(work_dir=str(tmp_path), n_scenes=48)
    check_work_dir(cfg, tmp_path)  # nothing there yet
    (tmp_path / "config.json").write_text(json.dumps(dataclasses.asdict(cfg)))
    check_work_dir(dataclasses.replace(cfg, unet_steps=5), tmp_path)  # other training knobs resume as before
    with pytest.raises(ValueError, match=r"n_scenes=48, object_counts=\[1, 2, 2, 3\], not n_scenes=50, object_counts=\[2, 3\]"):
        check_work_dir(dataclasses.replace(cfg, n_scenes=50, object_counts=(2, 3)), tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["n_scenes"] == 48  # left as it was


def test_texture_words_and_captions():
    from studio.world.grammar import VOCABULARY, parse_prompt
    from studio.world.pretrain import RESERVED_WORDS, _caption, _scene_textures, texture_words
    from studio.world.render import TEXTURE_CATALOGUE

    words = texture_words(len(TEXTURE_CATALOGUE), seed=0)
    assert [(t.kind, t.period, t.angle) for t in words] == list(TEXTURE_CATALOGUE)
    names = [t.word for t in words]
    assert len(set(names)) == len(names) and not set(names) & (RESERVED_WORDS | set(VOCABULARY))
    assert texture_words(3, seed=0) == words[:3] and [t.word for t in texture_words(3, seed=1)] != names[:3]
    with pytest.raises(ValueError, match="textures: 15 asked for; accepted: 0 to 14"):
        texture_words(15)
    cfg = PretrainConfig(n_scenes=200, textures=4, texture_rate=0.5)
    scenes = _scenes(cfg)
    picks = _scene_textures(cfg, scenes)
    worn = [t for p in picks if p for t in p if t]
    assert 0.35 < len(worn) / sum(len(s.objects) for s in scenes) < 0.65 and {t.word for t in worn} == set(names[:4])
    assert _scene_textures(dataclasses.replace(cfg, textures=0), scenes) == [None] * 200
    # an object in a named texture is always called by its word, where the style goes; the others as before
    i = next(i for i, p in enumerate(picks) if p and None in p)
    for seed in range(10):
        caption = parse_prompt(_caption(scenes[i], random.Random(seed), 0.0, picks[i]))
        assert sorted(caption.unknown) == sorted(t.word for t in picks[i] if t)
        assert all(o.style is None for o in caption.objects)  # detail 0: no style word for the others


def test_pretrain_with_named_textures_and_a_given_vae(tmp_path):
    from studio.world.pretrain import check_vae_from

    vae_dir = tmp_path / "vae"
    StableDiffusionXLPipeline.from_pretrained(str(pretrain(_cfg(tmp_path, "src", 1))), local_files_only=True).vae.save_pretrained(vae_dir)
    model = pretrain(dataclasses.replace(_cfg(tmp_path, "tex", 2), textures=3, texture_rate=0.5, vae_from=str(vae_dir)))
    a, b = load_file(str(vae_dir / "diffusion_pytorch_model.safetensors")), load_file(str(model / "vae/diffusion_pytorch_model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # the VAE stage did not run
    assert json.loads((model / "recipe.json").read_text())["config"]["textures"] == 3
    # bad input is refused before the work dir is written
    for bad, message in ((dataclasses.replace(_cfg(tmp_path, "bad", 1), textures=20), "textures: 20 asked for"),
                         (dataclasses.replace(_cfg(tmp_path, "bad", 1), texture_rate=1.5), "texture_rate must be a chance"),
                         (dataclasses.replace(_cfg(tmp_path, "bad", 1), vae_from=str(tmp_path)), "not a diffusers AutoencoderKL")):
        with pytest.raises((ValueError, FileNotFoundError), match=message):
            pretrain(bad)
        assert not (tmp_path / "bad").exists()
    with pytest.raises(ValueError, match="vae_from with init_from"):
        check_vae_from(dataclasses.replace(_cfg(tmp_path, "bad", 1), vae_from=str(vae_dir), init_from=str(model)))
