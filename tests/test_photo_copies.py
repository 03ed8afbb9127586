"""The photo copy pool: whole families of real edits, distinct padding, truth that matches the files, reproducible."""

from __future__ import annotations

import collections
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image, ImageOps

from lvdkit.core.schema import TRUTH, TRUTH_NEAR, TRUTH_ORIGINAL
from lvdkit.photo_copies import FAMILY_SIZE, PAD_LABEL, PHOTO_EDITS, make_photo_pool, photo_tiles


@pytest.fixture(scope="module")
def pool(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[dict[str, str | None]]]:
    out = make_photo_pool(tmp_path_factory.mktemp("photos") / "p", 60, seed=3)
    return out, pq.read_table(out / "truth.parquet").to_pylist()


def grey(path: Path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image.convert("L"), dtype=np.float32)


def test_the_pool_is_whole_families_then_distinct_padding(pool: tuple[Path, list[dict]]) -> None:
    out, rows = pool
    assert pq.read_schema(out / "truth.parquet").equals(TRUTH)
    assert sorted(p.relative_to(out).as_posix() for p in (out / "pool").rglob("*.jpg")) == [r["path"] for r in rows]
    originals = [r for r in rows if r["kind"] == TRUTH_ORIGINAL and r["label"] != PAD_LABEL]
    copies = [r for r in rows if r["kind"] == TRUTH_NEAR]
    assert len(originals) == 60 // FAMILY_SIZE and len(rows) == 60
    per_original = collections.defaultdict(list)
    for c in copies:
        per_original[c["original"]].append(c["transform"])
    assert {o["path"] for o in originals} == set(per_original)
    assert all(sorted(t) == sorted(PHOTO_EDITS) for t in per_original.values())
    assert len({o["label"] for o in originals}) == len(originals)  # one family per photo quadrant


def test_copies_are_the_edits_they_claim(pool: tuple[Path, list[dict]]) -> None:
    out, rows = pool
    path_of = {r["path"]: out / r["path"] for r in rows}
    for c in (r for r in rows if r["kind"] == TRUTH_NEAR):
        original, copy = grey(path_of[c["original"]]), grey(path_of[c["path"]])
        oh, ow = original.shape
        if c["transform"] == "flip":
            with Image.open(path_of[c["original"]]) as image:
                mirrored = np.asarray(ImageOps.mirror(image.convert("L")), dtype=np.float32)
            assert copy.shape == original.shape
            assert (
                np.abs(copy - mirrored).mean() < 8
                and np.abs(copy - mirrored).mean() * 3 < np.abs(copy - original).mean()
            )
        elif c["transform"] == "shrink_jpeg":
            assert copy.shape == (oh // 2, ow // 2)
        elif c["transform"] == "crop":
            assert copy.shape[0] < oh and copy.shape[1] < ow
        elif c["transform"] == "overlay":
            assert copy.shape[0] > oh and copy.shape[1] > ow  # the border


def test_the_same_seed_gives_the_same_files_and_another_seed_other_ones(tmp_path: Path) -> None:
    def files(seed: int, name: str) -> dict[Path, bytes]:
        out = make_photo_pool(tmp_path / name, 16, seed=seed)
        return {p.relative_to(out): p.read_bytes() for p in sorted(out.rglob("*.*"))}

    assert files(1, "a") == files(1, "b")
    assert files(1, "a2") != files(2, "c")


def test_originals_are_distinct_photo_quadrants_and_padding_fills_the_rest(tmp_path: Path) -> None:
    tiles = photo_tiles()
    assert len(tiles) >= 60  # quadrants of the packaged photographs, near-flat ones left out
    assert all(float(grey_of(t).std()) >= 12 for _, t in tiles)
    rows = pq.read_table(make_photo_pool(tmp_path / "p", 20, seed=0) / "truth.parquet").to_pylist()
    assert sum(r["label"] == PAD_LABEL for r in rows) == 20 - 2 * FAMILY_SIZE
    with pytest.raises(FileExistsError, match="exists"):
        make_photo_pool(tmp_path / "p", 20)


def grey_of(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("L"), dtype=np.float32)


def test_the_leak_pool_moves_protected_originals_out_and_leaves_one_edited_copy_of_each(
    pool: tuple[Path, list[dict]], tmp_path: Path
) -> None:
    from lvdkit.core.schema import TRUTH_HELDOUT, TRUTH_LEAKED
    from lvdkit.photo_copies import make_leak_pool, photograph

    src, rows = pool
    out = make_leak_pool(src, tmp_path / "leak", rounds=2, round_index=1)
    leak_rows = pq.read_table(out / "truth.parquet").to_pylist()
    on_disk = sorted(p.relative_to(out).as_posix() for p in out.rglob("*.jpg"))
    assert on_disk == sorted(r["path"] for r in leak_rows)
    protected = [r for r in leak_rows if r["kind"] == TRUTH_HELDOUT]
    leaks = [r for r in leak_rows if r["kind"] == TRUTH_LEAKED]
    assert protected and all(r["path"].startswith("protected/") for r in protected)
    assert sorted(r["label"] for r in leaks) == sorted(r["label"] for r in protected)  # one leak per protected image
    # whole photographs: nothing else of a protected photograph stays in the pool
    protected_photos = {photograph(r["label"]) for r in protected}
    others = [r for r in leak_rows if r["kind"] not in (TRUTH_HELDOUT, TRUTH_LEAKED) and r["label"] != PAD_LABEL]
    assert others and not protected_photos & {photograph(r["label"]) for r in others}
    leak_of = {r["label"]: r["path"] for r in leaks}
    original_of = {r["label"]: r["path"] for r in rows if r["kind"] == TRUTH_NEAR}
    for r in protected:  # same bytes as the source pool's files: the original, and one of its copies
        assert (out / r["path"]).read_bytes() == (src / "pool" / r["path"].split("/", 1)[1]).read_bytes()
        assert r["label"] in original_of and (out / leak_of[r["label"]]).is_file()
    assert len(leak_rows) == len(rows) - len(protected) * (FAMILY_SIZE - 2)


def test_the_leak_rounds_leak_every_tile_once_with_the_edits_in_turn(
    pool: tuple[Path, list[dict]], tmp_path: Path
) -> None:
    from lvdkit.core.schema import TRUTH_LEAKED
    from lvdkit.photo_copies import make_leak_pool

    src, rows = pool
    tiles = sorted(r["label"] for r in rows if r["kind"] == TRUTH_ORIGINAL and r["label"] != PAD_LABEL)
    leaks = []
    for k in range(3):
        out = make_leak_pool(src, tmp_path / f"leak-{k}", rounds=3, round_index=k)
        leaks += [r for r in pq.read_table(out / "truth.parquet").to_pylist() if r["kind"] == TRUTH_LEAKED]
    assert sorted(r["label"] for r in leaks) == tiles
    per_edit = collections.Counter(r["transform"] for r in leaks)
    assert max(per_edit.values()) - min(per_edit[e] for e in PHOTO_EDITS) <= 1  # every family about as often
    with pytest.raises(ValueError, match="round_index"):
        make_leak_pool(src, tmp_path / "bad", rounds=3, round_index=3)
