"""A folder of images as the containers ML teams keep pools in: WebDataset tar shards, or one Parquet table of image
bytes (img2dataset's layout). ``lvdkit demo DIR --tars N`` writes the demo's raw pool this way, so ingest's container
path runs end to end on the demo; the tests compare it with the same images as loose files."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import pyarrow as pa

from lvdkit.core.io import write_parquet_atomic


def _files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file())


def write_webdataset(folder: Path, out: Path, per_shard: int) -> list[Path]:
    """Every file under ``folder`` as a WebDataset sample (member = its path relative to ``folder``) with a ``json``
    member naming that path, ``per_shard`` samples per ``out/shard-NNNNN.tar``."""
    out.mkdir(parents=True, exist_ok=True)
    files, shards = _files(folder), []
    for start in range(0, len(files), per_shard):
        shard = out / f"shard-{start // per_shard:05d}.tar"
        with tarfile.open(shard, "w") as tar:
            for path in files[start : start + per_shard]:
                rel = path.relative_to(folder).as_posix()
                tar.add(path, arcname=rel)
                meta = json.dumps({"path": rel}).encode()
                info = tarfile.TarInfo(rel.split(".", 1)[0] + ".json")  # the sample's key: its name up to the dot
                info.size = len(meta)
                tar.addfile(info, io.BytesIO(meta))
        shards.append(shard)
    return shards


def write_image_table(folder: Path, out: Path, rows_per_group: int = 256) -> Path:
    """Every file under ``folder`` as a row of one Parquet table: ``key``, ``path`` (relative) and ``jpg`` (the
    file's bytes, whatever their format: img2dataset's column name)."""
    files = _files(folder)
    table = pa.table(
        {
            "key": [f"{i:09d}" for i in range(len(files))],
            "path": [p.relative_to(folder).as_posix() for p in files],
            "jpg": pa.array([p.read_bytes() for p in files], pa.binary()),
        }
    )
    write_parquet_atomic(table, out, row_group_rows=rows_per_group)
    return out
