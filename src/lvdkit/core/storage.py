"""Which filesystem a URI lives on: every ``s3://``, ``gs://``, ``file://`` (or other pyarrow) URI lvdkit reads goes
through :func:`filesystem`, so that one place knows how to reach it.

S3-compatible services that are not AWS (MinIO, Ceph, a local test server) are named by the standard
``AWS_ENDPOINT_URL_S3`` or ``AWS_ENDPOINT_URL`` variable (``http://host:port``): pyarrow's own S3 client does not read
them, so lvdkit passes them on as ``endpoint_override`` (credentials and region come from the usual AWS variables
and files). Filesystems are cached per process and endpoint.
"""

from __future__ import annotations

import functools
import os
from urllib.parse import urlsplit

import pyarrow.fs as pafs

ENDPOINT_VARIABLES = ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL")


def s3_endpoint() -> str | None:
    """The S3 endpoint named in the environment (None: AWS itself)."""
    for name in ENDPOINT_VARIABLES:
        if os.environ.get(name):
            return os.environ[name]
    return None


def filesystem(uri: str) -> tuple[pafs.FileSystem, str]:
    """(filesystem, path within it) of a URI (``s3://bucket/key``, ``gs://...``, ``file:///...``)."""
    if uri.startswith("s3://") and "?" not in uri:
        endpoint = s3_endpoint()
        if endpoint is not None:
            return _s3(endpoint), uri.removeprefix("s3://")
    fs, path = pafs.FileSystem.from_uri(uri)
    return fs, path


@functools.lru_cache(maxsize=4)
def _s3(endpoint: str) -> pafs.S3FileSystem:
    parts = urlsplit(endpoint if "://" in endpoint else f"https://{endpoint}")
    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1"
    return pafs.S3FileSystem(endpoint_override=parts.netloc, scheme=parts.scheme, region=region)
