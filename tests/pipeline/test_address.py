"""A stage runs unchanged on a separately started Ray cluster (``ray start --head`` on loopback) via ``--address``."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from lvdkit.core.io import part_files

from ..conftest import run_cli
from ..ray_head import free_port, start_head, stop_head, wait_for_head


@pytest.fixture
def ray_head() -> Iterator[str]:
    port = free_port()
    head = start_head(port, "--include-dashboard=false")
    try:
        yield wait_for_head(head, port)
    finally:
        stop_head(head)


def test_stage_runs_on_a_separately_started_head(ray_head: str, small_demo: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    args = [f"out={out}", f"ingest.inputs=[{small_demo / 'raw'}]", "ingest.files_per_part=50", "progress=false"]
    result = run_cli("run", "ingest", "--address", ray_head, *args, env={"RAY_AUTH_MODE": "disabled"})
    assert result.returncode == 0, result.stderr
    assert (out / "ingest" / "_SUCCESS").exists() and len(part_files(out / "ingest")) >= 2
    assert not (out / "_ray").exists()  # no local Ray was started: the driver joined the head
    # The head outlives the driver: a second stage joins it through RAY_ADDRESS as well.
    result = run_cli("run", "dedup_exact", *args, env={"RAY_ADDRESS": ray_head, "RAY_AUTH_MODE": "disabled"})
    assert result.returncode == 0, result.stderr
    assert (out / "dedup_exact" / "_SUCCESS").exists()


def test_a_local_ray_that_cannot_start_is_an_lvdkit_error_with_a_hint(tmp_path: Path) -> None:
    """Its temporary folder cannot be made (a file stands in the way): exit status 2, no traceback."""
    blocker = tmp_path / "not_a_folder"
    blocker.write_text("")
    pool = tmp_path / "pool"
    pool.mkdir()
    (pool / "x.png").write_bytes(b"junk")
    done = run_cli(
        "curate",
        f"out={tmp_path / 'out'}",
        f"ingest.inputs=[{pool}]",
        "progress=false",
        env={"RAY_TMPDIR": str(blocker / "ray")},
    )
    assert done.returncode == 2, done.stderr
    assert "lvdkit: error: could not start a local Ray" in done.stderr
    assert "Traceback" not in done.stderr
