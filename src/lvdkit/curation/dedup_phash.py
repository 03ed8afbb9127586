"""Stage ``dedup_phash``: perceptual near duplicates by PHash Hamming distance, found with a Faiss binary index.

A cheap first pass (the copy-detection dedup does the real near-duplicate work). At distance 0 (the default) equal
hashes are grouped by value. Up to distance 3, pairs come from Faiss's multi-index hashing
(``IndexBinaryMultiHash``): with ``max_distance + 1`` disjoint chunks of the 64 bits, any two hashes within
``max_distance`` agree exactly on at least one chunk (pigeonhole), so recall is exact without comparing all pairs.
Beyond that, chunks are too short to be selective and Faiss's SIMD brute-force range search is faster. Groups are
formed by :func:`lvdkit.curation.components.star_groups` so a loose link can never chain unrelated images together.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from lvdkit.core import schema
from lvdkit.core.faiss_lib import faiss
from lvdkit.core.settings import setting
from lvdkit.core.stage import StageInputs, StageOutput
from lvdkit.core.views import alive, dedups_before
from lvdkit.curation.components import component_sizes, dedup_stats, group, keep_priority, representatives
from lvdkit.curation.dedup_exact import groups_table


@dataclass
class DedupPhashConfig:
    """PHash near-duplicate removal. ``max_distance`` was measured on the demo (see README): keep it small."""

    enabled: bool = True
    # Hamming bits; imagededup's default of 10 merges unrelated low-detail images
    max_distance: int = setting(0, ge=0, le=64)
    # a PHash pair counts only where the two images' DHashes (ingest's, imagededup's) are within this many bits;
    # null: PHash alone. Measured on the demo's 171 PHash pairs (max_distance 0): DHash within 3 bits keeps 142 of
    # the 146 true pairs and 3 of the 25 false ones (two different handwritten 1s or 7s with equal PHashes); on the
    # photo pools 30 of 32 true pairs (the other two: shrink + JPEG 30, DHash 4 bits apart); within 2: 132 and 0; 26
    confirm_dhash: int | None = setting(3, ge=0, le=64)
    grouping: Literal["star", "components"] = "star"  # star: linked to the kept image; components: union-find
    query_chunk: int = setting(65536, ge=1)  # queries per Faiss range search (bounds memory)
    # where it runs: one task ("single") or partitioned over the cluster by hash bands ("partitioned", up to
    # max_distance 3); "auto": partitioned from partition_min_rows images on
    path: Literal["auto", "single", "partitioned"] = "auto"
    partition_min_rows: int = setting(1_000_000, ge=0)
    partition_rows: int = setting(2_000_000, ge=1)  # hash rows per partition task (about 100 bytes each)


def hamming_pairs(hashes: np.ndarray, max_distance: int, chunk: int = 65536) -> tuple[np.ndarray, np.ndarray]:
    """All pairs i < j with Hamming(hashes[i], hashes[j]) <= max_distance, and their distances.

    hashes: [N] uint64. Returns pairs [P, 2] int64 and distances [P] int64.
    """
    hashes = np.ascontiguousarray(hashes, dtype=np.uint64)
    if max_distance == 0:
        return _equal_pairs(hashes)
    codes = hashes.view(np.uint8).reshape(-1, 8)  # [N, 8]: 64 bits as Faiss binary codes
    index = _binary_index(max_distance)
    index.add(codes)
    out_pairs, out_dist = [], []
    for start in range(0, len(codes), chunk):
        lims, dist, ids = index.range_search(codes[start : start + chunk], max_distance + 1)  # radius is exclusive
        queries = start + np.repeat(np.arange(len(lims) - 1), np.diff(lims).astype(np.int64))
        upper = ids > queries
        out_pairs.append(np.stack([queries[upper], ids[upper]], axis=1))
        out_dist.append(dist[upper].astype(np.int64))
    if not out_pairs:
        return np.empty((0, 2), np.int64), np.empty(0, np.int64)
    return np.concatenate(out_pairs).astype(np.int64), np.concatenate(out_dist)


MULTIHASH_MAX_DISTANCE = 3  # up to here chunks have >= 16 bits and hashing beats brute force


def _binary_index(max_distance: int) -> faiss.IndexBinary:
    """Multi-index hashing for small distances; Faiss's SIMD brute force when chunks would get too short.

    With ``max_distance + 1`` chunks of ``64 // (max_distance + 1)`` bits, short chunks match by chance so often that
    the candidates outnumber all pairs (measured: at distance 10, 41.9 s vs 0.57 s brute force on 20k hashes).
    """
    if max_distance <= MULTIHASH_MAX_DISTANCE:
        nhash = max_distance + 1
        return faiss.IndexBinaryMultiHash(64, nhash, 64 // nhash)
    return faiss.IndexBinaryFlat(64)


def _equal_pairs(hashes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Every pair of equal hashes (k*(k-1)/2 per bucket of k)."""
    _, labels = np.unique(hashes, return_inverse=True)
    order = np.argsort(labels, kind="stable")
    bounds = np.flatnonzero(np.diff(labels[order])) + 1
    groups = [g for g in np.split(order, bounds) if len(g) > 1]
    out = [g[np.array(np.triu_indices(len(g), 1)).T] for g in groups]  # [k*(k-1)/2, 2] per bucket
    flat = np.concatenate(out).astype(np.int64) if out else np.empty((0, 2), np.int64)
    return np.sort(flat, axis=1), np.zeros(len(flat), np.int64)


Dhashes = tuple[np.ndarray, np.ndarray]  # DHash values [N] uint64 (0 where unknown) and known [N] bool


def confirmed(pairs: np.ndarray, dhashes: Dhashes | None, max_bits: int | None) -> np.ndarray:
    """Mask [P] of ``pairs`` [P, 2] whose images' DHashes are within ``max_bits``; a pair with an unknown DHash (an
    image ingested before lvdkit computed it) or with no DHashes at all is judged by PHash alone (kept)."""
    if max_bits is None or dhashes is None or not len(pairs):
        return np.ones(len(pairs), bool)
    values, known = dhashes
    bits = _hamming(values[pairs[:, 0]], values[pairs[:, 1]])
    return (bits <= max_bits) | ~(known[pairs[:, 0]] & known[pairs[:, 1]])


def dedup_phash(images: pa.Table, cfg: DedupPhashConfig) -> tuple[pa.Table, dict[str, int]]:
    """``images`` (``image_id``, ``phash``, ``width``, ``height`` of images kept so far; ``dhash`` where
    ``confirm_dhash`` applies) -> dedup rows and stats.

    The kept image of a group is the one with the most pixels (ties: smallest content hash). Images without a PHash
    (no structure at PHash's scale, see ingest's ``phash_min_std``) are never grouped here. A pair of images with
    DHashes more than ``confirm_dhash`` bits apart is not a pair; one whose DHash is unknown (ingested before lvdkit
    computed it) is judged by PHash alone.
    """
    hashed = pc.is_valid(images[schema.PHASH])
    if images.num_rows and not pc.all(hashed).as_py():
        table, stats = dedup_phash(images.filter(hashed), cfg)
        unhashed = images.filter(pc.invert(hashed))
        lone = groups_table(
            unhashed[schema.IMAGE_ID], np.arange(unhashed.num_rows), np.zeros(unhashed.num_rows, np.float32)
        )
        return pa.concat_tables([table, lone]), {**stats, "without_phash": unhashed.num_rows}
    n = images.num_rows
    hashes = images[schema.PHASH].to_numpy(zero_copy_only=False).astype(np.uint64) if n else np.empty(0, np.uint64)
    priority = keep_priority(images)
    if cfg.grouping not in ("star", "components"):
        raise ValueError(f"dedup_phash.grouping={cfg.grouping!r}; valid: 'star', 'components'")
    dhashes = dhashes_of(images, cfg.confirm_dhash)
    if cfg.enabled and n and cfg.max_distance == 0 and (dhashes is None or cfg.grouping == "star"):
        # Equal hashes form cliques, so star and components agree: group by value, no pair list needed (a bucket of
        # k equal hashes has k(k-1)/2 pairs). With DHashes the star rule runs inside each bucket.
        labels = np.unique(hashes, return_inverse=True)[1].ravel()
        if dhashes is None:
            rep = representatives(labels, priority)
        else:
            rep = _star_within(labels, dhashes, cfg.confirm_dhash, priority)
        sizes = np.bincount(labels)
        n_pairs = int((sizes * (sizes - 1) // 2).sum())
    else:
        pairs = hamming_pairs(hashes, cfg.max_distance, cfg.query_chunk)[0] if cfg.enabled and n else np.empty((0, 2))
        n_pairs = len(pairs)
        rep = group(n, pairs[confirmed(pairs, dhashes, cfg.confirm_dhash)], priority, cfg.grouping)
    distance = _distance_to_rep(hashes, rep)
    sizes = component_sizes(rep) if n else np.zeros(1, np.int64)
    stats = {"pairs": n_pairs, "groups_with_duplicates": int((sizes > 1).sum()), "largest_group": int(sizes.max())}
    return groups_table(images[schema.IMAGE_ID], rep, distance.astype(np.float32)), stats


def _star_within(labels: np.ndarray, dhashes: Dhashes, max_bits: int | None, priority: np.ndarray) -> np.ndarray:
    """:func:`~lvdkit.curation.components.star_groups` over the pairs of equal ``labels`` (PHash buckets) that
    :func:`confirmed` keeps, without listing them: best priority first, an unassigned image becomes a representative
    and claims the unassigned images of its bucket whose DHash is within ``max_bits`` (or unknown). Memory O(N); time
    O(bucket x representatives in it)."""
    order = np.lexsort((np.arange(len(labels)), priority, labels))  # by bucket, best first
    bounds = np.flatnonzero(np.diff(labels[order])) + 1
    rep = np.arange(len(labels), dtype=np.int64)
    for bucket in np.split(order, bounds):
        free = bucket
        while len(free) > 1:
            head, rest = free[0], free[1:]
            pair = np.stack([np.full(len(rest), head), rest], axis=1)
            joined = confirmed(pair, dhashes, max_bits)
            rep[rest[joined]] = head
            free = rest[~joined]
    return rep


def dhashes_of(images: pa.Table, max_bits: int | None) -> Dhashes | None:
    """``images``' DHashes for :func:`confirmed`, or None where confirmation is off or no DHash is known."""
    if max_bits is None or schema.DHASH not in images.column_names:
        return None
    column = images[schema.DHASH]
    if column.null_count == len(column):
        return None
    known = pc.is_valid(column).to_numpy(zero_copy_only=False)
    return pc.fill_null(column, 0).to_numpy(zero_copy_only=False).astype(np.uint64), known


def _distance_to_rep(hashes: np.ndarray, rep: np.ndarray) -> np.ndarray:
    """Hamming distance of each hash to its representative's hash."""
    if not len(hashes):
        return np.empty(0, np.int64)
    return _hamming(hashes, hashes[rep])


def _hamming(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Bits that differ between 64-bit hashes ``a`` and ``b`` [N] uint64 -> [N]."""
    return np.unpackbits(np.bitwise_xor(a, b).view(np.uint8).reshape(-1, 8), axis=1).sum(axis=1)


def run_dedup_phash(cfg: DedupPhashConfig, inputs: StageInputs) -> StageOutput:
    """The stage: images that survived exact dedup, grouped by PHash distance."""
    columns = [schema.PHASH, schema.DHASH, schema.WIDTH, schema.HEIGHT, schema.CONTENT_HASH]
    images = alive(inputs, dedups_before("dedup_phash"), columns)
    table, stats = dedup_phash(images, cfg)
    return StageOutput(table, dedup_stats(table, stats))
