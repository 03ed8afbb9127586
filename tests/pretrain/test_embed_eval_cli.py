"""``lvdkit embed`` and ``lvdkit eval knn`` on folders holding broken files (GitHub issue 17): unusable images are
skipped and listed with ingest's reasons, never a traceback; ``--strict`` makes the first one an error (exit 2)."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from lvdkit.cli import main
from lvdkit.pretrain.evaluate import load_labeled, skipped_path, split

MODEL = ["--model", "timm:resnet10t", "--img-size", "32", "--device", "cpu"]
BAD_REASONS = {"blue/cut.jpg": "truncated", "red/empty.jpg": "empty_file", "red/text.png": "not_an_image"}


def _jpeg(side: int, seed: int) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (side, side, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


@pytest.fixture
def data(tmp_path: Path) -> Path:
    """Two classes of six good images each, plus a truncated JPEG, an empty .jpg and a text file named .png."""
    root = tmp_path / "data"
    for cls, colour in (("red", (200, 30, 30)), ("blue", (30, 30, 200))):
        (root / cls).mkdir(parents=True)
        for i in range(6):
            Image.new("RGB", (24 + i, 24), tuple(c + 5 * i for c in colour)).save(root / cls / f"{i}.png")
    whole = _jpeg(64, 0)
    (root / "blue" / "cut.jpg").write_bytes(whole[: len(whole) // 2])
    (root / "red" / "empty.jpg").write_bytes(b"")
    (root / "red" / "text.png").write_text("this is not an image\n")
    return root


def _good(root: Path) -> list[str]:
    return sorted(str(p) for p in root.rglob("*.png") if p.relative_to(root).as_posix() not in BAD_REASONS)


def _reasons(root: Path, rows: list[dict[str, str]]) -> dict[str, str]:
    return {Path(r["path"]).relative_to(root).as_posix(): r["reason"] for r in rows}


def test_embed_skips_and_lists_unusable_images(data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "emb"
    assert main(["embed", *MODEL, "--data", str(data), "--out", str(out)]) == 0
    captured = capsys.readouterr()
    table = pq.read_table(out / "part-00000.parquet")
    assert sorted(table.column("path").to_pylist()) == _good(data)  # every good image, and only those
    assert table.num_rows == 12 and table.schema.field("embedding").type.list_size == 512
    side = skipped_path(out / "part-00000.parquet")
    assert side == out / "_part-00000.skipped.parquet"
    listed = pq.read_table(side)
    assert listed.column_names == ["path", "reason", "detail"]
    assert _reasons(data, listed.to_pylist()) == BAD_REASONS
    assert all(listed.column("detail").to_pylist())
    expected = (
        f"lvdkit embed: skipped 3 unusable images (empty_file: 1, not_an_image: 1, truncated: 1); listed in {side}"
    )
    assert expected in captured.err.splitlines()
    assert "Traceback" not in captured.err
    assert pq.read_table(out).num_rows == 12  # the side file stays out of a dataset read of the folder


def test_embed_strict_fails_on_the_first_unusable_image(
    data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "emb.parquet"
    assert main(["embed", *MODEL, "--data", str(data), "--out", str(out), "--strict"]) == 2
    err = capsys.readouterr().err
    first = data / "blue" / "cut.jpg"  # files are embedded in sorted order: blue/ before red/
    assert err.splitlines()[-1].startswith(f"lvdkit: error: unusable image {first}: truncated (")  # after tqdm
    assert "--strict" in err and "Traceback" not in err
    assert not out.exists()


def test_embed_of_only_unusable_images_is_an_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "a.jpg").write_bytes(b"")
    assert main(["embed", *MODEL, "--data", str(tmp_path / "bad"), "--out", str(tmp_path / "emb")]) == 2
    assert "no usable images" in capsys.readouterr().err


def test_eval_knn_skips_and_lists_unusable_images(
    data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    figures = tmp_path / "eval.json"
    assert main(["eval", "knn", *MODEL, "--train", str(data), "--k", "3", "--json", str(figures)]) == 0
    captured = capsys.readouterr()
    result = json.loads(figures.read_text())[0]
    assert result["n_train"] + result["n_test"] == 12 and 0.0 <= result["knn_top1"] <= 1.0
    assert _reasons(data, result["skipped"]) == BAD_REASONS
    assert {s["split"] for s in result["skipped"]} <= {"train", "test"}
    lines = captured.err.splitlines()
    assert "lvdkit eval: skipped 3 unusable images (empty_file: 1, not_an_image: 1, truncated: 1):" in lines
    for name, reason in BAD_REASONS.items():
        assert any(line.startswith(f"  {data / name} (") and f": {reason} (" in line for line in lines)
    assert "Traceback" not in captured.err and "k-NN top-1" in captured.out


def test_eval_knn_strict_fails_on_the_first_unusable_image(data: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["eval", "knn", *MODEL, "--train", str(data), "--k", "3", "--strict"]) == 2
    err = capsys.readouterr().err
    train, test = split(load_labeled(data), 0.5)
    order = [x for x in [*train.images, *test.images] if isinstance(x, str)]
    first = next(x for x in order if Path(x).relative_to(data).as_posix() in BAD_REASONS)
    reason = BAD_REASONS[Path(first).relative_to(data).as_posix()]
    assert err.splitlines()[-1].startswith(f"lvdkit: error: unusable image {first}: {reason} (")
    assert "Traceback" not in err


def test_eval_knn_on_parquet_bytes_skips_bad_rows(
    data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    images: list[bytes | None] = [p.read_bytes() for p in map(Path, _good(data))]
    labels = [Path(p).parent.name for p in _good(data)]
    whole = _jpeg(64, 1)
    images += [b"", b"not an image at all", whole[: len(whole) // 2], None]
    labels += ["red", "blue", "red", "blue"]
    labeled = tmp_path / "labeled.parquet"
    pq.write_table(pa.table({"image": pa.array(images, pa.binary()), "label": labels}), labeled)
    figures = tmp_path / "eval.json"
    assert main(["eval", "knn", *MODEL, "--train", str(labeled), "--k", "3", "--json", str(figures)]) == 0
    result = json.loads(figures.read_text())[0]
    assert result["n_train"] + result["n_test"] == 12
    assert {s["path"]: s["reason"] for s in result["skipped"]} == {
        f"{labeled}[row 12]": "empty_file",
        f"{labeled}[row 13]": "not_an_image",
        f"{labeled}[row 14]": "truncated",
        f"{labeled}[row 15]": "empty_file",
    }
    assert "lvdkit eval: skipped 4 unusable images (empty_file: 2, not_an_image: 1, truncated: 1):" in (
        capsys.readouterr().err
    )
    assert main(["eval", "knn", *MODEL, "--train", str(labeled), "--k", "3", "--strict"]) == 2
    assert f"lvdkit: error: unusable image {labeled}[row " in capsys.readouterr().err


def test_help_documents_strict(capsys: pytest.CaptureFixture[str]) -> None:
    for command in (["embed"], ["eval", "knn"]):
        with pytest.raises(SystemExit):
            main([*command, "--help"])
        assert "--strict" in capsys.readouterr().out
