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

import re
from dataclasses import dataclass
from typing import IO, Iterator

import numpy as np

CHUNK_BYTES = 16 * 1024 * 1024

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
    exact: bool = True  # False: split on the learned separator, not yet verified by a parse


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
    """Chunks of NDJSON from a JSON array or a JSON Lines stream, always split exactly."""
    return iter(ChunkReader(stream, name, chunk_bytes, fast=False))


class ChunkReader:
    """Chunks of NDJSON from a JSON array or JSON Lines stream (detected by the first byte).

    Fast path for arrays: a file written by one `json.dump` separates its elements with
    the same bytes every time (e.g. `}, {"id"`: closing brace, comma, the next element's
    first key). That literal is learned from the first elements, which are split exactly,
    and later chunks are split on it with `bytes.split`. The literal cannot occur inside a
    string (its quotes would be escaped there); where it opens a nested object, the split
    leaves lines that are not whole JSON objects,
    so the consumer's parse fails; it then calls `reject()` and the reader splits that
    chunk and the rest of the file exactly, from the last boundary that parsed.
    """

    def __init__(self, stream: IO[bytes], name: str, chunk_bytes: int = CHUNK_BYTES, fast: bool = True):
        self.stream, self.name, self.chunk_bytes = stream, name, chunk_bytes
        self.fast = fast
        self._separator: bytes | None = None
        self._rejected: tuple[bytes, int, int] | None = None  # (data, position, offset) to redo

    def reject(self) -> None:
        """The last chunk did not parse: redo it, and everything after it, exactly."""
        self._separator = None
        self.fast = False
        self._rejected = self._last

    def __iter__(self) -> Iterator[Chunk]:
        head = self.stream.read(self.chunk_bytes)
        i = _skip_ws(head, 0)
        if i == len(head):
            return
        if head[i : i + 1] == b"{":
            yield from _lines_chunks(self.stream, head, self.chunk_bytes)
        elif head[i : i + 1] == b"[":
            yield from self._array(head[i + 1 :], i + 1)
        else:
            raise JSONStreamError(f"{self.name}: byte {i}: expected a JSON array or JSON Lines, got {head[i:i+20]!r}")

    def _array(self, buf: bytes, offset: int) -> Iterator[Chunk]:
        """`buf` starts just after the opening `[`, or after a top-level comma."""
        position, eof = 0, False
        while True:
            if self._rejected is not None:
                buf, position, offset = self._rejected
                self._rejected = None
            if not eof:
                more = self.stream.read(self.chunk_bytes)
                eof = not more
                buf += more
            self._last = (buf, position, offset)
            if self.fast and self._separator is None:
                self._separator = _learn_separator(buf)  # buf starts at an element
            step = self._fast_step(buf, eof) if self._separator else self._exact_step(buf, eof, position, offset)
            if step is None:
                continue  # no complete element in the buffer yet: read more
            chunk_text, count, consumed, done = step
            if chunk_text:
                yield Chunk(chunk_text, position, count, exact=self._separator is None)
                if self._rejected is not None:
                    continue
            if done:
                return
            position += count
            buf, offset = buf[consumed:], offset + consumed

    def _fast_step(self, buf: bytes, eof: bool):
        sep = self._separator
        if eof:
            body = buf.rstrip()
            if not body.endswith(b"]"):
                return self._exact_step(buf, eof, 0, 0)  # let the exact scanner name the error
            body, consumed, done = body[:-1], len(buf), True
        else:
            j = buf.rfind(sep)
            if j < 0:
                return None
            body, consumed, done = buf[: j + 1], j + sep.index(b",") + 1, False
        parts = body.split(sep)
        flat = sep
        # Raw newlines anywhere but in the separators (indented files) become spaces;
        # counting is a fast scan, translating copies the chunk, so count first.
        if body.count(b"\n") != (len(parts) - 1) * sep.count(b"\n") or b"\r" in body:
            flat = sep.translate(_NEWLINES_TO_SPACES)
            parts = body.translate(_NEWLINES_TO_SPACES).split(flat)
        if len(parts) == 1 and not parts[0].strip():
            return b"", 0, consumed, done
        return (b"}\n" + flat[flat.index(b"{"):]).join(parts), len(parts), consumed, done

    def _exact_step(self, buf: bytes, eof: bool, position: int, offset: int):
        seps, close = _split(buf)
        if close is not None:
            seps = seps[seps < close]
            body_end = close
        elif eof:
            raise JSONStreamError(
                f"{self.name}: ended inside the top-level array (truncated or unbalanced) "
                f"after element {position + len(seps)}, near byte {offset + len(buf)}"
            )
        elif len(seps):
            body_end = int(seps[-1])
            seps = seps[:-1]
        else:
            return None
        body = bytearray(buf[:body_end].translate(_NEWLINES_TO_SPACES))
        np.frombuffer(body, dtype=np.uint8)[seps] = _NL
        text = bytes(body)
        if close is not None:
            rest = buf[close + 1 :]
            if rest.strip() or (not eof and self.stream.read(1).strip()):
                raise JSONStreamError(f"{self.name}: byte {offset + close + 1}: data after the closing ']'")
            if not text.strip():
                if len(seps):
                    raise JSONStreamError(f"{self.name}: byte {offset}: empty element in the array")
                return b"", 0, len(buf), True
            return text, len(seps) + 1, len(buf), True
        return text, len(seps) + 1, body_end + 1, False


def _learn_separator(buf: bytes) -> bytes | None:
    """The bytes between two elements: `}` + whitespace + `,` + whitespace + `{` + the first
    key, taken from the first boundary in `buf` (which starts at an element)."""
    seps, _ = _split(buf[: 1 << 20])
    if not len(seps):
        return None
    comma = int(seps[0])
    brace = buf.rfind(b"}", 0, comma)
    if brace < 0 or buf[brace + 1 : comma].strip():
        return None
    match = re.match(rb'\s*\{\s*"(?:[^"\\]|\\.)*"', buf[comma + 1 : comma + 512])
    return buf[brace : comma + 1 + match.end()] if match else None


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
        # Blank lines are not rows; positions count the rows.
        kept = [ln for ln in block.split(b"\n") if ln.strip()]
        if kept:
            yield Chunk(b"\n".join(kept), position, len(kept))
            position += len(kept)
        if not more:
            return
