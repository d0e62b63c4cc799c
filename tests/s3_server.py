"""A real S3-compatible server on 127.0.0.1 for the object-store tests (moto's threaded
server: the same HTTP API pyarrow's S3FileSystem speaks to AWS), started and stopped by the
fixture. Nothing leaves the loopback interface."""

from __future__ import annotations

import socket

import pytest


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def s3_bucket(monkeypatch):
    """A fresh bucket on a local S3 server: yields ``(bucket name, pyarrow S3FileSystem)``,
    with the environment pointing pyarrow (and child processes) at the server."""
    server = pytest.importorskip("moto.server", reason="needs moto[server] (the [test] extra)")
    boto3 = pytest.importorskip("boto3", reason="needs boto3 (the [test] extra)")
    import logging

    import pyarrow.fs as pafs

    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # one line per request otherwise
    port = _free_port()
    srv = server.ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    srv.start()
    env = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
           "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}",
           "AWS_EC2_METADATA_DISABLED": "true"}
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    try:
        boto3.client("s3", endpoint_url=env["AWS_ENDPOINT_URL"]).create_bucket(Bucket="svdfill-test")
        fs = pafs.S3FileSystem(endpoint_override=f"127.0.0.1:{port}", scheme="http",
                               access_key="testing", secret_key="testing", region="us-east-1")
        yield "svdfill-test", fs
    finally:
        srv.stop()
