"""crops.decode=device: the Ray Data task plans the crops (boxes, flips) and ships JPEG bytes; the training worker
decodes and cuts them on its device. Here the device is the CPU, running the code a GPU runs."""

from __future__ import annotations

import io
import math
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from lvdkit.core.settings import load_config
from lvdkit.pretrain.augment import (
    GLOBAL_KEYS,
    LOCAL_KEY,
    RATIO,
    VIEW_KEY,
    AugmentBatch,
    Crop,
    decodes_on_device,
    draw_box,
    views_of,
)
from lvdkit.pretrain.config import CropsConfig, PretrainConfig
from lvdkit.pretrain.device_views import JPEG, RGB, RGB_SHAPE, DeviceViews

CROPS = CropsConfig(global_size=32, local_size=16, n_local=3, blur_kernel=3)


def _photo(seed: int, height: int = 90, width: int = 120) -> Image.Image:
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    base = 128 + 90 * np.sin(x[..., None] / (4 + seed) + np.arange(3)) * np.cos(y[..., None] / 9)
    return Image.fromarray(np.clip(base + rng.normal(0, 10, (height, width, 3)), 0, 255).astype(np.uint8))


def _encode(image: Image.Image, fmt: str, **kwargs: object) -> bytes:
    buf = io.BytesIO()
    image.save(buf, fmt, **kwargs)
    return buf.getvalue()


def _rotated_jpeg(image: Image.Image) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = 6  # shown rotated by 90 degrees: the upright image is height x width
    return _encode(image, "JPEG", exif=exif.tobytes())


def test_drawn_boxes_lie_in_the_image_with_the_area_and_aspect_asked() -> None:
    torch.manual_seed(0)
    for width, height in ((120, 90), (30, 200), (7, 5)):
        for _ in range(200):
            left, top, right, bottom = draw_box(width, height, [0.2, 0.6])
            assert 0 <= left < right <= width and 0 <= top < bottom <= height
            w, h = right - left, bottom - top
            big = min(width, height) >= 30  # a 7x5 image's crops are too few pixels to round to the bounds
            if big and (w, h) != (width, height) and width / height >= RATIO[0]:  # not the fallback crop
                assert 0.2 - 0.03 <= w * h / (width * height) <= 0.6 + 0.03  # sides rounded to pixels
                assert RATIO[0] - 0.1 <= w / h <= RATIO[1] + 0.1
    assert draw_box(30, 200, [0.99, 1.0])[2] - draw_box(30, 200, [0.99, 1.0])[0] <= 30  # tall: a 3/4 central crop


@pytest.mark.parametrize("n", [None, 4])
def test_device_crops_equal_pillow_crops_of_the_same_plan_within_one_grey_level(n: int | None) -> None:
    crop = Crop(24, [0.1, 1.0], flip_p=0.5, n=n)
    image = _photo(1)
    torch.manual_seed(3)
    pillow = crop(image)  # draws its plan from torch's RNG, then resizes with Pillow
    torch.manual_seed(3)
    boxes, flips = crop.plan(*image.size)
    device = crop.on_device(torch.from_numpy(np.array(image)).permute(2, 0, 1), boxes, flips)
    assert device.shape == pillow.shape and device.dtype == torch.uint8
    diff = np.abs(device.numpy().astype(int) - pillow.astype(int))
    assert diff.max() <= 1 and (diff > 0).mean() < 0.02
    assert n is None or len({tuple(b) for b in boxes.tolist()}) == n  # every crop its own draw


def _batch() -> dict[str, np.ndarray]:
    images = [
        _encode(_photo(2), "JPEG", quality=90),
        _encode(_photo(3).convert("L"), "JPEG", quality=90),
        _encode(_photo(4, 64, 48), "PNG"),
        _rotated_jpeg(_photo(5)),
        b"not an image",
    ]
    out = np.empty(len(images), dtype=object)
    out[:] = images
    uris = np.asarray([f"img{i}" for i in range(len(images))], dtype=object)
    return {"image": out, "uri": uris}


@pytest.mark.parametrize(
    ("method", "keys"),
    [("dinov2", {*GLOBAL_KEYS, LOCAL_KEY}), ("simclr", set(GLOBAL_KEYS)), ("distillation", {VIEW_KEY})],
)
def test_planned_batch_cut_on_the_device_has_the_cpu_paths_views(method: str, keys: set[str]) -> None:
    batch = _batch()
    cpu = AugmentBatch(method, CROPS, "image")(batch)
    plan = AugmentBatch(method, CROPS, "image", on_device=True)(batch)
    assert len(plan[JPEG]) == 4  # the broken bytes are skipped, loudly, on both paths
    assert [bool(j) for j in plan[JPEG]] == [True, True, False, False]  # PNG and rotated JPEG: Pillow's pixels
    assert [bool(r) for r in plan[RGB]] == [False, False, True, True]
    assert plan[RGB_SHAPE].tolist()[3] == [120, 90]  # the rotated JPEG, upright: its boxes fit the upright image
    views = DeviceViews(views_of(method, CROPS), torch.device("cpu"))(plan)
    assert set(views) == set(cpu) == keys
    for key in keys:
        assert tuple(views[key].shape) == cpu[key].shape and views[key].dtype == torch.uint8, key


def test_auto_decodes_on_the_device_only_on_a_gpu() -> None:
    assert decodes_on_device(CropsConfig(), gpu=True) and not decodes_on_device(CropsConfig(), gpu=False)
    assert decodes_on_device(CropsConfig(decode="device"), gpu=False)
    assert not decodes_on_device(CropsConfig(decode="pillow"), gpu=True)


@pytest.mark.usefixtures("ray_local")
def test_the_plan_crosses_ray_data_as_training_reads_it() -> None:
    """The plan's columns (JPEG bytes, pixels, boxes, flips) through a Ray Data map and iter_batches, as the
    training stream carries them, then cut: every image's views arrive."""
    import ray

    rows = [{"image": data, "uri": f"img{i}"} for i, data in enumerate(_batch()["image"]) if data != b"not an image"]
    dataset = ray.data.from_items(rows * 4).map_batches(
        AugmentBatch("dinov2", CROPS, "image", on_device=True), batch_size=4
    )
    cut = DeviceViews(views_of("dinov2", CROPS), torch.device("cpu"))
    seen = 0
    for batch in dataset.iter_batches(batch_size=8, batch_format="numpy", drop_last=True):
        views = cut(batch)
        assert views[GLOBAL_KEYS[0]].shape == (8, 3, 32, 32) and views[LOCAL_KEY].shape == (8, 3, 3, 16, 16)
        seen += 8
    assert seen == 16


@pytest.mark.slow  # a real Ray Train run, ~2-3 min on 2 cores
@pytest.mark.usefixtures("ray_local")
def test_pretrain_with_views_cut_on_the_device(tmp_path: Path) -> None:
    from lvdkit.pretrain.run import pretrain

    from .test_pretrain_run import TINY_MODEL, _rows

    images = [_encode(_photo(i, 60 + i, 80), "JPEG", quality=85) for i in range(32)]
    pq.write_table(pa.table({"image_id": [f"{i:03d}" for i in range(32)], "image": images}), tmp_path / "p.parquet")
    overrides = [f"out={tmp_path / 'run'}", f"data={tmp_path / 'p.parquet'}", *TINY_MODEL, "optim.epochs=1"]
    overrides += ["optim.batch_size=8", "crops.decode=device", "progress=false", "ray.num_cpus=2", "torch_threads=1"]
    pretrain(load_config(PretrainConfig, None, overrides))
    rows = _rows(tmp_path / "run")
    assert [int(r["step"]) for r in rows] == [1, 2, 3, 4]
    assert all(math.isfinite(r["loss"]) for r in rows)


def test_a_batch_whose_images_no_decoder_reads_gives_no_views() -> None:
    plan = AugmentBatch("distillation", CROPS, "image", on_device=True)(_batch())
    plan[JPEG] = np.asarray([b"\xff\xd8 torn" if j else j for j in plan[JPEG]], dtype=object)
    plan[JPEG][2:] = [b"\xff\xd8 torn", b"\xff\xd8 torn"]  # the Pillow rows too, as JPEGs that no longer decode
    assert DeviceViews(views_of("distillation", CROPS), torch.device("cpu"))(plan) == {}
