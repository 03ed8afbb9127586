"""Failing part tasks, a full disk and files that change under a run: each is retried, reported with the files it
concerns, or quarantined as configured, and a rerun recovers to what a clean run gives."""

from __future__ import annotations

import json
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
from PIL import Image

from lvdkit.core import schema
from lvdkit.core.io import DiskFullError, part_files, read_parts
from lvdkit.core.settings import load_config
from lvdkit.curation.curated import ChangedSinceIngest
from lvdkit.embeddings.stage import EmbedInputError
from lvdkit.pipeline.config import CurateConfig
from lvdkit.pipeline.runner import StageError, run

from ..conftest import TINY_EMBED

FILES_PER_PART = 40  # 4 parts of the small demo's 124 files


def _args(out: Path, demo: Path, *extra: str) -> list[str]:
    return [
        f"out={out}",
        f"ingest.inputs=[{demo / 'raw'}]",
        f"ingest.files_per_part={FILES_PER_PART}",
        "progress=false",
        "ray.num_cpus=2",
        *extra,
    ]


def _ingest(out: Path, demo: Path, *extra: str) -> dict[str, object]:
    return run(load_config(CurateConfig, None, _args(out, demo, *extra)), stages=("ingest",))


def _sorted(table: pa.Table) -> pa.Table:
    return table.sort_by(schema.IMAGE_ID)


def _assert_every_part_is_complete(out: Path) -> None:
    for part in out.rglob("part-*.parquet"):
        assert pq.read_table(part).num_rows == pq.ParquetFile(part).metadata.num_rows, part


@pytest.fixture(scope="module")
def clean_run(pool_run: tuple[Path, dict]) -> Path:
    """OUT of an undisturbed ingest with ``_args``' ingest settings: the session's pool_run (raw pool, parts of 40
    files); never written to: tests copy its stage."""
    out = pool_run[0]
    assert load_config(CurateConfig, out / "config.yaml").ingest.files_per_part == FILES_PER_PART
    assert len(part_files(out / "ingest")) == 4
    return out


@pytest.fixture(scope="module")
def clean(clean_run: Path) -> pa.Table:
    """The ingest table of an undisturbed run."""
    return read_parts(clean_run / "ingest")


def _finished_ingest(clean_run: Path, out: Path) -> Path:
    """A copy of the undisturbed run's finished ingest in ``out`` (what ``_ingest(out, demo)`` would write)."""
    shutil.copytree(clean_run / "ingest", out / "ingest")
    return out / "ingest"


@pytest.fixture()
def victim(clean: pa.Table) -> str:
    """A usable image of the second part."""
    return str(clean[schema.URI][FILES_PER_PART + 5].as_py())


# --- a failing part task -----------------------------------------------------------------------------------------


@pytest.mark.usefixtures("ray_local")
@pytest.mark.parametrize("mode", ["raise", "crash"])
def test_a_part_that_fails_once_is_retried_and_the_stage_completes(
    mode: str, clean: pa.Table, small_demo: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``raise``: the part's code raises (retried inside the task); ``crash``: its worker process dies (Ray retries
    the task in a new worker). Every part (``crash``: part 1) fails on its first attempt."""
    markers = tmp_path / "markers"
    markers.mkdir()
    monkeypatch.setenv("LVDKIT_TEST_FAIL_ONCE", "ingest" if mode == "raise" else "ingest:crash:1")
    monkeypatch.setenv("LVDKIT_TEST_FAIL_DIR", str(markers))
    out = tmp_path / "out"
    _ingest(out, small_demo)
    failed = [f"ingest-{i}" for i in (range(4) if mode == "raise" else [1])]
    assert sorted(p.name for p in markers.iterdir()) == failed  # each failed once
    assert _sorted(read_parts(out / "ingest")).equals(_sorted(clean))
    assert not list((out / "ingest").glob(".*"))


@pytest.mark.usefixtures("ray_local")
def test_a_worker_that_always_dies_is_retried_a_bounded_number_of_times_and_named(
    clean: pa.Table, small_demo: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Ray Data alone would retry a task whose worker keeps dying forever (a file that crashes the decoder)."""
    monkeypatch.setenv("LVDKIT_TEST_CRASH_ALWAYS", "ingest:2")
    out = tmp_path / "out"
    with pytest.raises(StageError) as failed:
        _ingest(out, small_demo, "ray.max_task_retries=1")
    message = str(failed.value)
    assert message.startswith("ingest: a part task failed on all 2 attempts")
    first = str(clean[schema.URI][2 * FILES_PER_PART].as_py())
    assert f"part 2 was running: {first}, " in message  # the part and its first files
    assert not (out / "ingest" / "_SUCCESS").exists()


@pytest.mark.usefixtures("ray_local")
def test_a_part_that_always_fails_fails_the_stage_naming_the_file_and_the_rerun_resumes(
    clean: pa.Table,
    victim: str,
    small_demo: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setenv("LVDKIT_TEST_FAIL_ALWAYS", f"ingest:{victim}")
    out = tmp_path / "out"
    with pytest.raises(StageError) as failed:
        _ingest(out, small_demo)
    message = str(failed.value)
    assert "ingest: 1 of 4 parts failed on all 4 attempts (on_part_error=fail)" in message
    assert f"part 1: {victim}: InjectedFault" in message  # the one file that fails on its own, and why
    assert "on_part_error=quarantine" in message  # what to do
    assert not (out / "ingest" / "_SUCCESS").exists()
    assert [p.name for p in part_files(out / "ingest")] == [
        "part-000000.parquet",
        "part-000002.parquet",
        "part-000003.parquet",
    ]

    monkeypatch.delenv("LVDKIT_TEST_FAIL_ALWAYS")
    capsys.readouterr()
    _ingest(out, small_demo)
    assert "ingest: 3 of 4 parts already done, 1 to go" in capsys.readouterr().err
    assert _sorted(read_parts(out / "ingest")).equals(_sorted(clean))


@pytest.mark.usefixtures("ray_local")
def test_a_part_that_always_fails_quarantines_only_the_failing_file_when_configured(
    clean: pa.Table, victim: str, small_demo: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("LVDKIT_TEST_FAIL_ALWAYS", f"ingest:{victim}")
    out = tmp_path / "out"
    summary = _ingest(out, small_demo, "on_part_error=quarantine")
    table = _sorted(read_parts(out / "ingest"))
    is_victim = pc.equal(table[schema.URI], victim)
    (row,) = table.filter(is_victim).to_pylist()
    assert (row["status"], row["error"]) == (schema.STATUS_QUARANTINED, schema.REASON_PROCESSING)
    assert row["error_detail"].startswith("InjectedFault: injected failure on")
    others = _sorted(clean).filter(pc.invert(pc.equal(_sorted(clean)[schema.URI], victim)))
    assert table.filter(pc.invert(is_victim)).equals(others)  # the rest of its part is ingested as usual
    assert summary["quarantined_by_reason"][schema.REASON_PROCESSING] == 1  # type: ignore[index]
    assert summary["images_in"] == summary["kept"] + summary["quarantined"] == clean.num_rows  # type: ignore[operator]


# --- a full disk --------------------------------------------------------------------------------------------------


def _assert_failed_cleanly(error: DiskFullError, out: Path, where: Path) -> None:
    assert isinstance(error, RuntimeError)  # what the CLI reports as ``lvdkit: error: ...`` with exit status 2
    assert str(error).startswith("disk full: no space left on device while writing ")
    assert str(error).count("disk full") == 1 and "rerun" in str(error)
    assert str(where) in str(error)
    _assert_every_part_is_complete(out)
    assert not (out / "ingest" / "_SUCCESS").exists()


@pytest.mark.usefixtures("ray_local")
def test_a_full_disk_fails_the_stage_naming_the_file_and_the_rerun_recovers(
    clean: pa.Table,
    small_demo: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """``LVDKIT_TEST_ENOSPC_AFTER``: writing ingest's third part and later ones hits ``ENOSPC`` half-way."""
    out = tmp_path / "out"
    monkeypatch.setenv("LVDKIT_TEST_ENOSPC_AFTER", "ingest:2")
    with pytest.raises(DiskFullError) as full:
        _ingest(out, small_demo)
    _assert_failed_cleanly(full.value, out, out / "ingest" / "part-00000")
    survivors = [p.name for p in part_files(out / "ingest")]
    assert set(survivors) <= {"part-000000.parquet", "part-000001.parquet"}

    monkeypatch.delenv("LVDKIT_TEST_ENOSPC_AFTER")
    capsys.readouterr()
    _ingest(out, small_demo)
    assert f"ingest: {len(survivors)} of 4 parts already done" in capsys.readouterr().err
    assert _sorted(read_parts(out / "ingest")).equals(_sorted(clean))
    assert not list((out / "ingest").glob(".*"))


@pytest.fixture()
def small_tmpfs(tmp_path: Path) -> Iterator[Path]:
    """A 1 MiB tmpfs (needs the right to mount: skipped elsewhere)."""
    folder = tmp_path / "tmpfs"
    folder.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(folder)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode().strip()}")
    try:
        yield folder
    finally:
        subprocess.run(["umount", "-l", str(folder)], check=False)


@pytest.mark.usefixtures("ray_local")
def test_a_real_full_disk_fails_cleanly_and_the_rerun_recovers_once_there_is_room(
    clean: pa.Table, small_demo: Path, small_tmpfs: Path
) -> None:
    out = small_tmpfs / "out"
    filler = small_tmpfs / "filler"
    filler.write_bytes(b"\0" * (shutil.disk_usage(small_tmpfs).free - 24 * 1024))  # room for the first parts only
    with pytest.raises(DiskFullError) as full:
        _ingest(out, small_demo)
    _assert_failed_cleanly(full.value, out, out)

    filler.unlink()
    _ingest(out, small_demo)
    assert _sorted(read_parts(out / "ingest")).equals(_sorted(clean))


# --- files that change while a run is under way ---------------------------------------------------------------------


def _pool(folder: Path, n: int = 24) -> list[Path]:
    rng = np.random.default_rng(0)
    folder.mkdir()
    paths = []
    for k in range(n):
        path = folder / f"img_{k:02d}.png"
        Image.fromarray(rng.integers(0, 256, (48, 48, 3), dtype=np.uint8)).save(path)
        paths.append(path)
    return paths


@pytest.mark.slow  # two curations, about 40 s: `make test-all` (keeps `make test` under 20 minutes)
@pytest.mark.usefixtures("ray_local")
def test_a_file_changed_after_ingest_fails_embed_or_curated_naming_it_and_a_rerun_recovers(tmp_path: Path) -> None:
    paths = _pool(tmp_path / "pool")
    out = tmp_path / "out"
    overrides = [
        f"out={out}",
        f"ingest.inputs=[{tmp_path / 'pool'}]",
        "progress=false",
        *TINY_EMBED,
        "embed.images_per_part=8",
        "dedup_copy.threshold=0.99",  # the random-init model has no copy signal: only real copies may match
        "cluster.target_size=12",
        "curated.rows_per_part=4",
    ]
    cfg = load_config(CurateConfig, None, overrides)
    run(cfg, stages=("ingest", "dedup_exact", "dedup_phash"))

    broken = paths[3]
    broken.write_bytes(b"no longer an image")  # between ingest and embed
    with pytest.raises(EmbedInputError) as failed:
        run(cfg, stages=("embed",))
    assert f"embed: cannot decode {broken} (" in str(failed.value)
    assert "changed or vanished since" in str(failed.value) and "Rerun `lvdkit curate`" in str(failed.value)

    summary = run(cfg)  # ingest sees the changed file (size, mtime), redoes itself and everything after it
    assert summary["quarantined_by_reason"] == {schema.REASON_NOT_IMAGE: 1}
    curated = read_parts(out / "curated")
    assert curated.num_rows >= 6

    changed = Path(str(curated[schema.URI][5].as_py()))
    Image.new("RGB", (48, 48), (1, 2, 3)).save(changed)  # still an image, but not the bytes ingest read
    with pytest.raises(StageError) as failed_shard:
        run(cfg, stages=("curated",), force=True)
    assert f"{changed}: {ChangedSinceIngest.__name__}: {changed} changed since ingest" in str(failed_shard.value)

    cfg.on_part_error = "quarantine"
    run(cfg, stages=("curated",), force=True)
    assert read_parts(out / "curated").num_rows == curated.num_rows - 1
    assert str(changed) not in read_parts(out / "curated")[schema.URI].to_pylist()
    left_out = read_parts(out / "curated" / schema.QUARANTINED).to_pylist()
    assert [(r[schema.URI], r["error"]) for r in left_out] == [(str(changed), "changed_since_ingest")]
    stats = json.loads((out / "curated" / "_SUCCESS").read_text())["stats"]
    assert stats["quarantined"] == {"changed_since_ingest": 1}


def _interrupted_ingest(clean_run: Path, out: Path) -> Path:
    """A finished ingest turned back into an interrupted one (its run marker, no ``_SUCCESS``); its stage folder."""
    stage = _finished_ingest(clean_run, out)
    record = json.loads((stage / "_SUCCESS").read_text())
    (stage / "_SUCCESS").unlink()
    (stage / "_RUNNING").write_text(json.dumps({k: record[k] for k in ("config_hash", "fingerprint")}))
    return stage


@pytest.mark.usefixtures("ray_local")
def test_a_torn_part_under_its_final_name_is_set_aside_and_redone_not_a_wedge(
    clean_run: Path, clean: pa.Table, small_demo: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """As a crash in the middle of a non-atomic copy, or a foreign file, would leave it: the run resumes."""
    out = tmp_path / "out"
    stage = _interrupted_ingest(clean_run, out)  # interrupted before the stage finished ...
    torn = stage / "part-000001.parquet"
    torn.write_bytes(torn.read_bytes()[: torn.stat().st_size // 2])  # ... with a part cut in half
    capsys.readouterr()
    _ingest(out, small_demo)
    log = capsys.readouterr().err
    assert f"{torn} (" in log and "not as committed" in log and "3 of 4 parts already done" in log
    assert _sorted(read_parts(stage)).equals(_sorted(clean))
    assert (stage / "_torn" / "part-000001.parquet").exists()  # kept for inspection, not deleted


@pytest.mark.usefixtures("ray_local")
def test_a_readable_part_that_is_not_the_committed_one_is_set_aside_and_redone(
    clean_run: Path, clean: pa.Table, small_demo: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A valid Parquet file under a part's name (another run's part, a file copied in by hand) passes any footer
    check; only the commit record (size and checksum) tells it apart."""
    out = tmp_path / "out"
    stage = _interrupted_ingest(clean_run, out)
    foreign = stage / "part-000002.parquet"
    rows = pq.read_table(foreign)
    pq.write_table(rows.slice(0, rows.num_rows - 1), foreign)  # readable, one row short
    capsys.readouterr()
    _ingest(out, small_demo)
    log = capsys.readouterr().err
    assert f"{foreign} (" in log and "committed" in log and "3 of 4 parts already done" in log
    assert _sorted(read_parts(stage)).equals(_sorted(clean))


@pytest.mark.usefixtures("ray_local")
def test_a_finished_stage_whose_part_changed_is_resumed_not_skipped(
    clean_run: Path, clean: pa.Table, small_demo: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    stage = _finished_ingest(clean_run, out)
    sizes = json.loads((stage / "_SUCCESS").read_text())["part_bytes"]
    assert set(sizes) >= {f"part-00000{i}.parquet" for i in range(4)}
    changed = stage / "part-000003.parquet"
    changed.write_bytes(changed.read_bytes()[:100])  # torn after the stage finished (a bad copy, a full disk)
    capsys.readouterr()
    _ingest(out, small_demo)
    log = capsys.readouterr().err
    assert "part-000003.parquet changed since the stage finished" in log and "3 of 4 parts already done" in log
    assert _sorted(read_parts(stage)).equals(_sorted(clean))
    capsys.readouterr()
    _ingest(out, small_demo)
    assert "ingest: up to date" in capsys.readouterr().err  # and the repaired stage is trusted again


# --- an embed actor dying ----------------------------------------------------------------------------------------


# An embed actor killed with its whole tree stays in `make test` (test_resume.py[embed]).
@pytest.mark.slow  # about 50 s: `make test-all` (keeps `make test` under 20 minutes)
@pytest.mark.usefixtures("ray_local")
def test_an_embed_actor_that_dies_mid_stage_is_replaced_and_the_embeddings_are_unchanged(
    small_demo: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The actor process holding the models exits in the middle of part 1 (as an OOM kill would): Ray restarts it,
    the part is redone, and every embedding equals an undisturbed run's."""
    embed = ("ingest", "dedup_exact", "dedup_phash", "embed")
    extra = (*TINY_EMBED, "embed.images_per_part=32")
    want = tmp_path / "want"
    run(load_config(CurateConfig, None, _args(want, small_demo, *extra)), stages=embed)
    markers = tmp_path / "markers"
    markers.mkdir()
    monkeypatch.setenv("LVDKIT_TEST_FAIL_ONCE", "embed:crash:1")
    monkeypatch.setenv("LVDKIT_TEST_FAIL_DIR", str(markers))
    got = tmp_path / "got"
    run(load_config(CurateConfig, None, _args(got, small_demo, *extra)), stages=embed)
    assert [p.name for p in markers.iterdir()] == ["embed-1"]  # the actor did die once, in part 1
    assert len(part_files(got / "embed")) == len(part_files(want / "embed")) > 2
    for sub in ("", schema.CALIBRATION):
        tables = [read_parts(o / "embed" / sub) for o in (got, want)]
        keys = [(c, "ascending") for c in (schema.IMAGE_ID, schema.EDIT) if c in tables[0].column_names]
        assert tables[0].sort_by(keys).equals(tables[1].sort_by(keys)), sub or "embed"
