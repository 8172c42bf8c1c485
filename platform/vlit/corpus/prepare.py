"""`vlit corpus prepare`: sources → a validated, content-addressed corpus version.

One streaming pass per source file, in bounded chunks:
  scan (jsonstream, in a background thread) → parse (pyarrow JSON; row-by-row fallback)
  → normalize (formats) → image checks (once per distinct image) → row keys and
  duplicates → kept rows to Parquet shards, rejected rows to the quarantine, both into
  the digest.
The version is staged and published by `vlit.versions` (OUT/<digest>/, manifest last);
preparing the same input again finds the finished version and reuses it.
"""
from __future__ import annotations

import io
import json
import time
from collections import Counter
from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.json as pj
import pyarrow.parquet as pq

from vlit import storage, versions
from vlit.config import PrepareConfig
from vlit.corpus.formats import SOURCE_SCHEMAS, Normalized, coerce, normalize
from vlit.corpus.images import ImageChecker, StoreReadError
from vlit.corpus.jsonstream import Chunk, ChunkReader, JSONStreamError
from vlit.corpus.schema import CORPUS_SCHEMA, SCHEMA_VERSION
from vlit.digest import TableDigest
from vlit.progress import Progress
from vlit.versions import QUARANTINE_SCHEMA, CorpusVersion

SOURCE_SUFFIXES = (".json", ".jsonl")
_READ_OPTIONS = pj.ReadOptions(block_size=8 * 1024 * 1024)


class PrepareError(RuntimeError):
    """Prepare could not produce a version; the message says which file, row or limit."""


def _read_json(chunk: Chunk, schema: pa.Schema) -> pa.Table | None:
    """The chunk parsed by pyarrow's multithreaded reader, or None if any line fails."""
    try:
        table = pj.read_json(
            io.BytesIO(chunk.ndjson),
            read_options=_READ_OPTIONS,
            parse_options=pj.ParseOptions(explicit_schema=schema, unexpected_field_behavior="ignore"),
        )
    except pa.ArrowInvalid:
        return None
    return table if table.num_rows == chunk.count else None


def _parse_rows(chunk: Chunk, schema: pa.Schema) -> tuple[pa.Table, dict[int, tuple[str, str]]]:
    """Row by row, for a chunk pyarrow rejected: rows that cannot be read come back as null
    rows plus {row index: (reason, detail)}, so positions stay aligned."""
    rows, bad = [], {}
    empty = {f.name: None for f in schema}
    for i, line in enumerate(chunk.ndjson.split(b"\n")):
        try:
            obj = json.loads(line)
        except ValueError as e:
            rows.append(empty)
            bad[i] = ("unparseable", f"invalid JSON: {e}")
            continue
        row, why = coerce(obj, schema)
        if row is None:
            rows.append(empty)
            bad[i] = ("unparseable" if not isinstance(obj, dict) else "missing_fields", why)
        else:
            rows.append(row)
    return pa.Table.from_pylist(rows, schema=schema), bad


def _row_keys(norm: Normalized) -> np.ndarray:
    """64-bit row keys from (source id, image reference as written, task)."""
    t = norm.table
    frame = pd.DataFrame(
        {
            "id": pd.array(t.column("id").combine_chunks(), dtype=pd.ArrowDtype(pa.string())),
            "image": pd.array(norm.image_ref, dtype=pd.ArrowDtype(pa.string())),
            "task": pd.array(t.column("task").combine_chunks(), dtype=pd.ArrowDtype(pa.string())),
        }
    )
    return pd.util.hash_pandas_object(frame, index=False).to_numpy()


def _hex(keys: np.ndarray) -> pa.Array:
    n = len(keys)
    text = keys.astype(">u8").tobytes().hex().encode()
    return pa.StringArray.from_buffers(n, pa.py_buffer(np.arange(0, 16 * n + 1, 16, dtype=np.int32)), pa.py_buffer(text))


def _counts(column: pa.ChunkedArray) -> dict[str, int]:
    vc = pc.value_counts(column.combine_chunks())
    return dict(zip(vc.field("values").to_pylist(), vc.field("counts").to_pylist()))


class _ShardWriter:
    def __init__(self, data_uri: str, shard_rows: int):
        self.data_uri, self.shard_rows = data_uri, shard_rows
        self.names: list[str] = []
        self._writer: pq.ParquetWriter | None = None
        self._sink = None
        self._rows = 0

    def write(self, table: pa.Table) -> None:
        while table.num_rows:
            if self._writer is None or self._rows >= self.shard_rows:
                self._open()
            take = min(table.num_rows, self.shard_rows - self._rows)
            self._writer.write_table(table.slice(0, take))
            self._rows += take
            table = table.slice(take)

    def _open(self) -> None:
        self.close()
        name = f"part-{len(self.names):05d}.parquet"
        self.names.append(name)
        fs, path = storage.filesystem(storage.join(self.data_uri, name))
        if not storage.is_s3(self.data_uri):
            fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
        self._sink = fs.open_output_stream(path)
        self._writer = pq.ParquetWriter(self._sink, CORPUS_SCHEMA, compression="zstd")
        self._rows = 0

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._sink.close()
            self._writer = self._sink = None


class _Run:
    """State of one prepare run across all chunks of all sources."""

    def __init__(self, cfg: PrepareConfig, staging: str):
        self.cfg = cfg
        self.schema = SOURCE_SCHEMAS[cfg.format]
        self.shards = _ShardWriter(storage.join(staging, "data"), cfg.shard_rows)
        self.quarantine: list[pa.Table] = []
        self.images = ImageChecker(cfg.image_check, cfg.image_check_threads)
        self.seen: set[int] = set()
        self.tasks: Counter = Counter()
        self.datasets: Counter = Counter()
        self.reasons: Counter = Counter()
        self.rows = 0
        self.digest = TableDigest(
            {"schema_version": SCHEMA_VERSION, "format": cfg.format, "image_check": cfg.image_check}
        )
        # Parquet encoding and hashing release the GIL: they run for chunk k while chunk
        # k+1 is parsed. One write in flight keeps the order and bounds memory.
        self._writer = ThreadPoolExecutor(1, thread_name_prefix="vlit-write")
        self._pending: Future | None = None

    def _write(self, good: pa.Table) -> None:
        self.shards.write(good)
        self.digest.update(good)

    def flush(self) -> None:
        if self._pending is not None:
            self._pending.result()
            self._pending = None

    def close(self) -> None:
        try:
            self.flush()
        finally:
            self._writer.shutdown()
            self.shards.close()

    def add(self, chunk: Chunk, table: pa.Table | None, source: str, image_root: str) -> None:
        parse_errors: dict[int, tuple[str, str]] = {}
        if table is None:
            table, parse_errors = _parse_rows(chunk, self.schema)
        norm = normalize(table, self.cfg.format, source, chunk.first_position, image_root, self.cfg.default_task)
        reason, detail = norm.reason, norm.detail
        for i, (why, text) in parse_errors.items():
            reason[i], detail[i] = why, text
        self._check_images(norm)
        keys = _row_keys(norm)
        self._check_duplicates(keys, reason)
        kept = reason == None  # noqa: E711
        canonical = norm.table.set_column(0, "key", _hex(keys))
        good = canonical.filter(pa.array(kept)).cast(CORPUS_SCHEMA)
        self.flush()
        self._pending = self._writer.submit(self._write, good)
        self.rows += good.num_rows
        self.tasks.update(_counts(good.column("task")))
        self.datasets.update(_counts(good.column("dataset")))
        if not kept.all():
            self._quarantine(chunk, source, np.flatnonzero(~kept), reason, detail)

    def _check_images(self, norm: Normalized) -> None:
        image = norm.table.column("image").combine_chunks()
        pending = (norm.reason == None) & np.asarray(image.is_valid().to_numpy(zero_copy_only=False))  # noqa: E711
        if not pending.any():
            return
        # Distinct images of this chunk: rows share images, each is checked once per run.
        encoded = pc.dictionary_encode(image.filter(pa.array(pending)))
        uniques = encoded.dictionary.to_pylist()
        results = self.images.check(uniques)
        per_unique = np.array([results[u] for u in uniques], dtype=object)
        failed = per_unique[encoded.indices.to_numpy(zero_copy_only=False)]
        rows = np.flatnonzero(pending)
        bad = failed != None  # noqa: E711
        norm.reason[rows[bad]] = failed[bad]

    def _check_duplicates(self, keys: np.ndarray, reason: np.ndarray) -> None:
        candidates = np.flatnonzero(reason == None)  # noqa: E711 — only rows still kept claim a key
        chunk_keys = keys[candidates]
        unique, first = np.unique(chunk_keys, return_index=True)
        clash = self.seen.intersection(unique.tolist())
        if len(unique) < len(chunk_keys) or clash:
            # Rare: mark every occurrence after the first (in this chunk or earlier).
            repeat = np.ones(len(chunk_keys), dtype=bool)
            repeat[first] = False
            if clash:
                repeat |= np.isin(chunk_keys, np.fromiter(clash, dtype=np.uint64, count=len(clash)))
            reason[candidates[repeat]] = "duplicate_key"
        self.seen.update(unique.tolist())

    def _quarantine(self, chunk: Chunk, source: str, rows: np.ndarray, reason, detail) -> None:
        lines = chunk.ndjson.split(b"\n")
        table = pa.table(
            {
                "reason": pa.array(reason[rows].tolist(), pa.string()),
                "detail": pa.array(detail[rows].tolist(), pa.string()),
                "source_ref": pa.array([f"{source}#{chunk.first_position + i}" for i in rows.tolist()], pa.string()),
                "raw": pa.array([_canonical_raw(lines[i]) for i in rows.tolist()], pa.string()),
            },
            schema=QUARANTINE_SCHEMA,
        )
        self.quarantine.append(table)
        self.reasons.update(table.column("reason").to_pylist())


def _canonical_raw(line: bytes) -> str:
    """The rejected row as compact JSON (so the source's whitespace is not content),
    or its text as it was when it does not parse."""
    try:
        return json.dumps(json.loads(line), ensure_ascii=False, separators=(",", ":"))
    except ValueError:
        return line.decode("utf-8", "replace").strip()


def expand_sources(sources: list[str]) -> list[str]:
    files: list[str] = []
    for src in sources:
        try:
            found = storage.list_files(src, SOURCE_SUFFIXES)
        except FileNotFoundError:
            raise PrepareError(f"source not found: {src}") from None
        if not found:
            raise PrepareError(f"no {'/'.join(SOURCE_SUFFIXES)} files under {src}")
        files.extend(found)
    return files


def _write_quarantine(run: _Run, uri: str) -> pa.Table:
    table = pa.concat_tables(run.quarantine) if run.quarantine else QUARANTINE_SCHEMA.empty_table()
    versions.write_parquet(uri, table)
    return table


def prepare_corpus(cfg: PrepareConfig, out: str) -> dict:
    """Ingest `cfg.sources` into OUT/<digest>/ and return the summary."""
    start = time.perf_counter()
    sources = expand_sources(cfg.sources)
    with versions.staging(out) as stage:
        run = _Run(cfg, stage.uri)
        progress = Progress("prepare", unit="rows")  # the sources stream: their row count is unknown up front
        try:
            for source in sources:
                root = storage.normalize(cfg.image_root) if cfg.image_root else storage.parent(source)
                with storage.open_input(source) as f:
                    reader = ChunkReader(f, source)
                    for chunk in reader:
                        table = _read_json(chunk, run.schema)
                        if table is None and not chunk.exact:
                            reader.reject()  # a wrong fast split: redo this chunk exactly
                            continue
                        run.add(chunk, table, source, root)
                        progress.update(run.rows - progress.done)
        except (JSONStreamError, StoreReadError) as e:
            again = " Nothing was published; run prepare again." if isinstance(e, StoreReadError) else ""
            raise PrepareError(f"{e}{again}") from None
        finally:
            run.close()
            progress.close()

        quarantine = _write_quarantine(run, stage.file(versions.QUARANTINE))
        run.digest.update(quarantine.rename_columns([f"quarantine.{n}" for n in quarantine.schema.names]))
        digest = run.digest.hexdigest()
        total = run.rows + quarantine.num_rows
        summary = {
            "digest": digest,
            "rows": run.rows,
            "quarantined": quarantine.num_rows,
            "tasks": len(run.tasks),
            "reasons": dict(sorted(run.reasons.items())),
            "format": cfg.format,
            "sources": sources,
            "image_checks": {
                "level": cfg.image_check,
                "distinct": len(run.images.results),
                "seconds": round(run.images.seconds, 3),
                "per_second": round(len(run.images.results) / run.images.seconds, 1) if run.images.seconds else None,
            },
        }
        if total == 0:
            raise PrepareError(f"no rows in {', '.join(sources)}")
        bad_fraction = quarantine.num_rows / total
        if bad_fraction > cfg.max_bad_fraction:
            summary["status"] = "failed"
            storage.write_json(stage.file(versions.SUMMARY), summary)
            stage.keep()  # the rejected rows stay where the message says
            top = ", ".join(f"{r}: {n}" for r, n in run.reasons.most_common(5))
            raise PrepareError(
                f"{quarantine.num_rows} of {total} rows ({bad_fraction:.1%}) were quarantined, above "
                f"max_bad_fraction {cfg.max_bad_fraction:.1%} ({top}); nothing was published. "
                f"Rejected rows with their reasons: {stage.file(versions.QUARANTINE)}"
            )
        summary["version"] = storage.join(out, digest)
        storage.write_json(stage.file(versions.SUMMARY), summary)
        version = stage.publish(digest, "corpus", {
            "digest": digest,
            "schema_version": SCHEMA_VERSION,
            "rows": run.rows,
            "quarantined": quarantine.num_rows,
            "tasks": dict(sorted(run.tasks.items())),
            "datasets": dict(sorted(run.datasets.items())),
            "sources": sources,
            "format": cfg.format,
            "image_check": cfg.image_check,
            "shards": run.shards.names,
        }, CorpusVersion)
    summary["reused"] = version.reused
    seconds = time.perf_counter() - start
    summary["seconds"] = round(seconds, 2)
    summary["rows_per_second"] = round(total / seconds, 1)
    return summary
