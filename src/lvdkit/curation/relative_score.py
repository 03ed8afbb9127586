"""How much a pool image looks like a copy of one protected image rather than like protected images in general.

Raw similarity to the nearest protected image fails on low-detail pools: a handwritten 1 is as similar to many
held-out 1s as an edited copy is to its source (measured on the demo: 95% of the leaked copies caught only with 3% of
the clean pool removed). The margin score asks whether the best match stands out:

    margin(x) = sim(x, best protected match) - sim(x, best protected image outside the best match's copy group)

(the group: protected images that are copies of each other, so that a leak of an image the evaluation set holds
twice still stands out). A copy stands far above its source's neighbours; a clean image of a common look does not
(the demo: 95% of the leaks at 0.8% of the clean pool). This is Lowe's ratio test in margin form, and close to
SSCD's score normalisation against a background set.

How many clean images a threshold removes is estimated on decoys: a sample of the pool standing in for the
protected set (``decoys``, as many images as it holds) and another sample scored against it (``probes``): the
probes' margins against the decoys are distributed as clean pool images' margins against a protected set of that
size drawn from a pool like this one. Where self-dedup left copies in the pool the decoys' own copies are among the
probes and the estimate runs high (photo pools with most copies surviving: 80-90% of the probes above the budget's
threshold were copies of their decoy or other parts of its photograph; 1% estimated where 0-0.1% were removed).
So the budget is also measured on the pool's own scores: the probes (a uniform sample of the pool) scored against
the protected set itself. Whatever the pool holds, a threshold with ``max_removed`` of them above it removes about
that share of the pool, leaks included, so no more clean images than that (up to the sample's error).
One draw's estimate moves with the draw (about +-0.2 points at 1% on the demo), so it is drawn several times and
the budget bounds one more draw, the pool against the protected set (``relative_rule.budget_threshold``).

The margin's reference can also be taken partly from the pool (``background``): an image's similarity to the nearest
image of a background set (a hash-drawn sample of the pool, the decoys left out) that is neither itself nor a copy
of it. This is SSCD's score normalisation with the pool as the background set: a photograph among many like it (its
own other shots, its surviving copies) scores low against anything; a leak rarely has such company. With the pool
alone as reference a leak that the pool holds twice hides behind its twin, so the two references are mixed
(``weight``: photo leak pools of 1,000 and 5,000, 57 -> 61 of 64 leaks each; the demo 39 of 40 either way, with
57 clean images removed instead of 48).
"""

from __future__ import annotations

import hashlib

import numpy as np

from lvdkit.core.partitions import top_against
from lvdkit.curation.components import connected_components

NEIGHBOURS = 8  # protected matches looked at for the best one outside the best match's group
NO_MATCH = -1.0  # the second similarity where no protected image lies outside the best match's group
SELF = 0.9999  # a background image at least this similar to a query is the query itself (or an exact copy)
# background images looked at for the nearest that is neither the query nor a copy of it (nor, for a decoy draw's
# probes, one of that draw's decoys: about protected/pool of the background)
BACKGROUND_NEIGHBOURS = 16


def copy_groups(x: np.ndarray, threshold: float | None) -> np.ndarray:
    """Group ids [P] of protected images x [P, D] (whitened): connected components of pairs above ``threshold``
    (none: every image its own group)."""
    n = len(x)
    if threshold is None or n < 2:
        return np.arange(n, dtype=np.int64)
    sims, nn = top_against(x, x, np.arange(n, dtype=np.int64), min(NEIGHBOURS, n))
    rows = np.repeat(np.arange(n), nn.shape[1])
    keep = (sims.ravel() > threshold) & (nn.ravel() >= 0) & (nn.ravel() != rows)
    pairs = np.stack([rows[keep], nn.ravel()[keep]], axis=1)
    return connected_components(n, pairs).astype(np.int64)


def margins(
    queries: np.ndarray, protected: np.ndarray, groups: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Score queries [N, D] against protected [P, D] (both whitened, L2-normalised) with groups [P].

    Returns (best similarity [N], best match's index [N], margin [N]); with no protected image the best
    similarity is -1 and the margin 0."""
    n = len(queries)
    if n == 0 or len(protected) == 0:
        return np.full(n, -1.0, np.float32), np.zeros(n, np.int64), np.zeros(n, np.float32)
    sims, nn = top_against(queries, protected, np.arange(len(protected), dtype=np.int64), NEIGHBOURS)
    best_group = groups[nn[:, 0]]
    other = (nn >= 0) & (groups[np.maximum(nn, 0)] != best_group[:, None])  # [N, k]
    # none among the neighbours: when they were every protected image there is none at all (NO_MATCH), else the
    # last neighbour bounds it from above (a lower bound of the margin)
    none = NO_MATCH if len(protected) <= NEIGHBOURS else _last_finite(sims)
    second = np.where(other.any(axis=1), _first_where(sims, other), none)
    margin = sims[:, 0] - second
    return sims[:, 0].astype(np.float32), nn[:, 0], margin.astype(np.float32)


def nearest_background(
    queries: np.ndarray, background: np.ndarray, copy_threshold: float | None, excluded: np.ndarray | None = None
) -> np.ndarray:
    """Per query [N, D]: the similarity to its most similar image of ``background`` [B, D] (both whitened, unit
    rows) that is neither itself nor a copy of it (similar above ``copy_threshold``, dedup_copy's). NaN where there
    is none among its nearest ``BACKGROUND_NEIGHBOURS`` (or no background): the score falls back to the plain margin
    there. ``excluded``: [K, B] bool, K background sets in one search (each leaves out its rows): [K, N]."""
    if not len(background):
        empty = np.full((len(queries),), np.nan, np.float32)
        return empty if excluded is None else np.tile(empty, (len(excluded), 1))
    sims, nn = top_against(queries, background, np.arange(len(background), dtype=np.int64), BACKGROUND_NEIGHBOURS)
    limit = SELF if copy_threshold is None else min(copy_threshold, SELF)
    distinct = (nn >= 0) & (sims < limit)
    if excluded is None:
        return _nearest(sims, distinct)
    return np.stack([_nearest(sims, distinct & ~leave[np.maximum(nn, 0)]) for leave in excluded])


def _nearest(sims: np.ndarray, usable: np.ndarray) -> np.ndarray:
    if not len(sims):
        return np.empty(0, np.float32)
    return np.where(usable.any(axis=1), _first_where(sims, usable), np.nan).astype(np.float32)


def background_margins(sim: np.ndarray, margin: np.ndarray, background: np.ndarray, weight: float) -> np.ndarray:
    """The margin [N] with ``weight`` of its reference taken from the pool:

        sim - (1 - weight) * sim(best protected image outside the match's group) - weight * background

    (``background`` [N] from :func:`nearest_background`; NaN: the plain margin)."""
    second = sim - margin
    reference = (1.0 - weight) * second + weight * background
    return np.where(np.isnan(background), margin, sim - reference).astype(np.float32)


def _first_where(sims: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """sims[i, j] at the first j where mask[i, j] (rows are sorted by similarity, so: the largest such)."""
    j = np.argmax(mask, axis=1)
    return sims[np.arange(len(sims)), j]


def _last_finite(sims: np.ndarray) -> np.ndarray:
    """The smallest listed similarity per row (rows list more neighbours than one)."""
    return np.where(np.isfinite(sims), sims, np.inf).min(axis=1)


def in_sample(ids: list[str], rate: float, salt: str) -> np.ndarray:
    """A deterministic sample [N] bool of ``rate`` of the images, by a hash of their ids (the same images whichever
    task or path looks)."""
    out = np.zeros(len(ids), bool)
    if rate <= 0:
        return out
    bound = min(rate, 1.0) * 2**64
    for i, image_id in enumerate(ids):
        h = hashlib.blake2b(f"{salt}:{image_id}".encode(), digest_size=8).digest()
        out[i] = int.from_bytes(h, "little") < bound
    return out


def sample_rates(n_pool: int, n_protected: int, n_probes: int, n_background: int = 0) -> tuple[float, float, float]:
    """Sampling rates (decoys, probes, background) for a pool of ``n_pool`` images: as many decoys as protected
    images (at most half the pool), ``n_probes`` probes and ``n_background`` background images among the rest
    (fewer where the pool is small)."""
    if n_pool <= 1 or n_protected == 0:
        return 0.0, 0.0, 0.0
    decoys = min(n_protected / n_pool, 0.5)
    rest = n_pool * (1.0 - decoys)
    return decoys, min(1.0, n_probes / rest), min(1.0, n_background / rest)
