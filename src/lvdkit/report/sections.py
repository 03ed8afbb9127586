"""The report's sections, each a function of a :class:`Context` returning HTML.

Each reads only the columns it needs from the stage outputs (``OUT/<stage>/part-*.parquet``) and shows a bounded
number of images, so the report stays fast on large runs. A stage that has not run gives a visible note instead.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import pyarrow.parquet as pq

from lvdkit.core import schema
from lvdkit.core.io import read_json
from lvdkit.core.stage import StageInputs
from lvdkit.core.storage import Location, fs_paths
from lvdkit.core.views import DEDUP_STAGES, INGEST
from lvdkit.pipeline.manifest import success
from lvdkit.pipeline.names import CURATE_ORDER
from lvdkit.pipeline.stages import declared_sides
from lvdkit.pipeline.summary import SUMMARY_FILE
from lvdkit.report.page import Raw, bar, esc, histogram_svg, missing, para, table
from lvdkit.report.thumbs import Thumbnailer

# What each dedup stage compares, for the funnel and the pair captions.
DEDUP_KINDS = {
    "dedup_exact": "identical bytes",
    "dedup_phash": "perceptual hash (PHash)",
    "dedup_copy": "copy detection (self-dedup)",
    "dedup_relative": "copies of protected images",
}
RETRIEVE_COLUMNS = [schema.IMAGE_ID, schema.SEED_SET, schema.SEED_ID, schema.SCORE, schema.METHOD]
SIDE_TABLES = (("dedup_relative", schema.PROTECTED_FILE), ("retrieve", schema.SEEDS_FILE))  # images not in ingest


@dataclass(frozen=True)
class ReportLimits:
    """How much the report shows (and so how many images it reads)."""

    thumb_px: int = 80  # thumbnail box, pixels
    clusters: int = 6  # largest level-1 clusters shown as image grids
    per_cluster: int = 10  # images per cluster grid
    pairs: int = 8  # duplicate pairs per dedup stage
    seeds: int = 4  # sample-based retrieval: seeds shown per seed set
    hits: int = 8  # hits shown per seed (sample-based) or per seed set (cluster-based)


@dataclass
class Context:
    """A finished (or partly finished) run, what to show of it, and the thumbnail maker."""

    out: Location
    limits: ReportLimits
    thumbs: Thumbnailer
    _uris: dict[str, str] = field(default_factory=dict)

    def finished(self, stage: str) -> dict[str, Any] | None:
        """The stage's ``_SUCCESS`` record, or None when it has not finished."""
        return success(self.outputs.folder(stage))

    @property
    def outputs(self) -> StageInputs:
        """Read access to every stage's declared outputs."""
        return StageInputs(str(self.out), CURATE_ORDER, declared_sides())

    def summary(self) -> dict[str, Any] | None:
        """``OUT/summary.json``, or None when absent."""
        return read_json(self.out / SUMMARY_FILE)

    def uris(self, ids: Iterable[str]) -> dict[str, str]:
        """``image_id -> uri`` for ``ids``: pool images from ingest, protected images and seeds from their tables."""
        wanted = {i for i in ids if i and i not in self._uris}
        sides = [self.outputs.side(stage, name) for stage, name in SIDE_TABLES]
        sources = [self.outputs.parts(INGEST), *([side] for side in sides if side.exists())]
        for source in sources:
            if not wanted:
                break
            found = _lookup_uris(source, wanted)
            self._uris.update(found)
            wanted -= found.keys()
        return self._uris

    def figure(self, image_id: str | None, caption: str = "", kind: str = "") -> str:
        """A thumbnail figure for ``image_id`` (call :meth:`uris` first with every id to show)."""
        return self.thumbs.figure(self._uris.get(image_id or ""), caption, kind)


def _lookup_uris(paths: list[Location], ids: set[str]) -> dict[str, str]:
    """Scan the Parquet files ``paths`` (a stage's parts, or one side table) for ``ids``, keeping only the matches."""
    if not paths:
        return {}
    fs, files = fs_paths(paths)
    dataset = ds.dataset(files, format="parquet", filesystem=fs)
    matches = dataset.to_table(
        columns=[schema.IMAGE_ID, schema.URI], filter=ds.field(schema.IMAGE_ID).isin(sorted(ids))
    )
    return dict(zip(matches[schema.IMAGE_ID].to_pylist(), matches[schema.URI].to_pylist(), strict=True))


def spread(n: int, k: int) -> list[int]:
    """``k`` indices evenly spread over ``range(n)``, first and last included (all of them when ``n <= k``)."""
    if n <= k:
        return list(range(n))
    return sorted(set(np.rint(np.linspace(0, n - 1, k)).astype(int).tolist()))


# --- stages -------------------------------------------------------------------------------------------------------
def stages_section(ctx: Context) -> str:
    """Which stages finished (rows, seconds) and which have not run."""
    rows: list[tuple[list[object], str]] = []
    for stage in CURATE_ORDER:
        record = ctx.finished(stage)
        if record is None:
            rows.append(([stage, "not run", "", ""], "muted"))
        else:
            rows.append(([stage, "finished", record.get("rows", 0), round(float(record.get("seconds", 0.0)), 1)], ""))
    missing_ = [s for s in CURATE_ORDER if ctx.finished(s) is None]
    note = missing(f"not run yet: {', '.join(missing_)}; their sections below are empty") if missing_ else ""
    return note + table(["stage", "state", "rows", "seconds"], rows)


# --- funnel -------------------------------------------------------------------------------------------------------
def funnel_section(ctx: Context) -> str:
    """Images in, quarantined by reason, duplicates by stage, kept, curated by selection reason, as bars."""
    summary = ctx.summary()
    if summary is None:
        return missing(f"no summary.json in {ctx.out}: run `lvdkit summary {ctx.out}` after ingest has finished")
    total = int(summary["images_in"])
    rows: list[tuple[list[object], str]] = [(["images in", total, bar(total, total, "in")], "")]
    rows.append((["quarantined", summary["quarantined"], bar(summary["quarantined"], total, "quarantined")], ""))
    for reason, n in summary.get("quarantined_by_reason", {}).items():
        rows.append(([reason, n, bar(n, total, "quarantined")], "sub"))
    rows.append((["duplicates", summary["duplicates"], bar(summary["duplicates"], total, "duplicate")], ""))
    for stage, n in summary.get("duplicates_by_stage", {}).items():
        rows.append(([f"{stage}: {DEDUP_KINDS.get(stage, '')}", n, bar(n, total, "duplicate")], "sub"))
    rows.append((["kept", summary["kept"], bar(summary["kept"], total, "kept")], ""))
    rows += _curated_rows(ctx, summary, total)
    check = summary["kept"] + summary["duplicates"] + summary["quarantined"]
    note = para(f"images in = kept + duplicates + quarantined: {total:,} = {check:,}")
    return table(["", "images", f"share of {total:,} images in"], rows) + note


def _curated_rows(ctx: Context, summary: dict[str, Any], total: int) -> list[tuple[list[object], str]]:
    if summary.get("curated") is None or ctx.finished("curated") is None:
        return [(["curated", Raw(missing("curated has not run").strip()), ""], "")]
    empty = pa.schema([(schema.REASON, pa.string())])  # a curated set of no images has no parts
    reasons = ctx.outputs.table("curated", columns=[schema.REASON], schema=empty)[schema.REASON]
    counts = {r["values"]: int(r["counts"]) for r in pc.value_counts(reasons).to_pylist()}
    curated = int(summary["curated"])
    rows: list[tuple[list[object], str]] = [(["curated", curated, bar(curated, total, "curated")], "")]
    for reason in sorted(counts, key=lambda r: -counts[r]):
        rows.append(([f"by {reason}", counts[reason], bar(counts[reason], total, "curated")], "sub"))
    return rows


# --- clusters -----------------------------------------------------------------------------------------------------
def clusters_section(ctx: Context) -> str:
    """Cluster sizes (levels, histogram of level-1 sizes) and image grids of the largest level-1 clusters."""
    if ctx.finished("cluster") is None:
        return missing("cluster has not run: no cluster sizes or cluster samples")
    columns = [schema.IMAGE_ID, schema.CLUSTER_IDS, schema.DISTANCE, schema.BALANCED]
    table_ = ctx.outputs.table("cluster", columns=columns)
    if table_.num_rows == 0:
        return missing("the cluster stage produced no rows")
    level1 = pc.list_element(table_[schema.CLUSTER_IDS], 0).to_numpy()
    ids, sizes = np.unique(level1, return_counts=True)
    n_levels = int(pc.max(pc.list_value_length(table_[schema.CLUSTER_IDS])).as_py())
    per_level = [len(pc.unique(pc.list_element(table_[schema.CLUSTER_IDS], lv))) for lv in range(n_levels)]
    balanced = int(pc.sum(table_[schema.BALANCED]).as_py() or 0)
    head = para(
        f"{table_.num_rows:,} images in {len(ids):,} level-1 clusters (clusters per level, finest first: "
        f"{', '.join(map(str, per_level))}); level-1 size min {sizes.min()}, median {np.median(sizes):g}, "
        f"max {sizes.max()}; {balanced:,} images in the balanced sample",
        "",
    )
    hist = "<h3>Level-1 cluster sizes</h3>" + histogram_svg(sizes, "images per level-1 cluster (count of clusters)")
    return head + hist + _largest_clusters(ctx, table_, level1, ids, sizes)


def _largest_clusters(ctx: Context, table_: pa.Table, level1: np.ndarray, ids: np.ndarray, sizes: np.ndarray) -> str:
    lim = ctx.limits
    order = np.argsort(-sizes, kind="stable")[: lim.clusters]
    distance = table_[schema.DISTANCE].to_numpy(zero_copy_only=False)
    image_ids = np.asarray(table_[schema.IMAGE_ID].to_pylist(), dtype=object)
    picks: list[tuple[int, int, list[tuple[str, float]]]] = []
    for c in order:
        members = np.flatnonzero(level1 == ids[c])
        members = members[np.argsort(distance[members], kind="stable")]
        shown = members[spread(len(members), lim.per_cluster)]
        chosen = [(str(image_ids[m]), float(distance[m])) for m in shown]
        picks.append((int(ids[c]), int(sizes[c]), chosen))
    ctx.uris(i for _, _, chosen in picks for i, _ in chosen)
    parts = [
        f"<h3>The {len(picks)} largest level-1 clusters</h3>",
        para(f"{lim.per_cluster} images each, spread from closest to farthest from the centroid (1 - cosine)"),
    ]
    for cluster, size, chosen in picks:
        figs = "".join(ctx.figure(i, f"d {d:.3f}") for i, d in chosen)
        parts.append(
            f'<h3>cluster {cluster} <span class="muted">({size:,} images)</span></h3><div class="grid">{figs}</div>'
        )
    return "\n".join(parts) + "\n"


# --- duplicates ---------------------------------------------------------------------------------------------------
def duplicates_section(ctx: Context) -> str:
    """Per dedup stage, a bounded spread of removed images next to the kept (or protected) image they duplicate."""
    return "".join(_stage_pairs(ctx, stage) for stage in DEDUP_STAGES)


def _stage_pairs(ctx: Context, stage: str) -> str:
    title = f"<h3>{esc(stage)}: {esc(DEDUP_KINDS[stage])}</h3>"
    record = ctx.finished(stage)
    if record is None:
        return title + missing(f"{stage} has not run")
    dedup = ctx.outputs.table(stage, columns=[schema.IMAGE_ID, schema.DUP_OF, schema.DISTANCE], schema=schema.DEDUP)
    dups = dedup.filter(pc.is_valid(dedup[schema.DUP_OF]))
    if dups.num_rows == 0:
        return title + para(f"no duplicates among {dedup.num_rows:,} images")
    dups = dups.sort_by([(schema.DISTANCE, "ascending"), (schema.IMAGE_ID, "ascending")])
    rows = dups.take(spread(dups.num_rows, ctx.limits.pairs)).to_pylist()
    ctx.uris([r[schema.IMAGE_ID] for r in rows] + [r[schema.DUP_OF] for r in rows])
    kept_kind = "protected" if stage == "dedup_relative" else "kept"
    pairs = "".join(
        f'<div class="pair">{ctx.figure(r[schema.IMAGE_ID], "removed", "dup")}'
        f"{ctx.figure(r[schema.DUP_OF], kept_kind, 'kept')}"
        f'<div class="m">{esc(_measure(stage, r[schema.DISTANCE]))}</div></div>'
        for r in rows
    )
    noun = "duplicate" if dups.num_rows == 1 else "duplicates"
    note = para(
        f"{dups.num_rows:,} {noun} of {dedup.num_rows:,} images{_threshold(record)}; showing {len(rows)}, "
        "spread from most to least similar"
    )
    return title + note + f'<div class="pairs">{pairs}</div>\n'


def _measure(stage: str, distance: float | None) -> str:
    if distance is None:
        return ""
    if stage == "dedup_exact":
        return "identical bytes"
    if stage == "dedup_phash":
        return f"{distance:.0f} bits apart"
    return f"cosine {1.0 - distance:.3f}"


def _threshold(record: dict[str, Any]) -> str:
    threshold = record.get("stats", {}).get("threshold")
    return f" (cosine threshold {threshold:.3f})" if isinstance(threshold, (int, float)) else ""


# --- retrieval ----------------------------------------------------------------------------------------------------
def retrieval_section(ctx: Context) -> str:
    """Per seed set: seeds and their top hits with scores (sample-based), or seeds and the set's top hits (cluster)."""
    record = ctx.finished("retrieve")
    if record is None:
        return missing("retrieve has not run: no retrievals")
    hits = _retrieved(ctx.outputs, "retrieve")
    seeds_path = ctx.outputs.side("retrieve", schema.SEEDS_FILE)
    seeds = (
        pq.read_table(seeds_path, columns=[schema.IMAGE_ID, schema.URI, schema.SEED_SET])
        if seeds_path.exists()
        else None
    )
    stats = record.get("stats", {}).get("seed_sets", {})
    names = sorted(set(stats) | set(hits[schema.SEED_SET].to_pylist()))
    if not names:
        return para("no seed sets configured (retrieve.seed_sets is empty)")
    return "".join(_seed_set(ctx, name, hits, seeds, stats.get(name, {})) for name in names)


def _retrieved(outputs: StageInputs, stage: str) -> pa.Table:
    """The retrieve stage's hits (an empty table when no seed set gave any part)."""
    if outputs.parts(stage):
        return outputs.table(stage, columns=RETRIEVE_COLUMNS)
    return pa.table({c: pa.array([], pa.float32() if c == schema.SCORE else pa.string()) for c in RETRIEVE_COLUMNS})


def _seed_set(ctx: Context, name: str, hits: pa.Table, seeds: pa.Table | None, stats: dict[str, Any]) -> str:
    mine = hits.filter(pc.equal(hits[schema.SEED_SET], name))
    mine = mine.sort_by([(schema.SCORE, "descending"), (schema.IMAGE_ID, "ascending")])
    seed_ids = (
        [] if seeds is None else seeds.filter(pc.equal(seeds[schema.SEED_SET], name))[schema.IMAGE_ID].to_pylist()
    )
    method = stats.get("mode") or (mine[schema.METHOD][0].as_py() if mine.num_rows else "")
    head = f"<h3>{esc(name)}</h3>" + para(
        f"{len(seed_ids)} seeds, {mine.num_rows:,} images retrieved" + (f" ({method})" if method else "")
    )
    if mine.num_rows == 0:
        return head + para("nothing retrieved for this set")
    if pc.any(pc.is_valid(mine[schema.SEED_ID])).as_py():
        return head + _per_seed_rows(ctx, mine)
    return head + _set_rows(ctx, mine, seed_ids)


def _per_seed_rows(ctx: Context, hits: pa.Table) -> str:
    """Sample-based: a few seeds, each followed by its best hits."""
    lim = ctx.limits
    seed_ids = sorted({s for s in hits[schema.SEED_ID].to_pylist() if s})[: lim.seeds]
    by_seed: dict[str, list[dict[str, Any]]] = {s: [] for s in seed_ids}
    for r in hits.filter(pc.is_in(hits[schema.SEED_ID], value_set=pa.array(seed_ids, pa.string()))).to_pylist():
        if len(by_seed[r[schema.SEED_ID]]) < lim.hits:  # hits are sorted by score: the first ones are the best
            by_seed[r[schema.SEED_ID]].append(r)
    ctx.uris([*seed_ids, *(r[schema.IMAGE_ID] for rows in by_seed.values() for r in rows)])
    rows = []
    for seed, found in by_seed.items():
        figs = "".join(ctx.figure(r[schema.IMAGE_ID], f"{r[schema.SCORE]:.3f}") for r in found)
        rows.append(
            f'<div class="row">{ctx.figure(seed, "seed", "seed")}<span class="arrow">&rarr;</span>'
            f'<div class="grid">{figs}</div></div>'
        )
    return "".join(rows) + "\n"


def _set_rows(ctx: Context, hits: pa.Table, seed_ids: list[str]) -> str:
    """Cluster-based: the set's seeds, then its best-scoring hits (no single seed stands behind a hit)."""
    lim = ctx.limits
    shown_seeds = seed_ids[: lim.hits]
    top = hits.slice(0, 2 * lim.hits).to_pylist()
    ctx.uris([*shown_seeds, *(r[schema.IMAGE_ID] for r in top)])
    seed_figs = "".join(ctx.figure(s, "seed", "seed") for s in shown_seeds)
    hit_figs = "".join(ctx.figure(r[schema.IMAGE_ID], f"{r[schema.SCORE]:.3f}") for r in top)
    return (
        f'<div class="row"><div class="grid">{seed_figs}</div></div>'
        f"{para(f'top {len(top)} of {hits.num_rows:,} hits by score')}"
        f'<div class="grid">{hit_figs}</div>\n'
    )
