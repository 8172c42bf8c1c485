"""A synthetic corpus in the Vision-Flan release format, with answers that are true.

`synth_corpus(out, ...)` writes what `vlit corpus prepare --format vision-flan` reads:

    OUT/annotation.json      JSON array of {"id", "image", "task_name", "conversations"}
    OUT/images/img_NNNNN.png a pool of `image_pool` scenes; rows draw their image from it
    OUT/templates.yaml       task_name -> the instruction templates used for that task

Design, and why:

- Scenes. Image `i` is a scene of 1-4 shapes (kind, colour, position, size) and sometimes
  a short word, drawn from an RNG seeded by (seed, i) alone, so `scene_for(seed, i)` gives
  any image's ground truth without generating the corpus. Each shape has its own cell of
  a 3x3 grid (left/right/top/bottom/center) and a (kind, colour) pair unique in its scene,
  so "the shape on the left" and "the red circle" always name exactly one object. Shapes
  are drawn without anti-aliasing in exact palette colours, so pixels can check answers.
- Tasks. A question family (colour, counting, existence, multiple choice, ...) turns a
  scene into facts: slot values with the true answer. Task `i` is family `i mod F`, and
  its variant picks one question phrasing and one answer format of that family, so tasks
  are named like the release (`synth-shapes+color_identification_3`). Every task also has
  its own `templates_per_task` instruction templates, whose hint matches the task's
  answer format ("Answer yes or no."), so a model can learn what format is asked for.
  A family that no pool image can answer (text reading in a pool without text) is left out.
- Sizes. Task sizes follow Zipf weights over a seeded ranking of the tasks (long tail);
  every task gets at least one row when instances >= tasks, and they sum to `instances`.
  `family_weights` scales the weights of a family's tasks: a mix that leans toward some
  question types, as a real corpus's mixture weights do.
- Scale. 1.66M rows (the full release, ~1 GB of JSON) must stream: facts are computed
  once per (family, image), and memory is O(families x image_pool), not O(instances),
  apart from one int32 per row for the shuffled task order. The per-row choices are drawn
  with numpy in blocks; a row is only a few string formats. Rows are written in blocks
  of a few MB, because object-store streams are slow per small write.
- Determinism. Every random choice comes from an RNG seeded by a hash of (seed, purpose,
  ...), never from global state, so the same arguments give a byte-identical annotation.
"""
from __future__ import annotations

import hashlib
import io
import json
import random
import re
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import lru_cache
from typing import Callable, Iterable, Iterator

import numpy as np
import yaml
from PIL import Image, ImageDraw, ImageFont

from vlit import storage
from vlit.corpus.schema import IMAGE_TOKEN

SHAPES = ("circle", "square", "triangle")
PALETTE = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (240, 210, 40),
    "purple": (140, 60, 180),
    "orange": (245, 140, 30),
}
POSITIONS = ("left", "right", "top", "bottom", "center")
SIZES = ("small", "large")
WORDS = ("CAT", "DOG", "SUN", "BUS", "HAT", "ZOO", "MAP", "KEY", "BOX", "RUN", "OK", "HI")

# The grid cell (column, row) of each position; corners stay empty so a word in the
# top or bottom cell can spill sideways without touching a shape.
CELLS = {"left": (0, 1), "right": (2, 1), "top": (1, 0), "bottom": (1, 2), "center": (1, 1)}
WHERE = {
    "left": "on the left",
    "right": "on the right",
    "top": "at the top",
    "bottom": "at the bottom",
    "center": "in the center",
}
TEXT_POSITIONS = ("top", "bottom")
TEXT_PROBABILITY = 0.4
BACKGROUND = (255, 255, 255)
TEXT_COLOR = (0, 0, 0)
RADIUS = {"small": 0.25, "large": 0.45}  # half the shape's extent, in cell widths

NUMBER_WORDS = ("zero", "one", "two", "three", "four")
ZIPF_EXPONENT = 1.0
BLOCK_ROWS = 8192  # rows per write: a few MB of JSON
IMAGE_WRITERS = 16  # concurrent image writes

# Instruction templates: an intro, a hint matching the answer format, and a layout.
# Intros name no colour, shape kind or position, so the question alone says what is asked.
# Expert-style task definitions, as long as Vision-Flan's (its rows average ~610 bytes,
# its instructions ~260 characters), so a full-size synthetic release is about 1 GB.
INTROS = (
    "You are given a synthetic image made of simple flat figures drawn on a plain background. "
    "Look at the whole image carefully before you answer, and answer the question that follows.",
    "The picture below is a small drawing of geometric figures in solid colours. Each figure sits "
    "in its own part of the canvas. Read the question and answer it using only what is visible.",
    "In this task you will see an image of coloured figures and a question about them. Base your "
    "answer strictly on the image; do not guess beyond what can be seen in the drawing.",
    "Examine the image carefully. It contains one or more simple figures, and possibly a short word "
    "written in black letters. Then respond to the query below as precisely as you can.",
    "Here is a drawing of coloured figures arranged on a three-by-three grid. Inspect where each "
    "figure is, what shape and colour it has and how large it is, and answer the question.",
    "Study the drawing and respond to the query. The image was generated from a known scene "
    "description, so every question has exactly one correct answer that the image supports.",
    "Based on the image, answer the following. Pay attention to the colours, the kinds of figures, "
    "their sizes and their positions, since the question may ask about any of these properties.",
    "Inspect the scene and reply. You will be shown a simple synthetic picture; identify the "
    "relevant figure or text in it first, and then give the answer in the requested format.",
)
HINTS = {
    "word": ("Answer with one word.", "Reply with a single word."),
    "digits": ("Answer with a number in digits.", "Reply with the number only."),
    "phrase": ("Answer with a short phrase.", "Give a brief answer."),
    "sentence": ("Answer in a complete sentence.", "Respond with one full sentence."),
    "yesno": ("Answer yes or no.", "Reply with yes or no."),
    "text": ("Answer with the exact text.", "Copy the text exactly."),
    "choice": ("Answer with the option letter and its text.", "Choose the correct option."),
}
LAYOUTS = ("{intro}\n{input_text}\n{hint}", "{input_text}\n{intro} {hint}")
CHOICE_LAYOUTS = (
    "{intro}\n{input_text}\n\nOptions: {options}\n{hint}",
    "{input_text}\n\nOptions: {options}\n{intro} {hint}",
)


@dataclass(frozen=True)
class Shape:
    kind: str
    color: str
    position: str
    size: str

    @property
    def name(self) -> str:
        return f"{self.color} {self.kind}"


@dataclass(frozen=True)
class Scene:
    """Ground truth of one pool image."""

    shapes: tuple[Shape, ...]
    text: str | None = None
    text_position: str | None = None

    def count(self, kind: str | None = None, color: str | None = None) -> int:
        return sum(
            1 for s in self.shapes if kind in (None, s.kind) and color in (None, s.color)
        )

    def at(self, position: str) -> Shape | None:
        return next((s for s in self.shapes if s.position == position), None)


def _derive(seed: int, *purpose) -> int:
    """A 64-bit seed for one purpose: independent streams, no global RNG state."""
    digest = hashlib.sha256(repr((seed, *purpose)).encode()).digest()
    return int.from_bytes(digest[:8], "big")


def scene_for(seed: int, index: int) -> Scene:
    """The ground truth of pool image `index` of the corpus generated with `seed`."""
    rng = random.Random(_derive(seed, "scene", index))
    free = list(POSITIONS)
    text = text_position = None
    if rng.random() < TEXT_PROBABILITY:
        text_position = rng.choice(TEXT_POSITIONS)
        free.remove(text_position)
        text = rng.choice(WORDS)
    n = rng.randint(1, min(4, len(free)))
    objects = rng.sample([(k, c) for k in SHAPES for c in PALETTE], n)
    positions = sorted(rng.sample(free, n), key=POSITIONS.index)
    shapes = tuple(
        Shape(kind, color, position, rng.choice(SIZES))
        for (kind, color), position in zip(objects, positions)
    )
    return Scene(shapes, text, text_position)


@lru_cache(maxsize=8)
def _font(image_size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    return ImageFont.load_default(size=max(8, image_size // 6))


def render_scene(scene: Scene, image_size: int) -> Image.Image:
    image = Image.new("RGB", (image_size, image_size), BACKGROUND)
    draw = ImageDraw.Draw(image)
    cell = image_size / 3

    def center(position: str) -> tuple[float, float]:
        col, row = CELLS[position]
        return (col + 0.5) * cell, (row + 0.5) * cell

    for shape in scene.shapes:
        cx, cy = center(shape.position)
        r = RADIUS[shape.size] * cell
        fill = PALETTE[shape.color]
        if shape.kind == "circle":
            draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
        elif shape.kind == "square":
            draw.rectangle((cx - r, cy - r, cx + r, cy + r), fill=fill)
        else:
            draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=fill)
    if scene.text:
        draw.text(center(scene.text_position), scene.text, fill=TEXT_COLOR,
                  font=_font(image_size), anchor="mm")
    return image


def _png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


# ---------------------------------------------------------------- question families
# A fact is a dict of slot values for one question about one scene, answer included.
# Facts of one family share their slots, so any phrasing and answer format of the
# family can be filled from any of its facts.

Fact = dict[str, str]


def _pick_options(correct: str, pool: tuple[str, ...], n: int, rng: random.Random) -> Fact:
    """Multiple-choice slots, written like the release: `(a) x (b) y`, answered `(b) y`."""
    options = [correct, *rng.sample([p for p in pool if p != correct], n - 1)]
    rng.shuffle(options)
    letters = "abcdefgh"
    letter = letters[options.index(correct)]
    return {
        "options": " ".join(f"({letters[i]}) {o}" for i, o in enumerate(options)),
        "answer": f"({letter}) {correct}",
    }


def _count_slots(n: int, singular: str, plural: str) -> Fact:
    things = f"no {plural}" if n == 0 else f"{NUMBER_WORDS[n]} {singular if n == 1 else plural}"
    # The unit words stay in the fact, so `_other_counts` can phrase any other count.
    return {"n": str(n), "n_word": NUMBER_WORDS[n], "n_things": things, "unit": singular, "units": plural}


def _color_facts(scene: Scene, rng: random.Random) -> list[Fact]:
    return [
        {"where": WHERE[s.position], "color": s.color, "Color": s.color.capitalize()}
        for s in scene.shapes
    ]


def _shape_facts(scene: Scene, rng: random.Random) -> list[Fact]:
    return [
        {"where": WHERE[s.position], "kind": s.kind, "Kind": s.kind.capitalize()}
        for s in scene.shapes
    ]


def _object_count_facts(scene: Scene, rng: random.Random) -> list[Fact]:
    return [{"what": "shapes", **_count_slots(len(scene.shapes), "shape", "shapes")}]


def _kind_count_facts(scene: Scene, rng: random.Random) -> list[Fact]:
    return [{"what": f"{kind}s", **_count_slots(scene.count(kind=kind), kind, f"{kind}s")} for kind in SHAPES]


def _color_count_facts(scene: Scene, rng: random.Random) -> list[Fact]:
    present = sorted({s.color for s in scene.shapes}, key=list(PALETTE).index)
    absent = [c for c in PALETTE if c not in present]
    # Mostly colours that are there, and one that is not: "zero" must be learnable too.
    colors = present + rng.sample(absent, 1)
    return [
        {"color": c, **_count_slots(scene.count(color=c), f"{c} shape", f"{c} shapes")}
        for c in colors
    ]


def _localization_facts(scene: Scene, rng: random.Random) -> list[Fact]:
    return [
        {"object": s.name, "position": s.position, "where": WHERE[s.position]}
        for s in scene.shapes
    ]


def _size_comparison_facts(scene: Scene, rng: random.Random) -> list[Fact]:
    facts = []
    for i, a in enumerate(scene.shapes):
        for b in scene.shapes[i + 1:]:
            if a.size == b.size:
                continue
            larger, smaller = (a, b) if a.size == "large" else (b, a)
            first, second = (a, b) if rng.random() < 0.5 else (b, a)
            facts.append({"a": first.name, "b": second.name,
                          "larger": larger.name, "smaller": smaller.name})
    return facts


def _text_facts(scene: Scene, rng: random.Random) -> list[Fact]:
    if scene.text is None:
        return []
    return [{"text": scene.text, "where": WHERE[scene.text_position]}]


def _existence_facts(scene: Scene, rng: random.Random) -> list[Fact]:
    present = {(s.kind, s.color) for s in scene.shapes}
    # Near misses (right colour, wrong kind or the reverse) make "no" a real question.
    near = sorted({(k, c) for k in SHAPES for c in PALETTE
                   if (k, c) not in present
                   and any(k == pk or c == pc for pk, pc in present)})
    absent = rng.sample(near, min(len(present), len(near)))
    return [_existence_slots(s.name, True) for s in scene.shapes] + [
        _existence_slots(f"{c} {k}", False) for k, c in absent
    ]


def _existence_slots(obj: str, yes: bool) -> Fact:
    sentence = f"Yes, there is a {obj}." if yes else f"No, there is no {obj}."
    return {"object": obj, "yes": "yes" if yes else "no", "Yes": "Yes" if yes else "No", "yes_sentence": sentence}


def _color_choice_facts(scene: Scene, rng: random.Random) -> list[Fact]:
    return [
        {"where": WHERE[s.position], **_pick_options(s.color, tuple(PALETTE), rng.choice((3, 4)), rng)}
        for s in scene.shapes
    ]


def _shape_choice_facts(scene: Scene, rng: random.Random) -> list[Fact]:
    return [
        {"where": WHERE[s.position], "color": s.color, **_pick_options(s.kind, SHAPES, 3, rng)}
        for s in scene.shapes
    ]


# A fact's alternatives: the same question's fact for every answer it could have (the
# true one included), so an evaluation can score each candidate answer in the task's own
# answer format ("The image contains two shapes." against "... three shapes.").
def _other_colors(f: Fact) -> list[Fact]:
    return [{**f, "color": c, "Color": c.capitalize()} for c in PALETTE]


def _other_kinds(f: Fact) -> list[Fact]:
    return [{**f, "kind": k, "Kind": k.capitalize()} for k in SHAPES]


def _other_counts(f: Fact) -> list[Fact]:
    return [{**f, **_count_slots(n, f["unit"], f["units"])} for n in range(len(NUMBER_WORDS))]


def _other_positions(f: Fact) -> list[Fact]:
    return [{**f, "position": p, "where": WHERE[p]} for p in POSITIONS]


def _other_sizes(f: Fact) -> list[Fact]:
    return [f, {**f, "larger": f["smaller"], "smaller": f["larger"]}]


def _other_texts(f: Fact) -> list[Fact]:
    return [{**f, "text": w} for w in WORDS]


def _other_existence(f: Fact) -> list[Fact]:
    return [{**f, **_existence_slots(f["object"], yes)} for yes in (True, False)]


def _other_options(f: Fact) -> list[Fact]:
    # The options slot is "(a) x (b) y ...": each option is a candidate answer.
    return [{**f, "answer": f"({letter}) {text}"}
            for letter, text in re.findall(r"\(([a-h])\) (.+?)(?= \([a-h]\) |$)", f["options"])]


@dataclass(frozen=True)
class Family:
    name: str
    dataset: str
    facts: Callable[[Scene, random.Random], list[Fact]]
    questions: tuple[str, ...]
    answers: tuple[tuple[str, str], ...]  # (answer format, hint kind)
    alternatives: Callable[[Fact], list[Fact]]

    @property
    def choice(self) -> bool:
        return self.answers[0][1] == "choice"


FAMILIES = (
    Family("color_identification", "synth-shapes", _color_facts,
           ("What colour is the shape {where}?",
            "Which colour does the figure {where} have?",
            "Name the colour of the object {where}."),
           (("{color}", "word"), ("{Color}", "word"), ("The shape {where} is {color}.", "sentence")), _other_colors),
    Family("shape_identification", "synth-shapes", _shape_facts,
           ("What shape is {where}?",
            "Which kind of shape is drawn {where}?",
            "Identify the shape {where}."),
           (("{kind}", "word"), ("{Kind}", "word"), ("The shape {where} is a {kind}.", "sentence")), _other_kinds),
    Family("object_counting", "synth-count", _object_count_facts,
           ("How many {what} are there in the image?",
            "Count the {what} in the picture.",
            "What is the number of {what} shown?"),
           (("{n}", "digits"), ("{n_word}", "word"), ("The image contains {n_things}.", "sentence")), _other_counts),
    Family("kind_counting", "synth-count", _kind_count_facts,
           ("How many {what} are there in the image?",
            "Count the {what} in the picture.",
            "What is the number of {what} shown?"),
           (("{n}", "digits"), ("{n_word}", "word"), ("The image contains {n_things}.", "sentence")), _other_counts),
    Family("color_counting", "synth-count", _color_count_facts,
           ("How many {color} shapes are there?",
            "Count the {color} objects in the image.",
            "What is the number of {color} figures in the picture?"),
           (("{n}", "digits"), ("{n_word}", "word"), ("The image contains {n_things}.", "sentence")), _other_counts),
    Family("object_localization", "synth-shapes", _localization_facts,
           ("Where is the {object}?",
            "In which part of the image is the {object}?",
            "Locate the {object}."),
           (("{position}", "word"), ("{where}", "phrase"), ("The {object} is {where}.", "sentence")), _other_positions),
    Family("size_comparison", "synth-shapes", _size_comparison_facts,
           ("Which is larger, the {a} or the {b}?",
            "Which one is bigger: the {a} or the {b}?",
            "Between the {a} and the {b}, which is larger?"),
           (("the {larger}", "phrase"), ("{larger}", "phrase"),
            ("The {larger} is larger than the {smaller}.", "sentence")), _other_sizes),
    Family("text_recognition", "synth-ocr", _text_facts,
           ("What word is written in the image?",
            "Read the text shown in the picture.",
            "What does the text {where} say?"),
           (("{text}", "text"), ('The text says "{text}".', "sentence")), _other_texts),
    Family("object_existence", "synth-shapes", _existence_facts,
           ("Is there a {object} in the image?",
            "Does the picture contain a {object}?",
            "Can you see a {object}?"),
           (("{yes}", "yesno"), ("{Yes}", "yesno"), ("{yes_sentence}", "sentence")), _other_existence),
    Family("color_choice", "synth-choice", _color_choice_facts,
           ("What colour is the shape {where}?",
            "Which colour is the figure {where}?",
            "Select the colour of the object {where}."),
           (("{answer}", "choice"),), _other_options),
    Family("shape_choice", "synth-choice", _shape_choice_facts,
           ("Which shape is {where}?",
            "What kind of {color} figure is {where}?",
            "Select the shape of the {color} object {where}."),
           (("{answer}", "choice"),), _other_options),
)
FAMILY_BY_NAME = {f.name: f for f in FAMILIES}


# ---------------------------------------------------------------- tasks
@dataclass(frozen=True)
class Task:
    name: str
    family: Family
    question: str  # format string over the family's fact slots
    answer: str
    templates: tuple[str, ...]  # format strings over {input_text} and {options}
    images: tuple[int, ...]  # the pool images this task's family can ask about


def check_family_weights(weights: dict[str, float]) -> dict[str, float]:
    for name, weight in weights.items():
        if name not in FAMILY_BY_NAME:
            raise ValueError(f"family_weights: unknown question family {name!r}; expected one of {sorted(FAMILY_BY_NAME)}")
        if not weight > 0:
            raise ValueError(f"family_weights: {name} must be > 0, got {weight}")
    return dict(weights)


def family_of(task_name: str) -> Family:
    """The question family of a task, from its name (`dataset+family_variant`)."""
    return FAMILY_BY_NAME[task_name.split("+", 1)[1].rsplit("_", 1)[0]]


def _templates(hint_kind: str, choice: bool, n: int, rng: random.Random) -> tuple[str, ...]:
    layouts = CHOICE_LAYOUTS if choice else LAYOUTS
    combos = [(intro, hint, layout) for intro in INTROS for hint in HINTS[hint_kind]
              for layout in layouts]
    if n > len(combos):
        raise ValueError(f"templates_per_task={n}: at most {len(combos)} distinct templates")
    return tuple(
        # {input_text} and {options} stay as slots: they are filled per row.
        layout.format(intro=intro, hint=hint, input_text="{input_text}", options="{options}")
        for intro, hint, layout in rng.sample(combos, n)
    )


def _build_tasks(seed: int, tasks: int, templates_per_task: int,
                 eligible: dict[str, tuple[int, ...]]) -> list[Task]:
    families = [f for f in FAMILIES if eligible[f.name]]
    built = []
    for i in range(tasks):
        family = families[i % len(families)]
        variant = i // len(families)
        nq = len(family.questions)
        answer, hint_kind = family.answers[(variant // nq) % len(family.answers)]
        rng = random.Random(_derive(seed, "templates", i))
        built.append(Task(
            name=f"{family.dataset}+{family.name}_{variant}",
            family=family,
            question=family.questions[variant % nq],
            answer=answer,
            templates=_templates(hint_kind, family.choice, templates_per_task, rng),
            images=eligible[family.name],
        ))
    return built


def _eligible(facts: dict[str, list[list[Fact]]]) -> dict[str, tuple[int, ...]]:
    return {name: tuple(i for i, f in enumerate(per_image) if f) for name, per_image in facts.items()}


def corpus_tasks(seed: int = 0, tasks: int = 187, templates_per_task: int = 3,
                 image_pool: int = 256) -> list[Task]:
    """The tasks `synth_corpus` makes with these settings (names, questions, answer
    formats, templates), without writing anything: what evaluation asks held-out
    instances of."""
    scenes = [scene_for(seed, i) for i in range(image_pool)]
    return _build_tasks(seed, tasks, templates_per_task, _eligible(_fact_table(seed, scenes)))


def family_scale(task_list: list[Task], family_weights: dict[str, float]) -> list[float]:
    return [family_weights.get(t.family.name, 1.0) for t in task_list]


def task_sizes(instances: int, tasks: int, seed: int, scale: list[float] | None = None) -> list[int]:
    """Long-tailed (Zipf) task sizes summing to `instances`; each >= 1 if instances >= tasks.
    `scale`: a factor per task on its Zipf weight (its family's weight)."""
    ranks = np.random.default_rng(_derive(seed, "ranks")).permutation(tasks)
    weights = 1.0 / (ranks + 1.0) ** ZIPF_EXPONENT
    if scale is not None:
        weights = weights * np.asarray(scale, dtype=float)
    floor = 1 if instances >= tasks else 0
    quota = weights / weights.sum() * (instances - floor * tasks)
    sizes = np.floor(quota).astype(np.int64)
    # Largest remainders take the rows that flooring left over; a stable sort breaks ties
    # by task index, so the sizes depend on the seed alone.
    leftover = instances - floor * tasks - int(sizes.sum())
    sizes[np.argsort(-(quota - sizes), kind="stable")[:leftover]] += 1
    return (sizes + floor).tolist()


# ---------------------------------------------------------------- writing
def _image_name(index: int) -> str:
    return f"img_{index:05d}.png"


def _write_images(out: str, scenes: list[Scene], image_size: int) -> None:
    storage.makedirs(storage.join(out, "images"))
    # One object-store PUT per image costs latency, not bandwidth: overlap the writes.
    # Rendering stays on this thread (the font object is shared); PNGs are ~1 KB each.
    pngs = ((storage.join(out, "images", _image_name(i)), _png(render_scene(scene, image_size)))
            for i, scene in enumerate(scenes))
    with ThreadPoolExecutor(IMAGE_WRITERS) as pool:
        for _ in pool.map(lambda item: storage.write_bytes(*item), pngs):
            pass


def _fact_table(seed: int, scenes: list[Scene]) -> dict[str, list[list[Fact]]]:
    """facts[family][image]: computed once, so a row only picks one and formats it."""
    return {
        f.name: [f.facts(scene, random.Random(_derive(seed, "facts", f.name, i)))
                 for i, scene in enumerate(scenes)]
        for f in FAMILIES
    }


def _blocks(tasks: list[Task], sizes: list[int], facts: dict[str, list[list[Fact]]],
            seed: int) -> Iterator[str]:
    """The annotation rows, as blocks of JSON text (one string per block)."""
    rng = np.random.default_rng(_derive(seed, "rows"))
    # Shuffled task order, so the file interleaves tasks like the release does.
    order = np.repeat(np.arange(len(tasks), dtype=np.int32), sizes)
    rng.shuffle(order)
    image_refs = {}
    task_refs = [json.dumps(t.name) for t in tasks]
    table = [facts[t.family.name] for t in tasks]
    seen = [0] * len(tasks)
    for start in range(0, len(order), BLOCK_ROWS):
        block = order[start:start + BLOCK_ROWS].tolist()
        u_image, u_fact, u_template, u_side = rng.random((4, len(block))).tolist()
        rows = []
        for t, a, b, c, d in zip(block, u_image, u_fact, u_template, u_side):
            task = tasks[t]
            image = task.images[int(a * len(task.images))]
            image_facts = table[t][image]
            fact = image_facts[int(b * len(image_facts))]
            question = task.question.format_map(fact)
            body = task.templates[int(c * len(task.templates))].format(
                input_text=question, options=fact.get("options", ""))
            # The release puts <image> first or last in the human turn; so do we.
            human = f"{IMAGE_TOKEN}\n{body}" if d < 0.5 else f"{body}\n{IMAGE_TOKEN}"
            ref = image_refs.get(image)
            if ref is None:
                ref = image_refs[image] = json.dumps(f"./images/{_image_name(image)}")
            rows.append(
                f'{{"id": {json.dumps(f"{task.name}+{seen[t]}")}, "image": {ref}, '
                f'"task_name": {task_refs[t]}, "conversations": ['
                f'{{"from": "human", "value": {json.dumps(human)}}}, '
                f'{{"from": "gpt", "value": {json.dumps(task.answer.format_map(fact))}}}]}}'
            )
            seen[t] += 1
        yield ",\n".join(rows)


def _write_annotation(uri: str, blocks: Iterable[str]) -> None:
    with storage.open_output(uri) as f:
        f.write(b"[\n")
        for i, block in enumerate(blocks):
            f.write(((",\n" if i else "") + block).encode())
        f.write(b"\n]\n")


def synth_corpus(out: str, instances: int, tasks: int = 187, image_pool: int = 256,
                 image_size: int = 64, templates_per_task: int = 3, seed: int = 0,
                 family_weights: dict[str, float] | None = None) -> dict:
    """Write a synthetic Vision-Flan release to `out` (a path or s3:// URI); returns a summary.

    `family_weights`: family name -> factor on the sizes of its tasks (others 1), to shift
    the mix toward some question families; the total stays `instances`."""
    for name, value, low in (("instances", instances, 1), ("tasks", tasks, 1),
                             ("image_pool", image_pool, 1), ("image_size", image_size, 16),
                             ("templates_per_task", templates_per_task, 1), ("seed", seed, 0)):
        if value < low:
            raise ValueError(f"{name} must be >= {low}, got {value}")
    family_weights = check_family_weights(family_weights or {})
    started = time.monotonic()
    out = storage.normalize(out)
    scenes = [scene_for(seed, i) for i in range(image_pool)]
    facts = _fact_table(seed, scenes)
    task_list = _build_tasks(seed, tasks, templates_per_task, _eligible(facts))
    sizes = task_sizes(instances, tasks, seed, family_scale(task_list, family_weights))

    _write_images(out, scenes, image_size)
    templates_uri = storage.join(out, "templates.yaml")
    storage.write_bytes(templates_uri, yaml.safe_dump(
        {t.name: list(t.templates) for t in task_list}, sort_keys=False, width=1000).encode())
    annotation_uri = storage.join(out, "annotation.json")
    _write_annotation(annotation_uri, _blocks(task_list, sizes, facts, seed))

    by_size = sorted(zip(sizes, (t.name for t in task_list)), key=lambda p: (-p[0], p[1]))
    family_rows: dict[str, int] = {}
    for n, t in zip(sizes, task_list):
        family_rows[t.family.name] = family_rows.get(t.family.name, 0) + n
    return {
        "out": out,
        "annotation": annotation_uri,
        "templates": templates_uri,
        "instances": instances,
        "tasks": tasks,
        "families": sorted(family_rows),
        "family_rows": dict(sorted(family_rows.items())),
        "images": image_pool,
        "templates_per_task": templates_per_task,
        "task_counts_top5": [[name, n] for n, name in by_size[:5]],
        "task_count_min": by_size[-1][0],
        "seconds": round(time.monotonic() - started, 2),
    }
