"""Rows gathered from every rank, and the replica check that stops a drifted data-parallel run (two real gloo ranks)."""

from __future__ import annotations

import sys

import pytest
import torch
from torch import nn

from lvdkit.pretrain.ranks import check_replicas, gather_rows, parameter_digest

from .gloo_ranks import run_ranks


def test_single_process_is_its_own_world() -> None:
    x = torch.arange(6.0).view(3, 2)
    assert gather_rows(x) is x
    assert check_replicas(nn.Linear(2, 2), step=1) == 1


def test_digest_sees_one_changed_weight() -> None:
    torch.manual_seed(0)
    a = nn.Linear(4, 3)
    b = nn.Linear(4, 3)
    b.load_state_dict(a.state_dict())
    assert parameter_digest(a) == parameter_digest(b)
    with torch.no_grad():
        b.weight[2, 1] += 1e-7
    assert parameter_digest(a) != parameter_digest(b)


def _rank_main(rank: int, port: int, conn) -> None:  # type: ignore[no-untyped-def]
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        rows = torch.full((3 if rank == 0 else 1, 2), float(rank))  # unequal shares: 3 rows and 1 row
        gathered = gather_rows(rows)
        torch.manual_seed(0)
        model = nn.Linear(2, 2)
        same = check_replicas(model, step=5)
        if rank == 1:
            with torch.no_grad():
                model.bias[0] += 1.0  # one rank drifts
        try:
            check_replicas(model, step=6)
            drift = ""
        except RuntimeError as exc:
            drift = str(exc)
        conn.send((gathered.numpy(), same, drift))
        dist.barrier()
    finally:
        dist.destroy_process_group()
        conn.close()


@pytest.mark.skipif(sys.platform != "linux", reason="forks two gloo ranks")
def test_rows_gather_in_rank_order_and_a_drift_is_an_error() -> None:
    for gathered, same, drift in run_ranks(_rank_main, start_method="fork"):
        assert gathered.tolist() == [[0.0, 0.0]] * 3 + [[1.0, 1.0]]
        assert same == 2
        assert "differ at step 6" in drift  # every rank raises, not only the one that drifted
