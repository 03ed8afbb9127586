"""Stage ``embed``: one L2-normalised embedding per surviving image and configured model, part by part.

Each part is one unit of work for the runner: its images are decoded and preprocessed, then embedded by every model
(the models are loaded once per worker, in :meth:`EmbedWork.setup`); the runner writes the part.

Besides one embedding per image and model, a deterministic sample of images is also embedded as synthetic copies
(``lvdkit.curation.augment``): ``dedup_copy`` calibrates its threshold on them.
"""

from __future__ import annotations

import hashlib
import itertools
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from lvdkit.core import schema
from lvdkit.core.files import MAX_FILE_BYTES, read_bytes
from lvdkit.core.image import decode_rgb
from lvdkit.core.io import part_name
from lvdkit.core.settings import setting
from lvdkit.core.stage import PartPlan, PartWork, StageInputs
from lvdkit.core.storage import Location
from lvdkit.core.views import alive_by_part, dedups_before
from lvdkit.curation.augment import COPY_EDITS, edit_families, synthetic_copy

if TYPE_CHECKING:
    from lvdkit.embeddings.preprocess import Preprocess

PIXELS_PREFIX = "pixels_"  # decode output: uint8 [H, W, 3] per model key (models may want different sizes)


@dataclass
class EmbedConfig:
    """Which models embed every kept image, and how the work is spread."""

    RENAMED: ClassVar[dict[str, str]] = {"images_per_part": "images_per_part"}

    models: dict[str, str] = field(
        default_factory=lambda: {"copy": "sscd", "semantic": "timm:vit_small_patch14_dinov2"}
    )
    model_options: dict[str, dict[str, Any]] = field(default_factory=lambda: {"semantic": {"pretrained": True}})
    images_per_part: int = setting(1000, ge=1)  # one part file (and one resumable unit) per this many images
    batch_size: int = setting(32, ge=1)  # images per model forward
    num_actors: int = setting(1, ge=1)  # model replicas (one per GPU on a GPU cluster): the pool's largest size
    min_actors: int | None = setting(None, ge=1)  # the pool's smallest size (Ray Data scales between); null: fixed
    # CPUs Ray reserves per actor, its model's threads too (rounded up); null: 1 on a GPU; without one, a node's
    # CPUs shared among the actors on it, less one decode task's (decode keeps up: the model is the slow part)
    actor_cpus: float | None = setting(None, gt=0)
    # GPUs Ray reserves per actor; null: 1 when the Ray cluster has a GPU and device allows cuda (decided from the
    # cluster's resources, never from the driver's own CUDA: a CPU head still gives its GPU workers' actors a GPU)
    actor_gpus: float | None = setting(None, ge=0)
    decode_cpus: float = setting(0.5, gt=0)  # CPUs per decode task (one per part: read, decode, preprocess)
    threads_per_actor: int | None = setting(None, ge=1)  # intra-op threads of each model; null: from actor_cpus
    device: str = "auto"  # auto: cuda when available
    calibration_copies: int = setting(1000, ge=0)  # synthetic copies embedded for dedup_copy's threshold calibration
    max_pixels: int = setting(100_000_000, ge=1)
    seed: int = 0

    def options(self, key: str) -> dict[str, Any]:
        """Factory keyword arguments for model ``key``."""
        return dict(self.model_options.get(key, {}))


class EmbedInputError(RuntimeError):
    """An image that decoded at ingest cannot be decoded now (changed or removed since)."""


def calibration_rate(n_images: int, copies: int) -> float:
    """Synthetic copies per image: below 1 a sampled fraction gets one; small pools get several (up to one per edit
    family), so that even a 200-image pool calibrates on ``copies`` copies covering every family."""
    return min(float(len(COPY_EDITS)), copies / n_images) if n_images else 0.0


def copies_of(key: str, rate: float, seed: int) -> int:
    """How many synthetic copies image ``key`` (its content hash) gets: ``floor(rate)``, plus one for a deterministic
    fraction ``rate - floor(rate)`` of images (the same images on every run, on every worker, wherever the pool
    lies)."""
    h = hashlib.blake2b(f"{seed}:{key}".encode(), digest_size=8).digest()
    whole = int(rate)
    return whole + int(int.from_bytes(h, "little") < (rate - whole) * 2**64)


def decode_batch(
    image_ids: list[str],
    uris: list[str],
    preprocess: dict[str, Preprocess],
    rate: float,
    cfg: EmbedConfig,
    keys: list[str] | None = None,
) -> dict[str, np.ndarray]:
    """Decode and preprocess images (and the synthetic copies of sampled ones) for every model.

    ``keys``: what the calibration sample and each copy's edit are drawn from (content hashes, so they do not depend
    on where the files are; default: the image ids).

    Returns columns ``image_id`` [B'], ``edit`` [B'] ('' for the image itself) and ``pixels_<key>`` [B', H, W, 3]
    uint8, where B' = B + the number of sampled images.
    """
    ids, edits = [], []
    pixels: dict[str, list[np.ndarray]] = {k: [] for k in preprocess}
    for image_id, uri, key in zip(image_ids, uris, keys if keys is not None else image_ids, strict=True):
        try:
            image = decode_rgb(read_bytes(uri, MAX_FILE_BYTES), cfg.max_pixels)
        except Exception as exc:  # ingest decoded this file: it changed or vanished since
            raise EmbedInputError(
                f"embed: cannot decode {uri} ({type(exc).__name__}: {exc}). It decoded at ingest: the file changed or "
                "vanished since. Rerun `lvdkit curate`: ingest notices changed files (size, mtime) and redoes the "
                "stages after it"
            ) from None
        variants = [(image, "")]
        seed = _seed_of(key, cfg.seed)
        for i, family in enumerate(edit_families(seed, copies_of(key, rate, cfg.seed))):
            variants.append(synthetic_copy(image, seed=seed + i, edit=family))
        for img, edit in variants:
            ids.append(image_id)
            edits.append(edit)
            for key, pre in preprocess.items():
                pixels[key].append(pre.prepare(img))
    out: dict[str, np.ndarray] = {schema.IMAGE_ID: np.asarray(ids, dtype=object), schema.EDIT: np.asarray(edits)}
    for key, arrays in pixels.items():
        out[PIXELS_PREFIX + key] = np.stack(arrays)
    return out


def _seed_of(key: str, seed: int) -> int:
    return int.from_bytes(hashlib.blake2b(f"copy:{seed}:{key}".encode(), digest_size=8).digest(), "little")


# --- the stage: the images that survived the cheap dedups, one part per images_per_part -----------------------------


def plan_embed(cfg: EmbedConfig, inputs: StageInputs, fingerprint: str, listing: Path) -> PartPlan:
    """The work list: surviving images with their part number (row group = part), written as the ingest parts are
    read, one at a time (memory holds a part, not the pool)."""
    # between phash and copy; size and content hash rank the images for keeping in dedup_copy's partitioned path
    columns = [schema.URI, schema.CONTENT_HASH, schema.WIDTH, schema.HEIGHT]
    per_part = cfg.images_per_part
    if per_part < 1:
        raise ValueError(f"embed.images_per_part must be >= 1, got {per_part}")
    written, pending = 0, []
    with pq.ParquetWriter(listing, _listing_schema(inputs, columns)) as writer:
        for table in alive_by_part(inputs, dedups_before("dedup_copy"), columns):
            pending.append(table)
            while sum(t.num_rows for t in pending) >= per_part:  # whole parts only: a row group is a part
                written = _write_part_rows(writer, pending, per_part, written)
        while pending and sum(t.num_rows for t in pending):
            written = _write_part_rows(writer, pending, per_part, written)
    return PartPlan(fingerprint, -(-written // per_part))


def _listing_schema(inputs: StageInputs, columns: list[str]) -> pa.Schema:
    ingest = schema.INGEST
    return pa.schema([ingest.field(c) for c in [schema.IMAGE_ID, *columns]] + [pa.field(schema.PART, pa.int64())])


def _write_part_rows(writer: pq.ParquetWriter, pending: list[pa.Table], per_part: int, written: int) -> int:
    """Write the next part (up to ``per_part`` rows) from ``pending`` (consumed in place) as one row group."""
    rows = pa.concat_tables(pending).combine_chunks()
    part, rest = rows.slice(0, per_part), rows.slice(per_part)
    pending[:] = [rest] if rest.num_rows else []
    index = np.full(part.num_rows, written // per_part, dtype=np.int64)
    writer.write_table(part.append_column(schema.PART, pa.array(index)).cast(writer.schema), row_group_size=per_part)
    return written + part.num_rows


@dataclass
class EmbedWork(PartWork):
    """Embed part ``i``: decode its images (and synthetic copies of a deterministic sample), embed with every model.

    Built on the driver, where one load of each model checks the names and gives dimensions and preprocessing
    before any Ray work starts; :meth:`setup` loads the models again in each worker.
    """

    listing: Location
    cfg: EmbedConfig
    rate: float  # share of images that also get a synthetic copy
    dims: dict[str, int]
    preprocess: dict[str, Preprocess]
    models: dict[str, Any] = field(default_factory=dict, repr=False)
    previous: Location | None = None  # an earlier embed output of the same images (lvdkit.pipeline.reuse)
    reused: tuple[str, ...] = ()  # the models whose columns it holds still valid
    may_quarantine = False  # every surviving image needs its embedding
    decodes = True

    @classmethod
    def create(cls, cfg: EmbedConfig, listing: Location) -> EmbedWork:
        from lvdkit.embeddings import create_embedder

        total = pq.ParquetFile(listing).metadata.num_rows
        probes = {k: create_embedder(n, device="cpu", **cfg.options(k)) for k, n in cfg.models.items()}
        dims = {k: m.dim for k, m in probes.items()}
        preprocess = {k: m.preprocess for k, m in probes.items()}
        return cls(listing, cfg, calibration_rate(total, cfg.calibration_copies), dims, preprocess)

    def setup(self, threads: int = 1) -> None:
        from lvdkit.embeddings import create_embedder

        self.models = {
            key: create_embedder(name, device=self.cfg.device, num_threads=threads, **self.cfg.options(key))
            for key, name in self.cfg.models.items()
        }

    def load(self, index: int) -> pa.Table:
        return pq.ParquetFile(self.listing).read_row_group(index)

    def decode(self, rows: pa.Table) -> dict[str, np.ndarray] | None:
        """Every image of the part (and the synthetic copies of sampled ones) decoded and preprocessed, as
        :func:`decode_batch` returns them: what a decode task hands the model actor."""
        if rows.num_rows == 0:
            return None
        ids, uris = rows[schema.IMAGE_ID].to_pylist(), rows[schema.URI].to_pylist()
        keys = rows[schema.CONTENT_HASH].to_pylist() if schema.CONTENT_HASH in rows.column_names else ids
        return decode_batch(ids, uris, self.preprocess, self.rate, self.cfg, keys)

    def reuse(self, previous: Location, views: tuple[str, ...]) -> None:
        self.previous, self.reused = previous, tuple(k for k in views if k in self.cfg.models)

    def process(self, rows: pa.Table, decoded: dict[str, np.ndarray] | None = None) -> dict[str, pa.Table]:
        if not self.models:
            self.setup()
        batches = list(self._batches(rows) if decoded is None else _slices(decoded, self.cfg.batch_size))
        kept = self._kept(rows)
        table = self._embed(batches, [k for k in self.models if kept is None or k not in self.reused])
        if kept is not None:
            with_kept = _with_kept(table, kept, self.reused)
            # not the rows the earlier part held (a subset being retried, say): compute every model
            table = with_kept if with_kept is not None else self._embed(batches, list(self.models))
        table = table.select([schema.IMAGE_ID, schema.EDIT, *(schema.embedding_column(k) for k in self.cfg.models)])
        is_copy = pc.not_equal(table[schema.EDIT], "")
        images = table.filter(pc.invert(is_copy)).drop_columns([schema.EDIT])
        return {
            "": images.cast(schema.embed_schema(self.dims)).sort_by(schema.IMAGE_ID),
            schema.CALIBRATION: table.filter(is_copy)
            .cast(schema.embed_schema(self.dims, calibration=True))
            .sort_by([(schema.IMAGE_ID, "ascending"), (schema.EDIT, "ascending")]),
        }

    def _embed(self, batches: list[dict[str, np.ndarray]], keys: list[str]) -> pa.Table:
        """Rows (image_id, edit, the embeddings of models ``keys``) of the decoded batches, in their order."""
        pieces = []
        for cols in batches:
            emb = {k: self.models[k].embed(cols[PIXELS_PREFIX + k]) for k in keys}  # [B', D] float32 each
            pieces.append(_rows(cols[schema.IMAGE_ID], cols[schema.EDIT], emb))
        if pieces:
            return pa.concat_tables(pieces)
        return _rows(np.empty(0, object), np.empty(0, str), {k: v for k, v in self._empty().items() if k in keys})

    def _kept(self, rows: pa.Table) -> pa.Table | None:
        """The earlier output's rows of this part (images and their synthetic copies: image_id, edit and the reused
        models' columns), or None when there is none to reuse."""
        if self.previous is None or not self.reused or rows.num_rows == 0:
            return None
        name = part_name(int(rows[schema.PART][0].as_py()))
        images, copies = self.previous / name, self.previous / schema.CALIBRATION / name
        if not images.exists():
            return None
        cols = [schema.IMAGE_ID, *(schema.embedding_column(k) for k in self.reused)]
        own = pq.read_table(images, columns=cols)
        own = own.add_column(1, schema.EDIT, pa.array([""] * own.num_rows, pa.string()))
        if not copies.exists():
            return own
        theirs = pq.read_table(copies, columns=[*cols[:1], schema.EDIT, *cols[1:]])
        return pa.concat_tables([own.cast(theirs.schema), theirs])

    def _batches(self, rows: pa.Table) -> Iterator[dict[str, np.ndarray]]:
        """Decode batch by batch in this process (no decode task ran, or the part is being retried)."""
        ids, uris = rows[schema.IMAGE_ID].to_pylist(), rows[schema.URI].to_pylist()
        keys = rows[schema.CONTENT_HASH].to_pylist() if schema.CONTENT_HASH in rows.column_names else ids
        for start in range(0, len(ids), self.cfg.batch_size):
            end = start + self.cfg.batch_size
            yield decode_batch(ids[start:end], uris[start:end], self.preprocess, self.rate, self.cfg, keys[start:end])

    def _empty(self) -> dict[str, np.ndarray]:
        return {k: np.empty((0, d), np.float32) for k, d in self.dims.items()}


def _with_kept(table: pa.Table, kept: pa.Table, keys: tuple[str, ...]) -> pa.Table | None:
    """``table`` with the columns of models ``keys`` taken from ``kept``, row by row (by image and edit); None when
    ``kept`` lacks some of its rows."""
    at = pc.index_in(_row_keys(table), value_set=_row_keys(kept))
    if at.null_count:
        return None
    for key in keys:
        col = schema.embedding_column(key)
        table = table.append_column(col, kept[col].take(at))
    return table


def _row_keys(table: pa.Table) -> pa.Array:
    return pc.binary_join_element_wise(table[schema.IMAGE_ID], table[schema.EDIT], "\x00").combine_chunks()


def _slices(decoded: dict[str, np.ndarray], size: int) -> Iterator[dict[str, np.ndarray]]:
    """The batches :meth:`EmbedWork._batches` would decode: ``size`` images each, with their synthetic copies (the
    same batches give the same embeddings, bit for bit, whichever process decoded them)."""
    originals = np.flatnonzero(decoded[schema.EDIT] == "")
    bounds = [*originals[::size].tolist(), len(decoded[schema.IMAGE_ID])]
    for start, end in itertools.pairwise(bounds):
        yield {name: col[start:end] for name, col in decoded.items()}


def _rows(ids: np.ndarray, edits: np.ndarray, emb: dict[str, np.ndarray]) -> pa.Table:
    cols: dict[str, Any] = {schema.IMAGE_ID: pa.array(ids, pa.string()), schema.EDIT: pa.array(edits, pa.string())}
    for key, x in emb.items():
        x = np.ascontiguousarray(x, dtype=np.float32)
        cols[schema.embedding_column(key)] = pa.FixedSizeListArray.from_arrays(pa.array(x.ravel()), x.shape[1])
    return pa.table(cols)


def embed_stats(inputs: StageInputs) -> dict[str, Any]:
    """Embedding dimension per model, and how many synthetic copies were embedded."""
    parts = inputs.parts("embed")
    dims = {}
    if parts:
        for f in pq.read_schema(parts[0]):
            if f.name.startswith(schema.EMBEDDING_PREFIX):
                dims[f.name[len(schema.EMBEDDING_PREFIX) :]] = f.type.list_size
    copies = sum(pq.ParquetFile(p).metadata.num_rows for p in inputs.parts("embed", schema.CALIBRATION))
    return {"dims": dims, "calibration_copies": copies}
