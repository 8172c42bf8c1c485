"""Held-out evaluation sets: answers true to the scene, images never in a training pool,
POPE's negative splits as defined, every rotation of a multiple-choice question, and a
digest that names the exact rows and pixels."""
import hashlib
import re
from collections import Counter, defaultdict

import pyarrow.parquet as pq

import pytest

from vlit.config import SynthConfig
from vlit.world import PALETTE, SHAPES, WHERE, corpus_tasks, scene_for, task_sizes
from vlit.evaluate.sets import SUITES, EvalSet, EvalSpec, build_eval_set, suite_rows

# The corpus the tasks suite asks about: 20 tasks over the 11 question families.
SYNTH = SynthConfig(instances=500, tasks=20, image_pool=16, image_size=32, seed=3).model_dump()
SPEC = EvalSpec(seed=3, first_image=500, images=12, image_size=32, synth=SYNTH)


def rows_of(suite, spec=SPEC):
    table, images = suite_rows(suite, spec)
    return table.to_pylist(), images


def scene_of(row, spec=SPEC):
    return scene_for(spec.seed, int(row["group"].split("/")[0]))


def test_images_are_held_out_and_answers_true():
    rows, images = rows_of("mme")
    assert {int(r["group"]) for r in rows} == set(range(500, 512))
    for r in rows:
        assert r["answer"] in r["labels"] and len(r["labels"]) == len(r["choices"])
        assert r["image_sha256"] == hashlib.sha256(images[r["image"]]).hexdigest()
        scene = scene_of(r)
        question = r["prompt"].split("\n")[2]
        m = re.match(r"Is there a (\w+) (\w+) in the image\?", question)
        if r["task"] == "existence":
            assert ((m.group(1), m.group(2)) in {(s.color, s.kind) for s in scene.shapes}) == (r["answer"] == "yes")
        if r["task"] == "color":
            assert (m.group(1) in {s.color for s in scene.shapes}) == (r["answer"] == "yes")
    # MME: per image and task, one yes question and one no question.
    pairs = Counter((r["task"], r["group"], r["answer"]) for r in rows)
    assert set(pairs.values()) == {1} and len(pairs) == 12 * 4 * 2


def test_pope_negatives_follow_their_split():
    rows, _ = rows_of("pope")
    scenes = [scene_for(SPEC.seed, i) for i in range(500, 512)]
    frequency = Counter(s.name for scene in scenes for s in scene.shapes)
    scene_names = [{s.name for s in scene.shapes} for scene in scenes]
    by_image = defaultdict(lambda: defaultdict(list))
    for r in rows:
        obj = re.search(r"Is there a (\w+ \w+) in the image\?", r["prompt"]).group(1)
        by_image[r["group"]][r["task"], r["answer"]].append(obj)
    for group, asked in by_image.items():
        present = {s.name for s in scene_for(SPEC.seed, int(group)).shapes}
        k = min(3, len(present))
        positives = [asked[split, "yes"] for split in ("random", "popular", "adversarial")]
        assert positives[0] == positives[1] == positives[2] and len(positives[0]) == k and set(positives[0]) <= present
        for split in ("random", "popular", "adversarial"):
            assert len(asked[split, "no"]) == k and not set(asked[split, "no"]) & present
        # popular: no absent object left out is more frequent than one asked about.
        absent = [o for o in (f"{c} {s}" for s in SHAPES for c in PALETTE) if o not in present]
        left_out = [o for o in absent if o not in asked["popular", "no"]]
        assert min(frequency[o] for o in asked["popular", "no"]) >= max(frequency[o] for o in left_out)
        # adversarial: ranked by co-occurrence with the scene's own objects.
        def cooccur(o):  # pairs (o, p) in one image, over the scene's own objects p
            return sum(len(present & names) for names in scene_names if o in names)
        left_out = [o for o in absent if o not in asked["adversarial", "no"]]
        assert min(map(cooccur, asked["adversarial", "no"])) >= max(map(cooccur, left_out))


def test_circular_rotates_every_option_through_every_letter():
    rows, _ = rows_of("circular")
    by_question = defaultdict(list)
    for r in rows:
        by_question[r["group"]].append(r)
    assert len(by_question) == 12 * 2
    for group, rotations in by_question.items():
        n = len(rotations[0]["labels"])
        assert len(rotations) == n == (4 if group.endswith("color_choice") else 3)
        options = [re.findall(r"\(([a-d])\) (\w+)", r["prompt"]) for r in rotations]
        correct = {dict(o)[r["answer"]] for o, r in zip(options, rotations)}
        assert len(correct) == 1  # the same true option, wherever it moved
        assert sorted(r["answer"] for r in rotations) == list("abcd"[:n])
        scene = scene_of(rotations[0])
        where = re.search(r"(on the left|on the right|at the top|at the bottom|in the center)", rotations[0]["prompt"]).group(1)
        shape = next(s for s in scene.shapes if WHERE[s.position] == where)
        assert correct == {shape.color if group.endswith("color_choice") else shape.kind}


def test_forgetting_classes_and_deterministic_rows():
    rows, _ = rows_of("forgetting")
    assert Counter(r["task"] for r in rows) == {"color": 12, "shape": 12, "count": 12}
    for r in rows:
        if r["task"] == "count":
            assert r["answer"] == str(len(scene_of(r).shapes))
    assert rows_of("forgetting")[0] == rows  # same spec, same rows
    assert rows_of("forgetting", EvalSpec(seed=4, first_image=500, images=12, image_size=32))[0] != rows


def test_tasks_suite_asks_the_corpus_tasks_in_their_own_form():
    rows, _ = rows_of("tasks")
    tasks = corpus_tasks(3, 20, 3, 16)

    def pattern(template, question):
        slot = re.escape(question).replace(re.escape("{"), "{").replace(re.escape("}"), "}")
        slot = re.sub(r"\{\w+\}", ".+", slot)
        return re.escape(template).replace(re.escape("{input_text}"), slot).replace(re.escape("{options}"), ".+")

    families = Counter(r["task"] for r in rows)
    assert set(families) == {t.family.name for t in tasks}
    assert families["object_counting"] == 12  # one row per image and family that applies
    for r in rows:
        # Every choice is the task's answer format filled with another possible answer.
        assert r["answer"] in r["labels"] and len(set(r["labels"])) == len(r["labels"]) >= 2
        assert r["choices"] == [[label] for label in r["labels"]]
        assert r["prompt"].startswith("<image>\n") != r["prompt"].endswith("\n<image>")
        body = r["prompt"].removeprefix("<image>\n").removesuffix("\n<image>")
        # The body is one of the family's corpus tasks' templates, with one of its questions.
        assert any(re.fullmatch(pattern(t, task.question), body, re.S)
                   for task in tasks if task.family.name == r["task"] for t in task.templates), r["key"]
        if r["task"] == "object_counting":
            n = len(scene_of(r).shapes)
            assert any(w in r["answer"] for w in (str(n), ("one", "two", "three", "four")[n - 1]))
            assert len(r["labels"]) == 5  # no, one, two, three or four
    assert rows_of("tasks")[0] == rows  # same spec, same rows


def test_tasks_suite_follows_the_corpus_mix_and_needs_its_settings():
    # A family weighted down to nothing in the corpus is drawn by its remaining tasks only;
    # with instances < tasks some tasks have no rows and are never asked.
    small = {**SYNTH, "instances": 11, "tasks": 20}
    sizes = task_sizes(11, 20, 3)
    asked = {r["task"] for r in suite_rows("tasks", EvalSpec(seed=3, first_image=500, images=12, image_size=32,
                                                              synth=small))[0].to_pylist()}
    present = {t.family.name for t, n in zip(corpus_tasks(3, 20, 3, 16), sizes) if n}
    assert asked == present and len(present) < 11
    with pytest.raises(ValueError, match="corpus.synth"):
        suite_rows("tasks", EvalSpec(seed=3, first_image=500, images=2, image_size=32))


def test_versions_are_content_addressed_and_reused(tmp_path):
    sets = {suite: build_eval_set(suite, SPEC, str(tmp_path)) for suite in SUITES}
    for suite, es in sets.items():
        assert es.uri.endswith(f"/{suite}-{es.digest}") and es.suite == suite
        assert es.read_table().num_rows == es.manifest["rows"] and es.manifest["images"] == 12
        assert EvalSet.open(es.uri).manifest == es.manifest
    mme = sets["mme"]
    before = (tmp_path / f"mme-{mme.digest}" / "data.parquet").stat().st_mtime_ns
    assert build_eval_set("mme", SPEC, str(tmp_path)).uri == mme.uri
    assert (tmp_path / f"mme-{mme.digest}" / "data.parquet").stat().st_mtime_ns == before  # reused, not rewritten
    other = build_eval_set("mme", EvalSpec(seed=3, first_image=500, images=12, image_size=48), str(tmp_path))
    assert other.digest != mme.digest  # new pixels, new version
    row = pq.read_table(f"{other.uri}/data.parquet").slice(0, 1).to_pylist()[0]
    assert hashlib.sha256(open(f"{other.uri}/{row['image']}", "rb").read()).hexdigest() == row["image_sha256"]
