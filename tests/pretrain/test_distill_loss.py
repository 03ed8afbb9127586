"""Distillation: queue sizes, FIFO queue, KL against a closed form, dense similarity loss."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from lvdkit.pretrain.distill_loss import EmbeddingQueue, dense_similarity_loss, distillation_loss, queue_size_for


def kl(p: list[float], q: list[float]) -> float:
    return sum(pi * math.log(pi / qi) for pi, qi in zip(p, q, strict=True))


def softmax(values: list[float], temp: float = 1.0) -> list[float]:
    e = [math.exp(v / temp) for v in values]
    return [v / sum(e) for v in e]


@pytest.mark.parametrize(
    ("n_images", "size"),
    [
        (0, 16),
        (50, 16),
        (51, 64),
        (250, 64),
        (251, 256),
        (1000, 256),
        (1001, 2048),
        (10_000, 2048),
        (10_001, 4096),
        (20_000, 4096),
        (20_001, 8192),
        (142_000_000, 8192),
    ],
)
def test_queue_size_table(n_images: int, size: int) -> None:
    assert queue_size_for(n_images) == size


def test_queue_starts_with_seeded_unit_vectors() -> None:
    queue = EmbeddingQueue(dim=8, size=16)
    assert queue.queue.shape == (16, 8) and queue.ptr.item() == 0
    torch.testing.assert_close(queue.queue.norm(dim=1), torch.ones(16))
    assert torch.equal(queue.queue, EmbeddingQueue(dim=8, size=16).queue)  # same on every rank and run
    assert not torch.equal(queue.queue, EmbeddingQueue(dim=8, size=16, seed=1).queue)
    assert set(queue.state_dict()) == {"queue", "ptr"}  # both survive a checkpoint
    with pytest.raises(ValueError, match="n_images"):
        queue_size_for(-1)
    with pytest.raises(ValueError, match="size"):
        EmbeddingQueue(dim=8, size=0)


def test_fifo_order_and_wrap_around() -> None:
    queue = EmbeddingQueue(dim=2, size=4, normalize=False)

    def rows(*values: float) -> torch.Tensor:
        return torch.tensor([[v, -v] for v in values])

    queue.enqueue(rows(1, 2))
    assert torch.equal(queue.queue[:2], rows(1, 2)) and queue.ptr.item() == 2
    queue.enqueue(rows(3, 4, 5))  # fills slots 2, 3 then wraps to 0
    assert torch.equal(queue.queue, rows(5, 2, 3, 4)) and queue.ptr.item() == 1
    queue.enqueue(rows(10, 11, 12, 13, 14, 15))  # more than the queue holds: the newest 4, oldest at ptr
    assert torch.equal(queue.queue, rows(15, 12, 13, 14)) and queue.ptr.item() == 1
    queue.enqueue(rows(20, 21, 22, 23))  # exactly one lap: ptr unchanged
    assert torch.equal(queue.queue, rows(23, 20, 21, 22)) and queue.ptr.item() == 1
    with pytest.raises(ValueError, match=r"\(B, 2\)"):
        queue.enqueue(torch.zeros(3, 5))

    normalised = EmbeddingQueue(dim=2, size=4)
    normalised.enqueue(torch.tensor([[3.0, 4.0]]))
    torch.testing.assert_close(normalised.queue[0], torch.tensor([0.6, 0.8]))


def test_distillation_loss_closed_form() -> None:
    bank = torch.eye(2)
    teacher = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    student = torch.tensor([[0.0, 3.0], [0.0, 0.5]])  # row 0 points the other way, row 1 agrees after normalising
    # Row 0: KL(softmax([1, 0]) || softmax([0, 1])) = tanh(1/2) at temperature 1; row 1: 0. Batch mean: half.
    expected = kl(softmax([1, 0]), softmax([0, 1])) / 2
    assert expected == pytest.approx(math.tanh(0.5) / 2)
    assert distillation_loss(student, teacher, bank, temperature=1.0).item() == pytest.approx(expected, rel=1e-6)
    # At T = 0.07 the same geometry gives the sharper value.
    sharp = kl(softmax([1, 0], 0.07), softmax([0, 1], 0.07)) / 2
    assert distillation_loss(student, teacher, bank).item() == pytest.approx(sharp, rel=1e-5)


def test_distillation_loss_zero_iff_same_direction_and_student_only_gradient() -> None:
    gen = torch.Generator().manual_seed(0)
    queue = EmbeddingQueue(dim=16, size=64)
    teacher = torch.randn(8, 16, generator=gen, requires_grad=True)
    assert distillation_loss(teacher.detach() * 3.0, teacher, queue.queue).abs().item() < 1e-6
    student = torch.randn(8, 16, generator=gen, requires_grad=True)
    bank = queue.queue.clone().requires_grad_()
    loss = distillation_loss(student, teacher, bank)
    assert loss.item() > 0.01
    loss.backward()
    assert student.grad is not None and student.grad.abs().sum() > 0
    assert teacher.grad is None and bank.grad is None
    with pytest.raises(ValueError, match="queue"):
        distillation_loss(student, teacher, torch.zeros(4, 3))


def test_dense_similarity_loss_hand_value() -> None:
    teacher = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [1.0, 0.0]]])  # cosines: t0.t1 = 0, t0.t2 = 1, t1.t2 = 0
    student = torch.tensor([[[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]]])  # s0.s1 = 1, s0.s2 = 0, s1.s2 = 0
    # Rows without the self-similarity: row 0 over (1, 2), row 1 over (0, 2), row 2 over (0, 1).
    rows = [((0, 1), (1, 0)), ((0, 0), (1, 0)), ((1, 0), (0, 0))]
    expected = sum(kl(softmax(list(t)), softmax(list(s))) for t, s in rows) / 3
    got = dense_similarity_loss(student, teacher, temperature=1.0)
    assert got.item() == pytest.approx(expected, rel=1e-6)
    # With the diagonal (cos = 1 for both) in every row.
    rows_self = [((1, 0, 1), (1, 1, 0)), ((0, 1, 0), (1, 1, 0)), ((1, 0, 1), (0, 0, 1))]
    expected_self = sum(kl(softmax(list(t)), softmax(list(s))) for t, s in rows_self) / 3
    got_self = dense_similarity_loss(student, teacher, temperature=1.0, exclude_self=False)
    assert got_self.item() == pytest.approx(expected_self, rel=1e-6)


def test_dense_similarity_loss_invariances_and_gradients() -> None:
    gen = torch.Generator().manual_seed(0)
    teacher = torch.randn(2, 9, 6, generator=gen)
    rotation, _ = torch.linalg.qr(torch.randn(6, 6, generator=gen))
    # Same similarity structure in another basis and a larger dimension: zero.
    student = F.pad(teacher @ rotation, (0, 4)) * 2.0
    assert dense_similarity_loss(student, teacher).abs().item() < 1e-5
    student = torch.randn(2, 9, 10, generator=gen, requires_grad=True)
    teacher.requires_grad_()
    loss = dense_similarity_loss(student, teacher)
    assert loss.item() > 0.01
    loss.backward()
    assert student.grad is not None and teacher.grad is None


def test_dense_similarity_loss_resizes_the_teacher_grid() -> None:
    gen = torch.Generator().manual_seed(1)
    teacher = torch.randn(2, 16, 5, generator=gen)  # 4 x 4 grid
    resized = F.interpolate(teacher.transpose(1, 2).reshape(2, 5, 4, 4), size=(2, 2), mode="bilinear")
    student = resized.flatten(2).transpose(1, 2)  # 2 x 2 grid matching the resized teacher
    assert dense_similarity_loss(student, teacher).abs().item() < 1e-5
    assert dense_similarity_loss(student, teacher[:, :12], teacher_grid=(3, 4)).item() > 0
    with pytest.raises(ValueError, match="square"):
        dense_similarity_loss(student, teacher[:, :15])
    with pytest.raises(ValueError, match="grids"):
        dense_similarity_loss(student, teacher, teacher_grid=(2, 4))
