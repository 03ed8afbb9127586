"""Self-dedup's operating points on a finished run: raw cosine against a density-normalised pair score.

SSCD's authors normalise copy-detection scores by a background set; the pool itself can be that set. The pair score
``sim(i, j) - beta * (d_i + d_j) / 2``, with ``d`` an image's similarity to its ``k``-th nearest pool image, lowers
pairs in crowded regions (a handwritten 1 among many alike) and keeps pairs of images that have no company but each
other (an image and its copy). This bench measures whether it helps, on the images that reached ``dedup_copy`` in a
finished run, scored against the run's ``truth.parquet``:

- the frontier: the highest recall reached at actual precision >= 0.90 / 0.95 / 0.97 (threshold by oracle);
- what ``dedup_copy``'s calibration does with each score: its threshold, estimated precision and recall, and the
  actual figures there.

Image level, as ``dedup_copy`` decides: an image is flagged when its best neighbour (of k=64) scores above t;
precision is the share of flagged images whose best neighbour shares its original; recall is the share of planted
near duplicates (whose original or another copy of it reached ``dedup_copy``) with such a neighbour above t. The
run's whitening (``dedup_copy/whitening.npz``) and synthetic copies (``embed/calibration``) are reused.

Usage: python bench/copy_score_norm.py [--out out/demo] [--truth out/demo-data]
       python bench/copy_score_norm.py --out out/bench/photo/run-1000-copy --truth out/bench/photo/pool-1000
"""

from __future__ import annotations

import argparse
from pathlib import Path

import faiss
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from lvdkit.core import schema
from lvdkit.core.io import read_parts
from lvdkit.core.whitening import Whitener
from lvdkit.curation.dedup_copy import Calibration, DedupCopyConfig, calibrate, nearest_other
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("out/demo"))
    ap.add_argument("--truth", type=Path, default=Path("out/demo-data"))
    args = ap.parse_args()
    family, kind = _families(args.truth)
    ingest = read_parts(args.out / "ingest")
    uri_of = dict(zip(ingest[schema.IMAGE_ID].to_pylist(), ingest[schema.URI].to_pylist(), strict=True))
    embed, col = read_parts(args.out / "embed"), schema.embedding_column("copy")
    dead = _removed_before(args.out)
    alive = np.array([i not in dead for i in embed[schema.IMAGE_ID].to_pylist()])
    ids = [i for i, a in zip(embed[schema.IMAGE_ID].to_pylist(), alive, strict=True) if a]
    whitener = Whitener.from_bytes((args.out / "dedup_copy" / schema.WHITENING_FILE).read_bytes())
    x = whitener(_matrix(embed, col)[alive])
    fam = np.array([family.get(uri_of[i], uri_of[i]) for i in ids])
    copy = np.array([kind.get(uri_of[i]) == schema.TRUTH_NEAR for i in ids]) & (
        np.unique(fam, return_counts=True)[1][np.unique(fam, return_inverse=True)[1]] > 1
    )
    index = faiss.IndexFlatIP(x.shape[1])
    index.add(x)
    sims, nn = index.search(x, K + 1)
    sims, nn = sims[:, 1:], nn[:, 1:]  # itself first
    same = fam[nn] == fam[:, None]
    calib = read_parts(args.out / "embed" / "calibration")
    row_of = {i: r for r, i in enumerate(ids)}
    has = np.array([i in row_of for i in calib[schema.IMAGE_ID].to_pylist()])
    source = np.array([row_of[i] for i in np.array(calib[schema.IMAGE_ID].to_pylist())[has]], dtype=np.int64)
    copies = whitener(_matrix(calib, col)[has])
    edits = np.array(calib[schema.EDIT].to_pylist())[has]
    copy_sims, _ = index.search(copies, K)
    print(f"{args.out}: {len(x)} images reach dedup_copy, {int(copy.sum())} planted near duplicates among them")
    parts: list[str] = []
    print(f"{'score':28s} {'R@P>=.90':>9s} {'R@P>=.95':>9s} {'R@P>=.97':>9s}   calibration: t, est P/R | actual P/R")
    for k, beta in VARIANTS:
        density = sims[:, k - 1] if beta else np.zeros(len(x))
        score = sims - beta * (density[:, None] + density[nn]) / 2
        frontier = _frontier(score, same, copy)
        # a synthetic copy's own nearest pool image is (usually) its source: its density is its (k+1)-th
        pos = np.sum(copies * x[source], axis=1) - beta * ((copy_sims[:, k] if beta else 0) + density[source]) / 2
        cal = _calibrated(score, nn, pos, edits, floor=None if beta else DedupCopyConfig().min_threshold)
        p, r = _actual(score, same, copy, cal.threshold)
        name = "raw cosine" if not beta else f"normalised k={k} beta={beta}"
        cells = " ".join(f"{v:9.3f}" for v in frontier)
        print(f"{name:28s} {cells}   t={cal.threshold:.3f} {cal.precision:.2f}/{cal.recall:.2f} | {p:.3f}/{r:.3f}")
        if not beta:
            parts.append(_parts(score, same, cal))
    print("\nwhy the calibration's precision is off, at its threshold on the raw cosine:")
    for line in parts:
        print(line)


def _parts(score: np.ndarray, same: np.ndarray, cal: Calibration) -> str:
    """The estimate's parts beside the truth: F(t), the share of images whose second neighbour scores above t (the
    estimate of false matches), against the share whose best neighbour above t is not of their family; the
    estimated prevalence of copies against the share of images with a family member present."""
    t = cal.threshold
    best = score.max(axis=1)
    false = float(((best > t) & ~same[np.arange(len(score)), score.argmax(axis=1)]).mean())
    return (
        f"  matched M(t) {float((best > t).mean()):.4f}; false matches estimated F(t) {cal.false_match_rate:.4f}, "
        f"actual {false:.4f}; prevalence estimated {cal.prevalence:.3f}, actual {float(same.any(axis=1).mean()):.3f}"
    )


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
    score: np.ndarray, nn: np.ndarray, pos: np.ndarray, edits: np.ndarray, floor: float | None
) -> Calibration:
    """dedup_copy's calibration on ``score`` (its floor, min_threshold, is on the cosine's scale: raw only)."""
    cfg = DedupCopyConfig()
    rows = np.arange(len(score))[:, None]
    full = np.concatenate([np.full((len(score), 1), np.inf), score], axis=1)  # itself first, as a self-search lists
    ids = np.concatenate([rows, nn], axis=1)
    return calibrate(pos, nearest_other(full, ids, cfg.negative_rank), nearest_other(full, ids, 1),
                     cfg.target_precision, -1.0 if floor is None else floor, edits)  # fmt: skip


if __name__ == "__main__":
    main()
