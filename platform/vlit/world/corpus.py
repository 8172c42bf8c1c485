"""A synthetic corpus in the Vision-Flan release format, with answers that are true.

`synth_corpus(out, ...)` writes what `vlit corpus prepare --format vision-flan` reads:

    OUT/annotation.json      JSON array of {"id", "image", "task_name", "conversations"}
    OUT/images/img_NNNNN.png a pool of `image_pool` scenes; rows draw their image from it
    OUT/templates.yaml       task_name -> the instruction templates used for that task

Design, and why:

- Tasks. Scenes (`world/scenes.py`) and question families (`world/families.py`) are the
  world; a task is one family asked one way. Task `i` is family `i mod F`, and
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
- Determinism. Every random choice comes from `scenes.derive_seed`, never from global
  state, so the same arguments give a byte-identical annotation.
"""
from __future__ import annotations

import json
import random
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Iterable, Iterator

import numpy as np
import yaml

from vlit import storage
from vlit.corpus.schema import IMAGE_TOKEN
from vlit.world.families import CHOICE_LAYOUTS, FAMILIES, HINTS, INTROS, LAYOUTS, Fact, Family, check_family_weights
from vlit.world.scenes import Scene, derive_seed, png, render_scene, scene_for

ZIPF_EXPONENT = 1.0
BLOCK_ROWS = 8192  # rows per write: a few MB of JSON
IMAGE_WRITERS = 16  # concurrent image writes


@dataclass(frozen=True)
class Task:
    name: str
    family: Family
    question: str  # format string over the family's fact slots
    answer: str
    templates: tuple[str, ...]  # format strings over {input_text} and {options}
    images: tuple[int, ...]  # the pool images this task's family can ask about


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
        rng = random.Random(derive_seed(seed, "templates", i))
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
    ranks = np.random.default_rng(derive_seed(seed, "ranks")).permutation(tasks)
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
    pngs = ((storage.join(out, "images", _image_name(i)), png(render_scene(scene, image_size)))
            for i, scene in enumerate(scenes))
    with ThreadPoolExecutor(IMAGE_WRITERS) as pool:
        for _ in pool.map(lambda item: storage.write_bytes(*item), pngs):
            pass


def _fact_table(seed: int, scenes: list[Scene]) -> dict[str, list[list[Fact]]]:
    """facts[family][image]: computed once, so a row only picks one and formats it."""
    return {
        f.name: [f.facts(scene, random.Random(derive_seed(seed, "facts", f.name, i)))
                 for i, scene in enumerate(scenes)]
        for f in FAMILIES
    }


def _blocks(tasks: list[Task], sizes: list[int], facts: dict[str, list[list[Fact]]],
            seed: int) -> Iterator[str]:
    """The annotation rows, as blocks of JSON text (one string per block)."""
    rng = np.random.default_rng(derive_seed(seed, "rows"))
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
