"""Hostile inputs (tests/faults/corpus.py) end kept or quarantined with a specific reason, file by file and in a
whole ``lvdkit curate`` run that exits 0, keeps its funnel invariant and reports how many were quarantined."""

from __future__ import annotations

import json
import os
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from lvdkit.cli import main
from lvdkit.core import schema
from lvdkit.core.files import image_id, list_inputs, local_path, read_bytes
from lvdkit.core.image import decode
from lvdkit.curation.ingest import IngestConfig, ingest_files, inspect_file, list_for_ingest

from ..conftest import TINY_EMBED
from .corpus import (
    DUPLICATE,
    GOOD,
    KEPT,
    QUARANTINED,
    UNLISTED,
    Case,
    cannot_remove_read_permission,
    corpus_inputs,
    encoded,
    jpeg_corrupt_entropy,
    make_corpus,
    picture,
    png_bad_crc,
)

CFG = IngestConfig()


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[Case]]:
    root = tmp_path_factory.mktemp("faults")
    return root, make_corpus(root)


def _listed(cases: list[Case]) -> list[Case]:
    return [c for c in cases if c.outcome != UNLISTED]


def test_corpus_has_the_kinds_the_issue_asks_for(corpus: tuple[Path, list[Case]]) -> None:
    _, cases = corpus
    kinds = {c.kind for c in cases if c.kind != GOOD}
    assert len(kinds) >= 20
    assert sum(c.kind == GOOD for c in cases) >= 10
    assert {c.outcome for c in cases} == {KEPT, DUPLICATE, QUARANTINED, UNLISTED}
    assert all(c.reason in schema.REASONS for c in cases if c.outcome == QUARANTINED)
    assert len({c.uri for c in cases}) == len(cases)  # one case per file


def test_listing_names_every_file_once_as_utf8_and_never_a_folder(corpus: tuple[Path, list[Case]]) -> None:
    root, cases = corpus
    listed = list(list_inputs(corpus_inputs(root)))  # a symlink loop and a link to a parent folder do not hang it
    assert len(listed) == len(set(listed))  # good_00.jpg is walked and named by extra.txt: listed once
    assert set(listed) == {c.uri for c in _listed(cases)}
    assert pa.array(listed, pa.string()).null_count == 0  # the listing is written as an Arrow string column
    for case in cases:
        if case.outcome == UNLISTED:  # a folder (or a link to one) is walked, not read; named directly it is no file
            assert inspect_file(str(case.path), CFG)["error"] == schema.REASON_NOT_FILE


def test_inspect_file_gives_every_case_its_pinned_outcome(corpus: tuple[Path, list[Case]]) -> None:
    root, cases = corpus
    outside = dict(list_for_ingest(corpus_inputs(root), CFG))  # what the listing says of links out of the inputs
    assert [u for u, o in outside.items() if o is not None] == [
        c.uri for c in cases if c.kind == "symlink_outside_inputs"
    ]
    got: dict[str, tuple[object, ...]] = {}
    want: dict[str, tuple[object, ...]] = {}
    for case in _listed(cases):
        row = inspect_file(os.fsdecode(case.fspath), CFG, outside[case.uri])
        assert row[schema.URI] == case.uri and row[schema.IMAGE_ID] == image_id(case.uri)
        key = f"{case.kind}:{case.uri.rsplit('/', 1)[-1][:40]}"
        if case.outcome == QUARANTINED:
            got[key] = (row["status"], row["error"])
            want[key] = (schema.STATUS_QUARANTINED, case.reason)
            assert row["error_detail"], key
        else:
            got[key] = (row["status"], row.get("error"), row["format"], (row["width"], row["height"]))
            want[key] = (schema.STATUS_OK, None, case.fmt or row["format"], case.size or (row["width"], row["height"]))
            assert row["phash"] is not None and row["content_hash"], key
            if case.mode is not None:
                assert (row["mode"], row["n_frames"]) == (case.mode, case.n_frames), key
    assert got == want


def test_the_whole_listing_becomes_one_arrow_table(corpus: tuple[Path, list[Case]]) -> None:
    root, _ = corpus
    uris = list(list_inputs(corpus_inputs(root)))
    table = ingest_files(uris, IngestConfig(phash=False))  # raised on the non-UTF-8 name before the uri escaping
    assert table.schema == schema.INGEST and table[schema.URI].to_pylist() == uris


def test_non_utf8_name_is_recorded_escaped_and_read_back(corpus: tuple[Path, list[Case]]) -> None:
    _, cases = corpus
    (case,) = (c for c in cases if c.kind == "non_utf8_name")
    assert isinstance(case.path, bytes)
    assert case.uri.endswith("/bad_\\xff\\xfe.jpg")  # the bytes, spelled out: valid UTF-8
    assert local_path(case.uri) == os.fsdecode(case.path)
    with open(case.path, "rb") as fh:
        assert read_bytes(case.uri, 2**20) == fh.read()
    literal = next(c for c in cases if c.kind == "literal_backslash_x_name")
    assert local_path(literal.uri) == literal.uri == str(literal.path)  # a real backslash name is not unescaped


def test_corrupt_huffman_data_decodes_to_garbage_and_a_bad_idat_crc_to_the_right_pixels() -> None:
    clean = encoded(picture(1, 96, 96), "JPEG", quality=90)
    garbage = np.asarray(decode(jpeg_corrupt_entropy(clean), CFG.max_pixels).image, dtype=np.float64)
    assert np.abs(garbage - np.asarray(decode(clean, CFG.max_pixels).image, dtype=np.float64)).mean() > 20
    png = encoded(picture(2, 64, 48), "PNG")
    assert np.array_equal(
        np.asarray(decode(png_bad_crc(png, b"IDAT"), CFG.max_pixels).image),
        np.asarray(decode(png, CFG.max_pixels).image),
    )


def test_files_that_change_or_vanish_between_listing_and_reading(tmp_path: Path) -> None:
    names = ["gone.jpg", "shrunk.jpg", "now_a_dir.jpg", "link.jpg", "same.jpg", "target.jpg"]
    for k, name in enumerate(names):
        if name != "link.jpg":
            (tmp_path / name).write_bytes(encoded(picture(k, 64, 64), "JPEG"))
    os.symlink("target.jpg", tmp_path / "link.jpg")
    listed = list(list_inputs([str(tmp_path)]))
    assert [os.path.basename(u) for u in listed] == sorted(names)

    (tmp_path / "gone.jpg").unlink()
    shrunk = (tmp_path / "shrunk.jpg").read_bytes()
    (tmp_path / "shrunk.jpg").write_bytes(shrunk[: len(shrunk) // 2])  # rewritten, half as long
    (tmp_path / "now_a_dir.jpg").unlink()
    (tmp_path / "now_a_dir.jpg").mkdir()
    (tmp_path / "target.jpg").rename(tmp_path / "moved.jpg")  # the link now dangles

    table = ingest_files(listed, CFG)
    got = {
        os.path.basename(u): e for u, e in zip(table[schema.URI].to_pylist(), table["error"].to_pylist(), strict=True)
    }
    assert got == {
        "gone.jpg": schema.REASON_UNREADABLE,
        "shrunk.jpg": schema.REASON_TRUNCATED,
        "now_a_dir.jpg": schema.REASON_NOT_FILE,
        "link.jpg": schema.REASON_UNREADABLE,
        "same.jpg": None,
        "target.jpg": schema.REASON_UNREADABLE,
    }


def test_file_without_read_permission_is_unreadable(tmp_path: Path) -> None:
    why = cannot_remove_read_permission()
    if why is not None:
        pytest.skip(why)
    path = tmp_path / "locked.jpg"
    path.write_bytes(encoded(picture(0, 64, 64), "JPEG"))
    path.chmod(0)
    row = inspect_file(str(path), CFG)
    assert (row["status"], row["error"]) == (schema.STATUS_QUARANTINED, schema.REASON_UNREADABLE)
    assert "PermissionError" in str(row["error_detail"])


@pytest.mark.usefixtures("ray_local")
def test_curate_over_the_corpus_exits_0_and_ends_every_file_as_pinned(
    corpus: tuple[Path, list[Case]], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root, cases = corpus
    out = tmp_path / "out"
    inputs = ",".join(corpus_inputs(root))
    # The tiny random-init embedder carries no copy signal: its calibrated dedup_copy threshold (about -0.03 here)
    # would link unrelated images. A fixed high threshold keeps the stage running while only real copies could match.
    fixed = "dedup_copy.threshold=0.99"
    args = (f"out={out}", f"ingest.inputs=[{inputs}]", "ingest.files_per_part=32", "progress=false", fixed)
    # `lvdkit curate` in this process, on the session's local Ray (its workers warm: no start-up per run)
    capsys.readouterr()
    code = main(["curate", *args, *TINY_EMBED])
    result = capsys.readouterr()
    assert code == 0, result.err[-3000:]
    listed = _listed(cases)
    n_quarantined = sum(c.outcome == QUARANTINED for c in listed)
    by_reason = Counter(str(c.reason) for c in listed if c.outcome == QUARANTINED)
    assert f"quarantined: {n_quarantined} {dict(sorted(by_reason.items()))}" in result.out

    summary = json.loads((out / "summary.json").read_text())
    assert summary["images_in"] == summary["kept"] + summary["duplicates"] + summary["quarantined"] == len(listed)
    assert summary["quarantined"] == n_quarantined
    assert summary["quarantined_by_reason"] == dict(by_reason)

    status = pq.read_table(out / "status.parquet").to_pylist()
    assert len(status) == len({r[schema.URI] for r in status}) == len(listed)  # exactly one row per listed file
    final = {r[schema.URI]: r for r in status}
    got = {c.uri: (final[c.uri]["status"], final[c.uri]["reason"]) for c in listed}
    want = {c.uri: c.expected for c in listed}
    assert got == want
    originals = {"exact_copy": "good_01.png", "symlink_to_image": "good_00.jpg"}
    for case in listed:
        if case.outcome == DUPLICATE:
            original = next(c for c in cases if c.kind == GOOD and str(c.path).endswith("/" + originals[case.kind]))
            assert final[case.uri][schema.DUP_OF] == image_id(original.uri)
