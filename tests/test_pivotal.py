"""Pivotal tuning (``--pivotal``): the identifier as a new token whose embedding trains beside the LoRA; the
embeddings' file beside the adapter; attaching and detaching them."""

import pytest
import torch
from conftest import random_adapter
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from studio.trainers.config import build_config
from studio.trainers.dreambooth import DreamBooth, DreamBoothConfig, _encode
from studio.trainers.loop import train
from studio.trainers.pivotal import add_token
from test_dreambooth import star_folder

from studio.adapters import Adapter, load_adapter, save_adapter
from studio.adapters.files import embeddings_path
from studio.adapters.form import TEXT_ENCODERS, joined_embeddings, tokenizer_of
from studio.families import load_pipeline
from studio.plugin import attach, detach
from studio.sampling import generate


def tables(pipe) -> dict[str, torch.Tensor]:
    return {c: getattr(pipe, c).get_input_embeddings().weight.detach().clone() for c in TEXT_ENCODERS}


def test_add_token_starts_at_its_pieces_and_replaces_only_its_own_row():
    pipe = load_pipeline()
    before = tables(pipe)
    pieces = {c: getattr(pipe, tokenizer_of(c))("zxy", add_special_tokens=False).input_ids for c in TEXT_ENCODERS}
    assert all(len(p) > 1 for p in pieces.values())  # a rare word: several pieces before
    plain = _encode(pipe, ["a large red circle in the center"])["embeds"]
    params = add_token(pipe, "zxy")
    for c in TEXT_ENCODERS:
        torch.testing.assert_close(params[c].detach(), before[c][pieces[c]].mean(0, keepdim=True))
        assert getattr(pipe, tokenizer_of(c)).tokenize("a zxy circle") == ["a</w>", "zxy", "circle</w>"]
    torch.testing.assert_close(_encode(pipe, ["a large red circle in the center"])["embeds"], plain, rtol=0, atol=0)
    with torch.no_grad():
        for p in params.values():
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(1)))
    prompt = ["a large zxy circle in the center"]
    got = _encode(pipe, prompt)
    got["embeds"].sum().backward()
    for c, p in params.items():  # only the vector trains
        assert p.grad is not None and float(p.grad.abs().sum()) > 0
        assert all(w.grad is None for w in getattr(pipe, c).parameters())
    # by hand: the table's own row set to the vector, without the hook
    for c, p in params.items():
        table = getattr(pipe, c).get_input_embeddings()
        table._forward_hooks.clear()
        with torch.no_grad():
            table.weight[getattr(pipe, tokenizer_of(c)).convert_tokens_to_ids("zxy")] = p
    with torch.no_grad():
        torch.testing.assert_close(got["embeds"].detach(), _encode(pipe, prompt)["embeds"])
    with pytest.raises(ValueError, match="already a token"):
        add_token(pipe, "zxy")


def test_two_vectors_are_two_tokens_each_put_in_its_own_row_and_written_out_in_prompts():
    """--embedding-vectors 2: "zxy" and "zxy_1", each with its own vector; a prompt naming "zxy" is encoded as
    "zxy zxy_1" (as diffusers' pipelines encode a 2-vector textual inversion), the same as a table holding the rows."""
    pipe = load_pipeline()
    params = add_token(pipe, "zxy", 2)
    with torch.no_grad():
        for p in params.values():
            assert p.shape[0] == 2
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(2)))
    prompt = ["a large zxy circle in the center"]
    assert pipe.maybe_convert_prompt(prompt[0], pipe.tokenizer) == "a large zxy zxy_1 circle in the center"
    with torch.no_grad():
        got = _encode(pipe, prompt)["embeds"]
        for c, p in params.items():  # by hand: the table's rows set to the vectors, the prompt written out
            table, tok = getattr(pipe, c).get_input_embeddings(), getattr(pipe, tokenizer_of(c))
            table._forward_hooks.clear()
            table.weight[tok.convert_tokens_to_ids(["zxy", "zxy_1"])] = p
        from studio.families import encode_prompt_sdxl

        hand, _ = encode_prompt_sdxl([pipe.tokenizer, pipe.tokenizer_2], [pipe.text_encoder, pipe.text_encoder_2],
                                     ["a large zxy zxy_1 circle in the center"])
        torch.testing.assert_close(got, hand)
        assert not torch.allclose(got, encode_prompt_sdxl([pipe.tokenizer, pipe.tokenizer_2],
                                                          [pipe.text_encoder, pipe.text_encoder_2], prompt)[0])


def test_a_two_vector_run_loads_in_stock_diffusers_and_attaches_both_tokens(tmp_path):
    from diffusers import StableDiffusionXLPipeline

    from studio.families import EMBEDDED_MODEL

    with pytest.raises(ValueError, match="--embedding-vectors is how many tokens --pivotal gives"):
        pivotal_config(tmp_path, pivotal=False, embedding_vectors=2).check()
    with pytest.raises(ValueError, match="--embedding-vectors must be 1 to 16, got 0"):
        pivotal_config(tmp_path, embedding_vectors=0).check()
    out = train(DreamBooth(), pivotal_config(tmp_path, embedding_vectors=2, steps=2, checkpoint_every=0))
    adapter = load_adapter(out)
    assert {c: tuple(v.shape) for c, v in adapter.embeddings["zxy"].items()} == {"text_encoder": (2, 64),
                                                                                 "text_encoder_2": (2, 64)}
    base = load_pipeline()
    for c in TEXT_ENCODERS:  # both vectors trained: the prompts carried both tokens
        ids = getattr(base, tokenizer_of(c))("zxy", add_special_tokens=False).input_ids
        start = getattr(base, c).get_input_embeddings().weight[ids].mean(0).detach()
        assert all(not torch.allclose(v, start) for v in adapter.embeddings["zxy"][c])
    stock = StableDiffusionXLPipeline.from_pretrained(str(EMBEDDED_MODEL), local_files_only=True)
    state = load_file(str(embeddings_path(out)))
    stock.load_textual_inversion(state["clip_l"], token="zxy", text_encoder=stock.text_encoder, tokenizer=stock.tokenizer)
    rows = stock.tokenizer.convert_tokens_to_ids(["zxy", "zxy_1"])
    torch.testing.assert_close(stock.text_encoder.get_input_embeddings().weight[rows].detach(),
                               adapter.embeddings["zxy"]["text_encoder"])
    pipe = load_pipeline()
    attach(pipe, [out])
    assert {"zxy", "zxy_1"} <= set(pipe.tokenizer_2.get_vocab())
    generate(pipe, ["a zxy shape"], seed=0, steps=2)
    detach(pipe)
    assert "zxy_1" not in pipe.tokenizer.get_vocab() and "zxy_1" not in pipe.tokenizer_2.get_vocab()


def pivotal_config(tmp_path, **extra):
    data = star_folder(tmp_path / "stars")
    return build_config(DreamBoothConfig, {}, {"data": str(data), "output": str(tmp_path / "run"), "steps": 4, "batch_size": 2,
                                               "rank": 4, "num_class_images": 2, "lr": 5e-3, "class_data": str(tmp_path / "class"),
                                               "checkpoint_every": 2, "pivotal": True, "token": "zxy", **extra})


def test_pivotal_run_writes_embeddings_beside_a_stock_lora_file_and_resumes_them(tmp_path):
    from diffusers import StableDiffusionXLPipeline

    from studio.families import EMBEDDED_MODEL

    out = train(DreamBooth(), pivotal_config(tmp_path))
    adapter = load_adapter(out)
    assert adapter.meta.extra["pivotal"] is True and set(adapter.embeddings) == {"zxy"}
    base = tables(load_pipeline())
    stock = StableDiffusionXLPipeline.from_pretrained(str(EMBEDDED_MODEL), local_files_only=True)
    for c in TEXT_ENCODERS:
        vector = adapter.embeddings["zxy"][c]
        assert vector.shape == (1, base[c].shape[1])
        ids = getattr(stock, tokenizer_of(c))("zxy", add_special_tokens=False).input_ids
        assert not torch.allclose(vector, base[c][ids].mean(0, keepdim=True))  # it trained
    side = embeddings_path(out)
    assert side.name == "adapter_emb.safetensors"
    with safe_open(str(side), framework="pt") as f:
        assert set(f.keys()) == {"clip_l", "clip_g"} and f.metadata()["token"] == "zxy"
    assert all("lora" in k for k in load_file(str(out)))  # the LoRA file holds LoRA weights only
    stock.load_lora_weights(str(out), adapter_name="ours")  # diffusers takes it as it is
    state = load_file(str(side))  # and the embeddings as its textual inversion loader takes them
    stock.load_textual_inversion(state["clip_l"], token="zxy", text_encoder=stock.text_encoder, tokenizer=stock.tokenizer)
    stock.load_textual_inversion(state["clip_g"], token="zxy", text_encoder=stock.text_encoder_2, tokenizer=stock.tokenizer_2)
    row = stock.tokenizer.convert_tokens_to_ids("zxy")
    torch.testing.assert_close(stock.text_encoder.get_input_embeddings().weight[row:row + 1].detach(), adapter.embeddings["zxy"]["text_encoder"])

    # resumed from its step-2 checkpoint, the run ends where it ended, embeddings included
    out.unlink()
    side.unlink()
    again = load_adapter(train(DreamBooth(), pivotal_config(tmp_path, resume=str(tmp_path / "run" / "checkpoint-2"))))
    for c in TEXT_ENCODERS:
        torch.testing.assert_close(again.embeddings["zxy"][c], adapter.embeddings["zxy"][c], rtol=1e-5, atol=1e-6)
    for k, w in adapter.modules.items():
        torch.testing.assert_close(again.modules[k].up, w.up, rtol=1e-5, atol=1e-6)

    # --init-adapter starts a pivotal run from the file's embeddings too (a step at a negligible rate keeps them), and
    # refuses a run without --pivotal, which would read the token as pieces
    started = load_adapter(train(DreamBooth(), pivotal_config(tmp_path, output=str(tmp_path / "init"), steps=1, lr=1e-12,
                                                               checkpoint_every=0, init_adapter=str(out))))
    for c in TEXT_ENCODERS:
        torch.testing.assert_close(started.embeddings["zxy"][c], again.embeddings["zxy"][c])
    with pytest.raises(ValueError, match="add --pivotal"):
        train(DreamBooth(), pivotal_config(tmp_path, output=str(tmp_path / "plain"), steps=1, pivotal=False,
                                           init_adapter=str(out)))


@pytest.fixture(scope="module")
def pipe():
    return load_pipeline()


def embedded(pipe, token: str, seed: int) -> Adapter:
    adapter = random_adapter(pipe, seed=seed, scale=0.02)
    g = torch.Generator().manual_seed(seed)
    adapter.embeddings = {token: {c: torch.randn(1, getattr(pipe, c).get_input_embeddings().weight.shape[1], generator=g)
                                  for c in TEXT_ENCODERS}}
    return adapter


@pytest.mark.parametrize("layout", ["diffusers", "kohya"])
def test_embeddings_round_trip_in_both_layouts_and_a_stale_file_is_removed(pipe, tmp_path, layout):
    adapter = embedded(pipe, "zxy", 0)
    path = save_adapter(adapter, tmp_path / "a.safetensors", layout=layout)
    back = load_adapter(path)
    assert set(back.embeddings) == {"zxy"}
    for c in TEXT_ENCODERS:
        assert torch.equal(back.embeddings["zxy"][c], adapter.embeddings["zxy"][c])
    adapter.embeddings = {}
    save_adapter(adapter, path, layout=layout)  # the same name without embeddings: none read back
    assert not embeddings_path(path).exists() and load_adapter(path).embeddings == {}
    assert not list(tmp_path.glob("*.tmp"))


def test_several_tokens_kohya_bundles_and_a_missing_embeddings_file(pipe, tmp_path):
    a, b = embedded(pipe, "zxy", 0), embedded(pipe, "sks", 1)
    both = Adapter(a.modules, a.meta, joined_embeddings([a, b]))
    path = save_adapter(both, tmp_path / "merged.safetensors")
    with safe_open(str(embeddings_path(path)), framework="pt") as f:
        assert set(f.keys()) == {f"{t}.{e}" for t in ("zxy", "sks") for e in ("clip_l", "clip_g")}
    back = load_adapter(path)
    assert {t: set(v) for t, v in back.embeddings.items()} == {"zxy": set(TEXT_ENCODERS), "sks": set(TEXT_ENCODERS)}
    assert torch.equal(back.embeddings["sks"]["text_encoder_2"], b.embeddings["sks"]["text_encoder_2"])
    clash = embedded(pipe, "zxy", 2)
    with pytest.raises(ValueError, match="'zxy' differently"):
        joined_embeddings([a, clash])
    # kohya / A1111 bundle their embeddings in the LoRA file: read them
    lora = save_adapter(Adapter(a.modules, a.meta), tmp_path / "kohya.safetensors", layout="kohya")
    tensors = load_file(str(lora))
    tensors["bundle_emb.zxy.clip_l"] = a.embeddings["zxy"]["text_encoder"]
    tensors["bundle_emb.zxy.clip_g"] = a.embeddings["zxy"]["text_encoder_2"]
    with safe_open(str(lora), framework="pt") as f:
        header = f.metadata()
    save_file(tensors, str(lora), metadata=header)
    assert torch.equal(load_adapter(lora).embeddings["zxy"]["text_encoder"], a.embeddings["zxy"]["text_encoder"])
    # an adapter trained with --pivotal whose embeddings file was left behind is refused, naming that file
    a.meta.extra["pivotal"] = True
    lone = save_adapter(a, tmp_path / "lone.safetensors")
    embeddings_path(lone).unlink()
    with pytest.raises(ValueError, match="lone_emb.safetensors"):
        load_adapter(lone)


def test_attach_adds_the_token_and_detach_restores_the_pipeline_exactly(pipe):
    adapter = embedded(pipe, "zxy", 0)
    prompt = ["a large zxy circle in the center on a white background"]
    n, tokens, before = len(pipe.tokenizer), pipe.tokenizer.tokenize(prompt[0]), tables(pipe)
    image = generate(pipe, prompt, seed=0, steps=2)[0]
    attach(pipe, [adapter])
    for c in TEXT_ENCODERS:
        tokenizer = getattr(pipe, tokenizer_of(c))
        assert "zxy" in tokenizer.tokenize(prompt[0])
        row = tokenizer.convert_tokens_to_ids("zxy")
        assert torch.equal(getattr(pipe, c).get_input_embeddings().weight[row:row + 1].detach(), adapter.embeddings["zxy"][c])
    detach(pipe)
    assert len(pipe.tokenizer) == n and pipe.tokenizer.tokenize(prompt[0]) == tokens
    after = tables(pipe)
    assert all(torch.equal(after[c], before[c]) for c in TEXT_ENCODERS)
    assert generate(pipe, prompt, seed=0, steps=2)[0].tobytes() == image.tobytes()


def test_two_files_of_one_name_are_numbered_and_detach_takes_both_tokens_out(pipe, tmp_path):
    n = len(pipe.tokenizer)
    files = [save_adapter(embedded(pipe, token, i), tmp_path / token / "adapter.safetensors")
             for i, token in enumerate(("sks", "zxy"))]
    handle = attach(pipe, files)
    assert handle.names == ["adapter", "adapter-2"] and handle.tokens == {"adapter": ["sks"], "adapter-2": ["zxy"]}
    detach(pipe)
    for c in TEXT_ENCODERS:
        vocab = getattr(pipe, tokenizer_of(c)).get_vocab()
        assert "sks" not in vocab and "zxy" not in vocab
    assert len(pipe.tokenizer) == n


def test_attach_refuses_a_token_twice_or_of_another_width_and_changes_nothing(pipe):
    n = len(pipe.tokenizer)
    with pytest.raises(ValueError, match="'first' and 'second' both embed the token 'zxy'"):
        attach(pipe, [embedded(pipe, "zxy", 0), embedded(pipe, "zxy", 1)], names=["first", "second"])
    wide = embedded(pipe, "qpv", 0)
    wide.embeddings["qpv"]["text_encoder"] = torch.zeros(1, 7)
    with pytest.raises(ValueError, match="width 7"):
        attach(pipe, [wide], names=["wide"])
    assert len(pipe.tokenizer) == n and getattr(pipe, "_studio_attached", None) is None


@pytest.mark.parametrize("extra, message", [
    ({"pivotal": False, "embedding_lr": 1e-3}, "--embedding-lr is the token embeddings' rate under --pivotal"),
    ({"token": "two words"}, "one word without dots"),
    ({"embedding_lr": -1.0}, "--embedding-lr must be 0"),
])
def test_bad_pivotal_settings_are_refused(tmp_path, extra, message):
    with pytest.raises(ValueError, match=message):
        pivotal_config(tmp_path, **extra).check()


def test_content_style_pivotal_gives_each_part_its_own_token(tmp_path):
    from studio.trainers.content_style import ContentStyle, ContentStyleConfig

    content = star_folder(tmp_path / "content", 2)
    style = star_folder(tmp_path / "style", 1)
    (style / "star0.txt").write_text("a large blue star in the center on a white background, zxy")
    settings = {"data": str(content), "style_data": str(style), "output": str(tmp_path / "run"), "steps": 2,
                "batch_size": 1, "rank": 2, "num_class_images": 1, "class_data": str(tmp_path / "class"),
                "checkpoint_every": 0, "lr": 1e-2, "pivotal": True, "interplay": "apart"}
    train(ContentStyle(), build_config(ContentStyleConfig, {}, settings))
    both, c, s = (load_adapter(tmp_path / "run" / f"{n}.safetensors") for n in ("adapter", "content", "style"))
    assert set(both.embeddings) == {"sks", "zxy"} and set(c.embeddings) == {"sks"} and set(s.embeddings) == {"zxy"}
    for token, part in (("sks", c), ("zxy", s)):
        for comp in TEXT_ENCODERS:
            assert torch.equal(part.embeddings[token][comp], both.embeddings[token][comp])
    pipe = load_pipeline()
    attach(pipe, [c, s])  # the two parts together: two tokens
    assert pipe.tokenizer.tokenize("a sks shape, zxy")[:2] == ["a</w>", "sks"] and "zxy" in pipe.tokenizer.tokenize("zxy")
    detach(pipe)
    with pytest.raises(ValueError, match="the ZipLoRA merge"):
        build_config(ContentStyleConfig, {}, {**settings, "content_adapter": str(tmp_path / "run" / "content.safetensors"),
                                               "style_adapter": str(tmp_path / "run" / "style.safetensors")}).check()
