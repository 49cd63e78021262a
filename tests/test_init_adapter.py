"""--init-adapter: a run that starts from an adapter file's weights (kohya's --network_weights)."""

import dataclasses

import pytest
import torch
from studio.trainers.config import build_config
from studio.trainers.dreambooth import DreamBooth, DreamBoothConfig
from studio.trainers.loop import train
from test_dreambooth import star_folder

from studio.adapters import Adapter, LoraWeights, load_adapter, save_adapter


@pytest.fixture(scope="module")
def first(tmp_path_factory):
    """A 3-step rank-2 DreamBooth adapter on the attention projections, and its image folder."""
    tmp = tmp_path_factory.mktemp("init")
    data = star_folder(tmp / "stars", 2)
    base = {"data": str(data), "batch_size": 1, "rank": 2, "lr": 1e-2, "prior_preservation": False, "checkpoint_every": 0}
    out = train(DreamBooth(), build_config(DreamBoothConfig, {}, {**base, "output": str(tmp / "first"), "steps": 3}))
    return out, base, tmp


def _deltas(adapter: Adapter) -> dict[str, torch.Tensor]:
    return {k: w.delta() for k, w in adapter.modules.items()}


def test_a_run_starts_from_the_files_update_whatever_its_alpha(first, tmp_path):
    """One step at a vanishing rate leaves each layer's update the file's, with the run at alpha 2 (scale 1) and the
    file rewritten at alpha 1 (scale 1/2, so its ups are twice as large for the same update)."""
    out, base, _ = first
    source = load_adapter(out)
    halved = Adapter({k: LoraWeights(w.down, w.up * 2, 1.0) for k, w in source.modules.items()}, source.meta)
    save_adapter(halved, tmp_path / "alpha1.safetensors")
    for name, init in (("same", out), ("alpha1", tmp_path / "alpha1.safetensors")):
        again = train(DreamBooth(), build_config(DreamBoothConfig, {}, {
            **base, "output": str(tmp_path / name), "steps": 1, "lr": 1e-12, "init_adapter": str(init)}))
        got = load_adapter(again)
        assert got.meta.extra["init_adapter"] == init.name and set(got.modules) == set(source.modules)
        for key, delta in _deltas(source).items():
            torch.testing.assert_close(got.modules[key].delta(), delta, rtol=1e-5, atol=1e-8)
    # and it trains on from there: a normal rate moves it
    on = load_adapter(train(DreamBooth(), build_config(DreamBoothConfig, {}, {
        **base, "output": str(tmp_path / "on"), "steps": 1, "init_adapter": str(out)})))
    assert any(not torch.allclose(on.modules[k].delta(), d) for k, d in _deltas(source).items())


def test_a_file_the_run_cannot_start_from_is_refused_by_name(first, tmp_path):
    out, base, _ = first
    source = load_adapter(out)

    def run(init, **extra):
        return train(DreamBooth(), build_config(DreamBoothConfig, {}, {
            **base, "output": str(tmp_path / "x"), "steps": 1, "init_adapter": str(init), **extra}))

    with pytest.raises(ValueError, match=r"layer unet\.\S+ has rank 2 \(down \(2, \d+\)\), this run's is 4 .*use --rank 2"):
        run(out, rank=4)
    run(out, lora_layers="to_q,to_k,to_v,to_out.0,ff.net.2")  # more layers than the file has: those start at zero
    ff = "unet.up_blocks.0.attentions.0.transformer_blocks.0.ff.net.2"
    save_adapter(Adapter({**source.modules, ff: LoraWeights(torch.zeros(2, 4), torch.zeros(4, 2), 2.0)}, source.meta),
                 tmp_path / "wider.safetensors")
    with pytest.raises(ValueError, match=rf"has LoRA on {ff.replace('.', '[.]')} \(1 layer\(s\) in all\), which this run"
                                         r" does not train; name those layers in --lora-layers"):
        run(tmp_path / "wider.safetensors")
    other = dataclasses.replace(source.meta, base_hash="0" * 16)
    save_adapter(Adapter(source.modules, other), tmp_path / "other.safetensors")
    with pytest.raises(ValueError, match="--init-adapter .*other.safetensors was trained on base model"):
        run(tmp_path / "other.safetensors")
    with pytest.raises(FileNotFoundError, match="--init-adapter .*nope.safetensors: no such file"):
        run(tmp_path / "nope.safetensors")
    with pytest.raises(ValueError, match="--init-adapter starts a plain LoRA from a file's weights; it does not go with"
                                         " --adapter singlora"):
        run(out, adapter="singlora")
