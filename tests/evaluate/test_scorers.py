"""The scorers on hand-made predictions whose scores are known by counting."""
import pytest

from vlit.evaluate.gates import GateFailed, check_gates, enforce_gates
from vlit.evaluate.report import comparison_table
from vlit.evaluate.scorers import (ScoreError, accuracy_and_chance, accuracy_by_task, circular_scores, forgetting,
                                   mme_scores, pope_scores)


def yn(task, group, answer, prediction):
    return {"key": f"{task}/{group}/{answer}", "task": task, "group": group, "answer": answer, "prediction": prediction}


def test_mme_acc_and_acc_plus():
    # existence: 4 images, 3 with both questions right, 1 with its "no" question wrong:
    # acc 7/8, acc+ 3/4. count: 2 images, one right on yes only, one wrong on both: acc 1/4, acc+ 0.
    rows = [yn("existence", g, a, a) for g in "abc" for a in ("yes", "no")]
    rows += [yn("existence", "d", "yes", "yes"), yn("existence", "d", "no", "yes")]
    rows += [yn("count", "a", "yes", "yes"), yn("count", "a", "no", "yes"),
             yn("count", "b", "yes", "no"), yn("count", "b", "no", "other")]
    s = mme_scores(rows)
    assert s["existence.acc"] == 7 / 8 and s["existence.acc_plus"] == 0.75
    assert s["existence.score"] == pytest.approx(100 * (7 / 8 + 0.75))
    assert s["count.acc"] == 0.25 and s["count.acc_plus"] == 0.0
    assert s["acc"] == pytest.approx((7 / 8 + 0.25) / 2) and s["acc_plus"] == pytest.approx(0.375)
    assert s["score"] == pytest.approx(s["existence.score"] + s["count.score"])


def test_pope_splits():
    # random: 4 positives, 4 negatives; says yes to 3 positives and 1 negative.
    random = [yn("random", i, "yes", "yes" if i < 3 else "no") for i in range(4)]
    random += [yn("random", 10 + i, "no", "yes" if i == 0 else "no") for i in range(4)]
    # adversarial: a yes-sayer. popular: one "other" on a positive (not a yes).
    adversarial = [yn("adversarial", i, a, "yes") for i, a in enumerate(["yes", "yes", "no", "no"])]
    popular = [yn("popular", 0, "yes", "other"), yn("popular", 1, "yes", "yes"), yn("popular", 2, "no", "no")]
    s = pope_scores(random + adversarial + popular)
    assert s["random.accuracy"] == 6 / 8
    assert s["random.precision"] == 3 / 4 and s["random.recall"] == 3 / 4 and s["random.f1"] == pytest.approx(0.75)
    assert s["random.yes_ratio"] == 4 / 8
    assert s["adversarial.accuracy"] == 0.5 and s["adversarial.recall"] == 1.0 and s["adversarial.yes_ratio"] == 1.0
    assert s["adversarial.precision"] == 0.5 and s["adversarial.f1"] == pytest.approx(2 / 3)
    assert s["popular.accuracy"] == 2 / 3 and s["popular.precision"] == 1.0 and s["popular.recall"] == 0.5
    assert set(k.split(".")[0] for k in s) == {"random", "popular", "adversarial"}


def test_circular_needs_every_rotation():
    # q1 (4 rotations) all right; q2 right on 3 of 4; q3 (3 options) all right; q4 none right.
    def rot(task, q, answers, predictions):
        return [{"key": f"{q}/{i}", "task": task, "group": q, "answer": a, "prediction": p}
                for i, (a, p) in enumerate(zip(answers, predictions))]

    rows = rot("color_choice", "q1", "abcd", "abcd") + rot("color_choice", "q2", "dabc", "dabb")
    rows += rot("shape_choice", "q3", "cab", "cab") + rot("shape_choice", "q4", "bca", "aaa")
    s = circular_scores(rows)
    assert s["color_choice.accuracy"] == 0.5 and s["color_choice.single"] == 7 / 8
    assert s["shape_choice.accuracy"] == 0.5 and s["shape_choice.single"] == 4 / 6
    assert s["accuracy"] == 0.5 and s["single"] == 11 / 14
    # A model that always answers "a" is right once per question, never circularly.
    always_a = [dict(r, prediction="a") for r in rows]
    assert circular_scores(always_a)["accuracy"] == 0.0 and circular_scores(always_a)["single"] == 4 / 14


def test_forgetting_deltas():
    before = accuracy_by_task([yn("color", i, "red", "red" if i < 3 else "blue") for i in range(4)]
                              + [yn("shape", i, "circle", "circle" if i < 2 else "square") for i in range(4)])
    assert before == {"color.accuracy": 0.75, "shape.accuracy": 0.5, "accuracy": 0.625}
    after = {"color.accuracy": 0.5, "shape.accuracy": 0.75, "accuracy": 0.625}
    d = forgetting(before, after)
    assert d == {"color.delta": -0.25, "shape.delta": 0.25, "min_delta": -0.25, "mean_delta": 0.0}
    with pytest.raises(ScoreError, match=r"one side only: \['shape'\]"):
        forgetting(before, {"color.accuracy": 0.5})


def test_held_out_tasks_accuracy_beside_chance():
    counts = [str(n) for n in range(5)]
    rows = ([{**yn("object_counting", i, "2", "2" if i < 3 else "4"), "labels": counts} for i in range(4)]
            + [{**yn("object_existence", i, "yes", "yes"), "labels": ["yes", "no"]} for i in range(2)])
    assert accuracy_and_chance(rows) == pytest.approx({
        "object_counting.accuracy": 0.75, "object_existence.accuracy": 1.0, "accuracy": 0.875,
        "object_counting.chance": 0.2, "object_existence.chance": 0.5, "chance": 0.35})


def test_rows_are_checked():
    with pytest.raises(ScoreError, match="no predictions"):
        mme_scores([])
    with pytest.raises(ScoreError, match=r"'x/1/maybe'.*answer 'maybe'"):
        mme_scores([yn("x", 1, "maybe", "yes")])
    with pytest.raises(ScoreError, match=r"row 'k' lacks \['prediction'\]"):
        pope_scores([{"key": "k", "task": "random", "group": 0, "answer": "yes"}])


def test_gates_name_metric_value_and_threshold():
    # Released benchmarks' names beside the synthetic suites' synthetic.<suite>.* names.
    metrics = {"mme.perception": 1100.0, "pope.adversarial.f1": 0.7, "synthetic.forgetting.min_delta": float("nan")}
    gates = {"mme.perception": 1200, "pope.adversarial.f1": 0.5, "mmbench.accuracy": 0.1,
             "synthetic.forgetting.min_delta": -0.1}
    results = check_gates(metrics, gates)
    assert [r.passed for r in results] == [False, True, False, False]
    with pytest.raises(GateFailed) as err:
        enforce_gates(metrics, gates, "stage1")
    assert err.value.reasons == ["mme.perception = 1100.0000 is below its threshold 1200",
                                 "mmbench.accuracy was not measured (gate: >= 0.1)",
                                 "synthetic.forgetting.min_delta was not measured (gate: >= -0.1)"]
    assert "stage stage1 failed" in str(err.value)
    assert enforce_gates(metrics, {"pope.adversarial.f1": 0.5}, "stage1")[0].passed


def test_comparison_table():
    table = comparison_table({"base": {"mme.acc": 0.5, "pope.random.f1": 0.667},
                              "stage1": {"mme.acc": 0.8125, "pope.random.f1": 0.7}})
    lines = table.splitlines()
    assert lines[0].split() == ["metric", "base", "stage1", "change"]
    assert lines[2].split() == ["mme.acc", "0.500", "0.812", "+0.312"]
    assert lines[3].split() == ["pope.random.f1", "0.667", "0.700", "+0.033"]
    assert comparison_table({"only": {"a": 1.0}}).splitlines()[2].split() == ["a", "1.000"]
