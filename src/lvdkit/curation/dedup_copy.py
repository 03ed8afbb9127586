"""Stage ``dedup_copy``: LVD self-deduplication on copy-detection descriptors (DINOv2 paper, appendix A).

k nearest neighbours (k=64) of every image, an edge where cosine similarity exceeds a threshold, groups, one image
kept per group. Two things the paper's recipe leaves out, because thresholds do not transfer across domains:

- descriptors are post-processed as SSCD's authors recommend: PCA whitening (or centering) fitted on a sample of
  this pool, then L2 normalisation;
- the threshold is calibrated on this pool: synthetic copies of its images (eight edit families, see
  :mod:`lvdkit.curation.augment`) give the similarities of true copies; each image's second most similar other
  image gives the similarities of distinct images (the most similar one is often a real copy in a raw pool, which
  would make every copy look like a false match; an image rarely has two copies, so its second neighbour is almost
  always distinct, at the price of underestimating false matches); on pools large and clean enough that most
  images' best match is a distinct image, also an extreme-value law fitted to the bulk of those best matches (the
  best of many distinct similarities, extrapolated into the tail: it sees the isolated look-alike pairs that a
  second neighbour cannot), and the higher of the two false-match rates counts; the lowest threshold whose estimated
  precision meets ``target_precision`` is used, and the estimates (overall and per edit family) are recorded, with
  warnings where the measured benchmarks showed them to be unreliable.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from lvdkit.core import schema
from lvdkit.core.knn import IndexKind, best_per_owner, build_index, knn, pairs_above
from lvdkit.core.settings import setting
from lvdkit.core.stage import StageInputs, StageOutput
from lvdkit.core.views import alive, calibration_copies, dedups_before, embeddings_of, rotated_views
from lvdkit.core.whitening import Whitener, fit_whitener
from lvdkit.curation.components import component_sizes, connected_components, dedup_stats, group, keep_priority
from lvdkit.curation.dedup_exact import groups_table
from lvdkit.curation.extreme_tail import TAIL_HI, distinct_tail, gev_sf

WhitenMode = Literal["none", "center", "pca"]
# the fitted false-match tail (calibrate): quantiles of the best matches it is fitted to run up to TAIL_HI and below
# the top 2 pi; none is fitted where pi exceeds TAIL_MAX_PREVALENCE (too little of the pool left below its copies)
TAIL_MAX_PREVALENCE = 0.35


@dataclass
class DedupCopyConfig:
    """Copy-detection self-dedup. ``threshold: null`` calibrates it on the pool (see module docstring)."""

    enabled: bool = True
    embedding: str = "copy"  # which embed model's descriptors (a key of embed.models)
    k: int = setting(64, ge=1)  # neighbours per image (LVD: 64)
    threshold: float | None = setting(None, ge=-1, le=1)  # cosine after post-processing; null = calibrate
    # calibration: lowest threshold whose estimated precision reaches this
    target_precision: float = setting(0.95, gt=0, le=1)
    # calibration negatives: each image's rank-th most similar other image (see docstring)
    negative_rank: int = setting(2, ge=1)
    # false matches also from an extreme-value law fitted to the best matches (see calibrate), on pools of at least
    # reliable_min_images where at most 35% of the images seem to have a copy. Measured (bench/copy_calibration.py):
    # on the demo, second neighbours alone estimated precision 0.95 where it was 0.855; with the tail, 0.931
    tail_fit: bool = True
    # floor for a calibrated threshold: tiny pools or useless descriptors calibrate badly
    min_threshold: float = setting(0.4, ge=-1, le=1)
    whiten: WhitenMode = "pca"
    whiten_dims: int = setting(256, ge=1)
    whiten_sample: int = setting(100_000, ge=2)  # images the whitening is fitted on
    # pca needs at least this many sample descriptors per output dimension, else the descriptors are only centred
    # (the record says so): PCA on too few descriptors whitens noise. Measured (bench/whitening_rule.py, demo, SSCD,
    # 256 dims): at 0.8 and 1.2 per dim pca found 0.00 and 0.21 of the copies; from 2.0 it beat centering and raw
    # descriptors (0.80-0.87 recall at 0.86-0.98 precision). Below it raw SSCD descriptors edged centering on
    # precision, but raw descriptors with a common offset (a random-init CNN's) put every pair above 0.99: centering
    # is the fallback that holds for both.
    whiten_min_per_dim: float = setting(2.0, ge=0)
    grouping: Literal["star", "components"] = "star"  # star: every member linked to the kept image (no chains)
    index: IndexKind = "auto"  # auto: exact flat index up to flat_max images, IVF above
    # measured: exact search of 100k x 512 took 384 s on 2 cores; IVF is far faster
    flat_max: int = setting(50_000, ge=1)
    nprobe: int = setting(16, ge=1)
    seed: int = 0
    # where it runs: one task over the pool ("single"), or partitioned over the cluster by k-means cells
    # ("partitioned", lvdkit.curation.copy_partitioned); "auto": partitioned from partition_min_rows images on
    path: Literal["auto", "single", "partitioned"] = "auto"
    # measured (bench/scale_curation.py, 256 dims, 2 cores): single task 0.72x the partitioned time at 250k, 1.00x at
    # 500k, 1.42x at 1M (and 3 / 6 GiB in one task at 500k / 1M, against about 1 GiB per partitioned task)
    partition_min_rows: int = setting(500_000, ge=0)
    # cells each descriptor joins: neighbours across a cell border meet in another. Measured (bench/scale_curation.py,
    # 250k x 256, partitions of 50k): planted-copy recall against exact k-NN 0.978 with 2, 0.995 with 3 (+22% time)
    cell_copies: int = setting(3, ge=1)
    cell_rows: int = setting(12_500, ge=1)  # k-means cells: about pool rows x cell_copies / cell_rows of them
    # rows per partition task (its exact k-NN): the memory bound, and the cost per row (a partition's exact k-NN is
    # one matrix product, so a row costs partition_rows x dims). Measured (bench/scale_curation.py, 1M x 256, cells
    # of 12.5k, 2 cores): 50k partitions 727 s, recall 0.9992; 25k 465 s (0.64x), recall 0.9991; a pair is found
    # when its two images share a cell, and a partition of two cells still holds every cell whole
    partition_rows: int = setting(25_000, ge=2)
    # partitions one solve task reads at once (one read of every scatter table for their cells; each partition is
    # still solved alone, so the pairs are the same): a read pays per scatter table, and there is one per embed part.
    # Measured (4M x 256, 80 scatter tables): 664 one-partition solves spent 1,110 of 3,726 task-s reading; reading
    # 8 partitions' cells costs what reading 1 did. Fewer per task when that would leave under solve_tasks_min tasks
    solve_partitions: int = setting(8, ge=1)
    solve_tasks_min: int = setting(64, ge=1)
    calibration_queries: int = setting(20_000, ge=2)  # images whose exact neighbours calibrate the threshold
    # below this pool size, or above this estimated share of images with a copy, the run warns that the calibration's
    # estimates are unreliable (measured: bench/photo_copies.py)
    reliable_min_images: int = setting(1000, ge=0)
    reliable_max_prevalence: float = setting(0.2, ge=0, le=1)
    # the estimated recall is an even mix of the edit families'; a pool's copies come in its own mix, so where the
    # families' recalls spread wider than this the overall figure is only a midpoint and the run says so (measured:
    # the demo 0.15-1.00 with 0.50 estimated against 0.90 found; photos of 5,000 0.00-0.80, 0.26 against 0.17)
    reliable_max_recall_spread: float = setting(0.1, ge=0, le=1)
    task_cpus: float = setting(1.0, gt=0)  # CPUs per partitioned task (Faiss threads match them)
    task_memory_mb: int | None = setting(None, ge=64)  # memory Ray reserves per task; null: from partition_rows


@dataclass
class Calibration:
    """The threshold applied and what it is estimated to do on this pool (all estimates at that threshold)."""

    threshold: float  # applied: the calibrated one, or min_threshold when that is higher
    precision: float  # estimated fraction of removed images that really are copies
    recall: float  # estimated fraction of copies found (from the synthetic copies)
    prevalence: float  # estimated fraction of images that have a copy in the pool
    false_match_rate: float  # estimated fraction of images whose best distinct match exceeds the threshold
    positives: int
    negatives: int
    calibrated: float = float("nan")  # the lowest threshold reaching target_precision, before the floor
    recall_by_edit: dict[str, float] = field(default_factory=dict)  # estimated recall per synthetic edit family
    # the two false-match rates at the threshold (false_match_rate is the higher): second neighbours above it, and
    # the extreme-value law fitted to the best matches (None where not fitted: a small pool, many images with a copy)
    false_match_second: float = float("nan")
    false_match_tail: float | None = None
    tail_location: float | None = None
    tail_scale: float | None = None
    tail_shape: float | None = None


def calibrate(
    pos: np.ndarray,
    neg: np.ndarray,
    best: np.ndarray,
    target_precision: float,
    min_threshold: float = -1.0,
    edits: np.ndarray | None = None,
    tail_min_images: int = 1000,
    tail_max_prevalence: float = TAIL_MAX_PREVALENCE,
    prevalence: float | None = None,
) -> Calibration:
    """Lowest threshold t (not below ``min_threshold``) whose estimated precision reaches ``target_precision`` (a pair
    is a copy when sim > t), with the estimates at that t.

    best: [N] each image's highest similarity to another image; M(t), the fraction above t, is the observed match
    rate, copies and false matches together.
    neg: [N] each image's similarity to a (second-nearest, almost surely) distinct image; F2(t), the fraction above t,
    estimates the false matches of images with several look-alikes.
    pos: [P] similarities of synthetic copies to their sources; R(t), the fraction above t, is the recall.
    edits: [P] the edit family of each synthetic copy (recall is then also estimated per family).
    Prevalence of copies: pi = M(t0) / R(t0) at t0 = max(neg), a level distinct images essentially never reach.
    False matches F(t): the higher of F2(t) and, where N >= ``tail_min_images`` and pi <= ``tail_max_prevalence``,
    the tail of an extreme-value law fitted to the bulk of ``best`` below its top 2 pi (:func:`distinct_tail`: there
    the best match is a distinct image's). A second neighbour misses look-alikes that come in pairs (on the demo,
    two nearly identical handwritten 1s: F2 0.0034 where 0.0101 of the images matched a distinct one); the fitted tail
    sees them.
    Precision: the lower of 1 - F(t) / M(t) and pi R(t) / M(t). Each alone was optimistic somewhere: the second on
    the photo benchmark and the demo (synthetic copies harder or easier than the pool's own bias pi through R(t0)),
    the first on pools where an image's second neighbour is well below its first distinct one.
    prevalence: pi estimated elsewhere (``dedup_copy`` with views: on the plain descriptors), used instead.
    """
    if not len(pos) or not len(neg) or not len(best):
        raise ValueError("calibration needs synthetic copies and at least two images")
    pos_s, neg_s, best_s = np.sort(pos), np.sort(neg), np.sort(best)
    t0 = float(neg_s[-1])
    r0 = float(_above(pos_s, t0))
    m0 = float(_above(best_s, t0))  # matched where no second neighbour reaches: copies, a lower bound on their share
    pi = float(np.clip(m0 / r0, 1e-4, 1.0)) if r0 > 0 else 1e-4
    if prevalence is not None:
        pi = prevalence
    share = max(pi, m0)  # pi is floored at 1e-4 where no synthetic copy reaches t0
    finite = best[np.isfinite(best)]  # a padded neighbour list has -inf
    tail = None
    if len(finite) >= tail_min_images and share <= tail_max_prevalence:
        tail = distinct_tail(finite, hi=min(TAIL_HI, 1.0 - 2.0 * share), above=m0)

    def false_rate(t: np.ndarray) -> np.ndarray:
        second = _above(neg_s, t)
        return second if tail is None else np.maximum(second, (1.0 - m0) * gev_sf(t, *tail))

    cands = np.unique(np.concatenate([pos_s, best_s]))
    precision = _precision(cands, pos_s, false_rate(cands), best_s, pi)
    ok = np.nonzero((precision >= target_precision) & (_above(pos_s, cands) > 0))[0]
    chosen = float(cands[int(ok[0])]) if len(ok) else t0  # none: give up at the distinct images' top (and warn)
    t = max(chosen, min_threshold)
    at = np.array([t])
    by_edit = {}
    if edits is not None:
        by_edit = {str(e): float(np.mean(pos[edits == e] > t)) for e in np.unique(edits)}
    false_at = false_rate(at)
    est = float(_precision(at, pos_s, false_at, best_s, pi)[0])
    second = float(_above(neg_s, t))
    fitted = (None,) * 4 if tail is None else (float((1.0 - m0) * gev_sf(at, *tail)[0]), *tail)
    false = min(float(false_at[0]), float(_above(best_s, t)))  # no more false matches than matches
    return Calibration(
        t, est, float(_above(pos_s, t)), pi, false, len(pos), len(neg), chosen, by_edit, second, *fitted,
    )  # fmt: skip


def _above(sorted_x: np.ndarray, t: np.ndarray | float) -> np.ndarray:
    """The fraction of ``sorted_x`` above each ``t``."""
    return 1.0 - np.searchsorted(sorted_x, t, side="right") / len(sorted_x)


def _precision(t: np.ndarray, pos_s: np.ndarray, false: np.ndarray, best_s: np.ndarray, pi: float) -> np.ndarray:
    """Estimated precision at thresholds ``t`` [T] from sorted similarities and the false-match rates ``false`` [T]
    there: the lower of 1 - F(t) / M(t) and pi R(t) / M(t) (true matches from the synthetic copies)."""
    matched, recall = _above(best_s, t), _above(pos_s, t)
    from_false = 1.0 - np.minimum(false, matched) / np.maximum(matched, 1e-12)
    from_copies = np.minimum(1.0, pi * recall / np.maximum(matched, 1e-12))
    return np.where(matched > 0, np.minimum(from_false, from_copies), 1.0)


def nearest_other(sims: np.ndarray, ids: np.ndarray, rank: int = 1) -> np.ndarray:
    """Per row of a self-search: the ``rank``-th highest similarity to an image other than itself. [N, k] -> [N]."""
    rows = np.arange(len(ids))[:, None]
    masked = np.where((ids != rows) & (ids >= 0), sims, -np.inf)
    return -np.sort(-masked, axis=1)[:, rank - 1]


def dedup_copy(
    images: pa.Table,
    embeddings: np.ndarray,
    calib_source: np.ndarray,
    calib_embeddings: np.ndarray,
    cfg: DedupCopyConfig,
    calib_edits: np.ndarray | None = None,
    views: np.ndarray | None = None,
) -> tuple[pa.Table, dict[str, Any], Whitener]:
    """Self-dedup ``images`` (``image_id``, ``width``, ``height``) on ``embeddings`` [N, D].

    calib_source: [C] row index (into ``images``) of each synthetic copy; calib_embeddings: [C, D] their descriptors;
    calib_edits: [C] their edit families (for the per-family recall estimate).
    views: [A, N, D] descriptors of each image turned by each of ``embed.copy_views``: they join the index, and a
    pair's similarity is the best over either image's views (:func:`search_views`).
    Returns dedup rows (schema.DEDUP, distance = 1 - cosine to the kept image), stats and the fitted whitener.
    """
    n = images.num_rows
    rng = np.random.default_rng(cfg.seed)
    sample = embeddings[rng.choice(n, size=min(n, cfg.whiten_sample), replace=False)] if n else embeddings
    mode, why = whitening_mode(cfg, len(sample))
    whitener = fit_whitener(sample, mode, cfg.whiten_dims)
    if not cfg.enabled or n < 2:
        return groups_table(images[schema.IMAGE_ID], np.arange(n), np.zeros(n, np.float32)), {}, whitener
    x = whitener(embeddings)  # [N, D_out], unit rows
    sims, ids = knn(build_index(x, cfg.index, cfg.flat_max, cfg.nprobe, cfg.seed), x, cfg.k + 1)  # +1: itself
    slabs = [x] + ([whitener(v) for v in views] if views is not None else [])
    plain = sims, ids
    if len(slabs) > 1:
        sims, ids = search_views(slabs, cfg)
    stats: dict[str, Any] = {"views": len(slabs) - 1}
    threshold = cfg.threshold
    if threshold is None:
        copies = whitener(calib_embeddings)
        # the share of images with a copy is the pool's, read where the plain descriptors' distinct images end:
        # with views that level (the top second neighbour) rises and the share estimated there falls (demo: 0.15
        # -> 0.12, which set the threshold at 0.70 and found fewer copies than no views did)
        prevalence = None
        if len(slabs) > 1:
            on_plain = _calibrate(copies, [x], *plain, calib_source, cfg, None)
            prevalence, stats["plain_threshold"] = on_plain.prevalence, on_plain.threshold
        cal = _calibrate(copies, slabs, sims, ids, calib_source, cfg, calib_edits, prevalence)
        threshold = cal.threshold
        stats["calibration"] = asdict(cal)
        stats["warnings"] = calibration_warnings(cal, n, mode, cfg)
    pairs, _ = pairs_above(sims, ids, threshold)
    rep = group(n, pairs, keep_priority(images), cfg.grouping)
    distance = 1.0 - np.sum(x * x[rep], axis=1)
    sizes = component_sizes(rep)
    union_find = component_sizes(connected_components(n, pairs))
    stats.update(
        threshold=float(threshold),
        pairs=len(pairs),
        groups_with_duplicates=int((sizes > 1).sum()),
        largest_group=int(sizes.max()),
        largest_union_find_component=int(union_find.max()),  # what plain transitive grouping would have merged
        whitening=mode,
        whitening_why=why,
        index=cfg.index if cfg.index != "auto" else ("flat" if n <= cfg.flat_max else "ivf"),
    )
    return groups_table(images[schema.IMAGE_ID], rep, distance.astype(np.float32)), stats, whitener


def search_views(slabs: list[np.ndarray], cfg: DedupCopyConfig) -> tuple[np.ndarray, np.ndarray]:
    """Each image's ``k`` + 1 nearest images, searching the images and their views (``slabs``: [N, D_out] each,
    the images first), an image's similarity to another the best over that one's views."""
    n, stacked = len(slabs[0]), np.concatenate(slabs)
    index = build_index(stacked, cfg.index, cfg.flat_max * len(slabs), cfg.nprobe, cfg.seed)
    sims, rows = knn(index, slabs[0], (cfg.k + 1) * len(slabs))
    return best_per_owner(sims, rows, n, cfg.k + 1)


def _calibrate(
    copies: np.ndarray,
    slabs: list[np.ndarray],
    sims: np.ndarray,
    ids: np.ndarray,
    source: np.ndarray,
    cfg: DedupCopyConfig,
    edits: np.ndarray | None,
    prevalence: float | None = None,
) -> Calibration:
    """:func:`calibrate` on a search's results: a synthetic copy's similarity is its best to its source's views."""
    pos = np.max([np.sum(copies * v[source], axis=1) for v in slabs], axis=0)
    neg, best = nearest_other(sims, ids, cfg.negative_rank), nearest_other(sims, ids, 1)
    gate = tail_gate(cfg)
    return calibrate(pos, neg, best, cfg.target_precision, cfg.min_threshold, edits, *gate, prevalence=prevalence)


def tail_gate(cfg: DedupCopyConfig) -> tuple[int, float]:
    """``calibrate``'s conditions for the fitted false-match tail: the fewest images, the highest prevalence."""
    return (cfg.reliable_min_images, TAIL_MAX_PREVALENCE) if cfg.tail_fit else (2**62, -1.0)


def calibration_warnings(cal: Calibration, n: int, whitening: str, cfg: DedupCopyConfig) -> list[str]:
    """Why the estimates in ``cal`` may be far from the truth on this pool (empty when nothing is known to be off).

    Each rule comes from bench/photo_copies.py, where the estimates were compared with planted copies."""
    said = []
    if n < cfg.reliable_min_images:
        said.append(
            f"only {n} images (reliable_min_images={cfg.reliable_min_images}): the estimated precision and recall "
            "rest on too few neighbours and were 0.05-0.3 optimistic on small benchmark pools"
        )
    if cal.prevalence >= 1.0:
        said.append(
            "more images match above the distinct-image level than the synthetic copies explain: they do not "
            "describe this pool's copies, so the estimated recall means little here"
        )
    elif cal.prevalence > cfg.reliable_max_prevalence:
        said.append(
            f"about {cal.prevalence:.0%} of images seem to have a copy: images with several copies make the "
            "distinct-image level (each image's second neighbour) a copy's, so false matches are underestimated"
        )
    if cal.threshold > cal.calibrated:
        said.append(
            f"the calibrated threshold {cal.calibrated:.3f} was below min_threshold and {cal.threshold:.3f} applies: "
            "the descriptors barely separate copies from distinct images here"
        )
    if cal.precision < cfg.target_precision and cal.threshold <= cal.calibrated:  # floored: said above
        said.append(
            f"no threshold reached target_precision={cfg.target_precision:g}: at {cal.threshold:.3f} the estimated "
            f"precision is {cal.precision:.2f} (false matches {cal.false_match_rate:.4f} of the images against "
            f"{cal.prevalence:.3f} with a copy): distinct images match as closely as copies here"
        )
    if whitening != cfg.whiten:
        said.append(f"whitening {whitening!r} instead of {cfg.whiten!r} (too few descriptors to fit it)")
    by_edit = cal.recall_by_edit
    if len(by_edit) > 1 and max(by_edit.values()) - min(by_edit.values()) > cfg.reliable_max_recall_spread:
        low, high = min(by_edit, key=by_edit.__getitem__), max(by_edit, key=by_edit.__getitem__)
        said.append(
            f"estimated recall runs from {by_edit[low]:.2f} ({low}) to {by_edit[high]:.2f} ({high}) by edit family: "
            f"the overall {cal.recall:.2f} is for an even mix of the calibration's edits, and this pool's recall lies "
            "between those by the edits its copies have (read recall_by_edit)"
        )
    return said


def whitening_mode(cfg: DedupCopyConfig, sample: int) -> tuple[WhitenMode, str]:
    """The whitening actually fitted on ``sample`` descriptors, and why (recorded in ``_SUCCESS``)."""
    if sample <= 2:
        return "none", f"{sample} descriptors: nothing to fit"
    needed = int(np.ceil(cfg.whiten_min_per_dim * cfg.whiten_dims))
    if cfg.whiten == "pca" and sample < needed:
        return "center", (
            f"pca to {cfg.whiten_dims} dims needs {needed} descriptors "
            f"(whiten_min_per_dim={cfg.whiten_min_per_dim:g}), the sample has {sample}: centred instead"
        )
    return cfg.whiten, f"whiten={cfg.whiten} on {sample} descriptors"


def run_dedup_copy(cfg: DedupCopyConfig, inputs: StageInputs) -> StageOutput:
    """The stage: descriptors of the surviving images and of the synthetic copies -> dedup rows, plus the fitted
    whitening and the threshold as side files (dedup_relative reads both)."""
    images = alive(inputs, dedups_before("dedup_copy"), [schema.WIDTH, schema.HEIGHT, schema.CONTENT_HASH])
    emb = embeddings_of(inputs, cfg.embedding, images[schema.IMAGE_ID])
    calib, calib_emb = calibration_copies(inputs, cfg.embedding)
    calib_src = pc.index_in(calib[schema.IMAGE_ID], value_set=images[schema.IMAGE_ID]).to_numpy(zero_copy_only=False)
    edits = calib[schema.EDIT].to_numpy(zero_copy_only=False)
    if not len(calib):
        calib_emb = emb[:0]
    views = rotated_views(inputs, cfg.embedding, images[schema.IMAGE_ID], emb)
    table, stats, whitener = dedup_copy(images, emb, calib_src.astype(np.int64), calib_emb, cfg, edits, views)
    # dedup_relative compares plain descriptors: with views, the threshold calibrated on them
    plain = stats.get("plain_threshold", stats.get("threshold"))
    sides = {schema.WHITENING_FILE: whitener.to_bytes(), schema.THRESHOLD_FILE: {"threshold": plain}}
    return StageOutput(table, dedup_stats(table, stats), sides)
