"""The streaming JSON-array splitter against json.loads, on the strings that break naive splitters."""
from __future__ import annotations

import io
import json
import random

import pytest

from vlit.corpus.jsonstream import ChunkReader, JSONStreamError, iter_chunks

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


def _consume_fast(data: bytes, chunk_bytes: int) -> tuple[list, int]:
    """Read like prepare does: parse each chunk, hand back the ones that fail."""
    reader = ChunkReader(io.BytesIO(data), "t.json", chunk_bytes=chunk_bytes)
    out, rejects = [], 0
    for chunk in reader:
        try:
            parsed = [json.loads(line) for line in chunk.ndjson.split(b"\n")]
            assert all(isinstance(p, dict) for p in parsed) and len(parsed) == chunk.count
        except (ValueError, AssertionError):
            assert not chunk.exact
            reader.reject()
            rejects += 1
            continue
        assert chunk.first_position == len(out)
        out += parsed
    return out, rejects


@pytest.mark.parametrize("indent", [None, 1])
def test_fast_path_learns_separator(indent):
    rows = [{"id": i, "conversations": [{"from": "human", "value": f"q{i}"}]} for i in range(3000)]
    out, rejects = _consume_fast(json.dumps(rows, indent=indent).encode(), 4096)
    assert out == rows and rejects == 0


def test_fast_path_recovers_from_wrong_splits():
    # Inside strings the separator literal cannot occur (its quotes would be escaped), but
    # a nested list of objects that start with the elements' first key splits wrongly:
    # that chunk fails to parse and is redone exactly.
    rows = [{"id": i, "note": 'a "}, {"id": 5" string'} for i in range(2000)]
    rows[1700]["items"] = [{"id": 1}, {"id": 2}]
    out, rejects = _consume_fast(json.dumps(rows).encode(), 2048)
    assert out == rows and rejects == 1
