"""Generation for the app: one pipeline per process, adapters attached per request and always removed.

The app queues requests (one worker per device by default); whoever calls, all sampling runs on one
thread of the engine's own, one request at a time. That thread also keeps torch's allocations in one
malloc arena instead of spreading them over the web server's many worker threads, which kept the
server's memory creeping up request after request. Each image is written to the data
folder's ``outputs/`` with its settings in the PNG's metadata: A1111's ``parameters`` text (read by
the usual PNG-info tools) and the settings as JSON under ``studio`` (:meth:`Settings.from_png`).
"""

from __future__ import annotations

import concurrent.futures
import contextvars
import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path

from studio.ui.workspace import InputError, Workspace

COMPOSERS = ("naive", "clora", "lora-composer", "gated", "orthogonal")


@dataclass
class Settings:
    """What one generation request asks for (also what each PNG carries in its metadata)."""

    prompt: str
    negative_prompt: str = ""
    seed: int = 0
    steps: int = 25
    guidance: float = 5.0
    width: int = 0  # 0: the model's native size
    height: int = 0
    num: int = 1
    adapters: list[dict] = field(default_factory=list)  # {"name", "weight", "region"[, "timesteps": "START:END"]}
    composer: str = "naive"

    def check(self, multiple: int) -> None:
        if not self.prompt.strip():
            raise InputError("prompt is empty; describe the image, e.g. 'a sks shape on the left'")
        if not 1 <= self.steps <= 200:
            raise InputError(f"steps {self.steps} is out of range; accepted: 1 to 200")
        if not 0 <= self.guidance <= 30:
            raise InputError(f"guidance {self.guidance} is out of range; accepted: 0 to 30")
        if not 1 <= self.num <= 8:
            raise InputError(f"images per request {self.num} is out of range; accepted: 1 to 8")
        for name, v in (("width", self.width), ("height", self.height)):
            if v and (v % multiple or not multiple <= v <= 2048):
                raise InputError(f"{name} {v} is refused; accepted: multiples of {multiple} from {multiple} to 2048")
        if self.composer not in COMPOSERS:
            raise InputError(f"composer {self.composer!r} is not known; choose one of {', '.join(COMPOSERS)}")
        if len({a["name"] for a in self.adapters}) != len(self.adapters):
            raise InputError("the same adapter is picked twice; pick each adapter once")
        from studio.composers import parse_place, parse_timesteps

        for a in self.adapters:
            if not -4 <= float(a.get("weight", 1.0)) <= 4:
                raise InputError(f"weight {a.get('weight')} of adapter {a['name']!r} is out of range; accepted: -4 to 4")
            try:
                parse_place(a.get("region") or None)  # a region, or style
                parse_timesteps(a.get("timesteps") or None)
            except ValueError as e:
                raise InputError(f"adapter {a['name']!r}: {e}") from None

    def parameters(self, model: str) -> str:
        """A1111-style ``parameters`` text."""
        lines = [self.prompt]
        if self.negative_prompt:
            lines.append(f"Negative prompt: {self.negative_prompt}")
        extra = [f"Steps: {self.steps}", f"CFG scale: {self.guidance}", f"Seed: {self.seed}", f"Model: {model}"]
        if self.width or self.height:
            extra.append(f"Size: {self.width}x{self.height}")
        if self.adapters:
            extra.append("Lora: " + " ".join(f"<{a['name']}:{a.get('weight', 1.0)}>" for a in self.adapters))
            extra.append(f"Composer: {self.composer}")
        return "\n".join(lines + [", ".join(extra)])

    @classmethod
    def from_dict(cls, data: dict) -> Settings:
        """Settings from their JSON form; unknown keys are an error naming them."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise InputError(f"unknown setting(s) {', '.join(unknown)}; accepted: {', '.join(sorted(known))}")
        return cls(**data)

    @classmethod
    def from_png(cls, path: str | Path) -> Settings:
        """The settings a PNG of the app carries (its ``studio`` text chunk)."""
        from PIL import Image

        with Image.open(path) as im:
            text = getattr(im, "text", {}).get("studio")
        if not text:
            raise InputError(f"{path} carries no studio settings (not an image the app made)")
        return cls.from_dict(json.loads(text))


class Engine:
    def __init__(self, workspace: Workspace):
        self.ws = workspace
        self._pipe = None
        self._worker = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="studio-engine")

    @property
    def pipe(self):
        if self._pipe is None:
            from studio.families import load_pipeline

            self._pipe = load_pipeline(self.ws.model)
            self._pipe.set_progress_bar_config(disable=True)
        return self._pipe

    def size_multiple(self) -> int:
        pipe = self.pipe
        return 2 ** (len(pipe.vae.config.block_out_channels) - 1) * 2 ** (len(pipe.unet.config.block_out_channels) - 1)

    def generate(self, settings: Settings, progress=None) -> list[Path]:
        """Images for ``settings``, written to ``outputs/``; ``progress(i, n)`` after each step."""
        context = contextvars.copy_context()  # the caller's (gradio's progress tracking lives there)
        return self._worker.submit(context.run, self._generate, settings, progress).result()

    def _generate(self, settings: Settings, progress=None) -> list[Path]:
        import torch
        from PIL.PngImagePlugin import PngInfo

        settings.check(self.size_multiple())  # loads the pipeline
        files = [self.ws.adapter_file(a["name"]) for a in settings.adapters]
        size = {"height": settings.height or None, "width": settings.width or None}
        callback = None
        if progress is not None:
            def callback(p, i, t, kwargs):
                progress(i + 1, settings.steps)
                return kwargs
        with torch.no_grad():
            if settings.adapters and (settings.composer != "naive" or any(a.get("region") or a.get("timesteps")
                                                                          for a in settings.adapters)):
                images = self._composed(settings, files, size)
            else:
                images = self._plain(settings, files, size, callback)
        outs = []
        for i, image in enumerate(images):
            meta = dataclasses.replace(settings, seed=settings.seed + i, num=1)
            info = PngInfo()
            info.add_text("parameters", meta.parameters(self.ws.model.name))
            info.add_text("studio", json.dumps(dataclasses.asdict(meta)))
            out = self.ws.output_path(meta.seed)
            tmp = out.with_name(f".{out.name}")
            image.save(tmp, format="PNG", pnginfo=info)
            tmp.replace(out)
            outs.append(out)
        return outs

    def _plain(self, s: Settings, files, size, callback):
        import torch

        from studio.plugin import attach, detach

        pipe = self.pipe
        if files:
            try:
                attach(pipe, files, weights=[float(a.get("weight", 1.0)) for a in s.adapters])
            except (ValueError, FileNotFoundError) as e:
                detach(pipe)
                raise InputError(str(e)) from None
        try:
            gens = [torch.Generator().manual_seed(s.seed + i) for i in range(s.num)]
            out = pipe(prompt=[s.prompt] * s.num, negative_prompt=[s.negative_prompt] * s.num if s.negative_prompt else None,
                       num_inference_steps=s.steps, guidance_scale=s.guidance, generator=gens, output_type="pil",
                       callback_on_step_end=callback, **size)
            return out.images
        finally:
            if files:
                detach(pipe)

    def _composed(self, s: Settings, files, size):
        from studio.composers import Concept, compose

        try:  # a region, or "style" for a style adapter (Concept.load reads both)
            concepts = [Concept.load(f, weight=float(a.get("weight", 1.0)), region=a.get("region") or None,
                                     timesteps=a.get("timesteps") or None) for f, a in zip(files, s.adapters)]
            return compose(self.pipe, s.composer, s.prompt, concepts, seed=s.seed, num=s.num, steps=s.steps,
                           guidance=s.guidance, negative_prompt=s.negative_prompt or None, **size)
        except (ValueError, FileNotFoundError) as e:
            raise InputError(str(e)) from None
