"""Files and URIs: listing inputs, stable ids, reading bytes with a size limit.

A local path or a filesystem URI that pyarrow understands (``s3://``, ``gs://``, ``file://``) is a ``uri``. Every
part of lvdkit (ingest, embed, the curated set, pretraining's evaluation) lists and reads files through here.
"""

from __future__ import annotations

import glob
import hashlib
import os
import re
import stat
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor

import pyarrow.fs as pafs

from lvdkit.core.containers import read_member, split_member
from lvdkit.core.storage import filesystem

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".gif", ".webp", ".bmp", ".tif", ".tiff")
MAX_FILE_BYTES = 2**32  # a re-read after ingest: ingest already refused larger files; this guards a file grown since


def image_id(uri: str) -> str:
    """Stable id of an input file: the same ``uri`` always gets the same id, across runs and machines."""
    return hashlib.blake2b(uri.encode("utf-8", "surrogateescape"), digest_size=8).hexdigest()


def content_hash(data: bytes) -> str:
    """blake2b-128 of the file bytes, hex."""
    return hashlib.blake2b(data, digest_size=16).hexdigest()


_ESCAPED_BYTE = re.compile(rb"\\x([89a-f][0-9a-f])")  # what backslashreplace writes for a byte >= 0x80
_SURROGATE = re.compile("[\ud800-\udfff]")  # str.encode("utf-8") refuses these


def as_uri(path: str | bytes) -> str:
    """The ``uri`` recorded for a local path: valid UTF-8 text (Arrow strings must be) that still names the file.

    A POSIX file name is any bytes; Python hands undecodable ones over as lone surrogates (``os.fsdecode``), which
    cannot be written to Parquet. Such a path is recorded with every byte that is not valid UTF-8 written as the
    four characters ``\\xNN`` (``os.fsencode(path).decode("utf-8", "backslashreplace")``): ``b"/d/bad_\\xff.jpg"``
    becomes ``"/d/bad_\\\\xff.jpg"``. Paths that are valid UTF-8 (and URIs) are recorded unchanged.
    :func:`local_path` maps the recorded form back to the file, so :func:`read_bytes` (and every later stage that
    re-reads ``uri``) finds it. The one ambiguity: a UTF-8 name that literally spells ``\\xNN`` and a non-UTF-8
    name with that byte, side by side in one folder, get the same uri; the first listed wins.
    """
    if isinstance(path, str):
        if not _SURROGATE.search(path):
            return path
        try:
            raw = os.fsencode(path)  # the bytes the OS gave (surrogateescape)
        except UnicodeEncodeError:  # a surrogate no file name produced: escape it as text
            return path.encode("utf-8", "backslashreplace").decode("utf-8")
    else:
        raw = path
    return raw.decode("utf-8", "backslashreplace")


def local_path(uri: str) -> str:
    """The local file that ``uri`` (as written by :func:`as_uri`) names: ``uri`` itself, or its unescaped form."""
    if "\\x" not in uri or os.path.lexists(uri):
        return uri
    unescaped = os.fsdecode(_ESCAPED_BYTE.sub(lambda m: bytes([int(m.group(1), 16)]), uri.encode("utf-8")))
    return unescaped if os.path.lexists(unescaped) else uri


def list_inputs(inputs: Sequence[str], extensions: Sequence[str] | None = None) -> Iterator[str]:
    """Yield every file URI under ``inputs`` once, in a deterministic order.

    Each input is a folder (walked recursively), a glob, a ``.txt``/``.lst`` file with one path per line, a single
    file, or a URI that pyarrow understands (``s3://bucket/prefix``, ``gs://...``, ``file:///...``). A non-UTF-8
    file name is yielded in the escaped form of :func:`as_uri`.
    """
    for uri, _ in list_entries(inputs, extensions):
        yield uri


WALKED, GLOBBED, NAMED = "walked", "globbed", "named"  # how list_entries found a file


def list_entries(inputs: Sequence[str], extensions: Sequence[str] | None = None) -> Iterator[tuple[str, str]]:
    """:func:`list_inputs` with how each file was found: ``walked`` (in an input folder), ``globbed`` (matched a
    glob) or ``named`` (a single-file input, a line of a file list, a URI)."""
    for uri, how, _ in list_identified(inputs, extensions):
        yield uri, how


def list_identified(
    inputs: Sequence[str], extensions: Sequence[str] | None = None
) -> Iterator[tuple[str, str, str | None]]:
    """:func:`list_entries` with each file's :func:`file_identity` where the listing already gave it (an object's
    size and last-modified time come with its listing: no request per object), else None."""
    if not inputs:
        raise ValueError("no inputs: set ingest.inputs to folders, globs, file lists or URIs")
    exts = tuple(e.lower() if e.startswith(".") else "." + e.lower() for e in extensions) if extensions else None
    # Two inputs can name the same file; one input never does (a walk, a glob and a URI listing are unique; a file
    # list can repeat a line). Only URIs that could repeat are remembered, as 16-byte digests (not the strings).
    seen: set[bytes] = set()
    remember = len(inputs) > 1
    for entry in inputs:
        for path, how, identity in _expand(entry):
            uri = as_uri(path)
            if exts is not None and not uri.lower().endswith(exts):
                continue
            if remember or how == NAMED:
                key = hashlib.blake2b(uri.encode("utf-8", "surrogateescape"), digest_size=16).digest()
                if key in seen:
                    continue
                seen.add(key)
            yield uri, how, identity


def _expand(entry: str) -> Iterator[tuple[str, str, str | None]]:
    if "://" in entry:
        for uri, identity in _list_uri(entry):
            yield uri, NAMED, identity
    else:
        for path, how in _expand_local(entry):
            yield path, how, None


def _expand_local(entry: str) -> Iterator[tuple[str, str]]:
    if _is_glob(entry):
        previous = None
        for p in sorted(os.path.abspath(p) for p in glob.glob(entry, recursive=True) if not os.path.isdir(p)):
            if p != previous:  # several ``**`` can match one file more than once
                yield p, GLOBBED
            previous = p
    elif os.path.isdir(entry):
        for p in _walk(os.path.abspath(entry)):
            yield p, WALKED
    elif _is_list(entry):
        base = os.path.dirname(os.path.abspath(entry))
        with open(entry, encoding="utf-8", errors="surrogateescape") as fh:  # file names need not be UTF-8
            for line in fh:
                path = line.strip()
                if path and not path.startswith("#"):
                    yield (path if "://" in path else os.path.normpath(os.path.join(base, path))), NAMED
    elif os.path.lexists(entry):
        yield os.path.abspath(entry), NAMED
    else:
        raise FileNotFoundError(f"input {entry!r} does not exist (not a folder, file, glob match or URI)")


def _is_glob(entry: str) -> bool:
    return any(ch in entry for ch in "*?[")


def _is_list(entry: str) -> bool:
    return entry.endswith((".txt", ".lst")) and os.path.isfile(entry)


def input_roots(inputs: Sequence[str]) -> tuple[str, ...]:
    """The real paths of the folders a symlink found by walking or globbing may point into: every input folder,
    the fixed leading folder of every glob, and the folder of every file list."""
    roots = []
    for entry in inputs:
        if "://" in entry:
            continue
        if _is_glob(entry):
            fixed = []
            for part in entry.split(os.sep):
                if _is_glob(part):
                    break
                fixed.append(part)
            folder = os.sep.join(fixed) or "."
        elif os.path.isdir(entry):
            folder = entry
        elif _is_list(entry):
            folder = os.path.dirname(os.path.abspath(entry))
        else:
            continue
        roots.append(os.path.realpath(folder))
    return tuple(dict.fromkeys(roots))


def link_outside(uri: str, how: str, roots: Sequence[str]) -> str | None:
    """Where a file found by walking or globbing really is, when it is reached through a symlink that leads outside
    every input root; ``None`` otherwise (no link, a link inside, or a file named explicitly). A walk follows no
    linked folder, so only the file itself can be a link; a ``**`` glob does descend into linked folders."""
    if how not in (WALKED, GLOBBED) or "://" in uri:
        return None
    path = os.path.abspath(local_path(uri))
    if how == WALKED and not os.path.islink(path):
        return None
    real = os.path.realpath(path)
    if real == path or any(real == r or real.startswith(r.rstrip(os.sep) + os.sep) for r in roots):
        return None
    return real


def _walk(root: str) -> Iterator[str]:
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in sorted(filenames):
            yield os.path.join(dirpath, name)


LIST_AHEAD = 8  # sub-prefixes listed ahead, per level: a listing is bound by round trips, not bandwidth
_LISTERS = 16  # threads listing at once


def _list_uri(uri: str) -> Iterator[tuple[str, str | None]]:
    """(uri, identity or None) of every object under ``uri``, in key order.

    A flat listing of a prefix is one request per 1000 keys, one after another. Here each "folder" level is one
    listing, and the sub-prefixes of a level are listed ahead in a pool of threads while the objects before them are
    yielded, so a pool laid out in folders lists in parallel; memory holds the levels in flight, not the pool.
    """
    fs, path = filesystem(uri)
    scheme = uri.split("://", 1)[0]
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.NotFound:
        raise FileNotFoundError(f"input {uri!r} does not exist")
    if info.type == pafs.FileType.File:
        yield uri, _object_identity(uri, info)
        return
    with ThreadPoolExecutor(_LISTERS, thread_name_prefix="lvdkit-list") as pool:
        for item in _walk_level(fs, pool, pool.submit(_level, fs, path)):
            if scheme == "file":  # a local file: its identity also follows symlinks (file_identity)
                yield item.path, None
            else:
                name = f"{scheme}://{item.path}"
                yield name, _object_identity(name, item)


def _level(fs: pafs.FileSystem, path: str) -> list[pafs.FileInfo]:
    """One level under ``path``, in the order a flat listing gives keys ("a.jpg" before "a/b.jpg")."""
    found = fs.get_file_info(pafs.FileSelector(path, allow_not_found=True))
    return sorted(found, key=lambda i: i.path + ("/" if i.type == pafs.FileType.Directory else ""))


def _walk_level(
    fs: pafs.FileSystem, pool: ThreadPoolExecutor, level: Future[list[pafs.FileInfo]]
) -> Iterator[pafs.FileInfo]:
    children = list({(c.path, c.type): c for c in level.result()}.values())  # a "dir/" marker repeats its folder
    below = iter(c.path for c in children if c.type == pafs.FileType.Directory)
    ahead: dict[str, Future[list[pafs.FileInfo]]] = {}

    def fill() -> None:
        while len(ahead) < LIST_AHEAD and (nxt := next(below, None)) is not None:
            ahead[nxt] = pool.submit(_level, fs, nxt)

    fill()
    for child in children:
        if child.type == pafs.FileType.File:
            yield child
        elif child.type == pafs.FileType.Directory:
            sub = ahead.pop(child.path)
            fill()
            yield from _walk_level(fs, pool, sub)


def _object_identity(uri: str, info: pafs.FileInfo) -> str:
    """What :func:`file_identity` says of an object, from its listing."""
    return f"{uri}|{info.size}|{info.mtime_ns}\n"


def read_bytes(uri: str, max_bytes: int) -> bytes:
    """Read a local path (as listed: see :func:`as_uri`), a filesystem URI, or a member of a container
    (``CONTAINER#MEMBER``: see :mod:`lvdkit.core.containers`); files larger than ``max_bytes`` are refused before
    they are read."""
    member = split_member(uri) if "#" in uri else None
    if member is not None and ("://" in uri or not os.path.lexists(local_path(uri))):
        return read_member(*member, max_bytes)
    if "://" in uri:
        fs, path = filesystem(uri)
        size = fs.get_file_info(path).size
        if size is not None and size > max_bytes:
            raise FileTooLarge(f"file is {size} bytes, more than {max_bytes}")
        with fs.open_input_stream(path) as fh:
            data = fh.read(max_bytes + 1)
    else:
        path = local_path(uri)
        try:
            mode = os.stat(path).st_mode  # other errors (a symlink loop: ELOOP, EACCES on a folder) say what they are
        except FileNotFoundError:  # vanished since listing, or a dangling symlink
            raise FileNotFoundError(f"{uri} does not exist (anymore)") from None
        if not stat.S_ISREG(mode):
            raise IsADirectoryError(f"{uri} is not a regular file")
        with open(path, "rb") as fh:
            size = os.fstat(fh.fileno()).st_size
            if size > max_bytes:
                raise FileTooLarge(f"file is {size} bytes, more than {max_bytes}")
            data = fh.read(size + 1)  # read(n) allocates n bytes up front: ask for what the file holds
    if len(data) > max_bytes:  # grew since stat
        raise FileTooLarge(f"file is larger than {max_bytes} bytes")
    return bytes(data)


class FileTooLarge(OSError):
    """A file larger than the limit it is read with (refused before its bytes are read)."""


def file_identity(uri: str) -> str:
    """Name, size and mtime (of a symlink and of its target): enough to notice an added, removed or rewritten file
    without reading it."""
    if "://" in uri:  # an object: its size and last-modified time (one metadata request)
        fs, path = filesystem(uri)
        info = fs.get_file_info(path)
        if info.type == pafs.FileType.NotFound:
            return f"{uri}|missing\n"
        return _object_identity(uri, info)
    path = local_path(uri)
    try:
        st = os.lstat(path)
    except OSError:
        return f"{uri}|missing\n"
    ident = f"{uri}|{st.st_size}|{st.st_mtime_ns}"
    if stat.S_ISLNK(st.st_mode):
        try:
            target = os.stat(path)
            ident += f"|{target.st_size}|{target.st_mtime_ns}"
        except OSError:
            ident += "|dangling"
    return ident + "\n"
