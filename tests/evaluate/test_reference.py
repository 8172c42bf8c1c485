"""The released benchmarks' parsers and metrics on hand-made predictions whose scores are
counted by hand (MME acc+, POPE per split, MMBench CircularEval, LLaVA-Bench's judge)."""
import pytest

from vlit.evaluate.llava_bench import llava_bench_scores, parse_review, read_llava_bench, review_messages
from vlit.evaluate.reference import (mme_release_scores, mmbench_scores, parse_mmbench, parse_mme, parse_pope,
                                     pope_release_scores)
from vlit.evaluate.scorers import ScoreError


def row(task, group, answer, prediction, **extra):
    return {"key": f"{task}/{group}/{answer}/{prediction}", "task": task, "group": group, "answer": answer,
            "prediction": prediction, **extra}


def test_mme_parser_is_calculation_py():
    # The whole answer, else "yes"/"no" within its first four characters, else other.
    assert [parse_mme(t) for t in ("Yes", "NO", "yes, it is", "no.", "Not at all", "The answer is yes", "I do")] == \
        ["yes", "no", "yes", "no", "no", "other", "other"]


def test_mme_acc_plus_with_one_image_half_right_and_totals():
    rows = [
        # existence: image a both right; image b right on yes only -> acc 3/4, acc+ 1/2.
        row("existence", "existence/a", "yes", "Yes"), row("existence", "existence/a", "no", "No"),
        row("existence", "existence/b", "yes", "yes, there is"), row("existence", "existence/b", "no", "Yes"),
        # count: one image, its no question unparsed ("other", wrong) -> acc 1/2, acc+ 0.
        row("count", "count/c", "yes", "Yes"), row("count", "count/c", "no", "I cannot tell"),
        # code_reasoning (cognition): both right -> 200.
        row("code_reasoning", "code_reasoning/d", "yes", "yes."), row("code_reasoning", "code_reasoning/d", "no", "no"),
    ]
    m = mme_release_scores(rows)
    assert m["existence.acc"] == 0.75 and m["existence.acc_plus"] == 0.5 and m["existence.score"] == 125.0
    assert m["count.score"] == 50.0 and m["code_reasoning.score"] == 200.0
    assert m["perception"] == 175.0 and m["cognition"] == 200.0 and m["other"] == 1.0


def test_pope_parser_and_metrics_per_split():
    # POPE's evaluate.py: first sentence, commas dropped; "No"/"not"/"no" as a word -> no, else yes.
    assert [parse_pope(t) for t in ("No, there is not.", "Yes. No.", "There is no dog", "Nope", "Not at all")] == \
        ["no", "yes", "no", "yes", "yes"]
    rows = [row("random", "1", "yes", "Yes"), row("random", "2", "yes", "No, there is not."),
            row("random", "3", "no", "Yes"), row("random", "4", "no", "No"),
            row("adversarial", "5", "yes", "There is a dog."), row("adversarial", "6", "no", "I see a cat"),
            row("adversarial", "7", "yes", "yes"), row("adversarial", "8", "no", "There is no dog")]
    m = pope_release_scores(rows)
    # random: tp 1, fp 1, fn 1, tn 1; adversarial: tp 2, fp 1, fn 0, tn 1.
    assert m == pytest.approx({
        "random.accuracy": 0.5, "random.precision": 0.5, "random.recall": 0.5, "random.f1": 0.5, "random.yes_ratio": 0.5,
        "adversarial.accuracy": 0.75, "adversarial.precision": 2 / 3, "adversarial.recall": 1.0,
        "adversarial.f1": 0.8, "adversarial.yes_ratio": 0.75})


OPTIONS = {"A": "red apple", "B": "blue", "C": "green", "D": "yellow"}


def test_mmbench_extraction_is_vlmevalkits():
    assert [parse_mmbench(t, OPTIONS) for t in ("B", "(C) green", "D.", "The answer is a red apple",
                                                "A or B", "Cannot determine the answer", "purple")] == \
        ["B", "C", "D", "A", "other", "Z", "other"]


def _rotations(question, category, options, correct, predictions):
    """Rows of every rotation of `options` (as released.py makes them), answered by `predictions`."""
    letters = "ABCD"[:len(options)]
    rows = []
    for k, prediction in enumerate(predictions):
        texts = [options[(i + k) % len(options)] for i in range(len(options))]
        rows.append(row(category, question, letters[texts.index(correct)], prediction,
                        labels=list(letters), options=texts))
    return rows


def test_mmbench_circular_one_question_right_in_three_of_four_rotations_and_unmatched():
    # q1 (4 options, answer "cat"): right under rotations 0-2, unmatched under rotation 3
    # -> wrong. q2 (2 options): right under both, once by the option's text -> right.
    q1 = _rotations("1", "attribute", ["cat", "dog", "cow", "pig"], "cat", ["A", "(D)", "C. cow", "I cannot tell"])
    q1[1]["prediction"], q1[2]["prediction"] = "D", "C"  # rotation 1 puts cat at D, rotation 2 at C
    q2 = _rotations("2", "ocr", ["STOP", "GO"], "GO", ["B", "It says go"])
    m = mmbench_scores(q1 + q2)
    assert m["accuracy"] == 0.5 and m["attribute.accuracy"] == 0.0 and m["ocr.accuracy"] == 1.0
    assert m["single"] == pytest.approx(5 / 6) and m["unmatched"] == 1.0
    with pytest.raises(ScoreError, match="lacks"):
        mmbench_scores([{"key": "k", "task": "x", "group": "1", "answer": "A"}])


def test_llava_bench_relative_score_and_unparseable_judge_replies():
    assert parse_review("8 6\nAssistant 1 is more detailed.") == (8.0, 6.0)
    # LLaVA's parse_score: commas become spaces, then exactly two space-separated fields.
    assert parse_review("7,7") == (7.0, 7.0) and parse_review("7, 7") is None
    assert parse_review("Assistant 1: 8") is None and parse_review("8 six") is None and parse_review(None) is None
    reviews = [{"category": "conv", "review": "8 6\nreason"}, {"category": "conv", "review": "7,7\nreason"},
               {"category": "detail", "review": "Assistant 1: 8\nAssistant 2: 3"},  # unparseable: counted, not scored
               {"category": "detail", "review": "9 3\nreason"}, {"category": "complex", "review": None}]  # failed call
    m = llava_bench_scores(reviews)
    assert m["unparsed"] == 1.0 and m["failed"] == 1.0 and "complex.relative" not in m
    assert m["conv.relative"] == pytest.approx(100 * 6.5 / 7.5) and m["detail.relative"] == pytest.approx(100 / 3)
    assert m["all.reference"] == 8.0 and m["all.relative"] == pytest.approx(100 * (16 / 3) / 8)


def write_llava_bench(root):
    (root / "questions.jsonl").write_text(
        '{"question_id": 0, "image": "001.jpg", "text": "What is unusual?", "category": "complex"}\n'
        '{"question_id": 1, "image": "001.jpg", "text": "Describe the scene.", "category": "detail"}\n')
    (root / "context.jsonl").write_text('{"id": "001", "image": "001.jpg", "caption": "A man irons on a taxi."}\n')
    (root / "answers_gpt4.jsonl").write_text('{"question_id": 0, "text": "Ironing on a moving car."}\n'
                                             '{"question_id": 1, "text": "A taxi in a street."}\n')


def test_llava_bench_reader_and_judge_prompt(tmp_path):
    write_llava_bench(tmp_path)
    q, _ = read_llava_bench(str(tmp_path))
    assert q["category"] == "complex" and q["image"] == f"{tmp_path}/images/001.jpg"
    system, user = review_messages(q, "A man.")
    assert system["role"] == "system" and user["content"].startswith(
        "[Context]\nA man irons on a taxi.\n\n[Question]\nWhat is unusual?\n\n"
        "[Assistant 1]\nIroning on a moving car.\n\n[End of Assistant 1]\n\n[Assistant 2]\nA man.\n\n")
    assert "a single line containing only two values" in user["content"]
    from vlit.config import ConfigError

    with pytest.raises(ConfigError, match=r"answers_claude.jsonl: LLaVA-Bench reference answers_claude.jsonl is missing"):
        read_llava_bench(str(tmp_path), "answers_claude.jsonl")


@pytest.mark.timeout(180)
def test_llava_bench_reviews_through_the_serve_app(ray_local, tmp_path):
    # The reviewer is a scripted generator of a real Serve app: one parseable review and
    # one that is not, which is counted and left out of the relative score.
    from ray import serve

    from support.s3 import free_port
    from vlit.config import ServeConfig
    from vlit.evaluate.llava_bench import judge
    from vlit.serve.app import start

    write_llava_bench(tmp_path)
    rows = read_llava_bench(str(tmp_path))
    small = {"num_cpus": 0.1, "max_ongoing_requests": 8, "batch": {"max_batch_size": 4}}
    scripts = {"What is unusual?": ["8 6\nAssistant 2 misses the ironing."], "Describe the scene.": ["Both are fine."]}
    start(ServeConfig.model_validate({"app_name": "bench", "http": {"host": "127.0.0.1", "port": free_port()},
                                      "generators": {"reviewer": {"backend": {"kind": "reference", "scripts": scripts},
                                                                  "max_new_tokens": 1024, "deployment": small}}}))
    try:
        reviews = judge(rows, {0: "A man.", 1: "A street."}, "reviewer", app_name="bench")
    finally:
        serve.delete("bench")
    assert reviews == ["8 6\nAssistant 2 misses the ironing.", "Both are fine."]
    m = llava_bench_scores([{"category": r["category"], "review": v} for r, v in zip(rows, reviews)])
    assert m["failed"] == 0.0 and m["unparsed"] == 1.0 and m["complex.relative"] == 75.0
    assert "detail.relative" not in m


@pytest.mark.timeout(300)
def test_llava_bench_in_the_eval_harness_on_the_tiny_model(ray_local, sample_dir, tmp_path, capsys):
    """`eval.llava_bench` from config: the tiny model answers through a Serve generator over
    the config's model, a scripted reviewer reviews; metrics by category, the published
    prediction table re-scored to the same metrics; a reviewer not served is a config error."""
    import json
    import shutil

    from support.s3 import free_port
    from vlit.config import ConfigError, load_config
    from vlit.evaluate.harness import run_eval, score_predictions
    from vlit.versions import DatasetVersion

    write_llava_bench(tmp_path)
    (tmp_path / "images").mkdir()
    image = next(p for p in sorted((sample_dir / "task_imgs").rglob("*")) if p.suffix.lower() in (".jpg", ".png"))
    shutil.copy(image, tmp_path / "images" / "001.jpg")
    reviewer = {"backend": {"kind": "reference", "scripts": {"What is unusual?": ["7 7\nThe same."],
                                                             "Describe the scene.": ["9,3\nToo short."]}},
                "max_new_tokens": 1024, "deployment": {"num_cpus": 0.1}}
    overrides = [f"run.workdir={tmp_path}/work", f"eval.out={tmp_path}/evals", "eval.suites=[]", "eval.gates={}",
                 f"eval.llava_bench={json.dumps({'path': str(tmp_path), 'reviewer': 'gpt4', 'max_new_tokens': 8})}",
                 f"serve.generators={json.dumps({'gpt4': reviewer})}", "serve.judges={}",
                 f"serve.http.port={free_port()}", "serve.app_name=bench-e2e"]
    metrics = run_eval(load_config("configs/demo.yaml", overrides), None, {}, stage="base")
    assert metrics["llava_bench.complex.relative"] == 100.0 and metrics["llava_bench.detail.relative"] == \
        pytest.approx(100 * 3 / 9)
    assert metrics["llava_bench.all.relative"] == pytest.approx(100 * 10 / 16) and metrics["llava_bench.unparsed"] == 0
    (table,) = [p.parent for p in (tmp_path / "evals" / "predictions").glob("*/manifest.json")]
    rows = DatasetVersion.open(str(table)).read_rows()
    assert [r["review"] for r in rows] == ["7 7\nThe same.", "9,3\nToo short."] and all(r["answer"] for r in rows)
    assert score_predictions(str(table)) == metrics
    with pytest.raises(ConfigError, match="eval.llava_bench.reviewer: 'gpt5' is not among serve.generators"):
        load_config("configs/demo.yaml", [*overrides, "eval.llava_bench.reviewer=gpt5"])
