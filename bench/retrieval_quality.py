"""Retrieval quality on the demo: the share of retrieved images whose label is the seed set's label, vs random.

Reads a finished curation of the demo (``make curate``: OUT=out/demo, DEMO=out/demo-data). Cluster-based hits are
the ``retrieve`` stage's own output; sample-based hits are computed with the same function
(``lvdkit.curation.retrieve.sample_retrieval``, k=4) on the same pool and seed embeddings; the baseline is a random
sample of the pool of the same size (mean of 20 draws).

Usage: python bench/retrieval_quality.py [--out out/demo] [--demo out/demo-data] [--k 4]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
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


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("out/demo"))
    parser.add_argument("--demo", type=Path, default=Path("out/demo-data"))
    parser.add_argument("--k", type=int, default=4)
    args = parser.parse_args(argv)
    print(machine_line())
    cfg: CurateConfig = load_config(CurateConfig, args.out / "config.yaml")
    truth = load_truth(args.demo)
    label_of_uri = dict(zip(truth[schema.URI].to_pylist(), truth["label"].to_pylist(), strict=True))
    ingest = read_parts(args.out / "ingest", columns=[schema.IMAGE_ID, schema.URI])
    label = {
        i: label_of_uri.get(u)
        for i, u in zip(ingest[schema.IMAGE_ID].to_pylist(), ingest[schema.URI].to_pylist(), strict=True)
    }
    pool = read_parts(args.out / "cluster", columns=[schema.IMAGE_ID])[schema.IMAGE_ID]
    pool_ids = np.asarray(pool.to_pylist(), dtype=object)
    x = embeddings_of(StageInputs(str(args.out), CURATE_ORDER), cfg.retrieve.embedding, pool)
    seeds = pq.read_table(args.out / "retrieve" / "seeds.parquet")
    hits = read_parts(args.out / "retrieve")
    rng = np.random.default_rng(0)
    rows = []
    for name in cfg.retrieve.seed_sets:
        mine = seeds.filter(np.asarray(seeds["seed_set"].to_pylist()) == name)
        want = label_of_uri[mine[schema.URI][0].as_py()]  # a seed set's images share one label in the demo
        sx = mine["embedding"].combine_chunks().flatten().to_numpy().reshape(mine.num_rows, -1)
        sample = sample_retrieval(pool_ids, x, mine[schema.IMAGE_ID].to_pylist(), sx, args.k, name)
        cluster = hits.filter(np.asarray(hits["seed_set"].to_pylist()) == name)
        for method, table in ((f"sample-based (k={args.k})", sample), ("cluster-based", cluster)):
            got = table[schema.IMAGE_ID].to_pylist()
            if not got:
                rows.append([name, method, 0, "-", "-", "-"])
                continue
            precision = np.mean([label[i] == want for i in got])
            random = np.mean(
                [np.mean([label[i] == want for i in rng.choice(pool_ids, len(got), replace=False)]) for _ in range(20)]
            )
            rows.append([name, method, len(got), f"{precision:.3f}", f"{random:.3f}", f"{precision / random:.1f}x"])
    print(f"\npool: {len(pool_ids)} deduplicated images of {args.out}; embedding: {cfg.retrieve.embedding}")
    print_table(["seed set", "retrieval", "images", "label match", "random sample", "ratio to random"], rows)


if __name__ == "__main__":
    main()
