"""The studio's data folder, as the app sees it: datasets, training runs, the adapter library, outputs.

Everything the app reads or writes lies under one root (``studio ui --data-dir``)::

    ROOT/datasets/NAME/     uploaded training images
    ROOT/runs/NAME/         a training run: train.json (the trainer's config, the CLI's keys), progress.jsonl,
                            log.txt, checkpoints, validation images, the adapter
    ROOT/adapters/NAME.safetensors (+ NAME.png preview)   the library
    ROOT/exports/           adapters converted to kohya/diffusers key layouts, for download
    ROOT/outputs/           generated images (settings in each PNG's metadata)

Names a user types or uploads become one path component each and are checked here
(:func:`safe_name`); nothing resolves outside the root. This module has no gradio in it, so the rules
are tested on their own.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from studio.adapters.files import EMB_SUFFIX, embeddings_path
from studio.families import EMBEDDED_MODEL

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
MAX_IMAGE_BYTES = 20 * 1024 * 1024
MAX_ADAPTER_BYTES = 2 * 1024**3
MAX_IMAGES = 200
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")

# the trainers the app offers: name -> (module run as ``python -m``, its config class)
TRAINERS = {
    "dreambooth": ("studio.trainers.dreambooth", "DreamBoothConfig"),
    "blora": ("studio.trainers.blora", "BLoRAConfig"),
    "content-style": ("studio.trainers.content_style", "ContentStyleConfig"),  # also takes a style dataset
}
PRESETS: dict[str, dict[str, Any]] = {
    "quick": {"steps": 60, "rank": 4, "batch_size": 2, "lr": 3e-4, "prior_preservation": False},
    "standard": {},  # the trainer's own defaults (500 steps, rank 8 for DreamBooth, with prior preservation)
    "strong": {"steps": 1000, "rank": 16},
}


class InputError(ValueError):
    """Bad input from a user of the app; the message names the input and what is accepted."""


def safe_name(text: str, what: str) -> str:
    """``text`` as one path component: letters, digits, ``.``, ``_``, ``-``; no path, no ``..``."""
    name = (text or "").strip()
    if not _NAME.fullmatch(name) or ".." in name:
        raise InputError(f"{what} {text!r} is refused: use 1-64 letters, digits, '.', '_' or '-', starting with a"
                         " letter or digit (no path separators, no '..')")
    return name


def config_class(trainer: str):
    import importlib

    if trainer not in TRAINERS:
        raise InputError(f"trainer {trainer!r} is not known; choose one of {', '.join(TRAINERS)}")
    module, cls = TRAINERS[trainer]
    return getattr(importlib.import_module(module), cls)


@dataclass
class RunStatus:
    name: str
    state: str  # queued, running, done, cancelled, failed, interrupted
    step: int = 0
    total: int = 0
    losses: list[tuple[int, float]] = field(default_factory=list)
    validation: list[str] = field(default_factory=list)
    message: str = ""


class Workspace:
    def __init__(self, root: str | Path, model: str | Path = EMBEDDED_MODEL):
        self.root = Path(root).resolve()
        self.model = Path(model)
        for sub in ("datasets", "runs", "adapters", "exports", "outputs"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        self._procs: dict[str, subprocess.Popen] = {}

    # --- paths ------------------------------------------------------------------------------------

    def path(self, *parts: str) -> Path:
        """A path under the root; refuses anything that resolves outside it."""
        p = self.root.joinpath(*parts).resolve()
        if p != self.root and self.root not in p.parents:
            raise InputError(f"{'/'.join(parts)!r} is outside the studio's data folder; refused")
        return p

    # --- datasets ---------------------------------------------------------------------------------

    def datasets(self) -> list[str]:
        return sorted(p.name for p in (self.root / "datasets").iterdir() if p.is_dir() and not p.name.startswith("."))

    def add_dataset(self, name: str, files: list[tuple[str, str | Path]]) -> Path:
        """Copy uploaded images ``(original file name, temporary path)`` into ``datasets/NAME``.

        Every file is checked before anything is written: a safe name, an image suffix, at most
        :data:`MAX_IMAGE_BYTES`, an image Pillow can decode. Then the folder appears at once (written
        beside it and renamed), so a refused upload leaves nothing behind."""
        from PIL import Image

        name = safe_name(name, "dataset name")
        if not files:
            raise InputError("no images uploaded; give 1 to 200 images (.png, .jpg, .jpeg, .webp, .bmp)")
        if len(files) > MAX_IMAGES:
            raise InputError(f"{len(files)} files uploaded; at most {MAX_IMAGES} images per dataset")
        dest = self.path("datasets", name)
        if dest.exists():
            raise InputError(f"dataset {name!r} already exists; choose another name or pick it from the list")
        seen = set()
        for orig, tmp in files:
            base = safe_name(orig, "file name")
            if Path(base).suffix.lower() not in IMAGE_SUFFIXES:
                raise InputError(f"file {orig!r} is not an image; accepted: {', '.join(IMAGE_SUFFIXES)}")
            if os.path.getsize(tmp) > MAX_IMAGE_BYTES:
                raise InputError(f"file {orig!r} is larger than {MAX_IMAGE_BYTES // 2**20} MB")
            try:
                with Image.open(tmp) as im:
                    im.verify()
            except Exception:
                raise InputError(f"file {orig!r} is not a readable image (.png, .jpg, .webp, .bmp)") from None
            if base.lower() in seen:
                raise InputError(f"file name {orig!r} appears twice")
            seen.add(base.lower())
        staging = self.path("datasets", f".{name}.{os.getpid()}.tmp")
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir()
        for orig, tmp in files:
            shutil.copyfile(tmp, staging / orig.strip())
        staging.rename(dest)
        return dest

    # --- training runs ----------------------------------------------------------------------------

    def runs(self) -> list[str]:
        runs = [p for p in (self.root / "runs").iterdir() if (p / "train.json").is_file()]
        return [p.name for p in sorted(runs, key=lambda p: p.stat().st_mtime, reverse=True)]

    def train_config(self, trainer: str, preset: str, dataset: str, name: str, style_dataset: str = "",
                     start_from: str = "", **overrides) -> dict[str, Any]:
        """The trainer's config (the CLI's keys) for a run of the app: preset < overrides; data and
        output always in the data folder; a validation image at the end (the library's preview).
        ``style_dataset``: the style images of the content-style trainer (another dataset). ``start_from``: a
        library adapter the run starts from (``--init-adapter``), at its rank unless a rank is given."""
        import dataclasses

        cls = config_class(trainer)
        if trainer == "content-style":
            if not style_dataset:
                raise InputError("the content-style trainer needs a style dataset too (one or more images of the style)")
            style = safe_name(style_dataset, "style dataset")
            if not self.path("datasets", style).is_dir():
                raise InputError(f"style dataset {style!r} does not exist; choose one of: {', '.join(self.datasets())}")
            overrides["style_data"] = str(self.path("datasets", style))
        elif style_dataset:
            raise InputError(f"a style dataset is for the content-style trainer only, not {trainer}")
        if preset not in PRESETS:
            raise InputError(f"preset {preset!r} is not known; choose one of {', '.join(PRESETS)}")
        dataset = safe_name(dataset, "dataset")
        if not self.path("datasets", dataset).is_dir():
            raise InputError(f"dataset {dataset!r} does not exist; upload images or pick one of: "
                             f"{', '.join(self.datasets()) or '(none yet)'}")
        name = safe_name(name, "run name")
        values = {**PRESETS[preset], **{k: v for k, v in overrides.items() if v not in (None, "")}}
        if start_from:
            from studio.adapters import load_adapter

            values["init_adapter"] = str(self.adapter_file(start_from))
            if overrides.get("rank") in (None, ""):
                values["rank"] = load_adapter(values["init_adapter"]).meta.rank or values.get("rank")
        if values.get("optimizer") == "prodigy" and overrides.get("lr") in (None, ""):
            values["lr"] = 1.0  # Prodigy finds its own step size and the rate multiplies it: a preset's 3e-4 would be refused
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise InputError(f"unknown setting(s) {', '.join(unknown)}")
        values.update(model=str(self.model), data=str(self.path("datasets", dataset)),
                      output=str(self.path("runs", name)))
        steps = int(values.get("steps", cls.steps))
        values.setdefault("checkpoint_every", max(10, steps // 10))
        values.setdefault("validation_every", max(1, steps // 4))
        token = values.get("token") or cls.token
        noun = values.get("class_noun") or cls.class_noun
        values.setdefault("validation_prompts", [f"a {token} {noun}"])
        if values.get("prior_preservation", cls.prior_preservation):
            values.setdefault("class_data", str(self.path("runs", ".class-images", noun)))
        cfg = cls(**values)  # the trainer's own checks, before anything starts
        try:
            cfg.check()
        except (ValueError, FileNotFoundError) as e:
            raise InputError(str(e)) from None
        return {"trainer": trainer, **{k: v for k, v in dataclasses.asdict(cfg).items() if k != "resume"}}

    def start_run(self, config: dict[str, Any], resume: bool = False) -> str:
        """Write ``train.json`` (new runs) and start the trainer as its own process, as headless:
        ``python -m studio.trainers.NAME --config runs/NAME/train.json`` (``--resume latest`` to continue)."""
        run_dir = Path(config["output"])
        name = run_dir.name
        if self.running():
            raise InputError(f"run {self.running()!r} is training; wait for it or cancel it (one run at a time)")
        if not resume:
            if run_dir.exists():
                raise InputError(f"run {name!r} already exists; choose another name or resume it")
            run_dir.mkdir(parents=True)
            keys = {k: v for k, v in config.items() if k != "trainer"}
            (run_dir / "train.json").write_text(json.dumps(keys, indent=2))
            (run_dir / "trainer.txt").write_text(config["trainer"])
        cmd = self.command(name, resume)
        log = open(run_dir / "log.txt", "a")  # noqa: SIM115 - the child owns it
        self._procs[name] = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=self.root,
                                             start_new_session=True)
        log.close()
        return name

    def command(self, name: str, resume: bool = False) -> list[str]:
        run_dir = self.path("runs", safe_name(name, "run"))
        trainer = (run_dir / "trainer.txt").read_text().strip()
        cmd = [sys.executable, "-m", TRAINERS[trainer][0], "--config", str(run_dir / "train.json")]
        return cmd + (["--resume", "latest"] if resume else [])

    def headless(self, name: str) -> str:
        """The command that repeats a run of the app from its saved config."""
        run_dir = self.path("runs", safe_name(name, "run"))
        trainer = (run_dir / "trainer.txt").read_text().strip()
        return f"studio train {trainer} --config {run_dir / 'train.json'}"

    def running(self) -> str | None:
        for name, proc in self._procs.items():
            if proc.poll() is None:
                return name
        return None

    def cancel(self, name: str) -> None:
        """Ask the run to stop: it saves a checkpoint at the next step and exits (resumable)."""
        run_dir = self.path("runs", safe_name(name, "run"))
        proc = self._procs.get(name)
        if proc is None or proc.poll() is not None:
            raise InputError(f"run {name!r} is not training")
        (run_dir / "STOP").touch()

    def resume(self, name: str) -> str:
        run_dir = self.path("runs", safe_name(name, "run"))
        if not (run_dir / "train.json").is_file():
            raise InputError(f"run {name!r} does not exist")
        if (run_dir / "adapter.safetensors").is_file():
            raise InputError(f"run {name!r} is finished; nothing to resume")
        return self.start_run({"output": str(run_dir)}, resume=True)

    def close(self) -> None:
        """Stop training processes the app started (on shutdown)."""
        for proc in self._procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)

    def status(self, name: str) -> RunStatus:
        run_dir = self.path("runs", safe_name(name, "run"))
        if not (run_dir / "train.json").is_file():
            raise InputError(f"run {name!r} does not exist")
        st = RunStatus(name, "queued", total=int(json.loads((run_dir / "train.json").read_text()).get("steps", 0)))
        losses: dict[int, float] = {}
        last_event = ""
        progress = run_dir / "progress.jsonl"
        if progress.is_file():
            for line in progress.read_text().splitlines():
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:
                    continue  # a line being written
                st.total = rec.get("total", st.total)
                if "event" in rec:
                    last_event = rec["event"]
                    st.step = rec["step"] if rec["event"] in ("start", "cancelled", "done") else st.step
                else:
                    st.step = rec["step"]
                    losses[rec["step"]] = rec["loss"]
        st.losses = sorted(losses.items())
        st.validation = [str(p) for p in sorted((run_dir / "validation").glob("step-*.png"))]
        proc = self._procs.get(name)
        alive = proc is not None and proc.poll() is None
        if (run_dir / "adapter.safetensors").is_file() and last_event == "done" and not alive:
            st.state = "done"
        elif alive:
            st.state = "running"
        elif last_event == "cancelled":
            st.state, st.message = "cancelled", f"cancelled at step {st.step}; a checkpoint is saved: Resume continues it"
        elif proc is not None and proc.returncode not in (0, None):
            st.state = "failed"
            st.message = _last_error(run_dir / "log.txt")
        elif progress.is_file():
            st.state, st.message = "interrupted", "the run stopped before its end; Resume continues from its last checkpoint"
        return st

    def collect(self, name: str) -> tuple[list[str], bool]:
        """Put a finished run's adapter(s) in the library, named after the run, with the last validation
        image as preview. Returns the library names and whether any was new (idempotent)."""
        run_dir = self.path("runs", safe_name(name, "run"))
        added, new = [], False
        previews = sorted((run_dir / "validation").glob("step-*.png"))
        for src in sorted(run_dir.glob("*.safetensors")):
            if src.name.endswith(EMB_SUFFIX):  # an adapter's token embeddings: copied with it
                continue
            stem = name if src.stem == "adapter" else f"{name}-{src.stem}"
            dest = self.path("adapters", f"{stem}.safetensors")
            if not dest.exists() and not (run_dir / ".collected").exists():
                new = True
                if embeddings_path(src).is_file():
                    _atomic_copy(embeddings_path(src), embeddings_path(dest))
                _atomic_copy(src, dest)
                if previews:
                    _atomic_copy(previews[-1], dest.with_suffix(".png"))
            added.append(stem)
        (run_dir / ".collected").touch()  # renamed or deleted later: not brought back
        return added, new

    # --- library ----------------------------------------------------------------------------------

    def adapters(self) -> list[dict[str, Any]]:
        rows = []
        for p in sorted((self.root / "adapters").glob("*.safetensors")):
            if p.name.endswith(EMB_SUFFIX):
                continue
            rows.append({"name": p.stem, **self.adapter_meta(p.stem)})
        return rows

    def adapter_file(self, name: str) -> Path:
        p = self.path("adapters", safe_name(name, "adapter") + ".safetensors")
        if not p.is_file():
            raise InputError(f"adapter {name!r} is not in the library")
        return p

    def adapter_meta(self, name: str) -> dict[str, Any]:
        meta = _studio_meta(self.adapter_file(name))
        size = self.adapter_file(name).stat().st_size
        return {"trainer": meta.get("trainer", ""), "base_model": meta.get("base_model", ""),
                "token": meta.get("token", ""), "class_noun": meta.get("class_noun", ""), "rank": meta.get("rank", ""),
                "steps": meta.get("steps", ""), "size_mb": round(size / 2**20, 2),
                "pivotal": bool(meta.get("extra", {}).get("pivotal"))}  # its token's embeddings in NAME_emb.safetensors

    def preview(self, name: str) -> str | None:
        p = self.adapter_file(name).with_suffix(".png")
        return str(p) if p.is_file() else None

    def rename(self, old: str, new: str) -> str:
        src = self.adapter_file(old)
        new = safe_name(new, "new name")
        dest = self.path("adapters", f"{new}.safetensors")
        if dest.exists():
            raise InputError(f"an adapter named {new!r} is already in the library")
        if embeddings_path(src).is_file():
            embeddings_path(src).rename(embeddings_path(dest))
        src.rename(dest)
        if src.with_suffix(".png").is_file():
            src.with_suffix(".png").rename(dest.with_suffix(".png"))
        return new

    def delete(self, name: str) -> None:
        src = self.adapter_file(name)
        src.with_suffix(".png").unlink(missing_ok=True)
        embeddings_path(src).unlink(missing_ok=True)
        src.unlink()

    def export(self, name: str, layout: str) -> list[Path]:
        """A library adapter in ``layout``: the file, and its token embeddings' file if it has any."""
        from studio.adapters import LAYOUTS, load_adapter, save_adapter

        if layout not in LAYOUTS:
            raise InputError(f"layout {layout!r} is not known; choose one of {', '.join(LAYOUTS)}")
        out = self.path("exports", f"{safe_name(name, 'adapter')}.{layout}.safetensors")
        save_adapter(load_adapter(self.adapter_file(name)), out, layout=layout)
        return [out] + ([embeddings_path(out)] if embeddings_path(out).is_file() else [])

    def resize(self, name: str, rank: int) -> tuple[str, dict[str, float]]:
        """A lower-rank copy of a library adapter (``studio resize``) in the library as ``NAME-rRANK``, with its
        preview; returns the new name and what each layer kept."""
        from studio.adapters import load_adapter, save_adapter
        from studio.adapters.resize import resize

        src = self.adapter_file(name)
        new = f"{src.stem}-r{rank}"
        dest = self.path("adapters", f"{new}.safetensors")
        if dest.exists():
            raise InputError(f"an adapter named {new!r} is already in the library; rename or delete it first")
        try:
            small, kept = resize(load_adapter(src), rank)
        except ValueError as e:
            raise InputError(str(e)) from None
        save_adapter(small, dest)
        if src.with_suffix(".png").is_file():
            _atomic_copy(src.with_suffix(".png"), dest.with_suffix(".png"))
        return new, kept

    def import_adapters(self, files: list[tuple[str, str | Path]]) -> list[str]:
        """Add uploaded adapter files to the library: ``(the name the user's file had, where it lies)`` each.
        Safetensors only (a pickle is refused unread); a pivotal adapter comes with its token embeddings,
        ``NAME_emb.safetensors``, in the same upload. Each adapter is checked by loading it (with its embeddings)
        and copied in under its own name. All or nothing: one refused file and none is added."""
        from studio.adapters import load_adapter

        adapters, embeddings = {}, {}
        for orig_name, tmp in files:
            base = safe_name(orig_name, "file name")
            if Path(base).suffix.lower() != ".safetensors":
                raise InputError(f"file {orig_name!r} is refused: only .safetensors adapters can be imported")
            if os.path.getsize(tmp) > MAX_ADAPTER_BYTES:
                raise InputError(f"file {orig_name!r} is larger than {MAX_ADAPTER_BYTES // 2**30} GB")
            group = embeddings if base.endswith(EMB_SUFFIX) else adapters
            name = base.removesuffix(EMB_SUFFIX) if group is embeddings else Path(base).stem
            if name in group:
                raise InputError(f"file {orig_name!r} is uploaded twice")
            group[name] = (orig_name, tmp)
        lone = [orig for name, (orig, _) in embeddings.items() if name not in adapters]
        if lone:
            raise InputError(f"file {lone[0]!r} holds the token embeddings of an adapter"
                             f" {lone[0].removesuffix(EMB_SUFFIX)}.safetensors: upload the two together")
        if not adapters:
            raise InputError("no adapter file: upload NAME.safetensors (with NAME_emb.safetensors for a pivotal adapter)")
        taken = [n for n in adapters if self.path("adapters", f"{n}.safetensors").exists()]
        if taken:
            raise InputError(f"an adapter named {taken[0]!r} is already in the library; rename it first")
        staged: dict[str, Path] = {}
        try:
            for name, (orig_name, tmp) in adapters.items():
                stage = self.path("adapters", f".import-{os.getpid()}-{time.time_ns()}-{len(staged)}.safetensors")
                staged[name] = stage
                shutil.copyfile(tmp, stage)
                if name in embeddings:
                    shutil.copyfile(embeddings[name][1], embeddings_path(stage))
                try:
                    load_adapter(stage)
                except (ValueError, FileNotFoundError, KeyError) as e:
                    if name not in embeddings and _studio_meta(stage, quiet=True).get("extra", {}).get("pivotal"):
                        raise InputError(f"file {orig_name!r} was trained with pivotal tuning: upload its token"
                                         f" embeddings, {name}{EMB_SUFFIX}, with it") from None
                    raise InputError(f"file {orig_name!r} is not a LoRA adapter this studio reads:"
                                     f" {str(e).replace(str(stage.parent) + os.sep, '').replace(stage.stem, name)}") from None
            for name, stage in staged.items():  # the embeddings first: a library adapter never lacks its own
                if embeddings_path(stage).is_file():
                    embeddings_path(stage).rename(embeddings_path(self.path("adapters", f"{name}.safetensors")))
                stage.rename(self.path("adapters", f"{name}.safetensors"))
        finally:
            for stage in staged.values():
                stage.unlink(missing_ok=True)
                embeddings_path(stage).unlink(missing_ok=True)
        return list(adapters)

    # --- outputs ----------------------------------------------------------------------------------

    def output_path(self, seed: int) -> Path:
        return self.path("outputs", f"{time.strftime('%Y%m%d-%H%M%S')}-{time.time_ns() % 10**9:09d}-s{seed}.png")


def _studio_meta(path: Path, quiet: bool = False) -> dict[str, Any]:
    """The studio's metadata in the adapter file's header (``{}`` for a file from elsewhere); with ``quiet``, also
    ``{}`` for a file whose header cannot be read."""
    from studio.adapters.files import STUDIO_KEY, _header

    try:
        meta = json.loads(_header(path).get(STUDIO_KEY, "{}") or "{}")
    except ValueError:
        if not quiet:
            raise
        return {}
    return meta if isinstance(meta, dict) else {}


def _atomic_copy(src: Path, dest: Path) -> None:
    tmp = dest.with_name(f".{dest.name}.tmp")
    shutil.copyfile(src, tmp)
    tmp.replace(dest)


def _last_error(log: Path) -> str:
    if not log.is_file():
        return "the trainer exited without a log"
    lines = [line for line in log.read_text(errors="replace").splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error:")]
    return (errors or lines or ["the trainer failed"])[-1][:500]
