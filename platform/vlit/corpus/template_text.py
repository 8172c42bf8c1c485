"""Task-template text: the sentences a task repeats in its instructions (for L2T).

L2T supervises instruction tokens too, but not the text a task's template repeats in
every row (learning to reproduce "Options:" boilerplate teaches nothing). Template text
is found corpus-wide, per task: split the first user turn of every row into sentences;
a sentence is template text when it occurs in at least `template_min_fraction` of the
task's rows and the task has at least `template_min_rows` rows (below that, frequency
says nothing). One Ray Data aggregation per corpus version and parameter set; the result
is stored with the version and reused:

    <version uri>/template_text/<params hash>.json   {"params": ..., "tasks": {task: [sentence, ...]}}
"""
from __future__ import annotations

import hashlib
import json
import re

import pyarrow as pa
import ray

from vlit import storage
from vlit.config import LossConfig
from vlit.corpus.schema import IMAGE_TOKEN

TEMPLATE_DIR = "template_text"
# Bump when the sentence rule changes: stored results of the old rule stop matching.
SPLITTER_VERSION = 1
# Sentences end at a newline, at the image placeholder, or after . ! ? followed by
# whitespace (so "3.5" or "e.g.," stay whole).
_BOUNDARY = re.compile(r"\n|" + re.escape(IMAGE_TOKEN) + r"|(?<=[.!?])\s+")


def sentence_spans(text: str) -> list[tuple[int, int]]:
    """(start, end) character spans of the sentences of `text`, whitespace stripped."""
    spans, start = [], 0
    for end, next_start in [(m.start(), m.end()) for m in _BOUNDARY.finditer(text)] + [(len(text), len(text))]:
        piece = text[start:end]
        lo, hi = start + len(piece) - len(piece.lstrip()), start + len(piece.rstrip())
        if hi > lo:
            spans.append((lo, hi))
        start = next_start
    return spans


def sentences(text: str) -> list[str]:
    return [text[lo:hi] for lo, hi in sentence_spans(text)]


def first_user_turn(turns) -> str:
    for turn in turns:
        if turn["role"] == "user":
            return turn["content"]
    return ""


def _params(cfg: LossConfig) -> dict:
    return {
        "min_fraction": cfg.template_min_fraction,
        "min_rows": cfg.template_min_rows,
        "splitter": SPLITTER_VERSION,
    }


def template_uri(version, cfg: LossConfig) -> str:
    digest = hashlib.sha256(json.dumps(_params(cfg), sort_keys=True).encode()).hexdigest()[:16]
    return storage.join(version.uri, TEMPLATE_DIR, f"{digest}.json")


def _row_sentences(batch: pa.Table, eligible: set[str]) -> dict:
    """(task, sentence) once per row that contains it, so counts are row counts."""
    tasks, out = [], []
    for task, turns in zip(batch["task"].to_pylist(), batch["turns"].to_pylist()):
        if task not in eligible:
            continue
        for sentence in sorted(set(sentences(first_user_turn(turns)))):
            tasks.append(task)
            out.append(sentence)
    return {"task": tasks, "sentence": out}


def _aggregate(version, cfg: LossConfig) -> dict[str, set[str]]:
    rows = version.task_counts
    eligible = {t for t, n in rows.items() if n >= cfg.template_min_rows}
    if not eligible:
        return {}
    fs, _ = storage.filesystem(version.uri)
    paths = [storage.filesystem(uri)[1] for uri in version.shard_uris]
    counts = (
        ray.data.read_parquet(paths, filesystem=fs, columns=["task", "turns"])
        .map_batches(_row_sentences, fn_kwargs={"eligible": eligible}, batch_format="pyarrow")
        # One partition: the distinct (task, sentence) pairs are few; more only add shuffle tasks.
        .groupby(["task", "sentence"], num_partitions=1)
        .count()
        .take_all()  # one row per distinct (task, sentence): small next to the corpus
    )
    found: dict[str, set[str]] = {}
    for r in counts:
        if r["count()"] >= cfg.template_min_fraction * rows[r["task"]]:
            found.setdefault(r["task"], set()).add(r["sentence"])
    return found


def template_text(version, cfg: LossConfig) -> dict[str, set[str]]:
    """Template sentences per task of `version`: loaded when stored, else aggregated with
    Ray Data (Ray must be initialized) and stored."""
    uri = template_uri(version, cfg)
    if storage.exists(uri):
        return {task: set(s) for task, s in storage.read_json(uri)["tasks"].items()}
    found = _aggregate(version, cfg)
    storage.write_json(uri, {"params": _params(cfg), "tasks": {t: sorted(s) for t, s in sorted(found.items())}})
    return found
