"""Scorers: pure functions from predictions to metrics, one per benchmark protocol.

A prediction row is a dict with `task`, `group`, `answer` and `prediction` (and `key`,
named in errors). Predictions are normalized labels: "yes" / "no" for yes/no questions,
an option letter for multiple choice, a class name for classification; anything a
parser could not map is "other" and counts as wrong. They come from likelihood scoring
(`predict.py`), or for the released benchmarks from text through the benchmark's own
parser (`reference.py`), so the same scorers serve a tiny model on CPU and a served 13B
model.

- `mme_scores`: MME. Each image (`group`) has one question whose answer is yes and one
  whose answer is no, per task. acc = right questions / questions; acc+ = images with
  every question right / images; a task's score = 100 * (acc + acc+), and MME's total is
  the sum of its tasks' scores.
- `pope_scores`: POPE. Per negative-sampling split (`task`: random, popular,
  adversarial), accuracy, precision, recall and F1 of "yes", and the yes-ratio (a model
  that says yes to everything has recall 1 and yes-ratio 1: the ratio shows the bias).
- `circular_scores`: MMBench CircularEval. Each rotation of a question's options is one
  row with the same `group`; the question counts as right only if every rotation is.
- `accuracy_by_task` and `forgetting`: the forgetting suite, measured after each stage
  and compared with the model before it.
- `accuracy_and_chance`: the held-out tasks suite, each task's accuracy beside the
  accuracy of guessing among its choices.
"""
from __future__ import annotations

from collections import defaultdict
from typing import Iterable

OTHER = "other"  # a prediction no parser could map to a label
YES, NO = "yes", "no"


class ScoreError(ValueError):
    """Predictions a scorer cannot score; the message names the row."""


# ---------------------------------------------------------------- scorers

def _check(rows: Iterable[dict], allowed: set[str] | None = None) -> list[dict]:
    rows = list(rows)
    if not rows:
        raise ScoreError("no predictions to score")
    for i, row in enumerate(rows):
        missing = [k for k in ("task", "group", "answer", "prediction") if k not in row]
        if missing:
            raise ScoreError(f"prediction row {row.get('key', i)!r} lacks {missing}")
        if allowed is not None and row["answer"] not in allowed:
            raise ScoreError(f"prediction row {row.get('key', i)!r}: answer {row['answer']!r} is not one of {sorted(allowed)}")
    return rows


def _by(rows: list[dict], field: str) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = defaultdict(list)
    for row in rows:
        out[row[field]].append(row)
    return dict(sorted(out.items()))


def _right(row: dict) -> bool:
    return row["prediction"] == row["answer"]


def _all_right_rate(rows: list[dict]) -> float:
    groups = _by(rows, "group")
    return sum(all(_right(r) for r in g) for g in groups.values()) / len(groups)


def mme_scores(rows: Iterable[dict]) -> dict[str, float]:
    """{acc, acc_plus, score, <task>.acc, <task>.acc_plus, <task>.score}; acc and acc_plus
    overall are means over tasks, score is the sum of the tasks' scores (MME's total)."""
    rows = _check(rows, {YES, NO})
    out: dict[str, float] = {}
    for task, task_rows in _by(rows, "task").items():
        acc = sum(map(_right, task_rows)) / len(task_rows)
        acc_plus = _all_right_rate(task_rows)
        out.update({f"{task}.acc": acc, f"{task}.acc_plus": acc_plus, f"{task}.score": 100 * (acc + acc_plus)})
    tasks = sorted({r["task"] for r in rows})
    out["acc"] = sum(out[f"{t}.acc"] for t in tasks) / len(tasks)
    out["acc_plus"] = sum(out[f"{t}.acc_plus"] for t in tasks) / len(tasks)
    out["score"] = sum(out[f"{t}.score"] for t in tasks)
    return out


def pope_scores(rows: Iterable[dict]) -> dict[str, float]:
    """{<split>.accuracy, .precision, .recall, .f1, .yes_ratio} per split (`task`)."""
    rows = _check(rows, {YES, NO})
    out: dict[str, float] = {}
    for split, split_rows in _by(rows, "task").items():
        said_yes = [r["prediction"] == YES for r in split_rows]
        is_yes = [r["answer"] == YES for r in split_rows]
        tp = sum(p and t for p, t in zip(said_yes, is_yes))
        fp = sum(p and not t for p, t in zip(said_yes, is_yes))
        fn = sum(t and not p for p, t in zip(said_yes, is_yes))
        precision = tp / (tp + fp) if tp + fp else 0.0
        recall = tp / (tp + fn) if tp + fn else 0.0
        out.update({
            f"{split}.accuracy": sum(map(_right, split_rows)) / len(split_rows),
            f"{split}.precision": precision,
            f"{split}.recall": recall,
            f"{split}.f1": 2 * precision * recall / (precision + recall) if precision + recall else 0.0,
            f"{split}.yes_ratio": sum(said_yes) / len(split_rows),
        })
    return out


def circular_scores(rows: Iterable[dict]) -> dict[str, float]:
    """{accuracy, single, <task>.accuracy, <task>.single}: accuracy counts a question
    (`group`) right only when every rotation is; single is plain per-row accuracy."""
    rows = _check(rows)
    out: dict[str, float] = {}
    for task, task_rows in _by(rows, "task").items():
        out[f"{task}.accuracy"] = _all_right_rate(task_rows)
        out[f"{task}.single"] = sum(map(_right, task_rows)) / len(task_rows)
    out["accuracy"] = _all_right_rate(rows)
    out["single"] = sum(map(_right, rows)) / len(rows)
    return out


def accuracy_by_task(rows: Iterable[dict]) -> dict[str, float]:
    """{<task>.accuracy, accuracy}: the forgetting suite's classification tasks; the
    overall accuracy is the mean over tasks."""
    rows = _check(rows)
    out = {f"{task}.accuracy": sum(map(_right, r)) / len(r) for task, r in _by(rows, "task").items()}
    out["accuracy"] = sum(out.values()) / len(out)
    return out


def accuracy_and_chance(rows: Iterable[dict]) -> dict[str, float]:
    """`accuracy_by_task` and the accuracy of guessing, {<task>.chance, chance}: the held-out
    tasks suite, whose questions have from 2 to 12 choices, so "above chance" needs its
    own baseline per task. `labels` of a row are its choices."""
    rows = _check(rows)
    out = accuracy_by_task(rows)
    for task, task_rows in _by(rows, "task").items():
        out[f"{task}.chance"] = sum(1 / len(r["labels"]) for r in task_rows) / len(task_rows)
    chances = [v for k, v in out.items() if k.endswith(".chance")]
    out["chance"] = sum(chances) / len(chances)
    return out


def forgetting(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    """Per-task accuracy change after a stage: {<task>.delta, min_delta, mean_delta}.

    `before` and `after` map task -> accuracy (or are `accuracy_by_task` results). A
    negative delta is forgetting; `min_delta` is the worst task, the one a gate bounds.
    """
    def tasks(m: dict[str, float]) -> dict[str, float]:
        return {k.removesuffix(".accuracy"): v for k, v in m.items() if k != "accuracy"}

    b, a = tasks(before), tasks(after)
    missing = sorted(set(b) ^ set(a))
    if missing:
        raise ScoreError(f"forgetting: tasks measured on one side only: {missing}")
    if not b:
        raise ScoreError("forgetting: no tasks to compare")
    out = {f"{t}.delta": a[t] - b[t] for t in sorted(b)}
    deltas = list(out.values())
    out["min_delta"], out["mean_delta"] = min(deltas), sum(deltas) / len(deltas)
    return out
