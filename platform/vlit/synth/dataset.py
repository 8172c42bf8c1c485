"""What the synthetic loops share: requests through Serve on Ray Data, prompts drawn
from a corpus version, and the versioned dataset they write.

A synthetic dataset version, in the style of a corpus version (ROOT is local or s3://):

    ROOT/<digest>/rows.parquet        the generated rows (the loop's own columns)
    ROOT/<digest>/quarantine.parquet  replies that did not parse, failed calls: reason,
                                      detail, source_ref, raw (the corpus's schema)
    ROOT/<digest>/summary.json        counts, reasons, the loop's settings
    ROOT/<digest>/<extra files>       e.g. annotation.json in the Vision-Flan format
    ROOT/<digest>/manifest.json       written last: a folder without it is unfinished

The digest is a `TableDigest` of rows.parquet under a header naming the loop.
"""
from __future__ import annotations

import datetime as dt
import json
import random
import uuid
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.parquet as pq

import vlit
from vlit import storage
from vlit.corpus.schema import IMAGE_TOKEN, QUARANTINE_SCHEMA
from vlit.corpus.version import CorpusVersion
from vlit.digest import TableDigest

ROWS, QUARANTINE, SUMMARY, MANIFEST = "rows.parquet", "quarantine.parquet", "summary.json", "manifest.json"
SCHEMA_VERSION = 1


def serve_calls(requests: list[dict], *, method: str, app_name: str = "vlit", batch_size: int = 64,
                timeout_s: float = 120.0) -> list[tuple[dict | None, str | None]]:
    """Send each request through the app's ingress with `vlit.serve.client.map_requests`
    (Ray Data, retries, per-row errors); (result, error) per request, in order."""
    import ray.data

    from vlit.serve.client import map_requests

    if not requests:
        return []
    items = [{"idx": i, "request": json.dumps(r)} for i, r in enumerate(requests)]
    ds = map_requests(ray.data.from_items(items), method=method, app_name=app_name, request_column="request",
                      batch_size=batch_size, timeout_s=timeout_s)
    out: list[tuple[dict | None, str | None]] = [(None, "no answer")] * len(requests)
    for row in ds.take_all():
        result = json.loads(row["result"]) if row["result"] else None
        out[row["idx"]] = (result, None if result is not None else f"{row['status']}: {row['error']}")
    return out


def chat_texts(result: dict | None) -> list[str]:
    return [c["message"]["content"] for c in result["choices"]] if result else []


def user_message(text: str, image: str | None) -> dict:
    if image is None:
        return {"role": "user", "content": text}
    return {"role": "user", "content": [{"type": "image_url", "image_url": {"url": image}},
                                        {"type": "text", "text": text}]}


@dataclass(frozen=True)
class Prompt:
    id: str
    task: str
    image: str | None
    instruction: str
    reference: str | None  # the corpus's answer


def corpus_prompts(corpus_version: str, n: int, seed: int = 0, images_only: bool = True) -> list[Prompt]:
    """`n` rows of a corpus version (a seeded draw, the same for the same version) as prompts:
    the first user turn without the image placeholder, the first answer as the reference."""
    table = CorpusVersion.open(corpus_version).read_table(["key", "task", "image", "turns"])
    rows = sorted(table.to_pylist(), key=lambda r: r["key"])
    if images_only:
        rows = [r for r in rows if r["image"]]
    random.Random(seed).shuffle(rows)
    out = []
    for r in rows[:n]:
        user = next((t["content"] for t in r["turns"] if t["role"] == "user"), "")
        answer = next((t["content"] for t in r["turns"] if t["role"] == "assistant"), None)
        out.append(Prompt(r["key"], r["task"], r["image"], user.replace(IMAGE_TOKEN, "").strip(), answer))
    return out


def quarantine_row(reason: str, detail: str, source_ref: str, raw: str | None) -> dict:
    return {"reason": reason, "detail": detail, "source_ref": source_ref, "raw": raw}


def count(items) -> dict[str, int]:
    out: dict[str, int] = {}
    for item in items:
        out[item] = out.get(item, 0) + 1
    return dict(sorted(out.items()))


def write_version(root: str, kind: str, rows: list[dict], quarantine: list[dict], settings: dict,
                  schema: pa.Schema | None = None, extra_files: dict[str, bytes] | None = None) -> dict:
    """Write ROOT/<digest>/ (built in ROOT/_staging/, moved, manifest last); an existing
    finished version of the same digest is reused. Returns the summary with `version`."""
    table = pa.Table.from_pylist(rows, schema=schema) if rows or schema else pa.table({})
    digest = TableDigest({"kind": kind, "schema_version": SCHEMA_VERSION})
    digest.update(table)
    hexdigest = digest.hexdigest()
    staging = storage.join(root, "_staging", uuid.uuid4().hex[:12])
    summary = {"kind": kind, "digest": hexdigest, "rows": table.num_rows, "quarantined": len(quarantine),
               "quarantine_reasons": count(q["reason"] for q in quarantine), "settings": settings}
    try:
        if not storage.is_s3(staging):
            storage.makedirs(staging)
        for name, tab in ((ROWS, table), (QUARANTINE, pa.Table.from_pylist(quarantine, schema=QUARANTINE_SCHEMA))):
            with storage.open_output(storage.join(staging, name)) as f:
                pq.write_table(tab, f, compression="zstd")
        for name, data in (extra_files or {}).items():
            storage.write_bytes(storage.join(staging, name), data)
        storage.write_json(storage.join(staging, SUMMARY), summary)
    except BaseException:
        storage.delete_dir(staging)
        raise
    final = storage.join(root, hexdigest)
    reused = storage.exists(storage.join(final, MANIFEST))
    if reused:
        storage.delete_dir(staging)
    else:
        storage.delete_dir(final)  # an earlier move that never got its manifest
        storage.move_dir(staging, final)
        storage.write_json(storage.join(final, MANIFEST), {
            "kind": kind, "digest": hexdigest, "rows": table.num_rows, "schema_version": SCHEMA_VERSION,
            "files": [ROWS, QUARANTINE, SUMMARY, *sorted(extra_files or {})],
            "created_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            "vlit_version": vlit.__version__})
    return {**summary, "version": final, "reused": reused}


@dataclass(frozen=True)
class SynthVersion:
    uri: str
    manifest: dict

    @classmethod
    def open(cls, uri: str) -> "SynthVersion":
        uri = storage.normalize(uri)
        if not storage.exists(storage.join(uri, MANIFEST)):
            raise FileNotFoundError(f"{uri} is not a finished synthetic dataset version: {MANIFEST} is missing")
        return cls(uri, storage.read_json(storage.join(uri, MANIFEST)))

    @property
    def digest(self) -> str:
        return self.manifest["digest"]

    def read_table(self, name: str = ROWS) -> pa.Table:
        with storage.open_input(storage.join(self.uri, name)) as f:
            return pq.read_table(pa.BufferReader(f.read()))

    def rows(self) -> list[dict]:
        return self.read_table().to_pylist()
