"""Image checks at ingest (once per distinct image) and decoding for the stream.

Levels: `exists` (one metadata call per image), `header` (reads the first bytes and
parses the header: format and size; the default), `decode` (reads and decodes the whole
image). A header check passes a file truncated after its header; the stream then
quarantines it when the full decode fails, so both places share `decode_image`.
"""
from __future__ import annotations

import io
import time
from concurrent.futures import ThreadPoolExecutor

import pyarrow.fs as pafs
from PIL import Image

from vlit import storage

HEADER_BYTES = 64 * 1024
# Decompression-bomb guard: refuse images above this many pixels (about 16k x 16k).
Image.MAX_IMAGE_PIXELS = 256_000_000


def read_image_bytes(uri: str) -> bytes:
    return storage.read_bytes(uri)


def decode_image(data: bytes) -> Image.Image:
    """Fully decoded RGB image; raises on anything that is not a whole, readable image."""
    with Image.open(io.BytesIO(data)) as img:
        img.load()
        return img.convert("RGB")


def _parses(data: bytes) -> bool:
    try:
        with Image.open(io.BytesIO(data)) as img:
            img.size  # noqa: B018 — parsing the header is the check
        return True
    except Exception:
        return False


def _check_header(uri: str) -> str | None:
    """None when the header parses, else the reason. Read errors raise: they are the
    store's, not the image's."""
    fs, path = storage.filesystem(uri)
    with fs.open_input_file(path) as f:
        head = f.read(HEADER_BYTES)
        if _parses(head):
            return None
        if len(head) < HEADER_BYTES:
            return "image_undecodable"
        # Headers larger than HEADER_BYTES (big EXIF blocks): read the rest and retry.
        head += f.read()
    return None if _parses(head) else "image_undecodable"


class StoreReadError(RuntimeError):
    """An image could not be read after the retries: the store failed, not the image.
    Prepare stops without publishing (and can be run again) instead of quarantining a
    good row as bad."""


class ImageChecker:
    """Checks each distinct image once; results are cached for the whole prepare run."""

    def __init__(self, level: str, threads: int):
        self.level = level
        self.threads = threads
        self.results: dict[str, str | None] = {}  # uri -> None (ok) or a quarantine reason
        self.seconds = 0.0

    def check(self, uris: list[str]) -> dict[str, str | None]:
        todo = [u for u in dict.fromkeys(uris) if u not in self.results]
        if todo:
            start = time.perf_counter()
            if self.level == "exists":
                self._exists(todo)
            else:
                with ThreadPoolExecutor(self.threads) as pool:
                    for uri, result in zip(todo, pool.map(self._check_one, todo)):
                        self.results[uri] = result
            self.seconds += time.perf_counter() - start
        return self.results

    def _exists(self, uris: list[str]) -> None:
        # One batched metadata call per filesystem (pyarrow fans S3 HEADs out itself).
        groups: dict[int, tuple[pafs.FileSystem, list[tuple[str, str]]]] = {}
        for uri in uris:
            fs, path = storage.filesystem(uri)
            groups.setdefault(id(fs), (fs, []))[1].append((uri, path))
        for fs, pairs in groups.values():
            for (uri, _), info in zip(pairs, fs.get_file_info([p for _, p in pairs])):
                self.results[uri] = None if info.type == pafs.FileType.File else "image_missing"

    def _check_one(self, uri: str) -> str | None:
        try:
            if self.level == "header":
                # Its reads are small (a header, a small file): see storage.retrying.
                return storage.retrying(_check_header, uri)
            data = read_image_bytes(uri)
        except FileNotFoundError:
            return "image_missing"
        except OSError as e:
            # pyarrow reports a missing S3 object as OSError with "Path does not exist".
            if "does not exist" in str(e) or "NoSuchKey" in str(e):
                return "image_missing"
            if isinstance(e, IsADirectoryError):
                return "image_undecodable"
            raise StoreReadError(f"reading {uri} failed after the retries: {e}") from e
        try:
            decode_image(data)
        except Exception:
            return "image_undecodable"
        return None
