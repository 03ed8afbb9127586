"""The demo dataset: files on disk agree with truth.parquet, copies are what they claim, and runs are reproducible."""

from __future__ import annotations

import collections
import hashlib
import posixpath
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from PIL import Image, ImageOps

from lvdkit.core.schema import (
    TRUTH,
    TRUTH_BROKEN,
    TRUTH_EXACT,
    TRUTH_HELDOUT,
    TRUTH_LEAKED,
    TRUTH_NEAR,
    TRUTH_ORIGINAL,
    TRUTH_SEED,
)
from lvdkit.demo import NEAR_TRANSFORMS, ODD_MODES, SEED_DIGITS, TRUTH_FILE, make_demo

N_PER_DIGIT = 12
PILLOW_MAX_PIXELS = 1024 * 1024 * 1024 // 4 // 3  # Pillow's default decompression-bomb limit


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[dict[str, str | None]]]:
    out = tmp_path_factory.mktemp("demo")
    table = make_demo(out, seed=0, n_per_digit=N_PER_DIGIT, progress=False)
    return out, table.to_pylist()


@pytest.fixture(autouse=True)
def default_pixel_limit(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", PILLOW_MAX_PIXELS)


def files_on_disk(out: Path) -> dict[str, bytes]:
    return {p.relative_to(out).as_posix(): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}


def by_kind(rows: list[dict[str, str | None]], kind: str) -> list[dict[str, str | None]]:
    return [r for r in rows if r["kind"] == kind]


def decode(path: Path) -> Image.Image:
    with Image.open(path) as image:
        image.load()
        return image


def test_one_truth_row_per_file(demo: tuple[Path, list[dict[str, str | None]]]) -> None:
    out, rows = demo
    paths = [r["path"] for r in rows]
    assert len(paths) == len(set(paths))
    assert set(files_on_disk(out)) - {TRUTH_FILE} == set(paths)
    written = pq.read_table(out / TRUTH_FILE)
    assert written.schema.equals(TRUTH)
    assert written.to_pylist() == rows


def test_kinds_and_counts(demo: tuple[Path, list[dict[str, str | None]]]) -> None:
    _, rows = demo
    kinds = collections.Counter(r["kind"] for r in rows)
    originals = kinds[TRUTH_ORIGINAL]
    assert originals > 10 * N_PER_DIGIT // 2 + 20  # most MNIST images plus the photos
    assert 1 <= kinds[TRUTH_EXACT] <= 0.05 * originals
    assert len(NEAR_TRANSFORMS) <= kinds[TRUTH_NEAR] <= 0.1 * originals
    near = collections.Counter(r["transform"] for r in by_kind(rows, TRUTH_NEAR))
    assert set(near) == set(NEAR_TRANSFORMS) and max(near.values()) - min(near.values()) <= 1
    broken = collections.Counter(r["transform"] for r in by_kind(rows, TRUTH_BROKEN))
    assert set(broken) == {"empty", "truncated", "text", "huge_header"} and min(broken.values()) >= 3
    odd = [r["transform"] for r in by_kind(rows, TRUTH_ORIGINAL) if r["transform"] is not None]
    assert sorted(odd) == sorted(ODD_MODES)
    labels = {r["label"] for r in by_kind(rows, TRUTH_ORIGINAL)}
    assert {str(d) for d in range(10)} | {"astronaut", "camera", "coffee", "china", "flower"} <= labels
    seeds = collections.Counter((r["seed_set"], r["label"]) for r in by_kind(rows, TRUTH_SEED))
    assert seeds == {(f"digit_{d}", str(d)): N_PER_DIGIT // 5 for d in SEED_DIGITS}
    kind_of = {r["path"]: r for r in rows}
    heldout = collections.Counter(r["label"] for r in by_kind(rows, TRUTH_HELDOUT))
    assert set(heldout) == {str(d) for d in range(10)} and min(heldout.values()) >= 2
    for r in rows:
        top = str(r["path"]).split("/")[0]
        assert top == {TRUTH_SEED: "seeds", TRUTH_HELDOUT: "heldout"}.get(str(r["kind"]), "raw")
        assert (r["original"] is not None) == (r["kind"] in (TRUTH_EXACT, TRUTH_NEAR, TRUTH_LEAKED))
    leaked = by_kind(rows, TRUTH_LEAKED)
    assert leaked and all(kind_of[r["original"]]["kind"] == TRUTH_HELDOUT for r in leaked)


def test_copies_point_at_originals(demo: tuple[Path, list[dict[str, str | None]]]) -> None:
    out, rows = demo
    kind_of = {r["path"]: r for r in rows}
    for r in by_kind(rows, TRUTH_EXACT) + by_kind(rows, TRUTH_NEAR):
        original = kind_of[r["original"]]
        assert original["kind"] == TRUTH_ORIGINAL and original["label"] == r["label"]
        copy, source = str(r["path"]), str(r["original"])
        assert posixpath.dirname(copy) != posixpath.dirname(source)
        assert posixpath.basename(copy) != posixpath.basename(source)
        same = (out / copy).read_bytes() == (out / source).read_bytes()
        assert same == (r["kind"] == TRUTH_EXACT)


def test_broken_files_do_not_decode(demo: tuple[Path, list[dict[str, str | None]]]) -> None:
    out, rows = demo
    for r in by_kind(rows, TRUTH_BROKEN):
        assert r["label"] is None and r["original"] is None
        with pytest.raises((OSError, Image.DecompressionBombError)):
            decode(out / str(r["path"]))
    assert all((out / str(r["path"])).stat().st_size == 0 for r in rows if r["transform"] == "empty")


def test_good_files_decode(demo: tuple[Path, list[dict[str, str | None]]]) -> None:
    out, rows = demo
    expected_mode = {"cmyk": "CMYK", "palette": "P", "gray16": "I;16", "gray": "L", "animated": "P"}
    by_path = {r["path"]: r for r in rows}
    for r in rows:
        if r["kind"] == TRUTH_BROKEN:
            continue
        image = decode(out / str(r["path"]))
        stored_as = by_path[r["original"]] if r["kind"] == TRUTH_EXACT else r  # a byte copy keeps the odd mode
        odd = stored_as["transform"] if stored_as["kind"] == TRUTH_ORIGINAL else None
        assert image.mode == expected_mode.get(str(odd), "RGB"), r
        assert min(image.size) >= 28
    for r in by_kind(rows, TRUTH_ORIGINAL):
        with Image.open(out / str(r["path"])) as stored:
            if r["transform"] == "animated":
                assert getattr(stored, "n_frames", 1) >= 2
            elif r["transform"] == "palette":
                assert "transparency" in stored.info
            elif r["transform"] == "exif_rotated":
                assert stored.getexif().get(0x0112) == 6  # Orientation
                assert ImageOps.exif_transpose(stored).size == stored.size[::-1] != stored.size


def test_seeds_and_heldout_are_not_in_the_pool(demo: tuple[Path, list[dict[str, str | None]]]) -> None:
    out, rows = demo
    digest = {path: hashlib.blake2b(data).digest() for path, data in files_on_disk(out).items()}
    pool = {digest[str(r["path"])] for r in rows if str(r["path"]).startswith("raw/")}
    for r in by_kind(rows, TRUTH_SEED) + by_kind(rows, TRUTH_HELDOUT):
        assert digest[str(r["path"])] not in pool


def test_same_seed_same_bytes_other_seed_differs(
    demo: tuple[Path, list[dict[str, str | None]]], tmp_path: Path
) -> None:
    out, rows = demo
    again = make_demo(tmp_path / "again", seed=0, n_per_digit=N_PER_DIGIT, progress=False)
    assert again.to_pylist() == rows
    assert files_on_disk(tmp_path / "again") == files_on_disk(out)
    other = make_demo(tmp_path / "other", seed=1, n_per_digit=N_PER_DIGIT, progress=False)
    assert other.to_pylist() != rows
    assert files_on_disk(tmp_path / "other") != files_on_disk(out)


def test_refuses_to_overwrite_unless_asked(tmp_path: Path) -> None:
    make_demo(tmp_path, n_per_digit=5, progress=False)
    with pytest.raises(FileExistsError, match=TRUTH_FILE):
        make_demo(tmp_path, n_per_digit=5, progress=False)
    stale = tmp_path / "raw" / "stale.jpg"
    stale.write_bytes(b"left over")
    table = make_demo(tmp_path, seed=3, n_per_digit=5, progress=False, overwrite=True)
    assert not stale.exists()
    assert set(files_on_disk(tmp_path)) - {TRUTH_FILE} == set(table.column("path").to_pylist())


def test_rejects_impossible_sizes(tmp_path: Path) -> None:
    for n in (4, 501):
        with pytest.raises(ValueError, match="n_per_digit"):
            make_demo(tmp_path, n_per_digit=n, progress=False)
    assert not any(tmp_path.iterdir())
