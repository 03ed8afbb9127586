"""Containers of images: WebDataset tars and Parquet tables of image bytes, read as ingest and later stages do."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from lvdkit.core import schema
from lvdkit.core.containers import iter_members, split_member
from lvdkit.core.files import image_id, read_bytes
from lvdkit.curation.ingest import IngestConfig, ingest_files


def _jpeg(seed: int, size: int = 48) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 255, (size, size, 3), dtype=np.uint8)
    image = Image.fromarray(pixels)
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


@pytest.fixture
def shard(tmp_path: Path) -> Path:
    path = tmp_path / "shard-000.tar"
    with tarfile.open(path, "w") as tar:
        for i in range(4):
            _add(tar, f"s{i:03d}.jpg", _jpeg(i))
            _add(tar, f"s{i:03d}.txt", f"caption {i}".encode())
            _add(tar, f"s{i:03d}.json", json.dumps({"n": i}).encode())
        _add(tar, "broken.jpg", b"\xff\xd8\xff\xe0 not really a jpeg")
        _add(tar, "lonely.txt", b"a sample with no image")
    return path


def test_webdataset_samples_become_records_with_their_metadata(shard: Path) -> None:
    table = ingest_files([str(shard)], IngestConfig(phash=False)).to_pylist()
    by_uri = {r[schema.URI]: r for r in table}
    assert len(table) == 6  # 4 images, 1 broken image, 1 sample without an image: every record accounted for
    first = by_uri[f"{shard}#s000.jpg"]
    assert first[schema.STATUS_COL] == schema.STATUS_OK and first[schema.IMAGE_ID] == image_id(f"{shard}#s000.jpg")
    assert json.loads(first[schema.METADATA]) == {"txt": "caption 0", "json": {"n": 0}}  # json members parsed
    assert by_uri[f"{shard}#broken.jpg"][schema.STATUS_COL] == schema.STATUS_QUARANTINED
    assert by_uri[f"{shard}#broken.jpg"][schema.ERROR] in (schema.REASON_TRUNCATED, schema.REASON_DECODE)
    assert by_uri[f"{shard}#lonely"][schema.ERROR] == schema.REASON_NO_IMAGE
    # a later stage re-reads a member by its uri and gets the bytes ingest hashed
    data = read_bytes(f"{shard}#s002.jpg", 2**20)
    assert data == _jpeg(2)


def test_a_truncated_tar_keeps_its_readable_members_and_quarantines_the_break(shard: Path, tmp_path: Path) -> None:
    whole = shard.read_bytes()
    cut = tmp_path / "cut.tar"
    with tarfile.open(shard) as tar:
        members = [m for m in tar if m.name == "s002.jpg"]
    cut.write_bytes(whole[: members[0].offset_data + 100])  # inside the third image's bytes
    rows = ingest_files([str(cut)], IngestConfig(phash=False)).to_pylist()
    ok = sorted(r[schema.URI].split("#")[1] for r in rows if r[schema.STATUS_COL] == schema.STATUS_OK)
    assert ok == ["s000.jpg", "s001.jpg"]
    broken = [r for r in rows if r[schema.STATUS_COL] == schema.STATUS_QUARANTINED]
    assert [r[schema.ERROR] for r in broken] == [schema.REASON_TRUNCATED]
    assert broken[0][schema.URI] == f"{cut}#s002.jpg"
    assert read_bytes(f"{cut}#s001.jpg", 2**20) == _jpeg(1)  # the index of a truncated tar still serves its members


def test_image_tables_plain_and_nested_and_without_an_image_column(tmp_path: Path) -> None:
    plain = tmp_path / "img2dataset.parquet"
    pq.write_table(
        pa.table({"key": ["a", "b", "c"], "caption": ["x", "y", None], "jpg": [_jpeg(1), _jpeg(2), b""]}),
        plain,
        row_group_size=2,
    )
    nested = tmp_path / "hf.parquet"
    image_type = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    pq.write_table(pa.table({"image": pa.array([{"bytes": _jpeg(3), "path": "p.jpg"}], image_type)}), nested)
    other = tmp_path / "other.parquet"
    pq.write_table(pa.table({"a": [1, 2], "b": [b"x", b"y"], "c": [b"z", b"w"]}), other)
    rows = ingest_files([str(plain), str(nested), str(other)], IngestConfig(phash=False)).to_pylist()
    status = {r[schema.URI]: (r[schema.STATUS_COL], r[schema.ERROR]) for r in rows}
    assert status == {
        f"{plain}#row=0&col=jpg": (schema.STATUS_OK, None),
        f"{plain}#row=1&col=jpg": (schema.STATUS_OK, None),
        f"{plain}#row=2&col=jpg": (schema.STATUS_QUARANTINED, schema.REASON_EMPTY),
        f"{nested}#row=0&col=image": (schema.STATUS_OK, None),
        str(other): (schema.STATUS_QUARANTINED, schema.REASON_CONTAINER),  # two binary columns: which one?
    }
    meta = {r[schema.URI]: r[schema.METADATA] for r in rows}
    assert json.loads(meta[f"{plain}#row=1&col=jpg"]) == {"key": "b", "caption": "y"}
    assert read_bytes(f"{plain}#row=1&col=jpg", 2**20) == _jpeg(2)  # second row group... of the first: row 1
    assert read_bytes(f"{nested}#row=0&col=image", 2**20) == _jpeg(3)
    named = ingest_files([str(other)], IngestConfig(phash=False, image_column="b")).to_pylist()
    assert [r[schema.ERROR] for r in named] == [schema.REASON_NOT_IMAGE] * 2  # read, then found not to be images


def test_member_uris_and_plain_files_with_a_hash_in_their_name(tmp_path: Path) -> None:
    assert split_member("s3://b/x/shard.tar#a/b.jpg") == ("s3://b/x/shard.tar", "a/b.jpg")
    assert split_member("/d/t.parquet#row=3&col=jpg") == ("/d/t.parquet", "row=3&col=jpg")
    assert split_member("/d/photo#1.jpg") is None
    odd = tmp_path / "album.tar#1.jpg"  # a loose file whose name looks like a member uri is still a file
    odd.write_bytes(_jpeg(5))
    assert read_bytes(str(odd), 2**20) == _jpeg(5)


def test_containers_off_reads_them_as_files(shard: Path) -> None:
    rows = ingest_files([str(shard)], IngestConfig(phash=False, containers=[])).to_pylist()
    assert [(r[schema.URI], r[schema.ERROR]) for r in rows] == [(str(shard), schema.REASON_NOT_IMAGE)]


def test_iter_members_reports_a_file_that_is_not_a_tar(tmp_path: Path) -> None:
    fake = tmp_path / "fake.tar"
    fake.write_bytes(b"plain text, not a tar archive" * 30)
    rows = ingest_files([str(fake)], IngestConfig(phash=False)).to_pylist()
    assert [(r[schema.URI], r[schema.ERROR]) for r in rows] == [(str(fake), schema.REASON_CONTAINER)]
    with pytest.raises(OSError):
        list(iter_members(str(fake)))
