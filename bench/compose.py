"""Composition benchmark: several held-out concepts in one image, each composer against the naive sum.

Concepts, each a DreamBooth-LoRA trained with the default settings on 4 renders (as in
bench/dreambooth.py) under its own token: star (blue, "sks"), heart (red, "zwx"), cross (green, "qpv"),
and a style: shadowed ("zxy", 4 base shapes drawn shadowed, captions naming the token, trained at lr 1e-3,
``STYLE_LR``; ``--style`` another). Compositions:

- two subject pairs, "a sks shape on the left and a zwx shape on the right" (regions: boxes around each place,
  ``BOXES``);
- a subject triple, left / center / right;
- subject + style, "a large sks shape in the center, zxy" (the style a style concept, ``Concept.style``: the placing
  composers leave it out of their routing and it acts everywhere; "large" as in the style's captions: the judge
  reads a drop shadow only on a large object);
- the pairs and the triple again, described: each subject named with its training images' colour, "a blue sks
  shape on the left and a red zwx shape on the right", as a user names a subject with a word the base model
  knows ("a sks dog"). On the embedded model only its own words (colours, base shapes) have cross-attention
  maps that lie on their object; CLoRA's masks come from those maps.

Each composition is sampled with 20 seeds per method. The judge reads every image. A subject is found by
identity: an object is the composition's subject whose reference renders its judge embedding is most
similar to, if that similarity clears the subject's threshold (calibrated first on 20 solo images per adapter
at each place a composition uses, "a TOKEN shape on the left / in the center / on the right", against the base
model's objects at those places and the other adapters' solo objects, at the best TPR - FPR, halfway between
the weakest positive kept and the next value below; for the described compositions, on described prompts, "a red zwx
shape on the left", against the base model's "a red shape on the left" for every subject's colour: the base model
alone draws a red shape that reads as the heart by the undescribed threshold). The older colour reading is reported beside it: a
subject counts by the modal colour its adapter draws alone (in a described composition: by the colour the
prompt names).

- **all present** (vanishing): every concept shows up somewhere (a subject by identity / by colour; the
  style by the style head);
- **correct per region** (confusion): the concept's region holds its subject and none of the other
  subjects (for the style: the subject's object has the style);
- **identity margin**: for each subject region, the best object's identity similarity to its own
  references minus that to the other subjects' references;
- **prompt fidelity**: the judge's fidelity to the prompt with class nouns ("a shape on the left and a
  shape on the right"), i.e. the positions;
- **s / image**: sampling time per image, batches of 10.

Methods: ``naive``, ``clora`` (the official form: one pass per LoRA with its own prompt, noise predictions of both
guidance halves mixed by masks from its cross-attention maps; step size 20; with the studio's default
``regions=True`` each mask kept inside its concept's box), ``clora-no-regions`` (the same with the boxes ignored: the
paper's masks over the whole image; ``clora`` before 2026-12-07), ``clora-prompt-half`` (only the prompt
half mixed, the negative half the base model's: the studio's form until 2026-12-04; not run by default),
``clora-layout`` (the studio's variant: masks from the base pass's maps of each concept's placing words, "left"),
``clora-gates`` (one pass, each adapter gated by its mask inside the UNet),
``clora-s200`` (step size 200; not run by default), ``clora-refine`` and ``clora-refine-s100`` (the paper's
iterative refinement: 10 updates at steps 0, 20% and 40% of the schedule, step size 20 or 100; not run by default), ``lora-composer`` (replace_ratio 1, the official default),
``lora-composer-r0.5`` (half the global prompt's output kept inside the boxes), ``lora-composer-pos``
(replace_ratio 1, each region prompt is the global prompt's clause naming the concept: "a sks shape on the left";
the studio's default; not run by default, its parts turned off one at a time: ``lora-composer-cross``, adapters on
cross-attention only, ``lora-composer-no-isolation``, ``lora-composer-no-reinit``, and ``lora-composer-pos-r0.5``, half
the global prompt's cross-attention output kept inside the boxes), ``lora-composer-pos-pipeline-negative`` (the boxes'
negative half the pipeline's own, zeros on the embedded model, instead of the encoded ""), ``naive-empty-negative``
(its control: the naive sum with the encoded "" as the negative prompt of the whole image; not run by default),
``gated`` (training-free token gates), ``gated-fit`` (gates trained 100 steps on the
concepts' own images first; that time is not counted), ``orthogonal``. Not run by default: ``clora-colour``
(CLoRA whose concepts, in a described composition, watch their colour word too: ``words`` "sks blue shape"
instead of "sks shape"), ``clora-exclusive`` (CLoRA with each pixel of overlapping masks given to the concept
whose normalised map is highest, instead of shared), ``clora-t0.2`` (CLoRA's masks above 0.2 of each map's range
instead of the official 0.4: wider masks), ``clora-clause-exclusive`` (each concept's tokens widened to its
clause's content words, "sks shape left", and each pixel given to one concept), ``clora-layout-prompt-half``, ``clora-token`` (each concept watches its identifier alone, "sks", not the class
noun: with ``--pivotal`` the identifier is one token of its own).
``--attention-loss W`` trains the
subjects' adapters with that attention-loss weight (in their own ``--work`` folder) and writes its own section;
so do ``--subject-steps N`` (the subjects' adapters trained N steps instead of the default), ``--pivotal`` (the
subjects' adapters trained with pivotal tuning: each identifier one new token with a learned embedding) and ``--subjects A B C``
(three other held-out shapes in the roles of star, heart and cross; ``--subjects crescent heart cross``), and
``--placed-references`` (the subjects' training images drawn at the compositions' places, left, center, right and
center, instead of all in the center).

    python bench/compose.py                       # all methods, 20 seeds
    python bench/compose.py --seeds 4 --methods naive lora-composer
    python bench/compose.py --methods naive clora clora-colour --compositions "star + heart + cross, described"

Prints a table and writes the ``compose`` section of docs/benchmarks.md (with ``--compositions``, only under a
``--label``, in a section of its own: a part of the table does not replace the whole).
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from dreambooth import COLOURS, defaults, references  # noqa: E402
from report import git_revision, machine, write_section  # noqa: E402

TOKENS = ["sks", "zwx", "qpv"]  # the first, second and third subject's identifiers
SUBJECTS = {"star": ("sks", "blue"), "heart": ("zwx", "red"), "cross": ("qpv", "green")}  # --subjects replaces it
DEFAULT_SUBJECTS = dict(SUBJECTS)

STYLE, STYLE_TOKEN = "shadowed", "zxy"  # --style replaces the style (a world style name)
DEFAULT_STYLE = STYLE
# the style adapter's learning rate (--style-lr), 10x the DreamBooth default, as bench/style_probe.py's style adapters:
# at 1e-4 the shadowed adapter drew its shadow on no subject (naive 0.00 on "a large sks shape in the center on a
# white background, zxy"), at 1e-3 on all 10 seeds
STYLE_LR = DEFAULT_STYLE_LR = 1e-3
STYLE_SHAPES = [("circle", "orange"), ("square", "cyan"), ("triangle", "pink"), ("diamond", "yellow")]
# regions are boxes around where each object goes (the layout a user draws), leaving background to the
# global prompt: the judge's left / center / right cells are the middle row's thirds
BOXES = {"left": (0.0, 0.2, 0.4, 0.8), "center": (0.3, 0.2, 0.7, 0.8), "right": (0.6, 0.2, 1.0, 0.8)}
COLUMNS = {"left": {"top left", "left", "bottom left"}, "center": {"top", "center", "bottom"},
           "right": {"top right", "right", "bottom right"}}
PHRASE = {"left": "on the left", "center": "in the center", "right": "on the right"}
REFERENCE_PLACES: list[str] = []  # where the subjects' training images draw them; none given: in the center
METHODS = ["naive", "clora", "clora-no-regions", "clora-layout", "clora-gates", "lora-composer", "lora-composer-r0.5", "lora-composer-pos",
           "lora-composer-pos-pipeline-negative", "gated",
           "gated-fit", "orthogonal"]
VARIANTS = {  # method name in the table -> (composer, options)
    "clora-no-regions": ("clora", {"regions": False}),  # the paper's form: masks from the maps over the whole image
    "clora-s200": ("clora", {"step_size": 200.0}),
    "clora-gates": ("clora", {"mixing": "gates"}),  # one pass, each adapter gated by its mask inside the UNet
    "clora-clause": ("clora", {"clause_words": True}),
    "clora-exclusive": ("clora", {"exclusive": True}),  # each pixel to one concept: the highest normalised map
    "clora-t0.2": ("clora", {"threshold": 0.2}),  # wider masks: above 0.2 of each map's range (the official 0.4)
    "clora-colour": ("clora", {}),  # its concepts' words take their colour where the prompt names one (below)
    "clora-token": ("clora", {}),  # its concepts' words are their identifiers alone, without the class noun (below)
    "clora-clause-s200": ("clora", {"clause_words": True, "step_size": 200.0}),
    "clora-clause-exclusive": ("clora", {"clause_words": True, "exclusive": True}),
    "clora-layout": ("clora", {"layout": True}),
    # layout masks, each pixel to the concept whose placing word's map is highest there (no shared pixels)
    "clora-layout-exclusive": ("clora", {"layout": True, "exclusive": True}),
    # the paper's iterative refinement (Attend-and-Excite's schedule: steps 0, 10 and 20 of 50): 10 updates there
    "clora-refine": ("clora", {"refine_steps": (0.0, 0.2, 0.4), "refine_iterations": 10}),
    "clora-refine-s100": ("clora", {"refine_steps": (0.0, 0.2, 0.4), "refine_iterations": 10, "step_size": 100.0}),
    "clora-reinit": ("clora", {"reinit": True}),  # LoRA-Composer's latent re-initialisation before the first step
    "clora-prompt-half": ("clora", {"guided": False}),  # the negative half stays the base model's
    "clora-layout-prompt-half": ("clora", {"layout": True, "guided": False}),  # masks from the base pass's maps of each clause's placing words
    "lora-composer": ("lora-composer", {"positional_prompts": False}),  # the official: the concept's own prompt
    "lora-composer-r0.5": ("lora-composer", {"replace_ratio": 0.5, "positional_prompts": False}),
    "lora-composer-pos": ("lora-composer", {}),  # the studio's default: the global prompt's clause naming the concept
    "lora-composer-cross": ("lora-composer", {"scope": "cross"}),  # adapters only on cross-attention's k/v/out
    "lora-composer-no-isolation": ("lora-composer", {"isolate": False}),  # self-attention not isolated between boxes
    "lora-composer-no-reinit": ("lora-composer", {"reinit": False}),  # no latent re-initialisation
    "lora-composer-pos-r0.5": ("lora-composer", {"replace_ratio": 0.5}),  # half the global prompt's output kept in the boxes
    # the boxes' negative half the pipeline's own (zeros on the embedded model) instead of the encoded ""
    "lora-composer-pos-pipeline-negative": ("lora-composer", {"negative": "pipeline"}),
    # the control for lora-composer's boxes: the naive sum with the encoded "" as the whole image's negative prompt
    # (the pipeline feeds zeros for none)
    "naive-empty-negative": ("naive", {}),
}
NEGATIVE_PROMPTS = {"naive-empty-negative": ""}  # method -> the negative prompt it samples with (default: none)

# (name, [(concept, place)], style?, described?) ; place picks the region and the judge's column. A described
# composition names each subject with the colour of its training images ("a blue sks shape on the left"), as a
# user names a subject with a word the base model knows ("a sks dog"): on the embedded model only such words
# (colours, base shapes) have cross-attention maps that lie on their object, which CLoRA's masks need
ROLES = [  # (name pattern, [(subject index, place)], style?, described?)
    ("{0} + {1}", [(0, "left"), (1, "right")], False, False),
    ("{2} + {1}", [(2, "left"), (1, "right")], False, False),
    ("{0} + {1} + {2}", [(0, "left"), (1, "center"), (2, "right")], False, False),
    ("{0} + {style} style", [(0, "center")], True, False),
    ("{0} + {1}, described", [(0, "left"), (1, "right")], False, True),
    ("{2} + {1}, described", [(2, "left"), (1, "right")], False, True),
    ("{0} + {1} + {2}, described", [(0, "left"), (1, "center"), (2, "right")], False, True),
]


def compositions_of(shapes: list[str]) -> list:
    return [(name.format(*shapes, style=STYLE), [(shapes[i], place) for i, place in items], style, described)
            for name, items, style, described in ROLES]


COMPOSITIONS = compositions_of(list(SUBJECTS))


def subject_dir(work: Path, shape: str) -> Path:
    """The subject's folder (references and adapter); a shape under another token than the default trains apart."""
    token = SUBJECTS[shape][0]
    return work / (shape if DEFAULT_SUBJECTS.get(shape, (None,))[0] == token else f"{shape}-{token}")

def prompt_of(items, style: bool, noun: bool = False, described: bool = False) -> str:
    """The composition's prompt (with tokens), or with class nouns only for the fidelity check; ``described``
    puts each subject's training colour before it; a composition with the style draws its subject large, as the
    style's captions do."""
    parts = [f"a {'large ' if style else ''}{COLOURS[c] + ' ' if described else ''}{'' if noun else SUBJECTS[c][0] + ' '}shape {PHRASE[p]}"
             for c, p in items]
    text = " and ".join(parts)  # the grammar's form for several objects
    return text + (f", {STYLE_TOKEN}" if style and not noun else "")


def style_dir(work: Path) -> Path:
    """The style concept's folder (images and adapter), by style and learning rate."""
    return work / f"{STYLE}-lr{STYLE_LR:g}"


def train_concepts(work: Path, extra: dict | None = None, subject_extra: dict | None = None) -> dict[str, Path]:
    """Train (or reuse) every concept's adapter (default settings, updated by ``extra``, and for the subjects by
    ``subject_extra`` too); returns name -> adapter file."""
    from studio.trainers.config import build_config
    from studio.trainers.dreambooth import DreamBooth, DreamBoothConfig
    from studio.trainers.loop import train

    from studio.world.grammar import parse_prompt, scene_from_prompt
    from studio.world.render import render_array

    files = {}
    for shape, (token, _) in SUBJECTS.items():
        run = subject_dir(work, shape)
        if not (run / "run" / "adapter.safetensors").is_file():
            references(shape, run / "data", places=REFERENCE_PLACES)
            train(DreamBooth(), build_config(DreamBoothConfig, {}, {"data": str(run / "data"), "output": str(run / "run"),
                                                                    "token": token, "class_data": str(work / "class"),
                                                                    **(extra or {}), **(subject_extra or {})}))
        files[shape] = run / "run" / "adapter.safetensors"
    run = style_dir(work)
    if not (run / "run" / "adapter.safetensors").is_file():
        from PIL import Image

        (run / "data").mkdir(parents=True, exist_ok=True)
        for i, (s, c) in enumerate(STYLE_SHAPES):
            text = f"a large {c} {s} in the center on a white background, {STYLE}"
            Image.fromarray(render_array(scene_from_prompt(parse_prompt(text), random.Random(4000 + i)), seed=4000 + i)).save(
                run / "data" / f"{i}.png")
            (run / "data" / f"{i}.txt").write_text(f"a large {c} {s} in the center on a white background, {STYLE_TOKEN}")
        train(DreamBooth(), build_config(DreamBoothConfig, {}, {"data": str(run / "data"), "output": str(run / "run"),
                                                                "token": STYLE_TOKEN, "class_noun": "style", "lr": STYLE_LR,
                                                                "class_data": str(work / "class-style"), **(extra or {})}))
    files[STYLE] = run / "run" / "adapter.safetensors"
    return files


def best_objects(judge, images) -> list:
    """The most confident object the judge reads in each image (images with none are left out)."""
    return [max(r.objects, key=lambda o: o.confidence) for r in judge.read(images) if r.objects]


def similarity(refs, obj_embedding) -> float:
    """Identity similarity of one object to a subject: mean cosine to the subject's reference embeddings."""
    import numpy as np

    return float(np.mean(refs @ obj_embedding))


def youden_threshold(positives: list[float], negatives: list[float]) -> tuple[float, float, float]:
    """The similarity threshold that best separates ``positives`` from ``negatives`` (max TPR - FPR); returns
    (threshold, TPR, FPR). The threshold lies halfway between the lowest positive it keeps and the highest value
    below that (the widest margin giving the same TPR and FPR), not on that positive itself: a threshold on the
    weakest solo object would miss any object drawn a little less like its references."""
    import numpy as np

    pos, neg = np.asarray(positives), np.asarray(negatives)
    best = (float("inf"), 0.0, 0.0)
    for t in sorted(set(positives)):
        tpr, fpr = float((pos >= t).mean()), float((neg >= t).mean()) if len(neg) else 0.0
        if tpr - fpr > best[1] - best[2]:
            best = (float(t), tpr, fpr)
    below = [v for v in [*positives, *negatives] if v < best[0]]
    return ((best[0] + max(below)) / 2 if below else best[0]), best[1], best[2]


def calibrate(refs, positives: dict, negatives: list, label: str = "") -> tuple[dict, dict]:
    """Each subject's identity threshold (``youden_threshold``): its own objects in ``positives`` against the
    ``negatives`` (the base model's objects) and the other subjects' objects; returns (thresholds, subject ->
    (threshold, TPR, FPR))."""
    thresholds, calibration = {}, {}
    for shape in positives:
        def sim(objs, shape=shape):
            return [similarity(refs[shape], o.embedding) for o in objs]

        others = sim(negatives) + [x for other in positives if other != shape for x in sim(positives[other])]
        t, tpr, fpr = youden_threshold(sim(positives[shape]), others)
        thresholds[shape], calibration[shape] = t, (t, tpr, fpr)
        print("identity", label, shape, f"threshold {t:.3f} TPR {tpr:.2f} FPR {fpr:.2f}", flush=True)
    return thresholds, calibration


def identity_of(obj, names, refs, thresholds):
    """Which of ``names`` the object is by identity: the subject whose references it is most similar to, if that
    similarity clears the subject's threshold; else None."""
    sims = {c: similarity(refs[c], obj.embedding) for c in names}
    c = max(sims, key=sims.get)
    return c if sims[c] >= thresholds[c] else None


def score(judge, images, items, style: bool, refs, thresholds, described: bool = False) -> dict:
    import numpy as np

    from studio.eval.fidelity import prompt_fidelity
    from studio.world.grammar import parse_prompt

    readings = judge.read(images)
    fidelity_prompt = parse_prompt(prompt_of(items, style, noun=True, described=described))
    # by colour: the colour the adapter draws alone, or in a described prompt the colour the prompt names
    colours = {c: COLOURS[c] if described else SUBJECTS[c][1] for c, _ in items}
    names = [c for c, _ in items]
    rates = {k: [] for k in ("present", "correct", "present_colour", "correct_colour")}
    margins, fid = [], []
    for reading in readings:
        fid.append(prompt_fidelity(reading, fidelity_prompt))
        who = [identity_of(o, names, refs, thresholds) for o in reading.objects]
        seen = {o.colour for o in reading.objects}
        present = [c in who for c in names]
        present_colour = [colours[c] in seen for c in names]
        if style:
            styled = any(o.style == STYLE for o in reading.objects)
            present.append(styled)
            present_colour.append(styled)
        rates["present"].append(all(present))
        rates["present_colour"].append(all(present_colour))
        for c, place in items:
            here = [(o, w) for o, w in zip(reading.objects, who) if o.position in COLUMNS[place]]
            others = {colours[o] for o in names if o != c}
            rates["correct"].append(any(w == c for _, w in here) and not any(w not in (c, None) for _, w in here))
            rates["correct_colour"].append(any(o.colour == colours[c] for o, _ in here)
                                           and not any(o.colour in others for o, _ in here))
            if style:
                rates["correct"].append(any(w == c and o.style == STYLE for o, w in here))
                rates["correct_colour"].append(any(o.colour == colours[c] and o.style == STYLE for o, _ in here))
            if len(items) > 1 and here:
                best = max((o for o, _ in here), key=lambda o: o.confidence).embedding
                own = similarity(refs[c], best)
                other = max(similarity(refs[o], best) for o in names if o != c)
                margins.append(own - other)
    mean = lambda xs: float(np.mean(xs)) if xs else float("nan")  # noqa: E731
    return {**{k: mean(v) for k, v in rates.items()}, "margin": mean(margins), "fidelity": mean(fid)}


def main() -> None:
    import torch
    from studio.composers import Concept, compose

    from studio.eval.judge import load_judge
    from studio.families import EMBEDDED_MODEL, load_pipeline

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=20)
    parser.add_argument("--methods", nargs="*", default=METHODS)
    parser.add_argument("--work", default="runs/bench-compose")
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--train-text-encoder", action="store_true",
                        help="train the adapters with LoRA on the text encoders too (in their own --work folder)")
    parser.add_argument("--attention-loss", type=float, default=0.0,
                        help="train the subjects' adapters with this attention-loss weight (their token's"
                             " cross-attention map pulled onto the subject), in their own --work folder")
    parser.add_argument("--subject-steps", type=int, default=None,
                        help="train the subjects' adapters for this many steps instead of the default, in their own"
                             " --work folder")
    parser.add_argument("--pivotal", action="store_true",
                        help="train the subjects' adapters with --pivotal (each identifier one new token whose embedding"
                             " trains beside the LoRA), in their own --work folder")
    parser.add_argument("--placed-references", action="store_true",
                        help="render the subjects' training images at the compositions' places (left, center, right,"
                             " center) instead of all in the center, in their own --work folder")
    parser.add_argument("--style", default=DEFAULT_STYLE, metavar="NAME",
                        help=f"the style concept's world style (default {DEFAULT_STYLE}, held out; a base style such as dotted,"
                             " which the base model draws, tests the composers apart from how well a style is learnt)")
    parser.add_argument("--style-lr", type=float, default=DEFAULT_STYLE_LR,
                        help=f"the style adapter's learning rate (default {DEFAULT_STYLE_LR:g}; 1e-4, the DreamBooth default,"
                             " was the bench's before 2026-12-07)")
    parser.add_argument("--clora-step", type=float, default=None, help="CLoRA's latent step size (default: the composer's)")
    parser.add_argument("--label", default="", help="a suffix for the section's name and title (e.g. regions), so"
                                                     " that a run of some methods writes a section of its own")
    parser.add_argument("--compositions", nargs="*", default=None, metavar="NAME",
                        help="run only these compositions (by name, e.g. 'star + heart + cross, described'); the"
                             " table is then printed, and written to docs/benchmarks.md only under a --label")
    parser.add_argument("--subjects", nargs=3, default=list(SUBJECTS), metavar="SHAPE",
                        help=f"the three held-out shapes (tokens {', '.join(TOKENS)} in this order; default:"
                             f" {' '.join(SUBJECTS)}); other subjects than the default train in their own folders")
    args = parser.parse_args()
    global COMPOSITIONS, STYLE, STYLE_LR
    if len(set(args.subjects)) != 3 or any(s not in COLOURS for s in args.subjects):
        raise SystemExit(f"--subjects: three different shapes from {sorted(COLOURS)}; got {args.subjects}")
    SUBJECTS.clear()
    SUBJECTS.update({shape: (token, COLOURS[shape]) for shape, token in zip(args.subjects, TOKENS)})
    from studio.world.concepts import STYLES

    if args.style not in STYLES:
        raise SystemExit(f"--style: one of {', '.join(STYLES)}; got {args.style!r}")
    STYLE, STYLE_LR = args.style, args.style_lr
    COMPOSITIONS = compositions_of(args.subjects)
    names = [c[0] for c in COMPOSITIONS]
    unknown = [n for n in args.compositions or [] if n not in names]
    if unknown:
        raise SystemExit(f"--compositions: unknown {unknown}; choose from {names}")
    bad = [m for m in args.methods if m not in METHODS and m not in VARIANTS]
    if bad:
        raise SystemExit(f"--methods: unknown {bad}; choose from {list(dict.fromkeys(METHODS + list(VARIANTS)))}")
    if args.placed_references:
        REFERENCE_PLACES[:] = [PHRASE[p] for p in ("left", "center", "right", "center")]
    if ((args.attention_loss or args.subject_steps or args.train_text_encoder or args.pivotal or args.placed_references)
            and args.work == parser.get_default("work")):
        raise SystemExit("--attention-loss, --subject-steps, --pivotal, --placed-references and --train-text-encoder train other adapters than"
                         " the default: give them their own --work folder (the default one holds the default adapters)")
    torch.manual_seed(0)
    work = Path(args.work)
    files = train_concepts(work, {"train_text_encoder": True} if args.train_text_encoder else None,
                           {**({"attention_loss": args.attention_loss} if args.attention_loss else {}),
                            **({"steps": args.subject_steps} if args.subject_steps else {}),
                            **({"pivotal": True} if args.pivotal else {})} or None)
    judge = load_judge()
    pipe = load_pipeline(EMBEDDED_MODEL)
    pipe.set_progress_bar_config(disable=True)
    refs = {}
    for shape in SUBJECTS:
        emb = judge.identity_embedding(references(shape, subject_dir(work, shape) / "data", places=REFERENCE_PLACES))
        refs[shape] = emb.numpy()
    # each subject as its adapter draws it alone: its colour (the colour reading) and its objects' identity
    # similarities (the identity reading's positives); the base model's objects and the other subjects' are negatives
    from collections import Counter

    from studio.plugin import attach, detach
    from studio.sampling import generate

    # at every place the compositions use: a subject drawn on the left or right comes out smaller than in the
    # center, and its identity similarity lower (heart 0.96 in the center, 0.77 on the left, on the step-24,000
    # weights), so a threshold calibrated in the center alone misses the subjects of every composition
    places = [PHRASE[p] for p in PHRASE]

    def solo_images(prompt: str) -> list:
        with torch.no_grad():
            return [im for place in places for im in generate(pipe, [f"{prompt} {place}"] * args.seeds, seed=0,
                                                              steps=args.steps)]

    solo, solo_objects = {}, {}
    for shape, (token, _) in SUBJECTS.items():
        attach(pipe, [files[shape]])
        images = solo_images(f"a {token} shape")
        detach(pipe)
        solo_objects[shape] = best_objects(judge, images)
        colour, count = Counter(o.colour for o in solo_objects[shape]).most_common(1)[0]
        SUBJECTS[shape] = (token, colour)
        solo[shape] = (colour, count / len(images))
        print("alone", shape, colour, count / len(images), flush=True)
    base_objects = best_objects(judge, solo_images("a shape"))
    thresholds, calibration = calibrate(refs, solo_objects, base_objects)
    # a described composition names each subject's colour, and the base model alone draws "a red shape" that the
    # identity embedding holds close to the heart's red references: its thresholds are calibrated on described
    # prompts, the adapters' ("a red zwx shape ...") against the base model's drawing of every subject's colour
    # ("a red shape ...") and the other adapters' described objects, so that a subject counts only where it is drawn
    # more like its adapter than the colour alone makes it
    runs_described = any(d and (args.compositions is None or n in args.compositions) for n, _, _, d in COMPOSITIONS)
    thresholds_described, calibration_described = {}, {}
    if runs_described:
        described_objects = {}
        for shape, (token, _) in SUBJECTS.items():
            attach(pipe, [files[shape]])
            described_objects[shape] = best_objects(judge, solo_images(f"a {COLOURS[shape]} {token} shape"))
            detach(pipe)
        base_described = [o for shape in SUBJECTS for o in best_objects(judge, solo_images(f"a {COLOURS[shape]} shape"))]
        thresholds_described, calibration_described = calibrate(refs, described_objects, base_described, "described")
    rows = []
    for name, items, style, described in COMPOSITIONS:
        if args.compositions is not None and name not in args.compositions:
            continue
        concepts = [Concept.load(files[c], name=c, region=BOXES[p]) for c, p in items]
        if style:  # a style concept: the placing composers leave it out of their routing, acting everywhere
            concepts.append(Concept.load(files[STYLE], name=STYLE, style=True, words=STYLE_TOKEN,
                                         prompt=f"a shape, {STYLE_TOKEN}"))
        prompt = prompt_of(items, style, described=described)
        for method in args.methods:
            from studio.composers import get_composer

            if method == "gated-fit":  # gates trained for 100 steps on the concepts' own images (time not counted)
                composer = get_composer("gated")
                folders = [(subject_dir(work, c.name) if c.name in SUBJECTS else style_dir(work)) / "data" for c in concepts]
                composer.fit(pipe, concepts, folders, steps=100)
            elif method in VARIANTS:
                composer = get_composer(VARIANTS[method][0], **VARIANTS[method][1])
            else:
                composer = get_composer(method, **({"step_size": args.clora_step} if method == "clora" and args.clora_step else {}))
            t0 = time.time()
            images = []
            used = concepts
            if method == "clora-colour" and described:
                used = [Concept.load(files[c], name=c, region=BOXES[p], words=f"{SUBJECTS[c][0]} {COLOURS[c]} shape")
                        for c, p in items]
            elif method == "clora-token":
                used = [Concept.load(files[c], name=c, region=BOXES[p], words=SUBJECTS[c][0]) for c, p in items] + concepts[len(items):]
            for start in range(0, args.seeds, 10):
                images += compose(pipe, composer, prompt, used, seed=start, num=min(10, args.seeds - start),
                                  negative_prompt=NEGATIVE_PROMPTS.get(method),
                                  steps=args.steps, batch_size=10)
            seconds = (time.time() - t0) / len(images)
            r = score(judge, images, items, style, refs, thresholds_described if described else thresholds, described)
            rows.append((name, method, r, seconds))
            print(name, method, {k: round(v, 3) for k, v in r.items()}, f"{seconds:.2f} s/img", flush=True)
            from studio.sampling import image_grid

            grid_dir = work / "grids"
            grid_dir.mkdir(exist_ok=True)
            image_grid(images[:10], cols=10, scale=2).save(grid_dir / f"{name.replace(' + ', '-').replace(' ', '_')}-{method}.png")
    naive = {name: r for name, method, r, _ in rows if method == "naive"}
    naive_s = {name: s for name, method, _, s in rows if method == "naive"}
    head = ("| composition | method | all present (identity / colour) | correct per region (identity / colour) |"
            " identity margin | prompt fidelity | s / image | vs naive: present / correct (identity) / time |\n"
            "|---|---|---|---|---|---|---|---|\n")
    body = ""
    for name, method, r, s in rows:
        base = naive.get(name)
        vs = (f"{r['present'] - base['present']:+.2f} / {r['correct'] - base['correct']:+.2f} / {s / naive_s[name]:.2f}x"
              if base and method != "naive" else "")
        body += (f"| {name} | {method} | {r['present']:.2f} / {r['present_colour']:.2f} | {r['correct']:.2f} / "
                 f"{r['correct_colour']:.2f} | {r['margin']:.3f} | {r['fidelity']:.2f} | {s:.2f} | {vs} |\n")
    described_names = {name for name, _, _, described in COMPOSITIONS if described}
    avg = lambda v, k: sum(x[k] for x in v) / len(v)  # noqa: E731
    summary = ""
    for label, group in (("the compositions named by token", False), ("the described compositions", True)):
        means = {}
        for name, method, r, _ in rows:
            if (name in described_names) == group:
                means.setdefault(method, []).append(r)
        if means:
            summary += (f"Means over {label}, present / correct, by identity (by colour): " + "; ".join(
                f"{m} {avg(v, 'present'):.2f} / {avg(v, 'correct'):.2f} ({avg(v, 'present_colour'):.2f} / "
                f"{avg(v, 'correct_colour'):.2f})" for m, v in means.items()) + ".\n\n")
    flags = "" if args.seeds == 20 else f" --seeds {args.seeds}"
    flags += f" --clora-step {args.clora_step}" if args.clora_step else ""
    flags += " --train-text-encoder" if args.train_text_encoder else ""
    flags += f" --attention-loss {args.attention_loss:g}" if args.attention_loss else ""
    flags += f" --subject-steps {args.subject_steps}" if args.subject_steps else ""
    flags += " --pivotal" if args.pivotal else ""
    flags += " --placed-references" if args.placed_references else ""
    flags += f" --style {STYLE}" if STYLE != DEFAULT_STYLE else ""
    flags += f" --style-lr {STYLE_LR:g}" if STYLE_LR != parser.get_default("style_lr") else ""
    flags += f" --work {args.work}" if args.work != "runs/bench-compose" else ""
    flags += f" --methods {' '.join(args.methods)}" if args.methods != METHODS else ""
    custom = list(SUBJECTS) != list(DEFAULT_SUBJECTS)
    flags += f" --subjects {' '.join(SUBJECTS)}" if custom else ""
    flags += f" --label {args.label}" if args.label else ""
    alone = ", ".join(f"{shape} {colour} ({rate:.2f} of images alone)" for shape, (colour, rate) in solo.items())
    calib = ", ".join(f"{shape} {t:.3f} (finds {tpr:.2f} of its solo objects, {fpr:.2f} of the others)"
                      for shape, (t, tpr, fpr) in calibration.items())
    described_text = "" if not calibration_described else (
        " In the described compositions the thresholds are calibrated the same way on described prompts (\"a blue sks"
        " shape on the left\", ...) against the base model's objects for every subject's colour (\"a blue shape on the"
        " left\", ...) and the other adapters' described objects, so that a subject counts only where it is drawn more"
        " like its adapter than its colour alone makes it (the base model's \"a red shape\" reads as the heart by the"
        " undescribed threshold): " + ", ".join(
            f"{shape} {t:.3f} (finds {tpr:.2f} of its described solo objects, {fpr:.2f} of the others)"
            for shape, (t, tpr, fpr) in calibration_described.items()) + ".")
    title = ("Composition: several concepts in one image" + (f" ({', '.join(SUBJECTS)})" if custom else "")
             + (", adapters trained with the attention loss" if args.attention_loss else "")
             + (f", subjects' adapters trained {args.subject_steps} steps" if args.subject_steps else "")
             + (", subjects' adapters with pivotal tuning" if args.pivotal else "")
             + (", subjects trained at the compositions' places" if args.placed_references else "")
             + (f", {STYLE} style" if STYLE != DEFAULT_STYLE else "")
             + (f", style lr {STYLE_LR:g}" if STYLE_LR != parser.get_default("style_lr") else "")
             + (f" ({args.label})" if args.label else ""))
    text = (f"## {title}\n\nCommand: `python bench/compose.py{flags}` (revision "
            f"{git_revision()}; {machine()}). {args.seeds} seeds per composition and method, {args.steps} steps, guidance 5. "
            f"Adapters: DreamBooth-LoRA, default settings ({defaults()}{'; plus LoRA on the text encoders' if args.train_text_encoder else ''}{f'; the subjects with --attention-loss {args.attention_loss:g}' if args.attention_loss else ''}{f'; the subjects {args.subject_steps} steps' if args.subject_steps else ''}{'; the subjects with --pivotal' if args.pivotal else ''}), one per concept ({', '.join(f'{c} `{t}`' for c, (t, _) in SUBJECTS.items())}, {STYLE} "
            f"style `zxy` at lr {STYLE_LR:g}, on 4 base shapes drawn {STYLE}), trained on {', '.join(f'{COLOURS[c]} {c}' + ('es' if c.endswith('s') else 's') for c in SUBJECTS)}"
            f"{(' (large, ' + ', '.join(REFERENCE_PLACES) + ', one place an image)') if REFERENCE_PLACES else ' (large, in the center)'}. "
            f"Regions (for lora-composer, and confining clora's masks): boxes around each object's place, {BOXES}; the"
            " style is a style concept (`Concept.style`): clora, lora-composer and gated do not place it, it acts"
            f" everywhere.\n\n{head}{body}\n{summary}"
            "A subject is read two ways (a prompt never names its shape, and one named by token not its colour either: only its adapter can put them there). "
            "**By identity** (the headline rates): an object is the composition's subject whose reference renders its "
            "judge embedding is most similar to, if that similarity clears the subject's threshold, calibrated on "
            f"{args.seeds} solo images per adapter at each place (\"a TOKEN shape on the left / in the center / on the "
            "right\", positives; a subject drawn at the side comes out smaller and less like its references) against "
            "the base model's objects and the other adapters' solo objects (negatives), at the best TPR - FPR, halfway between "
            "the weakest positive kept and the next value below: "
            f"{calib}.{described_text} **By colour** (the earlier reading): the colour its adapter draws alone: {alone}; in the "
            "described compositions the colour the prompt names. "
            "The style is read by the judge's style head in both. Grids of the first 10 seeds: "
            f"`{args.work}/grids/`.\n")
    print(text)
    if args.compositions is None or args.label:  # a part of the table writes only a section of its own
        write_section("compose" + ("-" + "-".join(SUBJECTS) if custom else "")
                      + ("-attention-loss" if args.attention_loss else "")
                      + (f"-steps{args.subject_steps}" if args.subject_steps else "")
                      + ("-pivotal" if args.pivotal else "") + ("-placed" if args.placed_references else "")
                      + (f"-{STYLE}" if STYLE != DEFAULT_STYLE else "")
                      + (f"-style-lr{STYLE_LR:g}" if STYLE_LR != parser.get_default("style_lr") else "")
                      + (f"-{args.label}" if args.label else ""), text)


if __name__ == "__main__":
    main()
