"""NT-Xent (SimCLR's loss) against a brute-force loop over eq. 1 of the paper, and its negatives across ranks."""

from __future__ import annotations

import math
import sys

import numpy as np
import pytest
import torch

from lvdkit.pretrain.nt_xent_loss import nt_xent_loss

from .gloo_ranks import run_ranks


def brute_force(z_a: np.ndarray, z_b: np.ndarray, temperature: float) -> float:
    """Eq. 1 written out in float64: the 2N anchors in order a_0..a_{N-1}, b_0..b_{N-1}; anchor k's positive is
    k + N mod 2N; the denominator sums over every other anchor (positive included, itself excluded)."""
    z = np.concatenate([z_a, z_b]).astype(np.float64)
    z /= np.linalg.norm(z, axis=1, keepdims=True)
    n2 = len(z)
    total = 0.0
    for i in range(n2):
        j = (i + n2 // 2) % n2
        numerator = math.exp(z[i] @ z[j] / temperature)
        denominator = sum(math.exp(z[i] @ z[k] / temperature) for k in range(n2) if k != i)
        total += -math.log(numerator / denominator)
    return total / n2


@pytest.mark.parametrize(("batch", "temperature"), [(1, 0.1), (2, 0.5), (5, 0.1), (8, 1.0)])
def test_matches_brute_force(batch: int, temperature: float) -> None:
    gen = torch.Generator().manual_seed(batch)
    z_a, z_b = torch.randn(batch, 6, generator=gen), torch.randn(batch, 6, generator=gen) * 3  # norms do not matter
    got = nt_xent_loss(z_a, z_b, temperature)
    assert got.dtype == torch.float32 and got.ndim == 0
    assert float(got) == pytest.approx(brute_force(z_a.numpy(), z_b.numpy(), temperature), rel=1e-5)


def test_one_image_has_only_its_positive_and_aligned_views_score_low() -> None:
    z = torch.randn(1, 4)
    assert float(nt_xent_loss(z, -z)) == pytest.approx(0.0, abs=1e-6)  # 1 image: the positive is the only candidate
    aligned = torch.eye(4)  # four orthogonal images, each view identical to its pair
    low = float(nt_xent_loss(aligned, aligned, 0.1))
    assert low == pytest.approx(-math.log(math.exp(10) / (math.exp(10) + 6)), abs=1e-6)  # float32 near 0
    swapped = float(nt_xent_loss(aligned, aligned.roll(1, dims=0), 0.1))  # each view matches another image
    assert swapped > low + 5


def test_gradient_reaches_both_views_and_bad_input_is_refused() -> None:
    z_a, z_b = torch.randn(3, 5, requires_grad=True), torch.randn(3, 5, requires_grad=True)
    nt_xent_loss(z_a, z_b).backward()
    assert z_a.grad is not None and z_b.grad is not None and z_a.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="one shape"):
        nt_xent_loss(torch.randn(3, 5), torch.randn(2, 5))
    with pytest.raises(ValueError, match="temperature"):
        nt_xent_loss(torch.randn(3, 5), torch.randn(3, 5), 0.0)


Z_A = np.random.default_rng(0).normal(size=(4, 3)).astype(np.float32)
Z_B = np.random.default_rng(1).normal(size=(4, 3)).astype(np.float32)


def _rank_main(rank: int, port: int, conn) -> None:  # type: ignore[no-untyped-def]
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        a = torch.tensor(Z_A[2 * rank : 2 * rank + 2], requires_grad=True)  # 2 images per rank
        b = torch.tensor(Z_B[2 * rank : 2 * rank + 2], requires_grad=True)
        loss = nt_xent_loss(a, b, 0.2)
        loss.backward()
        assert a.grad is not None and b.grad is not None
        conn.send((float(loss), a.grad.numpy(), b.grad.numpy()))
        dist.barrier()  # no rank tears gloo down while the other still talks to it (a crash at exit once)
    finally:
        dist.destroy_process_group()
        conn.close()


@pytest.mark.skipif(sys.platform != "linux", reason="starts two gloo ranks")
def test_negatives_span_every_rank() -> None:
    results = run_ranks(_rank_main, start_method="spawn")
    # The mean of the ranks' losses (what DDP's gradient averaging optimises) is the loss of the whole batch.
    assert np.mean([r[0] for r in results]) == pytest.approx(brute_force(Z_A, Z_B, 0.2), rel=1e-5)
    # Gradients flow back to the rank that owns each row: each rank's rows get the gradient of the sum of the
    # ranks' losses, i.e. 2 x the whole-batch loss's gradient (DDP's average over 2 ranks divides it back).
    a, b = torch.tensor(Z_A, requires_grad=True), torch.tensor(Z_B, requires_grad=True)
    nt_xent_loss(a, b, 0.2).backward()
    assert a.grad is not None and b.grad is not None
    np.testing.assert_allclose(np.concatenate([r[1] for r in results]), 2 * a.grad.numpy(), rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(np.concatenate([r[2] for r in results]), 2 * b.grad.numpy(), rtol=1e-4, atol=1e-6)
