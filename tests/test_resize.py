"""Resizing an adapter (studio.adapters.resize, `studio resize`, `studio merge --rank`) against hand-built
updates whose singular values are known."""

import math

import pytest
import torch
from test_cli import _two_adapters, run

from studio.adapters import Adapter, AdapterMeta, LoraWeights, load_adapter, save_adapter
from studio.adapters.resize import kept_rank, resize, resize_layer

S = [4.0, 2.0, 1.0, 0.5]


def _known(out=12, d_in=10, alpha=2.0, seed=0, conv=False):
    """A rank-4 LoRA with ``delta = Q_o diag(S) Q_i^T`` (orthonormal Q's): its singular values are exactly S."""
    g = torch.Generator().manual_seed(seed)
    q_o = torch.linalg.qr(torch.randn(out, 4, generator=g, dtype=torch.float64))[0]
    q_i = torch.linalg.qr(torch.randn(d_in * (9 if conv else 1), 4, generator=g, dtype=torch.float64))[0]
    scale = alpha / 4
    up = (q_o * torch.tensor(S, dtype=torch.float64) / scale).float()  # the scale is undone by alpha / rank
    down = q_i.T.float()
    if conv:
        up, down = up.reshape(out, 4, 1, 1), down.reshape(4, d_in, 3, 3)
    return LoraWeights(down, up, alpha), q_o, q_i


def test_truncation_is_the_best_rank_k_approximation_by_hand():
    lora, q_o, q_i = _known()
    small, kept = resize_layer(lora, 2)
    expected = (q_o[:, :2] * torch.tensor(S[:2], dtype=torch.float64)) @ q_i[:, :2].T
    assert small.rank == 2 and small.alpha == 2.0  # scale 1: the factors carry the singular values
    torch.testing.assert_close(small.delta().double(), expected, atol=1e-5, rtol=0)
    # Eckart-Young: what is lost is the dropped singular values' norm
    lost = (lora.delta() - small.delta()).norm()
    assert float(lost) == pytest.approx(math.hypot(S[2], S[3]), rel=1e-5)
    assert kept == pytest.approx(math.sqrt((16 + 4) / (16 + 4 + 1 + 0.25)), rel=1e-6)
    # each side holds sqrt(s): up's columns and down's rows have norms sqrt(4), sqrt(2)
    assert small.up.norm(dim=0).tolist() == pytest.approx([2.0, math.sqrt(2)], rel=1e-5)
    assert small.down.norm(dim=1).tolist() == pytest.approx([2.0, math.sqrt(2)], rel=1e-5)


def test_a_convolution_keeps_its_kernel_shape():
    lora, q_o, q_i = _known(conv=True)
    small, _ = resize_layer(lora, 3)
    assert small.down.shape == (3, 10, 3, 3) and small.up.shape == (12, 3, 1, 1)
    expected = ((q_o[:, :3] * torch.tensor(S[:3], dtype=torch.float64)) @ q_i[:, :3].T).reshape(12, 10, 3, 3)
    torch.testing.assert_close(small.delta().double(), expected, atol=1e-5, rtol=0)


def test_a_rank_at_or_above_the_layers_keeps_it_exactly():
    lora, _, _ = _known()
    same, kept = resize_layer(lora, 8)
    assert same.rank == 4 and kept == 1.0
    assert torch.equal(same.down, lora.down) and torch.equal(same.up, lora.up) and same.alpha == lora.alpha


@pytest.mark.parametrize("fro, rank, k", [
    (0.8, 4, 1),  # sqrt(16 / 21.25) = 0.868
    (0.9, 4, 2),  # sqrt(20 / 21.25) = 0.970
    (0.99, 4, 3),  # sqrt(21 / 21.25) = 0.994
    (1.0, 4, 4),
    (0.99, 2, 2),  # --rank still caps it
])
def test_fro_keeps_the_fewest_values_that_hold_that_share(fro, rank, k):
    assert kept_rank(torch.tensor(S, dtype=torch.float64), rank, fro) == k
    lora, _, _ = _known()
    small, kept = resize_layer(lora, rank, fro)
    assert small.rank == k
    if rank >= 4:  # not capped: the share reached
        assert kept >= fro - 1e-9


def test_a_zero_update_stays_one_zero_pair():
    zero = LoraWeights(torch.zeros(4, 6), torch.zeros(5, 4), 4.0)
    for fro in (None, 0.9):
        small, kept = resize_layer(zero, 2, fro)
        assert small.rank == (2 if fro is None else 1) and kept == 1.0
        assert torch.count_nonzero(small.delta()) == 0 and not small.delta().isnan().any()


def test_resize_keeps_the_metadata_and_says_what_it_kept():
    lora, _, _ = _known()
    other, _, _ = _known(seed=1)
    name = "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1."
    adapter = Adapter({name + "to_q": lora, name + "to_k": other}, AdapterMeta(token="sks", trainer="dreambooth", rank=4))
    small, kept = resize(adapter, 2)
    assert small.meta.token == "sks" and small.meta.trainer == "dreambooth" and small.meta.rank == 2
    assert kept["from_rank"] == 4 and kept["rank"] == kept["min_rank"] == 2
    assert kept["min_kept"] == pytest.approx(math.sqrt(20 / 21.25), abs=1e-6)
    assert small.meta.extra["resized"]["from_rank"] == 4
    for bad, message in (({"rank": 0}, "--rank 0 is out of range; accepted: 1 to 256"),
                         ({"rank": 4, "fro": 1.5}, "--fro 1.5 is out of range")):
        with pytest.raises(ValueError, match=message):
            resize(adapter, **bad)


def test_resize_and_merge_rank_on_the_command_line(tmp_path):
    a, b = _two_adapters(tmp_path)  # rank 4 each, random: four non-zero singular values per layer
    out = tmp_path / "small.safetensors"
    r = run("resize", str(a), "--rank", "2", "-o", str(out), "--format", "kohya")
    assert r.returncode == 0, r.stderr
    assert "rank 4 -> 2" in r.stdout
    big, small = (next(iter(load_adapter(p).modules.values())) for p in (a, out))
    s = torch.linalg.svdvals(big.delta().double())
    assert small.rank == 2
    assert float((big.delta() - small.delta()).norm()) == pytest.approx(float(s[2:].norm()), rel=1e-4)
    merged = tmp_path / "merged.safetensors"
    r = run("merge", str(a), str(b), "--method", "sum", "--rank", "3", "-o", str(merged))
    assert r.returncode == 0, r.stderr
    assert "rank 3" in r.stdout
    la, lb = (next(iter(load_adapter(p).modules.values())) for p in (a, b))
    m = next(iter(load_adapter(merged).modules.values()))
    total = la.delta().double() + lb.delta().double()
    assert m.rank == 3
    assert float((total - m.delta()).norm()) == pytest.approx(float(torch.linalg.svdvals(total)[3:].norm()), rel=1e-4)
    for args, message in (
        (["resize", str(a), "--rank", "0", "-o", str(tmp_path / "x.safetensors")], "--rank 0 is out of range"),
        (["resize", str(a), "--fro", "0", "-o", str(tmp_path / "x.safetensors")], "--fro 0 is out of range"),
        (["resize", str(a), "-o", str(a)], "is the input file"),
        (["resize", str(a), "-o", str(tmp_path / "x.pt")], "give a .safetensors path"),
        (["merge", str(a), str(b), "--rank", "300", "-o", str(tmp_path / "x.safetensors")], "--rank 300 is out of range"),
    ):
        r = run(*args)
        assert r.returncode == 2 and message in r.stderr, (args, r.stderr)
    assert not (tmp_path / "x.safetensors").exists()


def test_a_pickle_is_refused_unread(tmp_path):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x80\x04\x95" + b"\x00" * 32)  # a pickle's opening bytes
    r = run("resize", str(bad), "-o", str(tmp_path / "y.safetensors"))
    assert r.returncode == 2 and r.stderr.startswith("error:"), r.stderr
    assert not (tmp_path / "y.safetensors").exists()


def test_a_resized_file_loads_in_stock_diffusers_as_its_update(tmp_path):
    """Layers of different ranks (--fro) are written with peft's rank and alpha patterns; stock
    ``load_lora_weights`` then fuses the same update the studio's form holds."""
    from studio.families import EMBEDDED_MODEL, load_pipeline

    pipe = load_pipeline(EMBEDDED_MODEL)
    unet = pipe.unet
    g = torch.Generator().manual_seed(3)
    modules = {}
    for i, leaf in enumerate(("to_q", "to_k", "to_v")):
        path = f"down_blocks.1.attentions.0.transformer_blocks.0.attn1.{leaf}"
        w = unet.get_submodule(path).weight
        spread = torch.tensor([1.0, 0.5 ** (i + 1), 0.1 ** (i + 1), 0.01])[:, None]  # a different rank kept per layer
        modules[f"unet.{path}"] = LoraWeights(torch.randn(4, w.shape[1], generator=g) * spread,
                                              torch.randn(w.shape[0], 4, generator=g) * 0.1, 4.0)
    small, _ = resize(Adapter(modules, AdapterMeta(family="sdxl")), 4, fro=0.95)
    assert len({w.rank for w in small.modules.values()}) > 1
    path = save_adapter(small, tmp_path / "small.safetensors")
    before = {k: unet.get_submodule(k.removeprefix("unet.")).weight.detach().clone() for k in modules}
    pipe.load_lora_weights(str(path), adapter_name="small")
    pipe.fuse_lora()
    for k, lora in small.modules.items():
        fused = unet.get_submodule(k.removeprefix("unet.")).base_layer.weight
        torch.testing.assert_close(fused - before[k], lora.delta(), atol=1e-5, rtol=1e-4)
