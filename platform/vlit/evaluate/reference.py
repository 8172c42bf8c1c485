"""The released benchmarks' own answer parsing and metrics, over vlit's prediction rows.

A prediction is text: a label from likelihood scoring (`predict.py`: "yes", "B") or a
generated reply. Each benchmark's reference parser maps it to a label first, so a scorer
change or a generated answer is scored as the benchmark's own script would score it:

- MME (MME_Benchmark_release_version/eval_tool/calculation.py, `parse_pred_ans`): the
  lowercased answer is "yes" or "no", else its first four characters contain "yes" or
  "no" (in that order), else "other" (wrong either way).
- POPE (POPE's evaluate.py; LLaVA's eval_pope.py): the first sentence, commas removed,
  split on spaces; a word "No", "not" or "no" means no, anything else yes.
- MMBench (VLMEvalKit vlmeval/utils/matching_util.py, `can_infer`): the option letter
  standing alone after .()[],:;!*#{} become spaces and exactly one letter is there (a
  refusal phrase maps to "Z"); else exactly one option's text inside the lowercased
  answer; else unmatched ("other", counted as `unmatched` and wrong).

Metrics (prefixed by the benchmark's name by the harness):
- mme: per subtask acc, acc_plus, score (= 100 * (acc + acc_plus), calculation.py), and
  `perception` / `cognition`, the sums of their subtasks' scores; `other`, the number
  of answers that parsed to neither.
- pope: `scorers.pope_scores` per split (accuracy, precision, recall, F1, yes-ratio).
- mmbench: CircularEval per category and overall (`accuracy`), plain per-row accuracy
  (`single`) beside it, and `unmatched`.
"""
from __future__ import annotations

import re
from typing import Iterable

from vlit.config import MME_COGNITION, MME_PERCEPTION
from vlit.evaluate.scorers import NO, OTHER, YES, ScoreError, circular_scores, mme_scores, pope_scores

# VLMEvalKit's can_infer_option: replies that refuse to answer count as option "Z".
REFUSALS = ("Sorry, I can't help with images of people yet.", "I can't process this file.",
            "I'm sorry, but without the image provided", "Cannot determine the answer")


def parse_mme(text: str) -> str:
    """MME's calculation.py `parse_pred_ans`, after its `.lower()`."""
    answer = text.lower()
    if answer in (YES, NO):
        return answer
    if YES in answer[:4]:
        return YES
    if NO in answer[:4]:
        return NO
    return OTHER


def parse_pope(text: str) -> str:
    """POPE's evaluate.py: no "other" here; whatever is not a negation is a yes."""
    first = text.split(".")[0] if "." in text else text
    words = first.replace(",", "").split(" ")
    return NO if {"No", "not", "no"} & set(words) else YES


def parse_mmbench(text: str, options: dict[str, str]) -> str:
    """VLMEvalKit's `can_infer` (option letter, then option text); OTHER when neither.
    `options` maps an upper-case letter to its option text."""
    if any(refusal in text for refusal in REFUSALS):
        return "Z"
    splits = re.sub(r"[.()\[\],:;!*#{}]", " ", text).split()
    named = [letter for letter in options if letter in splits]
    if len(named) == 1:
        return named[0]
    if not named and splits.count("Z") == 1:
        return "Z"
    low = text.lower()
    by_text = [letter for letter, option in options.items() if str(option).lower() in low]
    return by_text[0] if len(by_text) == 1 else OTHER


def _parsed(rows: Iterable[dict], parse) -> list[dict]:
    out = []
    for row in rows:
        if "prediction" not in row:
            raise ScoreError(f"prediction row {row.get('key')!r} lacks ['prediction']")
        out.append({**row, "text": row["prediction"], "prediction": parse(row)})
    if not out:
        raise ScoreError("no predictions to score")
    return out


def mme_release_scores(rows: Iterable[dict]) -> dict[str, float]:
    """MME as calculation.py scores it; `task` is the subtask, `group` the image."""
    rows = _parsed(rows, lambda r: parse_mme(r["prediction"]))
    out = {k: v for k, v in mme_scores(rows).items() if k.count(".") == 1}  # per subtask
    tasks = {r["task"] for r in rows}
    for name, members in (("perception", MME_PERCEPTION), ("cognition", MME_COGNITION)):
        if tasks & set(members):
            out[name] = sum(out[f"{t}.score"] for t in members if t in tasks)
    out["other"] = float(sum(r["prediction"] == OTHER for r in rows))
    return out


def pope_release_scores(rows: Iterable[dict]) -> dict[str, float]:
    """POPE per split (`task`), answers read as POPE's evaluate.py reads them."""
    return pope_scores(_parsed(rows, lambda r: parse_pope(r["prediction"])))


def mmbench_scores(rows: Iterable[dict]) -> dict[str, float]:
    """CircularEval: `group` is the question (index mod 1e6), `task` its category; each
    row's `labels` are its option letters and `options` their texts."""
    rows = _parsed(rows, lambda r: parse_mmbench(r["prediction"], dict(zip(r["labels"], r["options"]))))
    out = circular_scores(rows)
    out["unmatched"] = float(sum(r["prediction"] == OTHER for r in rows))
    return out
