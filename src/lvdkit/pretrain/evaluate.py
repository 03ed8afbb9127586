"""Embedding any folder, and judging a backbone: weighted k-NN (DINO's protocol) and a linear probe.

Labeled data is a folder with one sub-folder per class (files directly in the root are ignored), or Parquet with a
``label`` column and an image-bytes (``image``) or path (``uri``/``path``) column.
"""

from __future__ import annotations

import io
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
import torch.nn.functional as F
from PIL import Image

from lvdkit.core.files import IMAGE_EXTENSIONS, list_inputs, local_path
from lvdkit.core.io import write_parquet_atomic
from lvdkit.embeddings import create_embedder
from lvdkit.embeddings.base import Embedder


@dataclass
class Labeled:
    """Images (paths or bytes) and their string labels, in one order."""

    images: list[str | bytes]
    labels: list[str]


def image_files(folder: Path) -> list[str]:
    """The image files under ``folder`` (recursive, sorted), as ingest lists them: UTF-8-safe URIs."""
    return list(list_inputs([str(folder)], IMAGE_EXTENSIONS))


def load_labeled(source: str | Path) -> Labeled:
    """A class-per-folder directory or a Parquet file/folder with ``label`` -> :class:`Labeled`."""
    path = Path(source)
    if path.is_dir() and not any(path.glob("*.parquet")):
        images: list[str | bytes] = []
        labels: list[str] = []
        for cls in sorted(p for p in path.iterdir() if p.is_dir()):
            files = image_files(cls)
            images += files
            labels += [cls.name] * len(files)
        if len(set(labels)) < 2:
            raise ValueError(f"{path}: a labeled folder needs one sub-folder per class (at least 2 with images)")
        return Labeled(images, labels)
    if not path.exists():
        raise FileNotFoundError(f"labeled data not found: {path}")
    table = pq.read_table(path)
    if "label" not in table.column_names:
        raise ValueError(f"{path}: Parquet needs a 'label' column (columns: {table.column_names})")
    column = next((c for c in ("image", "uri", "path") if c in table.column_names), None)
    if column is None:
        raise ValueError(f"{path}: Parquet needs an 'image' (bytes) or 'uri'/'path' column")
    return Labeled(table.column(column).to_pylist(), [str(v) for v in table.column("label").to_pylist()])


def split(data: Labeled, test_fraction: float, seed: int = 0) -> tuple[Labeled, Labeled]:
    """A stratified train/test split (each class split in the same proportion)."""
    rng = np.random.default_rng(seed)
    labels = np.array(data.labels)
    test = np.zeros(len(labels), dtype=bool)
    for cls in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == cls))
        test[idx[: round(len(idx) * test_fraction)]] = True

    def take(mask: np.ndarray) -> Labeled:
        return Labeled([data.images[i] for i in np.flatnonzero(mask)], labels[mask].tolist())

    return take(~test), take(test)


def _open(item: str | bytes) -> Image.Image:
    with Image.open(io.BytesIO(item) if isinstance(item, bytes) else local_path(item)) as im:
        return im.convert("RGB")


def batches(items: Sequence[str | bytes], size: int) -> Iterator[Sequence[str | bytes]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def embed_images(
    embedder: Embedder, items: Sequence[str | bytes], batch_size: int = 64, progress: bool = False
) -> np.ndarray:
    """(N, D) float32 L2-normalised embeddings of image paths or bytes."""
    from tqdm import tqdm

    out = []
    with tqdm(total=len(items), desc="embed", unit="img", disable=not progress) as bar:
        for chunk in batches(items, batch_size):
            pixels = np.stack([embedder.preprocess.prepare(_open(x)) for x in chunk])
            out.append(embedder.embed(pixels))
            bar.update(len(chunk))
    return np.concatenate(out) if out else np.zeros((0, 0), np.float32)


def knn_accuracy(
    train: np.ndarray,
    train_labels: Sequence[str],
    test: np.ndarray,
    test_labels: Sequence[str],
    k: int = 20,
    temperature: float = 0.07,
) -> float:
    """DINO's weighted k-NN: each of the k most cosine-similar training images votes ``exp(sim / T)`` for its class.

    train (N, D), test (M, D), L2-normalised. Returns top-1 accuracy in [0, 1].
    """
    classes = sorted(set(train_labels) | set(test_labels))
    index = {c: i for i, c in enumerate(classes)}
    y_train = torch.tensor([index[c] for c in train_labels])
    y_test = torch.tensor([index[c] for c in test_labels])
    sims = torch.from_numpy(test) @ torch.from_numpy(train).T  # (M, N)
    top, idx = sims.topk(min(k, train.shape[0]), dim=1)  # (M, k)
    votes = torch.zeros(test.shape[0], len(classes))
    votes.scatter_add_(1, y_train[idx], (top / temperature).exp())
    return float((votes.argmax(1) == y_test).float().mean())


def linear_probe_accuracy(
    train: np.ndarray,
    train_labels: Sequence[str],
    test: np.ndarray,
    test_labels: Sequence[str],
    weight_decay: float = 1e-4,
    steps: int = 200,
) -> float:
    """A multinomial logistic regression on frozen features (standardised), fit with L-BFGS; top-1 test accuracy."""
    classes = sorted(set(train_labels) | set(test_labels))
    index = {c: i for i, c in enumerate(classes)}
    x, xt = torch.from_numpy(train).double(), torch.from_numpy(test).double()
    mean, std = x.mean(0), x.std(0).clamp_min(1e-6)
    x, xt = (x - mean) / std, (xt - mean) / std
    y = torch.tensor([index[c] for c in train_labels])
    w = torch.zeros(x.shape[1], len(classes), dtype=torch.float64, requires_grad=True)
    b = torch.zeros(len(classes), dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], max_iter=steps, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = F.cross_entropy(x @ w + b, y) + weight_decay * (w * w).sum()
        loss.backward()
        return loss

    opt.step(closure)
    pred = (xt @ w + b).argmax(1)
    return float((pred == torch.tensor([index[c] for c in test_labels])).float().mean())


def evaluate(
    model: str,
    train: Labeled,
    test: Labeled,
    *,
    img_size: int | None = None,
    kwargs: dict[str, Any] | None = None,
    k: int = 20,
    temperature: float = 0.07,
    device: str = "auto",
    progress: bool = False,
) -> dict[str, Any]:
    """k-NN and linear-probe accuracy of ``model`` (any embeddings-factory name) on a labeled train/test pair."""
    embedder = create_embedder(model, device=device, img_size=img_size, **(kwargs or {}))
    x_train = embed_images(embedder, train.images, progress=progress)
    x_test = embed_images(embedder, test.images, progress=progress)
    return {
        "model": model,
        "knn_top1": knn_accuracy(x_train, train.labels, x_test, test.labels, k, temperature),
        "linear_top1": linear_probe_accuracy(x_train, train.labels, x_test, test.labels),
        "n_train": len(train.labels),
        "n_test": len(test.labels),
        "dim": int(x_train.shape[1]),
    }


def embed_folder(
    model: str,
    data: str | Path,
    out: str | Path,
    *,
    img_size: int | None = None,
    kwargs: dict[str, Any] | None = None,
    batch_size: int = 64,
    device: str = "auto",
    progress: bool = True,
) -> Path:
    """Embeddings Parquet (``path``, ``embedding`` list<float32>) for every image file under ``data``."""
    files = image_files(Path(data))
    if not files:
        raise FileNotFoundError(f"no image files under {data}")
    embedder = create_embedder(model, device=device, img_size=img_size, **(kwargs or {}))
    vectors = embed_images(embedder, files, batch_size, progress)
    dim = vectors.shape[1]
    table = pa.table(
        {
            "path": pa.array(files),
            "embedding": pa.FixedSizeListArray.from_arrays(pa.array(vectors.reshape(-1), pa.float32()), dim),
        }
    )
    out = Path(out)
    target = out / "part-00000.parquet" if out.suffix != ".parquet" else out
    write_parquet_atomic(table, target)
    return target
