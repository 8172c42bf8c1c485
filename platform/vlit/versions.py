"""Content-addressed versions: the one protocol every kind of vlit dataset follows.

A version is a folder ROOT/<name>/ (local or s3://), usually named by its content digest,
whose `manifest.json` is written last: a folder without one is unfinished and never read.

    with versions.staging(root) as stage:     # ROOT/_staging/<run>/, deleted on error
        ... write the version's files under stage.uri ...
        version = stage.publish(name, kind, manifest)
    # moved to ROOT/<name>/, then its manifest: an existing finished ROOT/<name>/ is
    # reused (version.reused) and the staged copy dropped; a ROOT/<name>/ left without a
    # manifest by a run killed after the move is replaced.

A kill before the move leaves only staging behind; after it, only a folder without a
manifest, which `open` refuses and the next publish replaces. Either way the next run
publishes the same version, so no reader ever sees half a version.

Kinds (their files besides manifest.json; most also hold summary.json and quarantine.parquet):
    CorpusVersion    corpus           data/part-NNNNN.parquet     (corpus/prepare.py)
    DatasetVersion   vigc, self-instruct, alignment-set, qc: rows.parquet  (loops/)
    ResponsesVersion feedback-responses: responses.jsonl, judged, VLFeedback format
    PairsVersion     vlfeedback-pairs: pairs.parquet, excluded.parquet (loops/feedback.py)
    EvalSet          eval-set         data.parquet, images/       (evaluate/sets.py)
    ReferenceCache   reference-logps  data/*.parquet              (train/reference.py)
"""
from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import os
import uuid
from collections import Counter
from dataclasses import dataclass
from typing import ClassVar, Iterator

import pyarrow as pa
import pyarrow.parquet as pq

import vlit
from vlit import storage
from vlit.digest import TableDigest

MANIFEST = "manifest.json"
SUMMARY = "summary.json"
QUARANTINE = "quarantine.parquet"
STAGING = "_staging"
DATASET_SCHEMA_VERSION = 1


# Rejected rows: why, where from, and the raw row as JSON text so nothing is lost.
QUARANTINE_SCHEMA = pa.schema(
    [
        pa.field("reason", pa.string(), nullable=False),
        pa.field("detail", pa.string()),
        pa.field("source_ref", pa.string(), nullable=False),  # "<file uri>#<position>"
        pa.field("raw", pa.string()),
    ]
)


def quarantine_row(reason: str, detail: str | None, source_ref: str, raw: str | None) -> dict:
    """One row of QUARANTINE_SCHEMA."""
    return {"reason": reason, "detail": detail, "source_ref": source_ref, "raw": raw}


@dataclass(frozen=True)
class Version:
    uri: str
    manifest: dict
    reused: bool = dataclasses.field(default=False, compare=False)

    KIND: ClassVar[str] = "vlit"  # what a missing manifest says this folder is not (a finished ... version)
    TABLE: ClassVar[str] = "rows.parquet"  # what read_table() reads by default
    MAKE: ClassVar[str] = ""  # how to make one, for the error naming a missing version

    @classmethod
    def open(cls, uri: str):
        uri = storage.normalize(uri)
        manifest = storage.join(uri, MANIFEST)
        if not storage.exists(manifest):
            how = f" ({cls.MAKE})" if cls.MAKE else ""
            raise FileNotFoundError(f"{uri} is not a finished {cls.KIND} version: {MANIFEST} is missing{how}")
        return cls(uri, storage.read_json(manifest))

    @classmethod
    def find(cls, root: str, name: str):
        """The finished version ROOT/<name>/, or None."""
        uri = storage.join(root, name)
        return cls.open(uri) if storage.exists(storage.join(uri, MANIFEST)) else None

    @property
    def kind(self) -> str:
        return self.manifest.get("kind", self.KIND)

    @property
    def digest(self) -> str:
        return self.manifest["digest"]

    @property
    def rows(self) -> int:
        return self.manifest["rows"]

    def file(self, name: str) -> str:
        return storage.join(self.uri, name)

    def read_table(self, name: str | None = None, *, columns: list[str] | None = None) -> pa.Table:
        """A Parquet file of the version, or every part file of a folder in name order."""
        return read_parquet(self.file(name or self.TABLE), columns)

    def read_rows(self, name: str | None = None) -> list[dict]:
        return self.read_table(name).to_pylist()

    def read_json(self, name: str = SUMMARY):
        return storage.read_json(self.file(name))


class CorpusVersion(Version):
    KIND, TABLE, MAKE = "corpus", "data", "run `vlit corpus prepare` to make one"

    @property
    def task_counts(self) -> dict[str, int]:
        return dict(self.manifest["tasks"])

    @property
    def shard_uris(self) -> list[str]:
        return [self.file(f"data/{name}") for name in self.manifest["shards"]]

    @property
    def quarantine_uri(self) -> str:
        return self.file(QUARANTINE)

    def read_quarantine(self) -> pa.Table:
        return self.read_table(QUARANTINE)


class DatasetVersion(Version):
    KIND = "generated dataset"


class ResponsesVersion(Version):
    KIND, TABLE = "feedback-responses", "responses.jsonl"


class PairsVersion(Version):
    KIND, TABLE, MAKE = "pairs", "pairs.parquet", "build one with `vlit feedback pairs INPUT --out ROOT`"

    @property
    def pairs_uri(self) -> str:
        return self.file(self.TABLE)


class EvalSet(Version):
    KIND, TABLE = "evaluation set", "data.parquet"

    @property
    def suite(self) -> str:
        return self.manifest["suite"]

    def image_uri(self, relative: str) -> str:
        return self.file(relative)


class ReferenceCache(Version):
    KIND, TABLE = "reference log-prob cache", "data"


def read_parquet(uri: str, columns: list[str] | None = None) -> pa.Table:
    parts = storage.list_files(uri, (".parquet",))
    tables = []
    for part in parts:
        fs, path = storage.filesystem(part)
        # A small part's ranged GET answered by a 503 is the SDK's unretried case (storage.py).
        tables.append(storage.retrying(pq.read_table, path, filesystem=fs, columns=columns))
    if not tables:
        raise FileNotFoundError(f"no Parquet data at {uri}")
    return pa.concat_tables(tables)


def write_parquet(uri: str, table: pa.Table) -> None:
    with storage.open_output(uri) as f:
        pq.write_table(table, f, compression="zstd")


class Staging:
    """A version being written: files go under `uri`; `publish` makes it a version."""

    def __init__(self, root: str):
        self.root = storage.normalize(root)
        self.uri = storage.join(self.root, STAGING, uuid.uuid4().hex[:12])
        self.kept = False
        if not storage.is_s3(self.uri):
            storage.makedirs(self.uri)

    def file(self, name: str) -> str:
        return storage.join(self.uri, name)

    def keep(self) -> None:
        """Leave the staged files in place when the block fails (for a person to inspect)."""
        self.kept = True

    def publish(self, name: str, kind: str, manifest: dict, cls: type[Version] = Version) -> Version:
        """Move the staged files to ROOT/<name>/ and write its manifest, last; or reuse a
        finished ROOT/<name>/ and drop these files. `manifest` needs `digest` and `rows`."""
        final = storage.join(self.root, name)
        if storage.exists(storage.join(final, MANIFEST)):
            self.discard()
            return dataclasses.replace(cls.open(final), reused=True)
        storage.delete_dir(final)  # an earlier move that never got its manifest
        storage.move_dir(self.uri, final)
        full = {"kind": kind, **manifest,
                "created_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
                "vlit_version": vlit.__version__}
        storage.write_json(storage.join(final, MANIFEST), full)
        self._tidy()
        return cls(final, full)

    def discard(self) -> None:
        storage.delete_dir(self.uri)
        self._tidy()

    def _tidy(self) -> None:
        if not storage.is_s3(self.root):  # S3 has no empty folders to leave behind
            with contextlib.suppress(OSError):
                os.rmdir(storage.filesystem(storage.join(self.root, STAGING))[1])


def publish_rows(root: str, kind: str, rows: list[dict], quarantine: list[dict], settings: dict,
                 schema: pa.Schema | None = None, extra_files: dict[str, bytes] | None = None) -> dict:
    """A generated dataset held in memory as ROOT/<digest>/: rows.parquet (its digest names
    the version), quarantine.parquet (QUARANTINE_SCHEMA rows), summary.json (counts, the
    loop's settings) and `extra_files` (e.g. annotation.json in the release format).
    Returns the summary with the version's `version` URI and `reused`."""
    table = pa.Table.from_pylist(rows, schema=schema) if rows or schema else pa.table({})
    hasher = TableDigest({"kind": kind, "schema_version": DATASET_SCHEMA_VERSION})
    hasher.update(table)
    digest = hasher.hexdigest()
    reasons = Counter(q["reason"] for q in quarantine)
    summary = {"kind": kind, "digest": digest, "rows": table.num_rows, "quarantined": len(quarantine),
               "quarantine_reasons": dict(sorted(reasons.items())), "settings": settings}
    with staging(root) as stage:
        write_parquet(stage.file("rows.parquet"), table)
        write_parquet(stage.file(QUARANTINE), pa.Table.from_pylist(quarantine, schema=QUARANTINE_SCHEMA))
        for name, data in (extra_files or {}).items():
            storage.write_bytes(stage.file(name), data)
        storage.write_json(stage.file(SUMMARY), summary)
        version = stage.publish(digest, kind, {"digest": digest, "rows": table.num_rows,
                                               "schema_version": DATASET_SCHEMA_VERSION,
                                               "files": ["rows.parquet", QUARANTINE, SUMMARY, *sorted(extra_files or {})]},
                                DatasetVersion)
    return {**summary, "version": version.uri, "reused": version.reused}


@contextlib.contextmanager
def staging(root: str) -> Iterator[Staging]:
    """Stage a version under ROOT; the staged files are deleted when the block fails
    (unless `keep()` was called) or when it ends without publishing."""
    stage = Staging(root)
    try:
        yield stage
    except BaseException:
        if not stage.kept:
            stage.discard()
        raise
    if storage.exists(stage.uri) and not stage.kept:
        stage.discard()
