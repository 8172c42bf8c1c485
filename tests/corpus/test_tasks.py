"""Task registry and instruction templates, on prepared versions of real and synthetic data."""
from __future__ import annotations

import collections

import pyarrow as pa
import pytest
import yaml

from stream_helpers import synth_version
from vlit.config import PrepareConfig
from vlit.corpus.prepare import prepare_corpus
from vlit.corpus.tasks import TaskRegistry, TemplateError, TemplateSet, format_options, load_templates
from vlit.versions import CorpusVersion

# Real Vision-Flan raw rows (../shared): one with options, one with input text, one with both.
RAW_TASKS = {
    "Winoground+image_captioning": "options",
    "Clevr+Question_Answering": "input_text",
    "GEOMETRY3K+geometry_question_answer": "both",
}
TEMPLATES = {
    task: [
        "Look closely. {input_text} Options: {options}",
        "Q: {input_text}\nChoose from {options}.",
        "{options} -- which fits? Context: {input_text}",
        "Answer briefly: {input_text} {options} {{literal braces}}",
    ]
    for task in RAW_TASKS
}


@pytest.fixture(scope="module")
def raw_table(sample_dir, tmp_path_factory) -> pa.Table:
    out = tmp_path_factory.mktemp("raw")
    summary = prepare_corpus(
        PrepareConfig(sources=[str(sample_dir / "metadata.json")], format="vision-flan-raw"), str(out)
    )
    return CorpusVersion.open(summary["version"]).read_table()


def test_registry_counts_tasks_and_datasets(tmp_path):
    version, _ = synth_version(str(tmp_path))
    registry = TaskRegistry.from_version(version).to_dict()
    assert {t: v["instances"] for t, v in registry["tasks"].items()} == version.task_counts
    assert registry["instances"] == version.rows == 120
    assert registry["task_count"] == 6
    # Vision-Flan naming: the dataset is the part of the task name before '+'.
    assert all(v["datasets"] == [t.split("+")[0]] for t, v in registry["tasks"].items())


def test_synth_templates_load(tmp_path):
    synth = synth_version(str(tmp_path), instances=30, tasks=5)[1]
    templates = load_templates(synth["templates"])
    assert len(templates) == 5 and all(len(v) == 3 for v in templates.values())


@pytest.mark.parametrize(
    "doc, expected",
    [
        ({"a+ok": ["{input_text}"], "b+bad": ["fine {options}", "{answer} here"]}, "'b+bad', template 1: unknown slot {answer}"),
        ({"c+bad": "just a string"}, "'c+bad': expected a non-empty list"),
        ({"d+bad": []}, "'d+bad': expected a non-empty list"),
        ({"e+bad": ["ok", 7]}, "'e+bad', template 1: expected a string"),
        ({"f+bad": ["{input_text!r}"]}, "'f+bad', template 0: unknown slot"),
        ({"g+bad": ["<image>\n{input_text}"]}, "'g+bad', template 0: must not contain <image>"),
        ({"h+bad": ["{input_text"]}, "'h+bad', template 0:"),
        (["not", "a", "mapping"], "top level must map task names"),
    ],
)
def test_bad_templates_name_task_and_index(tmp_path, doc, expected):
    path = tmp_path / "templates.yaml"
    path.write_text(yaml.safe_dump(doc))
    with pytest.raises(TemplateError) as err:
        load_templates(str(path))
    assert expected in str(err.value) and str(path) in str(err.value)


def test_format_options_is_vectorized_and_labels_past_z():
    options = pa.array([["x", "y"], None, [], [None, "z"], [str(i) for i in range(28)]], pa.list_(pa.string()))
    got = format_options(options).to_pylist()
    assert got[:4] == ["(a) x (b) y", "", "", "(a)  (b) z"]
    assert got[4].startswith("(a) 0 (b) 1") and got[4].endswith("(z) 25 (aa) 26 (ab) 27")


def test_render_replaces_first_user_turn_of_raw_rows(raw_table):
    templates = TemplateSet(TEMPLATES)
    rendered = templates.render(raw_table, seed=0, epoch=0)
    before, after = raw_table.to_pylist(), rendered.to_pylist()
    for old, new in zip(before, after):
        if old["task"] not in RAW_TASKS:
            assert new == old  # no templates for the task: untouched
            continue
        user = new["turns"][0]["content"]
        assert user.startswith("<image>\n") == (old["image"] is not None)
        assert user.count("<image>") == (1 if old["image"] else 0)
        assert new["turns"][1:] == old["turns"][1:]  # the answer is kept
        if old["options"]:
            assert "(a) " + old["options"][0] + " (b) " + old["options"][1] in user
        if old["input_text"]:
            assert old["input_text"] in user
        assert "{input_text}" not in user and "{options}" not in user  # slots filled once, values kept verbatim


def test_template_choice_varies_by_epoch_and_is_deterministic(raw_table):
    templates = TemplateSet(TEMPLATES)
    rows = raw_table.filter(pa.compute.is_in(raw_table["task"], pa.array(list(RAW_TASKS))))

    def users(seed, epoch):
        table = templates.render(rows, seed=seed, epoch=epoch)
        return [turns[0]["content"] for turns in table["turns"].to_pylist()]

    assert users(3, 1) == users(3, 1)
    by_epoch = [users(3, epoch) for epoch in range(8)]
    for i in range(rows.num_rows):
        assert len({epoch_users[i] for epoch_users in by_epoch}) > 1, "one phrasing in 8 epochs"
    # The choice is spread over all templates, not stuck on a few.
    choices = templates.choose(pa.array(["Clevr+Question_Answering"] * 400),
                               pa.array([f"k{i}" for i in range(400)]), seed=0, epoch=0)
    assert min(collections.Counter(choices.tolist()).values()) > 60
