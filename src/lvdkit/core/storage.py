"""Which filesystem a URI lives on: every ``s3://``, ``gs://``, ``file://`` (or other pyarrow) URI lvdkit reads goes
through :func:`filesystem`, so that one place knows how to reach it.

S3-compatible services that are not AWS (MinIO, Ceph, a local test server) are named by the standard
``AWS_ENDPOINT_URL_S3`` or ``AWS_ENDPOINT_URL`` variable (``http://host:port``), passed to pyarrow as its
``endpoint_override`` (recent pyarrow releases read ``AWS_ENDPOINT_URL`` too; passing it keeps the scheme and the
``_S3`` variant under lvdkit's control). Credentials and region come from the usual AWS variables and files.
Filesystems are cached per process and endpoint.

:class:`ObjectPath` gives run-folder code the few ``pathlib`` operations it needs on object storage, so the same code
handles a local ``OUT`` and ``s3://bucket/run`` (:func:`location`).
"""

from __future__ import annotations

import contextlib
import fnmatch
import functools
import io
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import IO, Any
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


def is_uri(target: str | os.PathLike[str]) -> bool:
    """True for ``scheme://...`` locations other than ``file://`` (those are local paths)."""
    text = str(target)
    return "://" in text and not text.startswith("file://")


class ObjectPath:
    """A location on an object store (or any pyarrow filesystem) with the few ``pathlib.Path`` operations lvdkit's
    run folders use, so code written for a local ``Path`` also works on ``s3://`` (see :func:`location`).

    Objects are written whole in one request (an object store's only atomic write); there are no folders, so
    ``mkdir`` does nothing and a "folder" is any prefix with objects under it.
    """

    def __init__(self, uri: str, fs: pafs.FileSystem | None = None) -> None:
        self.uri = uri.rstrip("/")
        scheme, _, rest = self.uri.partition("://")
        if fs is not None and scheme in ("s3", "gs", "gcs"):  # bucket/key: a child shares its parent's filesystem
            self.fs, self.path = fs, rest  # (resolving an AWS URI anew may cost a request for the bucket's region)
        else:
            self.fs, self.path = filesystem(self.uri)

    def __repr__(self) -> str:
        return f"ObjectPath({self.uri!r})"

    def __str__(self) -> str:
        return self.uri

    def __fspath__(self) -> str:
        # pyarrow's readers and writers take a URI where they take a path and resolve its filesystem from the same
        # environment variables (endpoint, credentials) as :func:`filesystem`, so Parquet code works unchanged;
        # ``open()`` on it fails with FileNotFoundError, as for any missing file
        return self.uri

    def __eq__(self, other: object) -> bool:
        return isinstance(other, ObjectPath) and other.uri == self.uri

    def __hash__(self) -> int:
        return hash(self.uri)

    def __truediv__(self, name: str) -> ObjectPath:
        return ObjectPath(f"{self.uri}/{name}", self.fs)

    @property
    def name(self) -> str:
        return self.uri.rsplit("/", 1)[-1]

    @property
    def parent(self) -> ObjectPath:
        return ObjectPath(self.uri.rsplit("/", 1)[0], self.fs)

    def expanduser(self) -> ObjectPath:
        return self

    def resolve(self) -> ObjectPath:
        return self

    def _info(self) -> pafs.FileInfo:
        return self.fs.get_file_info(self.path)

    def is_file(self) -> bool:
        return self._info().type == pafs.FileType.File

    def is_dir(self) -> bool:
        return self._info().type == pafs.FileType.Directory

    def exists(self) -> bool:
        return self._info().type != pafs.FileType.NotFound

    def size(self) -> int:
        return int(self._info().size or 0)

    def stat(self) -> ObjectStat:
        """Size and last-modified time (``FileNotFoundError`` when absent), as ``Path.stat`` gives them."""
        info = self._info()
        if info.type == pafs.FileType.NotFound:
            raise FileNotFoundError(f"no such object: {self.uri}")
        return ObjectStat(int(info.size or 0), info.mtime.timestamp() if info.mtime is not None else 0.0)

    def relative_to(self, other: str | os.PathLike[str]) -> PurePosixPath:
        base = os.fspath(other).rstrip("/")
        if not self.uri.startswith(base + "/"):
            raise ValueError(f"{self.uri} is not under {base}")
        return PurePosixPath(self.uri[len(base) + 1 :])

    def touch(self, exist_ok: bool = True) -> None:
        if self.exists():  # an object's time cannot be bumped without rewriting it: leave its bytes alone
            if not exist_ok:
                raise FileExistsError(self.uri)
            return
        self.write_bytes(b"")

    def unlink(self, missing_ok: bool = False) -> None:
        try:
            self.fs.delete_file(self.path)
        except (FileNotFoundError, OSError):
            if not (missing_ok and not self.exists()):
                raise

    def mkdir(self, parents: bool = False, exist_ok: bool = False) -> None:
        pass

    def read_bytes(self) -> bytes:
        if not self.is_file():  # pyarrow raises a bare OSError for a missing object
            raise FileNotFoundError(f"no such object: {self.uri}")
        with self.fs.open_input_file(self.path) as f:
            return bytes(f.read())

    def read_text(self) -> str:
        return self.read_bytes().decode()

    def write_bytes(self, data: bytes | memoryview) -> None:
        with self.fs.open_output_stream(self.path) as f:
            f.write(data)

    def write_text(self, text: str) -> None:
        self.write_bytes(text.encode())

    def open(self, mode: str = "r") -> IO[Any]:
        if mode not in ("r", "rb"):
            raise ValueError(f"{self.uri}: objects open for reading only (write them whole), got mode {mode!r}")
        data = io.BytesIO(self.read_bytes())
        return data if mode == "rb" else io.TextIOWrapper(data)

    def iterdir(self) -> Iterator[ObjectPath]:
        found = self.fs.get_file_info(pafs.FileSelector(self.path, allow_not_found=True))
        for info in sorted(found, key=lambda i: i.path):
            yield self / info.base_name

    def glob(self, pattern: str) -> Iterator[ObjectPath]:
        """Children whose names match ``pattern`` (one level, no ``**``)."""
        return (p for p in self.iterdir() if fnmatch.fnmatchcase(p.name, pattern))

    def rglob(self, pattern: str) -> Iterator[ObjectPath]:
        """Objects anywhere below whose names match ``pattern``, in key order."""
        found = self.fs.get_file_info(pafs.FileSelector(self.path, recursive=True, allow_not_found=True))
        base = self.path.rstrip("/")
        for info in sorted(found, key=lambda i: i.path):
            if info.type == pafs.FileType.File and fnmatch.fnmatchcase(info.base_name, pattern):
                yield ObjectPath(f"{self.uri}/{info.path[len(base) + 1 :]}", self.fs)


@dataclass(frozen=True)
class ObjectStat:
    """What :meth:`ObjectPath.stat` gives: the ``os.stat_result`` fields lvdkit reads."""

    st_size: int
    st_mtime: float


Location = Path | ObjectPath  # what run-folder code takes: the same operations on disk and on object storage


def replace(source: Location, target: Location) -> None:
    """Move ``source`` onto ``target`` (both on one filesystem): an atomic rename on disk; on object storage a
    server-side copy and a delete (the target appears whole, in one step)."""
    if isinstance(source, Path) and isinstance(target, Path):
        os.replace(source, target)
    elif isinstance(source, ObjectPath) and isinstance(target, ObjectPath):
        source.fs.move(source.path, target.path)
    else:
        raise ValueError(f"cannot move {source} onto {target}: not on one filesystem")


def publish(local: Path, target: Location) -> None:
    """Move the finished local file ``local`` to ``target``: a rename on disk, an upload (then the local file is
    removed) on object storage, where a multipart upload becomes visible only once complete."""
    if isinstance(target, Path):
        os.replace(local, target)
        return
    pafs.copy_files(str(local), target.path, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=target.fs)
    local.unlink()


def remove_tree(folder: Location, strict: bool = True) -> None:
    """Remove ``folder`` and everything under it (nothing when it is absent). ``strict``: an error removing any of
    it is raised (a stage folder left half-removed must not pass for a clean one); else it is ignored."""
    if isinstance(folder, Path):
        if folder.exists() or not strict:
            shutil.rmtree(folder, ignore_errors=not strict)
    elif folder.exists():
        folder.fs.delete_dir_contents(folder.path, missing_dir_ok=True)
        with contextlib.suppress(OSError):  # a bucket's "folder" vanishes with its last object
            folder.fs.delete_dir(folder.path)


def file_sizes(folder: Location) -> dict[str, int]:
    """Every file under ``folder`` (by path relative to it, ``/``-separated): its size. One listing on object
    storage, not a request per file."""
    if isinstance(folder, Path):
        return (
            {f.relative_to(folder).as_posix(): f.stat().st_size for f in folder.rglob("*") if f.is_file()}
            if folder.is_dir()
            else {}
        )
    found = folder.fs.get_file_info(pafs.FileSelector(folder.path, recursive=True, allow_not_found=True))
    base = folder.path.rstrip("/")
    return {i.path[len(base) + 1 :]: int(i.size or 0) for i in found if i.type == pafs.FileType.File}


def scratch_file(target: Location) -> Path:
    """A local file to build ``target`` in before :func:`publish`: beside it on disk (so the move is a rename), in
    the temp folder for object storage."""
    tag = f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
    if isinstance(target, Path):
        target.parent.mkdir(parents=True, exist_ok=True)
        return target.parent / f".{target.name}.tmp-{tag}"
    return Path(tempfile.gettempdir()) / f"lvdkit-{target.name}.tmp-{tag}"


def location(target: str | os.PathLike[str]) -> Location:
    """A run folder or file as a local ``Path`` or, for a URI, an :class:`ObjectPath` with the same operations."""
    text = str(target)
    if is_uri(text):
        return ObjectPath(text)
    return Path(text.removeprefix("file://")).expanduser()


def fs_paths(targets: list[Location]) -> tuple[pafs.FileSystem | None, list[str]]:
    """(filesystem, paths within it) for readers that take both (pyarrow datasets, Ray Data); local: (None, paths).
    All targets must live on one filesystem (the S3 endpoint of the environment names it)."""
    remote = [t for t in targets if isinstance(t, ObjectPath)]
    if not remote:
        return None, [str(t) for t in targets]
    if len(remote) != len(targets) or len({t.uri.split("://")[0] for t in remote}) > 1:
        raise ValueError("these files are on more than one filesystem: " + ", ".join(map(str, targets[:3])))
    return remote[0].fs, [t.path for t in remote]
