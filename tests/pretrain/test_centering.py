"""Sinkhorn-Knopp and softmax centering against hand values and a NumPy re-implementation of SwAV's iteration."""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from lvdkit.pretrain.centering import CENTERING_METHODS, SoftmaxCenter, sinkhorn_knopp, teacher_probs

from .gloo_ranks import run_ranks

LOGITS = [[2.0, 0.0, -1.0], [1.5, 0.5, 0.0], [3.0, -0.5, 0.2], [0.1, 0.3, 0.2]]  # 4 samples, 3 prototypes


def numpy_sinkhorn(logits: np.ndarray, temp: float, n_iterations: int) -> np.ndarray:
    """SwAV's published iteration, written out in float64: Q = exp(S / temp)^T, then alternate normalisations."""
    q = np.exp(logits / temp).T  # (K, N)
    k, n = q.shape
    q = q / q.sum()
    for _ in range(n_iterations):
        q = q / q.sum(axis=1, keepdims=True) / k
        q = q / q.sum(axis=0, keepdims=True) / n
    return (q * n).T


@pytest.mark.parametrize("n_iterations", [1, 3, 10])
def test_sinkhorn_matches_numpy_reference(n_iterations: int) -> None:
    expected = numpy_sinkhorn(np.array(LOGITS), 0.5, n_iterations)
    got = sinkhorn_knopp(torch.tensor(LOGITS), 0.5, n_iterations=n_iterations)
    assert got.dtype == torch.float32
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-5, atol=1e-7)


def test_sinkhorn_rows_sum_to_one_and_columns_balance() -> None:
    # Every sample prefers prototype 0: plain softmax piles the mass there, Sinkhorn spreads it.
    logits = torch.tensor(
        [[4.0, 0.0, 0.0], [3.0, 1.0, 0.0], [5.0, 0.0, 1.0], [4.0, 2.0, 0.0], [3.5, 0.0, 2.0], [4.0, 1.0, 1.0]]
    )
    probs = sinkhorn_knopp(logits, 0.5, n_iterations=3)
    torch.testing.assert_close(probs.sum(dim=1), torch.ones(6))
    target = 6 / 3  # N / K
    softmax_columns = F.softmax(logits / 0.5, dim=-1).sum(dim=0)
    assert softmax_columns[0] > 5.5  # the imbalance Sinkhorn has to fix
    assert (probs.sum(dim=0) - target).abs().max() < 0.5
    converged = sinkhorn_knopp(logits, 0.5, n_iterations=200)
    torch.testing.assert_close(converged.sum(dim=0), torch.full((3,), target), atol=1e-4, rtol=0)
    # Sinkhorn only rescales rows and columns of exp(logits / temp): log Q - logits / temp = u_i + v_j, whose
    # double-centred residual is zero.
    residual = probs.double().log() - logits.double() / 0.5
    residual = residual - residual.mean(dim=0, keepdim=True) - residual.mean(dim=1, keepdim=True) + residual.mean()
    assert residual.abs().max() < 1e-5


def test_sinkhorn_keeps_leading_shape_and_is_stable() -> None:
    logits = torch.randn(2, 5, 7, generator=torch.Generator().manual_seed(0))
    flat = sinkhorn_knopp(logits.reshape(10, 7), 0.1)
    torch.testing.assert_close(sinkhorn_knopp(logits, 0.1), flat.reshape(2, 5, 7))
    # exp(1000 / 0.04) overflows without the max shift; shifting all logits changes nothing.
    huge = sinkhorn_knopp(torch.tensor(LOGITS) + 1000.0, 0.5)
    assert torch.isfinite(huge).all()
    torch.testing.assert_close(huge, sinkhorn_knopp(torch.tensor(LOGITS), 0.5))
    half = sinkhorn_knopp(torch.tensor(LOGITS, dtype=torch.float16), 0.5)
    assert half.dtype == torch.float32


def test_sinkhorn_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError, match="teacher_temp"):
        sinkhorn_knopp(torch.zeros(2, 2), 0.0)
    with pytest.raises(ValueError, match="n_iterations"):
        sinkhorn_knopp(torch.zeros(2, 2), 0.1, n_iterations=0)


def test_softmax_center_probs_and_ema_update() -> None:
    center = SoftmaxCenter(3, momentum=0.9)
    assert center.center.shape == (1, 3) and not center.center.any()
    logits = torch.tensor([[1.0, 2.0, 3.0], [3.0, 2.0, 7.0]])
    torch.testing.assert_close(center.probs(logits, 0.5), F.softmax(logits / 0.5, dim=-1))

    center.update(logits)  # batch mean (2, 2, 5): center = 0.1 * mean
    torch.testing.assert_close(center.center, torch.tensor([[0.2, 0.2, 0.5]]))
    center.update(torch.tensor([[10.0, 0.0, 0.0]]))  # 0.9 * (0.2, 0.2, 0.5) + 0.1 * (10, 0, 0)
    torch.testing.assert_close(center.center, torch.tensor([[1.18, 0.18, 0.45]]))
    # (T, B, K) logits: the mean is over all rows.
    center.update(torch.tensor([[[1.18, 0.18, 0.45]], [[1.18, 0.18, 0.45]]]))
    torch.testing.assert_close(center.center, torch.tensor([[1.18, 0.18, 0.45]]))
    center.update(torch.zeros(0, 3))  # nothing to average: unchanged, not decayed to 0
    torch.testing.assert_close(center.center, torch.tensor([[1.18, 0.18, 0.45]]))

    expected = F.softmax((logits - torch.tensor([[1.18, 0.18, 0.45]])) / 0.04, dim=-1)
    torch.testing.assert_close(center.probs(logits, 0.04), expected)
    assert "center" in center.state_dict()
    with pytest.raises(ValueError, match="prototypes"):
        center.update(torch.zeros(2, 4))


def test_teacher_probs_dispatch() -> None:
    logits = torch.tensor(LOGITS)
    torch.testing.assert_close(teacher_probs(logits, 0.5, "sinkhorn_knopp", None), sinkhorn_knopp(logits, 0.5))
    center = SoftmaxCenter(3)
    center.center.fill_(1.0)
    torch.testing.assert_close(teacher_probs(logits, 0.5, "softmax", center), F.softmax((logits - 1) / 0.5, dim=-1))
    torch.testing.assert_close(center.center, torch.ones(1, 3))  # no update unless asked
    teacher_probs(logits, 0.5, "softmax", center, update_center=True)
    torch.testing.assert_close(center.center, 0.9 + 0.1 * logits.mean(dim=0, keepdim=True))
    with pytest.raises(ValueError, match="SoftmaxCenter"):
        teacher_probs(logits, 0.5, "softmax", None)
    with pytest.raises(ValueError, match=r"valid: \('sinkhorn_knopp', 'softmax'\)"):
        teacher_probs(logits, 0.5, "centering", center)
    for method in CENTERING_METHODS:  # every name the config accepts gives teacher targets: rows of probabilities
        torch.testing.assert_close(teacher_probs(logits, 0.5, method, center).sum(dim=-1), torch.ones(4))


def _rank_main(rank: int, port: int, conn) -> None:  # type: ignore[no-untyped-def]
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        logits = torch.tensor(LOGITS)
        mine = logits[:3] if rank == 0 else logits[3:]  # unequal shares: 3 rows and 1 row
        probs = sinkhorn_knopp(mine, 0.5, n_iterations=3)
        center = SoftmaxCenter(3, momentum=0.5)
        center.update(mine)
        conn.send((probs.numpy(), center.center.numpy()))  # numpy: torch tensors would travel by shared memory
        dist.barrier()  # no rank tears gloo down while the other still talks to it (a crash at exit once)
    finally:
        dist.destroy_process_group()
        conn.close()


@pytest.mark.skipif(sys.platform != "linux", reason="forks two gloo ranks")
def test_distributed_sums_match_single_process() -> None:
    results = run_ranks(_rank_main, start_method="fork")  # fork skips re-importing torch in the children
    logits = torch.tensor(LOGITS)
    gathered = np.concatenate([results[0][0], results[1][0]])
    np.testing.assert_allclose(gathered, sinkhorn_knopp(logits, 0.5).numpy(), rtol=1e-5, atol=1e-7)
    for _, center in results:  # the global mean over 4 rows, not the mean of the two ranks' means
        np.testing.assert_allclose(center, 0.5 * logits.mean(dim=0, keepdim=True).numpy(), rtol=1e-6)
