"""studio.adapters: the in-memory form, the diffusers/peft and kohya layouts, stock diffusers loading."""

import json

import pytest
import torch
from conftest import random_adapter  # noqa: E402  (tests/ is on sys.path under pytest)
from diffusers import StableDiffusionXLPipeline, UNet2DConditionModel
from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from studio.adapters import Adapter, LoraWeights, load_adapter, save_adapter, to_state_dict
from studio.adapters.form import canonical_name, resolve_module
from studio.adapters.keys import (
    SD15_LAYOUT,
    SDXL_LAYOUT,
    UNetLayout,
    canonical_from_kohya,
    dotted,
    kohya_name,
    underscored,
    unet_from_ldm,
    unet_to_ldm,
)
from studio.families import EMBEDDED_MODEL


@pytest.fixture(scope="module")
def pipe():
    return StableDiffusionXLPipeline.from_pretrained(str(EMBEDDED_MODEL), local_files_only=True)


def tiny_sd15_unet() -> UNet2DConditionModel:
    """SD1.5's block layout (3 cross-attention down blocks, then a plain one; mirrored up), tiny."""
    return UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(8, 8, 16, 16), layers_per_block=2,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        cross_attention_dim=16, attention_head_dim=2, norm_num_groups=8,
    )


def _unets(pipe):
    return [(pipe.unet, SDXL_LAYOUT), (tiny_sd15_unet(), SD15_LAYOUT)]


def _weight_modules(model):
    return [n for n, m in model.named_modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))]


def test_layouts_read_from_the_config_match_the_families(pipe):
    assert UNetLayout.from_config(pipe.unet.config) == SDXL_LAYOUT
    assert UNetLayout.from_config(tiny_sd15_unet().config) == SD15_LAYOUT


def test_underscored_names_invert_for_every_module(pipe):
    models = [pipe.unet, pipe.text_encoder, pipe.text_encoder_2, tiny_sd15_unet()]
    names = [n for m in models for n in _weight_modules(m)]
    assert len(names) > 200
    for name in names:
        assert dotted(underscored(name)) == name


def test_ldm_numbering_inverts_for_every_module(pipe):
    for unet, layout in _unets(pipe):
        for name in _weight_modules(unet):
            assert unet_from_ldm(unet_to_ldm(name, layout), layout) == name


def test_ldm_numbering_agrees_with_diffusers_own_single_file_converter(pipe):
    """diffusers' LDM -> diffusers checkpoint converter puts every tensor back where we took it from."""
    for unet, layout in _unets(pipe):
        g = torch.Generator().manual_seed(0)
        ours = {k: torch.randn(v.shape, generator=g) for k, v in unet.state_dict().items()}  # all distinct
        ldm = {}
        for key, value in ours.items():
            module, _, leaf = key.rpartition(".")
            ldm[f"model.diffusion_model.{unet_to_ldm(module, layout)}.{leaf}"] = value
        back = convert_ldm_unet_checkpoint(ldm, dict(unet.config))
        assert set(back) == set(ours)
        for key in ours:
            torch.testing.assert_close(back[key].reshape(ours[key].shape), ours[key], rtol=0, atol=0)


# Names as kohya's sd-scripts writes them for SDXL, and as ComfyUI's SDXL key map (``lora_unet_`` +
# the LDM state-dict key with dots as underscores; ``lora_te1_``/``lora_te2_`` + the transformers
# CLIP key) and A1111's network_layer_mapping look them up. The embedded model has SDXL's layout.
KOHYA_SDXL = {
    "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q": "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q",
    "unet.down_blocks.2.attentions.1.transformer_blocks.0.attn2.to_k": "lora_unet_input_blocks_8_1_transformer_blocks_0_attn2_to_k",
    "unet.mid_block.attentions.0.transformer_blocks.0.attn1.to_out.0": "lora_unet_middle_block_1_transformer_blocks_0_attn1_to_out_0",
    "unet.up_blocks.0.attentions.0.transformer_blocks.0.attn2.to_v": "lora_unet_output_blocks_0_1_transformer_blocks_0_attn2_to_v",
    "unet.up_blocks.0.attentions.1.proj_in": "lora_unet_output_blocks_1_1_proj_in",
    "unet.up_blocks.1.attentions.2.transformer_blocks.0.ff.net.0.proj": "lora_unet_output_blocks_5_1_transformer_blocks_0_ff_net_0_proj",
    "unet.down_blocks.0.resnets.1.conv1": "lora_unet_input_blocks_2_0_in_layers_2",
    "unet.up_blocks.2.resnets.0.time_emb_proj": "lora_unet_output_blocks_6_0_emb_layers_1",
    "unet.up_blocks.1.upsamplers.0.conv": "lora_unet_output_blocks_5_2_conv",
    "unet.down_blocks.1.downsamplers.0.conv": "lora_unet_input_blocks_6_0_op",
    "text_encoder.text_model.encoder.layers.0.self_attn.q_proj": "lora_te1_text_model_encoder_layers_0_self_attn_q_proj",
    "text_encoder_2.text_model.encoder.layers.2.mlp.fc1": "lora_te2_text_model_encoder_layers_2_mlp_fc1",
}


def test_kohya_names_follow_the_sdxl_rules(pipe):
    modules = {canonical_name(c, getattr(pipe, c), n) for c in ("unet", "text_encoder", "text_encoder_2")
               for n in _weight_modules(getattr(pipe, c))}
    for canonical, kohya in KOHYA_SDXL.items():
        assert canonical in modules
        assert kohya_name(canonical, "sdxl", SDXL_LAYOUT) == kohya
        assert canonical_from_kohya(kohya, SDXL_LAYOUT) == canonical


def test_kohya_sd15_uses_diffusers_unet_names_and_reads_both():
    canonical = "unet.down_blocks.0.attentions.1.transformer_blocks.0.attn1.to_q"
    assert kohya_name(canonical, "sd15", SD15_LAYOUT) == "lora_unet_down_blocks_0_attentions_1_transformer_blocks_0_attn1_to_q"
    assert kohya_name("text_encoder.text_model.encoder.layers.3.mlp.fc2", "sd15", SD15_LAYOUT) == "lora_te_text_model_encoder_layers_3_mlp_fc2"
    # the LDM spelling of the same module (what ComfyUI also accepts) reads back to it
    assert canonical_from_kohya("lora_unet_input_blocks_2_1_transformer_blocks_0_attn1_to_q", SD15_LAYOUT) == canonical
    with pytest.raises(ValueError, match="lora_unet_"):
        canonical_from_kohya("unet_down_blocks_0", SD15_LAYOUT)


def _same(a: Adapter, b: Adapter):
    assert set(a.modules) == set(b.modules)
    for k, w in a.modules.items():
        v = b.modules[k]
        assert torch.equal(w.down, v.down) and torch.equal(w.up, v.up), k
        assert w.alpha == v.alpha, (k, w.alpha, v.alpha)
    assert a.meta == b.meta


def test_conversion_round_trips_exactly(pipe, tmp_path):
    adapter = random_adapter(pipe)
    assert len({w.rank for w in adapter.modules.values()}) == 2 and len({w.alpha for w in adapter.modules.values()}) > 2
    d1 = save_adapter(adapter, tmp_path / "a.safetensors", layout="diffusers")
    k1 = save_adapter(load_adapter(d1), tmp_path / "b.safetensors", layout="kohya")
    d2 = save_adapter(load_adapter(k1), tmp_path / "c.safetensors", layout="diffusers")
    _same(adapter, load_adapter(d1))
    _same(adapter, load_adapter(k1))
    _same(adapter, load_adapter(d2))
    t1, t2 = load_file(str(d1)), load_file(str(d2))  # same tensors and header (safetensors orders its header freely)
    assert t1.keys() == t2.keys() and all(torch.equal(t1[k], t2[k]) for k in t1)
    with safe_open(str(d1), framework="pt") as f1, safe_open(str(d2), framework="pt") as f2:
        assert f1.metadata() == f2.metadata()
    assert not list(tmp_path.glob("*.tmp"))


def test_metadata_is_in_the_header(pipe, tmp_path):
    path = save_adapter(random_adapter(pipe), tmp_path / "a.safetensors", layout="kohya")
    with safe_open(str(path), framework="pt") as f:
        header = f.metadata()
    meta = json.loads(header["studio"])
    assert meta["token"] == "sks" and meta["trainer"] == "test" and meta["rank"] == 4 and meta["family"] == "sdxl"
    assert header["ss_network_module"] == "networks.lora" and header["ss_base_model_version"].startswith("sdxl")


def test_stock_load_lora_weights_applies_our_ranks_and_alphas(tmp_path):
    pipe = StableDiffusionXLPipeline.from_pretrained(str(EMBEDDED_MODEL), local_files_only=True)
    adapter = random_adapter(pipe)
    base = {c: {k: v.clone() for k, v in getattr(pipe, c).state_dict().items()} for c in adapter.components}
    path = save_adapter(adapter, tmp_path / "a.safetensors", layout="diffusers")
    pipe.load_lora_weights(str(path), adapter_name="ours")
    pipe.fuse_lora(components=["unet", "text_encoder", "text_encoder_2"], lora_scale=1.0)
    for name, w in adapter.modules.items():
        component, _, module = name.partition(".")
        model = getattr(pipe, component)
        fused = resolve_module(model, module)
        weight = fused.base_layer.weight if hasattr(fused, "base_layer") else fused.weight
        key = next(k for k in (f"{module}.weight", f"{module.removeprefix('text_model.')}.weight") if k in base[component])
        expected = base[component][key] + w.delta()
        torch.testing.assert_close(weight.detach(), expected, rtol=1e-5, atol=1e-6, msg=name)


def test_peft_folder_is_read(tmp_path):
    from peft import LoraConfig, get_peft_model, get_peft_model_state_dict

    unet = tiny_sd15_unet()
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["to_q", "to_v"], rank_pattern={"attn2.to_q": 2},
                        alpha_pattern={"attn2.to_v": 3}, init_lora_weights=False)
    model = get_peft_model(unet, config)
    model.save_pretrained(tmp_path / "peft")
    adapter = load_adapter(tmp_path / "peft")
    state = get_peft_model_state_dict(model)
    assert len(adapter.modules) == len(state) // 2 > 0
    for name, w in adapter.modules.items():
        layer = model.base_model.model.get_submodule(name.removeprefix("unet."))
        expected = layer.lora_B["default"].weight @ layer.lora_A["default"].weight * layer.scaling["default"]
        torch.testing.assert_close(w.delta(), expected.detach())
    assert {w.rank for w in adapter.modules.values()} == {2, 4}


@pytest.mark.parametrize("suffix", [".bin", ".pt", ".ckpt"])
def test_pickle_files_are_refused(tmp_path, suffix):
    path = tmp_path / f"a{suffix}"
    torch.save({"x": torch.zeros(1)}, path)
    with pytest.raises(ValueError, match="pickle"):
        load_adapter(path)


def test_a_pickle_renamed_to_safetensors_is_refused(tmp_path):
    path = tmp_path / "a.safetensors"
    torch.save({"x": torch.zeros(1)}, path)
    with pytest.raises(ValueError, match="pickle"):
        load_adapter(path)


def test_bad_files_give_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        load_adapter(tmp_path / "missing.safetensors")
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"{not safetensors")
    with pytest.raises(ValueError, match="safetensors"):
        load_adapter(junk)
    half = tmp_path / "half.safetensors"
    save_file({"unet.x.lora_A.weight": torch.zeros(2, 3)}, str(half))
    with pytest.raises(ValueError, match="lacks its up weight"):
        load_adapter(half)
    with pytest.raises(ValueError, match="rank"):
        LoraWeights(torch.zeros(2, 3), torch.zeros(4, 3), 1.0)
    with pytest.raises(ValueError, match="layout"):
        to_state_dict(Adapter({"unet.a": LoraWeights(torch.zeros(1, 2), torch.zeros(2, 1), 1.0)}), "comfy")
