"""A real S3 endpoint for tests: moto's server on 127.0.0.1, spoken to over HTTP by boto3.

Load it as a plugin in a test module (``pytest_plugins = ["tests.s3_server"]``). It provides
``s3_endpoint`` (session-scoped: one server serves the whole run), ``s3_bucket`` (a fresh bucket)
and ``store`` (each test once against a local folder and once against S3). The endpoint reaches
the code under test the way it does in production, through ``AWS_ENDPOINT_URL_S3``; fake
credentials and a region are set for the session and the previous environment is restored after.
"""

from __future__ import annotations

import os
import socket
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from smlt.storage.objects import LocalObjectStore, ObjectStore, open_object_store

__all__ = ["s3_bucket", "s3_endpoint"]

_FAKE_ENV = {
    "AWS_ACCESS_KEY_ID": "smlt-test-access-key",
    "AWS_SECRET_ACCESS_KEY": "smlt-test-secret-key",
    "AWS_DEFAULT_REGION": "us-east-1",
}
# Variables that would make boto3 look past the fake credentials (a real profile, a token).
_CLEARED = ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN", "AWS_ENDPOINT_URL")


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture(scope="session")
def s3_endpoint() -> Iterator[str]:
    """The URL of a running moto S3 server, with the environment pointing boto3 at it."""
    from moto.server import ThreadedMotoServer

    port = _free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    env = {**_FAKE_ENV, "AWS_ENDPOINT_URL_S3": endpoint}
    saved = {name: os.environ.get(name) for name in (*env, *_CLEARED)}
    os.environ.update(env)
    for name in _CLEARED:
        os.environ.pop(name, None)
    try:
        yield endpoint
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        server.stop()


@pytest.fixture
def s3_bucket(s3_endpoint: str) -> str:
    """A fresh, empty bucket on the session's server (names are 3-63 chars, lowercase)."""
    import boto3

    name = f"smlt-test-{uuid.uuid4().hex[:16]}"
    boto3.client("s3", endpoint_url=s3_endpoint).create_bucket(Bucket=name)
    return name


@pytest.fixture(params=["local", "s3"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[ObjectStore]:
    """The same test against the local folder and S3 over real HTTP, so they cannot drift."""
    if request.param == "local":
        yield LocalObjectStore(tmp_path / "objects")
    else:
        bucket = request.getfixturevalue("s3_bucket")
        yield open_object_store(f"s3://{bucket}/some/prefix")
