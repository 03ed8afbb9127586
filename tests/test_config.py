"""Config loading: dataclass defaults < YAML file < key=value overrides, with unknown keys and bad types refused."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import yaml

from lvdkit.core.settings import (
    ConfigError,
    RayConfig,
    config_hash,
    load_config,
    parse_override,
    save_config,
    to_dict,
)
from lvdkit.curation.dedup_exact import DedupExactConfig
from lvdkit.curation.dedup_phash import DedupPhashConfig
from lvdkit.curation.ingest import IngestConfig
from lvdkit.pipeline.config import CurateConfig


def write_yaml(tmp_path: Path, text: str, name: str = "config.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def field_names(cls: type) -> list[str]:
    return [f.name for f in dataclasses.fields(cls)]


# --- defaults --------------------------------------------------------------------------------------------------


def test_defaults_without_file_or_overrides_equal_the_dataclass_defaults() -> None:
    cfg = load_config(CurateConfig)
    assert cfg == CurateConfig()
    assert cfg.out == "out/curate"
    assert cfg.progress is True
    assert cfg.ray == RayConfig(address=None, num_cpus=None, object_store_memory_mb=None, max_task_retries=3)
    assert cfg.ingest.inputs == []
    assert cfg.ingest.extensions is None
    assert cfg.ingest.files_per_part == 1000
    assert cfg.ingest.keep_bytes is False
    assert cfg.ingest.max_pixels == 100_000_000
    assert cfg.ingest.max_file_mb == 256.0
    assert cfg.ingest.min_side == 16
    assert cfg.ingest.phash is True
    assert cfg.dedup_exact.enabled is True
    assert cfg.dedup_phash.enabled is True
    assert cfg.dedup_phash.max_distance == 0
    assert cfg.dedup_phash.grouping == "star"


def test_default_list_fields_are_not_shared_between_instances() -> None:
    a, b = CurateConfig(), CurateConfig()
    a.ingest.inputs.append("x")
    assert b.ingest.inputs == []


def test_empty_yaml_file_gives_defaults(tmp_path: Path) -> None:
    assert load_config(CurateConfig, write_yaml(tmp_path, "")) == CurateConfig()
    assert load_config(CurateConfig, write_yaml(tmp_path, "\n  \n", "blank.yaml")) == CurateConfig()


def test_comment_only_yaml_file_gives_defaults(tmp_path: Path) -> None:
    assert load_config(CurateConfig, write_yaml(tmp_path, "# ingest:\n#   inputs: [a]\n")) == CurateConfig()


# --- YAML file, then overrides ---------------------------------------------------------------------------------


def test_yaml_file_overrides_defaults_and_leaves_other_keys_alone(tmp_path: Path) -> None:
    path = write_yaml(
        tmp_path,
        "out: /data/run1\n"
        "ingest:\n"
        "  inputs: [/data/a, /data/b]\n"
        "  extensions: [.jpg]\n"
        "  max_file_mb: 12\n"
        "dedup_phash:\n"
        "  max_distance: 3\n"
        "  grouping: components\n",
    )
    cfg = load_config(CurateConfig, path)
    assert cfg.out == "/data/run1"
    assert cfg.ingest.inputs == ["/data/a", "/data/b"]
    assert cfg.ingest.extensions == [".jpg"]
    assert cfg.ingest.max_file_mb == 12.0 and isinstance(cfg.ingest.max_file_mb, float)  # int accepted for float
    assert cfg.dedup_phash.max_distance == 3
    assert cfg.dedup_phash.grouping == "components"
    # untouched keys keep their defaults
    assert cfg.ingest.min_side == IngestConfig().min_side
    assert cfg.dedup_phash.query_chunk == DedupPhashConfig().query_chunk
    assert cfg.ray == RayConfig()
    assert cfg.dedup_exact == DedupExactConfig()


def test_cli_overrides_beat_yaml(tmp_path: Path) -> None:
    path = write_yaml(tmp_path, "out: from_yaml\ndedup_phash:\n  max_distance: 3\n  enabled: true\n")
    cfg = load_config(
        CurateConfig,
        path,
        ["dedup_phash.max_distance=5", "out=from_cli", "ingest.inputs=[a, b]", "ray.address=null"],
    )
    assert cfg.out == "from_cli"
    assert cfg.dedup_phash.max_distance == 5
    assert cfg.dedup_phash.enabled is True  # YAML value not named by an override is kept
    assert cfg.ingest.inputs == ["a", "b"]
    assert cfg.ray.address is None


def test_later_override_of_the_same_key_wins() -> None:
    cfg = load_config(CurateConfig, None, ["ingest.min_side=4", "ingest.min_side=8"])
    assert cfg.ingest.min_side == 8


def test_override_values_are_yaml_scalars_lists_and_null() -> None:
    cfg = load_config(
        CurateConfig,
        None,
        [
            "ingest.inputs=[a,b]",
            "ingest.extensions=[.png, .jpg]",
            "ingest.keep_bytes=true",
            "ingest.max_file_mb=0.5",
            "ray.num_cpus=4",
            "progress=false",
        ],
    )
    assert cfg.ingest.inputs == ["a", "b"]
    assert cfg.ingest.extensions == [".png", ".jpg"]
    assert cfg.ingest.keep_bytes is True
    assert cfg.ingest.max_file_mb == 0.5
    assert cfg.ray.num_cpus == 4
    assert cfg.progress is False

    cfg = load_config(CurateConfig, None, ["ingest.extensions=[.png]", "ingest.extensions=null", "ray.num_cpus="])
    assert cfg.ingest.extensions is None
    assert cfg.ray.num_cpus is None  # an empty value is null


def test_override_can_null_a_value_set_in_yaml(tmp_path: Path) -> None:
    path = write_yaml(tmp_path, "ray:\n  address: auto\n  num_cpus: 3\ningest:\n  extensions: [.jpg]\n")
    cfg = load_config(CurateConfig, path, ["ray.address=null", "ingest.extensions=null"])
    assert cfg.ray.address is None
    assert cfg.ray.num_cpus == 3
    assert cfg.ingest.extensions is None


def test_single_value_for_a_list_field_becomes_a_one_item_list() -> None:
    cfg = load_config(CurateConfig, None, ["ingest.inputs=/data/photos"])
    assert cfg.ingest.inputs == ["/data/photos"]


def test_parse_override_splits_at_the_first_equals_sign() -> None:
    assert parse_override("dedup_phash.max_distance=2") == ("dedup_phash.max_distance", 2)
    assert parse_override(" out = a=b ") == ("out", "a=b")
    assert parse_override("ingest.inputs=[a,b]") == ("ingest.inputs", ["a", "b"])
    assert parse_override("ray.address=null") == ("ray.address", None)


@pytest.mark.parametrize("item", ["no_equals_sign", "=5", "  =5"])
def test_malformed_override_is_a_config_error(item: str) -> None:
    with pytest.raises(ConfigError, match="key=value"):
        load_config(CurateConfig, None, [item])


def test_override_with_invalid_yaml_value_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match=r"ingest\.inputs"):
        load_config(CurateConfig, None, ["ingest.inputs=[a, b"])


def test_override_into_a_value_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="out"):
        load_config(CurateConfig, None, ["out.sub=1"])
    with pytest.raises(ConfigError, match="'out' is a value"):
        load_config(CurateConfig, None, ["out=x", "out.sub=1"])


# --- unknown keys ----------------------------------------------------------------------------------------------


def test_unknown_top_level_key_names_it_and_lists_valid_keys(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(CurateConfig, write_yaml(tmp_path, "outt: x\n"))
    message = str(info.value)
    assert "outt" in message
    for name in field_names(CurateConfig):
        assert name in message


def test_unknown_nested_key_names_it_with_its_section_and_lists_valid_keys() -> None:
    with pytest.raises(ConfigError) as info:
        load_config(CurateConfig, None, ["dedup_phash.max_dist=2"])
    message = str(info.value)
    assert "dedup_phash.max_dist" in message
    for name in field_names(DedupPhashConfig):
        assert name in message
    # the keys of other sections are not offered as valid here
    assert "files_per_part" not in message


def test_unknown_key_in_yaml_section_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(CurateConfig, write_yaml(tmp_path, "ingest:\n  input: [a]\n"))
    message = str(info.value)
    assert "ingest.input" in message
    for name in field_names(IngestConfig):
        assert name in message


def test_unknown_keys_are_all_named() -> None:
    with pytest.raises(ConfigError) as info:
        load_config(CurateConfig, None, ["zzz=1", "aaa=2"])
    assert "zzz" in str(info.value) and "aaa" in str(info.value)


# --- wrong types and literal values ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("dedup_phash.max_distance=abc", "dedup_phash.max_distance"),
        ("dedup_phash.max_distance=true", "dedup_phash.max_distance"),  # a bool is not an int
        ("dedup_phash.max_distance=1.5", "dedup_phash.max_distance"),
        ("ingest.files_per_part=[1, 2]", "ingest.files_per_part"),
        ("ingest.max_file_mb=abc", "ingest.max_file_mb"),
        ("ingest.max_file_mb=false", "ingest.max_file_mb"),
        ("ingest.keep_bytes=1", "ingest.keep_bytes"),
        ("ray.num_cpus=abc", "ray.num_cpus"),
        ("ray.num_cpus=true", "ray.num_cpus"),
        ("progress=maybe", "progress"),
        ("ingest.inputs=[a, [b]]", "ingest.inputs"),
    ],
)
def test_wrong_type_is_a_config_error_naming_the_key(override: str, key: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(CurateConfig, None, [override])
    assert key in str(info.value)


def test_wrong_type_in_yaml_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"dedup_phash\.max_distance"):
        load_config(CurateConfig, write_yaml(tmp_path, "dedup_phash:\n  max_distance: two\n"))


def test_section_given_a_scalar_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="ingest"):
        load_config(CurateConfig, write_yaml(tmp_path, "ingest: 5\n"))


def test_literal_values_are_validated() -> None:
    with pytest.raises(ConfigError) as info:
        load_config(CurateConfig, None, ["dedup_phash.grouping=foo"])
    message = str(info.value)
    assert "dedup_phash.grouping" in message and "foo" in message
    assert "star" in message and "components" in message
    for value in ("star", "components"):
        assert load_config(CurateConfig, None, [f"dedup_phash.grouping={value}"]).dedup_phash.grouping == value


def test_numbers_for_string_fields_become_strings() -> None:
    cfg = load_config(CurateConfig, None, ["out=2024", "ingest.inputs=[1, a]"])
    assert cfg.out == "2024"
    assert cfg.ingest.inputs == ["1", "a"]


# --- non-mapping YAML and unsafe YAML ----------------------------------------------------------------------------


@pytest.mark.parametrize("text", ["- a\n- b\n", "just a string\n", "42\n"])
def test_non_mapping_top_level_is_a_config_error(tmp_path: Path, text: str) -> None:
    with pytest.raises(ConfigError, match="mapping"):
        load_config(CurateConfig, write_yaml(tmp_path, text))


def test_yaml_python_tag_is_refused_and_nothing_runs(tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    path = write_yaml(tmp_path, f'!!python/object/apply:os.system ["touch {marker}"]\n')
    with pytest.raises((ConfigError, yaml.YAMLError)):
        load_config(CurateConfig, path)
    assert not marker.exists()

    nested = write_yaml(tmp_path, f'out: !!python/object/apply:os.system ["touch {marker}"]\n', "nested.yaml")
    with pytest.raises((ConfigError, yaml.YAMLError)):
        load_config(CurateConfig, nested)
    assert not marker.exists()


def test_python_tag_in_override_is_a_config_error_and_nothing_runs(tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    with pytest.raises(ConfigError):
        load_config(CurateConfig, None, [f'out=!!python/object/apply:os.system ["touch {marker}"]'])
    assert not marker.exists()


def test_malformed_yaml_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError):
        load_config(CurateConfig, write_yaml(tmp_path, "ingest: [unclosed\n"))


def test_override_into_an_empty_yaml_section(tmp_path: Path) -> None:
    path = write_yaml(tmp_path, "ingest:\n")
    assert load_config(CurateConfig, path).ingest == IngestConfig()  # the empty section alone is fine
    cfg = load_config(CurateConfig, path, ["ingest.inputs=[a]"])
    assert cfg.ingest.inputs == ["a"]


def test_missing_config_file_raises_file_not_found(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        load_config(CurateConfig, tmp_path / "nope.yaml")


# --- save / hash -----------------------------------------------------------------------------------------------


def test_save_then_load_round_trips(tmp_path: Path) -> None:
    cfg = load_config(
        CurateConfig,
        None,
        [
            "out=/tmp/some/where",
            "progress=false",
            "ray.address=auto",
            "ray.num_cpus=3",
            "ingest.inputs=[/a, 'b c', s3://bucket/prefix]",
            "ingest.extensions=[.png]",
            "ingest.max_file_mb=1.25",
            "dedup_exact.enabled=false",
            "dedup_phash.max_distance=4",
            "dedup_phash.grouping=components",
        ],
    )
    path = tmp_path / "sub" / "config.yaml"
    save_config(cfg, path)
    assert path.is_file()
    assert not list(path.parent.glob("*.tmp"))
    loaded = load_config(CurateConfig, path)
    assert loaded == cfg
    assert to_dict(loaded) == to_dict(cfg)
    assert config_hash(loaded) == config_hash(cfg)


def test_saved_defaults_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "config.yaml"
    save_config(CurateConfig(), path)
    assert load_config(CurateConfig, path) == CurateConfig()
    # the saved file is plain YAML: no python tags
    assert "!!python" not in path.read_text()


def test_config_hash_changes_with_a_value_and_not_with_key_order(tmp_path: Path) -> None:
    base = load_config(CurateConfig)
    changed = load_config(CurateConfig, None, ["dedup_phash.max_distance=1"])
    assert config_hash(base.dedup_phash) != config_hash(changed.dedup_phash)
    assert config_hash(base) != config_hash(changed)
    assert config_hash(base.ingest) == config_hash(changed.ingest)  # other sections are untouched

    a = write_yaml(tmp_path, "ingest:\n  min_side: 8\n  max_file_mb: 3\nout: x\n", "a.yaml")
    b = write_yaml(tmp_path, "out: x\ningest:\n  max_file_mb: 3\n  min_side: 8\n", "b.yaml")
    cfg_a, cfg_b = load_config(CurateConfig, a), load_config(CurateConfig, b)
    assert config_hash(cfg_a) == config_hash(cfg_b)
    assert config_hash(cfg_a.ingest) == config_hash(cfg_b.ingest)
    assert config_hash(cfg_a) != config_hash(base)


def test_config_hash_is_deterministic_and_short() -> None:
    h = config_hash(CurateConfig())
    assert h == config_hash(CurateConfig())
    assert len(h) == 16 and int(h, 16) >= 0
    assert config_hash(IngestConfig(inputs=["a", "b"])) != config_hash(IngestConfig(inputs=["b", "a"]))


def test_a_runs_local_paths_are_made_absolute_on_the_driver(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Tasks on a cluster run in other working folders: relative paths are resolved once, where the user typed them."""
    from lvdkit.pipeline.runner import absolute_paths

    monkeypatch.chdir(tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"")
    cfg = load_config(
        CurateConfig,
        None,
        [
            "out=runs/a",
            "ingest.inputs=[pool, 's3://bucket/pool', 'shots/*.jpg']",
            "dedup_relative.protected=[held]",
            "retrieve.seed_sets={cars: {inputs: [seeds/cars]}}",
            "embed.models={copy: sscd, mine: model.safetensors}",
        ],
    )
    absolute_paths(cfg)
    assert cfg.out == str(tmp_path / "runs" / "a")
    assert cfg.ingest.inputs == [str(tmp_path / "pool"), "s3://bucket/pool", str(tmp_path / "shots" / "*.jpg")]
    assert cfg.dedup_relative.protected == [str(tmp_path / "held")]
    assert cfg.retrieve.seed_sets["cars"].inputs == [str(tmp_path / "seeds" / "cars")]
    assert cfg.embed.models == {"copy": "sscd", "mine": str(tmp_path / "model.safetensors")}
    bucket = load_config(CurateConfig, None, ["out=s3://bucket/run"])
    absolute_paths(bucket)
    assert bucket.out == "s3://bucket/run"
