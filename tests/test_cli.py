"""The command line: help everywhere, clear errors, the demo and a run with its printed result."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from lvdkit.cli import main
from lvdkit.pipeline.names import CURATE_ORDER

from .conftest import curate_args, run_cli


@pytest.mark.parametrize(
    "argv",
    [
        ["--help"],
        *([c, "--help"] for c in ("demo", "curate", "run", "summary", "report", "pretrain", "export", "embed", "eval")),
        ["eval", "knn", "--help"],
    ],
)
def test_every_command_has_help(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 0
    assert "usage: lvdkit" in capsys.readouterr().out


def test_run_help_lists_the_stages(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["run", "--help"])
    out = capsys.readouterr().out
    assert all(stage in out for stage in CURATE_ORDER)


def test_unknown_stage_and_unknown_key_are_clear_errors(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    assert main(["run", "embedd", f"out={tmp_path}"]) == 2
    err = capsys.readouterr().err
    assert "unknown stage 'embedd'" in err and all(s in err for s in CURATE_ORDER)
    assert main(["curate", f"out={tmp_path}", "dedup_phash.max_distnce=3"]) == 2
    err = capsys.readouterr().err
    assert "max_distnce" in err and "max_distance" in err


def test_missing_input_names_it(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    result = run_cli("run", "ingest", f"out={tmp_path / 'o'}", f"ingest.inputs=[{tmp_path / 'nope'}]", "progress=false")
    assert result.returncode == 2 and str(tmp_path / "nope") in result.stderr


def test_curate_prints_the_funnel_and_summary_matches(curate_reference: Path, small_demo: Path, tmp_path: Path) -> None:
    # a finished run moved elsewhere (a run folder is relocatable): the rerun skips every stage and prints the funnel
    out = tmp_path / "out"
    shutil.copytree(curate_reference, out)
    result = run_cli("curate", *curate_args(str(out), str(small_demo)))
    assert result.returncode == 0, result.stderr
    assert result.stderr.count("skipped") == len(CURATE_ORDER), result.stderr
    summary = json.loads((out / "summary.json").read_text())
    funnel = f"images in: {summary['images_in']}  kept: {summary['kept']}  duplicates: {summary['duplicates']}"
    assert funnel in result.stdout and str(out) in result.stdout


def test_a_stage_reading_an_embedding_nobody_computes_fails_before_any_work(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "o"
    assert main(["curate", f"out={out}", "embed.models={copy: sscd}"]) == 2  # cluster/shard default to 'semantic'
    err = capsys.readouterr().err
    assert "cluster.embedding='semantic'" in err and "curated.embedding='semantic'" in err and "copy" in err
    assert not (out / "ingest").exists()


def test_pretrain_errors_are_clear(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["pretrain", f"data={tmp_path / 'missing'}", f"out={tmp_path / 'run'}"]) == 2
    assert "pretraining data not found" in capsys.readouterr().err
    assert main(["pretrain", "method=mae", f"out={tmp_path / 'run'}"]) == 2
    assert "'dinov2', 'dino', 'simclr', 'distillation'" in capsys.readouterr().err
    assert main(["export", str(tmp_path), "--out", str(tmp_path / "x.safetensors")]) == 2
    assert "no checkpoint in" in capsys.readouterr().err
