"""Corpus versions: content-addressed folders of sharded Parquet plus a manifest.

Layout of one version (OUT is any URI, local or s3://):

    OUT/<digest>/manifest.json      written last: a version without it is incomplete
    OUT/<digest>/summary.json       rows, quarantined, tasks, digest, counts per reason
    OUT/<digest>/data/part-NNNNN.parquet   rows in the canonical schema (corpus/schema.py)
    OUT/<digest>/quarantine.parquet rejected rows: reason, detail, source_ref, raw
"""
from __future__ import annotations

from dataclasses import dataclass

import pyarrow as pa
import pyarrow.parquet as pq

from vlit import storage

MANIFEST = "manifest.json"
SUMMARY = "summary.json"
DATA_DIR = "data"
QUARANTINE = "quarantine.parquet"


@dataclass(frozen=True)
class CorpusVersion:
    uri: str
    manifest: dict

    @classmethod
    def open(cls, uri: str) -> "CorpusVersion":
        uri = storage.normalize(uri)
        manifest_uri = storage.join(uri, MANIFEST)
        if not storage.exists(manifest_uri):
            raise FileNotFoundError(
                f"{uri} is not a complete corpus version: {MANIFEST} is missing "
                "(run `vlit corpus prepare` to make one)"
            )
        return cls(uri=uri, manifest=storage.read_json(manifest_uri))

    @property
    def digest(self) -> str:
        return self.manifest["digest"]

    @property
    def rows(self) -> int:
        return self.manifest["rows"]

    @property
    def task_counts(self) -> dict[str, int]:
        return dict(self.manifest["tasks"])

    @property
    def shard_uris(self) -> list[str]:
        return [storage.join(self.uri, DATA_DIR, name) for name in self.manifest["shards"]]

    @property
    def quarantine_uri(self) -> str:
        return storage.join(self.uri, QUARANTINE)

    def read_table(self, columns: list[str] | None = None) -> pa.Table:
        """The whole corpus as one table: for small corpora, tests and reports only."""
        tables = []
        for uri in self.shard_uris:
            fs, path = storage.filesystem(uri)
            tables.append(pq.read_table(path, filesystem=fs, columns=columns))
        return pa.concat_tables(tables)

    def read_quarantine(self) -> pa.Table:
        fs, path = storage.filesystem(self.quarantine_uri)
        return pq.read_table(path, filesystem=fs)
