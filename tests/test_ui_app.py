"""The app in a real browser: Playwright driving Debian's Chromium (/usr/bin/chromium, no browser
download) against ``studio ui`` started as its own process, as a user would start it.

The tests run in order against one server and one data folder: the first trains the adapter the
later ones use. Screenshots of each tab go to ``$STUDIO_SCREENSHOTS`` (docs/screenshots for the
README: ``STUDIO_SCREENSHOTS=docs/screenshots pytest tests/test_ui_app.py``), else to a temp folder.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import time
from pathlib import Path

import pytest

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
pytest.importorskip("gradio", reason="the app needs the [ui] extra")
playwright = pytest.importorskip("playwright.sync_api", reason="browser tests need playwright (the [dev] extra)")
if not Path(CHROMIUM).is_file():
    pytest.skip("browser tests need Debian's chromium (apt-get install chromium); .ci/run installs it",
                allow_module_level=True)

TIMEOUT_MS = 30_000


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    from studio.ui.load import server as serve

    data = tmp_path_factory.mktemp("studio-data")
    with serve(data) as (proc, url):
        yield {"url": url, "data": data, "proc": proc}


@pytest.fixture(scope="module")
def browser():
    with playwright.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=[
            "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
            "--disable-component-update", "--disable-sync"])
        yield b
        b.close()


@pytest.fixture()
def page(browser, server):
    context = browser.new_context(viewport={"width": 1280, "height": 1000})
    page = context.new_page()
    page.set_default_timeout(TIMEOUT_MS)
    page.goto(server["url"])
    page.wait_for_selector("#train-upload")
    yield page
    context.close()


@pytest.fixture(scope="module")
def shots(tmp_path_factory) -> Path:
    folder = Path(os.environ.get("STUDIO_SCREENSHOTS") or tmp_path_factory.mktemp("screenshots"))
    folder.mkdir(parents=True, exist_ok=True)
    return folder


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> list[Path]:
    """Four renders of a purple star, the subject a user would bring."""
    from PIL import Image

    from studio.world.grammar import parse_prompt, scene_from_prompt
    from studio.world.render import render_array

    folder = tmp_path_factory.mktemp("my-star")
    files = []
    for i in range(4):
        scene = scene_from_prompt(parse_prompt("a large purple star in the center on a white background"), random.Random(i))
        files.append(folder / f"star{i}.png")
        Image.fromarray(render_array(scene, seed=1000 + i)).save(files[-1])
    return files


def _fill(page, elem_id: str, text: str) -> None:
    box = page.locator(f"#{elem_id}").locator("input, textarea").first
    box.wait_for(state="visible")
    for _ in range(3):
        box.fill(text)
        box.press("Tab")  # gradio takes the value on blur
        page.wait_for_timeout(300)  # and hands it to the next event after its own update
        # a field that has just appeared (an accordion opened) can be reset by gradio's own first update on a
        # loaded machine: fill again until the value stays
        if box.input_value() == text:
            return
    raise AssertionError(f"#{elem_id} did not keep {text!r}: shows {box.input_value()!r}")


def _choose(page, elem_id: str, option: str) -> None:
    """Pick ``option`` in a gradio dropdown."""
    page.locator(f"#{elem_id} input").first.click()
    page.locator(f'#{elem_id} [role=option][aria-label="{option}"]').click()
    page.wait_for_timeout(200)


def _error(page, fragment: str) -> None:
    """Wait for an error toast that says ``fragment`` (errors stay until closed)."""
    page.locator(".toast-body", has_text=fragment).first.wait_for()


def _tab(page, name: str) -> None:
    page.get_by_role("tab", name=name).click()


def test_train_an_adapter_and_generate_with_it(page, server, images, shots):
    page.locator("#train-upload input[type=file]").set_input_files([str(p) for p in images])
    page.locator("#train-upload").get_by_text("star3").wait_for()
    _fill(page, "dataset-name", "stars")
    page.click("#add-dataset")
    page.locator("#train-status").get_by_text("4 images").wait_for()
    _fill(page, "run-name", "star")
    page.get_by_text("Override the preset").click()
    page.wait_for_timeout(500)  # let the opened accordion's fields settle
    _fill(page, "train-steps", "40")
    page.locator("#random-flip input").check()
    page.locator("#class-prompts input").check()
    page.locator("#masked-loss input").check()
    page.locator("#pivotal input").check()
    _fill(page, "embedding-vectors", "2")
    _choose(page, "save-precision", "fp16")
    page.click("#start-training")

    bar = page.locator("#train-progress progress")
    seen, state = set(), ""
    deadline = time.time() + 300
    while time.time() < deadline:
        seen.add(int(bar.get_attribute("value") or 0))
        state = page.locator("#train-progress .train-progress").get_attribute("data-state") or ""
        if state in ("done", "failed", "cancelled"):
            break
        time.sleep(0.25)
    assert state == "done", page.locator("#train-status").inner_text()
    assert bar.get_attribute("max") == "40"
    moving = sorted(v for v in seen if 0 < v < 40)
    assert len(moving) >= 2, f"the progress bar never moved between 0 and 40: saw {sorted(seen)}"
    page.locator("#train-status").get_by_text("is in the library").wait_for()
    page.locator("#validation img").first.wait_for()
    headless = page.locator("#headless textarea, #headless input").first.input_value()
    assert headless.startswith("studio train dreambooth --config ") and headless.endswith("train.json")
    config = json.loads(Path(headless.split("--config ")[1]).read_text())
    assert config["steps"] == 40 and config["token"] == "sks" and config["random_flip"] is True
    assert config["save_precision"] == "fp16" and config["class_prompts"] == "captions"
    assert config["prior_preservation"] is True  # the quick preset's is off; the box turns it on
    assert config["masked_loss"] is True and config["pivotal"] is True and config["embedding_vectors"] == 2
    page.screenshot(path=str(shots / "train.png"), full_page=True)

    _tab(page, "Library")
    playwright.expect(page.locator("#library-table")).to_contain_text("dreambooth")
    _choose(page, "library-pick", "star")
    page.locator("#library-preview img").wait_for()
    page.screenshot(path=str(shots / "library.png"), full_page=True)
    _fill(page, "resize-rank", "2")  # a smaller copy in the library
    page.click("#resize")
    page.locator("#library-status").get_by_text("star-r2").wait_for()
    from studio.adapters import load_adapter

    assert load_adapter(server["data"] / "adapters" / "star-r2.safetensors").meta.rank == 2
    trained = load_adapter(server["data"] / "adapters" / "star.safetensors")  # written at the precision chosen
    assert {str(w.up.dtype) for w in trained.modules.values()} == {"torch.float16"}
    assert trained.meta.dataset["masked_loss"] == 0.0
    assert trained.meta.dataset["class_prompts"] == ["a shape"]  # uncaptioned images: their prompt without the token
    # pivotal tuning: the token's embeddings came into the library beside the adapter, and went into its resized copy
    import torch
    from studio.ui.workspace import Workspace

    assert set(trained.embeddings) == {"sks"} and set(trained.embeddings["sks"]) == {"text_encoder", "text_encoder_2"}
    assert torch.equal(load_adapter(server["data"] / "adapters" / "star-r2.safetensors").embeddings["sks"]["text_encoder"],
                       trained.embeddings["sks"]["text_encoder"])
    assert "star_emb" not in {row["name"] for row in Workspace(server["data"]).adapters()}

    _tab(page, "Generate")
    _choose(page, "slot-1-adapter", "star")
    _fill(page, "prompt", "a sks shape in the center")
    _fill(page, "seed", "3")
    page.click("#generate-button")
    page.locator("#gallery img").first.wait_for(timeout=120_000)
    outputs = sorted((server["data"] / "outputs").glob("*.png"))
    assert len(outputs) == 1
    from PIL import Image

    with Image.open(outputs[0]) as im:
        settings = json.loads(im.text["studio"])
        assert im.size == (64, 64)
    assert settings["prompt"] == "a sks shape in the center" and settings["seed"] == 3
    assert settings["adapters"] == [{"name": "star", "weight": 1.0, "region": ""}]
    page.screenshot(path=str(shots / "generate.png"), full_page=True)


def test_compose_two_adapters_in_drawn_regions(page, server, tmp_path, shots):
    from studio.adapters import load_adapter, save_adapter

    # a second concept, imported through the Library tab: the star adapter under another token
    # the star was trained with pivotal tuning: its copy comes as two files, the LoRA and its token's embeddings
    second = load_adapter(server["data"] / "adapters" / "star.safetensors")
    second.meta.token = "zwx"
    assert second.embeddings["sks"]["text_encoder"].shape[0] == 2  # the two embedding vectors the run was given
    second.embeddings = {"zwx": second.embeddings["sks"]}
    save_adapter(second, tmp_path / "zwx.safetensors")
    _tab(page, "Library")
    page.locator("#import-file input[type=file]").set_input_files([str(tmp_path / "zwx.safetensors"),
                                                                   str(tmp_path / "zwx_emb.safetensors")])
    page.locator("#library-status").get_by_text("imported zwx").wait_for()
    assert (server["data"] / "adapters" / "zwx_emb.safetensors").is_file()

    _tab(page, "Generate")
    _choose(page, "composer", "lora-composer")
    _choose(page, "slot-1-adapter", "star")
    _choose(page, "slot-2-adapter", "zwx")
    canvas = page.locator("#region-canvas img")
    canvas.wait_for()
    box = canvas.bounding_box()
    sx, sy = box["width"] / 256, box["height"] / 256

    def click(x, y):
        canvas.click(position={"x": x * sx, "y": y * sy})
        time.sleep(0.3)

    click(10, 20)  # concept 1: the left half
    click(120, 235)
    page.locator("#draw-for").get_by_text("2", exact=True).click()
    click(136, 20)  # concept 2: the right half
    click(246, 235)
    region1 = page.locator("#slot-1-region textarea, #slot-1-region input").first
    region2 = page.locator("#slot-2-region textarea, #slot-2-region input").first
    page.wait_for_function("() => document.querySelector('#slot-2-region textarea, #slot-2-region input').value !== ''")
    x0, y0, x1, y1 = (float(v) for v in region1.input_value().split(","))
    assert x0 < 0.1 and x1 < 0.5 and y0 < 0.1 and y1 > 0.9
    x0, _, x1, _ = (float(v) for v in region2.input_value().split(","))
    assert x0 > 0.5 and x1 > 0.9
    _fill(page, "prompt", "a sks shape on the left and a zwx shape on the right")
    _fill(page, "slot-2-timesteps", "0:700")  # the second concept acts only below t = 700
    before = set((server["data"] / "outputs").glob("*.png"))
    page.click("#generate-button")
    page.locator("#gallery").get_by_text("lora-composer").first.wait_for(timeout=120_000)
    new = set((server["data"] / "outputs").glob("*.png")) - before
    assert len(new) == 1
    from PIL import Image

    with Image.open(new.pop()) as im:
        settings = json.loads(im.text["studio"])
        assert "Composer: lora-composer" in im.text["parameters"]
    assert settings["composer"] == "lora-composer"
    assert [a["name"] for a in settings["adapters"]] == ["star", "zwx"]
    assert all(a["region"] for a in settings["adapters"])
    assert "timesteps" not in settings["adapters"][0] and settings["adapters"][1]["timesteps"] == "0:700"
    page.screenshot(path=str(shots / "compose.png"), full_page=True)


def test_invalid_upload_gets_a_visible_error(page, server, tmp_path):
    (tmp_path / "notes.txt").write_text("not an image")
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 10)
    page.locator("#train-upload input[type=file]").set_input_files(str(tmp_path / "notes.txt"))
    page.locator("#train-upload").get_by_text("notes").wait_for()
    _fill(page, "dataset-name", "notes")
    page.click("#add-dataset")
    _error(page, "is not an image")
    page.reload()
    page.locator("#train-upload input[type=file]").set_input_files(str(tmp_path / "broken.png"))
    page.locator("#train-upload").get_by_text("broken").wait_for()
    _fill(page, "dataset-name", "broken")
    page.click("#add-dataset")
    _error(page, "not a readable image")
    # an adapter that is a pickle is refused unread
    (tmp_path / "model.ckpt").write_bytes(b"\x80\x04" + b"\x00" * 64)
    _tab(page, "Library")
    page.locator("#import-file input[type=file]").set_input_files(str(tmp_path / "model.ckpt"))
    _error(page, "only .safetensors")
    assert not (server["data"] / "datasets" / "notes").exists()
    assert not (server["data"] / "datasets" / "broken").exists()


def test_an_upload_over_the_size_limit_is_refused_in_the_browser_and_by_the_server(page, server, tmp_path):
    import urllib.error
    import urllib.request
    import uuid

    big = tmp_path / "big.png"
    big.write_bytes(os.urandom(21 * 2**20))  # the app's default limit is 20 MB
    page.locator("#train-upload input[type=file]").set_input_files(str(big))
    _error(page, "exceed the maximum allowed size")
    # a script that skips the browser's check meets the server's
    boundary = uuid.uuid4().hex
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"files\"; filename=\"big.png\"\r\n"
            f"Content-Type: image/png\r\n\r\n").encode() + big.read_bytes() + f"\r\n--{boundary}--\r\n".encode()
    request = urllib.request.Request(server["url"] + "gradio_api/upload", data=body, method="POST",
                                     headers={"Content-Type": f"multipart/form-data; boundary={boundary}"})
    with pytest.raises(urllib.error.HTTPError) as info:
        urllib.request.urlopen(request, timeout=60)
    assert info.value.code == 413


def test_path_traversal_file_name_is_refused(page, server, images):
    data: Path = server["data"]
    before = sorted(p.relative_to(data) for p in data.rglob("*") if ".gradio" not in p.parts)
    page.locator("#train-upload input[type=file]").set_input_files(
        [{"name": "../../escape.png", "mimeType": "image/png", "buffer": images[0].read_bytes()}])
    page.locator("#train-upload").get_by_text("escape").first.wait_for()
    _fill(page, "dataset-name", "escape")
    page.click("#add-dataset")
    _error(page, "'../../escape.png' is refused")
    page.reload()
    # a dataset or run name is one path component too
    page.locator("#train-upload input[type=file]").set_input_files(str(images[0]))
    page.locator("#train-upload").get_by_text("star0").wait_for()
    _fill(page, "dataset-name", "../outside")
    page.click("#add-dataset")
    _error(page, "dataset name '../outside' is refused")
    after = sorted(p.relative_to(data) for p in data.rglob("*") if ".gradio" not in p.parts)
    assert [p for p in after if p not in before and "outputs" not in p.parts] == []
    assert not (data.parent / "escape.png").exists() and not (data.parent.parent / "escape.png").exists()


def test_twenty_concurrent_generate_requests_queue_and_memory_stays_flat(server):
    """20 requests at once from a script (gradio's client), three rounds: every one completes through the
    queue with no error, and the server's memory after the third round is where it was after the first."""
    from studio.ui.load import hammer

    rounds = [hammer(server["url"], requests=20, steps=4, pid=server["proc"].pid, seed=100 * r, adapter="star")
              for r in range(3)]
    for r in rounds:
        assert r.completed == 20 and r.errors == [], r.errors[:3]
    print("server RSS after each round (MB):", [round(r.rss_mb) for r in rounds])
    assert rounds[2].rss_mb - rounds[0].rss_mb < 32, [r.rss_mb for r in rounds]
    assert len(list((server["data"] / "outputs").glob("*.png"))) >= 60
    assert server["proc"].poll() is None  # the server is still up


def test_the_server_listens_on_localhost_only(server):
    import psutil

    listening = [c.laddr for c in psutil.Process(server["proc"].pid).net_connections(kind="inet")
                 if c.status == psutil.CONN_LISTEN]
    assert listening and all(addr.ip == "127.0.0.1" for addr in listening), listening


def test_auth_keeps_the_app_closed_without_the_password(tmp_path):
    import urllib.error
    import urllib.request

    from gradio_client import Client
    from studio.ui.load import server as serve

    with serve(tmp_path / "data", args=("--auth", "ana:s3cret")) as (_proc, url):
        with pytest.raises(urllib.error.HTTPError) as info:
            urllib.request.urlopen(url + "config", timeout=10)
        assert info.value.code == 401
        with pytest.raises(Exception):  # noqa: B017 - gradio_client raises its own error types for a refused login
            Client(url, auth=("ana", "wrong"), verbose=False)
        client = Client(url, auth=("ana", "s3cret"), verbose=False)
        assert "/generate" in client.view_api(print_info=False, return_format="dict")["named_endpoints"]
        client.close()
