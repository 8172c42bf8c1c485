"""A fault-injecting HTTP proxy in front of an S3 endpoint, for tests and benchmarks.

    client (pyarrow, boto3) -> FaultProxy on 127.0.0.1:<free port> -> upstream S3

Each request is read whole, then, with probability `rate` (a seeded RNG: a client that
sends its requests in the same order meets the same faults), one of these happens instead
of a plain forward:

    slowdown   503 SlowDown with S3's XML error body; the request never reaches upstream
    reset      the connection is reset (RST) without a reply; never reaches upstream
    reset_mid  forwarded, then the connection is reset halfway through the response, so
               upstream did the work and the client cannot know (PUT/DELETE/COPY replays)
    delay      forwarded after a pause of `delay_ms`

`counts` says how many of each were injected, so a test can assert the faults happened.
Nothing is logged: request headers carry the AWS signature and key id, and the request
line of a presigned URL carries them too.
"""
from __future__ import annotations

import collections
import contextlib
import http.client
import os
import random
import socket
import struct
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Iterator
from urllib.parse import urlparse
from xml.sax.saxutils import escape

KINDS = ("slowdown", "reset", "reset_mid", "delay")
# Hop-by-hop headers (RFC 9110 7.6.1) belong to one connection and are never forwarded;
# framing (Content-Length / Transfer-Encoding) is redone by the proxy on each side.
_HOP = {"connection", "keep-alive", "proxy-connection", "proxy-authenticate", "proxy-authorization",
        "te", "trailer", "transfer-encoding", "upgrade", "expect", "content-length"}
_CHUNK = 64 * 1024


class FaultProxy:
    def __init__(self, upstream: str, rate: float = 0.0, kinds: tuple[str, ...] = KINDS,
                 delay_ms: int = 200, seed: int = 0):
        unknown = set(kinds) - set(KINDS)
        if unknown:
            raise ValueError(f"unknown fault kinds {sorted(unknown)}; known: {KINDS}")
        self.upstream = urlparse(upstream)
        self.rate, self.kinds, self.delay_ms = rate, tuple(kinds), delay_ms
        self.counts: collections.Counter = collections.Counter()
        self.requests = 0
        self._rng = random.Random(seed)
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None

    # ---- lifecycle ----

    def start(self) -> "FaultProxy":
        # Port 0: the kernel picks a free port at bind time, so no other process can race us to it.
        self._server = _Server(("127.0.0.1", 0), _Handler)
        self._server.proxy = self
        self._thread = threading.Thread(target=self._server.serve_forever, name="fault-proxy", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.close_connections()
            self._server.server_close()
            self._server = None

    __enter__ = start

    def __exit__(self, *exc) -> None:
        self.stop()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    @contextlib.contextmanager
    def routing(self) -> Iterator["FaultProxy"]:
        """Point this process's S3 clients (vlit.storage, and boto3 via AWS_ENDPOINT_URL)
        at the proxy; restore the endpoint on exit. Ray workers started inside see it too."""
        from vlit import storage

        keys = [k for k in ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3") if k in os.environ] or ["AWS_ENDPOINT_URL"]
        saved = {k: os.environ.get(k) for k in keys}
        os.environ.update({k: self.endpoint for k in keys})
        storage._s3.cache_clear()  # clients are cached per endpoint
        try:
            yield self
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
            storage._s3.cache_clear()

    def stats(self) -> dict:
        with self._lock:
            return {"requests": self.requests, **{k: self.counts[k] for k in KINDS}}

    def _draw(self) -> str | None:
        with self._lock:
            self.requests += 1
            if self._rng.random() >= self.rate:
                return None
            kind = self._rng.choice(self.kinds)
            self.counts[kind] += 1
            return kind


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    proxy: FaultProxy

    def __init__(self, *args):
        super().__init__(*args)
        self._open: set[socket.socket] = set()
        self._open_lock = threading.Lock()

    def process_request_thread(self, request, client_address):
        with self._open_lock:
            self._open.add(request)
        try:
            super().process_request_thread(request, client_address)
        finally:
            with self._open_lock:
                self._open.discard(request)

    def close_connections(self) -> None:
        # Keep-alive connections of clients would otherwise hold handler threads forever.
        with self._open_lock:
            for sock in list(self._open):
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, and `Expect: 100-continue` answered for us
    server: _Server

    def log_message(self, format, *args) -> None:  # noqa: A002
        pass  # see the module docstring: nothing about a request is logged

    def do_request(self) -> None:
        proxy = self.server.proxy
        body = self._read_body()
        kind = proxy._draw()
        if kind == "slowdown":
            return self._slowdown()
        if kind == "reset":
            return self._reset()
        if kind == "delay":
            time.sleep(proxy.delay_ms / 1000)
        try:
            response = self._forward(body)
        except (OSError, http.client.HTTPException):
            return self._reset()  # upstream is gone: the client must see a failure, not a reply
        if kind == "reset_mid":
            return self._reply_half(response)
        self._relay(response)

    do_GET = do_HEAD = do_PUT = do_POST = do_DELETE = do_request

    def finish(self) -> None:
        try:
            super().finish()
        except OSError:
            pass  # a socket this handler reset
        finally:
            if getattr(self, "_upstream", None) is not None:
                self._upstream.close()

    # ---- request ----

    def _read_body(self) -> bytes | None:
        """The request body, de-chunked; None when the request has no body."""
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            parts = []
            while True:
                size = int(self.rfile.readline(1024).split(b";")[0].strip(), 16)
                if size == 0:
                    while self.rfile.readline(65537) not in (b"\r\n", b"\n", b""):
                        pass  # trailer fields: dropped (hop-by-hop framing)
                    return b"".join(parts)
                parts.append(self.rfile.read(size))
                self.rfile.readline(1024)  # the CRLF after each chunk
        length = self.headers.get("Content-Length")
        return self.rfile.read(int(length)) if length is not None else None

    def _forward(self, body: bytes | None) -> http.client.HTTPResponse:
        up = self.server.proxy.upstream
        if getattr(self, "_upstream", None) is None:
            cls = http.client.HTTPSConnection if up.scheme == "https" else http.client.HTTPConnection
            self._upstream = cls(up.hostname, up.port, timeout=120)
        conn = self._upstream
        drop = _HOP | {h.strip().lower() for h in self.headers.get("Connection", "").split(",")}
        for attempt in (0, 1):
            reused = conn.sock is not None
            try:
                # The client's Host header goes through unchanged: SigV4 signs it.
                conn.putrequest(self.command, self.path, skip_host=True, skip_accept_encoding=True)
                for name, value in self.headers.items():
                    if name.lower() not in drop:
                        conn.putheader(name, value)
                if body is not None:
                    conn.putheader("Content-Length", str(len(body)))
                conn.endheaders(body)
                return conn.getresponse()
            except (ConnectionError, http.client.RemoteDisconnected, http.client.CannotSendRequest):
                conn.close()
                if attempt or not reused:  # only a kept-alive connection upstream had closed gets
                    raise                  # a second try: anything else is the client's to retry
        raise AssertionError("unreachable")

    # ---- replies ----

    def _slowdown(self) -> None:
        request_id = uuid.uuid4().hex[:16].upper()
        body = (
            '<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>SlowDown</Code>'
            "<Message>Please reduce your request rate.</Message>"
            f"<Resource>{escape(self.path.split('?', 1)[0])}</Resource>"
            f"<RequestId>{request_id}</RequestId></Error>"
        ).encode()
        self.send_response_only(503, "Slow Down")
        self.send_header("Content-Type", "application/xml")
        self.send_header("Content-Length", str(len(body)))
        self.send_header("x-amz-request-id", request_id)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _reset(self) -> None:
        # SO_LINGER 0: close() sends RST instead of FIN, as a crashed peer or a cut link would.
        self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.connection.close()
        self.close_connection = True

    def _head(self, response: http.client.HTTPResponse) -> list[tuple[str, str]]:
        return [(k, v) for k, v in response.getheaders() if k.lower() not in _HOP]

    def _no_body(self, status: int) -> bool:
        return self.command == "HEAD" or status in (204, 304) or 100 <= status < 200

    def _reply_half(self, response: http.client.HTTPResponse) -> None:
        """Send the first half of the whole reply (status line, headers, body), then reset."""
        body = b"" if self._no_body(response.status) else response.read()
        lines = [f"HTTP/1.1 {response.status} {response.reason}"]
        lines += [f"{k}: {v}" for k, v in self._head(response)]
        if not self._no_body(response.status) or self.command == "HEAD":
            length = response.getheader("Content-Length") if self.command == "HEAD" else str(len(body))
            if length is not None:
                lines.append(f"Content-Length: {length}")
        whole = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body
        with contextlib.suppress(OSError):
            self.wfile.write(whole[: len(whole) // 2])
        self._reset()

    def _relay(self, response: http.client.HTTPResponse) -> None:
        self.send_response_only(response.status, response.reason)
        for name, value in self._head(response):
            self.send_header(name, value)
        length = response.getheader("Content-Length")
        if self._no_body(response.status):
            if length is not None:
                self.send_header("Content-Length", length)  # HEAD: the size of what GET would send
            self.end_headers()
            response.read()
            return
        chunked = length is None  # upstream sent chunks or read-until-close: re-chunk it
        self.send_header(*(("Transfer-Encoding", "chunked") if chunked else ("Content-Length", length)))
        self.end_headers()
        sent = 0
        try:
            while data := response.read1(_CHUNK):
                self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data) if chunked else data)
                sent += len(data)
            if chunked:
                self.wfile.write(b"0\r\n\r\n")
            elif sent != int(length):
                raise http.client.IncompleteRead(b"", int(length) - sent)  # read1 ends short silently
        except http.client.IncompleteRead:
            # Upstream broke off: the client must see a broken reply, never a short one.
            self._upstream.close()
            self._reset()
        except OSError:  # the client went away: the upstream connection is mid-reply, drop it
            self._upstream.close()
            self.close_connection = True
