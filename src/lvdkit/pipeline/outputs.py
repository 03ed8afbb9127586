"""Writing a stage's side files (JSON, raw bytes or Parquet beside its parts), each atomically, declared ones only."""

from __future__ import annotations

from lvdkit.core.io import write_bytes_atomic, write_json_atomic, write_parquet_atomic
from lvdkit.core.stage import SideFile, StageInputs, StageOutput
from lvdkit.core.storage import Location


def write_sides(stage: str, declared: tuple[str, ...], result: StageOutput, stage_dir: Location) -> None:
    """Write the side files ``result`` holds; one that ``stage`` did not declare is refused (a KeyError)."""
    inputs = StageInputs(str(stage_dir.parent), (stage,), {stage: declared})
    for name, value in result.sides.items():
        _write_side(inputs.side(stage, name), value)


def _write_side(path: Location, value: SideFile) -> None:
    if isinstance(value, bytes):
        write_bytes_atomic(path, value)
    elif isinstance(value, dict):
        write_json_atomic(path, value)
    else:
        write_parquet_atomic(value, path)
