"""An S3 API server for tests: moto in server mode on 127.0.0.1, a free port, real HTTP.

Nothing is patched inside boto: the stores talk to it over loopback like they would to MinIO or
AWS. If moto's server extra is missing the import fails, and so do the tests (no skip): an S3
backend that is never tested is not a backend.
"""

from __future__ import annotations

import logging
import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import boto3
from moto.server import ThreadedMotoServer

REGION = "us-east-1"
AWS_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_SESSION_TOKEN": "testing",
    "AWS_DEFAULT_REGION": REGION,
    # Keep a developer's ~/.aws out of the tests.
    "AWS_CONFIG_FILE": os.devnull,
    "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
}


@dataclass(frozen=True)
class S3Server:
    endpoint_url: str
    bucket: str

    def client(self) -> Any:
        """A blocking boto3 client on the server (for setup and for looking behind a store)."""
        return boto3.client("s3", endpoint_url=self.endpoint_url, region_name=REGION)


@contextmanager
def s3_server() -> Iterator[S3Server]:
    """Start moto's server, create one bucket, set test credentials; undo all on exit."""
    saved = {k: os.environ.get(k) for k in AWS_ENV}
    os.environ.update(AWS_ENV)
    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # one line per S3 call otherwise
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        s3 = S3Server(f"http://{host}:{port}", f"vod-test-{uuid.uuid4().hex[:8]}")
        boto3.client("s3", endpoint_url=s3.endpoint_url, region_name=REGION).create_bucket(
            Bucket=s3.bucket
        )
        yield s3
    finally:
        server.stop()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
