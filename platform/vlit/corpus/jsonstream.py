"""Stream a top-level JSON array (or JSON Lines) as chunks of newline-delimited JSON.

Release files of instruction-tuning corpora are single JSON arrays of about 1 GB. Loading
one with `json.load` holds every row as Python objects (~4 GB). Here the array is read in
bounded chunks and the top-level element boundaries are found with numpy (string-aware:
quotes, escapes, nesting), then each run of complete elements is rewritten as NDJSON —
raw newlines can only be whitespace in valid JSON, so they become spaces and each
top-level separator becomes a newline. pyarrow's multithreaded JSON reader parses the
result. Memory stays at a few chunks whatever the file size.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import IO, Iterator

import numpy as np

CHUNK_BYTES = 32 * 1024 * 1024

_NL, _CR, _SPACE = 0x0A, 0x0D, 0x20
# One byte-to-class table: every byte that matters for splitting maps to a non-zero
# class, so a single C pass (bytes.translate) plus one flatnonzero finds them all.
_OPEN, _CLOSE, _COMMA, _QUOTE, _BACKSLASH = 1, 2, 3, 4, 5
_CLASSES = bytearray(256)
for _ch, _cls in (("{", _OPEN), ("[", _OPEN), ("}", _CLOSE), ("]", _CLOSE), (",", _COMMA),
                  ('"', _QUOTE), ("\\", _BACKSLASH)):
    _CLASSES[ord(_ch)] = _cls
_CLASSES = bytes(_CLASSES)
_STEP = np.array([0, 1, -1, 0, 0, 0], dtype=np.int8)  # depth change per class
_NEWLINES_TO_SPACES = bytes.maketrans(b"\r\n", b"  ")
_WS = b" \t\r\n"


class JSONStreamError(ValueError):
    """The file is not a JSON array (or JSON Lines) we can split; names file and byte offset."""


@dataclass
class Chunk:
    ndjson: bytes  # one element per line
    first_position: int  # index in the source of the first element
    count: int


def _split(buf: bytes) -> tuple[np.ndarray, int | None]:
    """Top-level separators (commas at depth 0) in a buffer that starts between elements,
    and the position of the closing `]` of the array if it is in the buffer."""
    classes = np.frombuffer(buf.translate(_CLASSES), dtype=np.uint8)
    pos = np.flatnonzero(classes != 0)
    cls = classes[pos]
    # A quote is escaped when an odd run of backslashes stands right before it. Runs of
    # backslashes are consecutive entries in `pos`, so walk back only where needed.
    quote = cls == _QUOTE
    is_bs = cls == _BACKSLASH
    maybe = np.flatnonzero(quote[1:] & is_bs[:-1] & (pos[1:] - pos[:-1] == 1)) + 1
    if len(maybe):
        # Common case: a single backslash (\") escapes the quote.
        longer = (maybe >= 2) & is_bs[np.maximum(maybe - 2, 0)] & (pos[maybe] - pos[np.maximum(maybe - 2, 0)] == 2)
        quote[maybe[~longer]] = False
        for i in maybe[longer]:  # rare: \\" and longer runs; count the run
            run, j = 0, i - 1
            while j >= 0 and is_bs[j] and pos[j] == pos[i] - (i - j):
                run, j = run + 1, j - 1
            quote[i] = run % 2 == 0
    # Inside a string after an odd number of real quotes; quotes and backslashes are
    # never structural, and class values below _QUOTE are exactly the structural ones.
    inside = (np.cumsum(quote, dtype=np.int32) & 1).astype(bool)
    struct = ~inside & (cls < _QUOTE)
    spos, scls = pos[struct], cls[struct]
    step = _STEP[scls]
    depth = np.cumsum(step, dtype=np.int32)
    seps = spos[(scls == _COMMA) & (depth == 0)]
    closes = spos[depth < 0]
    return seps, (int(closes[0]) if len(closes) else None)


def _skip_ws(data: bytes, i: int) -> int:
    while i < len(data) and data[i] in _WS:
        i += 1
    return i


def iter_chunks(stream: IO[bytes], name: str, chunk_bytes: int = CHUNK_BYTES) -> Iterator[Chunk]:
    """Chunks of NDJSON from a JSON array or a JSON Lines stream (detected by the first byte)."""
    head = stream.read(chunk_bytes)
    i = _skip_ws(head, 0)
    if i == len(head):
        return
    if head[i : i + 1] == b"[":
        yield from _array_chunks(stream, name, head[i + 1 :], i + 1, chunk_bytes)
    elif head[i : i + 1] == b"{":
        yield from _lines_chunks(stream, head, chunk_bytes)
    else:
        raise JSONStreamError(f"{name}: byte {i}: expected a JSON array or JSON Lines, got {head[i:i+20]!r}")


def _lines_chunks(stream: IO[bytes], head: bytes, chunk_bytes: int) -> Iterator[Chunk]:
    position, buf = 0, head
    while True:
        more = stream.read(chunk_bytes) if buf else b""
        data = buf + more
        if not more:
            end = len(data)
        else:
            end = data.rfind(b"\n") + 1
            if end == 0:
                buf = data
                continue
        block, buf = data[:end], data[end:]
        lines = [ln for ln in block.split(b"\n")]
        # Blank lines are not rows; keep positions counting real lines.
        kept = [ln for ln in lines if ln.strip()]
        if kept:
            yield Chunk(b"\n".join(kept), position, len(kept))
            position += len(kept)
        if not more:
            return


def _array_chunks(stream: IO[bytes], name: str, buf: bytes, offset: int, chunk_bytes: int) -> Iterator[Chunk]:
    """`buf` starts just after the opening `[`; `offset` is its byte offset in the file."""
    position = 0
    eof = False
    while True:
        if not eof:
            more = stream.read(chunk_bytes)
            eof = len(more) == 0
            buf += more
        seps, close = _split(buf)
        if close is not None:
            seps = seps[seps < close]
            body_end = close
        elif eof:
            raise JSONStreamError(
                f"{name}: ended inside the top-level array (truncated or unbalanced) "
                f"after element {position + len(seps)}, near byte {offset + len(buf)}"
            )
        elif len(seps):
            body_end = int(seps[-1])
            seps = seps[:-1]
        else:
            continue  # one element larger than the buffer: read more
        body = bytearray(buf[:body_end].translate(_NEWLINES_TO_SPACES))
        np.frombuffer(body, dtype=np.uint8)[seps] = _NL
        text = bytes(body)
        count = len(seps) + 1
        if close is not None:
            rest = buf[close + 1 :]
            if rest.strip() or (not eof and stream.read(1).strip()):
                raise JSONStreamError(f"{name}: byte {offset + close + 1}: data after the closing ']'")
            if not text.strip():
                if len(seps):
                    raise JSONStreamError(f"{name}: byte {offset}: empty element in the array")
                return  # an empty array, or the tail after the last separator was empty
            yield Chunk(text, position, count)
            return
        yield Chunk(text, position, count)
        position += count
        buf = buf[body_end + 1 :]
        offset += body_end + 1
