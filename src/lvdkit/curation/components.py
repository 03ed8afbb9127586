"""Duplicate groups from pairwise links: union-find connected components, and a chaining-proof variant.

Plain union-find is transitive: A~B and B~C put A and C together even when they look nothing alike, so one loose
threshold can chain a whole dataset into one "duplicate" group. :func:`star_groups` links an image only to a group's
representative, so every member is within the threshold of the image that is kept.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow as pa
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
