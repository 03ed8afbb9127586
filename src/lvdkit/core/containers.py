"""Images inside containers: WebDataset tar shards and Parquet/Arrow tables with an image-bytes column (the layout
img2dataset and Hugging Face datasets write).

A member is addressed as ``CONTAINER#MEMBER`` (its ``uri``): a tar member's name (``shard-0001.tar#000123.jpg``)
or a table row and its image column (``part-0.parquet#row=12&col=jpg``). Its image id is the blake2b of that uri
(:func:`lvdkit.core.files.image_id`), stable for (container, member). Every later stage re-reads a member through
:func:`lvdkit.core.files.read_bytes`, which comes here; each process keeps the index of the last few containers it
read (a tar's member offsets, a table's last row group), so reading a part's members in order costs one pass.

WebDataset samples are the members sharing a key (the name up to the first dot of its last path component): each
image member is one record, the sample's other members (``txt``, ``json``, ``cls``, ...) its metadata. A table row's
other columns are its metadata. Nothing here decides whether bytes are a usable image: ingest does, as for files.
"""

from __future__ import annotations

import functools
import json
import os
import posixpath
import re
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import IO, Any

import pyarrow as pa
import pyarrow.parquet as pq

from lvdkit.core import schema
from lvdkit.core.storage import filesystem

TAR, TABLE = "tar", "parquet"  # ingest.containers values
TAR_SUFFIXES = (".tar",)
TABLE_SUFFIXES = (".parquet", ".arrow", ".feather")
IMAGE_SUFFIXES = ("jpg", "jpeg", "png", "gif", "webp", "bmp", "tif", "tiff")
# image columns looked for, in this order, when ingest.image_column is not set
IMAGE_COLUMNS = ("image", "jpg", "jpeg", "png", "webp", "image_bytes", "img", "bytes")
METADATA_MAX_CHARS = 65_536  # a longer metadata value is cut (and says so)
_ROW = re.compile(r"^row=(\d+)&col=(.+)$")


class ContainerError(OSError):
    """A container that cannot be opened or read at all (not a tar, not a table, no image column)."""


@dataclass
class Member:
    """One record of a container: its name, its bytes (or why there are none) and its metadata."""

    name: str
    data: bytes | None = None
    error: tuple[str, str] | None = None  # (reason, detail): the record is quarantined
    metadata: dict[str, Any] = field(default_factory=dict)

    def metadata_json(self) -> str | None:
        return json.dumps(self.metadata, sort_keys=True, default=str) if self.metadata else None


def container_kind(uri: str, kinds: tuple[str, ...] | list[str] = (TAR, TABLE)) -> str | None:
    """``tar`` or ``parquet`` when ``uri`` names a container of an enabled kind, else None."""
    lower = uri.lower()
    if TAR in kinds and lower.endswith(TAR_SUFFIXES):
        return TAR
    if TABLE in kinds and lower.endswith(TABLE_SUFFIXES):
        return TABLE
    return None


def member_uri(container: str, member: str) -> str:
    return f"{container}#{member}"


def split_member(uri: str) -> tuple[str, str] | None:
    """(container, member) of a member uri; None for a plain file (also one whose name holds ``#``)."""
    lower = uri.lower()
    for suffix in TAR_SUFFIXES + TABLE_SUFFIXES:
        at = lower.rfind(suffix + "#")
        if at >= 0:
            cut = at + len(suffix)
            return uri[:cut], uri[cut + 1 :]
    return None


# --- reading a whole container (ingest) ------------------------------------------------------------------------


def iter_members(container: str, image_column: str | None = None, max_bytes: int = 2**32) -> Iterator[Member]:
    """Every record of ``container`` in stored order. Raises :class:`ContainerError` (or an ``OSError``) when the
    container cannot be read at all; a container that breaks part way yields what it read, then a quarantined
    member for the record it was reading."""
    if container_kind(container) == TAR:
        yield from _tar_members(container, max_bytes)
    else:
        yield from _table_members(container, image_column)


def _open(uri: str, seekable: bool = False) -> IO[bytes]:
    if "://" in uri:
        fs, path = filesystem(uri)
        return fs.open_input_file(path) if seekable else fs.open_input_stream(path)  # type: ignore[no-any-return]
    from lvdkit.core.files import local_path  # files imports this module: import here

    return open(local_path(uri), "rb")


def sample_key(name: str) -> tuple[str, str]:
    """WebDataset's (key, extension) of a member name: ``a/b/000123.seg.png`` -> (``a/b/000123``, ``seg.png``)."""
    folder, base = posixpath.split(name)
    stem, _, ext = base.partition(".")
    return posixpath.join(folder, stem), ext.lower()


def _tar_members(container: str, max_bytes: int) -> Iterator[Member]:
    with _open(container) as fh:
        try:
            tar = tarfile.open(fileobj=fh, mode="r|")  # noqa: SIM115 (streaming, one pass: closed with fh)
        except tarfile.TarError as exc:
            raise ContainerError(f"not a readable tar: {exc}") from exc
        key: str | None = None
        sample: list[tuple[tarfile.TarInfo, Any]] = []
        current = "the first member"
        try:
            for info in tar:
                current = info.name
                if not info.isfile():
                    continue
                this, _ = sample_key(info.name)
                if this != key and sample:
                    yield from _sample_records(sample)
                    sample = []
                key = this
                sample.append(_read_tar_member(tar, info, max_bytes))
        except (tarfile.TarError, EOFError, OSError) as exc:  # truncated or corrupt from here on
            yield from _sample_records(sample)
            yield Member(
                current,
                error=(schema.REASON_TRUNCATED, f"the tar breaks at this member, nothing after it is read: {exc}"),
            )
            return
        yield from _sample_records(sample)


def _read_tar_member(tar: tarfile.TarFile, info: tarfile.TarInfo, max_bytes: int) -> tuple[tarfile.TarInfo, Any]:
    if info.size > max_bytes:
        return info, (schema.REASON_FILE_TOO_LARGE, f"member is {info.size} bytes, more than {max_bytes}")
    fh = tar.extractfile(info)
    data = fh.read() if fh is not None else b""
    if len(data) != info.size:
        raise EOFError(f"{info.name}: {len(data)} of {info.size} bytes")
    return info, data


def _sample_records(sample: list[tuple[tarfile.TarInfo, Any]]) -> Iterator[Member]:
    """A WebDataset sample's image members as records, each with the sample's other members as metadata."""
    if not sample:
        return
    images = [(i, d) for i, d in sample if sample_key(i.name)[1].rsplit(".", 1)[-1] in IMAGE_SUFFIXES]
    metadata = {sample_key(i.name)[1]: _value(sample_key(i.name)[1], d) for i, d in sample if (i, d) not in images}
    if not images:
        key = sample_key(sample[0][0].name)[0]
        names = ", ".join(i.name for i, _ in sample)
        yield Member(key, error=(schema.REASON_NO_IMAGE, f"no image member among {names}"), metadata=metadata)
        return
    for info, data in images:
        if isinstance(data, tuple):
            yield Member(info.name, error=data, metadata=metadata)
        else:
            yield Member(info.name, data=data, metadata=metadata)


def _value(ext: str, data: Any) -> Any:
    """A metadata member's value: ``json`` members parsed (when they parse), others as text."""
    if not isinstance(data, bytes):  # too large to read: (reason, detail)
        return f"<not read: {data[1]}>"
    if ext == "json":
        try:
            return json.loads(data)
        except ValueError:
            pass
    return _text(data)


def _text(data: bytes) -> str:
    text = data.decode("utf-8", errors="replace")
    if len(text) > METADATA_MAX_CHARS:
        return text[:METADATA_MAX_CHARS] + f"... [cut: {len(text)} characters]"
    return text


def _table_members(container: str, image_column: str | None) -> Iterator[Member]:
    with _open(container, seekable=True) as fh:
        batches, table_schema = _table_batches(container, fh)
        column, nested = pick_image_column(table_schema, image_column, container)
        row = 0
        for batch in batches:
            images = batch.column(column)
            if nested:
                images = images.field("bytes")
            others = [n for n in batch.schema.names if n != column]
            meta_rows = batch.select(others).to_pylist() if others else [{}] * batch.num_rows
            for value, meta in zip(images.to_pylist(), meta_rows, strict=True):
                name = f"row={row}&col={column}"
                meta = {k: _short(v) for k, v in meta.items() if v is not None}
                if value is None:  # no bytes at all (empty bytes go on and are quarantined as an empty file is)
                    yield Member(name, error=(schema.REASON_EMPTY, f"{column} is null in row {row}"), metadata=meta)
                else:
                    yield Member(name, data=bytes(value), metadata=meta)
                row += 1


def _short(value: Any) -> Any:
    if isinstance(value, bytes):
        return f"<{len(value)} bytes>"
    if isinstance(value, str) and len(value) > METADATA_MAX_CHARS:
        return value[:METADATA_MAX_CHARS] + f"... [cut: {len(value)} characters]"
    return value


def _table_batches(container: str, fh: Any) -> tuple[Iterator[pa.RecordBatch], pa.Schema]:
    try:
        if container.lower().endswith(".parquet"):
            pf = pq.ParquetFile(fh)
            return pf.iter_batches(batch_size=256), pf.schema_arrow
        reader = pa.ipc.open_file(fh)
        return (reader.get_batch(i) for i in range(reader.num_record_batches)), reader.schema
    except (pa.ArrowInvalid, OSError) as exc:
        raise ContainerError(f"not a readable table: {exc}") from exc


def pick_image_column(schema: pa.Schema, wanted: str | None, where: str) -> tuple[str, bool]:
    """The column holding image bytes: ``wanted``, else the first of :data:`IMAGE_COLUMNS`, else the only binary
    column. Returns (name, nested) where nested means a struct with a ``bytes`` field (Hugging Face's Image)."""

    def kind(name: str) -> bool | None:  # True: nested bytes, False: binary, None: not an image column
        t = schema.field(name).type
        if pa.types.is_binary(t) or pa.types.is_large_binary(t):
            return False
        if pa.types.is_struct(t) and t.get_field_index("bytes") >= 0:
            return True
        return None

    if wanted is not None:
        if wanted not in schema.names or kind(wanted) is None:
            raise ContainerError(f"{where}: no binary image column {wanted!r} (ingest.image_column)")
        return wanted, bool(kind(wanted))
    for name in IMAGE_COLUMNS:
        if name in schema.names and kind(name) is not None:
            return name, bool(kind(name))
    binary = [n for n in schema.names if kind(n) is not None]
    if len(binary) == 1:
        return binary[0], bool(kind(binary[0]))
    raise ContainerError(
        f"{where}: cannot tell which column holds the images ({', '.join(schema.names)}): set ingest.image_column"
    )


# --- reading one member again (embed, curated, report) -----------------------------------------------------------


def read_member(container: str, member: str, max_bytes: int) -> bytes:
    """The bytes of one member, as ingest read them."""
    match = _ROW.match(member)
    if container_kind(container) == TABLE and match:
        data = _table_row(container, int(match.group(1)), match.group(2))
    else:
        offset, size = _tar_index(container, _stamp(container)).get(member, (-1, -1))
        if offset < 0:
            raise FileNotFoundError(f"{container} holds no member {member!r} (anymore)")
        if size > max_bytes:
            from lvdkit.core.files import FileTooLarge

            raise FileTooLarge(f"member is {size} bytes, more than {max_bytes}")
        with _open(container, seekable=True) as fh:
            fh.seek(offset)
            data = fh.read(size)
    if len(data) > max_bytes:
        from lvdkit.core.files import FileTooLarge

        raise FileTooLarge(f"member is larger than {max_bytes} bytes")
    return data


def _stamp(uri: str) -> tuple[int | None, int | None]:
    """Size and mtime of a container: the per-process caches below are keyed by them, so a rewritten container is
    read again (and a changed member then shows as changed, as for a file)."""
    if "://" in uri:
        fs, path = filesystem(uri)
        info = fs.get_file_info(path)
        return info.size, info.mtime_ns
    from lvdkit.core.files import local_path

    st = os.stat(local_path(uri))
    return st.st_size, st.st_mtime_ns


@functools.lru_cache(maxsize=8)
def _tar_index(container: str, stamp: tuple[int | None, int | None]) -> dict[str, tuple[int, int]]:
    """Member name -> (data offset, size) of a tar (its headers read once per process and version)."""
    index: dict[str, tuple[int, int]] = {}
    with _open(container, seekable=True) as fh:
        try:
            with tarfile.open(fileobj=fh, mode="r:") as tar:
                for info in tar:
                    if info.isfile():
                        index[info.name] = (info.offset_data, info.size)
        except (tarfile.TarError, EOFError):  # truncated: the members before the break are still readable
            pass
    return index


def _table_row(container: str, row: int, column: str) -> bytes:
    with _open(container, seekable=True) as fh:
        if not container.lower().endswith(".parquet"):
            reader = pa.ipc.open_file(fh)
            start = 0
            for i in range(reader.num_record_batches):
                batch = reader.get_batch(i)
                if row < start + batch.num_rows:
                    return _cell(batch.column(column), row - start)
                start += batch.num_rows
            raise FileNotFoundError(f"{container} has no row {row} (anymore)")
        meta = pq.ParquetFile(fh).metadata
        start = 0
        for group in range(meta.num_row_groups):
            n = meta.row_group(group).num_rows
            if row < start + n:
                return _cell(_row_group_column(container, _stamp(container), group, column), row - start)
            start += n
    raise FileNotFoundError(f"{container} has no row {row} (anymore)")


@functools.lru_cache(maxsize=2)
def _row_group_column(container: str, stamp: tuple[int | None, int | None], group: int, column: str) -> pa.Array:
    """One row group's image column (kept: the next member read is most likely in the same row group)."""
    with _open(container, seekable=True) as fh:
        return pq.ParquetFile(fh).read_row_group(group, columns=[column]).column(0).combine_chunks()


def _cell(column: pa.Array, i: int) -> bytes:
    value = column[i]
    if pa.types.is_struct(column.type):
        value = value["bytes"]
    data = value.as_py()
    if data is None:
        raise FileNotFoundError(f"row {i}: no image bytes")
    return bytes(data)
