"""Retrieval and clustering quality on the demo's truth: label match of retrieved images, balance of the balanced
sample, purity of the level-1 clusters; one run, or two rounds of bootstrapped curation side by side.

Reads finished curations of the demo. Cluster-based hits are the ``retrieve`` stage's own output; sample-based hits
are computed with the same function (``lvdkit.curation.retrieve.sample_retrieval``, k=4) on the same pool and seed
embeddings; the baseline is a random sample of the pool of the same size (mean of 20 draws).

- ``make curate`` then ``python bench/retrieval_quality.py``: round 1 (the copy descriptors).
- ``make bootstrap`` ends with ``python bench/retrieval_quality.py --out out/demo-round2 --round1 out/demo``:
  round 2 (the model ``make pretrain`` trained, as ``semantic``) beside round 1.

Usage: python bench/retrieval_quality.py [--out out/demo] [--round1 RUN] [--demo out/demo-data] [--k 4]
"""

from __future__ import annotations

import argparse
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

sys.path.insert(0, str(Path(__file__).parent))
from _common import machine_line, print_table
from lvdkit.core import schema
from lvdkit.core.io import read_parts
from lvdkit.core.settings import load_config
from lvdkit.core.stage import StageInputs
from lvdkit.core.views import embeddings_of
from lvdkit.curation.retrieve import sample_retrieval
from lvdkit.pipeline.config import CurateConfig
from lvdkit.pipeline.names import CURATE_ORDER
from lvdkit.truth import load_truth


@dataclass
class Round:
    """One finished curation of the demo and what it is scored on."""

    name: str
    out: Path
    cfg: CurateConfig
    clusters: pa.Table  # image_id, cluster (ids per level), balanced
    hits: pa.Table  # the retrieve stage's output
    seeds: pa.Table  # seed images and their embeddings


def load_round(name: str, out: Path) -> Round:
    cfg: CurateConfig = load_config(CurateConfig, out / "config.yaml")
    clusters = read_parts(out / "cluster", columns=[schema.IMAGE_ID, "cluster", schema.BALANCED])
    return Round(
        name, out, cfg, clusters, read_parts(out / "retrieve"), pq.read_table(out / "retrieve" / "seeds.parquet")
    )


def retrieval_rows(r: Round, label: dict[str, str | None], want_of: dict[str, str], k: int) -> list[list[object]]:
    """Per seed set and method: images, label match, random sample's label match."""
    pool = r.clusters[schema.IMAGE_ID]
    pool_ids = np.asarray(pool.to_pylist(), dtype=object)
    x = embeddings_of(StageInputs(str(r.out), CURATE_ORDER), r.cfg.retrieve.embedding, pool)
    rng = np.random.default_rng(0)
    rows: list[list[object]] = []
    for name in r.cfg.retrieve.seed_sets:
        mine = r.seeds.filter(np.asarray(r.seeds["seed_set"].to_pylist()) == name)
        want = want_of[mine[schema.URI][0].as_py()]  # a seed set's images share one label in the demo
        sx = mine["embedding"].combine_chunks().flatten().to_numpy().reshape(mine.num_rows, -1)
        sample = sample_retrieval(pool_ids, x, mine[schema.IMAGE_ID].to_pylist(), sx, k, name)
        cluster = r.hits.filter(np.asarray(r.hits["seed_set"].to_pylist()) == name)
        for method, table in ((f"sample-based (k={k})", sample), ("cluster-based", cluster)):
            got = table[schema.IMAGE_ID].to_pylist()
            if not got:
                rows.append([name, method, 0, None, None])
                continue
            match = float(np.mean([label[i] == want for i in got]))
            draws = [
                np.mean([label[i] == want for i in rng.choice(pool_ids, len(got), replace=False)]) for _ in range(20)
            ]
            rows.append([name, method, len(got), match, float(np.mean(draws))])
    return rows


def balance(labels: list[str | None]) -> list[object]:
    """Class spread of a set of images (the ten digits, and every photo as one class "photo"): images, classes
    present, entropy of the class shares over its maximum log(11), most / least common class."""
    counts = Counter(lab if lab.isdigit() else "photo" for lab in labels if lab is not None)
    c = np.asarray(sorted(counts.values()), np.float64)
    p = c / c.sum() if len(c) else c
    entropy = float(-(p * np.log(p)).sum() / np.log(11))
    return [len(labels), len(counts), entropy, float(c[-1] / c[0]) if len(c) else None]


def purity(r: Round, label: dict[str, str | None]) -> float:
    """Share of pool images whose level-1 cluster's most common label is theirs (labelled images only)."""
    level1 = [c[0] for c in r.clusters["cluster"].to_pylist()]
    by_cluster: dict[int, Counter[str]] = {}
    for i, c in zip(r.clusters[schema.IMAGE_ID].to_pylist(), level1, strict=True):
        if label[i] is not None:
            by_cluster.setdefault(c, Counter())[label[i]] += 1  # type: ignore[index]
    total = sum(sum(v.values()) for v in by_cluster.values())
    return sum(v.most_common(1)[0][1] for v in by_cluster.values()) / max(total, 1)


def _fmt(v: object) -> str:
    return "-" if v is None else f"{v:.3f}" if isinstance(v, float) else str(v)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("out/demo"), help="a finished curation of the demo")
    parser.add_argument("--round1", type=Path, help="an earlier round to compare with (make bootstrap: out/demo)")
    parser.add_argument("--demo", type=Path, default=Path("out/demo-data"))
    parser.add_argument("--k", type=int, default=4)
    args = parser.parse_args(argv)
    print(machine_line())
    truth = load_truth(args.demo)
    want_of = dict(zip(truth[schema.URI].to_pylist(), truth["label"].to_pylist(), strict=True))
    rounds = (
        [load_round("round 1", args.round1), load_round("round 2", args.out)]
        if args.round1
        else [load_round("run", args.out)]
    )
    ingest = read_parts(rounds[-1].out / "ingest", columns=[schema.IMAGE_ID, schema.URI])
    label = {
        i: want_of.get(u)
        for i, u in zip(ingest[schema.IMAGE_ID].to_pylist(), ingest[schema.URI].to_pylist(), strict=True)
    }

    per_round = [retrieval_rows(r, label, want_of, args.k) for r in rounds]
    for r in rounds:
        models = r.cfg.embed.models
        cl, rt = r.cfg.cluster.embedding, r.cfg.retrieve.embedding
        print(f"{r.name}: {r.out}; cluster on {cl!r} ({models.get(cl)}), retrieve on {rt!r} ({models.get(rt)})")
    head = [
        "seed set",
        "retrieval",
        *[f"{r.name}: images" for r in rounds],
        *[f"{r.name}: label match" for r in rounds],
        "random sample",
    ]
    rows = []
    for i, first in enumerate(per_round[0]):
        got = [pr[i] for pr in per_round]
        rows.append([first[0], first[1], *[g[2] for g in got], *[_fmt(g[3]) for g in got], _fmt(first[4])])
    print("\nRetrieval near the seed sets (share of retrieved images with the seed set's label):")
    print_table(head, rows)

    print("\nBalanced sample (cluster.target_size) and level-1 clusters, by the demo's labels:")
    pool_labels = [label[i] for i in rounds[-1].clusters[schema.IMAGE_ID].to_pylist()]
    brows = [["deduplicated pool", *[_fmt(v) for v in balance(pool_labels)], "-"]]
    for r in rounds:
        picked = r.clusters.filter(r.clusters[schema.BALANCED])[schema.IMAGE_ID].to_pylist()
        brows.append(
            [
                f"{r.name}: balanced sample",
                *[_fmt(v) for v in balance([label[i] for i in picked])],
                _fmt(purity(r, label)),
            ]
        )
    print_table(["set", "images", "classes", "class entropy / max", "most / least common", "level-1 purity"], brows)


if __name__ == "__main__":
    main()
