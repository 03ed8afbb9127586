"""Inputs on object storage, through a real S3 API server on loopback (moto's server mode): listing, reading,
fingerprints, and containers read from buckets; the endpoint comes from AWS_ENDPOINT_URL as for any S3 service."""

from __future__ import annotations

import tarfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from lvdkit.core import schema
from lvdkit.core.files import file_identity, list_inputs, read_bytes
from lvdkit.curation.ingest import IngestConfig, ingest_files
from lvdkit.demo_containers import write_webdataset

from ..s3_server import client, environment, s3_server, upload


@pytest.fixture(scope="module")
def s3() -> Iterator[dict[str, str]]:
    with s3_server() as env, environment(env):
        fs = client(env)
        fs.create_dir("pool")
        yield env


def test_objects_are_listed_read_and_fingerprinted(s3: dict[str, str], small_demo: Path) -> None:
    fs = client(s3)
    keys = upload(fs, small_demo / "seeds" / "digit_2", "pool/seeds2")
    listed = list(list_inputs(["s3://pool/seeds2"]))
    assert listed == [f"s3://{k}" for k in keys]  # every object once, in key order
    first = next(p for p in sorted((small_demo / "seeds" / "digit_2").rglob("*")) if p.is_file())
    assert read_bytes(listed[0], 2**24) == first.read_bytes()
    before = file_identity(listed[0])
    assert f"|{first.stat().st_size}|" in before  # size (and last-modified) of the object, not just its name
    with fs.open_output_stream(keys[0]) as out:  # rewritten with other bytes: the fingerprint notices
        out.write(first.read_bytes() + b"\0")
    assert file_identity(listed[0]) != before
    assert file_identity("s3://pool/seeds2/none.png").endswith("|missing\n")


def test_a_webdataset_tar_in_a_bucket_is_ingested_member_by_member(
    s3: dict[str, str], small_demo: Path, tmp_path: Path
) -> None:
    shards = write_webdataset(small_demo / "seeds" / "digit_5", tmp_path / "tars", per_shard=8)
    upload(client(s3), tmp_path / "tars", "pool/tars")
    uris = list(list_inputs(["s3://pool/tars"]))
    assert len(uris) == len(shards)
    rows = ingest_files(uris, IngestConfig(phash=False)).to_pylist()
    local = ingest_files([str(p) for p in shards], IngestConfig(phash=False)).to_pylist()
    # the same records, statuses and content as the same tars on local disk
    assert sorted((r[schema.URI].split("#")[1], r[schema.STATUS_COL], r[schema.CONTENT_HASH]) for r in rows) == sorted(
        (r[schema.URI].split("#")[1], r[schema.STATUS_COL], r[schema.CONTENT_HASH]) for r in local
    )
    first_shard = f"s3://pool/tars/{shards[0].name}#"
    member = next(r[schema.URI] for r in rows if r[schema.URI].startswith(first_shard))
    with tarfile.open(shards[0]) as tar:
        extracted = tar.extractfile(member.split("#")[1])
        assert extracted is not None
        assert read_bytes(member, 2**24) == extracted.read()  # a later stage re-reads the member from the bucket


def test_object_paths_offer_the_run_folder_operations_on_a_bucket(s3: dict[str, str]) -> None:
    from lvdkit.core.storage import ObjectPath, location

    run = location("s3://pool/run")
    assert isinstance(run, ObjectPath) and not run.exists()
    (run / "config.yaml").write_text("a: 1\n")
    (run / "checkpoint_1" / "meta.json").write_bytes(b"{}")
    (run / "checkpoint_2" / "meta.json").write_bytes(b"{}")
    assert run.is_dir() and (run / "config.yaml").is_file() and (run / "config.yaml").read_text() == "a: 1\n"
    assert [p.name for p in run.glob("checkpoint_*")] == ["checkpoint_1", "checkpoint_2"]
    assert [str(p) for p in run.rglob("*.json")] == [f"{run}/checkpoint_1/meta.json", f"{run}/checkpoint_2/meta.json"]
    child = run / "checkpoint_2" / "meta.json"
    assert child.fs is run.fs and child.parent.parent == run  # children share the bucket's filesystem
    with child.open("rb") as f:
        assert f.read() == b"{}"
    with pytest.raises(FileNotFoundError, match="s3://pool/run/none"):
        (run / "none").read_bytes()
    with pytest.raises(ValueError, match="reading only"):
        child.open("w")
    assert location("file:///tmp/x") == Path("/tmp/x") and location("out/run") == Path("out/run")


def test_object_paths_move_remove_and_stat_objects_as_run_folders_need(s3: dict[str, str], tmp_path: Path) -> None:
    import pyarrow.parquet as pq

    from lvdkit.core.storage import ObjectPath, location, publish, remove_tree, replace

    run = location("s3://pool/moves")
    assert isinstance(run, ObjectPath)
    (run / "a.txt").write_text("a")
    stat = (run / "a.txt").stat()
    assert stat.st_size == 1 and stat.st_mtime > 0
    replace(run / "a.txt", run / "sub" / "b.txt")  # a server-side copy and a delete
    assert not (run / "a.txt").exists() and (run / "sub" / "b.txt").read_text() == "a"
    assert (run / "sub" / "b.txt").relative_to(run).as_posix() == "sub/b.txt"
    local = tmp_path / "big.bin"
    local.write_bytes(b"x" * 3_000_000)
    publish(local, run / "big.bin")  # uploaded whole, then the local file is gone
    assert (run / "big.bin").stat().st_size == 3_000_000 and not local.exists()
    (run / "marker").touch()
    with pytest.raises(FileExistsError):
        (run / "marker").touch(exist_ok=False)
    (run / "marker").unlink()
    (run / "marker").unlink(missing_ok=True)
    with pytest.raises(FileNotFoundError):
        (run / "marker").stat()
    import pyarrow as pa

    pq.write_table(pa.table({"x": [1, 2]}), run / "t.parquet")  # pyarrow takes the object's URI as its path
    assert pq.read_table(run / "t.parquet").num_rows == 2
    remove_tree(run)
    assert not run.exists() and list(run.iterdir()) == []
    with pytest.raises(ValueError, match="one filesystem"):
        replace(run / "x", tmp_path / "x")


def test_a_part_committed_to_a_bucket_is_trusted_until_replaced(s3: dict[str, str]) -> None:
    import time

    import pyarrow as pa

    from lvdkit.core.io import write_parquet_atomic
    from lvdkit.core.storage import location
    from lvdkit.pipeline.commits import commit_part, committed_sizes, record_of, untrusted

    stage = location("s3://pool/stage")
    part = stage / "part-000000.parquet"
    commit_part(pa.table({"x": [1, 2, 3]}), part, None)
    assert untrusted(part) is None
    assert committed_sizes(stage) == {"part-000000.parquet": part.stat().st_size}
    time.sleep(1.1)  # object times have one-second resolution
    write_parquet_atomic(pa.table({"x": [4, 5, 6]}), part)  # same size, written by someone else
    assert untrusted(part) == "replaced since it was committed"
    record_of(part).unlink()
    assert untrusted(part) == "no commit record"


def test_a_prefix_is_listed_level_by_level_in_key_order_with_identities_from_the_listing(s3: dict[str, str]) -> None:
    from lvdkit.core.files import file_identity, list_identified

    fs = client(s3)
    keys = sorted(f"pool/nest/{k}" for k in ("a.jpg", "a/b.jpg", "a0.jpg", "b/c/d.jpg", "b/c.jpg", "b.jpg", "z.jpg"))
    for key in keys:
        with fs.open_output_stream(key) as out:
            out.write(key.encode())
    listed = list(list_identified(["s3://pool/nest"]))
    assert [uri for uri, _, _ in listed] == [f"s3://{k}" for k in keys]  # as one flat listing orders them
    assert all(identity == file_identity(uri) for uri, _, identity in listed)  # no request per object needed
