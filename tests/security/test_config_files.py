"""Config files and ``key=value`` overrides are data: YAML is read with ``safe_load`` (no Python tags), unknown keys
are refused, and no string is ever evaluated. Checked through the CLI, the way a config file reaches lvdkit."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from lvdkit.core.settings import ConfigError, load_config
from lvdkit.pipeline.config import CurateConfig

from ..conftest import run_cli

TAGS = [
    "!!python/object/apply:os.system [{cmd!r}]",
    "!!python/object/new:os.system [{cmd!r}]",
    "!!python/object/apply:subprocess.check_call [[sh, -c, {cmd!r}]]",
    "!!python/name:os.system",
    "!!python/module:os",
]


@pytest.mark.parametrize("tag", TAGS, ids=["apply", "new", "subprocess", "name", "module"])
def test_a_python_tag_in_a_config_file_or_override_is_refused_and_nothing_runs(tmp_path: Path, tag: str) -> None:
    marker = tmp_path / "ran"
    value = tag.format(cmd=f"touch {marker}")
    config = tmp_path / "evil.yaml"
    config.write_text(f"out: {tmp_path / 'out'}\ningest:\n  inputs: {value}\n")
    with pytest.raises(ConfigError, match="safe_load refuses"):
        load_config(CurateConfig, config)
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(CurateConfig, None, [f"ingest.inputs={value}"])
    assert not marker.exists()


def test_the_cli_refuses_a_tagged_config_before_writing_anything(tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    value = TAGS[0].format(cmd=f"touch {marker}")
    config = tmp_path / "evil.yaml"
    config.write_text(f"out: {tmp_path / 'out'}\ningest:\n  inputs: {value}\n")
    result = run_cli("curate", "--config", str(config))
    assert result.returncode == 2, result.stderr
    assert "safe_load refuses" in result.stderr and "Traceback" not in result.stderr
    result = run_cli("run", "ingest", f"out={tmp_path / 'out'}", f"ingest.inputs={value}")
    assert result.returncode == 2 and "not valid YAML" in result.stderr
    assert not marker.exists()
    assert not (tmp_path / "out").exists()


def test_unknown_keys_are_refused_naming_them(tmp_path: Path) -> None:
    config = tmp_path / "typo.yaml"
    config.write_text(f"out: {tmp_path / 'out'}\ningest:\n  input: [{tmp_path}]\n")
    with pytest.raises(ConfigError, match=r"unknown config key\(s\) 'ingest.input'; valid keys in ingest: .*inputs"):
        load_config(CurateConfig, config)
    with pytest.raises(ConfigError, match=r"unknown config key\(s\) '__class__'"):
        load_config(CurateConfig, None, ["__class__.__init__=1"])
    with pytest.raises(ConfigError, match=r"on_part_error: 'ignore' is not one of 'fail', 'quarantine'"):
        load_config(CurateConfig, None, ["on_part_error=ignore"])


def test_strings_that_look_like_code_stay_strings(tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    code = f"__import__('os').system('touch {marker}')"
    cfg = load_config(CurateConfig, None, [f"curated.embedding={code!r}", f'retrieve.embedding="{{{{{code}}}}}"'])
    assert cfg.curated.embedding == code
    assert cfg.retrieve.embedding == "{{" + code + "}}"
    assert not marker.exists()


def test_the_pixel_limit_cannot_be_switched_off() -> None:
    """``ingest.max_pixels`` is an int: null (Pillow's "no limit") is refused."""
    with pytest.raises(ConfigError, match=r"ingest\.max_pixels: expected int, got None"):
        load_config(CurateConfig, None, ["ingest.max_pixels=null"])


@pytest.mark.parametrize(
    ("override", "key", "valid"),
    [
        ("ingest.max_pixels=-1", "ingest.max_pixels", ">= 1"),
        ("ingest.max_file_mb=-1", "ingest.max_file_mb", "> 0"),
        ("ingest.decode_timeout_s=-1", "ingest.decode_timeout_s", "> 0"),
        ("ingest.min_side=-5", "ingest.min_side", ">= 1"),
        ("ray.max_task_retries=-1", "ray.max_task_retries", ">= 0"),
        ("ray.num_cpus=0", "ray.num_cpus", ">= 1"),
        ("dedup_phash.max_distance=65", "dedup_phash.max_distance", "<= 64"),
        ("dedup_copy.threshold=1.5", "dedup_copy.threshold", "<= 1"),
        ("embed.batch_size=0", "embed.batch_size", ">= 1"),
        ("curated.rows_per_part=0", "curated.rows_per_part", ">= 1"),
        ("cluster.hierarchy.n_iter=0", "cluster.hierarchy.n_iter", ">= 1"),
    ],
)
def test_numbers_out_of_range_are_refused_naming_the_key_and_the_range(override: str, key: str, valid: str) -> None:
    """Each of these used to be accepted (and quarantined every image, or hung Ray)."""
    with pytest.raises(ConfigError, match=re.escape(f"{key}: ") + r".*out of range \(valid: .*" + re.escape(valid)):
        load_config(CurateConfig, None, [override])


def test_values_at_the_edge_of_their_range_and_null_where_allowed_are_accepted() -> None:
    cfg = load_config(
        CurateConfig,
        None,
        ["ingest.min_side=1", "ray.max_task_retries=0", "dedup_phash.max_distance=64", "ingest.decode_timeout_s=null"],
    )
    assert (cfg.ingest.min_side, cfg.ray.max_task_retries, cfg.dedup_phash.max_distance) == (1, 0, 64)
    assert cfg.ingest.decode_timeout_s is None
