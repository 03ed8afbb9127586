"""The curation stages, in run order: what each reads and writes, and which kind of stage it is.

This is wiring only: each stage's logic lives in its own module (``lvdkit.curation``, ``lvdkit.embeddings``,
``lvdkit.cluster``) as plain functions on tables and arrays; the runner (``lvdkit.pipeline.runner``) decides where
they run and writes every output.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Callable
from typing import Any

import pyarrow.parquet as pq
import ray

from lvdkit.cluster.partitioned import ClusterPartitions
from lvdkit.cluster.stage import run_cluster
from lvdkit.core import schema
from lvdkit.core.files import file_identity, list_inputs
from lvdkit.core.settings import config_hash
from lvdkit.core.stage import StageInputs
from lvdkit.curation.copy_partitioned import CopyPartitions
from lvdkit.curation.curated import CuratedWork, curated_stats
from lvdkit.curation.curated_plan import CuratedPlan
from lvdkit.curation.dedup_copy import run_dedup_copy
from lvdkit.curation.dedup_exact import run_dedup_exact
from lvdkit.curation.dedup_phash import MULTIHASH_MAX_DISTANCE, run_dedup_phash
from lvdkit.curation.dedup_relative import run_dedup_relative
from lvdkit.curation.hash_partitioned import ExactPartitions, PhashPartitions
from lvdkit.curation.ingest import IngestWork, ingest_stats, plan_ingest
from lvdkit.curation.relative_partitioned import RelativePartitions
from lvdkit.curation.retrieve import run_retrieve
from lvdkit.curation.retrieve_partitioned import RetrievePartitions
from lvdkit.curation.side_sets import SideSetReader
from lvdkit.embeddings.stage import EmbedWork, embed_stats, plan_embed
from lvdkit.pipeline.config import CurateConfig
from lvdkit.pipeline.kinds import Actors, PartitionedStage, PartStage, Stage
from lvdkit.pipeline.names import CURATE_ORDER
from lvdkit.pipeline.parts import cpu_actor_share


def _side_sets(cfg: CurateConfig) -> SideSetReader:
    return SideSetReader(cfg.ingest, cfg.embed)


def _protected_files(cfg: CurateConfig) -> str:
    """The protected images are inputs of dedup_relative: their names, sizes and mtimes."""
    h = hashlib.blake2b(digest_size=8)
    for uri in list_inputs(cfg.dedup_relative.protected) if cfg.dedup_relative.protected else ():
        h.update(file_identity(uri).encode("utf-8", "surrogateescape"))
    return h.hexdigest()


def _embed_actors(cfg: CurateConfig) -> Actors:
    """The model actors' resources, from config or from the cluster's (never from the driver's own CUDA)."""
    e = cfg.embed
    gpus = e.actor_gpus
    if gpus is None:
        gpus = 1.0 if e.device in ("auto", "cuda") and ray.cluster_resources().get("GPU", 0) >= 1 else 0.0
    cpus = e.actor_cpus
    if cpus is None:
        cpus = 1.0 if gpus > 0 else cpu_actor_share(e.num_actors, e.decode_cpus)
    smallest = min(e.min_actors, e.num_actors) if e.min_actors is not None else None
    return Actors(e.num_actors, cpus, gpus, e.threads_per_actor, smallest, e.decode_cpus)


def _embed_views(cfg: CurateConfig) -> dict[str, str]:
    """One view of embed's output per model: its columns depend on that model and on embed's other settings only."""
    e = cfg.embed
    return {
        key: config_hash(dataclasses.replace(e, models={key: spec}, model_options={key: e.options(key)}))
        for key, spec in e.models.items()
    }


def _reads_model(key: Callable[[CurateConfig], str | None]) -> Callable[[CurateConfig], dict[str, tuple[str, ...]]]:
    """A stage that reads one model's embeddings (named by its config) depends on that view of embed only (on no
    model: on embed whole, as other stages)."""
    return lambda c: {"embed": (k,)} if (k := key(c)) is not None else {}


_INGESTED = ("ingest", "dedup_exact", "dedup_phash")
_EMBEDDED = (*_INGESTED, "embed")
_DEDUPED = (*_EMBEDDED, "dedup_copy", "dedup_relative")

STAGES: dict[str, Stage] = {
    s.name: s
    for s in (
        PartStage(
            name="ingest",
            reads=(),
            section=lambda c: c.ingest,
            plan=lambda c, inputs, fp, listing: plan_ingest(c.ingest, listing),
            work=lambda c, listing, plan: IngestWork(listing, c.ingest),
            stats=ingest_stats,
            plans_fingerprint=True,
        ),
        PartitionedStage(
            name="dedup_exact",
            reads=("ingest",),
            section=lambda c: c.dedup_exact,
            run=lambda c, inputs: run_dedup_exact(c.dedup_exact, inputs),
            work=lambda c, inputs: ExactPartitions.create(c.dedup_exact, inputs),
            partitioned=lambda c, inputs: _by_size("dedup_exact", c.dedup_exact, inputs, "ingest"),
        ),
        PartitionedStage(
            name="dedup_phash",
            reads=("ingest", "dedup_exact"),
            section=lambda c: c.dedup_phash,
            run=lambda c, inputs: run_dedup_phash(c.dedup_phash, inputs),
            work=lambda c, inputs: PhashPartitions.create(c.dedup_phash, inputs),
            partitioned=lambda c, inputs: _phash_partitioned(c, inputs),
        ),
        PartStage(
            name="embed",
            reads=_INGESTED,
            section=lambda c: c.embed,
            subparts=(schema.CALIBRATION, schema.VIEWS),
            plan=lambda c, inputs, fp, listing: _plan_embed(c, inputs, fp, listing),
            work=lambda c, listing, plan: EmbedWork.create(c.embed, listing, gpus=_embed_actors(c).num_gpus),
            stats=embed_stats,
            actors=_embed_actors,
            views=_embed_views,
        ),
        PartitionedStage(
            name="dedup_copy",
            reads=_EMBEDDED,
            section=lambda c: c.dedup_copy,
            sides=(schema.WHITENING_FILE, schema.THRESHOLD_FILE),
            uses=_reads_model(lambda c: c.dedup_copy.embedding),
            run=lambda c, inputs: run_dedup_copy(c.dedup_copy, inputs),
            work=lambda c, inputs: CopyPartitions.create(c.dedup_copy, inputs),
            partitioned=lambda c, inputs: _copy_partitioned(c, inputs),
        ),
        PartitionedStage(
            name="dedup_relative",
            reads=(*_EMBEDDED, "dedup_copy"),
            section=lambda c: c.dedup_relative,
            sides=(schema.PROTECTED_FILE,),
            extra_fingerprint=_protected_files,
            uses=_reads_model(lambda c: c.dedup_relative.embedding),
            run=lambda c, inputs: run_dedup_relative(c.dedup_relative, _side_sets(c), inputs),
            work=lambda c, inputs: RelativePartitions.create(c.dedup_relative, _side_sets(c), inputs),
            partitioned=lambda c, inputs: _by_size("dedup_relative", c.dedup_relative, inputs, "embed"),
        ),
        PartitionedStage(
            name="cluster",
            reads=_DEDUPED,
            section=lambda c: c.cluster,
            sides=(schema.CENTROIDS_FILES,),
            uses=_reads_model(lambda c: c.cluster.embedding),
            run=lambda c, inputs: run_cluster(c.cluster, inputs),
            work=lambda c, inputs: ClusterPartitions.create(c.cluster, inputs),
            partitioned=lambda c, inputs: _by_size("cluster", c.cluster, inputs, "embed"),
        ),
        PartitionedStage(
            name="retrieve",
            reads=(*_DEDUPED, "cluster"),
            section=lambda c: c.retrieve,
            sides=(schema.SEEDS_FILE,),
            uses=_reads_model(lambda c: c.retrieve.embedding),
            run=lambda c, inputs: run_retrieve(c.retrieve, _side_sets(c), inputs),
            work=lambda c, inputs: RetrievePartitions.create(c.retrieve, _side_sets(c), inputs),
            partitioned=lambda c, inputs: _by_size("retrieve", c.retrieve, inputs, "embed"),
        ),
        PartStage(
            name="curated",
            reads=(*_DEDUPED, "cluster", "retrieve"),
            section=lambda c: c.curated,
            subparts=(schema.QUARANTINED,),
            uses=_reads_model(lambda c: c.curated.embedding),
            plan_work=lambda c, inputs: CuratedPlan.create(c.curated, inputs, _selects_nothing(c)),
            work=lambda c, listing, plan: CuratedWork(listing, c.curated, plan.layout),
            stats=curated_stats,
        ),
    )
}
assert tuple(STAGES) == CURATE_ORDER, "lvdkit.pipeline.names.CURATE_ORDER must list STAGES in order"


def _by_size(stage: str, cfg: Any, inputs: StageInputs, counted: str) -> bool:
    """A stage's path for this run: as configured (``path``), or by the rows of ``counted`` (``path: auto``)."""
    if cfg.path != "auto":
        return bool(cfg.path == "partitioned")
    return int(inputs.record(counted).get("rows") or 0) >= cfg.partition_min_rows


def _phash_partitioned(c: CurateConfig, inputs: StageInputs) -> bool:
    """Hash bands find every pair up to 3 bits apart in buckets of useful size; beyond, the single task's brute
    force is the right tool."""
    cfg = c.dedup_phash
    if cfg.path == "partitioned" and cfg.max_distance > MULTIHASH_MAX_DISTANCE:
        raise ValueError(
            f"dedup_phash.path=partitioned works up to dedup_phash.max_distance={MULTIHASH_MAX_DISTANCE} "
            f"(it is {cfg.max_distance}): lower it or set dedup_phash.path=single"
        )
    if cfg.path == "partitioned" and cfg.grouping != "star":  # pairs found piecewise are grouped by the star rule
        raise ValueError("dedup_phash.path=partitioned groups with the star rule only: set dedup_phash.grouping=star")
    fits = cfg.max_distance <= MULTIHASH_MAX_DISTANCE and (cfg.path != "auto" or cfg.grouping == "star")
    return fits and _by_size("dedup_phash", cfg, inputs, "ingest")


def _plan_embed(c: CurateConfig, inputs: StageInputs, fingerprint: str, listing: Any) -> Any:
    """embed's work list; with ``copy_views``, first a check that dedup_copy will be able to use them."""
    plan = plan_embed(c.embed, inputs, fingerprint, listing)
    if c.embed.copy_views and c.dedup_copy.enabled:
        _copy_path(c, pq.ParquetFile(listing).metadata.num_rows)  # refused here, before the views cost anything
    return plan


def _copy_partitioned(c: CurateConfig, inputs: StageInputs) -> bool:
    """dedup_copy's path for this run: as configured, or by pool size (``path: auto``)."""
    return _copy_path(c, int(inputs.record("embed").get("rows") or 0))


def _copy_path(c: CurateConfig, rows: int) -> bool:
    """Whether dedup_copy takes the partitioned path for a pool of ``rows``. Grouping by union-find components needs
    every descriptor at hand to measure distances, so it keeps the single task; so do rotated views (the single
    task's index holds them)."""
    cfg = c.dedup_copy
    if cfg.path == "partitioned" and cfg.grouping != "star":
        raise ValueError("dedup_copy.path=partitioned groups with the star rule only: set dedup_copy.grouping=star")
    partitioned = cfg.path == "partitioned" or (
        cfg.path == "auto" and cfg.grouping == "star" and rows >= cfg.partition_min_rows
    )
    if partitioned and c.embed.copy_views:
        raise ValueError(
            f"embed.copy_views={c.embed.copy_views} needs dedup_copy.path=single, which holds the pool in one task, "
            f"and this run would take the partitioned path ({rows} images, dedup_copy.path={cfg.path}, "
            f"partition_min_rows={cfg.partition_min_rows}): set embed.copy_views=[] or dedup_copy.path=single"
        )
    return partitioned


def _selects_nothing(c: CurateConfig) -> bool:
    """No seed sets and no balanced sample: the curated set is then the whole deduplicated pool."""
    return not c.retrieve.seed_sets and c.cluster.target_size is None


def declared_sides() -> dict[str, tuple[str, ...]]:
    """Every stage's declared side files (what a :class:`~lvdkit.core.stage.StageInputs` may open)."""
    return {name: stage.sides for name, stage in STAGES.items()}
