"""Duplicate groups from pairwise links: union-find connected components, and a chaining-proof variant.

Plain union-find is transitive: A~B and B~C put A and C together even when they look nothing alike, so one loose
threshold can chain a whole dataset into one "duplicate" group. :func:`star_groups` links an image only to a group's
representative, so every member is within the threshold of the image that is kept.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import scipy.sparse as sp
from scipy.sparse.csgraph import connected_components as _scipy_components

from lvdkit.core import schema


def connected_components(n: int, pairs: np.ndarray) -> np.ndarray:
    """Component label (0..C-1) of each of ``n`` nodes linked by ``pairs`` ([P, 2] int) ; union-find semantics."""
    pairs = np.asarray(pairs, dtype=np.int64).reshape(-1, 2)
    if not len(pairs):
        return np.arange(n, dtype=np.int64)
    graph = sp.coo_matrix((np.ones(len(pairs), dtype=np.int8), (pairs[:, 0], pairs[:, 1])), shape=(n, n))
    _, labels = _scipy_components(graph, directed=False)
    return labels.astype(np.int64)


def star_groups(n: int, pairs: np.ndarray, priority: np.ndarray) -> np.ndarray:
    """Group ``n`` nodes so each joins a representative it is directly linked to; returns each node's representative.

    Nodes are visited best ``priority`` first (lowest value first, ties by index). An unassigned node becomes a
    representative and claims its unassigned neighbours. So the kept image of a group is its best member and every
    member is linked to it directly: no chains.
    """
    pairs = np.asarray(pairs, dtype=np.int64).reshape(-1, 2)
    rep = np.full(n, -1, dtype=np.int64)
    if not len(pairs):
        return np.arange(n, dtype=np.int64)
    both = np.concatenate([pairs, pairs[:, ::-1]])
    adj = sp.csr_matrix((np.ones(len(both), dtype=np.int8), (both[:, 0], both[:, 1])), shape=(n, n))
    for node in np.lexsort((np.arange(n), priority)):
        if rep[node] != -1:
            continue
        rep[node] = node
        nbrs = adj.indices[adj.indptr[node] : adj.indptr[node + 1]]
        free = nbrs[rep[nbrs] == -1]
        rep[free] = node
    return rep


def representatives(labels: np.ndarray, priority: np.ndarray) -> np.ndarray:
    """For component ``labels``, the index of each node's component member with the best (lowest) ``priority``."""
    order = np.lexsort((np.arange(len(labels)), priority, labels))  # by component, then priority, then index
    first = np.ones(len(order), dtype=bool)
    first[1:] = labels[order][1:] != labels[order][:-1]
    best_of_label = np.empty(labels.max() + 1 if len(labels) else 0, dtype=np.int64)
    best_of_label[labels[order][first]] = order[first]
    return best_of_label[labels]


def component_sizes(rep: np.ndarray) -> np.ndarray:
    """Size of each group, as a count per representative (groups of one included)."""
    return np.bincount(np.unique(rep, return_inverse=True)[1])


def keep_priority(images: pa.Table) -> np.ndarray:
    """Which image of a group to keep: rank 0 is best. Most pixels first (``width * height``), then the smallest
    content hash (when ``images`` has one), then the smallest id.

    Ties are broken by content, not by ``image_id`` (a hash of the absolute path), so the same pool gives the same
    decisions wherever it lies: a copy of the data in another folder, another machine's mount point.
    """
    n = images.num_rows
    if n == 0:
        return np.empty(0, np.int64)
    width = images[schema.WIDTH].to_numpy(zero_copy_only=False).astype(np.int64)
    pixels = width * images[schema.HEIGHT].to_numpy(zero_copy_only=False).astype(np.int64)
    ids = images[schema.IMAGE_ID].to_numpy(zero_copy_only=False)
    keys = [ids]
    if schema.CONTENT_HASH in images.column_names:
        keys.append(images[schema.CONTENT_HASH].fill_null("").to_numpy(zero_copy_only=False))
    order = np.lexsort((*keys, -pixels))
    rank = np.empty(n, dtype=np.int64)
    rank[order] = np.arange(n)
    return rank


def group(n: int, pairs: np.ndarray, priority: np.ndarray, grouping: str) -> np.ndarray:
    """Each node's representative under ``grouping``: 'star' (:func:`star_groups`) or 'components' (union-find)."""
    if grouping == "star":
        return star_groups(n, pairs, priority)
    if grouping == "components":
        return representatives(connected_components(n, pairs), priority)
    raise ValueError(f"grouping={grouping!r}; valid: 'star', 'components'")


def dedup_stats(table: pa.Table, extra: dict[str, Any]) -> dict[str, Any]:
    """A dedup stage's summary: images in, kept, duplicates, plus the stage's own figures."""
    kept = int(np.count_nonzero(table[schema.KEEP].to_numpy(zero_copy_only=False))) if table.num_rows else 0
    return {"in": table.num_rows, "kept": kept, "duplicates": table.num_rows - kept, **extra}


# --- groups from pairs found piecewise (partitioned stages) -----------------------------------------------------------

NODE_COLUMNS = [schema.IMAGE_ID, schema.WIDTH, schema.HEIGHT, schema.CONTENT_HASH]  # what ranks an image for keeping


def found_pairs(a: pa.Table, b: pa.Table, a_key: Any, b_key: Any, distance: np.ndarray) -> pa.Table:
    """Pairs found in one piece of a partitioned stage: both images' keys and ranking columns (``a``, ``b``: rows
    with :data:`NODE_COLUMNS`) and each pair's distance (what a duplicate's dedup row records)."""
    cols: dict[str, Any] = {"a_key": a_key, "b_key": b_key, schema.DISTANCE: pa.array(distance, pa.float32())}
    for side, t in (("a_", a), ("b_", b)):
        for name in NODE_COLUMNS:
            cols[side + name] = t[name]
    return pa.table(cols)


def group_found(found: pa.Table | None, n: int) -> tuple[pa.Table, dict[str, Any]]:
    """Pairs from :func:`found_pairs` (some found twice) -> the duplicates' dedup rows, and the stage's figures.

    Only images in a pair are ranked and grouped; every other image of the ``n`` is its own group. The star rule
    visits them by the same priority as a single task over the whole pool would, so the groups are the same.
    """
    if found is None or found.num_rows == 0:
        one = 1 if n else 0
        stats = {"pairs": 0, "groups_with_duplicates": 0, "largest_group": one, "largest_union_find_component": one}
        return schema.DEDUP.empty_table(), {"in": n, "kept": n, "duplicates": 0, **stats}
    a, b = found["a_key"].to_numpy(), found["b_key"].to_numpy()
    _, first = np.unique(np.stack([np.minimum(a, b), np.maximum(a, b)], axis=1), axis=0, return_index=True)
    found = found.take(pa.array(np.sort(first)))
    keys, inverse = np.unique(
        np.concatenate([found["a_key"].to_numpy(), found["b_key"].to_numpy()]), return_inverse=True
    )
    sides = [found.select([s + c for c in NODE_COLUMNS]).rename_columns(NODE_COLUMNS) for s in ("a_", "b_")]
    _, first_of = np.unique(inverse, return_index=True)
    nodes = pa.concat_tables(sides).take(pa.array(first_of))  # one row per key, in key order
    pairs = inverse.reshape(2, -1).T  # [P, 2] local node indices
    rep = star_groups(len(keys), pairs, keep_priority(nodes))
    lo, hi = pairs.min(axis=1), pairs.max(axis=1)
    dist = dict(zip(zip(lo.tolist(), hi.tolist(), strict=True), found[schema.DISTANCE].to_pylist(), strict=True))
    dup = np.flatnonzero(rep != np.arange(len(keys)))
    ids = np.asarray(nodes[schema.IMAGE_ID].to_numpy(zero_copy_only=False), dtype=object)
    distance = [dist[(min(int(i), int(rep[i])), max(int(i), int(rep[i])))] for i in dup]
    decisions = pa.table(
        {
            schema.IMAGE_ID: pa.array(ids[dup], pa.string()),
            schema.GROUP_ID: pa.array(ids[rep[dup]], pa.string()),
            schema.KEEP: pa.array(np.zeros(len(dup), bool)),
            schema.DUP_OF: pa.array(ids[rep[dup]], pa.string()),
            schema.DISTANCE: pa.array(distance, pa.float32()),
        },
        schema=schema.DEDUP,
    )
    sizes = component_sizes(rep)
    stats = {
        "in": n,
        "kept": n - len(dup),
        "duplicates": len(dup),
        "pairs": len(pairs),
        "groups_with_duplicates": int((sizes > 1).sum()),
        "largest_group": int(sizes.max()),
        "largest_union_find_component": int(component_sizes(connected_components(len(keys), pairs)).max()),
    }
    return decisions, stats


def dedup_rows(ids: pa.ChunkedArray | pa.Array, decisions: pa.Table) -> pa.Table:
    """One dedup row per image of ``ids``: as ``decisions`` says where it names the image, else kept alone."""
    at = pc.index_in(ids, value_set=decisions[schema.IMAGE_ID])
    hit = pc.is_valid(at).to_numpy(zero_copy_only=False)
    mine = decisions.take(pc.drop_null(at))
    group = np.asarray(ids.to_numpy(zero_copy_only=False), dtype=object)
    dup_of = np.full(len(group), None, dtype=object)
    distance = np.zeros(len(group), np.float32)
    keep = np.ones(len(group), dtype=bool)
    group[hit] = mine[schema.GROUP_ID].to_numpy(zero_copy_only=False)
    dup_of[hit] = mine[schema.DUP_OF].to_numpy(zero_copy_only=False)
    distance[hit] = mine[schema.DISTANCE].to_numpy(zero_copy_only=False)
    keep[hit] = mine[schema.KEEP].to_numpy(zero_copy_only=False)
    return pa.table(
        {
            schema.IMAGE_ID: ids,
            schema.GROUP_ID: pa.array(group, pa.string()),
            schema.KEEP: pa.array(keep),
            schema.DUP_OF: pa.array(dup_of, pa.string()),
            schema.DISTANCE: pa.array(distance),
        },
        schema=schema.DEDUP,
    )
