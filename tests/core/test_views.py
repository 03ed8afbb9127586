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
from lvdkit.core.views import embed_listing_rows, embed_parts_of, embeddings_of


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


def test_embed_parts_of_names_the_part_listing_each_image_and_null_for_an_unlisted_one(tmp_path: Path) -> None:
    """The fallback of curated's plan for a cluster output from before its ``embed_part`` column."""
    (tmp_path / "embed").mkdir()
    with pq.ParquetWriter(tmp_path / "embed" / schema.LISTING, _listing_schema()) as writer:
        for p in range(3):
            ids = pa.array([f"img{p}{r}" for r in range(4)], pa.string())
            part = pa.array(np.full(4, p, np.int64))
            writer.write_table(pa.table({schema.IMAGE_ID: ids, schema.PART: part}), row_group_size=4)
    inputs = StageInputs(str(tmp_path), ("embed",))
    got = embed_parts_of(inputs, pa.chunked_array([["img21", "nowhere", "img03", "img12"]]))
    assert got.type == pa.int32() and got.to_pylist() == [2, None, 0, 1]


def test_embed_listing_rows_reads_one_parts_row_group_in_the_order_asked_and_refuses_an_unlisted_image(
    tmp_path: Path,
) -> None:
    """What the partitioned stages read of embed's work list for one embed part (content hashes, sizes, metadata)."""
    (tmp_path / "embed").mkdir()
    with pq.ParquetWriter(tmp_path / "embed" / schema.LISTING, _listing_schema()) as writer:
        for p in range(3):
            ids = pa.array([f"img{p}{r}" for r in range(4)], pa.string())
            writer.write_table(pa.table({schema.IMAGE_ID: ids, schema.PART: pa.array(np.full(4, p))}), 4)
    inputs = StageInputs(str(tmp_path), ("embed",))
    got = embed_listing_rows(inputs, 1, pa.chunked_array([["img13", "img10"]]), [schema.PART])
    assert got.column_names == [schema.IMAGE_ID, schema.PART]
    assert got.to_pylist() == [{schema.IMAGE_ID: "img13", schema.PART: 1}, {schema.IMAGE_ID: "img10", schema.PART: 1}]
    with pytest.raises(RuntimeError, match="part 1 holds images its work list lacks"):
        embed_listing_rows(inputs, 1, pa.array(["img13", "img23"]), [schema.PART])  # img23 is part 2's


def _listing_schema() -> pa.Schema:
    return pa.schema([(schema.IMAGE_ID, pa.string()), (schema.PART, pa.int64())])
