"""One decoding path: a transparent image gives the same RGB pixels to embed, pretraining, evaluation and the
curated-set reader, with transparency composited onto white (never the colour a file stores under alpha 0)."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from lvdkit.core.files import image_id
from lvdkit.curated import decode as curated_decode
from lvdkit.embeddings.preprocess import Preprocess
from lvdkit.embeddings.stage import PIXELS_PREFIX, EmbedConfig, decode_batch
from lvdkit.pretrain.augment import AugmentBatch, Views
from lvdkit.pretrain.config import CropsConfig
from lvdkit.pretrain.evaluate import load_image

H, W = 12, 10
WHITE = (255, 255, 255)


def _png(im: Image.Image, **options: object) -> bytes:
    buffer = io.BytesIO()
    im.save(buffer, "PNG", **options)
    return buffer.getvalue()


def _mask() -> np.ndarray:
    """Which pixels are fully transparent: the left half, and one more in the right half."""
    mask = np.zeros((H, W), dtype=bool)
    mask[:, : W // 2] = True
    mask[3, 7] = True
    return mask


def _rgba() -> bytes:
    rgba = np.zeros((H, W, 4), dtype=np.uint8)
    rgba[...] = (20, 40, 200, 255)  # opaque blue
    rgba[_mask()] = (255, 0, 0, 0)  # transparent, stored red
    rgba[0, -1] = (0, 0, 0, 128)  # half-transparent black: composited to mid grey
    return _png(Image.fromarray(rgba, "RGBA"))


def _la() -> bytes:
    la = np.zeros((H, W, 2), dtype=np.uint8)
    la[...] = (90, 255)
    la[_mask()] = (0, 0)  # transparent, stored black
    return _png(Image.fromarray(la, "LA"))


def _palette() -> bytes:
    index = np.where(_mask(), 0, 1).astype(np.uint8)
    index[-1, -1] = 2
    im = Image.fromarray(index, "P")
    im.putpalette([0, 255, 0, 200, 30, 30, 10, 10, 10] + [0] * (3 * 253))  # index 0: green, transparent
    return _png(im, transparency=0)


IMAGES = {"rgba": _rgba, "la": _la, "palette": _palette}


def _embed_path(path: Path) -> np.ndarray:
    """The embed stage: read + decode + Preprocess.prepare (same size: the pixels themselves)."""
    pre = {"m": Preprocess(size=(H, W), resize="squash")}
    out = decode_batch([image_id(str(path))], [str(path)], pre, rate=0.0, cfg=EmbedConfig())
    return np.asarray(out[PIXELS_PREFIX + "m"][0])


def _pretrain_path(data: bytes) -> np.ndarray:
    """The pretraining data pipeline: AugmentBatch on a shard batch, with the crops replaced by a recorder."""
    batch = AugmentBatch("distillation", CropsConfig(), "image")

    class Record(Views):
        def crops(self, image: Image.Image) -> dict[str, np.ndarray]:
            return {"pixels": np.asarray(image)}

        def colour(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
            return batch

    batch.views = Record()
    out = batch({"image": np.array([data], dtype=object)})
    return np.asarray(out["pixels"][0])


@pytest.mark.parametrize("kind", sorted(IMAGES))
def test_every_path_gives_the_same_pixels_with_transparency_on_white(kind: str, tmp_path: Path) -> None:
    data = IMAGES[kind]()
    path = tmp_path / f"{kind}.png"
    path.write_bytes(data)
    paths = {
        "embed": _embed_path(path),
        "pretrain": _pretrain_path(data),
        "evaluate_file": np.asarray(load_image(str(path))),
        "evaluate_bytes": np.asarray(load_image(data)),
        "curated_bytes": np.asarray(curated_decode(data)),
        "curated_row": np.asarray(curated_decode({"image": data})),
    }
    reference = paths["embed"]
    assert reference.shape == (H, W, 3) and reference.dtype == np.uint8
    for name, pixels in paths.items():
        assert np.array_equal(pixels, reference), f"{name} differs from the embed path"
    mask = _mask()
    assert (reference[mask] == WHITE).all()  # transparent pixels came out white...
    with Image.open(io.BytesIO(data)) as im:
        plain = np.asarray(im.convert("RGB"))
    assert not (plain[mask] == WHITE).all(), "a plain convert('RGB') would keep the stored colour"  # ...unlike before
    opaque = ~mask
    if kind == "rgba":
        opaque[0, -1] = False
        assert tuple(reference[0, -1]) in ((127, 127, 127), (128, 128, 128))  # half-transparent black on white
    assert np.array_equal(reference[opaque], plain[opaque])  # opaque pixels untouched


def _jpeg(side: tuple[int, int]) -> bytes:
    rng = np.random.default_rng(0)
    small = Image.fromarray(rng.integers(0, 255, (side[1] // 16, side[0] // 16, 3), dtype=np.uint8))
    buffer = io.BytesIO()
    small.resize(side, Image.Resampling.BICUBIC).save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


@pytest.mark.parametrize(
    ("min_side", "expected"),
    [(None, (480, 320)), (200, (480, 320)), (150, (240, 160)), (50, (120, 80)), (10, (60, 40))],
)
def test_a_jpeg_is_decoded_at_the_smallest_scale_that_keeps_min_side(
    min_side: int | None, expected: tuple[int, int]
) -> None:
    from lvdkit.core.image import decode_rgb

    image = decode_rgb(_jpeg((480, 320)), min_side=min_side)  # shorter side 320: 1/2 -> 160, 1/4 -> 80, 1/8 -> 40
    assert image.size == expected and image.mode == "RGB"


def test_reduced_decoding_leaves_other_formats_whole_and_pretraining_views_their_size() -> None:
    from lvdkit.core.image import decode_rgb

    png = _png(Image.new("RGB", (480, 320), (10, 20, 30)))
    assert decode_rgb(png, min_side=10).size == (480, 320)
    crops = CropsConfig(global_size=32, local_size=16, n_local=2, blur_kernel=3)
    batch = AugmentBatch("dinov2", crops, "image")
    assert batch.min_side == 83  # 16 px local crops from 5% of the area at aspect 3/4: 16 / sqrt(0.0375)
    out = batch({"image": np.array([_jpeg((480, 320))], dtype=object)})
    assert out["global_0"].shape == (1, 3, 32, 32) and out["local"].shape == (1, 2, 3, 16, 16)
    assert AugmentBatch("dinov2", CropsConfig(reduced_decode=False), "image").min_side is None
