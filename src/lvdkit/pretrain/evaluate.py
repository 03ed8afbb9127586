"""Embedding any folder, and judging a backbone: weighted k-NN (DINO's protocol) and a linear probe.

Labeled data is a folder with one sub-folder per class (files directly in the root are ignored), or Parquet with a
``label`` column and an image-bytes (``image``) or path (``uri``/``path``) column.

Images are read as ingest reads them (:func:`load_image`: its file-size, pixel and time limits, then
:func:`lvdkit.core.image.decode_rgb`). An unusable image (empty, not an image, truncated, unreadable, too large, ...)
is skipped and reported as a :class:`Skipped` with ingest's reason; ``strict=True`` raises :class:`UnusableImage`
at the first one instead.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
import torch.nn.functional as F
from PIL import Image

from lvdkit.core import schema
from lvdkit.core.files import IMAGE_EXTENSIONS, list_inputs
from lvdkit.core.image import (
    DEFAULT_DECODE_TIMEOUT_S,
    DEFAULT_MAX_FILE_BYTES,
    DEFAULT_MAX_PIXELS,
    DecodeError,
    decode_rgb,
    read_rgb,
)
from lvdkit.core.io import write_parquet_atomic
from lvdkit.embeddings import create_embedder
from lvdkit.embeddings.base import Embedder


@dataclass
class Labeled:
    """Images (paths or bytes) and their string labels, in one order; ``names`` say which image is which in
    messages (its path, or ``FILE[row N]`` for bytes from Parquet; default: the path, or ``row N``)."""

    images: list[str | bytes]
    labels: list[str]
    names: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.names:
            self.names = default_names(self.images)


def default_names(items: Sequence[str | bytes]) -> list[str]:
    """How images are named in messages unless told: a path as itself, bytes as ``row N``."""
    return [x if isinstance(x, str) else f"row {i}" for i, x in enumerate(items)]


@dataclass(frozen=True)
class Skipped:
    """An image left out: which (``item``: path or ``FILE[row N]``), why (``reason``, one of
    :data:`lvdkit.core.schema.REASONS`, as ingest would quarantine it) and the error text (``detail``)."""

    item: str
    reason: str
    detail: str


class UnusableImage(ValueError):
    """``strict``: an image that cannot be used stops the run (the CLI prints it as ``lvdkit: error: ...``)."""

    def __init__(self, skipped: Skipped) -> None:
        super().__init__(
            f"unusable image {skipped.item}: {skipped.reason} ({skipped.detail}); "
            "without --strict such images are skipped and listed"
        )
        self.skipped = skipped


@dataclass
class Embedded:
    """:func:`embed_images`' result: (N', D) vectors of the usable images, their indices in the input (``kept``)
    and the images skipped."""

    vectors: np.ndarray
    kept: list[int]
    skipped: list[Skipped]


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
    images = table.column(column).to_pylist()
    names = [x if isinstance(x, str) else f"{path}[row {i}]" for i, x in enumerate(images)]
    return Labeled(images, [str(v) for v in table.column("label").to_pylist()], names)


def split(data: Labeled, test_fraction: float, seed: int = 0) -> tuple[Labeled, Labeled]:
    """A stratified train/test split (each class split in the same proportion)."""
    rng = np.random.default_rng(seed)
    labels = np.array(data.labels)
    test = np.zeros(len(labels), dtype=bool)
    for cls in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == cls))
        test[idx[: round(len(idx) * test_fraction)]] = True

    def take(mask: np.ndarray) -> Labeled:
        idx = np.flatnonzero(mask)
        return Labeled([data.images[i] for i in idx], labels[mask].tolist(), [data.names[i] for i in idx])

    return take(~test), take(test)


def load_image(item: str | bytes | None) -> Image.Image:
    """A path/URI or image bytes -> RGB by ingest's rules and default limits (file size, pixels, decode time);
    raises :class:`~lvdkit.core.image.DecodeError` with ingest's reason for an unusable one."""
    if isinstance(item, str):
        return read_rgb(item)
    if item is None:  # a null cell of a Parquet column
        raise DecodeError(schema.REASON_EMPTY, "no image in this row (null)")
    if len(item) > DEFAULT_MAX_FILE_BYTES:
        raise DecodeError(schema.REASON_FILE_TOO_LARGE, f"{len(item)} bytes, more than {DEFAULT_MAX_FILE_BYTES}")
    return decode_rgb(bytes(item), DEFAULT_MAX_PIXELS, DEFAULT_DECODE_TIMEOUT_S)


def embed_images(
    embedder: Embedder,
    items: Sequence[str | bytes],
    batch_size: int = 64,
    progress: bool = False,
    *,
    names: Sequence[str] | None = None,
    strict: bool = False,
) -> Embedded:
    """L2-normalised float32 embeddings of image paths or bytes; unusable images are skipped (``strict``: raise
    :class:`UnusableImage` at the first). ``names``: how to name each item in :class:`Skipped` (default: the path,
    or ``row N``)."""
    from tqdm import tqdm

    labels = list(names) if names is not None else default_names(items)
    out, kept, skipped = [], [], []
    with tqdm(total=len(items), desc="embed", unit="img", disable=not progress) as bar:
        for start in range(0, len(items), batch_size):
            pixels = []
            for i in range(start, min(start + batch_size, len(items))):
                try:
                    pixels.append(embedder.preprocess.prepare(load_image(items[i])))
                    kept.append(i)
                except DecodeError as exc:
                    skipped.append(Skipped(labels[i], exc.reason, exc.detail))
                    if strict:
                        raise UnusableImage(skipped[-1]) from None
            if pixels:
                out.append(embedder.embed(np.stack(pixels)))
            bar.update(min(batch_size, len(items) - start))
    return Embedded(np.concatenate(out) if out else np.zeros((0, 0), np.float32), kept, skipped)


def skip_summary(skipped: Sequence[Skipped]) -> str:
    """``3 unusable images (empty_file: 1, not_an_image: 1, truncated: 1)``: counts by reason, reasons sorted."""
    counts: dict[str, int] = {}
    for s in skipped:
        counts[s.reason] = counts.get(s.reason, 0) + 1
    noun = "image" if len(skipped) == 1 else "images"
    return f"{len(skipped)} unusable {noun} (" + ", ".join(f"{r}: {n}" for r, n in sorted(counts.items())) + ")"


SKIPPED_SCHEMA = pa.schema([("path", pa.string()), ("reason", pa.string()), ("detail", pa.string())])


def skipped_table(skipped: Sequence[Skipped]) -> pa.Table:
    """The skipped images as a table: ``path``, ``reason`` (ingest's), ``detail``."""
    rows = [{"path": s.item, "reason": s.reason, "detail": s.detail} for s in skipped]
    return pa.Table.from_pylist(rows, schema=SKIPPED_SCHEMA)


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
    strict: bool = False,
) -> dict[str, Any]:
    """k-NN and linear-probe accuracy of ``model`` (any embeddings-factory name) on a labeled train/test pair.

    Unusable images are left out of both and listed under ``skipped`` (``path``, ``reason``, ``detail``, ``split``);
    ``strict``: :class:`UnusableImage` at the first one.
    """
    embedder = create_embedder(model, device=device, img_size=img_size, **(kwargs or {}))
    parts = {}
    for name, data in (("train", train), ("test", test)):
        e = embed_images(embedder, data.images, names=data.names, progress=progress, strict=strict)
        if not e.kept:
            raise ValueError(f"no usable {name} images: {len(data.images)} given, {skip_summary(e.skipped)}")
        parts[name] = (e, [data.labels[i] for i in e.kept])
    (tr, y_train), (te, y_test) = parts["train"], parts["test"]
    return {
        "model": model,
        "knn_top1": knn_accuracy(tr.vectors, y_train, te.vectors, y_test, k, temperature),
        "linear_top1": linear_probe_accuracy(tr.vectors, y_train, te.vectors, y_test),
        "n_train": len(y_train),
        "n_test": len(y_test),
        "dim": int(tr.vectors.shape[1]),
        "skipped": [
            {"path": s.item, "reason": s.reason, "detail": s.detail, "split": name}
            for name, (e, _) in parts.items()
            for s in e.skipped
        ],
    }


@dataclass
class FolderEmbeddings:
    """What :func:`embed_folder` wrote: the embeddings file, the skipped-images file, and the images skipped."""

    target: Path
    skipped_file: Path
    skipped: list[Skipped]


def skipped_path(target: Path) -> Path:
    """Where the images left out of embeddings file ``target`` are listed: ``_<stem>.skipped.parquet`` beside it
    (the leading ``_`` keeps it out of a Parquet dataset read of the folder)."""
    return target.with_name(f"_{target.stem}.skipped.parquet")


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
    strict: bool = False,
) -> FolderEmbeddings:
    """Embeddings Parquet (``path``, ``embedding`` list<float32>) for every usable image file under ``data``.

    Unusable files are skipped and listed (``path``, ``reason``, ``detail``) in :func:`skipped_path` (written on
    every run, empty when none was skipped); ``strict``: :class:`UnusableImage` at the first one, nothing written.
    """
    files = image_files(Path(data))
    if not files:
        raise FileNotFoundError(f"no image files under {data}")
    embedder = create_embedder(model, device=device, img_size=img_size, **(kwargs or {}))
    result = embed_images(embedder, files, batch_size, progress, strict=strict)
    out = Path(out)
    target = out / "part-00000.parquet" if out.suffix != ".parquet" else out
    side = skipped_path(target)
    write_parquet_atomic(skipped_table(result.skipped), side)
    if not result.kept:
        raise ValueError(f"no usable images under {data}: {skip_summary(result.skipped)}, listed in {side}")
    dim = result.vectors.shape[1]
    table = pa.table(
        {
            "path": pa.array([files[i] for i in result.kept], pa.string()),
            "embedding": pa.FixedSizeListArray.from_arrays(pa.array(result.vectors.reshape(-1), pa.float32()), dim),
        }
    )
    write_parquet_atomic(table, target)
    return FolderEmbeddings(target, side, result.skipped)
