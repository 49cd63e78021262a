"""The ``studio`` command.

Verbs so far: ``ui``, ``repeat``, ``generate`` (``--compose``), ``merge``, ``resize``, ``extract``, ``bench``, ``export``, ``train dreambooth``, ``train blora``, ``compose``, ``world render``, ``world pretrain``, ``eval prompts``, ``eval judge``,
``eval train-judge``. Errors in what the user gave print one line (``error: ...``) and exit 2.
"""

from __future__ import annotations

import json
import random
import sys
import time
import warnings
from pathlib import Path
from typing import Annotated

import typer

from studio.eval.judge import DEFAULT_JUDGE
from studio.families import EMBEDDED_MODEL
from studio.world.concepts import OBJECT_COUNTS
from studio.world.recipe import PretrainConfig

app = typer.Typer(help="Personalization studio for diffusion models.", no_args_is_help=True,
                  pretty_exceptions_enable=False, add_completion=False)
world_app = typer.Typer(help="The synthetic world: render scenes, pretrain the embedded model.", no_args_is_help=True)
eval_app = typer.Typer(help="Scores read by the world judge.", no_args_is_help=True)
train_app = typer.Typer(help="Train adapters (also: accelerate launch -m studio.trainers.<name> with the same flags).", no_args_is_help=True)
app.add_typer(train_app, name="train")
app.add_typer(world_app, name="world")
app.add_typer(eval_app, name="eval")

ModelOpt = Annotated[Path, typer.Option("--model", "-m", help="A local diffusers pipeline folder.")]
OutOpt = Annotated[Path, typer.Option("--out", "-o", help="PNG to write; several images become a grid.")]
StepsOpt = Annotated[int, typer.Option(help="Sampling steps.")]
GuidanceOpt = Annotated[float, typer.Option(help="Classifier-free guidance scale.")]
SeedOpt = Annotated[int, typer.Option(help="Seed of the first image; image i uses seed + i.")]
NumOpt = Annotated[int, typer.Option("--num", "-n", help="Images per prompt.")]
ScaleOpt = Annotated[int, typer.Option(help="Nearest-neighbour upscale of the written PNG.")]
PrecisionOpt = Annotated[str | None, typer.Option("--save-precision", help="Write the adapter's factors as fp32, fp16 (half the size) or bf16 (default: as computed, fp32 unless the input was smaller).")]


def _fail(message: str) -> None:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(2)


def _setup_warnings() -> None:
    warnings.formatwarning = lambda message, category, *args, **kwargs: f"warning: {message}\n"
    warnings.filterwarnings("ignore", category=FutureWarning)
    from diffusers.utils import logging as dlogging
    from transformers.utils import logging as tlogging

    dlogging.set_verbosity_error()
    dlogging.disable_progress_bar()
    tlogging.set_verbosity_error()
    tlogging.disable_progress_bar()


def _save(image, out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.stem}.tmp{out.suffix}")  # keep the extension: it tells Pillow the format
    image.save(tmp)
    tmp.replace(out)


@app.command()
def generate(
    prompts: Annotated[list[str], typer.Argument(help="One or more prompts, e.g. 'a red circle on the left'.")],
    out: OutOpt = Path("out.png"),
    model: ModelOpt = EMBEDDED_MODEL,
    steps: StepsOpt = 25,
    guidance: GuidanceOpt = 5.0,
    seed: SeedOpt = 0,
    num: NumOpt = 1,
    scale: ScaleOpt = 1,
    adapter: Annotated[list[str] | None, typer.Option("--adapter", "-a", help="FILE[:WEIGHT] (repeatable): an adapter .safetensors or PEFT folder, weight 1.0 by default.")] = None,
    compose: Annotated[str | None, typer.Option("--compose", "-c", help="Combine the adapters with a composer: naive, clora, lora-composer, gated, orthogonal. Each adapter is a concept named in the prompt by its token and class noun.")] = None,
    region: Annotated[list[str] | None, typer.Option("--region", "-r", help="Region of each adapter, in --adapter order (lora-composer; clora keeps each mask inside it): left, right, top, bottom, top-left, ..., center, all, or x0,y0,x1,y1 fractions; or style for a style adapter, which clora, lora-composer and gated do not place: it acts everywhere, on every concept.")] = None,
    timesteps: Annotated[list[str] | None, typer.Option("--timesteps", "-t", help="Timestep window of each adapter, in --adapter order (any composer): START:END of the training timesteps (0 clean, 1000 noise) at which it acts in the UNet, e.g. 0:500 for a style that should only draw the details; 0:500,0.5 keeps half its weight at the other steps; 'all' for every step.")] = None,
    block_weights: Annotated[list[str] | None, typer.Option("--block-weights", help="Block weights of each adapter, in --adapter order, as JSON in diffusers' set_adapters form (instead of :WEIGHT), e.g. '{\"unet\": {\"down\": 0, \"mid\": 0, \"up\": {\"block_0\": [0, 1, 0]}}}'; '1' for an adapter at weight 1.")] = None,
) -> None:
    """Generate images from prompts and write them to one PNG.

    Example: studio generate "a red circle on the left" "a large blue square at the top right, striped" -o grid.png
    With adapters: studio generate "a sks shape on the left" --adapter star.safetensors:0.8 -o star.png
    Block weights: studio generate "a sks shape" -a star.safetensors --block-weights '{"unet": {"down": 0, "mid": 0}}'
    Composed: studio generate "a sks shape on the left and a zwx shape on the right" -a star.safetensors -a heart.safetensors --compose lora-composer -r left -r right -o pair.png
    Style late: studio generate "a sks shape, zxy" -a star.safetensors -a style.safetensors -t all -t 0:500 -o styled.png
    Placed, with a style: studio generate "a sks shape on the left and a zwx shape on the right, zxy" -a star.safetensors -a heart.safetensors -a style.safetensors --compose clora -r left -r right -r style -o styled-pair.png
    """
    _setup_warnings()
    specs = [_adapter_spec(a) for a in adapter or []]
    if block_weights:
        if compose is not None or region or timesteps:
            _fail("--block-weights go with plain attaching, not with --compose, --region or --timesteps (a composer weighs"
                  " each adapter itself)")
        if len(block_weights) != len(specs):
            _fail(f"give one --block-weights per --adapter: {len(specs)} adapters, {len(block_weights)} block weights")
        parsed = []
        for (path, weight), text in zip(specs, block_weights):
            try:
                value = json.loads(text)
            except json.JSONDecodeError as e:
                _fail(f"--block-weights {text!r} for {path} is not JSON ({e.msg}); e.g. '{{\"unet\": {{\"up\": 0.5}}}}'")
            if not isinstance(value, (dict, int, float)) or isinstance(value, bool):
                _fail(f"--block-weights {text!r} for {path}: give a JSON object (diffusers' set_adapters form) or a number")
            if weight != 1.0:
                _fail(f"--adapter {path}:{weight:g} and --block-weights: give the weight in one of them")
            parsed.append((path, value))
        specs = parsed
    composition = None
    if compose is not None or region or timesteps:
        from studio.composers import METHODS, parse_place, parse_timesteps

        method = compose or "naive"
        if method not in METHODS:
            _fail(f"--compose {method!r} is not a composer; choose one of {', '.join(METHODS)}")
        if not specs:
            _fail("--compose needs at least one --adapter")
        if region and len(region) != len(specs):
            _fail(f"give one --region per --adapter: {len(specs)} adapters, {len(region)} regions")
        if timesteps and len(timesteps) != len(specs):
            _fail(f"give one --timesteps per --adapter: {len(specs)} adapters, {len(timesteps)} windows")
        try:
            for r in region or []:  # checked here; Concept.load reads each (a region, or style)
                parse_place(r)
            regions = list(region) if region else [None] * len(specs)
        except ValueError as e:
            _fail(f"--region: {e}")
        try:
            windows = [parse_timesteps(t) for t in timesteps] if timesteps else [None] * len(specs)
        except ValueError as e:
            _fail(f"--timesteps: {e}")
        composition = (method, regions, windows)
    _generate(prompts, out, model, steps, guidance, seed, num, scale, specs, composition=composition)


@app.command()
def compose(
    prompts: Annotated[list[str], typer.Argument(help="Prompts, e.g. 'a sks' (the B-LoRA token).")],
    content: Annotated[
        Path, typer.Option(help="Content adapter, e.g. runs/dog/content.safetensors (studio train blora).")
    ],
    style: Annotated[Path, typer.Option(help="Style adapter, e.g. runs/painting/style.safetensors.")],
    content_weight: Annotated[float, typer.Option(help="Weight of the content adapter.")] = 1.0,
    style_weight: Annotated[float, typer.Option(help="Weight of the style adapter.")] = 1.0,
    style_timesteps: Annotated[str, typer.Option(help="Training timesteps (START:END, 0 clean, 1000 noise) at which the style adapter acts, e.g. 0:500: only the late, detail-making steps, leaving the layout to the content adapter; 0:500,0.5: half its weight at the other steps; 'all': every step.")] = "all",
    out: OutOpt = Path("out.png"),
    model: ModelOpt = EMBEDDED_MODEL,
    steps: StepsOpt = 25,
    guidance: GuidanceOpt = 5.0,
    seed: SeedOpt = 0,
    num: NumOpt = 1,
    scale: ScaleOpt = 1,
) -> None:
    """The content of one image with the style of another: a B-LoRA content part plus a style part.

    Example: studio compose "a sks" --content runs/star/content.safetensors --style runs/ringed/style.safetensors -o out.png
    """
    _setup_warnings()
    from studio.composers import parse_timesteps
    from studio.plugin import check_same_base

    try:
        window = parse_timesteps(style_timesteps)
    except ValueError as e:
        _fail(f"--style-timesteps: {e}")
    _generate(
        prompts,
        out,
        model,
        steps,
        guidance,
        seed,
        num,
        scale,
        [(content, content_weight), (style, style_weight)],
        check=lambda: check_same_base({"content adapter": content, "style adapter": style}),
        composition=("naive", [None, None], [None, window]) if window else None,
    )


def _generate(
    prompts: list[str],
    out: Path,
    model: Path,
    steps: int,
    guidance: float,
    seed: int,
    num: int,
    scale: int,
    specs: list[tuple[Path, float]],
    check=None,
    composition: tuple[str, list, list] | None = None,
) -> None:
    """``generate``'s work, shared by ``compose``: check every input, attach adapters, sample, write."""
    from studio.sampling import check_prompt, image_grid
    from studio.sampling import generate as run_generate

    if steps < 1:
        _fail(f"--steps must be a positive integer, got {steps}")
    if num < 1:
        _fail(f"--num must be a positive integer, got {num}")
    if out.suffix.lower() not in (".png", ".jpg", ".jpeg", ".webp"):
        _fail(f"--out {out}: give a .png, .jpg or .webp path")
    try:
        for p in prompts:
            check_prompt(p)
    except ValueError as e:
        _fail(str(e))
    if not (model / "model_index.json").is_file():
        _fail(f"model folder not found or not a diffusers folder: {model}")
    if check is not None:
        try:
            check()
        except (ValueError, FileNotFoundError) as e:
            _fail(str(e))
    import torch

    from studio.families import load_pipeline

    t0 = time.time()
    pipe = load_pipeline(model)
    if composition is not None:
        images = _composed(pipe, prompts, specs, composition, seed, num, steps, guidance)
    elif specs:
        from studio.plugin import attach

        try:
            attach(pipe, [p for p, _ in specs], weights=[w for _, w in specs])
        except (ValueError, FileNotFoundError) as e:
            _fail(str(e))
    if composition is None:
        batch = [p for p in prompts for _ in range(num)]
        with torch.no_grad():
            images = run_generate(pipe, batch, seed=seed, steps=steps, guidance=guidance)
    image = images[0] if len(images) == 1 else image_grid(images, cols=num if len(prompts) > 1 else None)
    if scale != 1:
        image = image_grid([image], scale=scale)
    _save(image, out)
    typer.echo(f"wrote {out} ({len(images)} image{'s' * (len(images) > 1)}, {time.time() - t0:.1f} s)")


def _composed(pipe, prompts, specs, composition, seed, num, steps, guidance) -> list:
    """``generate --compose``: each adapter a concept, every prompt sampled with the composer."""
    import torch

    from studio.composers import Concept, compose
    from studio.plugin import check_same_base

    method, regions, windows = composition
    try:
        check_same_base({f"adapter {p}": p for p, _ in specs})
        concepts = [Concept.load(p, weight=w, region=r, timesteps=t) for (p, w), r, t in zip(specs, regions, windows)]
        images = []
        for prompt in prompts:
            with torch.no_grad():
                images.extend(compose(pipe, method, prompt, concepts, seed=seed, num=num, steps=steps, guidance=guidance))
    except (ValueError, FileNotFoundError) as e:
        _fail(str(e))
    return images


TRAINERS = {
    "dreambooth": "studio.trainers.dreambooth",
    "blora": "studio.trainers.blora",
    "content-style": "studio.trainers.content_style",
}


def _register_trainers() -> None:
    """``studio train NAME``: each trainer module's command (the same flags as ``python -m MODULE``)."""
    import importlib

    for name, module in TRAINERS.items():
        command = importlib.import_module(module).command

        def verb(_command=command, **kwargs):
            _setup_warnings()
            return _command(**kwargs)

        verb.__signature__ = command.__signature__  # type: ignore[attr-defined]
        verb.__doc__ = command.__doc__
        train_app.command(name)(verb)


_register_trainers()


def _adapter_spec(text: str) -> tuple[Path, float]:
    """``FILE[:WEIGHT]``; a colon followed by something that is not a number stays part of the path."""
    path, sep, weight = text.rpartition(":")
    if sep:
        try:
            return Path(path), float(weight)
        except ValueError:
            pass
    return Path(text), 1.0


@app.command("export")
def export(
    adapter: Annotated[Path, typer.Argument(help="An adapter: .safetensors (diffusers/peft or kohya keys) or a PEFT folder.")],
    format: Annotated[str, typer.Option("--format", "-f", help="Key layout to write: kohya (ComfyUI, A1111) or diffusers (pipe.load_lora_weights).")] = "kohya",
    out: Annotated[Path | None, typer.Option("--out", "-o", help="Output .safetensors (default: next to the input, suffixed with the format).")] = None,
    save_precision: PrecisionOpt = None,
) -> None:
    """Convert an adapter file between key layouts (and, with --save-precision, precisions); the conversion of
    layouts round-trips exactly."""
    from studio.adapters import LAYOUTS, load_adapter, save_adapter

    if format not in LAYOUTS:
        _fail(f"--format {format!r} is not a layout; choose one of {', '.join(LAYOUTS)}")
    out = out or adapter.with_name(f"{adapter.stem}.{format}.safetensors")
    if out.resolve() == adapter.resolve():
        _fail(f"--out {out} is the input file; give another path")
    try:
        loaded = load_adapter(adapter)
        save_adapter(loaded, out, layout=format, dtype=save_precision)
    except (ValueError, FileNotFoundError) as e:
        _fail(str(e))
    typer.echo(f"wrote {out} ({format} layout{', ' + save_precision if save_precision else ''}, {len(loaded.modules)} modules)")


@app.command("merge")
def merge_cmd(
    adapters: Annotated[list[str], typer.Argument(help="Adapters to merge, FILE[:WEIGHT] each (weight 1.0 by default).")],
    out: Annotated[Path, typer.Option("--out", "-o", help="The merged adapter (.safetensors).")],
    method: Annotated[str, typer.Option("--method", help="orthogonal (DO-Merging-style: orthogonal output subspaces, magnitudes kept) or sum (the plain weighted sum).")] = "orthogonal",
    format: Annotated[str, typer.Option("--format", "-f", help="Key layout to write: diffusers or kohya.")] = "diffusers",
    rank: Annotated[int, typer.Option("--rank", "-r", help="Resize the merge to this rank (the truncated SVD, as studio resize); 0: exact, the sum of the ranks.")] = 0,
    save_precision: PrecisionOpt = None,
) -> None:
    """Merge several adapters into one file any LoRA loader reads (exact: rank = sum of ranks; --rank shrinks it).

    Example: studio merge runs/star/adapter.safetensors runs/ringed/adapter.safetensors:0.8 -o star-ringed.safetensors
    """
    from studio.adapters import LAYOUTS, load_adapter, save_adapter
    from studio.adapters.resize import check_resize, resize
    from studio.composers.orthogonal import merge
    from studio.plugin import check_same_base

    if method not in ("orthogonal", "sum"):
        _fail(f"--method {method!r}: choose orthogonal or sum")
    if format not in LAYOUTS:
        _fail(f"--format {format!r} is not a layout; choose one of {', '.join(LAYOUTS)}")
    if out.suffix != ".safetensors":
        _fail(f"--out {out}: give a .safetensors path")
    if rank:
        try:
            check_resize(rank, None)
        except ValueError as e:
            _fail(str(e))
    specs = [_adapter_spec(a) for a in adapters]
    if any(out.resolve() == p.resolve() for p, _ in specs):
        _fail(f"--out {out} is one of the inputs; give another path")
    try:
        check_same_base({f"adapter {p}": p for p, _ in specs})
        merged = merge([load_adapter(p) for p, _ in specs], [w for _, w in specs], orthogonalize=method == "orthogonal")
        if rank:
            merged, _ = resize(merged, rank)
        save_adapter(merged, out, layout=format, dtype=save_precision)
    except (ValueError, FileNotFoundError) as e:
        _fail(str(e))
    typer.echo(f"wrote {out} ({method} merge of {len(specs)} adapters, {len(merged.modules)} modules, rank {merged.meta.rank})")


@app.command("resize")
def resize_cmd(
    adapter: Annotated[Path, typer.Argument(help="An adapter: .safetensors (diffusers/peft or kohya keys) or a PEFT folder.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="The resized adapter (.safetensors).")],
    rank: Annotated[int, typer.Option("--rank", "-r", help="The largest rank a layer keeps (1-256).")] = 4,
    fro: Annotated[float | None, typer.Option("--fro", help="Per layer, keep the fewest singular values that hold this share (0-1] of its update's Frobenius norm, at most --rank (kohya's sv_fro).")] = None,
    format: Annotated[str, typer.Option("--format", "-f", help="Key layout to write: diffusers or kohya.")] = "diffusers",
    save_precision: PrecisionOpt = None,
) -> None:
    """Shrink an adapter to a lower rank: each layer's update truncated to its largest singular values (the best
    approximation of that rank), as kohya's resize_lora.py does.

    Example: studio resize runs/star/adapter.safetensors --rank 4 -o star-r4.safetensors
    """
    from studio.adapters import LAYOUTS, load_adapter, save_adapter
    from studio.adapters.resize import resize

    if format not in LAYOUTS:
        _fail(f"--format {format!r} is not a layout; choose one of {', '.join(LAYOUTS)}")
    if out.suffix != ".safetensors":
        _fail(f"--out {out}: give a .safetensors path")
    if out.resolve() == adapter.resolve():
        _fail(f"--out {out} is the input file; give another path")
    try:
        resized, kept = resize(load_adapter(adapter), rank, fro)
        save_adapter(resized, out, layout=format, dtype=save_precision)
    except (ValueError, FileNotFoundError) as e:
        _fail(str(e))
    ranks = f"{kept['min_rank']}-{kept['rank']}" if kept["min_rank"] != kept["rank"] else str(kept["rank"])
    typer.echo(f"wrote {out} (rank {kept['from_rank']} -> {ranks}; each layer keeps {kept['min_kept']:.3f} or more of"
               f" its update's Frobenius norm, {kept['mean_kept']:.3f} on average)")


@app.command("extract")
def extract_cmd(
    base: Annotated[Path, typer.Option("--base", help="The base model: a local diffusers folder.")],
    tuned: Annotated[Path, typer.Option("--tuned", help="The fine-tuned model: a diffusers folder of the same architecture.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="The extracted adapter (.safetensors).")],
    rank: Annotated[int, typer.Option("--rank", "-r", help="The largest rank a layer gets (1-256).")] = 16,
    fro: Annotated[float | None, typer.Option("--fro", help="Per layer, keep the fewest singular values that hold this share (0-1] of its difference's Frobenius norm, at most --rank.")] = None,
    lora_layers: Annotated[str, typer.Option("--lora-layers", help="UNet layers to compare: module name endings, comma-separated (default: the attention projections; add ff.net.0.proj,ff.net.2,proj_in,proj_out for the rest of the transformer blocks).")] = "to_q,to_k,to_v,to_out.0",
    conv: Annotated[bool, typer.Option("--conv/--no-conv", help="Also the ResNet convolutions (conv1, conv2; kohya's --conv_dim).")] = False,
    min_diff: Annotated[float, typer.Option("--min-diff", help="Leave out a layer whose largest weight difference is at most this.")] = 1e-6,
    format: Annotated[str, typer.Option("--format", "-f", help="Key layout to write: diffusers or kohya.")] = "diffusers",
    save_precision: PrecisionOpt = None,
) -> None:
    """Extract a LoRA from a fine-tuned model: each layer's weight difference to the base, truncated to its largest
    singular values (kohya's extract_lora_from_models.py). Both models are read from safetensors only.

    Example: studio extract --base base-model/ --tuned finetuned/ --rank 16 -o finetune.safetensors
    """
    from studio.adapters import LAYOUTS, save_adapter
    from studio.adapters.extract import extract
    from studio.trainers.dreambooth import parse_layers

    if format not in LAYOUTS:
        _fail(f"--format {format!r} is not a layout; choose one of {', '.join(LAYOUTS)}")
    if out.suffix != ".safetensors":
        _fail(f"--out {out}: give a .safetensors path")
    try:
        adapter, summary = extract(base, tuned, rank, fro, parse_layers(lora_layers), conv, min_diff)
        save_adapter(adapter, out, layout=format, dtype=save_precision)
    except (ValueError, FileNotFoundError) as e:
        _fail(str(e))
    typer.echo(f"wrote {out} ({summary['written']} of {summary['compared']} layers differ; each keeps"
               f" {summary['min_kept']:.3f} or more of its difference's Frobenius norm, {summary['mean_kept']:.3f} on average)")


@app.command("repeat")
def repeat_cmd(
    source: Annotated[Path, typer.Argument(help="A PNG the app wrote (its settings are in its metadata) or a .json of the same settings.")],
    out: OutOpt = Path("out.png"),
    data_dir: Annotated[Path, typer.Option(help="The app's data folder, whose library has the adapters the settings name.")] = Path("studio-data"),
    model: ModelOpt = EMBEDDED_MODEL,
    seed: Annotated[int | None, typer.Option(help="Another seed (default: the image's own).")] = None,
) -> None:
    """Make an image of the app again, headless: the same settings (prompt, seed, steps, guidance, size,
    adapters with weights and regions, composer), the app's and the CLI's one schema.

    Example: studio repeat studio-data/outputs/20261124-053000-123456789-s3.png -o again.png
    """
    import dataclasses

    if not source.is_file():
        _fail(f"{source}: no such file; give a PNG the app wrote or a settings .json")
    if out.suffix.lower() != ".png":
        _fail(f"--out {out}: give a .png path")
    from studio.ui.engine import Engine, Settings
    from studio.ui.workspace import InputError, Workspace

    try:
        if source.suffix.lower() == ".json":
            settings = Settings.from_dict(json.loads(source.read_text()))
        else:
            settings = Settings.from_png(source)
    except (InputError, ValueError, TypeError, OSError) as e:
        _fail(f"{source}: {e}")
    if seed is not None:
        settings = dataclasses.replace(settings, seed=seed)
    _setup_warnings()
    try:
        files = Engine(Workspace(data_dir, model)).generate(settings)
    except InputError as e:
        _fail(str(e))
    if len(files) == 1:  # the engine's PNG itself, settings included
        import shutil

        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(f".{out.stem}.tmp.png")
        shutil.copyfile(files[0], tmp)
        tmp.replace(out)
    else:
        from PIL import Image

        from studio.sampling import image_grid

        _save(image_grid([Image.open(f) for f in files]), out)
    typer.echo(f"wrote {out} (and {', '.join(str(f) for f in files)})")


@app.command("ui")
def ui_cmd(
    data_dir: Annotated[Path, typer.Option(help="The studio's data folder: datasets, runs, the adapter library, outputs. The app reads and writes nothing outside it.")] = Path("studio-data"),
    model: ModelOpt = EMBEDDED_MODEL,
    host: Annotated[str, typer.Option(help="Address to listen on; 127.0.0.1 keeps the app on this machine (0.0.0.0: every interface).")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to listen on.")] = 7860,
    share: Annotated[bool, typer.Option(help="Also open a public gradio.live link.")] = False,
    auth: Annotated[str | None, typer.Option(help="USER:PASSWORD required to open the app.")] = None,
    max_upload_mb: Annotated[int, typer.Option(help="Largest upload accepted, in MB.")] = 20,
    concurrency: Annotated[int, typer.Option(help="Generation requests served at once (the rest queue); one per device by default.")] = 1,
) -> None:
    """The Gradio app: train, browse the adapter library and generate in a browser (pip install -e '.[ui]').

    Example: studio ui --data-dir ~/studio-data   (then open http://127.0.0.1:7860)
    """
    if not (model / "model_index.json").is_file():
        _fail(f"model folder not found or not a diffusers folder: {model}")
    if max_upload_mb < 1 or concurrency < 1 or not 0 < port < 65536:
        _fail("--max-upload-mb and --concurrency must be positive integers and --port a port number (1-65535)")
    if auth is not None and (":" not in auth or not auth.partition(":")[0] or not auth.partition(":")[2]):
        _fail(f"--auth {auth!r}: give USER:PASSWORD")
    try:
        import gradio  # noqa: F401
    except ImportError:
        _fail("the app needs gradio: pip install -e '.[ui]'")
    _setup_warnings()
    from studio.ui.app import launch

    launch(data_dir, model, host=host, port=port, share=share, auth=auth, max_upload_mb=max_upload_mb,
           concurrency=concurrency)


BENCH_DIR = Path(__file__).resolve().parents[1] / "bench"


@app.command("bench", context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def bench_cmd(
    ctx: typer.Context,
    name: Annotated[str, typer.Argument(help="Which benchmark: speed, compose, dreambooth, embedded_model, ... (a script in bench/).")],
) -> None:
    """Run a benchmark script from the repository's bench/ folder; it prints a table and writes its section of
    docs/benchmarks.md. Extra arguments go to the script (after --, the script's own --help too).

    Example: studio bench speed --models embedded ; studio bench speed -- --help
    """
    import subprocess

    scripts = sorted(p.stem for p in BENCH_DIR.glob("*.py") if p.stem != "report") if BENCH_DIR.is_dir() else []
    if not scripts:
        _fail("benchmarks are scripts in the repository's bench/ folder; run this from a checkout (pip install -e .)")
    if name not in scripts:
        _fail(f"no benchmark {name!r}; choose one of {', '.join(scripts)}")
    raise typer.Exit(subprocess.call([sys.executable, str(BENCH_DIR / f"{name}.py"), *ctx.args]))


@world_app.command("render")
def world_render(
    prompt: Annotated[str | None, typer.Argument(help="A caption to draw; leave out for random scenes.")] = None,
    out: Annotated[Path, typer.Option("--out", "-o", help="PNG to write.")] = Path("world.png"),
    count: Annotated[int, typer.Option("--count", "-n", help="How many scenes (a grid when more than one).")] = 1,
    seed: Annotated[int, typer.Option(help="Seed; the same seed gives the same pixels.")] = 0,
    held_out: Annotated[bool, typer.Option(help="Random scenes may use held-out shapes and styles.")] = False,
    scale: Annotated[int, typer.Option(help="Nearest-neighbour upscale of the written PNG.")] = 1,
    captions: Annotated[bool, typer.Option(help="Print each scene's caption.")] = False,
) -> None:
    """Render scenes of the synthetic world (exact pictures, no model involved)."""
    from studio.sampling import image_grid
    from studio.world.concepts import BASE_SHAPES, BASE_STYLES, SHAPES, STYLES
    from studio.world.grammar import caption_scene, format_prompt, parse_prompt, scene_from_prompt
    from studio.world.render import render, sample_scene

    if count < 1:
        _fail(f"--count must be a positive integer, got {count}")
    rng = random.Random(seed)
    images = []
    for i in range(count):
        try:
            if prompt is not None:
                parsed = parse_prompt(prompt)
                if parsed.unknown:
                    _fail(f"unknown word(s) in {prompt!r}: {', '.join(parsed.unknown)}")
                scene = scene_from_prompt(parsed, rng)
            else:
                shapes, styles = (SHAPES, STYLES) if held_out else (BASE_SHAPES, BASE_STYLES)
                scene = sample_scene(rng, shapes=shapes, styles=styles)
        except ValueError as e:
            _fail(str(e))
        if captions:
            typer.echo(format_prompt(caption_scene(scene, random.Random(0)) if prompt is None else parse_prompt(prompt)))
        images.append(render(scene, seed=seed + i))
    _save(image_grid(images, scale=scale) if count > 1 or scale != 1 else images[0], out)
    typer.echo(f"wrote {out}")


_RECIPE = PretrainConfig()  # the pretrain command's defaults


@world_app.command("pretrain")
def world_pretrain(
    out: Annotated[Path, typer.Option(help="Where to save the diffusers folder.")] = Path(_RECIPE.out),
    work_dir: Annotated[Path, typer.Option(help="Checkpoints and caches; a rerun resumes from here.")] = Path(_RECIPE.work_dir),
    seed: int = _RECIPE.seed,
    n_scenes: Annotated[int, typer.Option(help="Rendered training scenes.")] = _RECIPE.n_scenes,
    object_counts: Annotated[str, typer.Option(help="Each scene's object count is drawn from this comma-separated list (repeat a count to weight it).")] = ",".join(map(str, _RECIPE.object_counts)),
    vae_steps: int = _RECIPE.vae_steps,
    unet_steps: int = _RECIPE.unet_steps,
    unet_batch: int = _RECIPE.unet_batch,
    unet_lr: float = _RECIPE.unet_lr,
    checkpoint_every: int = _RECIPE.checkpoint_every,
    monitor_every: Annotated[int, typer.Option(help="Log held-out prompt fidelity every N steps (0: never).")] = _RECIPE.monitor_every,
    fresh: Annotated[bool, typer.Option(help="Delete the work dir first instead of resuming.")] = False,
    zero_snr_from: Annotated[int, typer.Option(help="UNet step from which zero-terminal-SNR betas train (0: from the start, -1: never).")] = _RECIPE.zero_snr_from,
    standardize_latents: Annotated[bool, typer.Option(help="Variant: per-channel latent standardization inside the VAE.")] = _RECIPE.standardize_latents,
    lr_ends: Annotated[str, typer.Option(help="Steps where the learning rate's cosine restarts, comma-separated (the shipped weights' legs: 3000,5000,...); empty: one cosine over the run.")] = ",".join(map(str, _RECIPE.lr_ends)),
    object_weight: Annotated[float, typer.Option(help="Loss weight on and around objects relative to the background (1: plain loss).")] = _RECIPE.object_weight,
    text_probe_weight: Annotated[float, typer.Option(help="Weight of the text-probe loss that keeps attribute words apart in the text encoders' output (0: none).")] = _RECIPE.text_probe_weight,
    caption_detail: Annotated[float, typer.Option(help="Chance that a training caption names an object's size, and separately its style (0 to 1; 0.5: the evaluation prompts' rate).")] = _RECIPE.caption_detail,
    init_from: Annotated[Path | None, typer.Option(help="Continue from a model folder this recipe saved (e.g. the shipped weights): its tokenizer, VAE, text encoders and UNet, with UNet steps counted from 0 and a fresh optimizer.")] = None,
    textures: Annotated[int, typer.Option(help="How many named generic textures (the catalogue's first N, each called by a made-up word) the scenes also show (0: none).")] = _RECIPE.textures,
    texture_rate: Annotated[float, typer.Option(help="With --textures: the chance that an object wears a named texture instead of its style.")] = _RECIPE.texture_rate,
    vae_from: Annotated[Path | None, typer.Option(help="Use this diffusers AutoencoderKL folder as the VAE instead of training one (e.g. the refined VAE of bench/codec.py --refine).")] = None,
) -> None:
    """Pretrain the embedded tiny SDXL on the synthetic world (resumable). The defaults are the budget recipe: about 2 h on 2 CPU cores; the shipped weights ran longer legs (about 6 h), listed in the model card."""
    _setup_warnings()
    import shutil

    from studio.world.pretrain import check_init_from, check_vae_from, check_work_dir, pretrain, texture_words

    for name, value in (("--n-scenes", n_scenes), ("--vae-steps", vae_steps), ("--unet-steps", unet_steps),
                        ("--unet-batch", unet_batch), ("--checkpoint-every", checkpoint_every)):
        if value < 1:
            _fail(f"{name} must be a positive integer, got {value}")
    if object_weight <= 0:
        _fail(f"--object-weight must be positive, got {object_weight}")
    if text_probe_weight < 0:
        _fail(f"--text-probe-weight must be 0 (none) or positive, got {text_probe_weight}")
    if not 0 <= caption_detail <= 1:
        _fail(f"--caption-detail must be a chance between 0 and 1, got {caption_detail}")
    try:
        ends = tuple(int(v) for v in lr_ends.split(",") if v.strip())
    except ValueError:
        _fail(f"--lr-ends {lr_ends!r}: give whole step numbers separated by commas, e.g. 3000,5000")
    try:
        counts = tuple(int(v) for v in object_counts.split(",") if v.strip())
    except ValueError:
        counts = ()
    if not counts or any(c not in OBJECT_COUNTS for c in counts):
        _fail(f"--object-counts {object_counts!r}: give object counts of 1, 2 or 3 separated by commas, e.g. 1,2,2,3")
    cfg = PretrainConfig(init_from=str(init_from or ""), lr_ends=ends, object_counts=counts, out=str(out), work_dir=str(work_dir), seed=seed, n_scenes=n_scenes, vae_steps=vae_steps,
                         unet_steps=unet_steps, unet_batch=unet_batch, unet_lr=unet_lr,
                         checkpoint_every=checkpoint_every, monitor_every=monitor_every,
                         zero_snr_from=zero_snr_from, standardize_latents=standardize_latents,
                         object_weight=object_weight, text_probe_weight=text_probe_weight, caption_detail=caption_detail,
                         textures=textures, texture_rate=texture_rate, vae_from=str(vae_from or ""))
    if not 0 <= texture_rate <= 1:
        _fail(f"--texture-rate must be a chance between 0 and 1, got {texture_rate}")
    try:
        texture_words(textures)
        if init_from is not None:
            check_init_from(cfg)
        if vae_from is not None:
            check_vae_from(cfg)
    except (ValueError, FileNotFoundError) as e:
        _fail(str(e))
    if fresh:
        shutil.rmtree(work_dir, ignore_errors=True)
    try:
        check_work_dir(cfg, work_dir)
    except ValueError as e:
        _fail(str(e))
    typer.echo(f"saved {pretrain(cfg)}")


@eval_app.command("prompts")
def eval_prompts(
    model: ModelOpt = EMBEDDED_MODEL,
    n: Annotated[int, typer.Option("--n", help="Prompts per object count.")] = 200,
    seed: int = 0,
    steps: int = 25,
    guidance: float = 5.0,
    json_out: Annotated[Path | None, typer.Option("--json", help="Also write the scores as JSON.")] = None,
    by: Annotated[str | None, typer.Option(
        "--by", help="Also break one attribute down by value (shape, colour, size, position, style or background): "
        "how often each value is shown, and what the judge read instead.")] = None,
) -> None:
    """Prompt fidelity on held-out grammar prompts (never used in pretraining), read by the judge.

    Example: studio eval prompts --n 200 --by colour
    """
    _setup_warnings()
    if n < 1 or steps < 1:
        _fail(f"--n and --steps must be positive integers, got {n} and {steps}")
    from studio.eval.fidelity import REPORTED

    if by is not None and by not in REPORTED:
        _fail(f"--by {by!r} is not an attribute; accepted: {', '.join(REPORTED)}")
    if not (model / "model_index.json").is_file():
        _fail(f"model folder not found or not a diffusers folder: {model}")
    from collections import Counter

    from studio.eval.fidelity import evaluate_prompts
    from studio.families import load_pipeline

    t0 = time.time()
    confusions: Counter = Counter()
    scores = evaluate_prompts(load_pipeline(model), n_prompts=n, seed=seed, steps=steps, guidance=guidance, by=by,
                              confusions=confusions)
    typer.echo("| prompts | n | prompt fidelity | " + " | ".join(REPORTED) + " |\n|---|---|---|" + "---|" * len(REPORTED))
    counts = [key.split("_")[1] for key in scores if key.startswith("fidelity_")]
    for k in counts:
        shown = " | ".join(f"{scores[f'{a}_{k}']:.2f}" if f"{a}_{k}" in scores else "-" for a in REPORTED)
        typer.echo(f"| {k}-object | {n} | {scores[f'fidelity_{k}']:.3f} | {shown} |")
    if by:
        typer.echo(f"\n| prompts | {by} named | mentions | shown | read instead |\n|---|---|---|---|---|")
        for k in counts:
            for value in sorted({v for kk, v, _ in confusions if str(kk) == k}):
                misses = sorted(((c, r) for (kk, v, r), c in confusions.items() if str(kk) == k and v == value and r != value),
                                reverse=True)
                instead = ", ".join(f"{r} {c}" for c, r in misses) or "-"
                typer.echo(f"| {k}-object | {value} | {scores[f'{by}={value}_{k}_n']} | {scores[f'{by}={value}_{k}']:.2f} | {instead} |")
    typer.echo(f"({time.time() - t0:.0f} s)")
    if json_out:
        json_out.write_text(json.dumps({"model": str(model), "n": n, "seed": seed, "steps": steps,
                                        "guidance": guidance, **scores,
                                        **({"by": by, "confusions": [[k, v, r, c] for (k, v, r), c in
                                                                     sorted(confusions.items())]} if by else {})},
                                       indent=2))


@eval_app.command("judge")
def eval_judge(
    n: Annotated[int, typer.Option(help="Freshly rendered scenes to read.")] = 2000,
    seed: int = 10_000,
) -> None:
    """Per-attribute accuracy of the shipped judge on freshly rendered scenes."""
    from studio.eval.judge import evaluate_judge, load_judge

    for k, v in evaluate_judge(load_judge(), n=n, seed=seed).items():
        typer.echo(f"{k:10s} {v:.4f}")


@eval_app.command("train-judge")
def eval_train_judge(
    out: Annotated[Path, typer.Option(help="Weights to write (safetensors).")] = DEFAULT_JUDGE,
    steps: int = 2500,
    batch: int = 64,
    seed: int = 0,
    lr: Annotated[float, typer.Option(help="Peak learning rate (one-cycle schedule).")] = 2e-3,
    init: Annotated[Path | None, typer.Option(help="Go on training these judge weights.")] = None,
) -> None:
    """Train the world judge on rendered scenes of every concept (~20 min on 2 CPU cores)."""
    from studio.eval.judge import train_judge

    if init is not None and not init.is_file():
        _fail(f"--init {init}: no such judge weights file")
    scores = train_judge(out, steps=steps, batch=batch, seed=seed, lr=lr, init=init)
    typer.echo(json.dumps(scores, indent=2))


def main() -> None:  # pragma: no cover - console entry point
    app(sys.argv[1:])


if __name__ == "__main__":  # pragma: no cover
    main()
