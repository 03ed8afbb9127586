"""Paths: nothing read (a file list, a manifest, a listing) can make lvdkit write outside ``OUT``, and symlinks found
in the inputs are not followed out of them unless allowed."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from lvdkit.core import schema
from lvdkit.core.files import input_roots
from lvdkit.core.io import own_name, read_parts
from lvdkit.core.settings import load_config
from lvdkit.curation.ingest import IngestConfig, ingest_files, list_for_ingest
from lvdkit.pipeline.config import CurateConfig
from lvdkit.pipeline.runner import run


def _image(path: Path, seed: int) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(path)
    return path


def _tree(root: Path) -> dict[str, int]:
    """Every file under ``root`` (links not followed) with its size."""
    found = {}
    for dirpath, _, files in os.walk(root):
        for name in files:
            path = os.path.join(dirpath, name)
            found[path] = os.lstat(path).st_size
    return found


@pytest.mark.parametrize(
    "name", ["", "..", "../x.parquet", "/etc/passwd", "a/../../b", ".hidden", "a//b", "part-1.parquet\n", "a\\..\\b"]
)
def test_output_names_that_are_not_lvdkit_own_are_refused(name: str) -> None:
    with pytest.raises(ValueError, match="refusing output name"):
        own_name(name)


@pytest.mark.parametrize("name", ["part-000001.parquet", "_listing", "calibration/part-000000.parquet", "_SUCCESS"])
def test_lvdkit_own_names_pass(name: str) -> None:
    assert own_name(name) == name


@pytest.mark.usefixtures("ray_local")
def test_hostile_file_lists_and_manifests_write_nothing_outside_out(tmp_path: Path) -> None:
    """A file list full of ``..``, absolute paths and shell-looking names, and forged manifests in ``OUT``: lvdkit
    only reads what they name (quarantining what is no image) and writes only under ``OUT``."""
    data = tmp_path / "data"
    _image(data / "a.png", 0)
    _image(tmp_path / "elsewhere" / "b.png", 1)
    listing = data / "files.txt"
    listing.write_text(
        "a.png\n../elsewhere/b.png\n../../../../../../etc/hostname\n../out/../../escape.png\n"
        f"{tmp_path}/nowhere/../x.png\n$(touch {tmp_path}/ran).png\n`touch {tmp_path}/ran2`\n"
    )
    out = tmp_path / "out"
    stage = out / "ingest"
    stage.mkdir(parents=True)
    forged = {"stage": "../../forged", "parts": ["../../forged.parquet", "/tmp/forged.parquet"], "rows": 1}
    (stage / "_SUCCESS").write_text(json.dumps({**forged, "config_hash": "x", "fingerprint": "y"}))
    (stage / "_RUNNING").write_text(json.dumps({"config_hash": "../..", "fingerprint": "/etc"}))
    (stage / "_listing").write_text("/etc/passwd\n")
    before = {p: s for p, s in _tree(tmp_path).items() if not p.startswith(str(out))}

    cfg = load_config(CurateConfig, None, [f"out={out}", f"ingest.inputs=[{listing}]", "progress=false"])
    summary = run(cfg, stages=("ingest", "dedup_exact"))

    after = {p: s for p, s in _tree(tmp_path).items() if not p.startswith(str(out))}
    assert after == before  # nothing written (or removed) outside OUT
    assert not (tmp_path / "ran").exists() and not (tmp_path / "ran2").exists()
    assert summary["images_in"] == 7 and summary["kept"] == 2
    uris = read_parts(out / "ingest")[schema.URI].to_pylist()
    assert str(tmp_path / "elsewhere" / "b.png") in uris  # a list may name files anywhere: it is read, not written
    for path in _tree(out):
        rel = os.path.relpath(path, out)
        assert not rel.startswith(".."), path
        assert "forged" not in rel


def test_a_symlink_out_of_the_inputs_is_quarantined_unless_allowed(tmp_path: Path) -> None:
    inputs = tmp_path / "inputs"
    secret = _image(tmp_path / "private" / "secret.png", 0)
    _image(inputs / "ok.png", 1)
    os.symlink(secret, inputs / "to_secret.png")  # a file link out of the input folder
    os.symlink("ok.png", inputs / "to_ok.png")  # a link inside it
    os.symlink(tmp_path / "private", inputs / "linked_dir")  # a folder link: a walk does not enter it
    listing = tmp_path / "list.txt"
    listing.write_text(f"{inputs / 'to_secret.png'}\n")

    def ingest(entries: list[str], **options: object) -> dict[str, tuple[object, object]]:
        cfg = IngestConfig(**options)  # type: ignore[arg-type]
        listed = list(list_for_ingest(entries, cfg))
        table = ingest_files([u for u, _ in listed], cfg, [o for _, o in listed])
        return {
            os.path.relpath(str(r[schema.URI]), tmp_path): (r["error"], r["content_hash"]) for r in table.to_pylist()
        }

    rows = ingest([str(inputs)])
    assert set(rows) == {"inputs/ok.png", "inputs/to_ok.png", "inputs/to_secret.png"}
    assert rows["inputs/to_secret.png"] == (schema.REASON_SYMLINK_OUTSIDE, None)  # quarantined, never read
    assert rows["inputs/to_ok.png"][0] is None

    glob_rows = ingest([str(inputs / "**" / "*.png")])  # ``**`` does enter linked folders: their files are checked
    assert glob_rows["inputs/linked_dir/secret.png"][0] == schema.REASON_SYMLINK_OUTSIDE
    assert glob_rows["inputs/to_secret.png"][0] == schema.REASON_SYMLINK_OUTSIDE
    assert glob_rows["inputs/ok.png"][0] is None

    allowed = ingest([str(inputs)], follow_symlinks_outside=True)
    assert allowed["inputs/to_secret.png"][0] is None and allowed["inputs/to_secret.png"][1] is not None
    named = ingest([str(listing), str(inputs / "to_secret.png")])  # named explicitly: the user chose the file
    assert named == {"inputs/to_secret.png": (None, allowed["inputs/to_secret.png"][1])}
    both = ingest([str(inputs), str(tmp_path / "private")])  # the target folder is an input too
    assert both["inputs/to_secret.png"][0] is None


def test_input_roots_are_the_real_folders_of_the_inputs(tmp_path: Path) -> None:
    (tmp_path / "real").mkdir()
    os.symlink(tmp_path / "real", tmp_path / "alias")
    (tmp_path / "real" / "l.txt").write_text("")
    roots = input_roots([str(tmp_path / "alias"), str(tmp_path / "real" / "*.png"), str(tmp_path / "real" / "l.txt")])
    assert roots == (str((tmp_path / "real").resolve()),)
    assert input_roots(["s3://bucket/x", str(tmp_path / "real" / "one.png")]) == ()
