"""Label-free knowledge distillation from a frozen teacher (LightlyTrain's documented approach; "Knowledge
distillation: A good teacher is patient and consistent", Beyer et al. 2022).

A FIFO queue of past teacher embeddings acts as a pseudo-classifier: the teacher's and the student's softmax over
their similarities to the queue are matched by KL divergence. A dense variant matches the patch-to-patch
cosine-similarity structure of the two models' token maps.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

# (max number of images, queue size), LightlyTrain's table: small datasets get small queues so that the queue holds
# distinct images rather than many augmentations of the same ones.
QUEUE_SIZES = ((50, 16), (250, 64), (1_000, 256), (10_000, 2048), (20_000, 4096))
MAX_QUEUE_SIZE = 8192
QUEUE_INIT_SEED = 0


def queue_size_for(n_images: int) -> int:
    """Queue size for a dataset of ``n_images``: <= 50 -> 16, <= 250 -> 64, <= 1k -> 256, <= 10k -> 2048,
    <= 20k -> 4096, else 8192."""
    if n_images < 0:
        raise ValueError(f"n_images must be >= 0, got {n_images}")
    for limit, size in QUEUE_SIZES:
        if n_images <= limit:
            return size
    return MAX_QUEUE_SIZE


class EmbeddingQueue(nn.Module):
    """FIFO queue of embeddings: buffers ``queue`` (size, dim) float32 and ``ptr`` (the next row to overwrite).

    Starts full of random unit vectors (seeded, so every rank and every run start alike) so the loss is defined
    from the first step; real embeddings replace them after ``size`` enqueued rows. Rows are L2-normalised on the
    way in unless ``normalize=False``. Under torch.distributed each rank keeps its own copy: enqueue the rows
    gathered from every rank (as distillation does) so that the copies match.
    """

    queue: Tensor
    ptr: Tensor

    def __init__(self, dim: int, size: int, *, seed: int = QUEUE_INIT_SEED, normalize: bool = True) -> None:
        super().__init__()
        if dim < 1 or size < 1:
            raise ValueError(f"dim and size must be >= 1, got dim={dim}, size={size}")
        self.normalize = normalize
        generator = torch.Generator().manual_seed(seed)
        self.register_buffer("queue", F.normalize(torch.randn(size, dim, generator=generator), dim=1))
        self.register_buffer("ptr", torch.zeros((), dtype=torch.long))

    @property
    def size(self) -> int:
        return self.queue.shape[0]

    @torch.no_grad()
    def enqueue(self, x: Tensor) -> None:
        """Write the rows of x (B, dim) over the oldest rows, wrapping around. With B > size only the newest
        ``size`` rows are kept (still in order, oldest at ``ptr``)."""
        if x.ndim != 2 or x.shape[1] != self.queue.shape[1]:
            raise ValueError(f"x must be (B, {self.queue.shape[1]}), got {tuple(x.shape)}")
        x = x.detach()[-self.size :].to(self.queue)
        if self.normalize:
            x = F.normalize(x, dim=1)
        rows = (self.ptr + torch.arange(x.shape[0], device=self.queue.device)) % self.size
        self.queue[rows] = x
        self.ptr.copy_((self.ptr + x.shape[0]) % self.size)


def distillation_loss(student: Tensor, teacher: Tensor, queue: Tensor, temperature: float = 0.07) -> Tensor:
    """``KL(softmax(t Q^T / T) || softmax(s Q^T / T))``, mean over the batch.

    student, teacher: (B, D) embeddings, L2-normalised here (the student's after its projection to the teacher's
    dimension). queue: (Q, D) rows taken as given (unit vectors from :class:`EmbeddingQueue`). The teacher and the
    queue are constants: gradients reach the student only. Returns a float32 scalar, 0 when student == teacher.
    """
    if student.ndim != 2 or student.shape != teacher.shape:
        raise ValueError(f"student and teacher must both be (B, D), got {tuple(student.shape)}, {tuple(teacher.shape)}")
    if queue.ndim != 2 or queue.shape[1] != student.shape[1]:
        raise ValueError(f"queue must be (Q, {student.shape[1]}), got {tuple(queue.shape)}")
    if temperature <= 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    bank = queue.detach().float()
    s = F.normalize(student.float(), dim=-1)
    t = F.normalize(teacher.detach().float(), dim=-1)
    log_p_student = F.log_softmax(s @ bank.t() / temperature, dim=-1)
    log_p_teacher = F.log_softmax(t @ bank.t() / temperature, dim=-1)
    # kl_div(input, target) is KL(target || input); "batchmean" sums over classes and averages over rows.
    return F.kl_div(log_p_student, log_p_teacher, reduction="batchmean", log_target=True)


def _square_grid(n_tokens: int) -> tuple[int, int]:
    side = math.isqrt(n_tokens)
    if side * side != n_tokens:
        raise ValueError(f"{n_tokens} tokens are not a square grid: pass the grids explicitly")
    return side, side


def _resize_tokens(tokens: Tensor, grid: tuple[int, int], size: tuple[int, int]) -> Tensor:
    batch, _, dim = tokens.shape
    image = tokens.transpose(1, 2).reshape(batch, dim, *grid)
    image = F.interpolate(image, size=size, mode="bilinear", align_corners=False)
    return image.flatten(2).transpose(1, 2)


def _drop_diagonal(matrix: Tensor) -> Tensor:
    # (B, N, N) -> (B, N, N - 1): in the flattened matrix the diagonal recurs every N + 1 entries, so dropping the
    # first entry and viewing the rest as rows of N + 1 puts every remaining diagonal entry in the last column.
    batch, n, _ = matrix.shape
    return matrix.flatten(1)[:, 1:].reshape(batch, n - 1, n + 1)[:, :, :-1].reshape(batch, n, n - 1)


def dense_similarity_loss(
    student_tokens: Tensor,
    teacher_tokens: Tensor,
    temperature: float = 0.07,
    *,
    student_grid: tuple[int, int] | None = None,
    teacher_grid: tuple[int, int] | None = None,
    exclude_self: bool = True,
) -> Tensor:
    """KL between the row-softmaxes of the teacher's and the student's token cosine-similarity matrices.

    student_tokens: (B, N, Ds), teacher_tokens: (B, M, Dt) patch tokens (no CLS / register tokens); the feature
    dimensions may differ, only similarities are compared. For each image, ``A = softmax(cos(x_i, x_j) / T)`` over
    j for each token i; the loss is ``KL(A_teacher || A_student)`` averaged over images and rows i.

    When N != M the teacher's token map is resized (bilinear) to the student's grid; the grids are taken as square
    unless ``student_grid`` / ``teacher_grid`` (H, W) are given. With ``exclude_self`` (default) each token's
    similarity to itself is left out of its row: it is 1 / T (about 14 at T = 0.07) in both models and would
    otherwise take nearly all the softmax mass and flatten the loss. The teacher is a constant.
    """
    if student_tokens.ndim != 3 or teacher_tokens.ndim != 3 or student_tokens.shape[0] != teacher_tokens.shape[0]:
        raise ValueError(
            f"expected student (B, N, Ds) and teacher (B, M, Dt) tokens, got {tuple(student_tokens.shape)}, "
            f"{tuple(teacher_tokens.shape)}"
        )
    if temperature <= 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    n_student, n_teacher = student_tokens.shape[1], teacher_tokens.shape[1]
    teacher = teacher_tokens.detach().float()
    if n_student != n_teacher:
        size = student_grid or _square_grid(n_student)
        grid = teacher_grid or _square_grid(n_teacher)
        if size[0] * size[1] != n_student or grid[0] * grid[1] != n_teacher:
            raise ValueError(f"grids {size} and {grid} do not hold {n_student} and {n_teacher} tokens")
        teacher = _resize_tokens(teacher, grid, size)
    if exclude_self and n_student < 2:
        raise ValueError("exclude_self needs at least 2 tokens per image")
    s = F.normalize(student_tokens.float(), dim=-1)
    t = F.normalize(teacher, dim=-1)
    sim_student = s @ s.transpose(1, 2) / temperature
    sim_teacher = t @ t.transpose(1, 2) / temperature
    if exclude_self:
        sim_student, sim_teacher = _drop_diagonal(sim_student), _drop_diagonal(sim_teacher)
    log_p_student = F.log_softmax(sim_student, dim=-1).flatten(0, 1)
    log_p_teacher = F.log_softmax(sim_teacher, dim=-1).flatten(0, 1)
    return F.kl_div(log_p_student, log_p_teacher, reduction="batchmean", log_target=True)
