"""A real S3 API server on loopback for the tests: moto's server mode (``moto_server``), started in its own process
and stopped after the tests that use it. Nothing here mocks lvdkit's calls: lvdkit talks S3 over HTTP to it."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pyarrow.fs as pafs

from .ray_head import free_port

CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": "lvdkit-test",
    "AWS_SECRET_ACCESS_KEY": "lvdkit-test",
    "AWS_DEFAULT_REGION": "us-east-1",
}


@contextlib.contextmanager
def s3_server() -> Iterator[dict[str, str]]:
    """Start ``moto_server`` on a free loopback port; yield the environment that points lvdkit (and pyarrow) at it."""
    port = free_port()
    server = subprocess.Popen(
        [str(Path(sys.executable).with_name("moto_server")), "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    deadline = time.time() + 60
    while True:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                break
        if server.poll() is not None or time.time() > deadline:
            raise RuntimeError("moto_server did not start")
        time.sleep(0.2)
    env = {**CREDENTIALS, "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}"}
    try:
        yield env
    finally:
        server.terminate()
        try:
            server.wait(timeout=10)
        except subprocess.TimeoutExpired:
            server.kill()


def client(env: dict[str, str]) -> pafs.S3FileSystem:
    """A pyarrow S3 filesystem on the server (for the tests' own uploads and checks)."""
    endpoint = env["AWS_ENDPOINT_URL"].removeprefix("http://")
    return pafs.S3FileSystem(
        access_key=env["AWS_ACCESS_KEY_ID"],
        secret_key=env["AWS_SECRET_ACCESS_KEY"],
        endpoint_override=endpoint,
        scheme="http",
        region=env["AWS_DEFAULT_REGION"],
        allow_bucket_creation=True,
    )


def upload(fs: pafs.S3FileSystem, folder: Path, prefix: str) -> list[str]:
    """Copy every file under ``folder`` to ``s3://prefix/...`` (same relative paths); returns the keys."""
    keys = []
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        key = f"{prefix}/{path.relative_to(folder).as_posix()}"
        with fs.open_output_stream(key) as out:
            out.write(path.read_bytes())
        keys.append(key)
    return keys


@contextlib.contextmanager
def environment(env: dict[str, str]) -> Iterator[None]:
    """``env`` set in this process for the duration (and restored after)."""
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
