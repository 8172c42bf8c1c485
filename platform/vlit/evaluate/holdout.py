"""Held-out rows of the prepared corpus (`eval.holdout`): out of training, scored per task.

A row is held out when its key hashes below `fraction` (`sampling.held_out`, seeded):
the training stream filters the same rows out before sampling (corpus/stream.py), so
no epoch, block or worker ever trains on them, and this set scores up to `max_per_task`
of them per task, as an evaluation set versioned like the others (sets.py).

Each scored row is a single-turn question with an image; its user turn is the prompt,
its reply the answer. Likelihood scoring needs choices:
- multiple choice (the row's `options`): each option in the reply's own format, the
  option text or "(b) text" (Vision-Flan answers "(d) ...");
- otherwise the task's distinct replies across the corpus when there are at most
  `max_choices` (classification tasks), which makes the task a closed-set question.
Rows fitting neither (captions, open questions), multi-turn or text-only rows and rows
whose image is gone are counted in the manifest (`unscored`), never scored.

Metrics: `holdout.<task>.accuracy` (exact match after `normalize`) and
`holdout.accuracy`, the mean over tasks.
"""
from __future__ import annotations

import hashlib
import re
import string
from collections import Counter, defaultdict
from typing import Iterable

import pyarrow as pa

from vlit import storage
from vlit.config import ConfigError, HoldoutConfig
from vlit.corpus.sampling import held_out
from vlit.evaluate.released import RELEASED_SCHEMA
from vlit.evaluate.scorers import accuracy_by_task
from vlit.evaluate.sets import publish_eval_set
from vlit.versions import CorpusVersion, EvalSet

COLUMNS = ["key", "task", "image", "turns", "options"]


def normalize(text: str) -> str:
    """Lowercase, one space between words, no trailing period: "Yes." and "yes" match."""
    return re.sub(r"\s+", " ", text.strip().lower()).rstrip(".")


def _choices(answer: str, options: list[str] | None, task_answers: list[str], cfg: HoldoutConfig) -> list[str] | None:
    if options:
        for forms in (list(options), [f"({string.ascii_lowercase[i]}) {o}" for i, o in enumerate(options)]):
            if normalize(answer) in map(normalize, forms):
                return forms
        return None
    return task_answers if 2 <= len(task_answers) <= cfg.max_choices else None


def holdout_rows(version: CorpusVersion, cfg: HoldoutConfig) -> tuple[pa.Table, dict[str, bytes], dict]:
    """The set's rows (RELEASED_SCHEMA), images and counts of rows left unscored."""
    table = version.read_table(columns=COLUMNS)
    mask = held_out(table["key"], cfg.fraction, cfg.seed)
    answers = defaultdict(dict)  # task -> normalized reply -> a reply as written
    for task, turns in zip(table["task"].to_pylist(), table["turns"].to_pylist()):
        if len(turns) == 2:
            answers[task].setdefault(normalize(turns[1]["content"]), turns[1]["content"])
    rows, images, unscored, per_task = [], {}, Counter(), Counter()
    for r in sorted(table.filter(pa.array(mask)).to_pylist(), key=lambda r: r["key"]):
        if per_task[r["task"]] >= cfg.max_per_task:
            continue
        if len(r["turns"]) != 2 or r["image"] is None:
            unscored["not_single_turn_with_image"] += 1
            continue
        answer = r["turns"][1]["content"]
        labels = _choices(answer, r["options"], sorted(answers[r["task"]].values()), cfg)
        if labels is None:
            unscored["no_choices"] += 1
            continue
        try:
            data = storage.read_bytes(r["image"])
        except FileNotFoundError:
            unscored["image_missing"] += 1
            continue
        image = f"images/{r['key']}"
        images[image] = data
        per_task[r["task"]] += 1
        rows.append({"key": f"holdout/{r['key']}", "suite": "holdout", "task": r["task"], "group": r["key"],
                     "image": image, "image_sha256": hashlib.sha256(data).hexdigest(), "prompt": r["turns"][0]["content"],
                     "labels": labels, "choices": [[c] for c in labels], "options": labels,
                     "answer": next(c for c in labels if normalize(c) == normalize(answer))})
    return pa.Table.from_pylist(rows, schema=RELEASED_SCHEMA), images, dict(unscored)


def build_holdout_set(corpus_uri: str | None, cfg: HoldoutConfig, out: str) -> EvalSet:
    """OUT/holdout-<digest>/ from the corpus version at `corpus_uri`."""
    if corpus_uri is None:
        raise ConfigError("eval.holdout needs a prepared corpus: corpus.version, or the job's corpus stage")
    version = CorpusVersion.open(corpus_uri)
    table, images, unscored = holdout_rows(version, cfg)
    if table.num_rows == 0:
        raise ConfigError(f"eval.holdout: no held-out row of {version.uri} can be scored (left out: {unscored})")
    return publish_eval_set("holdout", table, images, out, {"corpus": version.uri, "corpus_digest": version.digest,
                                                            "holdout": cfg.model_dump(), "unscored": unscored})


def holdout_scores(rows: Iterable[dict]) -> dict[str, float]:
    """Per-task exact match after `normalize` (a generated reply is matched as written)."""
    return accuracy_by_task([{**r, "prediction": normalize(r["prediction"]), "answer": normalize(r["answer"])}
                             for r in rows])

