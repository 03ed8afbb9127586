"""A run touches only an OUT lvdkit made, one run at a time, never overlapping its inputs (no Ray needed: every check
happens before Ray starts)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from lvdkit.cli import main
from lvdkit.core.settings import load_config
from lvdkit.pipeline.config import CurateConfig
from lvdkit.pipeline.manifest import RunKey, prepare
from lvdkit.pipeline.ownership import LOCK, MARKER, OutputFolderError, claim, locked
from lvdkit.pipeline.runner import run


def _cfg(out: Path, inputs: Path) -> CurateConfig:
    return load_config(CurateConfig, None, [f"out={out}", f"ingest.inputs=[{inputs}]", "progress=false"])


@pytest.fixture()
def pool(tmp_path: Path) -> Path:
    folder = tmp_path / "pool"
    folder.mkdir()
    (folder / "a.png").write_bytes(b"not even an image")
    return folder


def _user_folder(tmp_path: Path) -> Path:
    """A folder of a user's own files, named like lvdkit's outputs."""
    out = tmp_path / "mine"
    (out / "ingest").mkdir(parents=True)
    (out / "ingest" / "important_thesis.txt").write_text("years of work")
    (out / "config.yaml").write_text("my: own config\n")
    return out


def test_a_non_empty_folder_lvdkit_did_not_make_is_refused_and_left_untouched(tmp_path: Path, pool: Path) -> None:
    out = _user_folder(tmp_path)
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    with pytest.raises(OutputFolderError, match=f"did not create \\(no {MARKER}"):
        run(_cfg(out, pool))
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before


def test_the_cli_says_so_with_exit_status_2(tmp_path: Path, pool: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = _user_folder(tmp_path)
    assert main(["curate", f"out={out}", f"ingest.inputs=[{pool}]"]) == 2
    assert "lvdkit: error:" in capsys.readouterr().err
    assert (out / "ingest" / "important_thesis.txt").read_text() == "years of work"


def test_a_new_or_empty_folder_is_claimed_and_a_pre_marker_run_folder_adopted(tmp_path: Path) -> None:
    claim(tmp_path / "new")
    assert (tmp_path / "new" / MARKER).is_file()
    (tmp_path / "empty").mkdir()
    claim(tmp_path / "empty")
    old = tmp_path / "old_run"
    (old / "ingest").mkdir(parents=True)
    (old / "ingest" / "_SUCCESS").write_text("")  # Spark writes empty _SUCCESS files: not lvdkit's
    with pytest.raises(OutputFolderError):
        claim(old)
    (old / "ingest" / "_SUCCESS").write_text(json.dumps({"stage": "ingest", "config_hash": "0123"}))
    claim(old)
    assert (old / MARKER).is_file()


def test_a_stage_folder_without_lvdkit_records_is_not_removed(tmp_path: Path) -> None:
    stage = tmp_path / "ingest"
    stage.mkdir()
    (stage / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="refusing to remove"):
        prepare(stage, RunKey("a", "b"), force=True)
    assert (stage / "notes.txt").read_text() == "mine"
    (stage / "_RUNNING").write_text("{}")  # lvdkit's own folder from an interrupted run: cleaned
    assert prepare(stage, RunKey("a", "b"), force=True) == "fresh"
    assert not (stage / "notes.txt").exists()


def test_a_second_run_on_a_held_out_is_refused_naming_the_holder(tmp_path: Path, pool: Path) -> None:
    out = tmp_path / "out"
    claim(out)
    with locked(out):
        held = json.loads((out / LOCK).read_text())
        assert held["pid"] == os.getpid()
        with pytest.raises(OutputFolderError, match=f"in use by another lvdkit run \\(pid {os.getpid()}"):
            run(_cfg(out, pool))
    assert not (out / LOCK).exists()  # released


def test_a_dead_runs_lock_is_taken_over_and_another_hosts_is_not(tmp_path: Path) -> None:
    out = tmp_path / "out"
    claim(out)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (out / LOCK).write_text(json.dumps({"host": socket.gethostname(), "pid": dead.pid, "since": 0, "token": "x"}))
    with locked(out):
        assert json.loads((out / LOCK).read_text())["pid"] == os.getpid()
    (out / LOCK).write_text("{torn")  # a writer killed mid-write: stale too
    with locked(out):
        pass
    (out / LOCK).write_text(json.dumps({"host": "another-node", "pid": 1, "since": 0, "token": "y"}))
    with pytest.raises(OutputFolderError, match="host another-node"), locked(out):
        pass
    assert json.loads((out / LOCK).read_text())["token"] == "y"  # not taken


@pytest.mark.parametrize("where", ["inside", "around"])
def test_out_overlapping_the_inputs_is_refused(tmp_path: Path, pool: Path, where: str) -> None:
    if where == "inside":
        out, inputs = pool / "out", pool
    else:
        out, inputs = tmp_path, pool
    with pytest.raises(OutputFolderError, match="overlap"):
        run(_cfg(out, inputs))
    assert not (out / MARKER).exists()
