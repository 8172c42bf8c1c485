"""A real S3 endpoint (moto's server) on 127.0.0.1, and free ports on loopback: test
tooling, outside the runtime package (moto is a dev dependency)."""
from __future__ import annotations

import os
import socket
from dataclasses import dataclass

from vlit import storage


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now (for servers started by tests and the demo)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class LocalS3:
    """A real S3 endpoint (moto's server) on 127.0.0.1.

    Sets the standard AWS variables for this process (and so for the Ray workers it
    starts), creates the buckets, and restores the environment on exit.
    """

    buckets: tuple[str, ...] = ("vlit",)
    port: int = 0

    def __enter__(self) -> "LocalS3":
        from moto.server import ThreadedMotoServer

        self.port = self.port or free_port()
        self._server = ThreadedMotoServer(ip_address="127.0.0.1", port=self.port, verbose=False)
        self._server.start()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        env = {
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_ACCESS_KEY_ID": os.environ.get("AWS_ACCESS_KEY_ID", "vlit-local"),
            "AWS_SECRET_ACCESS_KEY": os.environ.get("AWS_SECRET_ACCESS_KEY", "vlit-local-secret"),
            "AWS_REGION": "us-east-1",
        }
        self._saved = {k: os.environ.get(k) for k in env}
        os.environ.update(env)
        import boto3

        client = boto3.client("s3", endpoint_url=self.endpoint, region_name="us-east-1", config=storage.botocore_config())
        for bucket in self.buckets:
            client.create_bucket(Bucket=bucket)
        return self

    def __exit__(self, *exc) -> None:
        self._server.stop()
        for k, v in self._saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
