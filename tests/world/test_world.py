"""The synthetic corpus: release format, long-tailed tasks, determinism, and true answers."""
from __future__ import annotations

import collections
import json
import random
import re
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from vlit import storage
from vlit.world import (
    FAMILIES,
    PALETTE,
    SHAPES,
    WHERE,
    family_of,
    scene_for,
    synth_corpus,
    task_sizes,
)

SEED = 3
INSTANCES, TASKS, POOL, SIZE = 500, 20, 16, 64
NUMBERS = {"no": 0, "zero": 0, "one": 1, "two": 2, "three": 3, "four": 4}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> tuple[Path, dict, list[dict]]:
    out = tmp_path_factory.mktemp("synth")
    summary = synth_corpus(str(out), instances=INSTANCES, tasks=TASKS, image_pool=POOL,
                           image_size=SIZE, templates_per_task=3, seed=SEED)
    rows = json.loads((out / "annotation.json").read_text())
    return out, summary, rows


def _image_index(row: dict) -> int:
    return int(re.fullmatch(r"\./images/img_(\d{5})\.png", row["image"]).group(1))


def _human(row: dict) -> str:
    return row["conversations"][0]["value"]


def _answer(row: dict) -> str:
    return row["conversations"][1]["value"]


def _rows_of(rows: list[dict], family: str) -> list[dict]:
    found = [r for r in rows if family_of(r["task_name"]).name == family]
    assert found, f"no rows of family {family}"
    return found


def _position(text: str) -> str:
    (position,) = [p for p, phrase in WHERE.items() if phrase in text]
    return position


def _mentioned(text: str, words) -> list[str]:
    return [w for w in words if re.search(rf"\b{w}\b", text)]


def _number(answer: str) -> int:
    (n,) = re.findall(r"\b(\d+|no|zero|one|two|three|four)\b", answer.lower())
    return int(n) if n.isdigit() else NUMBERS[n]


def test_release_format(corpus):
    out, summary, rows = corpus
    assert isinstance(rows, list) and len(rows) == INSTANCES == summary["instances"]
    starts = ends = 0
    for row in rows:
        assert set(row) == {"id", "image", "task_name", "conversations"}
        human, gpt = row["conversations"]
        assert set(human) == set(gpt) == {"from", "value"}
        assert (human["from"], gpt["from"]) == ("human", "gpt")
        assert human["value"].count("<image>") == 1 and "<image>" not in gpt["value"]
        starts += human["value"].startswith("<image>\n")
        ends += human["value"].endswith("\n<image>")
        assert re.fullmatch(r"[\w.-]+\+\w+_\d+", row["task_name"])
        assert (out / row["image"]).is_file()
    # Both placements occur, and nothing else does.
    assert starts > 0 and ends > 0 and starts + ends == INSTANCES
    assert len({r["id"] for r in rows}) == INSTANCES
    assert len(list((out / "images").glob("img_*.png"))) == POOL


def test_images_are_a_distinct_pool(corpus):
    out, _, _ = corpus
    pixels = {Image.open(p).tobytes() for p in (out / "images").glob("*.png")}
    assert len(pixels) == POOL
    assert Image.open(out / "images" / "img_00000.png").size == (SIZE, SIZE)


def test_task_counts_long_tailed(corpus):
    _, summary, rows = corpus
    counts = collections.Counter(r["task_name"] for r in rows)
    assert len(counts) == TASKS
    assert sum(counts.values()) == INSTANCES
    assert max(counts.values()) >= 5 * min(counts.values())
    assert summary["task_counts_top5"][0] == list(counts.most_common(1)[0])


@pytest.mark.parametrize("instances,tasks", [(1, 1), (3, 5), (187, 187), (1000, 187), (10**6, 7)])
def test_task_sizes_sum_exactly(instances, tasks):
    sizes = task_sizes(instances, tasks, seed=0)
    assert len(sizes) == tasks and sum(sizes) == instances
    assert min(sizes) >= (1 if instances >= tasks else 0)


def test_templates_yaml_covers_every_row(corpus):
    out, _, rows = corpus
    templates = yaml.safe_load((out / "templates.yaml").read_text())
    assert len(templates) == TASKS
    patterns = {}
    for task, items in templates.items():
        assert len(items) == len(set(items)) == 3
        assert all("{input_text}" in t for t in items)
        assert all(("{options}" in t) == family_of(task).choice for t in items)
        patterns[task] = [
            re.compile(re.escape(t).replace(r"\{input_text\}", ".+").replace(r"\{options\}", ".+"))
            for t in items
        ]
    for row in rows:
        body = _human(row).replace("<image>\n", "").replace("\n<image>", "")
        assert any(p.fullmatch(body) for p in patterns[row["task_name"]]), body


def test_deterministic(tmp_path, corpus):
    out, _, _ = corpus
    args = dict(instances=INSTANCES, tasks=TASKS, image_pool=POOL, image_size=SIZE,
                templates_per_task=3)
    synth_corpus(str(tmp_path / "same"), seed=SEED, **args)
    synth_corpus(str(tmp_path / "other"), seed=SEED + 1, **args)
    for name in ("annotation.json", "templates.yaml", "images/img_00007.png"):
        assert (tmp_path / "same" / name).read_bytes() == (out / name).read_bytes()
    assert (tmp_path / "other" / "annotation.json").read_bytes() != (out / "annotation.json").read_bytes()
    assert scene_for(SEED, 5) == scene_for(SEED, 5)


def test_answers_are_true(corpus):
    """Re-derive each answer from the scene's ground truth, reading only the question."""
    _, _, rows = corpus
    colors, shape_words = list(PALETTE), [f"{k}s" for k in SHAPES]

    for row in _rows_of(rows, "color_identification"):
        scene = scene_for(SEED, _image_index(row))
        assert _mentioned(_answer(row).lower(), colors) == [scene.at(_position(_human(row))).color]

    for row in _rows_of(rows, "shape_identification"):
        scene = scene_for(SEED, _image_index(row))
        assert _mentioned(_answer(row).lower(), SHAPES) == [scene.at(_position(_human(row))).kind]

    for row in _rows_of(rows, "object_counting"):
        scene = scene_for(SEED, _image_index(row))
        assert not _mentioned(_human(row), shape_words)
        assert _number(_answer(row)) == len(scene.shapes)

    for row in _rows_of(rows, "kind_counting"):
        scene = scene_for(SEED, _image_index(row))
        (kind,) = _mentioned(_human(row), shape_words)
        assert _number(_answer(row)) == scene.count(kind=kind[:-1])

    for row in _rows_of(rows, "color_counting"):
        scene = scene_for(SEED, _image_index(row))
        (color,) = _mentioned(_human(row), colors)
        assert _number(_answer(row)) == scene.count(color=color)

    for row in _rows_of(rows, "object_localization"):
        scene = scene_for(SEED, _image_index(row))
        (color,), (kind,) = _mentioned(_human(row), colors), _mentioned(_human(row), SHAPES)
        (shape,) = [s for s in scene.shapes if (s.color, s.kind) == (color, kind)]
        assert shape.position in _answer(row)

    for row in _rows_of(rows, "text_recognition"):
        scene = scene_for(SEED, _image_index(row))
        assert scene.text is not None and scene.text in _answer(row)

    answers = collections.Counter()
    for row in _rows_of(rows, "object_existence"):
        scene = scene_for(SEED, _image_index(row))
        (color,), (kind,) = _mentioned(_human(row), colors), _mentioned(_human(row), SHAPES)
        expected = "yes" if scene.count(kind=kind, color=color) else "no"
        assert _answer(row).lower().startswith(expected)
        answers[expected] += 1
    assert answers["yes"] > 0 and answers["no"] > 0  # negatives about absent objects too

    for row in _rows_of(rows, "size_comparison"):
        scene = scene_for(SEED, _image_index(row))
        (larger,) = [s for s in scene.shapes if s.size == "large" and s.name in _human(row)]
        assert _answer(row).lower().removeprefix("the ").startswith(larger.name)


def test_multiple_choice_rows(corpus):
    _, _, rows = corpus
    for family in ("color_choice", "shape_choice"):
        for row in _rows_of(rows, family):
            line = re.search(r"Options: (\(a\) .+ \(b\) .+)", _human(row)).group(1)
            options = dict(re.findall(r"\(([a-h])\) (.+?)(?= \([a-h]\) |$)", line))
            letter, text = re.fullmatch(r"\(([a-h])\) (.+)", _answer(row)).groups()
            assert options[letter] == text
            assert len(set(options.values())) == len(options)
            shape = scene_for(SEED, _image_index(row)).at(_position(_human(row)))
            assert text == (shape.color if family == "color_choice" else shape.kind)


def test_pixels_match_the_scene(corpus):
    out, _, _ = corpus
    cell = SIZE / 3
    for index in range(POOL):
        scene = scene_for(SEED, index)
        pixels = np.asarray(Image.open(out / "images" / f"img_{index:05d}.png").convert("RGB"))
        colors = collections.Counter(s.color for s in scene.shapes)
        for color, rgb in PALETTE.items():
            mask = (pixels == rgb).all(axis=-1)
            assert mask.any() == (color in colors), (index, color)
            if colors[color] != 1:
                continue
            (shape,) = [s for s in scene.shapes if s.color == color]
            ys, xs = np.nonzero(mask)
            # A large shape spans ~0.9 of its grid cell, a small one ~0.5.
            assert (xs.max() - xs.min() > 0.7 * cell) == (shape.size == "large"), (index, shape)
            col, row = {"left": (0, 1), "right": (2, 1), "top": (1, 0),
                        "bottom": (1, 2), "center": (1, 1)}[shape.position]
            assert abs((xs.min() + xs.max()) / 2 - (col + 0.5) * cell) < 0.25 * cell
            assert abs((ys.min() + ys.max()) / 2 - (row + 0.5) * cell) < 0.25 * cell
        # Text is drawn in black (anti-aliased greys): dark pixels exactly when there is text.
        dark = (pixels < 100).all(axis=-1).any()
        assert dark == (scene.text is not None), index


def test_alternatives_are_every_answer_the_question_could_have():
    """What the held-out tasks suite scores: per fact, the same question with each possible
    answer, the true one among them once, in every answer format of the family."""
    for family in FAMILIES:
        sizes = set()
        for i in range(40):
            for fact in family.facts(scene_for(SEED, i), random.Random(i)):
                others = family.alternatives(fact)
                for form, _ in family.answers:
                    answers = [form.format_map(f) for f in others]
                    assert answers.count(form.format_map(fact)) == 1 and len(set(answers)) == len(answers)
                    # The question stays the question: only answer slots change.
                    assert {q.format_map(f) for f in others for q in family.questions} == \
                        {q.format_map(fact) for q in family.questions}
                sizes.add(len(others))
        expected = {"color_identification": {6}, "shape_identification": {3}, "object_localization": {5},
                    "size_comparison": {2}, "text_recognition": {12}, "object_existence": {2},
                    "color_choice": {3, 4}, "shape_choice": {3}}.get(family.name, {5})  # counts: 0-4
        assert sizes == expected, family.name


def test_unanswerable_family_is_left_out(tmp_path):
    seed = next(s for s in range(100) if scene_for(s, 0).text is None)
    summary = synth_corpus(str(tmp_path), instances=30, tasks=12, image_pool=1, seed=seed)
    assert "text_recognition" not in summary["families"]
    rows = json.loads((tmp_path / "annotation.json").read_text())
    assert len({r["task_name"] for r in rows}) == 12


def test_family_weights_shift_the_mix_and_keep_the_total():
    families = [FAMILIES[i % len(FAMILIES)].name for i in range(187)]

    def share(weights):
        sizes = task_sizes(10_000, 187, seed=0, scale=[weights.get(f, 1.0) for f in families])
        assert sum(sizes) == 10_000 and min(sizes) >= 1
        return sum(n for n, f in zip(sizes, families) if f == "kind_counting") / 10_000

    base, tripled = share({}), share({"kind_counting": 3.0})
    # x3 on one family's weight mass m: 3m / (3m + 1 - m).
    assert tripled == pytest.approx(3 * base / (3 * base + 1 - base), abs=0.01)
    assert share({"size_comparison": 3.0}) < base


def test_family_weights_reach_the_rows(tmp_path):
    summary = synth_corpus(str(tmp_path), instances=600, tasks=22, image_pool=16, seed=1,
                           family_weights={"object_existence": 20.0})
    rows = json.loads((tmp_path / "annotation.json").read_text())
    existence = sum(1 for r in rows if "+object_existence_" in r["task_name"])
    assert existence == summary["family_rows"]["object_existence"] > 300


@pytest.mark.parametrize("bad", [dict(instances=0), dict(tasks=0), dict(image_size=8),
                                 dict(templates_per_task=1000), dict(seed=-1),
                                 dict(family_weights={"counting": 2.0}),
                                 dict(family_weights={"object_counting": 0.0})])
def test_rejects_bad_arguments(tmp_path, bad):
    with pytest.raises(ValueError):
        synth_corpus(str(tmp_path), **{"instances": 10, **bad})


def test_writes_to_s3(s3):
    out = "s3://vlit-test/synth-small"
    summary = synth_corpus(out, instances=40, tasks=6, image_pool=4, seed=1)
    assert summary["annotation"] == f"{out}/annotation.json"
    for name in ("annotation.json", "templates.yaml", "images/img_00000.png", "images/img_00003.png"):
        assert storage.exists(storage.join(out, name)), name
    rows = storage.read_json(storage.join(out, "annotation.json"))
    assert len(rows) == 40 and len({r["task_name"] for r in rows}) == 6
