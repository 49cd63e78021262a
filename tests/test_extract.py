"""`studio extract`: a LoRA from a fine-tuned model's weight differences (kohya's extract_lora_from_models.py), on a
"fine-tune" of the embedded model made by adding known low-rank updates to some of its layers."""

import shutil

import pytest
import torch
from diffusers import UNet2DConditionModel
from test_cli import run as studio

from studio.adapters import load_adapter
from studio.adapters.extract import extract
from studio.adapters.form import canonical_name
from studio.families import EMBEDDED_MODEL, load_pipeline

Q = "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q"
V = "up_blocks.0.attentions.0.transformer_blocks.0.attn2.to_v"
CONV = "up_blocks.0.resnets.0.conv1"


def _known(shape, values, seed):
    """A matrix (or conv kernel) of ``shape`` whose flattened singular values are ``values``."""
    g = torch.Generator().manual_seed(seed)
    out, inner = shape[0], int(torch.tensor(shape[1:]).prod())
    u, _ = torch.linalg.qr(torch.randn(out, len(values), generator=g, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(inner, len(values), generator=g, dtype=torch.float64))
    return (u @ torch.diag(torch.tensor(values, dtype=torch.float64)) @ v.T).float().reshape(shape)


@pytest.fixture(scope="module")
def tuned(tmp_path_factory):
    """A copy of the embedded model with rank-2 updates (singular values 4 and 0.8) added to two attention projections and
    one convolution."""
    tmp = tmp_path_factory.mktemp("extract")
    folder = tmp / "tuned"
    shutil.copytree(EMBEDDED_MODEL, folder)
    unet = UNet2DConditionModel.from_pretrained(str(EMBEDDED_MODEL), subfolder="unet")
    deltas = {}
    for i, path in enumerate((Q, V, CONV)):
        layer = unet.get_submodule(path)
        deltas[path] = _known(tuple(layer.weight.shape), [4.0, 0.8], seed=i)
        with torch.no_grad():
            layer.weight += deltas[path]
    unet.save_pretrained(str(folder / "unet"), safe_serialization=True)
    return folder, deltas, unet


def test_the_extracted_layers_are_the_differences(tuned):
    folder, deltas, _ = tuned
    adapter, summary = extract(EMBEDDED_MODEL, folder, rank=4)
    base = UNet2DConditionModel.from_pretrained(str(EMBEDDED_MODEL), subfolder="unet")
    assert set(adapter.modules) == {canonical_name("unet", base, p) for p in (Q, V)}  # no conv without --conv
    assert summary["written"] == 2 and summary["compared"] > 2 and summary["min_kept"] == pytest.approx(1.0)
    for path in (Q, V):
        got = adapter.modules[canonical_name("unet", base, path)]
        assert got.rank == 2  # a rank-2 difference: the two singular values, not 4
        torch.testing.assert_close(got.delta(), deltas[path], rtol=1e-4, atol=1e-5)
    assert adapter.meta.trainer == "extract" and adapter.meta.extra["tuned_model"] == "tuned"
    with_conv, _ = extract(EMBEDDED_MODEL, folder, rank=4, conv=True)
    torch.testing.assert_close(with_conv.modules[canonical_name("unet", base, CONV)].delta(), deltas[CONV],
                               rtol=1e-4, atol=1e-5)


def test_a_lower_rank_keeps_the_largest_value(tuned):
    """Rank 1 of a difference with singular values 4 and 0.8: the error is 0.8 (Eckart-Young), 4 / sqrt(16.64) of
    the norm kept."""
    folder, deltas, _ = tuned
    adapter, summary = extract(EMBEDDED_MODEL, folder, rank=1)
    base = UNet2DConditionModel.from_pretrained(str(EMBEDDED_MODEL), subfolder="unet")
    got = adapter.modules[canonical_name("unet", base, Q)]
    assert float(torch.linalg.matrix_norm(got.delta() - deltas[Q])) == pytest.approx(0.8, rel=1e-3)
    assert summary["min_kept"] == pytest.approx(4 / 16.64**0.5, rel=1e-4)


def test_the_base_model_with_the_extraction_is_the_fine_tune(tuned):
    from studio.plugin import attach, detach

    folder, _, tuned_unet = tuned
    adapter, _ = extract(EMBEDDED_MODEL, folder, rank=4, conv=True)
    pipe = load_pipeline(EMBEDDED_MODEL)
    cfg = pipe.unet.config
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, cfg.in_channels, cfg.sample_size, cfg.sample_size, generator=g)
    text = torch.randn(1, 7, cfg.cross_attention_dim, generator=g)
    added = {"text_embeds": torch.randn(1, pipe.text_encoder_2.config.projection_dim, generator=g),
             "time_ids": torch.tensor([[64.0, 64, 0, 0, 64, 64]])}
    with torch.no_grad():
        want = tuned_unet(x, 500, text, added_cond_kwargs=added).sample
        plain = pipe.unet(x, 500, text, added_cond_kwargs=added).sample
        attach(pipe, [adapter])
        got = pipe.unet(x, 500, text, added_cond_kwargs=added).sample
        detach(pipe)
    assert float((plain - want).abs().max()) > 1e-3  # the fine-tune differs from the base
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_cli_writes_the_file_and_refuses_what_it_cannot_extract(tuned, tmp_path):
    folder, _, _ = tuned
    out = tmp_path / "x.safetensors"
    done = studio("extract", "--base", str(EMBEDDED_MODEL), "--tuned", str(folder), "--rank", "8", "-o", str(out),
                  "--format", "kohya", "--save-precision", "fp16")
    assert done.returncode == 0, done.stderr
    assert "wrote" in done.stdout and "2 of" in done.stdout
    assert len(load_adapter(out).modules) == 2
    same = studio("extract", "--base", str(EMBEDDED_MODEL), "--tuned", str(EMBEDDED_MODEL), "-o", str(tmp_path / "s.safetensors"))
    assert same.returncode != 0 and "does not differ from --base" in same.stderr
    pickled = tmp_path / "pickled"
    shutil.copytree(folder, pickled)
    weights = pickled / "unet" / "diffusion_pytorch_model.safetensors"
    weights.rename(weights.with_suffix(".bin"))  # only a .bin beside the config: never read
    refused = studio("extract", "--base", str(EMBEDDED_MODEL), "--tuned", str(pickled), "-o", str(tmp_path / "p.safetensors"))
    assert refused.returncode != 0 and "its UNet has no safetensors weights" in refused.stderr
    bad = studio("extract", "--base", str(EMBEDDED_MODEL), "--tuned", str(folder), "--rank", "0", "-o", str(tmp_path / "r.safetensors"))
    assert bad.returncode != 0 and "--rank 0 is out of range; accepted: 1 to 256" in bad.stderr
    assert not any((tmp_path / n).exists() for n in ("s.safetensors", "p.safetensors", "r.safetensors"))


def test_another_architecture_is_refused_by_name(tuned, tmp_path):
    folder, _, _ = tuned
    other = tmp_path / "other"
    shutil.copytree(folder, other)
    unet = UNet2DConditionModel.from_pretrained(str(folder), subfolder="unet")
    config = dict(unet.config)
    config["cross_attention_dim"] = config["cross_attention_dim"] * 2
    UNet2DConditionModel.from_config(config).save_pretrained(str(other / "unet"), safe_serialization=True)
    with pytest.raises(ValueError, match=r"is not the same architecture as --base .*: its \S+ is of shape"):
        extract(EMBEDDED_MODEL, other)
