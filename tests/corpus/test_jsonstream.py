"""The streaming JSON-array splitter against json.loads, on the strings that break naive splitters."""
from __future__ import annotations

import io
import json
import random

import pytest

from vlit.corpus.jsonstream import JSONStreamError, iter_chunks

TRICKY = ['plain', 'a "quoted" word', 'back\\slash', 'ends with \\', 'brace { [ , ] } }', 'new\nline',
          'uni é 中 \u2028', '\\"', '\\\\"', '"', '},{', '", "x": "']


def _rows(n: int) -> list:
    rng = random.Random(0)
    return [{"id": i, "v": rng.choice(TRICKY), "nested": [{"a": [1, {"b": rng.choice(TRICKY)}]}], "e": {}} for i in range(n)]


def _roundtrip(data: bytes, chunk_bytes: int) -> list:
    out, position = [], 0
    for chunk in iter_chunks(io.BytesIO(data), "t.json", chunk_bytes=chunk_bytes):
        assert chunk.first_position == position
        lines = chunk.ndjson.split(b"\n")
        assert len(lines) == chunk.count
        out += [json.loads(line) for line in lines]
        position += chunk.count
    return out


@pytest.mark.parametrize("indent", [None, 2])
@pytest.mark.parametrize("chunk_bytes", [64, 4096, 1 << 20])
def test_array_roundtrip(indent, chunk_bytes):
    rows = _rows(500)
    assert _roundtrip(json.dumps(rows, indent=indent, ensure_ascii=False).encode(), chunk_bytes) == rows


def test_jsonl_and_empty():
    rows = _rows(50)
    data = ("\n".join(json.dumps(r) for r in rows) + "\n\n").encode()
    assert _roundtrip(data, 256) == rows
    assert _roundtrip(b"  [ ]  ", 16) == []
    assert _roundtrip(b"", 16) == []


@pytest.mark.parametrize(
    "data, message",
    [
        (b'[{"a": 1}, {"b": "x', "ended inside the top-level array"),
        (b'[{"a": 1}] trailing', "data after the closing"),
        (b'"just a string"', "expected a JSON array or JSON Lines"),
    ],
)
def test_structural_errors_name_file_and_offset(data, message):
    with pytest.raises(JSONStreamError, match=message) as err:
        list(iter_chunks(io.BytesIO(data), "bad.json", chunk_bytes=8))
    assert "bad.json" in str(err.value)
