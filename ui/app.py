"""The Gradio app: ``studio ui``. Three tabs (Train, Library, Generate) over one data folder.

    studio ui                          # http://127.0.0.1:7860, data in ./studio-data
    studio ui --data-dir ~/studio --auth me:secret --port 7861

The work is done by :class:`~studio.ui.workspace.Workspace` (files, runs, library) and
:class:`~studio.ui.engine.Engine` (generation); this module only lays out the page and turns bad input
into visible errors. Training runs are the headless trainers started as their own process with the
config file the app saved (``runs/NAME/train.json``), so a run started here repeats with
``studio train dreambooth --config runs/NAME/train.json``.
"""

from __future__ import annotations

import functools
import html
import logging
import os
from pathlib import Path

import gradio as gr
from studio.trainers.loop import LOSS_TYPES, LR_SCHEDULES, OPTIMIZERS, TIMESTEP_BIASES
from studio.ui.engine import COMPOSERS, Engine, Settings
from studio.ui.workspace import PRESETS, TRAINERS, InputError, Workspace, safe_name

log = logging.getLogger("studio.ui")
SLOTS = 4  # concepts in the Generate tab
CANVAS = 256  # pixels of the region canvas
COLOURS = ("#e6194b", "#3cb44b", "#4363d8", "#f58231")


def _guarded(fn):
    """Every handler: bad input becomes a visible error; anything unexpected too, and the server goes on."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except InputError as e:
            raise gr.Error(str(e), duration=None, print_exception=False) from None
        except gr.Error:
            raise
        except Exception as e:  # never take the server down
            log.exception("handler %s failed", fn.__name__)
            raise gr.Error(f"internal error ({type(e).__name__}): {e}", duration=None) from None

    return wrapper


def _upload_name(item) -> tuple[str, str]:
    """(the name the user's file had, as the browser sent it; where gradio put it)."""
    path = str(item)
    return getattr(item, "orig_name", None) or Path(path).name, path


class Uploads(gr.File):
    """A ``gr.File`` whose values keep the file's original name (``.orig_name``): gradio's cache path has
    only its last component, and the app must see (and refuse) a name such as ``../../x.png``.
    (gradio writes a typing stub, ``app.pyi``, beside a module that defines a component; it is ignored.)"""

    def get_block_name(self) -> str:
        return "file"

    def _process_single_file(self, f):
        value = super()._process_single_file(f)
        value.orig_name = f.orig_name
        return value


def progress_html(step: int, total: int, state: str) -> str:
    pct = 100 * step / total if total else 0
    return (f'<div class="train-progress" data-state="{html.escape(state)}">'
            f'<progress value="{step}" max="{total or 1}" style="width:100%;height:18px"></progress>'
            f"<div>step <b>{step}</b> / {total} ({pct:.0f} %) · {html.escape(state)}</div></div>")


def region_canvas(regions: list[str]):
    """The region canvas: a white square with each concept's box outlined in its colour."""
    from PIL import Image, ImageDraw
    from studio.composers import parse_region

    im = Image.new("RGB", (CANVAS, CANVAS), "white")
    draw = ImageDraw.Draw(im)
    for x in range(0, CANVAS, CANVAS // 8):
        draw.line([(x, 0), (x, CANVAS)], fill="#eeeeee")
        draw.line([(0, x), (CANVAS, x)], fill="#eeeeee")
    for i, text in enumerate(regions):
        try:
            box = parse_region(text) if text else None
        except ValueError:
            box = None
        if box:
            x0, y0, x1, y1 = (round(v * (CANVAS - 1)) for v in box)
            draw.rectangle([x0, y0, x1, y1], outline=COLOURS[i], width=3)
            draw.text((x0 + 5, y0 + 4), str(i + 1), fill=COLOURS[i])
    return im


def build(ws: Workspace, engine: Engine, concurrency: int = 1):
    def library_names() -> list[str]:
        return [row["name"] for row in ws.adapters()]

    def library_rows() -> list[list]:
        cols = ("name", "trainer", "base_model", "token", "class_noun", "rank", "steps", "size_mb")
        return [[row[c] for c in cols] for row in ws.adapters()]

    with gr.Blocks(title="studio") as demo:
        gr.Markdown("# studio\nTrain small adapters on a few images, keep them in a library, and combine several in one"
                    f" image. Data folder: `{ws.root}` · model: `{ws.model.name}`")
        with gr.Tabs():
            # ---------------------------------------------------------------- Train
            with gr.Tab("Train", id="train", elem_id="tab-train"):
                with gr.Row():
                    with gr.Column():
                        uploads = Uploads(label="Training images (3-10 of the subject; .png .jpg .webp .bmp)",
                                          file_count="multiple", elem_id="train-upload")
                        with gr.Row():
                            dataset_name = gr.Textbox(label="Dataset name", value="my-subject", elem_id="dataset-name")
                            add_dataset = gr.Button("Add images as dataset", elem_id="add-dataset")
                        dataset = gr.Dropdown(label="Dataset (a folder of the data folder's datasets/)",
                                              choices=ws.datasets(), value=None, elem_id="dataset",
                                              allow_custom_value=True)
                        style_dataset = gr.Dropdown(label="Style dataset (content-style trainer only)",
                                                    choices=[""] + ws.datasets(), value="", elem_id="style-dataset",
                                                    allow_custom_value=True)
                        with gr.Row():
                            trainer = gr.Dropdown(list(TRAINERS), value="dreambooth", label="Trainer", elem_id="trainer")
                            preset = gr.Radio(list(PRESETS), value="quick", label="Preset", elem_id="preset")
                        with gr.Row():
                            token = gr.Textbox(label="Token", value="sks", elem_id="token")
                            class_noun = gr.Textbox(label="Class", value="shape", elem_id="class-noun")
                            run_name = gr.Textbox(label="Run name (the adapter's name)", value="", elem_id="run-name")
                        with gr.Accordion("Override the preset", open=False):
                            with gr.Row():
                                steps = gr.Number(label="Steps (0: preset)", value=0, precision=0, elem_id="train-steps")
                                rank = gr.Number(label="Rank (0: preset)", value=0, precision=0)
                                lr = gr.Number(label="Learning rate (0: preset)", value=0)
                                attention = gr.Number(label="Attention loss (0: off; for composing with CLoRA)", value=0,
                                                      elem_id="attention-loss")
                            with gr.Row():
                                schedule = gr.Dropdown(list(LR_SCHEDULES), value="constant", label="LR schedule",
                                                       elem_id="lr-scheduler")
                                warmup = gr.Number(label="Warm-up steps", value=0, precision=0, elem_id="warmup")
                                snr = gr.Number(label="Min-SNR γ (0: off; 5 is usual)", value=0, elem_id="snr-gamma")
                                offset = gr.Number(label="Noise offset (0: off)", value=0, elem_id="noise-offset")
                                perturb = gr.Number(label="Input perturbation γ (0: off; 0.1 is usual)", value=0,
                                                    elem_id="ip-noise-gamma")
                            with gr.Row():
                                bias = gr.Dropdown([b for b in TIMESTEP_BIASES if b != "range"], value="none",
                                                   label="Timestep bias (earlier: detail, texture; later: layout, shape)",
                                                   elem_id="timestep-bias")
                                bias_x = gr.Number(label="Bias multiplier (1: off)", value=2, elem_id="timestep-bias-multiplier")
                                loss_kind = gr.Dropdown(list(LOSS_TYPES), value="l2", elem_id="loss-type",
                                                        label="Loss (huber: outlier images pull less; threshold on kohya's snr schedule)")
                                optimizer = gr.Dropdown(list(OPTIMIZERS), value="adamw", elem_id="optimizer",
                                                        label="Optimizer (prodigy finds its own step size; the learning"
                                                              " rate then multiplies it: 1 if left 0)")
                            with gr.Row():
                                start_from = gr.Dropdown(label="Start from a library adapter (train it further; its rank)",
                                                         choices=[""] + [a["name"] for a in ws.adapters()], value="",
                                                         elem_id="start-from", allow_custom_value=True)
                                ema = gr.Number(label="EMA decay (0: off; 0.99 is usual)", value=0, elem_id="ema-decay")
                                lora_drop = gr.Number(label="LoRA dropout (0: off; 0.1 against overfitting)", value=0,
                                                      elem_id="lora-dropout")
                                precision = gr.Dropdown(["fp32", "fp16", "bf16"], value="fp32", elem_id="save-precision",
                                                        label="Adapter file precision (fp16: half the size)")
                            with gr.Row():
                                flip = gr.Checkbox(label="Random flip (also train on each image mirrored; not for text or"
                                                         " logos)", value=False, elem_id="random-flip")
                                dropout = gr.Number(label="Caption dropout (0: off; 0.05 is usual for styles)", value=0,
                                                    elem_id="caption-dropout")
                                masked = gr.Checkbox(label="Masked loss (the subject, not its backdrop)", value=False,
                                                     elem_id="masked-loss")
                                class_captions = gr.Checkbox(label="Class images of the captions (prior preservation on)",
                                                             value=False, elem_id="class-prompts")
                                pivotal = gr.Checkbox(label="Pivotal tuning (the token gets a learned embedding of its own;"
                                                            " DreamBooth, content-style)", value=False, elem_id="pivotal")
                                vectors = gr.Number(label="Embedding vectors (with pivotal tuning; diffusers' advanced"
                                                          " script uses 2)", value=1, precision=0, elem_id="embedding-vectors")
                            layers = gr.Textbox(label="LoRA layers (empty: the attention projections; e.g. add"
                                                      " ff.net.0.proj,ff.net.2,conv1,conv2 for kohya's LoCon)", value="",
                                                elem_id="lora-layers")
                        with gr.Row():
                            start = gr.Button("Start training", variant="primary", elem_id="start-training")
                            cancel = gr.Button("Cancel", elem_id="cancel-training")
                            resume = gr.Button("Resume", elem_id="resume-training")
                        runs = gr.Dropdown(label="Runs", choices=ws.runs(), value=None, elem_id="runs", allow_custom_value=True)
                    with gr.Column():
                        train_status = gr.Markdown("No run yet.", elem_id="train-status")
                        bar = gr.HTML(progress_html(0, 0, "idle"), elem_id="train-progress")
                        loss_plot = gr.LinePlot(x="step", y="loss", label="Loss", height=220)
                        validation = gr.Gallery(label="Validation images", columns=4, height=220, format="png", fit_columns=False,
                                                elem_id="validation")
                        headless = gr.Textbox(label="The same run, headless", interactive=False, elem_id="headless")
                current = gr.State(None)
                timer = gr.Timer(1.0)

            # ---------------------------------------------------------------- Library
            with gr.Tab("Library", id="library", elem_id="tab-library"):
                lib_status = gr.Markdown("", elem_id="library-status")
                table = gr.Dataframe(value=library_rows(), interactive=False, elem_id="library-table",
                                     headers=["name", "trainer", "base model", "token", "class", "rank", "steps", "MB"])
                with gr.Row():
                    with gr.Column():
                        pick = gr.Dropdown(label="Adapter", choices=library_names(), value=None, elem_id="library-pick",
                                           allow_custom_value=True)
                        preview = gr.Image(label="Preview", interactive=False, height=200, elem_id="library-preview")
                        meta = gr.JSON(label="Metadata")
                    with gr.Column():
                        with gr.Row():
                            new_name = gr.Textbox(label="New name", elem_id="new-name")
                            rename = gr.Button("Rename", elem_id="rename")
                        with gr.Row():
                            delete = gr.Button("Delete", variant="stop", elem_id="delete")
                            confirm = gr.Button("Yes, delete it", variant="stop", visible=False, elem_id="confirm-delete")
                            keep = gr.Button("No, keep it", visible=False, elem_id="keep")
                        with gr.Row():
                            layout = gr.Radio(["kohya", "diffusers"], value="kohya", label="Export layout")
                            export = gr.Button("Export", elem_id="export")
                        exported = gr.File(label="Exported files", file_count="multiple", interactive=False,
                                           elem_id="exported")
                        with gr.Row():
                            resize_rank = gr.Number(label="Rank (a smaller copy: each layer's largest singular values)",
                                                    value=4, precision=0, elem_id="resize-rank")
                            resize = gr.Button("Resize", elem_id="resize")
                        imported = Uploads(label="Import adapters (.safetensors only; a pivotal adapter with its"
                                                 " NAME_emb.safetensors)", file_count="multiple", elem_id="import-file")

            # ---------------------------------------------------------------- Generate
            with gr.Tab("Generate", id="generate", elem_id="tab-generate"):
                with gr.Row():
                    with gr.Column():
                        prompt = gr.Textbox(label="Prompt", value="a sks shape on the left", lines=2, elem_id="prompt")
                        negative = gr.Textbox(label="Negative prompt", value="", elem_id="negative")
                        with gr.Row():
                            seed = gr.Number(label="Seed", value=0, precision=0, elem_id="seed")
                            gsteps = gr.Slider(1, 100, value=25, step=1, label="Steps", elem_id="gen-steps")
                            guidance = gr.Slider(0, 15, value=5.0, step=0.5, label="Guidance")
                        with gr.Row():
                            width = gr.Number(label="Width (0: native)", value=0, precision=0)
                            height = gr.Number(label="Height (0: native)", value=0, precision=0)
                            num = gr.Slider(1, 8, value=1, step=1, label="Images")
                        composer = gr.Dropdown(list(COMPOSERS), value="naive", label="Composer", elem_id="composer")
                        slots = []
                        for i in range(SLOTS):
                            with gr.Row():
                                # names are checked against the library when used (lists change while the app runs)
                                a = gr.Dropdown(choices=[""] + library_names(), value="", label=f"Concept {i + 1}: adapter",
                                                allow_custom_value=True,
                                                elem_id=f"slot-{i + 1}-adapter", scale=3)
                                w = gr.Slider(-2, 2, value=1.0, step=0.05, label="weight", scale=2)
                                r = gr.Textbox(value="", label="region (lora-composer, clora)", placeholder="left, right, x0,y0,x1,y1, or style",
                                               elem_id=f"slot-{i + 1}-region", scale=2)
                                t = gr.Textbox(value="", label="timesteps", placeholder="all, or 0:500 (late only)",
                                               elem_id=f"slot-{i + 1}-timesteps", scale=1,
                                               info="START:END of 0 (clean) to 1000 (noise) where it acts; ,SHARE keeps that share of its weight elsewhere")
                            slots.append((a, w, r, t))
                        go = gr.Button("Generate", variant="primary", elem_id="generate-button")
                    with gr.Column():
                        gr.Markdown("**Draw a region**: pick the concept, then click two opposite corners on the canvas.")
                        draw_for = gr.Radio([str(i + 1) for i in range(SLOTS)], value="1", label="Concept",
                                            elem_id="draw-for")
                        canvas = gr.Image(value=region_canvas([]), interactive=False, label="Regions", height=CANVAS,
                                          width=CANVAS, elem_id="region-canvas", show_label=False, buttons=[])
                        corner = gr.State(None)
                        gallery = gr.Gallery(label="Images (settings in each caption and in the PNG's metadata)",
                                             columns=4, format="png", elem_id="gallery", height=360,
                                             object_fit="contain", preview=False, fit_columns=False)
                        shown = gr.State([])

        regions = [r for _, _, r, _ in slots]

        # ---------------------------------------------------------------- Train handlers
        @_guarded
        def on_add_dataset(files, name):
            if not files:
                raise InputError("no images uploaded; drop 3-10 images in the box first")
            ws.add_dataset(name, [_upload_name(f) for f in files])
            safe = safe_name(name, "dataset name")
            return (gr.update(choices=ws.datasets(), value=safe), gr.update(choices=[""] + ws.datasets()),
                    f"dataset **{safe}**: {len(files)} images")

        add_dataset.click(on_add_dataset, [uploads, dataset_name], [dataset, style_dataset, train_status])

        @_guarded
        def on_start(dataset_, style_, trainer_, preset_, token_, noun_, name_, steps_, rank_, lr_, attention_, layers_,
                     schedule_, warmup_, snr_, offset_, perturb_, bias_, bias_x_, loss_kind_, optimizer_, flip_, dropout_,
                     masked_, class_captions_, pivotal_, vectors_, start_from_, ema_, lora_drop_, precision_):
            if not dataset_:
                raise InputError("no dataset: upload images and add them, or pick a dataset")
            name_ = name_.strip() or f"{token_}-{dataset_}"
            overrides = {"token": token_.strip(), "class_noun": noun_.strip(), "steps": int(steps_ or 0) or None,
                         "rank": int(rank_ or 0) or None, "lr": float(lr_ or 0) or None,
                         "attention_loss": float(attention_ or 0) or None, "lora_layers": (layers_ or "").strip() or None,
                         "lr_scheduler": schedule_ or None, "warmup": int(warmup_ or 0) or None,
                         "snr_gamma": float(snr_ or 0) or None, "noise_offset": float(offset_ or 0) or None,
                         "ip_noise_gamma": float(perturb_ or 0) or None,
                         "loss_type": loss_kind_ if loss_kind_ and loss_kind_ != "l2" else None,
                         "optimizer": optimizer_ if optimizer_ and optimizer_ != "adamw" else None,
                         "random_flip": True if flip_ else None, "caption_dropout": float(dropout_ or 0) or None,
                         "masked_loss": True if masked_ else None, "pivotal": True if pivotal_ else None,
                         "embedding_vectors": int(vectors_) if vectors_ not in (None, 1) else None,
                         **({"class_prompts": "captions", "prior_preservation": True} if class_captions_ else {}),
                         "ema_decay": float(ema_ or 0) or None, "lora_dropout": float(lora_drop_ or 0) or None,
                         "save_precision": precision_ if precision_ and precision_ != "fp32" else None}
            if bias_ and bias_ != "none":
                overrides.update(timestep_bias_strategy=bias_, timestep_bias_multiplier=float(bias_x_ if bias_x_ is not None else 1))
            cfg = ws.train_config(trainer_, preset_, dataset_, name_, style_dataset=style_ or "", start_from=start_from_ or "",
                                  **overrides)
            name = ws.start_run(cfg)
            return name, gr.update(choices=ws.runs(), value=name), ws.headless(name)

        start.click(on_start, [dataset, style_dataset, trainer, preset, token, class_noun, run_name, steps, rank, lr,
                               attention, layers, schedule, warmup, snr, offset, perturb, bias, bias_x, loss_kind, optimizer,
                               flip, dropout, masked, class_captions, pivotal, vectors, start_from, ema, lora_drop, precision],
                    [current, runs, headless])

        @_guarded
        def on_cancel(name):
            if not name:
                raise InputError("no run is selected")
            ws.cancel(name)
            return f"stopping **{name}** after this step (a checkpoint is saved) …"

        cancel.click(on_cancel, [current], [train_status])

        @_guarded
        def on_resume(name):
            if not name:
                raise InputError("no run is selected; pick one under Runs")
            ws.resume(name)
            return name

        resume.click(on_resume, [current], [current])
        runs.change(lambda name: (name, ws.headless(name) if name else ""), [runs], [current, headless])

        def on_tick(name):
            if not name:
                return (gr.skip(),) * 5
            try:
                st = ws.status(name)
            except InputError:
                return (gr.skip(),) * 5
            import pandas as pd

            text = {"running": f"training **{name}** …", "queued": f"starting **{name}** …"}.get(
                st.state, f"**{name}**: {st.state}. {st.message}")
            lib = gr.skip()
            if st.state == "done":
                added, new = ws.collect(name)
                text = f"**{name}** finished: adapter **{', '.join(added)}** is in the library."
                lib = library_rows() if new else gr.skip()
            # typed columns even when empty: an untyped empty frame makes the plot's axes categorical for good
            losses = pd.DataFrame({"step": pd.Series([s for s, _ in st.losses], dtype="int64"),
                                   "loss": pd.Series([v for _, v in st.losses], dtype="float64")})
            return progress_html(st.step, st.total, st.state), text, losses, st.validation, lib

        # a new table (a finished run) refreshes every list of adapter names (below)
        timer.tick(on_tick, [current], [bar, train_status, loss_plot, validation, table],
                   show_progress="hidden", queue=False)

        # ---------------------------------------------------------------- Library handlers
        def refresh_lists(selected=None):
            names = library_names()
            return (library_rows(), gr.update(choices=names, value=selected if selected in names else None),
                    *[gr.update(choices=[""] + names) for _ in range(SLOTS)], gr.update(choices=[""] + names))

        lib_outputs = [table, pick, *[a for a, _, _, _ in slots], start_from]  # every list of the library's names
        table.change(lambda: refresh_lists()[1:], None, lib_outputs[1:], queue=False)

        @_guarded
        def on_pick(name):
            if not name:
                return None, None
            return ws.preview(name), ws.adapter_meta(name)

        pick.change(on_pick, [pick], [preview, meta])

        @_guarded
        def on_rename(name, new):
            if not name:
                raise InputError("pick an adapter to rename")
            new = ws.rename(name, new)
            return (f"renamed **{name}** to **{new}**", *refresh_lists(new))

        rename.click(on_rename, [pick, new_name], [lib_status, *lib_outputs])

        def ask_delete(name):
            if not name:
                raise gr.Error("pick an adapter to delete", duration=None, print_exception=False)
            return (f"Delete **{name}** from the library? This cannot be undone.", gr.update(visible=True),
                    gr.update(visible=True))

        delete.click(ask_delete, [pick], [lib_status, confirm, keep])
        keep.click(lambda: ("kept", gr.update(visible=False), gr.update(visible=False)), None, [lib_status, confirm, keep])

        @_guarded
        def on_delete(name):
            ws.delete(name)
            return (f"deleted **{name}**", gr.update(visible=False), gr.update(visible=False), *refresh_lists())

        confirm.click(on_delete, [pick], [lib_status, confirm, keep, *lib_outputs])

        @_guarded
        def on_export(name, layout_):
            if not name:
                raise InputError("pick an adapter to export")
            files = ws.export(name, layout_)
            return ([str(f) for f in files], f"exported **{name}** in the {layout_} layout: "
                    + " and ".join(f"`{f.name}`" for f in files))

        export.click(on_export, [pick, layout], [exported, lib_status])

        @_guarded
        def on_resize(name, rank_):
            if not name:
                raise InputError("pick an adapter to resize")
            new, kept = ws.resize(name, int(rank_ or 0))
            return (f"**{new}**: {name} at rank {kept['rank']} (from {kept['from_rank']}); each layer keeps"
                    f" {kept['min_kept']:.3f} or more of its update's norm, {kept['mean_kept']:.3f} on average",
                    *refresh_lists(new))

        resize.click(on_resize, [pick, resize_rank], [lib_status, *lib_outputs])

        @_guarded
        def on_import(items):
            if not items:
                return gr.skip(), *(gr.skip() for _ in lib_outputs)
            names = ws.import_adapters([_upload_name(f) for f in items])
            return (f"imported {', '.join(f'**{n}**' for n in names)}", *refresh_lists(names[0]))

        imported.upload(on_import, [imported], [lib_status, *lib_outputs])

        # ---------------------------------------------------------------- Generate handlers
        def on_canvas(which, first, t1, t2, t3, t4, evt: gr.SelectData):  # SLOTS texts
            x, y = (min(max(v / (CANVAS - 1), 0.0), 1.0) for v in evt.index)
            texts = [t1, t2, t3, t4]
            i = int(which) - 1
            if first is None:
                return (x, y), region_canvas(texts), *[gr.skip()] * SLOTS
            (x0, y0), x1, y1 = first, x, y
            x0, x1, y0, y1 = min(x0, x1), max(x0, x1), min(y0, y1), max(y0, y1)
            if x1 - x0 < 0.02 or y1 - y0 < 0.02:
                return None, region_canvas(texts), *[gr.skip()] * SLOTS
            texts[i] = f"{x0:.2f},{y0:.2f},{x1:.2f},{y1:.2f}"
            updates = [texts[j] if j == i else gr.skip() for j in range(SLOTS)]
            return None, region_canvas(texts), *updates

        canvas.select(on_canvas, [draw_for, corner, *regions], [corner, canvas, *regions], queue=False,
                      show_progress="hidden")
        for r in regions:
            r.change(lambda *t: region_canvas(list(t)), regions, [canvas], queue=False, show_progress="hidden")

        @_guarded
        def on_generate(prompt_, negative_, seed_, steps_, guidance_, width_, height_, num_, composer_, shown_, *slot_values,
                        progress=gr.Progress()):  # noqa: B008 - gradio's way to ask for a progress bar
            adapters = []
            for i in range(SLOTS):
                name, weight, region, window = slot_values[4 * i : 4 * i + 4]
                window = (window or "").strip()
                if name:
                    adapters.append({"name": name, "weight": float(weight), "region": (region or "").strip(),
                                     **({"timesteps": window} if window and window != "all" else {})})
            settings = Settings(prompt=prompt_, negative_prompt=negative_, seed=int(seed_ or 0), steps=int(steps_),
                                guidance=float(guidance_), width=int(width_ or 0), height=int(height_ or 0),
                                num=int(num_), adapters=adapters, composer=composer_)
            files = engine.generate(settings, progress=lambda i, n: progress((i, n), desc="sampling"))
            caption = " · ".join(filter(None, [
                f"steps {settings.steps}", f"cfg {settings.guidance}", settings.composer if adapters else "",
                " ".join(f"{a['name']}:{a['weight']:g}" + (f"@{a['region']}" if a["region"] else "")
                         + (f" t{a['timesteps']}" if a.get("timesteps") else "") for a in adapters)]))
            new = [(str(f), f"seed {settings.seed + i} · {caption}") for i, f in enumerate(files)]
            shown_ = (new + list(shown_))[:48]
            return shown_, shown_

        def on_load():
            """A page opened later sees the folder as it is now, not as it was when the app started."""
            return (gr.update(choices=ws.datasets()), gr.update(choices=[""] + ws.datasets()), gr.update(choices=ws.runs()),
                    *refresh_lists())

        demo.load(on_load, None, [dataset, style_dataset, runs, *lib_outputs], queue=False, show_progress="hidden")

        slot_inputs = [c for slot in slots for c in slot]
        go.click(on_generate, [prompt, negative, seed, gsteps, guidance, width, height, num, composer, shown, *slot_inputs],
                 [gallery, shown], concurrency_limit=concurrency, concurrency_id="generate", api_name="generate")

    return demo


def launch(data_dir: str | Path, model: str | Path, host: str = "127.0.0.1", port: int = 7860, share: bool = False,
           auth: str | None = None, max_upload_mb: int = 20, concurrency: int = 1, block: bool = True):
    """Start the app. Gradio's own upload cache lives in the data folder too, and only that folder is served."""
    ws = Workspace(data_dir, model)
    os.environ.setdefault("GRADIO_TEMP_DIR", str(ws.path(".gradio")))
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    credentials = None
    if auth:
        user, sep, password = auth.partition(":")
        if not sep or not user or not password:
            raise InputError(f"--auth {auth!r}: give USER:PASSWORD")
        credentials = (user, password)
    engine = Engine(ws)
    demo = build(ws, engine, concurrency)
    demo.queue(default_concurrency_limit=concurrency, max_size=256)
    try:
        demo.launch(server_name=host, server_port=port, share=share, auth=credentials, allowed_paths=[str(ws.root)],
                    max_file_size=f"{max_upload_mb}mb", prevent_thread_lock=not block, quiet=False, show_error=True,
                    footer_links=["api"])
    finally:
        if block:
            ws.close()
    return demo, ws
