"""The fault proxy itself: a faithful forwarder (chunked and sized bodies, HEAD, kept-alive
connections) when it injects nothing, and faults that S3 clients read as S3 would send them."""
from __future__ import annotations

import http.client
import os

import boto3
import botocore.exceptions
import pytest

from vlit import storage
from support.faults import FaultProxy


def _client(endpoint: str, attempts: int = 1):
    config = storage.botocore_config().merge(botocore.config.Config(retries={"total_max_attempts": attempts}))
    return boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1", config=config)


def _signed(method: str, url: str, headers: dict | None = None) -> dict:
    """SigV4 headers for a raw request (an unsigned payload, as S3 allows)."""
    from botocore.auth import S3SigV4Auth
    from botocore.awsrequest import AWSRequest

    request = AWSRequest(method=method, url=url, headers={"x-amz-content-sha256": "UNSIGNED-PAYLOAD", **(headers or {})})
    S3SigV4Auth(boto3.Session().get_credentials(), "s3", "us-east-1").add_auth(request)
    return {"Host": url.split("/")[2], **dict(request.headers.items())}


def test_forwards_chunked_sized_head_and_keeps_connections_alive(s3):
    body = os.urandom(300_000)
    with FaultProxy(s3.endpoint) as proxy:
        conn = http.client.HTTPConnection("127.0.0.1", int(proxy.endpoint.rsplit(":", 1)[1]), timeout=30)
        url = proxy.endpoint + "/vlit-test/proxy/chunked.bin"
        # A chunked upload: the proxy de-chunks it for upstream (and passes the signed Host on).
        conn.putrequest("PUT", "/vlit-test/proxy/chunked.bin", skip_host=True, skip_accept_encoding=True)
        for name, value in _signed("PUT", url, {"Transfer-Encoding": "chunked"}).items():
            conn.putheader(name, value)
        conn.endheaders()
        for i in range(0, len(body), 70_000):
            piece = body[i:i + 70_000]
            conn.send(b"%x\r\n%s\r\n" % (len(piece), piece))
        conn.send(b"0\r\n\r\n")
        put = conn.getresponse()
        assert put.status == 200, put.read()
        put.read()
        sock = conn.sock
        conn.request("HEAD", "/vlit-test/proxy/chunked.bin", headers=_signed("HEAD", url))
        head = conn.getresponse()
        assert head.status == 200 and int(head.getheader("Content-Length")) == len(body) and head.read() == b""
        conn.request("GET", "/vlit-test/proxy/chunked.bin", headers=_signed("GET", url))
        got = conn.getresponse()
        assert got.status == 200 and got.read() == body
        conn.request("GET", "/vlit-test/proxy/nothing-here", headers=_signed("GET", proxy.endpoint + "/vlit-test/proxy/nothing-here"))
        missing = conn.getresponse()
        assert missing.status == 404 and b"NoSuchKey" in missing.read()
        assert conn.sock is sock  # one connection for all four requests
        conn.close()
        assert storage.read_bytes("s3://vlit-test/proxy/chunked.bin") == body  # and past the proxy, the same
        assert proxy.stats() == {"requests": 4, "slowdown": 0, "reset": 0, "reset_mid": 0, "delay": 0}


@pytest.mark.parametrize("kind, error", [
    ("slowdown", "SlowDown"),
    ("reset", "ConnectionClosedError"),
    ("reset_mid", "ResponseStreamingError"),  # cut inside the body
])
def test_faults_read_as_s3_would_send_them(s3, kind, error):
    boto3.client("s3", endpoint_url=s3.endpoint, region_name="us-east-1").put_object(
        Bucket="vlit-test", Key="proxy/x.bin", Body=b"x" * 1000)
    with FaultProxy(s3.endpoint, rate=1.0, kinds=(kind,)) as proxy:
        with pytest.raises(Exception) as err:
            _client(proxy.endpoint).get_object(Bucket="vlit-test", Key="proxy/x.bin")["Body"].read()
        if kind == "slowdown":
            assert isinstance(err.value, botocore.exceptions.ClientError)
            assert err.value.response["Error"]["Code"] == "SlowDown"
            assert err.value.response["ResponseMetadata"]["HTTPStatusCode"] == 503
        else:
            assert type(err.value).__name__ == error, repr(err.value)
        assert proxy.stats()[kind] == 1 and proxy.stats()["requests"] == 1


def test_delay_and_seeded_draws(s3):
    import time

    with FaultProxy(s3.endpoint, rate=1.0, kinds=("delay",), delay_ms=300) as proxy:
        started = time.monotonic()
        _client(proxy.endpoint).head_bucket(Bucket="vlit-test")
        assert time.monotonic() - started >= 0.3 and proxy.stats()["delay"] == 1
    draws = []
    for _ in range(2):
        proxy = FaultProxy(s3.endpoint, rate=0.3, seed=5)
        draws.append([proxy._draw() for _ in range(200)])
    assert draws[0] == draws[1] and {d for d in draws[0] if d} == {"slowdown", "reset", "reset_mid", "delay"}


def test_retry_settings_are_one_policy():
    settings = storage.retry_settings()
    assert settings["s3.retry_mode"] == "standard" and settings["s3.max_attempts"] == storage.S3_RETRY_ATTEMPTS
    assert storage.botocore_config().retries == {"mode": "standard", "total_max_attempts": storage.S3_RETRY_ATTEMPTS}
