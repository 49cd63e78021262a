"""The app's data folder and generation engine without a browser: names, uploads, runs (cancel and
resume), the library, settings in PNG metadata."""

from __future__ import annotations

import dataclasses
import json
import random
import time
from pathlib import Path

import pytest
from PIL import Image
from studio.ui.engine import Engine, Settings
from studio.ui.workspace import InputError, Workspace, safe_name


def star_images(folder: Path, n: int = 4) -> list[tuple[str, Path]]:
    from studio.world.grammar import parse_prompt, scene_from_prompt
    from studio.world.render import render_array

    folder.mkdir(parents=True, exist_ok=True)
    files = []
    for i in range(n):
        scene = scene_from_prompt(parse_prompt("a large purple star in the center on a white background"), random.Random(i))
        path = folder / f"star{i}.png"
        Image.fromarray(render_array(scene, seed=1000 + i)).save(path)
        files.append((path.name, path))
    return files


@pytest.mark.parametrize("name", ["../x", "..", "a/b", "a\\b", "/etc", "", " ", ".hidden", "x" * 65, "a..b", "a\nb"])
def test_unsafe_names_are_refused(name):
    with pytest.raises(InputError, match="refused"):
        safe_name(name, "dataset name")


@pytest.mark.parametrize("name", ["stars", "my-star_2", "v1.0", "A"])
def test_safe_names_pass(name):
    assert safe_name(name, "x") == name


def test_paths_never_leave_the_root(tmp_path):
    ws = Workspace(tmp_path / "data")
    assert ws.path("adapters", "a.safetensors").parent == ws.root / "adapters"
    for parts in (("..", "x"), ("adapters", "..", "..", "x"), ("/etc/passwd",)):
        with pytest.raises(InputError, match="outside the studio's data folder"):
            ws.path(*parts)


def test_a_refused_upload_writes_nothing(tmp_path):
    ws = Workspace(tmp_path / "data")
    good = star_images(tmp_path / "in", 2)
    (tmp_path / "in" / "notes.txt").write_text("hello")
    (tmp_path / "in" / "fake.png").write_bytes(b"not a png")
    cases = [
        (good + [("notes.txt", tmp_path / "in" / "notes.txt")], "is not an image"),
        (good + [("fake.png", tmp_path / "in" / "fake.png")], "not a readable image"),
        (good + [("../../evil.png", good[0][1])], "'../../evil.png' is refused"),
        (good + [("star0.png", good[0][1])], "appears twice"),
        ([], "no images uploaded"),
    ]
    for files, message in cases:
        with pytest.raises(InputError, match=message):
            ws.add_dataset("stars", files)
        assert ws.datasets() == [] and list((ws.root / "datasets").iterdir()) == []
    assert ws.add_dataset("stars", good) == ws.root / "datasets" / "stars"
    assert sorted(p.name for p in (ws.root / "datasets" / "stars").iterdir()) == ["star0.png", "star1.png"]
    with pytest.raises(InputError, match="already exists"):
        ws.add_dataset("stars", good)


def test_train_config_is_the_cli_schema_and_bad_settings_are_named(tmp_path):
    from studio.trainers.config import build_config
    from studio.trainers.dreambooth import DreamBoothConfig

    ws = Workspace(tmp_path / "data")
    ws.add_dataset("stars", star_images(tmp_path / "in"))
    cfg = ws.train_config("dreambooth", "quick", "stars", "star", token="zwx", steps=30)
    assert cfg["trainer"] == "dreambooth" and cfg["steps"] == 30 and cfg["token"] == "zwx" and cfg["rank"] == 4
    assert cfg["validation_prompts"] == ["a zwx shape"]
    # the saved keys build the trainer's config, as `studio train dreambooth --config` does
    assert build_config(DreamBoothConfig, {k: v for k, v in cfg.items() if k != "trainer"}, {}).steps == 30
    with pytest.raises(InputError, match="trainer 'lycoris' is not known; choose one of dreambooth, blora"):
        ws.train_config("lycoris", "quick", "stars", "x")
    with pytest.raises(InputError, match="preset 'huge' is not known"):
        ws.train_config("dreambooth", "huge", "stars", "x")
    with pytest.raises(InputError, match="dataset 'cats' does not exist"):
        ws.train_config("dreambooth", "quick", "cats", "x")
    with pytest.raises(InputError, match="rank 999 is out of range"):
        ws.train_config("dreambooth", "quick", "stars", "x", rank=999)
    with pytest.raises(InputError, match="run name '../x' is refused"):
        ws.train_config("dreambooth", "quick", "stars", "../x")
    assert ws.train_config("dreambooth", "quick", "stars", "al", attention_loss=1.0)["attention_loss"] == 1.0
    with pytest.raises(InputError, match="--attention-loss is not supported by the content-style trainer"):
        ws.train_config("content-style", "quick", "stars", "x", style_dataset="stars", attention_loss=1.0)
    assert ws.train_config("dreambooth", "quick", "stars", "lc", lora_layers="to_q,conv1")["lora_layers"] == "to_q,conv1"
    assert ws.train_config("dreambooth", "quick", "stars", "df")["lora_layers"] == "to_q,to_k,to_v,to_out.0"
    tuned = ws.train_config("dreambooth", "quick", "stars", "sn", lr_scheduler="cosine", warmup=5, snr_gamma=5.0,
                            noise_offset=0.05)
    assert (tuned["lr_scheduler"], tuned["warmup"], tuned["snr_gamma"], tuned["noise_offset"]) == ("cosine", 5, 5.0, 0.05)
    with pytest.raises(InputError, match="--lr-scheduler 'step'; accepted: constant, linear, cosine"):
        ws.train_config("dreambooth", "quick", "stars", "x", lr_scheduler="step")
    with pytest.raises(InputError, match="--snr-gamma must be 0 \\(off\\) or positive"):
        ws.train_config("dreambooth", "quick", "stars", "x", snr_gamma=-5.0)
    biased = ws.train_config("dreambooth", "quick", "stars", "tb", timestep_bias_strategy="later", timestep_bias_multiplier=2.0)
    assert (biased["timestep_bias_strategy"], biased["timestep_bias_multiplier"]) == ("later", 2.0)
    with pytest.raises(InputError, match="--timestep-bias-multiplier must be 0 or positive"):
        ws.train_config("dreambooth", "quick", "stars", "x", timestep_bias_strategy="later", timestep_bias_multiplier=-1.0)
    assert ws.train_config("dreambooth", "quick", "stars", "hb", loss_type="huber")["loss_type"] == "huber"
    assert ws.train_config("dreambooth", "quick", "stars", "ip", ip_noise_gamma=0.1)["ip_noise_gamma"] == 0.1
    with pytest.raises(InputError, match="--loss-type 'l1'; accepted: l2, huber, smooth_l1"):
        ws.train_config("dreambooth", "quick", "stars", "x", loss_type="l1")
    # Prodigy: the preset's rate (3e-4) would be refused; left unset it is 1, a rate given is kept and checked
    assert (ws.train_config("dreambooth", "quick", "stars", "pd", optimizer="prodigy")["lr"]) == 1.0
    assert ws.train_config("dreambooth", "quick", "stars", "pd", optimizer="prodigy", lr=0.5)["lr"] == 0.5
    with pytest.raises(InputError, match="--optimizer prodigy finds its own step size"):
        ws.train_config("dreambooth", "quick", "stars", "x", optimizer="prodigy", lr=1e-4)
    with pytest.raises(InputError, match="--ema-decay must be at least 0"):
        ws.train_config("dreambooth", "quick", "stars", "x", ema_decay=1.0)
    tuned = ws.train_config("dreambooth", "quick", "stars", "ld", lora_dropout=0.1, save_precision="fp16")
    assert (tuned["lora_dropout"], tuned["save_precision"]) == (0.1, "fp16")
    augmented = ws.train_config("dreambooth", "quick", "stars", "fl", random_flip=True, caption_dropout=0.05,
                                class_prompts="captions", prior_preservation=True)
    assert (augmented["random_flip"], augmented["caption_dropout"], augmented["class_prompts"]) == (True, 0.05, "captions")
    with pytest.raises(InputError, match="--class-prompts 'caption'; accepted: class, captions"):
        ws.train_config("dreambooth", "quick", "stars", "x", class_prompts="caption")
    with pytest.raises(InputError, match="only prior preservation trains on them"):  # the quick preset has none
        ws.train_config("dreambooth", "quick", "stars", "x", class_prompts="captions")
    with pytest.raises(InputError, match="--caption-dropout must be at least 0 \\(off\\) and below 1, got 1"):
        ws.train_config("dreambooth", "quick", "stars", "x", caption_dropout=1.0)
    with pytest.raises(InputError, match="SingLoRA takes linear layers only"):
        ws.train_config("dreambooth", "quick", "stars", "x", lora_layers="to_q,conv1", adapter="singlora")


def _wait(ws: Workspace, name: str, until, timeout: float = 240):
    deadline = time.time() + timeout
    while time.time() < deadline:
        st = ws.status(name)
        if until(st):
            return st
        time.sleep(0.2)
    raise AssertionError(f"run {name} stuck: {ws.status(name)}\n{(ws.root / 'runs' / name / 'log.txt').read_text()[-2000:]}")


def test_a_run_cancels_resumes_and_lands_in_the_library(tmp_path):
    ws = Workspace(tmp_path / "data")
    ws.add_dataset("stars", star_images(tmp_path / "in"))
    cfg = ws.train_config("dreambooth", "quick", "stars", "star", steps=30, checkpoint_every=10, validation_every=30)
    ws.start_run(cfg)
    with pytest.raises(InputError, match="run 'star' is training"):
        ws.start_run(ws.train_config("dreambooth", "quick", "stars", "other"))
    _wait(ws, "star", lambda st: st.step >= 3)
    ws.cancel("star")
    st = _wait(ws, "star", lambda st: st.state != "running")
    assert st.state == "cancelled", st
    stopped = st.step
    assert 3 <= stopped < 30
    run = ws.root / "runs" / "star"
    assert (run / f"checkpoint-{stopped}" / "state.json").is_file()  # saved at the step it stopped
    assert not (run / "adapter.safetensors").exists() and not (run / "STOP").exists()
    assert "cancelled: stopped at step" in (run / "log.txt").read_text()

    ws.resume("star")
    st = _wait(ws, "star", lambda st: st.state not in ("running", "queued"))
    assert st.state == "done", st
    assert [s for s, _ in st.losses] == list(range(1, 31))  # every step once, across both processes
    starts = [json.loads(line) for line in (run / "progress.jsonl").read_text().splitlines() if '"event": "start"' in line]
    assert [s["step"] for s in starts] == [0, stopped]
    assert len(st.validation) == 1
    with pytest.raises(InputError, match="finished; nothing to resume"):
        ws.resume("star")

    names, new = ws.collect("star")
    assert names == ["star"] and new
    assert ws.collect("star") == (["star"], False)
    row = ws.adapters()[0]
    assert row["name"] == "star" and row["trainer"] == "dreambooth" and row["token"] == "sks" and row["steps"] == 30
    assert ws.preview("star") is not None
    assert ws.headless("star") == f"studio train dreambooth --config {run / 'train.json'}"


def test_library_rename_delete_export_import(tmp_path):
    from conftest import random_adapter

    from studio.adapters import load_adapter, save_adapter
    from studio.families import load_pipeline

    ws = Workspace(tmp_path / "data")
    adapter = random_adapter(load_pipeline(ws.model))
    adapter.meta.token = "sks"
    save_adapter(adapter, tmp_path / "mine.safetensors")
    assert ws.import_adapters([("mine.safetensors", tmp_path / "mine.safetensors")]) == ["mine"]
    with pytest.raises(InputError, match="already in the library"):
        ws.import_adapters([("mine.safetensors", tmp_path / "mine.safetensors")])
    (tmp_path / "model.ckpt").write_bytes(b"\x80\x04" + bytes(64))
    with pytest.raises(InputError, match="only .safetensors"):
        ws.import_adapters([("model.ckpt", tmp_path / "model.ckpt")])
    (tmp_path / "pickle.safetensors").write_bytes(b"\x80\x04" + bytes(64))
    with pytest.raises(InputError, match="not a LoRA adapter this studio reads"):
        ws.import_adapters([("pickle.safetensors", tmp_path / "pickle.safetensors")])
    with pytest.raises(InputError, match="refused"):
        ws.import_adapters([("../mine2.safetensors", tmp_path / "mine.safetensors")])
    assert [p.name for p in (ws.root / "adapters").iterdir()] == ["mine.safetensors"]  # nothing half-written

    assert ws.rename("mine", "star") == "star"
    with pytest.raises(InputError, match="new name '../star' is refused"):
        ws.rename("star", "../star")
    [out] = ws.export("star", "kohya")
    assert out.parent == ws.root / "exports"
    assert set(load_adapter(out).modules) == set(adapter.modules)
    with pytest.raises(InputError, match="layout 'ckpt' is not known"):
        ws.export("star", "ckpt")
    (ws.root / "adapters" / "star.png").write_bytes(b"png")  # a preview goes with the copy
    name, kept = ws.resize("star", 2)
    assert name == "star-r2" and kept["rank"] == 2 and (ws.root / "adapters" / "star-r2.png").read_bytes() == b"png"
    small = load_adapter(ws.adapter_file("star-r2"))
    assert small.meta.rank == 2 and small.meta.token == "sks" and set(small.modules) == set(adapter.modules)
    with pytest.raises(InputError, match="'star-r2' is already in the library"):
        ws.resize("star", 2)
    with pytest.raises(InputError, match="--rank 0 is out of range; accepted: 1 to 256"):
        ws.resize("star", 0)
    assert not (ws.root / "adapters" / "star-r0.safetensors").exists()
    # a run that trains a library adapter further: --init-adapter, at the adapter's rank unless one is given
    (ws.root / "datasets" / "stars").mkdir(parents=True)
    further = ws.train_config("dreambooth", "quick", "stars", "more", start_from="star-r2")
    assert (further["init_adapter"], further["rank"]) == (str(ws.adapter_file("star-r2")), 2)
    assert ws.train_config("dreambooth", "quick", "stars", "more", start_from="star-r2", rank=8)["rank"] == 8
    with pytest.raises(InputError, match="adapter 'nope' is not in the library"):
        ws.train_config("dreambooth", "quick", "stars", "more", start_from="nope")
    ws.delete("star-r2")
    ws.delete("star")
    assert ws.adapters() == []
    with pytest.raises(InputError, match="adapter 'star' is not in the library"):
        ws.delete("star")


def test_import_takes_a_pivotal_adapter_with_its_embeddings_all_or_nothing(tmp_path):
    """A pivotal adapter is two files (NAME.safetensors and its token embeddings, NAME_emb.safetensors): the
    import takes them together, refuses either alone, and adds nothing when any file of an upload is refused."""
    import torch
    from conftest import random_adapter

    from studio.adapters import load_adapter, save_adapter
    from studio.adapters.files import embeddings_path
    from studio.families import load_pipeline

    ws = Workspace(tmp_path / "data")
    adapter = random_adapter(load_pipeline(ws.model))
    adapter.meta.token, adapter.meta.extra["pivotal"] = "sks", True
    vector = torch.randn(1, 64)
    adapter.embeddings = {"sks": {"text_encoder": vector, "text_encoder_2": torch.randn(1, 64)}}
    save_adapter(adapter, tmp_path / "up" / "star.safetensors")
    plain = random_adapter(load_pipeline(ws.model), seed=1)
    save_adapter(plain, tmp_path / "up" / "plain.safetensors")
    star, emb = tmp_path / "up" / "star.safetensors", embeddings_path(tmp_path / "up" / "star.safetensors")
    assert emb.name == "star_emb.safetensors" and emb.is_file()
    library = ws.root / "adapters"

    with pytest.raises(InputError, match="file 'star.safetensors' was trained with pivotal tuning: upload its token"
                                         " embeddings, star_emb.safetensors, with it"):
        ws.import_adapters([("plain.safetensors", tmp_path / "up" / "plain.safetensors"), ("star.safetensors", star)])
    with pytest.raises(InputError, match="file 'star_emb.safetensors' holds the token embeddings of an adapter"
                                         " star.safetensors: upload the two together"):
        ws.import_adapters([("star_emb.safetensors", emb)])
    with pytest.raises(InputError, match="file 'star_emb.safetensors' holds the token embeddings"):
        ws.import_adapters([("plain.safetensors", tmp_path / "up" / "plain.safetensors"), ("star_emb.safetensors", emb)])
    assert sorted(p.name for p in library.iterdir()) == []  # nothing of a refused upload, nothing staged left

    assert ws.import_adapters([("star_emb.safetensors", emb), ("star.safetensors", star),
                               ("plain.safetensors", tmp_path / "up" / "plain.safetensors")]) == ["star", "plain"]
    assert sorted(p.name for p in library.iterdir()) == ["plain.safetensors", "star.safetensors", "star_emb.safetensors"]
    assert [(r["name"], r["pivotal"]) for r in ws.adapters()] == [("plain", False), ("star", True)]
    assert torch.equal(load_adapter(ws.adapter_file("star")).embeddings["sks"]["text_encoder"], vector)
    files = ws.export("star", "diffusers")
    assert [f.name for f in files] == ["star.diffusers.safetensors", "star.diffusers_emb.safetensors"]
    assert torch.equal(load_adapter(files[0]).embeddings["sks"]["text_encoder"], vector)
    assert [f.name for f in ws.export("plain", "kohya")] == ["plain.kohya.safetensors"]


def test_generate_keeps_the_settings_in_the_png(tmp_path):
    from conftest import random_adapter

    from studio.adapters import save_adapter

    ws = Workspace(tmp_path / "data")
    engine = Engine(ws)
    save_adapter(random_adapter(engine.pipe), tmp_path / "a.safetensors")
    ws.import_adapters([("a.safetensors", tmp_path / "a.safetensors")])
    steps = []
    settings = Settings(prompt="a red circle on the left", negative_prompt="blue", seed=5, steps=3, num=2,
                        adapters=[{"name": "a", "weight": 0.5, "region": ""}])
    files = engine.generate(settings, progress=lambda i, n: steps.append((i, n)))
    assert len(files) == 2 and all(f.parent == ws.root / "outputs" for f in files)
    assert steps[-1] == (3, 3)
    back = [Settings.from_png(f) for f in files]
    assert [b.seed for b in back] == [5, 6] and back[0].adapters == settings.adapters and back[0].num == 1
    with Image.open(files[1]) as im:
        assert im.text["parameters"].startswith("a red circle on the left\nNegative prompt: blue\nSteps: 3")
        assert "Seed: 6" in im.text["parameters"] and "Lora: <a:0.5>" in im.text["parameters"]
    assert not hasattr(engine.pipe, "_studio_attached") or engine.pipe._studio_attached is None  # detached again
    # the same request again gives the same pixels (the adapter was attached and removed cleanly)
    again = engine.generate(settings)
    assert [Image.open(f).tobytes() for f in again] == [Image.open(f).tobytes() for f in files]
    # a timestep window: the adapter acts only at t < 500 (through the naive composer), and the PNG keeps the window
    late = dataclasses.replace(settings, adapters=[{"name": "a", "weight": 0.5, "region": "", "timesteps": "0:500"}])
    windowed = engine.generate(late)
    assert Settings.from_png(windowed[0]).adapters == late.adapters
    assert [Image.open(f).tobytes() for f in windowed] != [Image.open(f).tobytes() for f in files]


@pytest.mark.parametrize("change,message", [
    ({"prompt": " "}, "prompt is empty"),
    ({"steps": 0}, "steps 0 is out of range"),
    ({"width": 60}, "width 60 is refused; accepted: multiples of"),
    ({"composer": "magic"}, "composer 'magic' is not known"),
    ({"num": 9}, "images per request 9 is out of range"),
    ({"adapters": [{"name": "nope", "weight": 1.0}]}, "adapter 'nope' is not in the library"),
    ({"adapters": [{"name": "../../x", "weight": 1.0}]}, "adapter '../../x' is refused"),
    ({"adapters": [{"name": "a", "weight": 1.0, "timesteps": "900:100"}]},
     "adapter 'a': timesteps '900:100' is not a timestep window; accepted: START:END"),
    ({"adapters": [{"name": "a", "weight": 1.0, "region": "middle"}]},
     "adapter 'a': region 'middle' is not a region; accepted: left, right.*; or style"),
])
def test_bad_generate_settings_are_named(tmp_path, change, message):
    ws = Workspace(tmp_path / "data")
    engine = Engine(ws)
    with pytest.raises(InputError, match=message):
        engine.generate(Settings(**{"prompt": "a red circle", "steps": 2, **change}))
    assert list((ws.root / "outputs").iterdir()) == []


def test_repeat_makes_an_app_image_again_headless(tmp_path):
    """`studio repeat PNG` reads the settings the app wrote and gives the same pixels, adapter included."""
    import subprocess
    import sys

    from conftest import random_adapter

    from studio.adapters import save_adapter

    ws = Workspace(tmp_path / "data")
    engine = Engine(ws)
    save_adapter(random_adapter(engine.pipe), tmp_path / "a.safetensors")
    ws.import_adapters([("a.safetensors", tmp_path / "a.safetensors")])
    [made] = engine.generate(Settings(prompt="a red circle on the left", seed=7, steps=4,
                                      adapters=[{"name": "a", "weight": 0.8, "region": ""}]))
    out = tmp_path / "again.png"
    r = subprocess.run([sys.executable, "-m", "studio.cli", "repeat", str(made), "-o", str(out), "--data-dir", str(ws.root)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert Image.open(out).tobytes() == Image.open(made).tobytes()
    assert Settings.from_png(out) == Settings.from_png(made)
    # a PNG that is not the app's, and settings naming an adapter the library lacks: one-line errors
    Image.new("RGB", (8, 8)).save(tmp_path / "plain.png")
    (tmp_path / "s.json").write_text(json.dumps({"prompt": "a red circle", "adapters": [{"name": "gone", "weight": 1}]}))
    for source, message in ((tmp_path / "plain.png", "carries no studio settings"),
                            (tmp_path / "s.json", "adapter 'gone' is not in the library")):
        r = subprocess.run([sys.executable, "-m", "studio.cli", "repeat", str(source), "-o", str(tmp_path / "x.png"),
                            "--data-dir", str(ws.root)], capture_output=True, text=True, timeout=300)
        lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
        assert r.returncode == 2 and len(lines) == 1 and message in lines[0], r.stderr
    assert not (tmp_path / "x.png").exists()


@pytest.mark.parametrize("trainer", ["blora", "content-style"])
def test_a_run_of_a_two_part_trainer_puts_both_parts_in_the_library(tmp_path, trainer):
    ws = Workspace(tmp_path / "data")
    ws.add_dataset("stars", star_images(tmp_path / "in"))
    style = {}
    if trainer == "content-style":
        ws.add_dataset("look", star_images(tmp_path / "style", 2))
        style = {"style_dataset": "look"}
        with pytest.raises(InputError, match="needs a style dataset too"):
            ws.train_config(trainer, "quick", "stars", "b1")
        with pytest.raises(InputError, match="style dataset 'gone' does not exist"):
            ws.train_config(trainer, "quick", "stars", "b1", style_dataset="gone")
    else:
        with pytest.raises(InputError, match="a style dataset is for the content-style trainer only"):
            ws.train_config(trainer, "quick", "stars", "b1", style_dataset="stars")
    ws.start_run(ws.train_config(trainer, "quick", "stars", "b1", steps=10, **style))
    st = _wait(ws, "b1", lambda st: st.state not in ("running", "queued"))
    assert st.state == "done", st
    assert ws.collect("b1") == (["b1", "b1-content", "b1-style"], True)
    assert {r["name"]: r["trainer"] for r in ws.adapters()} == dict.fromkeys(["b1", "b1-content", "b1-style"], trainer)
    assert ws.headless("b1").startswith(f"studio train {trainer} --config ")
