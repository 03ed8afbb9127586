"""Self-dedup's calibration and operating points on a finished run, scored against its ``truth.parquet``.

Two tables, on the images that reached ``dedup_copy`` (the run's whitening and synthetic copies are reused):

1. The calibration as ``dedup_copy`` runs it, on the raw cosine: with false matches estimated from second neighbours
   alone (``dedup_copy.tail_fit=false``) and with the extreme-value tail fitted to the best matches as well (the
   default).
   Per row: the threshold, the estimated precision and recall, the actual ones there, and the false-match rates
   (second neighbours, fitted tail, actual: the share of images whose best neighbour above t is of another family).
2. The raw cosine against a density-normalised pair score. SSCD's authors normalise copy-detection scores by a
   background set; the pool itself can be that set: ``sim(i, j) - beta * (d_i + d_j) / 2``, with ``d`` an image's
   similarity to its ``k``-th nearest pool image, lowers pairs in crowded regions (a handwritten 1 among many alike).
   Per score: the highest recall at actual precision >= 0.90 / 0.95 / 0.97 (threshold by oracle), and what the
   calibration picks on it.

Image level, as ``dedup_copy`` decides: an image is flagged when its best neighbour (of k=64) scores above t;
precision is the share of flagged images whose best neighbour shares its original; recall is the share of planted
near duplicates (whose original or another copy of it reached ``dedup_copy``) with such a neighbour above t.

Usage: python bench/copy_calibration.py [--out out/demo] [--truth out/demo-data]
       python bench/copy_calibration.py --out out/bench/photo/run-1000-copy --truth out/bench/photo/pool-1000
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path

import faiss
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

sys.path.insert(0, str(Path(__file__).parent))
from _common import print_table
from lvdkit.core import schema
from lvdkit.core.io import read_parts
from lvdkit.core.whitening import Whitener
from lvdkit.curation.dedup_copy import Calibration, DedupCopyConfig, calibrate, nearest_other, tail_gate
from lvdkit.truth import families, load_truth

K = 64
VARIANTS = ((0, 0.0), (5, 0.5), (5, 1.0), (10, 1.0))  # (k of the density, beta); beta 0: raw cosine


def _families(truth_dir: Path) -> tuple[dict[str, str], dict[str, str]]:
    """uri -> family key (:func:`lvdkit.truth.families`; images of no family: their own uri), uri -> kind."""
    truth = load_truth(truth_dir)
    kind = dict(zip(truth[schema.URI].to_pylist(), truth[schema.TRUTH_KIND].to_pylist(), strict=True))
    return families(truth), kind


def _removed_before(out: Path) -> set[str]:
    dead: set[str] = set()
    for stage in ("dedup_exact", "dedup_phash"):
        t = read_parts(out / stage)
        dead |= set(t.filter(pc.invert(t[schema.KEEP]))[schema.IMAGE_ID].to_pylist())
    return dead


def _matrix(table: pa.Table, column: str) -> np.ndarray:
    return table[column].combine_chunks().flatten().to_numpy().reshape(table.num_rows, -1)


@dataclass
class Pool:
    """A finished run's images that reached dedup_copy: their exact neighbours and the truth about them."""

    sims: np.ndarray  # [N, K] best first, itself left out
    nn: np.ndarray  # [N, K]
    same: np.ndarray  # [N, K] neighbour of the same family
    copy: np.ndarray  # [N] a planted near duplicate whose family is present
    pos: np.ndarray  # [C] synthetic copies' cosine to their sources
    copy_sims: np.ndarray  # [C, K] synthetic copies' best pool similarities
    source: np.ndarray  # [C] their sources' rows
    edits: np.ndarray  # [C] their edit families


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("out/demo"))
    ap.add_argument("--truth", type=Path, default=Path("out/demo-data"))
    ap.add_argument("--target", type=float, default=DedupCopyConfig().target_precision, help="target precision")
    args = ap.parse_args()
    pool = _load(args.out, args.truth)
    print(f"{args.out}: {len(pool.sims)} images reach dedup_copy, {int(pool.copy.sum())} planted near duplicates")
    print(f"\n1. dedup_copy's calibration, raw cosine, target precision {args.target}")
    _calibration_table(pool, args.target)
    print("\n2. raw cosine against a density-normalised score (calibrated with the fitted tail)")
    _score_table(pool, args.target)


def _load(out: Path, truth: Path) -> Pool:
    family, kind = _families(truth)
    ingest = read_parts(out / "ingest")
    uri_of = dict(zip(ingest[schema.IMAGE_ID].to_pylist(), ingest[schema.URI].to_pylist(), strict=True))
    embed, col = read_parts(out / "embed"), schema.embedding_column("copy")
    dead = _removed_before(out)
    alive = np.array([i not in dead for i in embed[schema.IMAGE_ID].to_pylist()])
    ids = [i for i, a in zip(embed[schema.IMAGE_ID].to_pylist(), alive, strict=True) if a]
    whitener = Whitener.from_bytes((out / "dedup_copy" / schema.WHITENING_FILE).read_bytes())
    x = whitener(_matrix(embed, col)[alive])
    fam = np.array([family.get(uri_of[i], uri_of[i]) for i in ids])
    copy = np.array([kind.get(uri_of[i]) == schema.TRUTH_NEAR for i in ids]) & (
        np.unique(fam, return_counts=True)[1][np.unique(fam, return_inverse=True)[1]] > 1
    )
    index = faiss.IndexFlatIP(x.shape[1])
    index.add(x)
    sims, nn = index.search(x, K + 1)
    sims, nn = sims[:, 1:], nn[:, 1:]  # itself first
    calib = read_parts(out / "embed" / "calibration")
    row_of = {i: r for r, i in enumerate(ids)}
    has = np.array([i in row_of for i in calib[schema.IMAGE_ID].to_pylist()])
    source = np.array([row_of[i] for i in np.array(calib[schema.IMAGE_ID].to_pylist())[has]], dtype=np.int64)
    copies = whitener(_matrix(calib, col)[has])
    copy_sims, _ = index.search(copies, K)
    pos = np.sum(copies * x[source], axis=1)
    same = fam[nn] == fam[:, None]
    return Pool(sims, nn, same, copy, pos, copy_sims, source, np.array(calib[schema.EDIT].to_pylist())[has])


def _calibration_table(pool: Pool, target: float) -> None:
    rows = []
    for name, tail_fit in (("second neighbours only", False), ("with the fitted tail", True)):
        cal = _calibrated(pool.sims, pool.nn, pool.pos, pool.edits, DedupCopyConfig().min_threshold, target, tail_fit)
        p, r = _actual(pool.sims, pool.same, pool.copy, cal.threshold)
        best = pool.sims[:, 0]
        false = float(((best > cal.threshold) & ~pool.same[:, 0]).mean())
        tail = "-" if cal.false_match_tail is None else f"{cal.false_match_tail:.4f}"  # not fitted
        rows.append((
            name, f"{cal.threshold:.3f}", f"{cal.precision:.3f}", f"{p:.3f}", f"{cal.recall:.2f}", f"{r:.3f}",
            f"{cal.false_match_second:.4f}", tail, f"{false:.4f}", f"{cal.prevalence:.3f}",
        ))  # fmt: skip
    headers = ["false matches from", "t", "est P", "actual P", "est R", "actual R", "F 2nd", "F tail", "F actual"]
    print_table([*headers, "prevalence est"], rows)


def _score_table(pool: Pool, target: float) -> None:
    rows = []
    for k, beta in VARIANTS:
        density = pool.sims[:, k - 1] if beta else np.zeros(len(pool.sims))
        score = pool.sims - beta * (density[:, None] + density[pool.nn]) / 2
        # a synthetic copy's own nearest pool image is (usually) its source: its density is its (k+1)-th
        pos = pool.pos - beta * ((pool.copy_sims[:, k] if beta else 0) + density[pool.source]) / 2
        floor = -1.0 if beta else DedupCopyConfig().min_threshold  # min_threshold is on the cosine's scale
        cal = _calibrated(score, pool.nn, pos, pool.edits, floor, target, True)
        p, r = _actual(score, pool.same, pool.copy, cal.threshold)
        name = "raw cosine" if not beta else f"normalised k={k} beta={beta}"
        frontier = [f"{v:.3f}" for v in _frontier(score, pool.same, pool.copy)]
        rows.append(
            (name, *frontier, f"{cal.threshold:.3f}", f"{cal.precision:.2f}/{cal.recall:.2f}", f"{p:.3f}/{r:.3f}")
        )
    print_table(["score", "R@P>=.90", "R@P>=.95", "R@P>=.97", "calibrated t", "est P/R", "actual P/R"], rows)


def _actual(score: np.ndarray, same: np.ndarray, copy: np.ndarray, t: float) -> tuple[float, float]:
    best, arg = score.max(axis=1), score.argmax(axis=1)
    flagged = best > t
    precision = float(same[np.arange(len(score)), arg][flagged].mean()) if flagged.any() else 1.0
    recall = float((np.where(same, score, -np.inf).max(axis=1)[copy] > t).mean()) if copy.any() else float("nan")
    return precision, recall


def _frontier(score: np.ndarray, same: np.ndarray, copy: np.ndarray) -> list[float]:
    points = [_actual(score, same, copy, t) for t in np.quantile(score.max(axis=1), np.linspace(0.5, 0.999, 300))]
    return [max((r for p, r in points if p >= floor), default=0.0) for floor in (0.90, 0.95, 0.97)]


def _calibrated(
    score: np.ndarray, nn: np.ndarray, pos: np.ndarray, edits: np.ndarray, floor: float, target: float, tail_fit: bool
) -> Calibration:
    """dedup_copy's calibration on ``score`` [N, K] (neighbours ``nn``, itself left out)."""
    cfg = DedupCopyConfig(tail_fit=tail_fit)
    rows = np.arange(len(score))[:, None]
    full = np.concatenate([np.full((len(score), 1), np.inf), score], axis=1)  # itself first, as a self-search lists
    ids = np.concatenate([rows, nn], axis=1)
    neg, best = nearest_other(full, ids, cfg.negative_rank), nearest_other(full, ids, 1)
    return calibrate(pos, neg, best, target, floor, edits, *tail_gate(cfg))


if __name__ == "__main__":
    main()
