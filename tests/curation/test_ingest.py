"""Ingest: listing inputs, reading files (and refusing the ones that cannot be read), ids, PHash, the table."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from PIL import Image

from lvdkit.core import schema
from lvdkit.core.files import image_id, list_inputs
from lvdkit.curation.ingest import IngestConfig, ingest_files, inspect_file

CFG = IngestConfig()


def picture(width: int, height: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 256, (max(height // 8, 1), max(width // 8, 1), 3), dtype=np.uint8)
    return Image.fromarray(base, mode="RGB").resize((width, height), Image.Resampling.BILINEAR)


def write_png(path: Path, seed: int = 0, size: tuple[int, int] = (40, 32)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    picture(*size, seed=seed).save(path, "PNG")
    return path


def touch(path: Path, data: bytes = b"x") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


# --- image_id --------------------------------------------------------------------------------------------------


def test_image_id_is_stable_and_distinct() -> None:
    uris = ["/data/a.jpg", "/data/b.jpg", "/data/a.jpg ", "s3://bucket/a.jpg", "/dätä/ü.png"]
    ids = [image_id(u) for u in uris]
    assert len(set(ids)) == len(uris)
    for uri, id_ in zip(uris, ids, strict=True):
        assert len(id_) == 16 and int(id_, 16) >= 0
        assert id_ == hashlib.blake2b(uri.encode("utf-8"), digest_size=8).hexdigest()


def test_image_id_of_an_undecodable_file_name_is_the_id_of_its_recorded_uri(tmp_path: Path) -> None:
    raw = os.fsencode(tmp_path) + b"/\xff\xfe.png"  # a non-UTF-8 file name
    write_png(Path(os.fsdecode(raw)), seed=0)
    [uri] = list(list_inputs([str(tmp_path)]))
    assert uri == os.fsdecode(os.fsencode(tmp_path)) + "/\\xff\\xfe.png"  # valid UTF-8: each bad byte as \xNN
    row = ingest_files([uri], CFG).to_pylist()[0]
    assert row[schema.STATUS_COL] == schema.STATUS_OK  # the recorded uri still reads the file
    assert row[schema.IMAGE_ID] == image_id(uri) == hashlib.blake2b(uri.encode("utf-8"), digest_size=8).hexdigest()


# --- list_inputs -----------------------------------------------------------------------------------------------


def make_tree(root: Path, names: list[str]) -> None:
    for name in names:
        touch(root / name, name.encode())


TREE = ["b.png", "a.jpg", "sub/z.png", "sub/deeper/c.gif", "sub/a.txt", "other/y.JPG", "a/x.png"]


def test_folder_is_walked_recursively_in_a_deterministic_order(tmp_path: Path) -> None:
    make_tree(tmp_path / "one", TREE)
    make_tree(tmp_path / "two", list(reversed(TREE)))  # same names, created in the opposite order
    one = list(list_inputs([str(tmp_path / "one")]))
    two = list(list_inputs([str(tmp_path / "two")]))
    rel_one = [os.path.relpath(u, tmp_path / "one") for u in one]
    rel_two = [os.path.relpath(u, tmp_path / "two") for u in two]
    assert sorted(rel_one) == sorted(TREE)
    assert rel_one == rel_two  # order depends on names only, not on creation order
    assert all(os.path.isabs(u) for u in one)
    for folder in {os.path.dirname(r) for r in rel_one}:  # within each folder, files come in sorted order
        in_folder = [r for r in rel_one if os.path.dirname(r) == folder]
        assert in_folder == sorted(in_folder)
    assert one == list(list_inputs([str(tmp_path / "one")]))


def test_relative_folder_gives_absolute_paths(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    make_tree(tmp_path / "d", ["a.png", "s/b.png"])
    monkeypatch.chdir(tmp_path)
    got = list(list_inputs(["d"]))
    assert sorted(got) == sorted([str(tmp_path / "d" / "a.png"), str(tmp_path / "d" / "s" / "b.png")])


def test_extension_filter_is_case_insensitive_and_accepts_no_dot(tmp_path: Path) -> None:
    make_tree(tmp_path, TREE)
    expected = {str(tmp_path / n) for n in TREE if n.lower().endswith((".jpg", ".png"))}
    assert set(list_inputs([str(tmp_path)], [".jpg", ".png"])) == expected
    assert set(list_inputs([str(tmp_path)], ["JPG", "png"])) == expected
    assert set(list_inputs([str(tmp_path)], None)) == {str(tmp_path / n) for n in TREE}


def test_glob_matches_files_only_sorted(tmp_path: Path) -> None:
    make_tree(tmp_path, TREE)
    (tmp_path / "dir.png").mkdir()  # a folder that matches the pattern is not a file
    got = list(list_inputs([str(tmp_path / "**" / "*.png")]))
    expected = sorted(str(tmp_path / n) for n in TREE if n.endswith(".png"))
    assert got == expected
    assert list(list_inputs([str(tmp_path / "sub" / "?.png")])) == [str(tmp_path / "sub" / "z.png")]


def test_file_list_resolves_relative_paths_against_its_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    make_tree(tmp_path / "data", ["a.png", "s/b.png"])
    absolute = touch(tmp_path / "elsewhere" / "c.png")
    listing = tmp_path / "data" / "files.txt"
    listing.write_text(f"# a comment\na.png\n\n  s/b.png  \n../elsewhere/c.png\n{absolute}\n")
    monkeypatch.chdir(tmp_path / "elsewhere")  # the working directory must not matter
    got = list(list_inputs([str(listing)]))
    assert got == [str(tmp_path / "data" / "a.png"), str(tmp_path / "data" / "s" / "b.png"), str(absolute)]


def test_file_list_passes_uris_through(tmp_path: Path) -> None:
    listing = tmp_path / "list.lst"
    listing.write_text("s3://bucket/x.jpg\nrel.png\n")
    assert list(list_inputs([str(listing)])) == ["s3://bucket/x.jpg", str(tmp_path / "rel.png")]


def test_single_file_input(tmp_path: Path) -> None:
    path = touch(tmp_path / "one.png")
    assert list(list_inputs([str(path)])) == [str(path)]


def test_duplicates_across_inputs_are_listed_once(tmp_path: Path) -> None:
    make_tree(tmp_path / "d", ["a.png", "b.png", "s/c.png"])
    listing = tmp_path / "d" / "list.txt"
    listing.write_text("a.png\ns/c.png\n")
    got = list(
        list_inputs(
            [str(tmp_path / "d" / "s"), str(tmp_path / "d"), str(tmp_path / "d" / "*.png"), str(listing)],
            [".png"],
        )
    )
    assert len(got) == len(set(got))
    assert set(got) == {str(tmp_path / "d" / n) for n in ["a.png", "b.png", "s/c.png"]}
    assert got[0] == str(tmp_path / "d" / "s" / "c.png")  # first seen, first listed


def test_missing_input_raises_naming_it(tmp_path: Path) -> None:
    missing = str(tmp_path / "no_such_folder")
    with pytest.raises(FileNotFoundError, match="no_such_folder"):
        list(list_inputs([missing]))
    with pytest.raises(FileNotFoundError, match="nothing_here"):
        list(list_inputs([(tmp_path / "nothing_here").as_uri()]))


def test_no_inputs_is_an_error() -> None:
    with pytest.raises(ValueError, match=r"ingest\.inputs"):
        list(list_inputs([]))


def test_file_uri_lists_the_same_files(tmp_path: Path) -> None:
    make_tree(tmp_path / "d", TREE)
    local = list(list_inputs([str(tmp_path / "d")]))
    via_uri = list(list_inputs([(tmp_path / "d").as_uri()]))
    assert sorted(via_uri) == sorted(local)
    assert via_uri == list(list_inputs([(tmp_path / "d").as_uri()]))
    single = (tmp_path / "d" / "b.png").as_uri()
    assert list(list_inputs([single])) == [single]


def test_file_uri_is_read_through_pyarrow(tmp_path: Path) -> None:
    path = write_png(tmp_path / "img.png", seed=3)
    uri = path.as_uri()
    assert uri.startswith("file://")
    via_uri, local = inspect_file(uri, CFG), inspect_file(str(path), CFG)
    assert via_uri["status"] == schema.STATUS_OK
    assert via_uri[schema.URI] == uri
    assert via_uri[schema.IMAGE_ID] == image_id(uri)
    for key in ("content_hash", "size_bytes", "phash", "width", "height", "format", "mode"):
        assert via_uri[key] == local[key]


def test_file_uri_larger_than_limit_is_refused(tmp_path: Path) -> None:
    path = touch(tmp_path / "big.bin", b"\0" * 2048)
    row = inspect_file(path.as_uri(), IngestConfig(max_file_mb=1 / 1024))
    assert row["error"] == schema.REASON_FILE_TOO_LARGE


# --- reading: files that cannot be read --------------------------------------------------------------------------


def test_file_larger_than_max_file_mb(tmp_path: Path) -> None:
    cfg = IngestConfig(max_file_mb=1 / 1024)  # exactly 1024 bytes
    at_limit = touch(tmp_path / "at.jpg", b"t" * 1024)
    over = touch(tmp_path / "over.jpg", b"t" * 1025)
    row = inspect_file(str(over), cfg)
    assert row["status"] == schema.STATUS_QUARANTINED
    assert row["error"] == schema.REASON_FILE_TOO_LARGE
    assert row.get("content_hash") is None  # not read
    assert inspect_file(str(at_limit), cfg)["error"] == schema.REASON_NOT_IMAGE  # read, then found not an image

    image = write_png(tmp_path / "img.png", size=(64, 64))
    assert inspect_file(str(image), IngestConfig(max_file_mb=image.stat().st_size / 2**20))["status"] == "ok"
    small = IngestConfig(max_file_mb=(image.stat().st_size - 1) / 2**20)
    assert inspect_file(str(image), small)["error"] == schema.REASON_FILE_TOO_LARGE


def test_directory_is_not_a_regular_file(tmp_path: Path) -> None:
    folder = tmp_path / "looks_like.jpg"
    folder.mkdir()
    row = inspect_file(str(folder), CFG)
    assert row["status"] == schema.STATUS_QUARANTINED
    assert row["error"] == schema.REASON_NOT_FILE
    assert row[schema.URI] == str(folder)


def test_fifo_is_not_a_regular_file_and_is_not_read(tmp_path: Path) -> None:
    fifo = tmp_path / "pipe.jpg"
    os.mkfifo(fifo)  # reading it would block forever
    assert inspect_file(str(fifo), CFG)["error"] == schema.REASON_NOT_FILE


def test_file_without_read_permission_is_unreadable(tmp_path: Path) -> None:
    path = write_png(tmp_path / "locked.png")
    path.chmod(0)
    try:
        if os.access(path, os.R_OK):
            pytest.skip("running with privileges that read any file (root)")
        row = inspect_file(str(path), CFG)
        assert row["status"] == schema.STATUS_QUARANTINED
        assert row["error"] == schema.REASON_UNREADABLE
        assert "Permission" in str(row["error_detail"])
    finally:
        path.chmod(0o644)


def test_dangling_symlink_is_unreadable(tmp_path: Path) -> None:
    link = tmp_path / "gone.png"
    link.symlink_to(tmp_path / "target_that_does_not_exist.png")
    assert list(list_inputs([str(tmp_path)])) == [str(link)]  # listed (lexists) ...
    assert inspect_file(str(link), CFG)["error"] == schema.REASON_UNREADABLE  # ... but cannot be read


def test_file_removed_after_listing_is_unreadable(tmp_path: Path) -> None:
    path = write_png(tmp_path / "soon_gone.png")
    uris = list(list_inputs([str(tmp_path)]))
    path.unlink()
    assert inspect_file(uris[0], CFG)["error"] == schema.REASON_UNREADABLE


def test_symlink_to_an_image_is_read(tmp_path: Path) -> None:
    target = write_png(tmp_path / "real.png", seed=4)
    link = tmp_path / "link.png"
    link.symlink_to(target)
    row, real = inspect_file(str(link), CFG), inspect_file(str(target), CFG)
    assert row["status"] == schema.STATUS_OK
    assert row["content_hash"] == real["content_hash"]
    assert row[schema.IMAGE_ID] != real[schema.IMAGE_ID]  # ids are per uri


# --- phash -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("fmt", "ext"), [("PNG", ".png"), ("JPEG", ".jpg")])
def test_phash_equals_imagededup_on_the_file(tmp_path: Path, fmt: str, ext: str) -> None:
    from imagededup.methods import PHash

    hasher = PHash(verbose=False)
    for seed in range(3):
        path = tmp_path / f"img{seed}{ext}"
        picture(96, 64, seed=seed).save(path, fmt)
        row = inspect_file(str(path), CFG)
        assert row["phash"] == int(hasher.encode_image(image_file=str(path)), 16)


def test_phash_can_be_switched_off(tmp_path: Path) -> None:
    path = write_png(tmp_path / "a.png")
    row = inspect_file(str(path), IngestConfig(phash=False))
    assert row["status"] == schema.STATUS_OK
    assert row.get("phash") is None


# --- ingest_files ----------------------------------------------------------------------------------------------


def test_ingest_files_table_has_one_row_per_uri_in_order(tmp_path: Path) -> None:
    good = [write_png(tmp_path / f"g{i}.png", seed=i) for i in range(3)]
    empty = touch(tmp_path / "empty.jpg", b"")
    text = touch(tmp_path / "text.jpg", b"hello")
    folder = tmp_path / "folder.png"
    folder.mkdir()
    uris = [str(good[2]), str(empty), str(good[0]), str(folder), str(text), str(good[1])]
    table = ingest_files(uris, CFG)
    assert table.schema == schema.INGEST
    assert table.num_rows == len(uris)
    assert table[schema.URI].to_pylist() == uris
    assert table[schema.IMAGE_ID].to_pylist() == [image_id(u) for u in uris]
    assert table["status"].to_pylist() == ["ok", "quarantined", "ok", "quarantined", "quarantined", "ok"]
    assert table["error"].to_pylist() == [
        None,
        schema.REASON_EMPTY,
        None,
        schema.REASON_NOT_FILE,
        schema.REASON_NOT_IMAGE,
        None,
    ]
    assert table["content_hash"].to_pylist()[0] == hashlib.blake2b(good[2].read_bytes(), digest_size=16).hexdigest()
    assert table["width"].to_pylist() == [40, None, 40, None, None, 40]
    assert table["image_bytes"].null_count == len(uris)  # keep_bytes is off by default
    assert table["phash"].type == pa.uint64()
    assert table["phash"].null_count == 3


def test_ingest_files_keep_bytes(tmp_path: Path) -> None:
    paths = [write_png(tmp_path / "a.png", seed=1), touch(tmp_path / "b.jpg", b"not an image")]
    table = ingest_files([str(p) for p in paths], IngestConfig(keep_bytes=True))
    assert table["image_bytes"].to_pylist() == [p.read_bytes() for p in paths]


def test_ingest_files_of_nothing_is_an_empty_table() -> None:
    table = ingest_files([], CFG)
    assert table.num_rows == 0
    assert table.schema == schema.INGEST


def test_ingest_of_a_listed_folder_reads_every_image_in_listing_order(tmp_path: Path) -> None:
    for i in range(4):
        write_png(tmp_path / f"s{i % 2}" / f"{i}.png", seed=i)
    uris = list(list_inputs([str(tmp_path)], [".png"]))
    table = ingest_files(uris, CFG)
    assert table[schema.URI].to_pylist() == [str(tmp_path / f"s{i % 2}" / f"{i}.png") for i in (0, 2, 1, 3)]
    assert set(table["status"].to_pylist()) == {"ok"}
    assert len(set(table["phash"].to_pylist())) == 4
