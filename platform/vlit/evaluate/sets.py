"""Held-out evaluation sets made from the synthetic world, as small versioned datasets.

The synthetic corpus draws its images from pool indices 0..image_pool-1 of `scene_for(
seed, i)`; evaluation uses indices `first_image` onwards (default one million, beyond
any pool), so the model never trained on an evaluation image, while the world (shapes,
colours, positions, prompt wording) is the one it learned. Every question's answer comes
from the scene's ground truth.

Suites (a row's `task` in parentheses):
- mme: per image and task, one question answered yes and one answered no (existence,
  count, position, color), for MME's acc and acc+.
- pope: "Is there a {object} in the image?" for up to `pope_objects` objects in the
  scene, and as many absent objects per negative-sampling split (random; popular: the
  objects most frequent over the evaluation images; adversarial: the objects that
  co-occur most with the scene's own). Positives repeat in every split, as in POPE.
- circular: multiple choice (color_choice, shape_choice), one row per rotation of the
  options; a row's `group` names its question.
- forgetting: classification (color, shape, count) measured after each stage.
- tasks: held-out instances of the synthetic corpus's own tasks. Per image and question
  family, one task drawn with the corpus's task sizes as weights (a held-out split mixed
  as the corpus is), asked with the task's own phrasing, template and answer format; the
  choices are every answer the question could have, in that format (`Family.alternatives`:
  "The image contains two shapes." against "... three shapes."). A row's `task` is the
  family. This is the suite that says whether a model learned what it was trained on;
  the others fix one wording per question type, as the public benchmarks do.

Layout of one version (`vlit.versions.EvalSet`; OUT is a folder or s3:// prefix):

    OUT/<suite>-<digest>/manifest.json   written last (`vlit.versions`)
    OUT/<suite>-<digest>/data.parquet    rows (EVAL_SCHEMA)
    OUT/<suite>-<digest>/images/img_NNNNNNN.png

The digest (vlit/digest.py) covers every row, each image's SHA-256 included, so a run
that names the digest names the exact questions and pixels it was scored on.
"""
from __future__ import annotations

import hashlib
import random
from collections import Counter
from dataclasses import asdict, dataclass

import pyarrow as pa

from vlit import storage, versions
from vlit.config import EVAL_SUITES as SUITES
from vlit.corpus.schema import IMAGE_TOKEN
from vlit.digest import TableDigest
from vlit.versions import EvalSet
from vlit.world import (
    CHOICE_LAYOUTS,
    HINTS,
    INTROS,
    LAYOUTS,
    NUMBER_WORDS,
    PALETTE,
    POSITIONS,
    SHAPES,
    WHERE,
    Scene,
    corpus_tasks,
    family_scale,
    png,
    render_scene,
    scene_for,
    task_sizes,
)

SCHEMA_VERSION = 1

EVAL_SCHEMA = pa.schema([
    pa.field("key", pa.string(), nullable=False),
    pa.field("suite", pa.string(), nullable=False),
    pa.field("task", pa.string(), nullable=False),
    pa.field("group", pa.string(), nullable=False),  # acc+ image, circular question
    pa.field("image", pa.string(), nullable=False),  # relative to the version's folder
    pa.field("image_sha256", pa.string(), nullable=False),
    pa.field("prompt", pa.string(), nullable=False),  # the user turn, with IMAGE_TOKEN
    pa.field("labels", pa.list_(pa.string()), nullable=False),  # one per choice
    # Surface forms of each choice, scored together ("Yes" and "yes" both mean yes).
    pa.field("choices", pa.list_(pa.list_(pa.string())), nullable=False),
    pa.field("answer", pa.string(), nullable=False),  # one of labels
])

YES_NO = ([["Yes", "yes"], ["No", "no"]], ["yes", "no"])
OBJECTS = tuple(f"{c} {k}" for k in SHAPES for c in PALETTE)
LETTERS = "abcdefgh"


@dataclass(frozen=True)
class EvalSpec:
    """What determines a suite's rows (its manifest records it)."""

    seed: int = 0
    first_image: int = 1_000_000
    images: int = 48
    image_size: int = 64
    pope_objects: int = 3
    # The corpus's task intro before each question. Off: question and format hint only
    # (about 100 fewer tokens; what the in-process learning test trains on).
    intro: bool = True
    # The synthetic corpus's settings (corpus.synth's fields): the tasks suite asks its
    # tasks. None: no synthetic corpus, and no tasks suite.
    synth: dict | None = None


class _Draw:
    """One image's random choices and prompt wording: an RNG seeded by (seed, suite,
    image), never global state, so the same spec builds byte-identical rows."""

    def __init__(self, spec: EvalSpec, suite: str, index: int, stats=None):
        digest = hashlib.sha256(repr((spec.seed, "eval", suite, index)).encode()).digest()
        self.rng = random.Random(int.from_bytes(digest[:8], "big"))
        self.spec, self.stats = spec, stats

    def prompt(self, question: str, hint: str, options: str | None = None) -> str:
        """A user turn worded like the corpus's (intro, question, format hint): the model
        is tested on unseen images, not on an unfamiliar prompt format."""
        hint = HINTS[hint][0]
        if not self.spec.intro:
            body = f"{question}\n\nOptions: {options}\n{hint}" if options else f"{question}\n{hint}"
        elif options is None:
            body = LAYOUTS[0].format(intro=self.rng.choice(INTROS), input_text=question, hint=hint)
        else:
            body = CHOICE_LAYOUTS[0].format(intro=self.rng.choice(INTROS), input_text=question, options=options, hint=hint)
        return f"{IMAGE_TOKEN}\n{body}"

    def yes_no(self, task: str, question: str, answer: str) -> dict:
        choices, labels = YES_NO
        return {"task": task, "prompt": self.prompt(question, "yesno"), "choices": choices, "labels": labels,
                "answer": answer}


def _mme(scene: Scene, draw: _Draw) -> list[dict]:
    rng = draw.rng
    shape = rng.choice(scene.shapes)
    present = {s.name for s in scene.shapes}
    # Near misses (the colour or the kind of a shape that is there), as the corpus asks.
    near = [o for o in OBJECTS if o not in present
            and any(o.split()[0] == s.color or o.split()[1] == s.kind for s in scene.shapes)]
    n = len(scene.shapes)
    colors = {s.color for s in scene.shapes}
    pairs = {
        "existence": ("Is there a {} in the image?", shape.name, rng.choice(near)),
        "count": ("Are there exactly {} shapes in the image?", str(n), str(rng.choice([k for k in range(1, 5) if k != n]))),
        "position": (f"Is the {shape.name} {{}}?", WHERE[shape.position],
                     WHERE[rng.choice([p for p in POSITIONS if p != shape.position])]),
        "color": ("Is there a {} shape in the image?", shape.color, rng.choice([c for c in PALETTE if c not in colors])),
    }
    rows = []
    for task, (question, yes, no) in pairs.items():
        rows += [draw.yes_no(task, question.format(yes), "yes"), draw.yes_no(task, question.format(no), "no")]
    return rows


def _pope_stats(scenes: list[Scene]) -> tuple[Counter, dict[str, Counter]]:
    frequency, cooccur = Counter(), {o: Counter() for o in OBJECTS}
    for scene in scenes:
        names = [s.name for s in scene.shapes]
        frequency.update(names)
        for a in names:
            cooccur[a].update(b for b in names if b != a)
    return frequency, cooccur


def _pope(scene: Scene, draw: _Draw) -> list[dict]:
    (frequency, cooccur), rng = draw.stats, draw.rng
    present = [s.name for s in scene.shapes]
    absent = [o for o in OBJECTS if o not in present]
    k = min(draw.spec.pope_objects, len(present))
    tiebreak = {o: rng.random() for o in absent}  # seeded: ties ordered the same every build
    negatives = {
        "random": rng.sample(absent, k),
        "popular": sorted(absent, key=lambda o: (-frequency[o], tiebreak[o]))[:k],
        "adversarial": sorted(absent, key=lambda o: (-sum(cooccur[p][o] for p in present), tiebreak[o]))[:k],
    }
    positives = rng.sample(present, k)
    return [draw.yes_no(split, f"Is there a {o} in the image?", answer)
            for split, negs in negatives.items()
            for o, answer in [(p, "yes") for p in positives] + [(n, "no") for n in negs]]


def _circular(scene: Scene, draw: _Draw) -> list[dict]:
    rng = draw.rng
    shape = rng.choice(scene.shapes)
    where = WHERE[shape.position]
    questions = {
        "color_choice": (f"What colour is the shape {where}?", shape.color,
                         [shape.color, *rng.sample([c for c in PALETTE if c != shape.color], 3)]),
        "shape_choice": (f"Which shape is {where}?", shape.kind, list(SHAPES)),
    }
    rows = []
    for task, (question, correct, options) in questions.items():
        rng.shuffle(options)
        for r in range(len(options)):  # every rotation; rows of one question share a group
            rotated = options[r:] + options[:r]
            letters = LETTERS[:len(rotated)]
            text = " ".join(f"({letter}) {o}" for letter, o in zip(letters, rotated))
            rows.append({"task": task, "prompt": draw.prompt(question, "choice", options=text),
                         "choices": [[f"({letter})"] for letter in letters], "labels": list(letters),
                         "answer": letters[rotated.index(correct)], "question": task})
    return rows


def _forgetting(scene: Scene, draw: _Draw) -> list[dict]:
    shape = draw.rng.choice(scene.shapes)
    where = WHERE[shape.position]

    def classify(task, question, hint, classes, forms, answer):
        return {"task": task, "prompt": draw.prompt(question, hint), "choices": forms, "labels": classes,
                "answer": answer}

    counts = [str(n) for n in range(1, 5)]
    return [
        classify("color", f"What colour is the shape {where}?", "word", list(PALETTE),
                 [[c, c.capitalize()] for c in PALETTE], shape.color),
        classify("shape", f"What shape is {where}?", "word", list(SHAPES),
                 [[k, k.capitalize()] for k in SHAPES], shape.kind),
        classify("count", "How many shapes are there in the image?", "digits", counts,
                 [[n, NUMBER_WORDS[int(n)]] for n in counts], str(len(scene.shapes))),
    ]


def _corpus_task_mix(spec: EvalSpec) -> dict[str, tuple[list, list[int]]]:
    """family -> (its tasks, their sizes in the corpus): what the tasks suite draws from."""
    if spec.synth is None:
        raise ValueError("the tasks suite asks the synthetic corpus's own tasks: it needs the corpus.synth settings")
    s = spec.synth
    tasks = corpus_tasks(s["seed"], s["tasks"], s["templates_per_task"], s["image_pool"])
    sizes = task_sizes(s["instances"], s["tasks"], s["seed"], family_scale(tasks, s.get("family_weights") or {}))
    mix: dict[str, tuple[list, list[int]]] = {}
    for task, size in zip(tasks, sizes):
        if size:
            mix.setdefault(task.family.name, ([], []))
            mix[task.family.name][0].append(task)
            mix[task.family.name][1].append(size)
    return mix


def _tasks(scene: Scene, draw: _Draw) -> list[dict]:
    rng, rows = draw.rng, []
    for family, (tasks, sizes) in draw.stats.items():
        task = rng.choices(tasks, weights=sizes)[0]
        facts = task.family.facts(scene, rng)
        if not facts:  # e.g. text reading on an image without text
            continue
        fact = rng.choice(facts)
        body = rng.choice(task.templates).format(input_text=task.question.format_map(fact),
                                                  options=fact.get("options", ""))
        # As in the corpus, <image> comes first or last in the user turn.
        prompt = f"{IMAGE_TOKEN}\n{body}" if rng.random() < 0.5 else f"{body}\n{IMAGE_TOKEN}"
        forms = [task.answer.format_map(f) for f in task.family.alternatives(fact)]
        rows.append({"task": family, "prompt": prompt, "choices": [[f] for f in forms], "labels": forms,
                     "answer": task.answer.format_map(fact)})
    return rows


BUILDERS = {"mme": _mme, "pope": _pope, "circular": _circular, "forgetting": _forgetting, "tasks": _tasks}


def suite_rows(suite: str, spec: EvalSpec) -> tuple[pa.Table, dict[str, bytes]]:
    """The suite's rows and its images (relative path -> PNG bytes), built in memory."""
    if suite not in BUILDERS:
        raise ValueError(f"unknown evaluation suite {suite!r}; expected one of {SUITES}")
    indices = range(spec.first_image, spec.first_image + spec.images)
    scenes = [scene_for(spec.seed, i) for i in indices]
    stats = _pope_stats(scenes) if suite == "pope" else _corpus_task_mix(spec) if suite == "tasks" else None
    rows, images = [], {}
    for index, scene in zip(indices, scenes):
        image = f"images/img_{index:07d}.png"
        images[image] = png(render_scene(scene, spec.image_size))
        sha = hashlib.sha256(images[image]).hexdigest()
        for n, row in enumerate(BUILDERS[suite](scene, _Draw(spec, suite, index, stats))):
            group = f"{index}/{row.pop('question')}" if suite == "circular" else str(index)
            rows.append({"key": f"{suite}/{row['task']}/{index}/{n}", "suite": suite, "group": group,
                         "image": image, "image_sha256": sha, **row})
    return pa.Table.from_pylist(rows, schema=EVAL_SCHEMA), images


def build_eval_set(suite: str, spec: EvalSpec, out: str) -> EvalSet:
    """The suite's version OUT/<suite>-<digest>/, written once: an existing finished
    version with the same digest is reused."""
    table, images = suite_rows(suite, spec)
    return publish_eval_set(suite, table, images, out, {"spec": asdict(spec)})


def publish_eval_set(suite: str, table: pa.Table, images: dict[str, bytes], out: str, extra: dict) -> EvalSet:
    """OUT/<suite>-<digest>/ holding `table` and `images` (relative path -> bytes), or the
    finished version of that digest; `extra` goes into the manifest (what it was made from).
    The one writer of evaluation sets, synthetic and released."""
    digest = TableDigest({"kind": "vlit-eval", "schema_version": SCHEMA_VERSION, "suite": suite})
    digest.update(table)
    name = f"{suite}-{digest.hexdigest()}"
    found = EvalSet.find(out, name)
    if found is not None:
        return found
    with versions.staging(out) as stage:
        for relative, data in images.items():
            storage.write_bytes(stage.file(relative), data)
        versions.write_parquet(stage.file(EvalSet.TABLE), table)
        tasks = Counter(table.column("task").to_pylist())
        return stage.publish(name, "eval-set", {
            "suite": suite, "digest": digest.hexdigest(), "schema_version": SCHEMA_VERSION, "rows": table.num_rows,
            "images": len(images), "tasks": dict(sorted(tasks.items())), **extra}, EvalSet)
