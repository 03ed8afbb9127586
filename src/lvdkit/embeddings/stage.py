"""Stage ``embed``: one L2-normalised embedding per surviving image and configured model, part by part.

Each part is one unit of work for the runner: its images are decoded and preprocessed, then embedded by every model
(the models are loaded once per worker, in :meth:`EmbedWork.setup`); the runner writes the part.

Besides one embedding per image and model, a deterministic sample of images is also embedded as synthetic copies
(``lvdkit.curation.augment``): ``dedup_copy`` calibrates its threshold on them.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from lvdkit.core import schema
from lvdkit.core.io import part_name
from lvdkit.core.settings import setting
from lvdkit.core.stage import PartPlan, PartWork, StageInputs
from lvdkit.core.storage import Location
from lvdkit.core.views import alive_by_part, dedups_before
from lvdkit.embeddings.part_decode import (  # noqa: F401  (re-exported: side sets, the runner and tests import them here)
    JPEG_COLUMN,
    PIXELS_PREFIX,
    EmbedInputError,
    calibration_rate,
    copies_of,
    decode_batch,
    slices,
)

if TYPE_CHECKING:
    from lvdkit.embeddings.preprocess import Preprocess


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
    # where JPEGs are decoded and resized: pillow (CPU decode tasks), device (the model actor's device: nvJPEG on a
    # GPU; other formats still Pillow), auto (device when the actors get a GPU). See lvdkit.embeddings.device_decode
    decode: Literal["auto", "pillow", "device"] = "auto"
    calibration_copies: int = setting(1000, ge=0)  # synthetic copies embedded for dedup_copy's threshold calibration
    # rotations (degrees) of every image also embedded, by every model, into embed/views: dedup_copy searches them
    # too, so a rotated copy meets a view turned its way (the demo: [6, -6], rotated copies 29 -> 48 of 53 found).
    # Each angle costs one more embedding per image; dedup_copy then runs on one task (path single)
    copy_views: list[float] = field(default_factory=list)
    max_pixels: int = setting(100_000_000, ge=1)
    seed: int = 0

    def options(self, key: str) -> dict[str, Any]:
        """Factory keyword arguments for model ``key``."""
        return dict(self.model_options.get(key, {}))


# --- the stage: the images that survived the cheap dedups, one part per images_per_part -----------------------------


def plan_embed(cfg: EmbedConfig, inputs: StageInputs, fingerprint: str, listing: Path) -> PartPlan:
    """The work list: surviving images with their part number (row group = part), written as the ingest parts are
    read, one at a time (memory holds a part, not the pool)."""
    # between phash and copy; size and content hash rank the images for keeping in dedup_copy's partitioned path;
    # format and metadata: curated's plan joins each part's rows with this row group (lvdkit.curation.curated_plan)
    columns = [schema.URI, schema.CONTENT_HASH, schema.WIDTH, schema.HEIGHT, schema.FORMAT, schema.METADATA]
    per_part = cfg.images_per_part
    angles = [schema.view_edit(a) for a in cfg.copy_views]
    if len(set(angles)) != len(angles) or schema.view_edit(0) in angles:
        raise ValueError(f"embed.copy_views must be distinct non-zero angles in degrees, got {cfg.copy_views}")
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
    on_device: bool = False  # plain JPEGs decoded by the model actor on its device (embed.decode)
    device: Any = field(default=None, repr=False)  # where the actor decodes (torch.device, set up in setup)
    may_quarantine = False  # every surviving image needs its embedding
    decodes = True

    @classmethod
    def create(cls, cfg: EmbedConfig, listing: Location, gpus: float = 0.0) -> EmbedWork:
        """``gpus``: what each model actor gets (``auto`` decodes on the device when it is a GPU)."""
        from lvdkit.embeddings import create_embedder

        total = pq.ParquetFile(listing).metadata.num_rows
        probes = {k: create_embedder(n, device="cpu", **cfg.options(k)) for k, n in cfg.models.items()}
        dims = {k: m.dim for k, m in probes.items()}
        preprocess = {k: m.preprocess for k, m in probes.items()}
        on_device = cfg.decode == "device" or (cfg.decode == "auto" and gpus > 0)
        return cls(listing, cfg, calibration_rate(total, cfg.calibration_copies), dims, preprocess, on_device=on_device)

    def setup(self, threads: int = 1) -> None:
        from lvdkit.embeddings import create_embedder
        from lvdkit.embeddings.torch_embedder import resolve_device

        self.device = resolve_device(self.cfg.device) if self.on_device else None
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
        return decode_batch(ids, uris, self.preprocess, self.rate, self.cfg, keys, self.on_device)

    def reuse(self, previous: Location, views: tuple[str, ...]) -> None:
        self.previous, self.reused = previous, tuple(k for k in views if k in self.cfg.models)

    def process(self, rows: pa.Table, decoded: dict[str, np.ndarray] | None = None) -> dict[str, pa.Table]:
        if not self.models:
            self.setup()
        batches = list(self._batches(rows) if decoded is None else slices(decoded, self.cfg.batch_size))
        kept = self._kept(rows)
        table = self._embed(batches, [k for k in self.models if kept is None or k not in self.reused])
        if kept is not None:
            with_kept = _with_kept(table, kept, self.reused)
            # not the rows the earlier part held (a subset being retried, say): compute every model
            table = with_kept if with_kept is not None else self._embed(batches, list(self.models))
        table = table.select([schema.IMAGE_ID, schema.EDIT, *(schema.embedding_column(k) for k in self.cfg.models)])
        is_view = pc.starts_with(table[schema.EDIT], schema.VIEW_PREFIX)
        is_copy = pc.and_(pc.not_equal(table[schema.EDIT], ""), pc.invert(is_view))
        images = table.filter(pc.equal(table[schema.EDIT], "")).drop_columns([schema.EDIT])
        out = {
            "": images.cast(schema.embed_schema(self.dims)).sort_by(schema.IMAGE_ID),
            schema.CALIBRATION: _edited(table.filter(is_copy), self.dims),
        }
        if self.cfg.copy_views:
            out[schema.VIEWS] = _edited(table.filter(is_view), self.dims)
        return out

    def _embed(self, batches: list[dict[str, np.ndarray]], keys: list[str]) -> pa.Table:
        """Rows (image_id, edit, the embeddings of models ``keys``) of the decoded batches, in their order."""
        # here, not at the top: the device path needs torch, and the driver and decode tasks import this module
        from lvdkit.embeddings.device_decode import device_images, model_input

        pieces = []
        for cols in batches:
            images = device_images(cols, self.device, self.cfg.max_pixels)
            emb = {k: _run(self.models[k], model_input(cols, images, k, self.preprocess[k], self.device)) for k in keys}
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
        edited = [copies, self.previous / schema.VIEWS / name]
        theirs = [pq.read_table(f, columns=[*cols[:1], schema.EDIT, *cols[1:]]) for f in edited if f.exists()]
        return pa.concat_tables([own.cast(theirs[0].schema), *theirs])

    def _batches(self, rows: pa.Table) -> Iterator[dict[str, np.ndarray]]:
        """Decode batch by batch in this process (no decode task ran, or the part is being retried)."""
        ids, uris = rows[schema.IMAGE_ID].to_pylist(), rows[schema.URI].to_pylist()
        keys = rows[schema.CONTENT_HASH].to_pylist() if schema.CONTENT_HASH in rows.column_names else ids
        for start in range(0, len(ids), self.cfg.batch_size):
            end = start + self.cfg.batch_size
            part = slice(start, end)
            yield decode_batch(ids[part], uris[part], self.preprocess, self.rate, self.cfg, keys[part], self.on_device)

    def _empty(self) -> dict[str, np.ndarray]:
        return {k: np.empty((0, d), np.float32) for k, d in self.dims.items()}


def _edited(rows: pa.Table, dims: dict[str, int]) -> pa.Table:
    """Synthetic copies or views, in the calibration schema, sorted by image and edit."""
    sorted_rows = rows.cast(schema.embed_schema(dims, calibration=True))
    return sorted_rows.sort_by([(schema.IMAGE_ID, "ascending"), (schema.EDIT, "ascending")])


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


def _run(model: Any, pixels: Any) -> np.ndarray:
    """``model.embed`` of a numpy batch; a torch batch goes to ``embed_tensor`` where the model has one (it stays
    on the device), else to numpy."""
    if isinstance(pixels, np.ndarray):
        return np.asarray(model.embed(pixels))
    if hasattr(model, "embed_tensor"):
        return np.asarray(model.embed_tensor(pixels))
    return np.asarray(model.embed(pixels.cpu().numpy()))


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
    views = sum(pq.ParquetFile(p).metadata.num_rows for p in inputs.parts("embed", schema.VIEWS))
    return {"dims": dims, "calibration_copies": copies, "views": views}
