"""Copy detection on photographs with real-world edits, per edit family, from 200 to 20k images.

Pools come from :func:`lvdkit.photo_copies.make_photo_pool` (the packaged photographs' quadrants, each copied by
crop, shrink + JPEG 30, 10-degree rotation, mirror, border + caption + colour shift, and a composition of two; padded
with distinct dead-leaves images). Per pool size, each tool's decisions are scored against ``truth.parquet``:
recall per edit family (copy grouped with its original), overall recall, precision (decisions whose image and kept
image share an original), the distinct images wrongly removed, and for lvdkit the calibration's estimated precision
and recall beside the actual ones (copy-only rows: dedup_copy alone sees every copy, so the estimate and the truth
describe the same decisions).

Tools: lvdkit copy detection alone and lvdkit's cascade (exact -> PHash -> copy), with SSCD; imagededup PHash at its
default distance 10; imagededup CNN with a random-init MobileNetV3 (``--cnn``; no pretrained weights offline).

Usage: python bench/photo_copies.py [--sizes 200,1000,5000,20000] [--out out/bench/photo] [--cnn]
       [--set dedup_copy.KEY=VALUE ...]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

sys.path.insert(0, str(Path(__file__).parent))
from _common import machine_line, print_table
from dedup_quality import _flat_name, cnn_duplicates, flatten, pairs_from, phash_duplicates
from lvdkit.core.settings import load_config
from lvdkit.curation.components import connected_components, representatives
from lvdkit.photo_copies import PHOTO_EDITS, make_photo_pool, photograph
from lvdkit.pipeline.config import CurateConfig
from lvdkit.pipeline.runner import run
from lvdkit.truth import families, load_truth, near_found_by_transform, score_groups, status_groups

POOL_VERSION = 2  # bump when make_photo_pool changes: cached pools are rebuilt
STAGES = ("ingest", "dedup_exact", "dedup_phash", "embed", "dedup_copy")


def ensure_pool(folder: Path, size: int, seed: int) -> Path:
    marker = folder / "pool.json"
    want = {"version": POOL_VERSION, "size": size, "seed": seed}
    if not (marker.is_file() and json.loads(marker.read_text()) == want):
        make_photo_pool(folder, size, seed, overwrite=True)
        marker.write_text(json.dumps(want))
    return folder


def lvdkit_groups(pool: Path, out: Path, copy_only: bool, sets: list[str]) -> tuple[list[str], list[str], dict, float]:
    """Curation up to dedup_copy: (uris, kept uri of each), dedup_copy's stats, seconds of embed + dedup stages."""
    overrides = [
        f"out={out}",
        f"ingest.inputs=[{pool / 'pool'}]",
        "progress=false",
        "embed.models={copy: sscd}",
        *(("dedup_exact.enabled=false", "dedup_phash.enabled=false") if copy_only else ()),
        *sets,
    ]
    cfg: CurateConfig = load_config(CurateConfig, None, overrides)
    summary = run(cfg, stages=STAGES)
    seconds = sum(summary["stages"][s]["seconds"] for s in STAGES[1:])
    uris, reps = status_groups(pq.read_table(out / "status.parquet"))
    return uris, reps, summary["stages"]["dedup_copy"]["stats"], seconds


def groups_from_dups(flat: Path, uris: list[str], dups: dict[str, list]) -> list[str]:
    """imagededup's pairs -> union-find groups -> the kept uri of each image."""
    back = {_flat_name(i, u): u for i, u in enumerate(uris)}
    mapped = {back[k]: [back[v if isinstance(v, str) else v[0]] for v in vs] for k, vs in dups.items()}
    labels = connected_components(len(uris), pairs_from(mapped, uris))
    return [uris[i] for i in representatives(labels, np.arange(len(uris)))]


def row(size: int, tool: str, truth, uris: list[str], reps: list[str], seconds: float, est: str = "") -> list:
    score = score_groups(truth, uris, reps)
    by = near_found_by_transform(truth, uris, reps)
    per_family = [f"{by[f][0] / by[f][1]:.2f}" if f in by else "-" for f in PHOTO_EDITS]
    wrong, same = same_photo_links(truth, uris, reps)
    return [
        size,
        tool,
        *per_family,
        f"{score.near_recall:.3f}",
        f"{score.precision:.3f}",
        f"{same}/{wrong}",
        f"{score.clean_originals_removed}/{score.clean_originals}",
        est,
        f"{seconds:.0f}",
    ]


def same_photo_links(truth, uris: list[str], reps: list[str]) -> tuple[int, int]:  # type: ignore[no-untyped-def]
    """(wrong decisions, of which link two quadrants of one photograph): distinct images, but the same scene."""
    family = families(truth)
    label = dict(zip(truth["uri"].to_pylist(), truth["label"].to_pylist(), strict=True))

    def photo(uri: str) -> str:
        return photograph(str(label.get(uri) or uri))

    wrong = [(u, r) for u, r in zip(uris, reps, strict=True) if u != r and family.get(u, u) != family.get(r, r)]
    return len(wrong), sum(photo(u) == photo(r) for u, r in wrong)


# the calibration's edit family that stands for each of the pool's (shrink_jpeg: downscaling and heavy JPEG both)
ESTIMATED_AS = {
    "crop": ("crop",),
    "shrink_jpeg": ("resize", "jpeg"),
    "rotate": ("rotate",),
    "flip": ("flip",),
    "overlay": ("overlay",),
    "compose": ("compose",),
}


def estimated_row(size: int, stats: dict) -> list:
    """The calibration's estimated recall per edit family, under the pool's families (``a/b``: two families)."""
    by = stats.get("calibration", {}).get("recall_by_edit", {})
    cells = ["/".join(f"{by[e]:.2f}" for e in ESTIMATED_AS[f] if e in by) or "-" for f in PHOTO_EDITS]
    return [size, "  its calibration's estimate", *cells, "", "", "", "", "", ""]


def estimate(stats: dict) -> str:
    cal = stats.get("calibration")
    if not cal:
        return f"t={stats.get('threshold', float('nan')):.3f} (set)"
    warned = len(stats.get("warnings", []))
    return f"t={stats['threshold']:.3f} P={cal['precision']:.2f} R={cal['recall']:.2f}" + (
        f" warned ({warned})" if warned else ""
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="200,1000,5000,20000")
    parser.add_argument("--out", type=Path, default=Path("out/bench/photo"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cnn", action="store_true", help="add imagededup's CNN (random-init MobileNetV3)")
    parser.add_argument("--set", action="append", default=[], help="extra lvdkit config KEY=VALUE (repeatable)")
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    print(machine_line())
    rows = []
    for size in (int(s) for s in args.sizes.split(",")):
        pool = ensure_pool(args.out / f"pool-{size}", size, args.seed)
        truth = load_truth(pool)
        for copy_only in (True, False):
            name = "copy only" if copy_only else "exact+PHash+copy"
            out = args.out / f"run-{size}-{'copy' if copy_only else 'cascade'}"
            uris, reps, stats, seconds = lvdkit_groups(pool, out, copy_only, args.set)
            rows.append(row(size, f"lvdkit SSCD, {name}", truth, uris, reps, seconds, estimate(stats)))
            rows.append(estimated_row(size, stats))
        uris = sorted(truth.filter(truth["kind"].is_valid())["uri"].to_pylist())
        flat = pool / "_flat"
        flatten(uris, flat)
        dups, seconds = phash_duplicates(flat, 10)
        rows.append(row(size, "imagededup PHash d<=10", truth, uris, groups_from_dups(flat, uris, dups), seconds))
        if args.cnn:
            dups, seconds = cnn_duplicates(flat, 0.9)
            reps = groups_from_dups(flat, uris, dups)
            rows.append(row(size, "imagededup CNN (random) sim>=0.9", truth, uris, reps, seconds))
        print(f"[{time.strftime('%H:%M:%S')}] pool {size} done", flush=True)
    headers = ["pool", "tool", *PHOTO_EDITS, "recall", "precision", "wrong: same photo", "distinct removed"]
    print_table([*headers, "calibration", "s"], rows)
    print(
        "per-family columns and recall: planted copies grouped with their original; precision: decisions whose image "
        "and kept image share an original; wrong: same photo: of the wrong decisions, those linking two quadrants of "
        "one photograph (distinct images of one scene); distinct removed: images with no planted copy marked "
        "duplicate; calibration: dedup_copy's threshold and its estimated precision/recall (P, R) on this pool."
    )


if __name__ == "__main__":
    main()
