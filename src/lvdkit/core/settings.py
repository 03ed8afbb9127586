"""Configuration: dataclass defaults, overridden by a YAML file, overridden by ``key=value`` arguments.

Every stage owns a small config dataclass (next to its code); ``lvdkit.pipeline.config.CurateConfig`` gathers them
under one key each, ``lvdkit.pretrain.config.PretrainConfig`` is the training run's.
Unknown keys are errors that list the valid ones, YAML is read with ``safe_load`` and no string is ever evaluated.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

from lvdkit.core.storage import Location, ObjectPath

T = TypeVar("T")


class ConfigError(ValueError):
    """A config file or override is malformed, names an unknown key, or has a value of the wrong type."""


def setting(default: Any, *, ge: float | None = None, gt: float | None = None, le: float | None = None) -> Any:
    """A numeric config field with its valid range (checked by :func:`from_dict` for every value a user sets).

    ``ge``/``gt``: at least / more than; ``le``: at most. ``None`` stays allowed where the field's type allows it.
    """
    bounds = {k: v for k, v in (("ge", ge), ("gt", gt), ("le", le)) if v is not None}
    return dataclasses.field(default=default, metadata={"range": bounds})


def _check_range(field: dataclasses.Field[Any], value: Any, where: str) -> None:
    bounds = field.metadata.get("range")
    if not bounds or value is None or isinstance(value, bool) or not isinstance(value, (int, float)):
        return
    ok = (
        ("ge" not in bounds or value >= bounds["ge"])
        and ("gt" not in bounds or value > bounds["gt"])
        and ("le" not in bounds or value <= bounds["le"])
    )
    if not ok:
        words = {"ge": ">=", "gt": ">", "le": "<="}
        valid = " and ".join(f"{words[k]} {v}" for k, v in bounds.items())
        raise ConfigError(f"{where}: {value!r} is out of range (valid: {valid})")


@dataclasses.dataclass
class RayConfig:
    """Where stages run. With no address a local Ray starts (and stops) inside the lvdkit process."""

    address: str | None = None  # a running cluster ("auto", "ray://host:10001", "127.0.0.1:6379"); else RAY_ADDRESS
    num_cpus: int | None = setting(None, ge=1)  # local Ray only; default: all cores
    object_store_memory_mb: int | None = setting(None, ge=80)  # local Ray only; default: Ray's (30% of RAM)
    # a task whose worker dies (crash, OOM kill) or whose part raises is retried this often
    max_task_retries: int = setting(3, ge=0)


def load_config(cls: type[T], path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> T:
    """Build ``cls`` from its defaults, then the YAML file at ``path``, then ``key.sub=value`` overrides."""
    data: dict[str, Any] = {}
    if path is not None:
        try:
            loaded = yaml.safe_load(Path(path).read_text())
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: not valid YAML (or uses a tag safe_load refuses): {exc}") from exc
        loaded = {} if loaded is None else loaded  # empty or comments only: all defaults
        if not isinstance(loaded, dict):
            raise ConfigError(
                f"{path}: expected a mapping of config keys at the top level, got {type(loaded).__name__}"
            )
        data = loaded
    for item in overrides:
        key, value = parse_override(item)
        _set_dotted(data, key, value)
    return from_dict(cls, data)


def parse_override(item: str) -> tuple[str, Any]:
    """``"dedup_phash.max_distance=2"`` -> ``("dedup_phash.max_distance", 2)``; values are YAML scalars or lists."""
    key, sep, raw = item.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"override {item!r} is not of the form key=value (e.g. ingest.files_per_part=500)")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as exc:
        raise ConfigError(f"override {item!r}: value is not valid YAML: {exc}") from exc
    return key.strip(), value


def _set_dotted(data: dict[str, Any], key: str, value: Any) -> None:
    parts = key.split(".")
    node = data
    for part in parts[:-1]:
        child = node.get(part)
        if child is None:  # absent, or an empty section in the YAML file
            child = node[part] = {}
        if not isinstance(child, dict):
            raise ConfigError(f"override {key!r}: {part!r} is a value, not a section")
        node = child
    node[parts[-1]] = value


def from_dict(cls: type[T], data: dict[str, Any], where: str = "") -> T:
    """Instantiate dataclass ``cls`` from a nested dict, checking keys and value types."""
    if not isinstance(data, dict):
        raise ConfigError(f"{where or 'config'}: expected a mapping, got {data!r}")
    fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(data) - set(fields))
    renamed = getattr(cls, "RENAMED", {})  # a section's keys renamed since an earlier release
    moved = [f"{where}{k} is now {where}{renamed[k]}" for k in unknown if k in renamed]
    if moved:
        raise ConfigError(f"renamed config key(s): {'; '.join(moved)}")
    if unknown:
        raise ConfigError(
            f"unknown config key(s) {', '.join(repr(where + k) for k in unknown)}; "
            f"valid keys{' in ' + where.rstrip('.') if where else ''}: {', '.join(sorted(fields))}"
        )
    hints = typing.get_type_hints(cls)
    kwargs = {name: _coerce(hints[name], value, where + name) for name, value in data.items()}
    for name, value in kwargs.items():
        _check_range(fields[name], value, where + name)
    return cls(**kwargs)


def _coerce(tp: Any, value: Any, where: str) -> Any:
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value if value is not None else {}, where + ".")  # type: ignore[arg-type]
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _coerce(arg, value, where)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(errors[0])
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            value = [value]  # a single value where a list is expected is a one-item list
        return [_coerce(args[0], v, where) for v in value] if args else list(value)
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        kt, vt = args if args else (Any, Any)
        return {_coerce(kt, k, f"{where}.{k}"): _coerce(vt, v, f"{where}.{k}") for k, v in value.items()}
    if origin is typing.Literal:
        if value not in args:
            raise ConfigError(f"{where}: {value!r} is not one of {', '.join(map(repr, args))}")
        return value
    if tp is Any:
        return value
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is str and isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    if not isinstance(value, tp) or (tp is int and isinstance(value, bool)):
        raise ConfigError(f"{where}: expected {tp.__name__}, got {value!r}")
    return value


def to_dict(cfg: Any) -> dict[str, Any]:
    """The config as plain data (what ``config.yaml`` and ``_SUCCESS`` record)."""
    return dataclasses.asdict(cfg)


def config_hash(section: Any) -> str:
    """A short, order-independent hash of a config section; a changed value means the stage is redone."""
    blob = json.dumps(to_dict(section), sort_keys=True, default=str).encode()
    return hashlib.blake2b(blob, digest_size=8).hexdigest()


def config_yaml(cfg: Any) -> str:
    """The resolved config as YAML (what ``config.yaml`` holds and ``--print-config`` prints)."""
    return str(yaml.safe_dump(to_dict(cfg), sort_keys=False))


def save_config(cfg: Any, path: Location) -> None:
    """Write the resolved config as YAML (loadable again with ``--config``), locally or as one object."""
    if isinstance(path, ObjectPath):
        path.write_text(config_yaml(cfg))
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".yaml.tmp")
    tmp.write_text(config_yaml(cfg))
    tmp.replace(path)
