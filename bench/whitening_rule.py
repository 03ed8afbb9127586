"""When is PCA whitening worth fitting? Copy dedup on pools drawn from a finished demo run, whitened three ways.

A PCA whitening to ``whiten_dims`` fitted on fewer descriptors than dimensions is noise (issue: a 234-photo pool
whose copy dedup found nothing). This bench takes the demo run's own SSCD descriptors and synthetic calibration
copies, draws pools of several sizes (whole families, so copies stay with their originals; seeded), runs lvdkit's
``dedup_copy`` (calibrated threshold) with ``whiten=pca``, ``center`` and ``none`` on each, and scores the decisions
against the demo's planted truth (``lvdkit.truth``): near-duplicate recall (of the planted pairs in the drawn pool),
precision, and the calibration's estimated recall and precision beside them. The ratio column is pool size /
whiten_dims, the quantity the rule ``dedup_copy.whiten_min_per_dim`` is set on.

Usage: python bench/whitening_rule.py [--run out/demo] [--demo out/demo-data] [--sizes 200,400,...] [--seeds 3]
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

sys.path.insert(0, str(Path(__file__).parent))
from _common import machine_line, print_table
from lvdkit.core import schema
from lvdkit.core.settings import load_config
from lvdkit.core.stage import StageInputs
from lvdkit.core.views import alive, calibration_copies, dedups_before, embeddings_of
from lvdkit.curation.dedup_copy import dedup_copy
from lvdkit.pipeline.config import CurateConfig
from lvdkit.truth import families, load_truth, score_groups

MODES = ("pca", "center", "none")


def pool_and_copies(run: Path) -> tuple:
    """(images with uri, descriptors, calibration source ids, calibration descriptors) that dedup_copy saw."""
    cfg = load_config(CurateConfig, run / "config.yaml")
    inputs = StageInputs(str(run), ("ingest", "dedup_exact", "dedup_phash", "embed"))
    columns = [schema.URI, schema.WIDTH, schema.HEIGHT, schema.CONTENT_HASH]
    images = alive(inputs, dedups_before("dedup_copy"), columns)
    emb = embeddings_of(inputs, cfg.dedup_copy.embedding, images[schema.IMAGE_ID])
    calib, calib_emb = calibration_copies(inputs, cfg.dedup_copy.embedding)  # in order: an image may have several
    return cfg.dedup_copy, images, emb, calib[schema.IMAGE_ID], calib_emb


def near_pairs(truth: pa.Table) -> list[tuple[str, str]]:
    """(copy uri, original uri) of every planted near duplicate."""
    rows = truth.select([schema.URI, schema.TRUTH_PATH, schema.TRUTH_KIND, schema.TRUTH_COPY_OF]).to_pylist()
    uri_of_path = {r[schema.TRUTH_PATH]: r[schema.URI] for r in rows}
    return [
        (r[schema.URI], uri_of_path[r[schema.TRUTH_COPY_OF]]) for r in rows if r[schema.TRUTH_KIND] == schema.TRUTH_NEAR
    ]


def family_groups(truth: pa.Table, uris: list[str]) -> list[np.ndarray]:
    """Row indices of the pool grouped by family (an original with its planted copies; anything else alone)."""
    family = families(truth)
    groups: dict[str, list[int]] = {}
    for i, uri in enumerate(uris):
        groups.setdefault(family.get(uri, uri), []).append(i)
    return [np.asarray(g) for g in groups.values()]


def draw_pool(groups: list[np.ndarray], size: int, seed: int) -> np.ndarray:
    """Whole families in random order until ``size`` images: copies stay with their originals, so a small pool has
    the full pool's share of copies (a uniform draw of 200 of 4,755 images would keep about one planted pair)."""
    order = np.random.default_rng(seed).permutation(len(groups))
    picked, count = [], 0
    for g in order:
        if count >= size:
            break
        picked.append(groups[g])
        count += len(groups[g])
    return np.sort(np.concatenate(picked))


def one(cfg, truth, images, emb, calib_ids, calib_emb, keep: np.ndarray, mode: str) -> dict:  # type: ignore[no-untyped-def]
    sub = images.take(keep)
    idx = pc.index_in(calib_ids, value_set=sub[schema.IMAGE_ID])  # null: the copy's source is not in this pool
    has = pc.is_valid(idx).to_numpy(zero_copy_only=False)
    src_idx = pc.drop_null(idx).to_numpy().astype(np.int64)
    table, stats, _ = dedup_copy(
        sub, emb[keep], src_idx, calib_emb[has], dataclasses.replace(cfg, whiten=mode, whiten_min_per_dim=0)
    )
    uris = sub[schema.URI].to_pylist()
    rep = table[schema.GROUP_ID].to_pylist()
    uri_of = dict(zip(sub[schema.IMAGE_ID].to_pylist(), uris, strict=True))
    rep_uri = dict(zip(uris, [uri_of[r] for r in rep], strict=True))
    score = score_groups(truth, uris, list(rep_uri.values()))
    pairs = [(c, o) for c, o in near_pairs(truth) if c in rep_uri and o in rep_uri]  # both in this pool
    recall = sum(rep_uri[c] == rep_uri[o] for c, o in pairs) / max(len(pairs), 1)
    cal = stats.get("calibration", {})
    return {
        "precision": score.precision,
        "recall": recall,
        "est_precision": cal.get("precision", float("nan")),
        "est_recall": cal.get("recall", float("nan")),
        "threshold": stats.get("threshold", float("nan")),
        "copies": len(src_idx),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--run", type=Path, default=Path("out/demo"))
    ap.add_argument("--demo", type=Path, default=Path("out/demo-data"))
    ap.add_argument("--sizes", default="200,300,500,800,1300,2000,3000,0", help="pool sizes; 0 = the whole pool")
    ap.add_argument("--seeds", type=int, default=3)
    args = ap.parse_args()
    print(machine_line())
    cfg, images, emb, calib_ids, calib_emb = pool_and_copies(args.run)
    truth = load_truth(args.demo)
    n, dims = images.num_rows, cfg.whiten_dims
    groups = family_groups(truth, images[schema.URI].to_pylist())
    rows = []
    for size in (int(s) or n for s in args.sizes.split(",")):
        size = min(size, n)
        for mode in MODES:
            runs = []
            for seed in range(args.seeds if size < n else 1):
                keep = draw_pool(groups, size, seed)
                runs.append(one(cfg, truth, images, emb, calib_ids, calib_emb, keep, mode))
            mean = {k: float(np.nanmean([r[k] for r in runs])) for k in runs[0]}
            rows.append(
                [
                    size,
                    f"{size / dims:.1f}",
                    mode,
                    f"{mean['threshold']:.3f}",
                    f"{mean['recall']:.3f}",
                    f"{mean['precision']:.3f}",
                    f"{mean['est_recall']:.3f}",
                    f"{mean['est_precision']:.3f}",
                ]
            )
            print(*rows[-1], sep="\t", flush=True)
    print(f"\npool {n} images, whiten_dims {dims}, mean of {args.seeds} draws per size (1 for the whole pool)")
    print_table(
        ["pool", "pool/dims", "whiten", "threshold", "near recall", "precision", "est. recall", "est. precision"], rows
    )


if __name__ == "__main__":
    main()
