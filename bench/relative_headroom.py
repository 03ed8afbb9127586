"""How many leaks any threshold could catch: ``dedup_relative``'s scores against the truth, threshold chosen by oracle.

``bench/dedup_quality.py --relative`` measures the stage as a user runs it (the threshold set by its rule). This
bench asks what limits it: on the same finished runs, every pool image is scored against the protected set with
several descriptor treatments and scores, and the threshold is put where it removes exactly 0.5% and 1% of the clean
pool (known from ``truth.parquet``, which the stage does not have). Leaks above it are what the score itself could
catch at that budget; what a rule then loses is the rule's doing.

- descriptors: as the stage compares them (``dedup_copy``'s whitening of the pool), raw (L2-normalised) and centred;
- scores: ``similarity`` (cosine to the best protected image), ``margin`` (the stage's: less the best protected
  image outside the match's copy group) and ``background`` (cosine to the best protected image less the cosine to
  the image's nearest other pool image: SSCD's score normalisation with the pool as the background set) and
  ``mixed`` (the stage's default: half of each reference, ``background_weight`` 0.5; here the whole pool is the
  background set, copies of the image included);
- ``--verify`` (needs ``opencv-python-headless``, not a dependency): SIFT key points matched with Lowe's ratio test
  between each pool image and its 3 most similar protected images (centred), a similarity transform fitted by
  RANSAC (mirrored query tried too); the inlier count as the score. Prints the most inliers of any clean image, the
  leaks' counts, and the leaks caught by either the stage's margin (at the 1% oracle threshold) or more inliers
  than any clean image (verification as a second test).

Usage: python bench/relative_headroom.py [--quality out/bench/quality] [--sizes 1000,5000] [--verify]
(run ``bench/dedup_quality.py --relative`` first: it writes ``relative-photo-N-rK`` and ``leak-N-rK`` there, one per
leak round; the oracle threshold is put per round and the leaks summed.)
"""

from __future__ import annotations

import argparse
import sys
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from _common import machine_line, print_table
from lvdkit.core import schema
from lvdkit.core.partitions import top_against
from lvdkit.core.settings import load_config
from lvdkit.core.stage import StageInputs
from lvdkit.core.views import alive, dedups_before, embeddings_of
from lvdkit.core.whitening import Whitener, fit_whitener
from lvdkit.curation.dedup_relative import group_threshold, scores
from lvdkit.curation.relative_score import background_margins, copy_groups
from lvdkit.curation.side_sets import SideSetReader
from lvdkit.pipeline.config import CurateConfig
from lvdkit.pipeline.names import CURATE_ORDER
from lvdkit.pipeline.stages import declared_sides
from lvdkit.truth import load_truth

BUDGETS = (0.005, 0.01)
VERIFY_MATCHES = 3


class Run:
    """A finished relative run: pool and protected descriptors (raw), URIs, which pool images are leaks."""

    def __init__(self, out: Path, truth_dir: Path) -> None:
        cfg = load_config(CurateConfig, out / "config.yaml", [])
        inputs = StageInputs(str(out), CURATE_ORDER, declared_sides())
        images = alive(inputs, dedups_before("dedup_relative"), [schema.URI])
        self.uris = images[schema.URI].to_pylist()
        self.pool = embeddings_of(inputs, cfg.dedup_relative.embedding, images[schema.IMAGE_ID])
        self.whitener = Whitener.from_bytes(inputs.side("dedup_copy", schema.WHITENING_FILE).read_bytes())
        side = SideSetReader(cfg.ingest, cfg.embed).read(cfg.dedup_relative.embedding, cfg.dedup_relative.protected)
        self.protected, self.protected_uris = side.x, side.ok[schema.URI].to_pylist()
        self.groups = copy_groups(self.whitener(self.protected), group_threshold(inputs))
        truth = {r[schema.URI]: r for r in load_truth(truth_dir).to_pylist()}
        self.leak = np.array([truth.get(u, {}).get(schema.TRUTH_KIND) == schema.TRUTH_LEAKED for u in self.uris])
        self.family = np.array([truth.get(u, {}).get(schema.TRUTH_TRANSFORM) or "" for u in self.uris])


def treatments(run: Run) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """(pool, protected) descriptors per treatment, unit rows: the stage's whitening, raw, centred on the pool."""
    dim = run.pool.shape[1]
    whiteners = {
        "stage's whitening": run.whitener,
        "raw": fit_whitener(run.pool, "none", dim),
        "centred": fit_whitener(run.pool, "center", dim),
    }
    return {name: (w(run.pool), w(run.protected)) for name, w in whiteners.items()}


def score_variants(pool: np.ndarray, protected: np.ndarray, groups: np.ndarray) -> dict[str, np.ndarray]:
    best, _, margin = scores(pool, protected, groups, "margin")
    nearest, _ = top_against(pool, pool, np.arange(len(pool), dtype=np.int64), 2)
    background = nearest[:, 1]  # the first is the image itself
    mixed = background_margins(best, margin, background, 0.5)
    return {"similarity": best, "margin": margin, "background": best - background, "mixed": mixed}


def oracle_threshold(value: np.ndarray, leak: np.ndarray, budget: float) -> float:
    """The score above which ``budget`` of the clean (non-leak) images lie."""
    clean = np.sort(value[~leak])[::-1]
    return float(clean[min(len(clean) - 1, int(budget * len(clean)))])


def oracle_counts(value: np.ndarray, leak: np.ndarray, family: np.ndarray) -> tuple[list[int], list[str]]:
    """Leaks above the threshold that removes each budget's share of the clean pool; the leaks missed (their edit
    families) at the largest budget."""
    caught, missed = [], []
    for budget in BUDGETS:
        t = oracle_threshold(value, leak, budget)
        caught.append(int(np.sum(value[leak] > t)))
        missed = sorted(family[leak][value[leak] <= t])
    return caught, missed


@dataclass
class Verified:
    """SIFT + RANSAC verification on one run."""

    ms_per_image: float
    clean_max: int  # the most inliers of any clean image
    above: int  # leaks with more inliers than that
    either: int  # leaks caught by the stage's margin at the 1% oracle threshold or by verification
    leaks: list[tuple[int, str]]  # (inliers, edit family) per leak


def verify(run: Run, centred: tuple[np.ndarray, np.ndarray], margin: np.ndarray) -> Verified:
    """Verification's inliers against the best matches by ``centred`` (pool, protected) descriptors, alone and
    beside the stage's ``margin`` at the 1% oracle threshold (either removes)."""
    import cv2  # opencv-python-headless: only this bench

    pool, protected = centred
    top = np.argsort(-(pool @ protected.T), axis=1)[:, :VERIFY_MATCHES]
    matcher = SiftMatcher(cv2)
    start = time.perf_counter()
    inliers = np.array(
        [max(matcher.inliers(run.uris[i], run.protected_uris[j]) for j in top[i]) for i in range(len(run.uris))]
    )
    ms = (time.perf_counter() - start) / max(1, len(run.uris)) * 1e3
    clean_max = int(inliers[~run.leak].max()) if (~run.leak).any() else 0
    leaks = sorted(zip(inliers[run.leak].tolist(), run.family[run.leak].tolist(), strict=True))
    by_margin = margin > oracle_threshold(margin, run.leak, BUDGETS[-1])
    either = int(np.sum((by_margin | (inliers > clean_max))[run.leak]))
    return Verified(ms, clean_max, sum(n > clean_max for n, _ in leaks), either, leaks)


def verify_row(checks: list[Verified]) -> list[object]:
    total = sum(len(v.leaks) for v in checks)
    return [
        f"SIFT + RANSAC inliers, {VERIFY_MATCHES} best protected matches",
        f"{np.mean([v.ms_per_image for v in checks]):.0f} ms per pool image",
        "most of any clean image: " + ", ".join(str(v.clean_max) for v in checks),
        f"leaks above it: {sum(v.above for v in checks)}/{total}; with the stage's margin at 1%: "
        f"{sum(v.either for v in checks)}/{total}",
        ", ".join(f"{f} {n}" for v in checks for n, f in v.leaks if n <= v.clean_max) or "-",
    ]


class SiftMatcher:
    """Inliers of a similarity transform (RANSAC) fitted to SIFT matches passing Lowe's ratio test."""

    def __init__(self, cv2: Any, side: int = 256, ratio: float = 0.75, reprojection_px: float = 3.0) -> None:
        self.cv2, self.side, self.ratio, self.px = cv2, side, ratio, reprojection_px
        self.sift = cv2.SIFT_create(500)
        self.matcher = cv2.BFMatcher(cv2.NORM_L2)
        self.cache: dict[tuple[str, bool], tuple[np.ndarray, np.ndarray | None]] = {}

    def features(self, uri: str, mirrored: bool) -> tuple[np.ndarray, np.ndarray | None]:
        if (uri, mirrored) not in self.cache:
            cv2 = self.cv2
            grey = cv2.imread(uri.removeprefix("file://"), cv2.IMREAD_GRAYSCALE)
            h, w = grey.shape
            f = self.side / min(h, w)  # the shorter side to 256 px: a shrunk copy meets its source at one scale
            size = (round(w * f), round(h * f))
            grey = cv2.resize(grey, size, interpolation=cv2.INTER_AREA if f < 1 else cv2.INTER_CUBIC)
            if mirrored:
                grey = cv2.flip(grey, 1)
            points, desc = self.sift.detectAndCompute(grey, None)
            self.cache[(uri, mirrored)] = (np.float32([p.pt for p in points]), desc)
        return self.cache[(uri, mirrored)]

    def inliers(self, query: str, reference: str) -> int:
        best = 0
        ref_xy, ref_desc = self.features(reference, False)
        for mirrored in (False, True):
            xy, desc = self.features(query, mirrored)
            if desc is None or ref_desc is None or len(desc) < 2 or len(ref_desc) < 2:
                continue
            pairs = self.matcher.knnMatch(desc, ref_desc, k=2)
            good = [m[0] for m in pairs if len(m) == 2 and m[0].distance < self.ratio * m[1].distance]
            if len(good) < 4:
                continue
            src, dst = xy[[g.queryIdx for g in good]], ref_xy[[g.trainIdx for g in good]]
            fit, mask = self.cv2.estimateAffinePartial2D(
                src,
                dst,
                method=self.cv2.RANSAC,
                ransacReprojThreshold=self.px,
            )
            if fit is not None and 0.25 < float(np.hypot(fit[0, 0], fit[1, 0])) < 4.0:  # a plausible scale
                best = max(best, int(mask.sum()))
        return best


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quality", type=Path, default=Path("out/bench/quality"), help="dedup_quality.py's --out")
    ap.add_argument("--sizes", default="1000,5000", help="photo pool sizes run by dedup_quality.py --relative")
    ap.add_argument("--verify", action="store_true", help="also SIFT + RANSAC verification (needs opencv)")
    args = ap.parse_args(argv)
    print(machine_line(), flush=True)
    for size in [int(s) for s in args.sizes.split(",") if s]:
        outs = sorted(args.quality.glob(f"relative-photo-{size}-r*"), key=lambda p: int(p.name.rsplit("-r", 1)[1]))
        outs = [o for o in outs if (o / "dedup_relative" / "_SUCCESS").exists()]
        if not outs:
            print(
                f"photo pool of {size}: no finished run (python bench/dedup_quality.py --relative --photo-sizes {size})"
            )
            continue
        caught: dict[str, list[int]] = {}
        missed: dict[str, list[str]] = {}
        checks, images, leaks = [], 0, 0
        for out in outs:
            run = Run(out, args.quality / out.name.replace("relative-photo-", "leak-"))
            images, leaks = images + len(run.uris), leaks + int(run.leak.sum())
            stage_margin, described = np.empty(0), treatments(run)
            for treatment, (pool, protected) in described.items():
                for score, value in score_variants(pool, protected, run.groups).items():
                    name = f"{treatment}, {score}"
                    counts, lost = oracle_counts(value, run.leak, run.family)
                    caught[name] = [a + b for a, b in zip(caught.get(name, [0] * len(BUDGETS)), counts, strict=True)]
                    missed[name] = missed.get(name, []) + lost
                    stage_margin = value if (treatment, score) == ("stage's whitening", "margin") else stage_margin
            if args.verify:
                checks.append(verify(run, described["centred"], stage_margin))
        print(f"\nphoto pool of {size}, {len(outs)} rounds: {images} images reach dedup_relative, {leaks} leaks")
        rows = [
            [
                name,
                *(f"{c}/{leaks}" for c in counts),
                ", ".join(f"{f} {n}" for f, n in sorted(Counter(missed[name]).items())) or "-",
            ]
            for name, counts in caught.items()
        ]
        headers = ["descriptors, score", *[f"leaks caught at {b:.1%} clean" for b in BUDGETS], "missed at 1%"]
        print_table(headers, rows)
        if checks:
            print_table(
                ["verification", "time", "clean (per round)", "leaks", "leaks verification misses"],
                [verify_row(checks)],
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
