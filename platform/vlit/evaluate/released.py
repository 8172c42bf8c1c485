"""Released benchmarks read from their own files into evaluation sets (`eval.benchmarks`).

Each reader turns a release (local or s3://, through vlit.storage) into rows of
RELEASED_SCHEMA (EVAL_SCHEMA plus each choice's option text) and the images they name;
`build_benchmark_set` versions them as OUT/<benchmark>-<digest>/ with the images copied
in, so a run that names the digest names the exact questions and pixels (as sets.py).

- mme: the release folder, one folder per subtask holding either images/ and
  questions_answers_YN/, or images and .txt files side by side; a question file is named
  as its image and holds lines `question<TAB>Yes|No`. Rows: task = subtask, group = image.
- pope: coco_pope_<split>.json under `path` (JSON lines: question_id, image, text,
  label) and the images under `images`. Rows: task = split.
- mmbench: the TSV (index, question, hint, A-D, answer, category, base64 image). The
  released dev TSV holds every rotation of a question's options as index + k * 1e6; a
  TSV without them (the single-pass release) gets its rotations made here, the same
  way (option i of rotation k is option i + k). Rows: task = category, group = index mod 1e6.

Prompts are LLaVA-1.5's evaluation prompts (model_vqa_loader / model_vqa_mmbench): MME's
question as released, POPE's with "Answer the question using a single word or phrase.",
MMBench's hint, question, "A. ..." lines and "Answer with the option's letter from the
given choices directly.". A layout that does not match raises ConfigError naming the
path and what is missing.
"""
from __future__ import annotations

import base64
import binascii
import csv
import hashlib
import io
import json
import sys
from collections import defaultdict

import pyarrow as pa

from vlit import storage
from vlit.config import BenchmarkConfig, ConfigError
from vlit.corpus.schema import IMAGE_TOKEN
from vlit.evaluate.sets import EVAL_SCHEMA, YES_NO, publish_eval_set
from vlit.versions import EvalSet

RELEASED_SCHEMA = EVAL_SCHEMA.append(pa.field("options", pa.list_(pa.string()), nullable=False))
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp")
POPE_HINT = "Answer the question using a single word or phrase."
MMBENCH_HINT = "Answer with the option's letter from the given choices directly."
MMBENCH_COLUMNS = ("index", "question", "answer", "category", "image", "A", "B")
ROTATION = 1_000_000  # MMBench's index offset between rotations of one question


class _Rows:
    """Rows and images of one benchmark being read; an image is stored once however many
    questions ask about it."""

    def __init__(self, suite: str):
        self.suite, self.rows, self.images, self._sha = suite, [], {}, {}

    def image(self, relative: str, load) -> str:
        """The stored path of images/<relative>; `load()` gives its bytes, called once."""
        path = f"images/{relative}"
        if path not in self.images:
            data = load()
            self.images[path], self._sha[path] = data, hashlib.sha256(data).hexdigest()
        return path

    def add(self, key: str, task: str, group: str, image: str, prompt: str, labels: list[str],
            choices: list[list[str]], answer: str, options: list[str] | None = None) -> None:
        self.rows.append({"key": f"{self.suite}/{key}", "suite": self.suite, "task": task, "group": group,
                          "image": image, "image_sha256": self._sha[image], "prompt": f"{IMAGE_TOKEN}\n{prompt}",
                          "labels": labels, "choices": choices, "answer": answer, "options": options or labels})

    def yes_no(self, key: str, task: str, group: str, image: str, prompt: str, answer: str) -> None:
        choices, labels = YES_NO
        self.add(key, task, group, image, prompt, labels, choices, answer)


def _read(uri: str, what: str) -> bytes:
    try:
        return storage.read_bytes(uri)
    except FileNotFoundError:
        raise ConfigError(f"{uri}: {what} is missing") from None


def _stem(relative: str) -> str:
    return relative.rsplit("/", 1)[-1].rsplit(".", 1)[0]


def read_mme(bench: BenchmarkConfig) -> _Rows:
    root = storage.normalize(bench.path)
    try:
        files = [u[len(root) + 1:] for u in storage.list_files(root)]
    except FileNotFoundError:
        raise ConfigError(f"{root}: the MME release folder is missing") from None
    by_task = defaultdict(list)
    for relative in files:
        by_task[relative.split("/", 1)[0]].append(relative)
    missing = [t for t in bench.subtasks if t not in by_task]
    if missing:
        raise ConfigError(f"{root}: MME subtask folders missing: {missing} (one folder per subtask; "
                          "eval.benchmarks.mme.subtasks lists the ones to read)")
    out = _Rows("mme")
    for task in bench.subtasks:
        images = {_stem(r): r for r in by_task[task] if r.lower().endswith(IMAGE_SUFFIXES)}
        questions = [r for r in by_task[task] if r.endswith(".txt")]
        if not questions:
            raise ConfigError(f"{root}/{task}: no question files (questions_answers_YN/*.txt, or *.txt beside "
                              "the images)")
        for relative in questions:
            image = images.get(_stem(relative))
            if image is None:
                raise ConfigError(f"{root}/{relative}: no image named {_stem(relative)}.* in {root}/{task}")
            stored = out.image(f"mme/{image}", lambda: _read(f"{root}/{image}", "an MME image"))
            lines = [ln for ln in storage.read_bytes(f"{root}/{relative}").decode("utf-8").splitlines() if ln.strip()]
            for n, line in enumerate(lines):
                question, _, answer = line.rstrip().rpartition("\t")
                if answer.strip().lower() not in ("yes", "no") or not question:
                    raise ConfigError(f"{root}/{relative} line {n + 1}: expected 'question<TAB>Yes|No', got {line!r}")
                out.yes_no(f"{task}/{_stem(relative)}/{n}", task, f"{task}/{_stem(relative)}", stored,
                           question.strip(), answer.strip().lower())
    return out


def read_pope(bench: BenchmarkConfig) -> _Rows:
    if bench.images is None:
        raise ConfigError("eval.benchmarks.pope.images: POPE needs the folder of the images its questions name "
                          "(COCO val2014)")
    out, images = _Rows("pope"), storage.normalize(bench.images)
    for split in bench.splits:
        uri = storage.join(bench.path, f"coco_pope_{split}.json")
        for n, line in enumerate(_read(uri, f"the POPE {split} split file").decode("utf-8").splitlines()):
            if not line.strip():
                continue
            q = json.loads(line)
            missing = [k for k in ("question_id", "image", "text", "label") if k not in q]
            if missing or q["label"] not in ("yes", "no"):
                raise ConfigError(f"{uri} line {n + 1}: a POPE question needs question_id, image, text and a "
                                  f"yes/no label; missing {missing or 'a yes/no label'}")
            stored = out.image(f"pope/{q['image']}", lambda: _read(storage.join(images, q["image"]), "a POPE image"))
            out.yes_no(f"{split}/{q['question_id']}", split, f"{split}/{q['question_id']}", stored,
                       f"{q['text']}\n{POPE_HINT}", q["label"])
    return out


def _present(value: str | None) -> bool:
    return value is not None and value.strip() not in ("", "nan", "NaN", "None")


def _mmbench_rows(uri: str) -> list[dict]:
    csv.field_size_limit(sys.maxsize)  # base64 images are long fields
    reader = csv.DictReader(io.StringIO(_read(uri, "the MMBench TSV").decode("utf-8")), delimiter="\t")
    missing = [c for c in MMBENCH_COLUMNS if c not in (reader.fieldnames or [])]
    if missing:
        raise ConfigError(f"{uri}: the MMBench TSV lacks the columns {missing} (it has {reader.fieldnames})")
    rows = list(reader)
    if not any(int(r["index"]) >= ROTATION for r in rows):  # the single-pass TSV: make the rotations
        rotated = []
        for r in rows:
            letters = [c for c in "ABCD" if _present(r.get(c))]
            for k in range(len(letters)):
                moved = {letters[i]: r[letters[(i + k) % len(letters)]] for i in range(len(letters))}
                answer = letters[(letters.index(r["answer"]) - k) % len(letters)] if r["answer"] in letters else r["answer"]
                rotated.append({**r, **moved, "answer": answer, "index": str(int(r["index"]) + k * ROTATION),
                                "image": r["image"] if k == 0 else r["index"]})
        rows = rotated
    return rows


def read_mmbench(bench: BenchmarkConfig) -> _Rows:
    uri, out = storage.normalize(bench.path), _Rows("mmbench")
    rows = _mmbench_rows(uri)
    by_index = {r["index"]: r for r in rows}
    for r in rows:
        index = int(r["index"])
        letters = [c for c in "ABCD" if _present(r.get(c))]
        if r["answer"] not in letters:
            raise ConfigError(f"{uri}: row index {index}: answer {r['answer']!r} is not one of its options {letters}")
        # VLMEvalKit: a short `image` field is the index of the row holding the image.
        source = by_index.get(r["image"].strip(), r) if len(r["image"]) <= 64 else r
        try:
            stored = out.image(f"mmbench/{index % ROTATION}", lambda: base64.b64decode(source["image"], validate=True))
        except (binascii.Error, ValueError):
            raise ConfigError(f"{uri}: row index {index}: `image` is neither base64 image data nor an index") from None
        hint = f"{r['hint'].strip()}\n" if _present(r.get("hint")) else ""
        options = "".join(f"\n{c}. {r[c].strip()}" for c in letters)
        out.add(str(index), r["category"], str(index % ROTATION), stored,
                f"{hint}{r['question'].strip()}{options}\n{MMBENCH_HINT}", letters, [[c] for c in letters],
                r["answer"], [r[c].strip() for c in letters])
    return out


READERS = {"mme": read_mme, "pope": read_pope, "mmbench": read_mmbench}


def benchmark_rows(name: str, bench: BenchmarkConfig) -> tuple[pa.Table, dict[str, bytes]]:
    """The benchmark's rows (RELEASED_SCHEMA) and images, read into memory."""
    read = READERS[name](bench)
    if not read.rows:
        raise ConfigError(f"{bench.path}: no {name} questions found")
    return pa.Table.from_pylist(read.rows, schema=RELEASED_SCHEMA), read.images


def build_benchmark_set(name: str, bench: BenchmarkConfig, out: str) -> EvalSet:
    """OUT/<name>-<digest>/ from the release's files; an unchanged release reuses it."""
    table, images = benchmark_rows(name, bench)
    return publish_eval_set(name, table, images, out, {"source": bench.model_dump()})
