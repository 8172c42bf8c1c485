"""Stage keys and the ledger of finished stages: what makes the two-stage job idempotent.

A stage's key is a hash of what determines its output: the digests of its inputs (a
corpus version, the previous stage's key) and its settings. Its outputs live under
OUT/<stage>-<key>/, so a run killed mid-stage and started again finds the same folder
(and Ray Train its checkpoints there); when the stage finishes, its record is written to
OUT/ledger/<stage>-<key>.json, last. A re-run that finds the record skips the stage and
uses the record's outputs.
"""
from __future__ import annotations

import datetime as dt
import hashlib
import json

from vlit import storage

KEY_CHARS = 16


def stage_key(stage: str, inputs: dict[str, str], settings: dict) -> str:
    """sha256 over the stage name, its inputs' digests and its settings (canonical JSON)."""
    blob = json.dumps({"stage": stage, "inputs": inputs, "settings": settings}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:KEY_CHARS]


class Ledger:
    def __init__(self, out: str):
        self.out = storage.normalize(out)

    def stage_dir(self, stage: str, key: str) -> str:
        return storage.join(self.out, f"{stage}-{key}")

    def _record_uri(self, stage: str, key: str) -> str:
        return storage.join(self.out, "ledger", f"{stage}-{key}.json")

    def get(self, stage: str, key: str) -> dict | None:
        """The finished stage's record, or None when it has not finished."""
        uri = self._record_uri(stage, key)
        return storage.read_json(uri) if storage.exists(uri) else None

    def put(self, stage: str, key: str, inputs: dict[str, str], outputs: dict) -> dict:
        record = {"stage": stage, "key": key, "inputs": inputs, "outputs": outputs,
                  "finished_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")}
        storage.write_json(self._record_uri(stage, key), record)
        return record
