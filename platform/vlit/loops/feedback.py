"""VLFeedback preference pairs: the pair rule, the released format, and pairs versions.

The rule, as the released VLFeedback recipe builds pairs: the responses to one prompt
(image + instruction) are rated by a judge on three aspects (`RELEASE_ASPECTS`); every two
responses make a pair, the one with the higher mean rating chosen. A judge configured
for fewer aspects (vlit's reference judge rates no ethics) makes pairs by the mean of the
aspects it rated: `build_pairs(aspects=...)`; an unrated aspect is null in the ratings. Equal means are a tie
and make no pair; a response with a rating that is not a number (or is missing) takes
part in no pair. Means are compared exactly (ratings parse as fractions), so "4" and
"4.0" tie and no float rounding invents an order. Ties and excluded responses are
counted in the summary and stored, with their provenance, in excluded.parquet: nothing
leaves silently.

A pairs version is content-addressed like every vlit version (`vlit.versions`:
ROOT/<digest>/, staged, manifest last), the digest that of pairs.parquet:

    DIR/pairs.parquet       one row per pair (PAIR_SCHEMA): prompt id, prompt, image URI,
                            chosen/rejected responses, models, ratings, rationales, judge,
                            source file and line
    DIR/excluded.parquet    ties and unparseable responses (EXCLUDED_SCHEMA)
    DIR/quarantine.parquet  input lines that are not VLFeedback rows (the corpus's schema)
    DIR/summary.json        prompts, pairs, ties, unparseable, quarantined, digest, ...
    DIR/manifest.json       written last

The digest is what DPO trains on, and the key of the reference log-prob cache
(`vlit.train.reference`).
"""
from __future__ import annotations

import io
import itertools
import json
from collections import Counter
from dataclasses import dataclass
from fractions import Fraction

import pyarrow as pa
import pyarrow.parquet as pq

from vlit import storage, versions
from vlit.config import ASPECT_NAMES
from vlit.corpus.images import ImageChecker
from vlit.digest import TableDigest
from vlit.versions import QUARANTINE_SCHEMA, PairsVersion, quarantine_row

RELEASE_ASPECTS = tuple(ASPECT_NAMES.values())  # the aspects as the released rows name them
# The judge id of ratings that came with released rows (the CLI's default).
RELEASE_JUDGE = "vlfeedback-release"
PAIRS, EXCLUDED = PairsVersion.TABLE, "excluded.parquet"
SCHEMA_VERSION = 1
FLUSH_PROMPTS = 4096  # prompts per image check and Parquet row group: bounded memory

PAIR_SCHEMA = pa.schema(
    [
        pa.field("pair_id", pa.string(), nullable=False),  # "<prompt id>:<chosen index>><rejected index>"
        pa.field("prompt_id", pa.string(), nullable=False),
        pa.field("prompt", pa.string(), nullable=False),
        pa.field("image", pa.string()),  # absolute URI; null for a text-only prompt
        pa.field("chosen", pa.string(), nullable=False),
        pa.field("rejected", pa.string(), nullable=False),
        pa.field("chosen_model", pa.string()),
        pa.field("rejected_model", pa.string()),
        pa.field("chosen_score", pa.float64(), nullable=False),  # mean of the ratings
        pa.field("rejected_score", pa.float64(), nullable=False),
        pa.field("chosen_ratings", pa.list_(pa.float64())),  # in RELEASE_ASPECTS order
        pa.field("rejected_ratings", pa.list_(pa.float64())),
        pa.field("chosen_rationales", pa.list_(pa.string())),
        pa.field("rejected_rationales", pa.list_(pa.string())),
        pa.field("judge", pa.string(), nullable=False),
        # Provenance; also what the stream's quarantine names (`source#position`).
        pa.field("source", pa.string(), nullable=False),
        pa.field("position", pa.int64(), nullable=False),  # 0-based line of the JSONL source
    ],
    metadata={"vlit.aspects": json.dumps(RELEASE_ASPECTS), "vlit.schema_version": str(SCHEMA_VERSION)},
)

EXCLUDED_SCHEMA = pa.schema(
    [
        pa.field("reason", pa.string(), nullable=False),  # "tie" | "unparseable_rating"
        pa.field("prompt_id", pa.string(), nullable=False),
        pa.field("index", pa.int64(), nullable=False),  # the response's place in `completions`
        pa.field("model", pa.string()),
        pa.field("other_index", pa.int64()),  # a tie's other response
        pa.field("other_model", pa.string()),
        pa.field("score", pa.float64()),  # the tied mean; null when unparseable
        pa.field("ratings", pa.list_(pa.string())),  # as the judge wrote them, RELEASE_ASPECTS order
        pa.field("detail", pa.string()),
        pa.field("judge", pa.string(), nullable=False),
        pa.field("source", pa.string(), nullable=False),
        pa.field("position", pa.int64(), nullable=False),
    ]
)


class FeedbackError(ValueError):
    """Input that cannot become a pairs version; the message names the file."""


@dataclass(frozen=True)
class Response:
    model: str | None
    text: str | None
    ratings: tuple  # raw values, RELEASE_ASPECTS order (None: the aspect is missing)
    rationales: tuple


def parse_rating(value) -> Fraction | None:
    """A judge's rating as an exact number, or None when it is not one ("N/A", "", None).
    A rating is what the release's own `float()` reads ("4", "4.0", "4.5"; not "4/5",
    "nan" or "inf"), kept exact as a fraction of its decimal digits."""
    if isinstance(value, bool) or value is None:
        return None
    text = str(value).strip()
    try:
        float(text)
        return Fraction(text)
    except (ValueError, ZeroDivisionError):
        return None


def _unparseable(response: Response, aspects: tuple[str, ...] = RELEASE_ASPECTS) -> str | None:
    """Why a response takes part in no pair, or None."""
    if not isinstance(response.text, str):
        return "no response text"
    bad = [f"{a}: {r!r}" for a, r in zip(RELEASE_ASPECTS, response.ratings)
           if a in aspects and parse_rating(r) is None]
    return f"non-numeric rating ({'; '.join(bad)})" if bad else None


def _rated(response: Response, aspects: tuple[str, ...]) -> list:
    return [r for a, r in zip(RELEASE_ASPECTS, response.ratings) if a in aspects]


def pair_prompt(responses: list[Response], aspects: tuple[str, ...] = RELEASE_ASPECTS):
    """The pair rule for one prompt's responses, over the judge's `aspects` (release names).

    Returns (scores, pairs, ties, unparseable): the mean rating of each response (None
    when excluded), (chosen, rejected) index pairs, tied (i, j) index pairs, and the
    indices of excluded responses. Pairs and ties come in the order i < j of the input.
    """
    scores = [None if _unparseable(r, aspects) else sum(parse_rating(x) for x in _rated(r, aspects)) / len(aspects)
              for r in responses]
    pairs, ties = [], []
    for i, j in itertools.combinations([i for i, s in enumerate(scores) if s is not None], 2):
        if scores[i] == scores[j]:
            ties.append((i, j))
        else:
            pairs.append((i, j) if scores[i] > scores[j] else (j, i))
    return scores, pairs, ties, [i for i, s in enumerate(scores) if s is None]


def _response(completion) -> Response:
    if not isinstance(completion, dict):
        return Response(None, None, (None,) * len(RELEASE_ASPECTS), (None,) * len(RELEASE_ASPECTS))
    notes = completion.get("annotations")
    notes = notes if isinstance(notes, dict) else {}
    aspect = [notes.get(a) if isinstance(notes.get(a), dict) else {} for a in RELEASE_ASPECTS]
    return Response(completion.get("model"), completion.get("response"),
                    tuple(a.get("Rating") for a in aspect), tuple(a.get("Rationale") for a in aspect))


def _image_uri(img_path, root: str) -> str | None:
    """A row's `img_path` under the image root; raises ValueError for paths leaving it."""
    if img_path is None or img_path == "":
        return None
    if not isinstance(img_path, str) or img_path.startswith("/") or "://" in img_path or ".." in img_path.split("/"):
        raise ValueError(f"img_path {img_path!r} is not a relative path under the image root")
    return storage.join(root, img_path.removeprefix("./"))


def _check_row(row, seen: set[str]) -> tuple[str, str] | None:
    """(quarantine reason, detail) of a line that is not a usable VLFeedback row, or None."""
    if not isinstance(row, dict):
        return "unparseable", f"a JSON {type(row).__name__}, not an object"
    missing = [k for k in ("id", "prompt", "completions") if row.get(k) in (None, "")]
    if missing:
        return "missing_fields", f"prompt id {row.get('id')!r}: missing {', '.join(missing)}"
    if not isinstance(row["prompt"], str) or not isinstance(row["completions"], list):
        return "missing_fields", f"prompt id {row['id']!r}: prompt must be a string and completions a list"
    if str(row["id"]) in seen:
        return "duplicate_key", f"prompt id {row['id']!r} appears again"
    return None


class _Writer:
    """Builds one pairs version into `out`: rows to Parquet in bounded batches, counts,
    the digest of the pairs table."""

    def __init__(self, out: str, judge: str, image_threads: int, aspects: tuple[str, ...]):
        self.out, self.judge, self.aspects = out, judge, aspects
        self.images = ImageChecker("exists", image_threads)
        self.digest = TableDigest({"kind": "vlfeedback-pairs", "schema_version": SCHEMA_VERSION})
        self.pending: list[tuple] = []  # (row, image uri, source, position, line)
        self.pairs, self.excluded, self.quarantine = [], [], []
        self.seen_ids: set[str] = set()
        self.counts = {"prompts": 0, "pairs": 0, "ties": 0, "unparseable": 0, "quarantined": 0,
                       "prompts_without_pairs": 0}
        self.completions: dict[int, int] = {}
        fs, path = storage.filesystem(storage.join(out, PAIRS))
        self.pair_file = pq.ParquetWriter(path, PAIR_SCHEMA, filesystem=fs, compression="zstd")

    def reject(self, reason: str, detail: str, source: str, position: int, raw: str) -> None:
        self.quarantine.append(quarantine_row(reason, detail, f"{source}#{position}", raw))

    def add(self, line: str, source: str, position: int, root: str) -> None:
        try:
            row = json.loads(line)
        except ValueError as e:
            return self.reject("unparseable", f"not JSON: {e}", source, position, line.strip())
        problem = _check_row(row, self.seen_ids)
        if problem:
            return self.reject(*problem, source, position, line.strip())
        self.seen_ids.add(str(row["id"]))
        try:
            image = _image_uri(row.get("img_path"), root)
        except ValueError as e:
            return self.reject("image_path_escapes_root", f"prompt id {row['id']!r}: {e}", source, position, line.strip())
        self.pending.append((row, image, source, position, line))
        if len(self.pending) >= FLUSH_PROMPTS:
            self.flush()

    def flush(self) -> None:
        """Check the pending prompts' images (one batched call), pair them, write the pairs."""
        checked = self.images.check([image for _, image, *_ in self.pending if image])
        for row, image, source, position, line in self.pending:
            if image and checked[image]:
                self.reject(checked[image], f"prompt id {row['id']!r}: {image}", source, position, line.strip())
            else:
                self._pair(row, image, source, position)
        self.pending = []
        if self.pairs:
            table = pa.Table.from_pylist(self.pairs, schema=PAIR_SCHEMA)
            self.pair_file.write_table(table)
            self.digest.update(table)
            self.pairs = []

    def _pair(self, row: dict, image: str | None, source: str, position: int) -> None:
        responses = [_response(c) for c in row["completions"]]
        scores, pairs, ties, unparseable = pair_prompt(responses, self.aspects)
        pid = str(row["id"])
        self.counts["prompts"] += 1
        self.counts["pairs"] += len(pairs)
        self.counts["ties"] += len(ties)
        self.counts["unparseable"] += len(unparseable)
        self.counts["prompts_without_pairs"] += not pairs
        self.completions[len(responses)] = self.completions.get(len(responses), 0) + 1
        where = {"judge": self.judge, "source": source, "position": position}

        def side(name: str, i: int) -> dict:
            r = responses[i]
            return {name: r.text, f"{name}_model": r.model, f"{name}_score": float(scores[i]),
                    f"{name}_ratings": [float(parse_rating(x)) if a in self.aspects else None
                                        for a, x in zip(RELEASE_ASPECTS, r.ratings)],
                    f"{name}_rationales": [None if x is None else str(x) for x in r.rationales]}

        for c, r in pairs:
            self.pairs.append({"pair_id": f"{pid}:{c}>{r}", "prompt_id": pid, "prompt": row["prompt"], "image": image,
                               **side("chosen", c), **side("rejected", r), **where})
        for i, j in ties:
            self.excluded.append({"reason": "tie", "prompt_id": pid, "index": i, "model": responses[i].model,
                                  "other_index": j, "other_model": responses[j].model, "score": float(scores[i]),
                                  "ratings": [str(x) for x in responses[i].ratings],
                                  "detail": f"mean rating {float(scores[i]):g} for both", **where})
        for i in unparseable:
            self.excluded.append({"reason": "unparseable_rating", "prompt_id": pid, "index": i,
                                  "model": responses[i].model, "other_index": None, "other_model": None,
                                  "score": None, "ratings": [None if x is None else str(x) for x in responses[i].ratings],
                                  "detail": _unparseable(responses[i], self.aspects), **where})

    def close(self, sources: list[str], provenance: dict) -> tuple[dict, dict]:
        """Write the remaining files; return (summary, manifest). The caller writes the manifest."""
        self.flush()
        self.pair_file.close()
        for name, rows, schema in ((EXCLUDED, self.excluded, EXCLUDED_SCHEMA),
                                   (versions.QUARANTINE, self.quarantine, QUARANTINE_SCHEMA)):
            versions.write_parquet(storage.join(self.out, name), pa.Table.from_pylist(rows, schema=schema))
        self.counts["quarantined"] = len(self.quarantine)
        summary = {"digest": self.digest.hexdigest(), **self.counts, "judge": self.judge, "sources": sources,
                   "aspects": list(self.aspects), **provenance,
                   "completions_per_prompt": {str(k): v for k, v in sorted(self.completions.items())},
                   "quarantine_reasons": dict(sorted(Counter(r["reason"] for r in self.quarantine).items()))}
        storage.write_json(storage.join(self.out, versions.SUMMARY), summary)
        manifest = {"digest": summary["digest"], "rows": self.counts["pairs"], "prompts": self.counts["prompts"],
                    "schema_version": SCHEMA_VERSION, "aspects": list(self.aspects), "judge": self.judge,
                    "sources": sources, **provenance}
        return summary, manifest


def build_pairs(sources: list[str], root: str, image_root: str | None = None, judge: str = RELEASE_JUDGE,
                image_threads: int = 16, aspects: tuple[str, ...] = RELEASE_ASPECTS,
                provenance: dict | None = None) -> dict:
    """VLFeedback-format JSONL (files or folders) -> the pairs version ROOT/<digest>/; its
    summary, with `version` and `reused` (the same input finds the finished version).

    Relative `img_path`s resolve against `image_root`, else each source file's folder.
    `aspects` (release names) are those the judge rated; `provenance` (e.g. the responses
    version, its generators) goes into the manifest and summary as it is.
    """
    unknown = [a for a in aspects if a not in RELEASE_ASPECTS]
    if unknown or not aspects:
        raise FeedbackError(f"aspects {list(aspects)}: each must be one of {list(RELEASE_ASPECTS)}")
    files = []
    for src in sources:
        try:
            files += storage.list_files(src, (".jsonl",))
        except FileNotFoundError:
            raise FeedbackError(f"feedback source not found: {src}") from None
    if not files:
        raise FeedbackError(f"no .jsonl files under {', '.join(sources)}")
    with versions.staging(root) as stage:
        writer = _Writer(stage.uri, judge, image_threads, tuple(aspects))
        for source in files:
            folder = storage.normalize(image_root) if image_root else storage.parent(source)
            with storage.open_input(source) as raw:
                for position, line in enumerate(io.TextIOWrapper(raw, encoding="utf-8")):
                    if line.strip():
                        writer.add(line, source, position, folder)
        summary, manifest = writer.close(files, provenance or {})
        version = stage.publish(summary["digest"], "vlfeedback-pairs", manifest, PairsVersion)
    return {**summary, "version": version.uri, "reused": version.reused}
