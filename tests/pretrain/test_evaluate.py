"""k-NN and linear-probe evaluation, labeled-data loading, and checkpoint loading safety."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from lvdkit.pretrain.evaluate import knn_accuracy, linear_probe_accuracy, load_labeled, split
from lvdkit.pretrain.train import META_FILE, STATE_FILE, read_checkpoint


def _unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def test_knn_weights_votes_by_exp_similarity_over_temperature() -> None:
    # One test point; two "a" neighbours at similarity 0.6 each, one "b" neighbour at 0.9.
    # With T = 0.07: a gets 2 exp(0.6/0.07) = 2 * 5,271 ; b gets exp(0.9/0.07) = 387,742, so b wins;
    # with T = 1: a gets 2 exp(0.6) = 3.64 > exp(0.9) = 2.46, so a wins.
    test = np.array([[1.0, 0.0, 0.0]], dtype=np.float32)
    train = np.array([[0.6, 0.8, 0.0], [0.6, 0.0, 0.8], [0.9, np.sqrt(1 - 0.81), 0.0]], dtype=np.float32)
    labels = ["a", "a", "b"]
    assert knn_accuracy(train, labels, test, ["b"], k=3, temperature=0.07) == 1.0
    assert knn_accuracy(train, labels, test, ["a"], k=3, temperature=1.0) == 1.0
    # k = 1 keeps only the nearest (b) whatever the temperature.
    assert knn_accuracy(train, labels, test, ["b"], k=1, temperature=1.0) == 1.0


def test_knn_matches_a_brute_force_reference() -> None:
    rng = np.random.default_rng(0)
    train, test = _unit(rng.normal(size=(120, 16))), _unit(rng.normal(size=(50, 16)))
    y_train = [str(v) for v in rng.integers(0, 4, 120)]
    y_test = [str(v) for v in rng.integers(0, 4, 50)]
    hits = 0
    for x, y in zip(test, y_test, strict=True):
        sims = train @ x
        top = np.argsort(-sims)[:20]
        votes: dict[str, float] = {}
        for i in top:
            votes[y_train[i]] = votes.get(y_train[i], 0.0) + float(np.exp(sims[i] / 0.07))
        hits += max(votes, key=lambda c: votes[c]) == y
    assert knn_accuracy(train, y_train, test, y_test) == pytest.approx(hits / 50)


def test_linear_probe_separates_separable_classes_and_not_noise() -> None:
    rng = np.random.default_rng(1)
    centers = rng.normal(size=(3, 8)) * 4
    y = rng.integers(0, 3, 300)
    x = (centers[y] + rng.normal(size=(300, 8))).astype(np.float32)
    labels = [str(v) for v in y]
    assert linear_probe_accuracy(x[:200], labels[:200], x[200:], labels[200:]) > 0.95
    noise = rng.normal(size=(300, 8)).astype(np.float32)
    assert linear_probe_accuracy(noise[:200], labels[:200], noise[200:], labels[200:]) < 0.6


def test_labeled_folder_and_stratified_split(tmp_path: Path) -> None:
    for cls in ("cat", "dog"):
        (tmp_path / cls).mkdir()
        for i in range(10):
            Image.new("RGB", (8, 8), (i, 0, 0)).save(tmp_path / cls / f"{i}.png")
    Image.new("RGB", (8, 8)).save(tmp_path / "unlabeled.png")  # files in the root have no class: ignored
    data = load_labeled(tmp_path)
    assert len(data.images) == 20 and sorted(set(data.labels)) == ["cat", "dog"]
    train, test = split(data, 0.3)
    assert sorted(test.labels) == ["cat"] * 3 + ["dog"] * 3
    assert not set(train.images) & set(test.images)
    with pytest.raises(ValueError, match="one sub-folder per class"):
        load_labeled(tmp_path / "cat")


class _Payload:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (Path.touch, (str(self.marker),))  # type: ignore[return-value]


def test_a_checkpoint_carrying_a_pickle_payload_is_refused(tmp_path: Path) -> None:
    marker = tmp_path / "code_ran"
    folder = tmp_path / "checkpoint_x"
    folder.mkdir()
    torch.save({"method": {"w": torch.zeros(2)}, "optimizer": _Payload(marker)}, folder / STATE_FILE)
    (folder / META_FILE).write_text(json.dumps({"step": 1}))
    with pytest.raises(ValueError, match="weights-only"):
        read_checkpoint(folder)
    assert not marker.exists()


def test_embed_and_eval_commands_on_a_folder(tmp_path: Path) -> None:
    import pyarrow.parquet as pq

    from ..conftest import run_cli

    data = tmp_path / "data"
    # One flat colour per class, at six sizes: resized to 32 px every image of a class is the same picture, so any
    # model embeds a class as one point and k-NN must be exactly right (a label or split mix-up would show).
    for cls, colour in (("red", (200, 30, 30)), ("blue", (30, 30, 200))):
        (data / cls).mkdir(parents=True)
        for i in range(6):
            Image.new("RGB", (24 + i, 24), colour).save(data / cls / f"{i}.png")
    out = tmp_path / "emb"
    done = run_cli("embed", "--model", "timm:resnet10t", "--img-size", "32", "--data", str(data), "--out", str(out))
    assert done.returncode == 0, done.stderr
    table = pq.read_table(out / "part-00000.parquet")
    assert table.num_rows == 12 and table.schema.field("embedding").type.list_size == 512
    norms = np.linalg.norm(np.stack(table.column("embedding").to_numpy(zero_copy_only=False)), axis=1)
    assert np.allclose(norms, 1.0, atol=1e-4)
    figures = tmp_path / "eval.json"
    done = run_cli(
        "eval",
        "knn",
        "--model",
        "timm:resnet10t",
        "--img-size",
        "32",
        "--train",
        str(data),
        "--k",
        "3",
        "--json",
        str(figures),
    )
    assert done.returncode == 0, done.stderr
    result = json.loads(figures.read_text())[0]
    assert result["n_train"] == 6 and result["n_test"] == 6 and result["knn_top1"] == 1.0
    assert "k-NN top-1" in done.stdout
