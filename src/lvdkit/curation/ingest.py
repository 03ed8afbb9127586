"""Stage ``ingest``: list input files, read and fully decode each one, and record one row per file.

Nothing is dropped: a file that is not a usable image gets a ``quarantined`` row with a reason. The PHash that the
perceptual dedup needs is computed here, while the pixels are in memory, so no image is decoded twice.
"""

from __future__ import annotations

import functools
import hashlib
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from PIL import Image

from lvdkit.core import schema
from lvdkit.core.containers import (
    TABLE,
    TABLE_SUFFIXES,
    TAR,
    TAR_SUFFIXES,
    ContainerError,
    container_kind,
    iter_members,
    member_uri,
)
from lvdkit.core.files import (
    as_uri,
    content_hash,
    file_identity,
    image_id,
    input_roots,
    link_outside,
    list_identified,
    read_bytes,
)
from lvdkit.core.image import ALLOWED_FORMATS, DecodeError, decode, read_error, to_rgb
from lvdkit.core.io import disk_errors
from lvdkit.core.settings import setting
from lvdkit.core.stage import PartPlan, PartWork, StageInputs
from lvdkit.core.storage import Location


@dataclass
class IngestConfig:
    """What to read and what counts as a usable image."""

    RENAMED: ClassVar[dict[str, str]] = {"files_per_part": "files_per_part"}

    inputs: list[str] = field(default_factory=list)  # folders (recursive), globs, .txt file lists, or fs URIs
    extensions: list[str] | None = None  # e.g. [.jpg, .png]; None reads every file (non-images are quarantined)
    files_per_part: int = setting(1000, ge=1)  # one part-*.parquet (and one resumable unit of work) per this many files
    keep_bytes: bool = False  # store the file bytes in the table (else later stages re-read ``uri``)
    # decompression-bomb guard: larger images are quarantined, never decoded
    max_pixels: int = setting(100_000_000, ge=1)
    # images of 16+ megapixels whose pixels take more than this many times their file size are quarantined from the
    # header (a few KB of PNG can declare a gigabyte of zeros); 0 switches it off. See lvdkit.core.image.
    max_expansion: float = setting(200.0, ge=0)
    max_file_mb: float = setting(256.0, gt=0)  # larger files are quarantined without being read
    min_side: int = setting(16, ge=1)  # images whose shorter side is below this are quarantined (too_small)
    phash: bool = True  # compute imagededup's PHash and DHash for dedup_phash
    # images with less structure than this at 32x32 (grey-level std; measured: demo images >= 35, solid colours and
    # fine chessboards < 0.3) get no PHash, so PHash dedup never groups them (copy dedup still sees them)
    phash_min_std: float = setting(2.0, ge=0)
    follow_symlinks_outside: bool = False  # read links found in input folders/globs that point outside every input
    # slower decodes are quarantined (decode_timeout); see lvdkit.core.image
    formats: list[str] = field(default_factory=lambda: list(ALLOWED_FORMATS))  # others: format_not_allowed
    # inputs read as containers of images (each one part): WebDataset tars, Parquet/Arrow tables of image bytes
    containers: list[str] = field(default_factory=lambda: [TAR, TABLE])
    image_column: str | None = None  # tables: the image-bytes column; null: image, jpg, png, ... or the only one
    decode_timeout_s: float | None = setting(30.0, gt=0)


CONTAINER_SUFFIXES = {TAR: TAR_SUFFIXES, TABLE: TABLE_SUFFIXES}


@functools.cache
def _phasher() -> Any:
    from imagededup.methods import PHash  # imports torch: load it only in processes that hash

    return PHash(verbose=False)


@functools.cache
def _dhasher() -> Any:
    from imagededup.methods import DHash

    return DHash(verbose=False)


def structure(rgb: Image.Image) -> float:
    """Standard deviation (grey levels) of the image at 32x32, the scale PHash looks at. Solid colours and fine
    patterns (a chessboard of small squares) are near 0 there; their PHashes say nothing and would all coincide."""
    return float(np.asarray(rgb.convert("L").resize((32, 32), Image.Resampling.LANCZOS), np.float32).std())


def phash64(rgb: np.ndarray) -> int:
    """imagededup's PHash of an RGB array as an unsigned 64-bit integer (its hex string, parsed)."""
    return int(_phasher().encode_image(image_array=rgb), 16)


def dhash64(rgb: np.ndarray) -> int:
    """imagededup's DHash (gradient signs at 9x8) of an RGB array as an unsigned 64-bit integer."""
    return int(_dhasher().encode_image(image_array=rgb), 16)


def inspect_file(uri: str, cfg: IngestConfig, outside: str | None = None) -> dict[str, object]:
    """One ingest row for ``uri`` (schema :data:`lvdkit.core.schema.INGEST`); never raises for a bad file.

    ``outside``: the real path of a symlink that :func:`link_outside` found pointing out of the inputs; unless
    ``cfg.follow_symlinks_outside``, the file is quarantined (``symlink_outside_inputs``) without being read.
    """
    uri = as_uri(uri)  # a path with undecodable bytes straight from os.listdir: record it as list_inputs would
    row: dict[str, object] = {schema.IMAGE_ID: image_id(uri), schema.URI: uri}
    row[schema.STATUS_COL] = schema.STATUS_QUARANTINED  # until every check has passed
    if outside is not None and not cfg.follow_symlinks_outside:
        detail = f"symlink to {outside}, outside the input folders (set ingest.follow_symlinks_outside=true to read)"
        return {**row, schema.ERROR: schema.REASON_SYMLINK_OUTSIDE, schema.ERROR_DETAIL: detail}
    try:
        data = read_bytes(uri, int(cfg.max_file_mb * 2**20))
    except OSError as exc:
        err = read_error(exc)
        return {**row, schema.ERROR: err.reason, schema.ERROR_DETAIL: err.detail}
    return inspect_bytes(row, data, cfg)


def inspect_bytes(row: dict[str, object], data: bytes, cfg: IngestConfig) -> dict[str, object]:
    """Complete ``row`` (id, uri, quarantined status) from the bytes of a file or container member."""
    row.update({schema.SIZE_BYTES: len(data), schema.CONTENT_HASH: content_hash(data)})
    if cfg.keep_bytes:
        row[schema.IMAGE_BYTES] = data
    try:
        dec = decode(data, cfg.max_pixels, cfg.decode_timeout_s, cfg.formats, cfg.max_expansion)
    except DecodeError as exc:
        return {**row, schema.ERROR: exc.reason, schema.ERROR_DETAIL: exc.detail}
    width, height = dec.image.size
    row.update({schema.FORMAT: dec.format, schema.WIDTH: width, schema.HEIGHT: height})
    row.update({schema.MODE: dec.mode, schema.N_FRAMES: dec.n_frames})
    if min(width, height) < cfg.min_side:
        detail = f"{width}x{height} < min_side={cfg.min_side}"
        return {**row, schema.ERROR: schema.REASON_TOO_SMALL, schema.ERROR_DETAIL: detail}
    if cfg.phash:
        rgb = to_rgb(dec.image)
        if structure(rgb) >= cfg.phash_min_std:  # else no PHash: it would equal every other flat image's
            pixels = np.asarray(rgb)
            row[schema.PHASH], row[schema.DHASH] = phash64(pixels), dhash64(pixels)
    row[schema.STATUS_COL] = schema.STATUS_OK
    return row


def inspect_container(uri: str, cfg: IngestConfig, outside: str | None = None) -> list[dict[str, object]]:
    """One ingest row per record of a WebDataset tar or image table (see :mod:`lvdkit.core.containers`), each
    inspected as a file is; a container that cannot be read at all is one quarantined row under its own uri."""
    uri = as_uri(uri)
    whole: dict[str, object] = {schema.IMAGE_ID: image_id(uri), schema.URI: uri}
    whole[schema.STATUS_COL] = schema.STATUS_QUARANTINED
    if outside is not None and not cfg.follow_symlinks_outside:
        return [inspect_file(uri, cfg, outside)]
    rows = []
    try:
        for m in iter_members(uri, cfg.image_column, int(cfg.max_file_mb * 2**20)):
            member = member_uri(uri, m.name)
            row: dict[str, object] = {schema.IMAGE_ID: image_id(member), schema.URI: member}
            row.update({schema.STATUS_COL: schema.STATUS_QUARANTINED, schema.METADATA: m.metadata_json()})
            if m.error is not None:
                rows.append({**row, schema.ERROR: m.error[0], schema.ERROR_DETAIL: m.error[1]})
            else:
                assert m.data is not None
                rows.append(inspect_bytes(row, m.data, cfg))
    except ContainerError as exc:
        rows.append({**whole, schema.ERROR: schema.REASON_CONTAINER, schema.ERROR_DETAIL: str(exc)})
    except OSError as exc:  # unreadable, vanished, ...
        err = read_error(exc)
        rows.append({**whole, schema.ERROR: err.reason, schema.ERROR_DETAIL: err.detail})
    if not rows:  # an empty tar or table still ends accounted for
        rows.append({**whole, schema.ERROR: schema.REASON_CONTAINER, schema.ERROR_DETAIL: "holds no records"})
    return rows


def ingest_files(uris: Sequence[str], cfg: IngestConfig, outside: Sequence[str | None] | None = None) -> pa.Table:
    """Inspect each file, in order: one row per file, one per record of a container (``outside``: per URI, see
    :func:`inspect_file`)."""
    links = outside if outside is not None else [None] * len(uris)
    rows: list[dict[str, object]] = []
    for uri, link in zip(uris, links, strict=True):
        if container_kind(uri, cfg.containers):
            rows.extend(inspect_container(uri, cfg, link))
        else:
            rows.append(inspect_file(uri, cfg, link))
    return pa.Table.from_pylist(rows, schema.INGEST)


def list_for_ingest(inputs: Sequence[str], cfg: IngestConfig) -> Iterator[tuple[str, str | None]]:
    """The files of ``inputs`` to ingest, each with :func:`link_outside`'s verdict (``None``: read it)."""
    for uri, outside, _ in _listed(inputs, cfg):
        yield uri, outside


def _listed(inputs: Sequence[str], cfg: IngestConfig) -> Iterator[tuple[str, str | None, str]]:
    """:func:`list_for_ingest` with each file's identity (from the listing where it has it)."""
    roots = input_roots(inputs)
    for uri, how, identity in list_identified(inputs, cfg.extensions):
        outside = None if cfg.follow_symlinks_outside else link_outside(uri, how, roots)
        yield uri, outside, identity or file_identity(uri)


# --- the stage: a work list of files, one part per files_per_part ------------------------------------------------


def plan_ingest(cfg: IngestConfig, listing: Path) -> PartPlan:
    """List the inputs into ``listing`` (Parquet, row group = part) and fingerprint names, sizes and mtimes.

    The listing is streamed to disk: the driver never holds the pool's file names.
    """
    per_part = cfg.files_per_part
    if per_part < 1:
        raise ValueError(f"ingest.files_per_part must be >= 1, got {per_part}")
    unknown = sorted(set(cfg.containers) - set(CONTAINER_SUFFIXES))
    if unknown:
        raise ValueError(f"ingest.containers: unknown kind(s) {unknown}; valid: {sorted(CONTAINER_SUFFIXES)}")
    h = hashlib.blake2b(digest_size=8)
    n_files, n_parts = 0, 0
    uris: list[str] = []
    links: list[str | None] = []
    with disk_errors(listing), pq.ParquetWriter(listing, schema.INGEST_LISTING) as writer:

        def flush(batch: list[str], batch_links: list[str | None]) -> None:
            nonlocal n_parts
            if batch:
                writer.write_table(_listing(batch, batch_links), row_group_size=per_part)
                n_parts += 1

        for uri, outside, identity in _listed(cfg.inputs, cfg):
            h.update(identity.encode("utf-8", "surrogateescape"))
            n_files += 1
            if container_kind(uri, cfg.containers):  # a part of its own: its records are listed by its task
                flush(uris, links)
                flush([uri], [outside])
                uris.clear()
                links.clear()
                continue
            uris.append(uri)
            links.append(outside)
            if len(uris) == per_part:
                flush(uris, links)
                uris.clear()
                links.clear()
        flush(uris, links)
    return PartPlan(fingerprint=f"{h.hexdigest()}-{n_files}", n_parts=n_parts)


def _listing(uris: list[str], links: list[str | None]) -> pa.Table:
    return pa.table({schema.URI: uris, schema.OUTSIDE: links}, schema.INGEST_LISTING)


@dataclass(frozen=True)
class IngestWork(PartWork):
    """Ingest part ``i``: the files of row group ``i`` of the listing."""

    listing: Location
    cfg: IngestConfig

    def load(self, index: int) -> pa.Table:
        return pq.ParquetFile(self.listing).read_row_group(index)

    def process(self, rows: pa.Table, decoded: Any = None) -> pa.Table:
        outside = rows[schema.OUTSIDE].to_pylist() if schema.OUTSIDE in rows.column_names else None
        return ingest_files(self.uris(rows), self.cfg, outside)

    def quarantined(self, rows: pa.Table, reason: str, detail: str) -> pa.Table:
        records = [
            {
                schema.IMAGE_ID: image_id(u),
                schema.URI: u,
                schema.STATUS_COL: schema.STATUS_QUARANTINED,
                schema.ERROR: reason,
                schema.ERROR_DETAIL: detail,
            }
            for u in self.uris(rows)
        ]
        return pa.Table.from_pylist(records, schema=schema.INGEST)


def ingest_stats(inputs: StageInputs) -> dict[str, Any]:
    """Counts, read part by part (the driver never holds the whole table)."""
    total, reasons = 0, Counter[str]()
    for part in inputs.parts("ingest"):
        table = pq.read_table(part, columns=[schema.STATUS_COL, schema.ERROR])
        total += table.num_rows
        quarantined = table.filter(pc.equal(table[schema.STATUS_COL], schema.STATUS_QUARANTINED))
        counts = pc.value_counts(quarantined[schema.ERROR]).to_pylist()
        reasons.update({str(r["values"]): int(r["counts"]) for r in counts})
    n_quarantined = sum(reasons.values())
    return {
        "ok": total - n_quarantined,
        "quarantined": n_quarantined,
        "quarantined_by_reason": dict(sorted(reasons.items())),
    }
