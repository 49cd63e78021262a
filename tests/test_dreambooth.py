"""The shared training loop and the DreamBooth-LoRA trainer, on the embedded model (tiny runs)."""

import json
import os
import random
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from PIL import Image
from studio.trainers.config import build_config
from studio.trainers.data import load_images
from studio.trainers.dreambooth import DreamBoothConfig

from studio.adapters import load_adapter
from studio.world.grammar import parse_prompt, scene_from_prompt
from studio.world.render import render_array

TRAIN = [sys.executable, "-m", "studio.trainers.dreambooth"]


def star_folder(path, n: int = 4):
    path.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        scene = scene_from_prompt(
            parse_prompt("a large blue star in the center on a white background"), random.Random(i)
        )
        Image.fromarray(render_array(scene, seed=i)).save(path / f"star{i}.png")
    return path


def tiny_args(data, out, steps=6, **extra):
    args = [
        "--data",
        str(data),
        "--output",
        str(out),
        "--steps",
        str(steps),
        "--batch-size",
        "2",
        "--rank",
        "4",
        "--num-class-images",
        "4",
        "--class-data",
        str(out.parent / "class"),
        "--checkpoint-every",
        "2",
    ]
    for k, v in extra.items():
        args += [f"--{k.replace('_', '-')}", str(v)]
    return args


def tensorboard_scalars(folder) -> dict[str, list[tuple[int, float]]]:
    """Scalars from the TensorBoard event files under ``folder`` (TFRecord framing, Event protos)."""
    import struct

    from tensorboardX.proto import event_pb2

    out: dict[str, list[tuple[int, float]]] = {}
    files = sorted(folder.rglob("events.out.tfevents.*"))
    assert files, f"no event file under {folder}"
    for f in files:
        data, i = f.read_bytes(), 0
        while i < len(data):
            (n,) = struct.unpack("<Q", data[i : i + 8])
            event = event_pb2.Event.FromString(data[i + 12 : i + 12 + n])
            i += 12 + n + 4
            for v in event.summary.value:
                out.setdefault(v.tag, []).append((event.step, v.simple_value))
    return out


def test_config_file_and_flags_share_keys(tmp_path):
    file = tmp_path / "c.toml"
    file.write_text('rank = 16\nlr = 5e-4\nvalidation_prompts = ["a sks shape"]\n')
    from studio.trainers.config import read_config_file

    cfg = build_config(DreamBoothConfig, read_config_file(file), {"lr": 1e-3})
    assert (cfg.rank, cfg.lr, cfg.validation_prompts) == (16, 1e-3, ["a sks shape"])
    with pytest.raises(ValueError, match="unknown config key.*rnak.*accepted:"):
        build_config(DreamBoothConfig, {"rnak": 4}, {})


def test_images_of_any_mode_are_read_and_bad_files_skipped(tmp_path):
    d = tmp_path / "imgs"
    d.mkdir()
    Image.new("RGBA", (90, 60), (255, 0, 0, 0)).save(d / "a_transparent.png")  # fully transparent -> white
    Image.new("L", (40, 80), 0).save(d / "b_grey.png")
    rot = Image.new("RGB", (100, 50), (0, 0, 255))
    rot.paste((255, 255, 0), (0, 0, 50, 50))  # left half yellow
    exif = rot.getexif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    rot.save(d / "c_rotated.jpg", exif=exif.tobytes())
    (d / "d_corrupt.png").write_bytes(b"\x89PNG not really")
    (d / "b_grey.txt").write_text("a sks shape, grey\n")  # a kohya-style caption sidecar, not an image
    with pytest.warns(UserWarning, match="skipping d_corrupt.png"):
        images, used = load_images(d, 32)
    assert [p.name for p in used] == ["a_transparent.png", "b_grey.png", "c_rotated.jpg"]
    assert all(im.size == (32, 32) and im.image.mode == "RGB" for im in images)
    assert np.asarray(images[0].image).min() == 255
    top = np.asarray(images[2].image)[2, 16].astype(int)  # displayed upright, the yellow half is on top
    assert top[0] > 200 and top[1] > 200 and top[2] < 80
    # centre-cropped squares keep what SDXL's micro-conditioning needs: original (h, w) and crop (top, left)
    assert images[1].original_size == (80, 40) and images[1].crop_top_left == (16, 0)
    assert images[2].original_size == (100, 50) and images[2].crop_top_left == (16, 0)
    assert [im.caption for im in images] == [None, "a sks shape, grey", None]


def test_aspect_buckets():
    from studio.trainers.data import buckets, fit_bucket, nearest_bucket

    assert buckets(64, 16) == [(48, 80), (64, 64), (80, 48)]
    sdxl = buckets(1024, 64)
    assert (1024, 1024) in sdxl and all(w % 64 == 0 and h % 64 == 0 and w * h <= 1024**2 for w, h in sdxl)
    assert all(max(w / h, h / w) <= 2 for w, h in sdxl) and len(sdxl) >= 7
    assert nearest_bucket(90, 60, buckets(64, 16)) == (80, 48)
    assert nearest_bucket(40, 80, buckets(64, 16)) == (48, 80)
    assert nearest_bucket(61, 60, buckets(64, 16)) == (64, 64)
    wide = Image.new("RGB", (200, 100), (255, 255, 255))
    wide.paste((255, 0, 0), (0, 0, 40, 100))  # a red band on the far left survives a bucket, not a square crop
    im = fit_bucket(wide, (80, 48))
    assert im.size == (80, 48) and im.original_size == (100, 200) and im.crop_top_left == (0, 8)
    assert np.asarray(im.image)[24, 1, 0] > 200 and np.asarray(im.image)[24, 1, 1] < 60
    with pytest.raises(ValueError, match="resolution 8 is smaller than the model's size step 16"):
        buckets(8, 16)


def test_empty_or_unreadable_data_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="data folder not found"):
        load_images(tmp_path / "nope", 32)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="is empty"):
        load_images(tmp_path / "empty", 32)
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "x.png").write_text("nope")
    with pytest.warns(UserWarning), pytest.raises(ValueError, match="no readable images"):
        load_images(tmp_path / "junk", 32)


@pytest.mark.parametrize(
    "args,message",
    [
        (["--data", "{empty}"], "is empty"),
        (["--data", "{stars}", "--rank", "0"], "--rank 0 is out of range; accepted: 1 to 256"),
        (["--data", "{stars}", "--steps", "-1"], "--steps must be a positive integer"),
        (["--data", "{stars}", "--orthogonal-basis", "7"], "--orthogonal-basis '7': give SEED:INDEX"),
        (["--data", "{stars}", "--compile", "--compile-backend", "nope"], "--compile-backend 'nope' is not a torch.compile"),
        (["--data", "{stars}", "--attention-loss", "-1"], "--attention-loss must be 0 (off) or positive"),
        (["--data", "{stars}", "--attention-loss", "1", "--instance-prompt", "a star"],
         "star0.png: its prompt 'a star' does not hold the token 'sks'"),
        (["--data", "{stars}", "--lora-layers", "to_q,nope"], "--lora-layers 'nope': no such layer in the UNet"),
        (["--data", "{stars}", "--lora-layers", " , "], "--lora-layers ' , ': give module name endings"),
        (["--data", "{stars}", "--lora-layers", "to_q,conv1", "--adapter", "singlora"],
         "SingLoRA takes linear layers only"),
        (["--data", "{stars}", "--lora-layers", "norm1"], "'norm1' names down_blocks.0.resnets.0.norm1, a GroupNorm"),
    ],
)
def test_bad_training_input_gives_one_line_error_and_writes_no_adapter(tmp_path, args, message):
    (tmp_path / "empty").mkdir()
    star_folder(tmp_path / "stars", 2)
    args = [a.format(empty=tmp_path / "empty", stars=tmp_path / "stars") for a in args]
    r = subprocess.run([*TRAIN, *args, "--output", str(tmp_path / "run")], capture_output=True, text=True, timeout=300)
    assert r.returncode == 2, r.stderr
    lines = [ln for ln in r.stderr.splitlines() if ln.strip() and not ln.startswith("[transformers]")]
    assert lines[-1].startswith("error:") and message in lines[-1], r.stderr
    assert not (tmp_path / "run" / "adapter.safetensors").exists()


def _final(path):
    return load_adapter(path)


def test_kill_and_resume_gives_the_uninterrupted_result(tmp_path):
    data = star_folder(tmp_path / "stars")
    straight = tmp_path / "straight"
    r = subprocess.run([*TRAIN, *tiny_args(data, straight, steps=8)], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    # the same run, SIGKILLed once its step-4 checkpoint exists, then resumed
    killed = tmp_path / "killed"
    p = subprocess.Popen(
        [*TRAIN, *tiny_args(data, killed, steps=8)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    deadline = time.time() + 300
    while not (killed / "checkpoint-4" / "state.json").is_file() and time.time() < deadline and p.poll() is None:
        time.sleep(0.05)
    if p.poll() is None:
        os.kill(p.pid, signal.SIGKILL)
    p.wait()
    assert not (killed / "adapter.safetensors").exists(), "the run finished before it could be killed"
    r = subprocess.run(
        [*TRAIN, *tiny_args(data, killed, steps=8), "--resume", "latest"], capture_output=True, text=True, timeout=600
    )
    assert r.returncode == 0, r.stderr
    a, b = _final(straight / "adapter.safetensors"), _final(killed / "adapter.safetensors")
    assert a.meta.steps == b.meta.steps == 8
    assert set(a.modules) == set(b.modules) and len(a.modules) > 10
    for k in a.modules:
        torch.testing.assert_close(a.modules[k].down, b.modules[k].down, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(a.modules[k].up, b.modules[k].up, rtol=1e-5, atol=1e-6)
    assert any(w.up.abs().max() > 0 for w in a.modules.values())  # it did train
    config = json.loads((straight / "config.json").read_text())
    assert config["trainer"] == "dreambooth" and config["rank"] == 4 and config["steps"] == 8


def test_compiled_training_trains_what_eager_training_trains(tmp_path):
    """``--compile`` runs the training passes through torch.compile: the same adapter as without it, up to float
    rounding. The test traces with the aot_eager backend (dynamo + AOT autograd, the graphs run by eager kernels):
    the same capture inductor compiles, without the minutes of cold C++ code generation a fresh CI machine pays
    (bench/train_speed.py runs the inductor path and times it)."""
    data = star_folder(tmp_path / "stars")
    runs = {}
    for name, extra in (("eager", []), ("compiled", ["--compile", "--compile-backend", "aot_eager"])):
        out = tmp_path / name
        r = subprocess.run([*TRAIN, *tiny_args(data, out, steps=4), *extra], capture_output=True, text=True, timeout=900)
        assert r.returncode == 0, r.stderr
        runs[name] = _final(out / "adapter.safetensors")
    config = json.loads((tmp_path / "compiled" / "config.json").read_text())
    assert config["compile"] is True and config["compile_backend"] == "aot_eager"
    a, b = runs["eager"], runs["compiled"]
    assert set(a.modules) == set(b.modules) and len(a.modules) > 10
    ups_a = torch.cat([w.up.flatten() for w in a.modules.values()])
    ups_b = torch.cat([w.up.flatten() for w in b.modules.values()])
    assert ups_a.abs().max() > 0  # it trained
    assert float((ups_a - ups_b).norm() / ups_a.norm()) < 1e-3  # measured: 6e-5
    for k in a.modules:  # the same seeded init, moved by the same 4 steps
        torch.testing.assert_close(a.modules[k].down, b.modules[k].down, rtol=0, atol=1e-5)


def test_routed_peft_layers_train_as_peft_does_and_fall_back_outside_training_state(monkeypatch):
    from peft import LoraConfig, inject_adapter_in_model
    from studio.kernels import lora as kernels_lora
    from studio.trainers.loop import use_lora_linear

    calls = []
    real = kernels_lora.lora_linear
    monkeypatch.setattr(kernels_lora, "lora_linear", lambda *a: calls.append(1) or real(*a))

    def model(routed, dropout=0.0):
        torch.manual_seed(0)
        net = torch.nn.Sequential(torch.nn.Linear(12, 10), torch.nn.GELU(), torch.nn.Linear(10, 7, bias=False))
        inject_adapter_in_model(LoraConfig(r=3, lora_alpha=6, lora_dropout=dropout, target_modules=["0", "2"]), net)
        for n, p in net.named_parameters():
            if "lora_B" in n:
                torch.nn.init.normal_(p)  # B starts at zero: make the adapter act
        if routed:
            use_lora_linear(net)
        return net

    x = torch.randn(2, 5, 12, generator=torch.Generator().manual_seed(1))
    peft_net, net = model(False), model(True)
    out, ref = net(x), peft_net(x)
    assert len(calls) == 2  # both layers took the routed path
    torch.testing.assert_close(out, ref)
    out.square().sum().backward()
    ref.square().sum().backward()
    for (name, p), (_, q) in zip(net.named_parameters(), peft_net.named_parameters()):
        assert (p.grad is None) == (q.grad is None), name
        if p.grad is not None:
            torch.testing.assert_close(p.grad, q.grad, msg=name)
    # outside the training state peft's own forward runs: disabled adapters give the base layers
    net[0].enable_adapters(False)
    net[2].enable_adapters(False)
    base = net[2].base_layer(torch.nn.functional.gelu(net[0].base_layer(x)))
    torch.testing.assert_close(net(x), base)
    assert len(calls) == 2
    # with dropout the routed forward steps aside too (training mode: dropout draws differ from a plain sum)
    dropped = model(True, dropout=0.5).train()
    torch.manual_seed(5)
    a = dropped(x)
    torch.manual_seed(5)
    b = type(dropped[2]).forward(dropped[2], torch.nn.functional.gelu(type(dropped[0]).forward(dropped[0], x)))
    torch.testing.assert_close(a, b)


def test_dreambooth_adapter_metadata_and_use(tmp_path):
    from studio.trainers.dreambooth import DreamBooth
    from studio.trainers.loop import train

    from studio.families import EMBEDDED_MODEL, load_pipeline
    from studio.plugin import attach, detach
    from studio.sampling import generate

    data = star_folder(tmp_path / "stars")
    for name, size in (("wide.png", (96, 60)), ("tall.png", (60, 96))):  # two more aspect ratios: three buckets
        canvas = Image.new("RGB", size, (255, 255, 255))
        canvas.paste(Image.open(data / "star0.png"), ((size[0] - 64) // 2, (size[1] - 64) // 2))
        canvas.save(data / name)
    (data / "wide.txt").write_text("a sks shape on a white background")  # its own prompt, kohya-style
    cfg = build_config(
        DreamBoothConfig,
        {},
        {
            "data": str(data),
            "output": str(tmp_path / "run"),
            "steps": 4,
            "batch_size": 2,
            "rank": 4,
            "num_class_images": 4,
            "class_data": str(tmp_path / "class"),
            "validation_every": 4,
            "validation_prompts": ["a sks shape"],
            "lr": 5e-3,
            "tensorboard": True,
        },
    )
    out = train(DreamBooth(), cfg)
    adapter = load_adapter(out)
    assert adapter.meta.trainer == "dreambooth" and adapter.meta.token == "sks" and adapter.meta.class_noun == "shape"
    assert adapter.meta.dataset["images"] == 6 and adapter.meta.steps == 4 and adapter.meta.rank == 4
    assert adapter.meta.dataset["buckets"] == {"48x80": 1, "64x64": 4, "80x48": 1}
    assert adapter.meta.dataset["captioned"] == 1
    scalars = tensorboard_scalars(tmp_path / "run")
    assert [s for s, _ in scalars["loss"]] == [1, 2, 3, 4] and all(np.isfinite(v) and v > 0 for _, v in scalars["loss"])
    assert all(k.startswith("unet.") and k.rsplit(".", 1)[-1] in {"to_q", "to_k", "to_v", "0"} for k in adapter.modules)
    assert len(list((tmp_path / "class").glob("class-*.png"))) == 4
    assert (tmp_path / "run" / "validation" / "step-000004.png").is_file()
    pipe = load_pipeline(EMBEDDED_MODEL)
    before = np.asarray(generate(pipe, ["a sks shape"], steps=4)[0]).astype(int)
    attach(pipe, [out])  # passes the base-model check: same family and hash
    after = np.asarray(generate(pipe, ["a sks shape"], steps=4)[0]).astype(int)
    detach(pipe)
    assert np.abs(after - before).max() > 0


def test_lora_layers_put_lora_on_linears_and_convolutions_that_load_and_export(tmp_path):
    """--lora-layers (diffusers' comma-separated module endings) reaches the transformer blocks' other linears and
    the ResNet convolutions (kohya's LoCon); the conv pairs train, survive a kohya round trip and act in the plugin."""
    from studio.trainers.dreambooth import DreamBooth, unet_targets
    from studio.trainers.loop import train

    from studio.adapters import save_adapter
    from studio.families import EMBEDDED_MODEL, load_pipeline
    from studio.plugin import attach, detach

    data = star_folder(tmp_path / "stars")
    layers = "to_q,ff.net.2,conv1"
    cfg = build_config(DreamBoothConfig, {}, {"data": str(data), "output": str(tmp_path / "run"), "steps": 3,
                                               "batch_size": 2, "rank": 4, "num_class_images": 2, "lr": 5e-3,
                                               "class_data": str(tmp_path / "class"), "lora_layers": layers})
    adapter = load_adapter(train(DreamBooth(), cfg))
    pipe = load_pipeline(EMBEDDED_MODEL)
    expected = unet_targets(pipe.unet, tuple(layers.split(",")))
    assert sorted(k.split(".", 1)[1] for k in adapter.modules) == sorted(expected)
    convs = {k: w for k, w in adapter.modules.items() if k.endswith("conv1")}
    assert convs and all(w.down.ndim == 4 and w.up.shape[2:] == (1, 1) for w in convs.values())
    assert any(k.endswith("ff.net.2") for k in adapter.modules)
    assert max(float(w.up.abs().max()) for w in convs.values()) > 0  # B starts at zero: trained
    back = load_adapter(save_adapter(adapter, tmp_path / "kohya.safetensors", layout="kohya"))
    assert back.modules.keys() == adapter.modules.keys()
    assert all(torch.equal(back.modules[k].delta(), w.delta()) for k, w in adapter.modules.items())
    conv_name = next(iter(convs)).split(".", 1)[1]
    conv = pipe.unet.get_submodule(conv_name)
    x = torch.randn(1, conv.in_channels, 8, 8)
    with torch.no_grad():
        before = conv(x)
        attach(pipe, [tmp_path / "kohya.safetensors"])
        after = pipe.unet.get_submodule(conv_name)(x)
        detach(pipe)
        expect = before + torch.nn.functional.conv2d(x, convs["unet." + conv_name].delta(), padding=conv.padding)
    assert torch.allclose(after, expect, atol=1e-5)


def test_text_encoder_lora_trains_on_both_encoders(tmp_path):
    from studio.trainers.dreambooth import DreamBooth
    from studio.trainers.loop import train

    data = star_folder(tmp_path / "stars")
    cfg = build_config(DreamBoothConfig, {}, {"data": str(data), "output": str(tmp_path / "run"), "steps": 3,
                                               "batch_size": 2, "rank": 4, "num_class_images": 2, "lr": 5e-3,
                                               "class_data": str(tmp_path / "class"), "train_text_encoder": True})
    adapter = load_adapter(train(DreamBooth(), cfg))
    components = {k.split(".", 1)[0] for k in adapter.modules}
    assert components == {"unet", "text_encoder", "text_encoder_2"}
    for component in ("text_encoder", "text_encoder_2"):  # B starts at zero: non-zero means it was trained
        ups = [w.up for k, w in adapter.modules.items() if k.startswith(component + ".")]
        assert ups and max(float(u.abs().max()) for u in ups) > 0


def test_default_class_image_cache_is_keyed_by_the_weights(tmp_path, monkeypatch):
    """Without --class-data the class images go under runs/class-images/<model>-<weights hash>/, so a model
    folder whose weights were replaced does not reuse images the old weights drew."""
    from studio.trainers.dreambooth import DreamBooth
    from studio.trainers.loop import train

    from studio.families import EMBEDDED_MODEL, load_pipeline
    from studio.plugin import base_model_hash

    data = star_folder(tmp_path / "stars", n=2)
    monkeypatch.chdir(tmp_path)
    cfg = build_config(DreamBoothConfig, {}, {"data": str(data), "output": str(tmp_path / "run"), "steps": 1,
                                               "batch_size": 1, "rank": 2, "num_class_images": 1, "checkpoint_every": 0})
    train(DreamBooth(), cfg)
    fingerprint = base_model_hash(load_pipeline(EMBEDDED_MODEL).unet)
    folders = [p.name for p in (tmp_path / "runs" / "class-images").iterdir()]
    assert folders == [f"{EMBEDDED_MODEL.name}-{fingerprint}"]
    assert len(list((tmp_path / "runs" / "class-images").glob("*/*/class-*.png"))) == 1


def test_two_processes_train_what_one_process_with_twice_the_batch_trains(tmp_path):
    """Two CPU processes with batch 2 train what one process with batch 4 trains.

    ``accelerate launch --cpu --num_processes 2`` starts a single process unless MPI is set up
    (accelerate's simple launcher); ``--multi_gpu`` starts two through torch.distributed.run, and on a
    machine without CUDA the loop's ``Accelerator(cpu=True)`` joins them in a gloo group.
    """
    data = star_folder(tmp_path / "stars")
    one, two = tmp_path / "one", tmp_path / "two"
    common = [
        "--steps",
        "3",
        "--rank",
        "4",
        "--num-class-images",
        "4",
        "--class-data",
        str(tmp_path / "class"),
        "--checkpoint-every",
        "0",
        "--data",
        str(data),
    ]
    r = subprocess.run(
        [*TRAIN, *common, "--batch-size", "4", "--output", str(one)], capture_output=True, text=True, timeout=600
    )
    assert r.returncode == 0, r.stderr
    launch = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--multi_gpu",
        "--num_processes",
        "2",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "-m",
        "studio.trainers.dreambooth",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run(
        [*launch, *common, "--batch-size", "2", "--output", str(two)],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    a, b = load_adapter(one / "adapter.safetensors"), load_adapter(two / "adapter.safetensors")
    assert set(a.modules) == set(b.modules)
    # gradients are summed in another order; Adam magnifies that on near-zero gradients (seen: 2.5e-6),
    # while training with another batch moves weights by ~1e-3
    for k in a.modules:
        torch.testing.assert_close(a.modules[k].up, b.modules[k].up, rtol=1e-3, atol=2e-5)
        torch.testing.assert_close(a.modules[k].down, b.modules[k].down, rtol=1e-3, atol=2e-5)
    assert any(w.up.abs().max() > 1e-4 for w in a.modules.values())


def test_orthogonal_basis_gives_concepts_orthogonal_frozen_downs(tmp_path):
    """Orthogonal Adaptation: two concepts trained with one basis seed and different slices have
    down-projections that are orthonormal rows of the same basis, orthogonal to each other, unchanged by
    training; only the ups learned."""
    from studio.trainers.dreambooth import DreamBooth
    from studio.trainers.loop import orthonormal_rows, train

    data = star_folder(tmp_path / "stars", 2)
    adapters = []
    for index in (0, 1):
        cfg = build_config(DreamBoothConfig, {}, {"data": str(data), "output": str(tmp_path / f"run{index}"), "steps": 2,
                                                  "batch_size": 2, "rank": 4, "num_class_images": 2,
                                                  "class_data": str(tmp_path / "class"), "checkpoint_every": 0,
                                                  "orthogonal_basis": f"7:{index}"})
        adapters.append(train(DreamBooth(), cfg))
    a, b = (load_adapter(x) for x in adapters)
    assert a.meta.extra["orthogonal_basis"] == "7:0" and b.meta.extra["orthogonal_basis"] == "7:1"
    assert a.modules.keys() == b.modules.keys()
    for name in a.modules:
        da, db = a.modules[name].down, b.modules[name].down
        basis = orthonormal_rows(da.shape[1], 8, 7)
        assert torch.allclose(da, basis[:4], atol=1e-6) and torch.allclose(db, basis[4:], atol=1e-6)
        assert torch.allclose(da @ db.T, torch.zeros(4, 4), atol=1e-5)
    assert max(float(m.up.abs().max()) for m in a.modules.values()) > 0  # the ups trained (they start at zero)
