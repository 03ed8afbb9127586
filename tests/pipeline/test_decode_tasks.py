"""Per-part stages whose work decodes apart from its model actors: decode tasks (one per part, other processes than
the actors) hand each part to an actor, a part whose decode fails is redone by the actor, and embed gives the same
embeddings whichever process decoded."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from lvdkit.core import schema
from lvdkit.core.image import decode_rgb
from lvdkit.core.io import part_name
from lvdkit.core.stage import PartWork
from lvdkit.embeddings.stage import EmbedConfig, EmbedWork
from lvdkit.pipeline import faults
from lvdkit.pipeline.kinds import Actors
from lvdkit.pipeline.parts import PartRun, actor_threads, check_decode_room, cpu_actor_share, map_parts

BROKEN_DECODE = 2  # this part's decode raises: the actor must do it itself


@dataclass
class PidWork(PartWork):
    """Records which process decoded each part and which processed it."""

    decodes = True
    may_quarantine = False

    def load(self, index: int) -> pa.Table:
        return pa.table({schema.IMAGE_ID: [f"img{index}"], schema.URI: [f"/nowhere/{index}.jpg"]})

    def decode(self, rows: pa.Table) -> Any:
        if rows[schema.IMAGE_ID][0].as_py() == f"img{BROKEN_DECODE}":
            raise OSError("cannot read")
        return {"pid": os.getpid()}

    def process(self, rows: pa.Table, decoded: Any = None) -> pa.Table:
        return rows.append_column("decoded_by", pa.array([decoded["pid"] if decoded else -1])).append_column(
            "processed_by", pa.array([os.getpid()])
        )


def test_decode_runs_in_tasks_apart_from_the_actor_and_a_failed_decode_is_redone_by_the_actor(
    ray_local: None, tmp_path: Path
) -> None:
    run = PartRun("pids", PidWork(), str(tmp_path), faults.Hooks.for_stage("pids"), retries=1, on_error="fail")
    nodes = map_parts(run, list(range(4)), Actors(1, 1.0, 0.0, None, decode_cpus=0.5), progress=False)

    tables = [pq.read_table(tmp_path / part_name(i)).to_pylist()[0] for i in range(4)]
    actor_pids = {t["processed_by"] for t in tables}
    assert len(actor_pids) == 1  # one actor
    decoded_by = [t["decoded_by"] for i, t in enumerate(tables) if i != BROKEN_DECODE]
    assert all(pid > 0 and pid not in actor_pids for pid in decoded_by)
    assert tables[BROKEN_DECODE]["decoded_by"] == -1  # processed all the same, reading it itself
    assert len(nodes) == 1


def test_actor_threads_follow_its_own_cpu_reservation() -> None:
    assert actor_threads(Actors(1, 1.5, 0.0, None)) == 2
    assert actor_threads(Actors(4, 1.0, 1.0, None)) == 1
    assert actor_threads(Actors(1, 1.5, 0.0, 6)) == 6  # configured


@pytest.fixture(scope="module")
def embed_work(small_demo: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[EmbedWork, pa.Table]:
    files = [f for f in sorted((small_demo / "raw").rglob("*.*")) if _decodes(f)][:12]
    rows = pa.table(
        {
            schema.IMAGE_ID: [f"{i:04d}" for i in range(len(files))],
            schema.URI: [str(f) for f in files],
            schema.CONTENT_HASH: [f"hash{i}" for i in range(len(files))],
            schema.PART: pa.array(np.zeros(len(files), np.int64)),
        }
    )
    listing = tmp_path_factory.mktemp("listing") / schema.LISTING
    pq.write_table(rows, listing)
    # a third of the images get a synthetic copy, so batches mix images and copies
    cfg = EmbedConfig(models={"copy": "timm:resnet10t"}, model_options={}, batch_size=5, calibration_copies=4)
    return EmbedWork.create(cfg, listing), rows


def _decodes(path: Path) -> bool:
    try:
        decode_rgb(path.read_bytes(), 10**8)
    except Exception:
        return False
    return True


def test_embed_gives_the_same_embeddings_from_a_decode_task_as_decoding_itself(
    embed_work: tuple[EmbedWork, pa.Table],
) -> None:
    work, rows = embed_work
    itself = work.process(rows)
    handed = work.process(rows, work.decode(rows))
    assert itself[schema.CALIBRATION].num_rows > 0
    for key in ("", schema.CALIBRATION):
        assert handed[key].equals(itself[key]), key  # bit for bit: the same batches reach the model


def test_cpu_actors_leave_room_for_a_decode_task_and_a_config_that_cannot_is_refused_by_name(
    ray_local: None,
) -> None:
    assert cpu_actor_share(1, 0.5) == 1.5  # the local Ray of the tests: one node, 2 CPUs
    assert cpu_actor_share(2, 0.5) == 0.75
    check_decode_room(Actors(1, 1.5, 0.0, None, decode_cpus=0.5))  # fits exactly
    with pytest.raises(ValueError, match=r"embed.actor_cpus=2 .*embed.decode_cpus=0.5 need 2.5 CPUs"):
        check_decode_room(Actors(1, 2.0, 0.0, None, decode_cpus=0.5))
