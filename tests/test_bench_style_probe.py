"""The style probe's model folder with another VAE (bench/style_probe.py)."""

import importlib.util
from pathlib import Path

spec = importlib.util.spec_from_file_location("bench_style_probe", Path(__file__).parents[1] / "bench" / "style_probe.py")
probe = importlib.util.module_from_spec(spec)
spec.loader.exec_module(probe)


def test_model_with_vae_links_every_part_and_swaps_only_the_vae(tmp_path):
    model = tmp_path / "model"
    for part in ("unet", "vae", "text_encoder", "tokenizer"):
        (model / part).mkdir(parents=True)
        (model / part / "config.json").write_text(part)
    (model / "model_index.json").write_text("{}")
    vae = tmp_path / "refined"
    vae.mkdir()
    (vae / "config.json").write_text("refined")
    folder = probe.model_with_vae(model, vae, tmp_path / "work")
    assert sorted(p.name for p in folder.iterdir()) == sorted(p.name for p in model.iterdir())
    assert (folder / "vae" / "config.json").read_text() == "refined"
    assert (folder / "unet" / "config.json").read_text() == "unet"
    assert (folder / "model_index.json").read_text() == "{}"
    assert probe.model_with_vae(model, vae, tmp_path / "work") == folder  # a second call reuses the links
    assert (model / "vae" / "config.json").read_text() == "vae"  # the source is untouched
