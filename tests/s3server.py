"""A real S3-compatible server for the suite: moto's server mode (from PyPI), on loopback.

Nothing here fakes Loraplex: the store talks S3 over HTTP through s3fs/botocore exactly as
it would to AWS or MinIO, configured by the standard AWS environment variables, which child
processes (workers, replicas) inherit.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from dataclasses import dataclass

import pytest


@dataclass(frozen=True)
class S3:
    endpoint: str

    @property
    def env(self) -> dict[str, str]:
        """What any process needs to reach this server (read and write)."""
        return {
            "AWS_ACCESS_KEY_ID": "loraplex-test",
            "AWS_SECRET_ACCESS_KEY": "loraplex-test-secret",
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_DEFAULT_REGION": "us-east-1",
        }

    def new_bucket(self) -> str:
        import boto3

        name = f"lpx-{uuid.uuid4().hex[:12]}"
        client = boto3.client("s3", endpoint_url=self.endpoint, **_creds(self.env))
        client.create_bucket(Bucket=name)
        return name

    def client(self) -> object:
        import boto3

        return boto3.client("s3", endpoint_url=self.endpoint, **_creds(self.env))


def _creds(env: dict[str, str]) -> dict[str, str]:
    return {"aws_access_key_id": env["AWS_ACCESS_KEY_ID"],
            "aws_secret_access_key": env["AWS_SECRET_ACCESS_KEY"],
            "region_name": env["AWS_DEFAULT_REGION"]}  # fmt: skip


@pytest.fixture(scope="session")
def s3_server() -> Iterator[S3]:
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    try:
        yield S3(endpoint=f"http://{host}:{port}")
    finally:
        server.stop()


@pytest.fixture
def s3(s3_server: S3, monkeypatch: pytest.MonkeyPatch) -> S3:
    """The server, with this process (and its children) configured to use it."""
    for key, value in s3_server.env.items():
        monkeypatch.setenv(key, value)
    return s3_server
