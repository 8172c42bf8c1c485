"""URIs to filesystems: plain paths, file:// and s3:// through one helper.

Credentials never pass through here as arguments or config: pyarrow reads the standard
AWS variables (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_SESSION_TOKEN, profiles) itself,
so nothing we log or track can contain them. The endpoint of an S3-compatible store comes
from `AWS_ENDPOINT_URL` (or `AWS_ENDPOINT_URL_S3`), or from `storage.endpoint_url` in config.
"""
from __future__ import annotations

import contextlib
import functools
import json
import os
from typing import IO, Iterator
from urllib.parse import urlparse

import pyarrow.fs as pafs

from vlit import retry

# Retry and time-out settings for object storage live here and nowhere else. One policy,
# the AWS SDKs' "standard" mode (exponential back-off with jitter; throttling, 5xx and
# connection errors retried), for pyarrow's client and any boto3 client alike.
S3_RETRY_MODE = "standard"
S3_RETRY_ATTEMPTS = 8  # attempts in all, the first included (the same count in both SDKs)
S3_CONNECT_TIMEOUT_S = 10.0
S3_REQUEST_TIMEOUT_S = 60.0


def retry_settings() -> dict:
    """The object-store retry policy as flat values, for jobs to log with their params."""
    return {
        "s3.retry_mode": S3_RETRY_MODE,
        "s3.max_attempts": S3_RETRY_ATTEMPTS,
        "s3.connect_timeout_s": S3_CONNECT_TIMEOUT_S,
        "s3.request_timeout_s": S3_REQUEST_TIMEOUT_S,
    }


def botocore_config():
    """The same policy for a boto3 client: `boto3.client("s3", config=botocore_config())`."""
    from botocore.config import Config

    return Config(
        # total_max_attempts counts the first attempt, as pyarrow's max_attempts does
        # (botocore's `max_attempts` would count retries only).
        retries={"mode": S3_RETRY_MODE, "total_max_attempts": S3_RETRY_ATTEMPTS},
        connect_timeout=S3_CONNECT_TIMEOUT_S,
        read_timeout=S3_REQUEST_TIMEOUT_S,
    )


# Transient failures the AWS SDK gives up on at once, as INTERNAL_FAILURE. The one known:
# a 503 SlowDown (or any error) answering a ranged GET smaller than its XML body. pyarrow
# has the SDK write the body into the caller's buffer, sized to the range; the XML does not
# fit, the stream turns bad and the status is lost ("Failed to flush response stream").
# Small reads are common: a header check, the tail of a file, a one-byte peek.
_UNRETRIED_TRANSIENT = ("Failed to flush response stream",)


def _transient(e: BaseException) -> bool:
    return isinstance(e, OSError) and any(m in str(e) for m in _UNRETRIED_TRANSIENT)


def retrying(fn, *args, **kwargs):
    """`fn(*args, **kwargs)`, retried under the policy above when it fails with an error
    in _UNRETRIED_TRANSIENT: the same attempts, and the standard mode's back-off
    (full jitter, doubling from 1 s, at most 20 s). `fn` must be safe to repeat."""
    return retry.call(lambda: fn(*args, **kwargs), attempts=S3_RETRY_ATTEMPTS, retryable=_transient,
                      base_s=1.0, cap_s=20.0)


class _RetryingReads:
    """A pyarrow input stream whose reads go through `retrying`. A failed read leaves the
    position where it was (pyarrow advances it on success only), so repeating it is exact."""

    _READS = frozenset({"read", "read1", "readinto", "read_at", "read_buffer"})

    def __init__(self, f):
        self._f = f

    def __getattr__(self, name):
        attr = getattr(self._f, name)
        return functools.partial(retrying, attr) if name in self._READS else attr


def is_s3(uri: str) -> bool:
    return uri.startswith("s3://")


def _endpoint() -> str | None:
    return os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")


def _endpoint_kwargs(endpoint: str | None) -> dict:
    if not endpoint:
        return {}
    parsed = urlparse(endpoint if "://" in endpoint else f"https://{endpoint}")
    return {"endpoint_override": parsed.netloc, "scheme": parsed.scheme}


def _region() -> str:
    return os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1"


@functools.lru_cache(maxsize=8)
def _s3(endpoint: str | None, region: str) -> pafs.S3FileSystem:
    kwargs = _endpoint_kwargs(endpoint)
    return pafs.S3FileSystem(
        region=region,
        connect_timeout=S3_CONNECT_TIMEOUT_S,
        request_timeout=S3_REQUEST_TIMEOUT_S,
        retry_strategy=pafs.AwsStandardS3RetryStrategy(max_attempts=S3_RETRY_ATTEMPTS),
        **kwargs,
    )


def _remove_dot_segments(path: str) -> str:
    """`path` with `.` and `..` segments resolved (RFC 3986 5.2.4), `..` stopping at the top.

    The S3 client does this to the request path before sending it, so `s3://b/../other/k`
    reads bucket `other`: resolving here first makes the path we check the one fetched.
    Empty segments stay (`a//b` and `a/b` are different keys); `%2e%2e` stays a literal
    key name, which is how the client sends it (as `%252e%252e`).
    """
    out: list[str] = []
    for segment in path.split("/"):
        if segment == "..":
            if out:
                out.pop()
        elif segment != ".":
            out.append(segment)
    return "/".join(out)


def _s3_path(uri: str) -> str:
    return _remove_dot_segments(uri[len("s3://"):]).rstrip("/")


def filesystem(uri: str) -> tuple[pafs.FileSystem, str]:
    """The pyarrow filesystem for `uri` and the path inside it."""
    if is_s3(uri):
        return _s3(_endpoint(), _region()), _s3_path(uri)
    if uri.startswith("file://"):
        uri = uri[len("file://"):]
    return pafs.LocalFileSystem(), os.path.abspath(os.path.expanduser(uri))


class Unreachable(RuntimeError):
    """A store or service the job needs does not answer; the message names its URI."""


def check_reachable(uris: list[str]) -> None:
    """Fail fast, naming the URI, when an s3:// location's bucket cannot be reached: a job
    checks every store it will write before its first stage, so none runs half-configured.
    Two attempts with a short connect timeout, not the data path's eight (minutes of
    back-off against an endpoint that is simply not there)."""
    buckets = sorted({_s3_path(u).split("/")[0]: u for u in uris if is_s3(u)}.items())
    if not buckets:
        return
    endpoint = _endpoint()
    fs = pafs.S3FileSystem(region=_region(), connect_timeout=3.0, request_timeout=10.0,
                           retry_strategy=pafs.AwsStandardS3RetryStrategy(max_attempts=2),
                           **_endpoint_kwargs(endpoint))
    where = f" at endpoint {endpoint}" if endpoint else ""
    for bucket, uri in buckets:
        try:
            found = fs.get_file_info(bucket).type != pafs.FileType.NotFound
        except OSError as e:
            raise Unreachable(f"cannot reach {uri}{where}: {e}") from None
        if not found:
            raise Unreachable(f"bucket of {uri} does not exist{where}")


def normalize(uri: str) -> str:
    """Canonical spelling of a URI: s3:// kept, local paths made absolute; both with
    `.` and `..` resolved, so it names what a read of it would fetch."""
    if is_s3(uri):
        return "s3://" + _s3_path(uri)
    return filesystem(uri)[1]


def join(uri: str, *parts: str) -> str:
    base = normalize(uri)
    for part in parts:
        base = base.rstrip("/") + "/" + part.lstrip("/")
    return base


def parent(uri: str) -> str:
    uri = normalize(uri)
    head, _, _ = uri.rpartition("/")
    return head if head not in ("", "s3:/") else uri


def exists(uri: str) -> bool:
    fs, path = filesystem(uri)
    return fs.get_file_info(path).type != pafs.FileType.NotFound


def makedirs(uri: str) -> None:
    fs, path = filesystem(uri)
    fs.create_dir(path, recursive=True)


@contextlib.contextmanager
def open_input(uri: str) -> Iterator[IO[bytes]]:
    fs, path = filesystem(uri)
    with fs.open_input_stream(path) as f:
        yield _RetryingReads(f) if is_s3(uri) else f


@contextlib.contextmanager
def open_output(uri: str) -> Iterator[IO[bytes]]:
    fs, path = filesystem(uri)
    if not is_s3(uri):
        fs.create_dir(os.path.dirname(path), recursive=True)
    with fs.open_output_stream(path) as f:
        yield f


def read_bytes(uri: str) -> bytes:
    with open_input(uri) as f:
        return f.read()


def write_bytes(uri: str, data: bytes) -> None:
    with open_output(uri) as f:
        f.write(data)


def read_json(uri: str):
    return json.loads(read_bytes(uri))


def write_json(uri: str, obj) -> None:
    write_bytes(uri, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


def list_file_infos(uri: str, suffixes: tuple[str, ...] | None = None) -> list[tuple[str, int, int | None]]:
    """(URI, size, modification time in ns) of the files under `uri` (recursively), sorted
    by URI; `uri` itself if it is a file."""
    fs, path = filesystem(uri)
    info = fs.get_file_info(path)
    prefix = "s3://" if is_s3(uri) else ""
    if info.type == pafs.FileType.File:
        return [(prefix + path, info.size, info.mtime_ns)]
    if info.type == pafs.FileType.NotFound:
        raise FileNotFoundError(f"no such file or directory: {uri}")
    infos = fs.get_file_info(pafs.FileSelector(path, recursive=True))
    return sorted(
        (prefix + i.path, i.size, i.mtime_ns)
        for i in infos
        if i.type == pafs.FileType.File and (suffixes is None or i.path.lower().endswith(suffixes))
    )


def list_files(uri: str, suffixes: tuple[str, ...] | None = None) -> list[str]:
    """Files under `uri` (recursively), as sorted URIs; `uri` itself if it is a file."""
    return [u for u, _, _ in list_file_infos(uri, suffixes)]


def delete_dir(uri: str) -> None:
    fs, path = filesystem(uri)
    if fs.get_file_info(path).type != pafs.FileType.NotFound:
        fs.delete_dir(path)


def move_dir(src: str, dst: str) -> None:
    """Move a directory tree. Local: one atomic rename. S3: server-side copies, then delete."""
    fs, src_path = filesystem(src)
    _, dst_path = filesystem(dst)
    if not is_s3(src):
        os.makedirs(os.path.dirname(dst_path), exist_ok=True)
        os.replace(src_path, dst_path)
        return
    for info in fs.get_file_info(pafs.FileSelector(src_path, recursive=True)):
        if info.type == pafs.FileType.File:
            fs.copy_file(info.path, dst_path + info.path[len(src_path):])
    fs.delete_dir(src_path)


def common_parent(uris: list[str]) -> str | None:
    """The deepest folder holding every URI (None for none): the image root of release-
    format rows, whose image paths are relative to it."""
    if not uris:
        return None
    parts = [parent(u).split("/") for u in uris]
    common = parts[0]
    for p in parts[1:]:
        n = 0
        while n < min(len(common), len(p)) and common[n] == p[n]:
            n += 1
        common = common[:n]
    return "/".join(common)
