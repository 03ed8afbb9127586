"""Reading embeddings by id across embed parts (what curated's plan and the single-task stages read)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from lvdkit.core import schema
from lvdkit.core.io import part_name
from lvdkit.core.stage import StageInputs
from lvdkit.core.views import embeddings_of


def _embed_parts(out: Path, parts: int, rows: int, dim: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    col = schema.embedding_column("copy")
    truth = {}
    for p in range(parts):
        ids = [f"img{p:02d}{r:03d}" for r in range(rows)]
        x = rng.standard_normal((rows, dim)).astype(np.float32)
        truth.update(zip(ids, x, strict=True))
        (out / "embed").mkdir(parents=True, exist_ok=True)
        table = pa.table(
            {
                schema.IMAGE_ID: pa.array(ids, pa.string()),
                col: pa.FixedSizeListArray.from_arrays(pa.array(x.ravel()), dim),
            }
        )
        pq.write_table(table, out / "embed" / part_name(p))
    return truth


def test_embeddings_are_found_by_id_in_any_part_in_the_order_asked(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    truth = _embed_parts(tmp_path, parts=3, rows=40, dim=8, rng=rng)
    inputs = StageInputs(str(tmp_path), ("embed",))
    asked = list(rng.choice(sorted(truth), size=50, replace=False))
    asked += [asked[3], asked[0]]  # an image asked for twice gets its row twice
    got = embeddings_of(inputs, "copy", pa.array(asked, pa.string()))
    assert got.shape == (52, 8)
    np.testing.assert_array_equal(got, np.stack([truth[i] for i in asked]))


def test_a_missing_embedding_is_an_error_unless_allowed_then_zeros(tmp_path: Path) -> None:
    truth = _embed_parts(tmp_path, parts=2, rows=10, dim=4, rng=np.random.default_rng(1))
    inputs = StageInputs(str(tmp_path), ("embed",))
    asked = pa.array(["img01002", "not-embedded", "img00009"], pa.string())
    with pytest.raises(RuntimeError, match="lacks embeddings"):
        embeddings_of(inputs, "copy", asked)
    got = embeddings_of(inputs, "copy", asked, allow_missing=True)
    np.testing.assert_array_equal(got, np.stack([truth["img01002"], np.zeros(4, np.float32), truth["img00009"]]))
    none_found = embeddings_of(inputs, "copy", pa.array(["seed-a", "seed-b"], pa.string()), allow_missing=True)
    np.testing.assert_array_equal(none_found, np.zeros((2, 4), np.float32))  # e.g. a curated set of seeds only
