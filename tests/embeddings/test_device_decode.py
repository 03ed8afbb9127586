"""embed.decode=device: plain JPEGs travel as bytes and are decoded and resized where the model runs (torchvision's
decoder and lvdkit's tensor resize; nvJPEG on a GPU), anything else through Pillow. On a CPU the device path runs the
same code with device=cpu; its embeddings equal Pillow's within the stated tolerance."""

from __future__ import annotations

import io
import pickle
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch
from PIL import Image

from lvdkit.core import schema
from lvdkit.embeddings.device_decode import decode_jpegs, plain_jpeg, prepare_tensor
from lvdkit.embeddings.preprocess import Preprocess
from lvdkit.embeddings.stage import JPEG_COLUMN, EmbedConfig, EmbedInputError, EmbedWork

PIXEL_TOLERANCE = 1  # grey levels between the device path's model input and Pillow's, on a CPU
COSINE_TOLERANCE = 1e-5  # 1 - cosine between the two paths' embeddings of one image, on a CPU


def _photo(seed: int, height: int = 240, width: int = 320) -> Image.Image:
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    base = 128 + 90 * np.sin(x[..., None] / (5 + seed) + np.arange(3) * (seed + 1)) * np.cos(y[..., None] / 11)
    return Image.fromarray(np.clip(base + rng.normal(0, 12, (height, width, 3)), 0, 255).astype(np.uint8))


def _jpeg(image: Image.Image, **kwargs: object) -> bytes:
    buf = io.BytesIO()
    image.save(buf, "JPEG", quality=90, **kwargs)
    return buf.getvalue()


def _rotated_jpeg(image: Image.Image) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees on display
    return _jpeg(image, exif=exif.tobytes())


def _png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, "PNG")
    return buf.getvalue()


def test_only_upright_rgb_or_grey_jpegs_within_the_pixel_limit_go_to_the_device() -> None:
    photo = _photo(0)
    assert plain_jpeg(_jpeg(photo), 10**8)
    assert plain_jpeg(_jpeg(photo.convert("L")), 10**8)
    assert not plain_jpeg(_jpeg(photo.convert("CMYK")), 10**8)  # nvJPEG's colour handling differs: Pillow's
    assert not plain_jpeg(_rotated_jpeg(photo), 10**8)  # the device decoder does not rotate
    assert not plain_jpeg(_png(photo), 10**8)
    assert not plain_jpeg(_jpeg(photo), 320 * 240 - 1)  # too many pixels: Pillow's path names the reason
    assert not plain_jpeg(b"not an image", 10**8)


def test_device_decode_equals_pillow_and_a_refused_jpeg_gives_none_not_a_failed_batch() -> None:
    photos = [_photo(1), _photo(2, 97, 131).convert("L")]
    good = [_jpeg(p) for p in photos]
    broken = good[0][: len(good[0]) // 3]  # truncated: libjpeg refuses it
    out = decode_jpegs([good[0], broken, good[1]], torch.device("cpu"))
    assert out[1] is None
    for data, tensor in zip(good, (out[0], out[2]), strict=True):
        assert tensor is not None and tensor.shape[0] == 3
        ref = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
        assert np.array_equal(tensor.permute(1, 2, 0).numpy(), ref)  # the same libjpeg-turbo as Pillow's


@pytest.mark.parametrize(
    "preprocess",
    [Preprocess((288, 288), "squash", interpolation="bilinear"), Preprocess((224, 224), "center_crop", 0.875)],
)
def test_prepare_tensor_matches_preprocess_prepare(preprocess: Preprocess) -> None:
    image = _photo(3, 301, 457)
    ref = preprocess.prepare(image).astype(int)
    out = prepare_tensor(torch.from_numpy(np.array(image)).permute(2, 0, 1), preprocess)
    assert out.shape == (*preprocess.size, 3)
    assert np.abs(out.numpy().astype(int) - ref).max() <= PIXEL_TOLERANCE


@pytest.fixture(scope="module")
def mixed_folder(tmp_path_factory: pytest.TempPathFactory) -> pa.Table:
    """Plain JPEGs (colour, grey), and what must still go through Pillow: a PNG, a rotated and a CMYK JPEG."""
    folder = tmp_path_factory.mktemp("mixed")
    files = {f"plain_{i}.jpg": _jpeg(_photo(10 + i, 200 + 17 * i, 300 - 11 * i)) for i in range(8)}
    files["grey.jpg"] = _jpeg(_photo(30).convert("L"))
    files["lossless.png"] = _png(_photo(31))
    files["rotated.jpg"] = _rotated_jpeg(_photo(32))
    files["cmyk.jpg"] = _jpeg(_photo(33).convert("CMYK"))
    for name, data in files.items():
        (folder / name).write_bytes(data)
    names = sorted(files)
    return pa.table(
        {
            schema.IMAGE_ID: [f"{i:04d}" for i in range(len(names))],
            schema.URI: [str(folder / n) for n in names],
            schema.CONTENT_HASH: [f"hash-{n}" for n in names],
            schema.PART: pa.array(np.zeros(len(names), np.int64)),
        }
    )


def _work(listing: Path, decode: str, copies: int = 2) -> EmbedWork:
    # two models with different geometry; two synthetic copies, so Pillow rows and device rows share batches
    cfg = EmbedConfig(
        models={"copy": "timm:resnet10t", "semantic": "timm:vit_tiny_patch16_224"},
        model_options={"semantic": {"img_size": 64}},
        batch_size=5,
        calibration_copies=copies,
        decode=decode,  # type: ignore[arg-type]
    )
    return EmbedWork.create(cfg, listing)


@pytest.fixture(scope="module")
def listing(mixed_folder: pa.Table, tmp_path_factory: pytest.TempPathFactory) -> Path:
    import pyarrow.parquet as pq

    path = tmp_path_factory.mktemp("listing") / schema.LISTING
    pq.write_table(mixed_folder, path)
    return path


def test_device_path_embeds_like_pillow_within_tolerance(mixed_folder: pa.Table, listing: Path) -> None:
    torch.manual_seed(0)
    pillow = _work(listing, "pillow")
    device = _work(listing, "device")
    device.models = pillow.models = {}
    decoded = device.decode(mixed_folder)
    assert decoded is not None
    on_device = [u for u, j in zip(decoded[schema.URI], decoded[JPEG_COLUMN], strict=True) if j is not None]
    names = {Path(u).name for u in on_device}
    assert "grey.jpg" in names and {"lossless.png", "rotated.jpg", "cmyk.jpg"}.isdisjoint(names)
    assert len(names) >= 6  # the plain JPEGs but those drawn for a synthetic copy

    device.setup()
    pillow.setup()
    pillow.models = device.models  # the same random-init weights on both sides
    via_device = device.process(mixed_folder, pickle.loads(pickle.dumps(decoded)))  # as a decode task hands it over
    via_pillow = pillow.process(mixed_folder)
    for part in ("", schema.CALIBRATION):
        assert via_device[part].column(schema.IMAGE_ID).equals(via_pillow[part].column(schema.IMAGE_ID))
        for key in ("copy", "semantic"):
            a = np.stack(via_device[part][schema.embedding_column(key)].to_numpy(zero_copy_only=False))
            b = np.stack(via_pillow[part][schema.embedding_column(key)].to_numpy(zero_copy_only=False))
            cosine = (a * b).sum(axis=1)
            assert cosine.min() > 1 - COSINE_TOLERANCE, (part, key, cosine.min())
    itself = device.process(mixed_folder)  # a retried part decodes in the actor: the same device path
    assert itself[""].equals(via_device[""])


def test_a_jpeg_that_changed_since_ingest_still_names_the_file(mixed_folder: pa.Table, tmp_path: Path) -> None:
    import pyarrow.parquet as pq

    victim = tmp_path / "changed.jpg"
    victim.write_bytes(_jpeg(_photo(40)))
    rows = pa.table(
        {
            schema.IMAGE_ID: ["x"],
            schema.URI: [str(victim)],
            schema.CONTENT_HASH: ["h"],
            schema.PART: pa.array([0], pa.int64()),
        }
    )
    pq.write_table(rows, tmp_path / schema.LISTING)
    work = _work(tmp_path / schema.LISTING, "device", copies=0)
    decoded = work.decode(rows)
    assert decoded is not None and decoded[JPEG_COLUMN][0] is not None
    decoded[JPEG_COLUMN][0] = decoded[JPEG_COLUMN][0][:200]  # torn after the header check: both decoders refuse it
    with pytest.raises(EmbedInputError, match=r"changed\.jpg"):
        work.process(rows, decoded)
