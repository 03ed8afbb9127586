"""Preprocess.prepare: any Pillow image -> uint8 [H, W, 3] with the model's resize policy."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from lvdkit.embeddings.preprocess import Preprocess

RED, GREEN, BLUE = (255, 0, 0), (0, 255, 0), (0, 0, 255)


def bands(width: int, height: int) -> Image.Image:
    """Left quarter red, middle half green, right quarter blue."""
    arr = np.zeros((height, width, 3), dtype=np.uint8)
    arr[:, : width // 4] = RED
    arr[:, width // 4 : 3 * width // 4] = GREEN
    arr[:, 3 * width // 4 :] = BLUE
    return Image.fromarray(arr)


def framed(side: int, inner: int) -> Image.Image:
    """A green ``inner`` square centred on a red ``side`` square."""
    arr = np.zeros((side, side, 3), dtype=np.uint8)
    arr[:] = RED
    lo = (side - inner) // 2
    arr[lo : lo + inner, lo : lo + inner] = GREEN
    return Image.fromarray(arr)


@pytest.mark.parametrize("resize", ["center_crop", "squash"])
@pytest.mark.parametrize("size", [(32, 32), (24, 40)])
def test_output_shape_and_dtype(resize: str, size: tuple[int, int]) -> None:
    out = Preprocess(size, resize).prepare(bands(200, 100))  # type: ignore[arg-type]
    assert out.shape == (*size, 3)
    assert out.dtype == np.uint8
    assert out.flags.c_contiguous and out.flags.writeable


def test_center_crop_keeps_aspect_and_takes_the_center() -> None:
    # A 2:1 image: its central square is the green middle half; nothing red or blue may be left.
    out = Preprocess((50, 50), "center_crop").prepare(bands(200, 100)).astype(int)
    assert np.abs(out[:, 2:-2] - GREEN).max() <= 2, "center crop reached the red/blue sides"


def test_squash_keeps_everything_and_ignores_aspect() -> None:
    out = Preprocess((50, 50), "squash").prepare(bands(200, 100)).astype(int)
    assert np.abs(out[:, :10] - RED).max() <= 2
    assert np.abs(out[:, 15:35] - GREEN).max() <= 2
    assert np.abs(out[:, -10:] - BLUE).max() <= 2


@pytest.mark.parametrize("resize", ["center_crop", "squash"])
def test_crop_pct_takes_the_central_fraction(resize: str) -> None:
    # crop_pct 0.5 of a 100 px square with a 50 px green centre: the output is all green.
    out = Preprocess((20, 20), resize, crop_pct=0.5).prepare(framed(100, 50)).astype(int)  # type: ignore[arg-type]
    assert np.abs(out[1:-1, 1:-1] - GREEN).max() <= 2


def test_center_crop_matches_timm_eval_transform() -> None:
    """Where timm's Resize + CenterCrop land on whole pixels, prepare() gives the same pixels."""
    timm_data = pytest.importorskip("timm.data")
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (224, 448, 3), dtype=np.uint8)).resize((448, 224))
    tf = timm_data.create_transform(input_size=(3, 64, 64), crop_pct=1.0, interpolation="bicubic")
    ref = image
    for step in tf.transforms[:2]:  # Resize(short side 64), CenterCrop(64)
        ref = step(ref)
    ours = Preprocess((64, 64), "center_crop", crop_pct=1.0, interpolation="bicubic").prepare(image)
    assert np.abs(np.asarray(ref, dtype=float) - ours).mean() < 0.5


@pytest.mark.parametrize(
    ("mode", "make", "expected"),
    [
        ("L", lambda: Image.new("L", (40, 30), 128), (128, 128, 128)),
        ("RGBA", lambda: Image.new("RGBA", (40, 30), (0, 0, 0, 0)), (255, 255, 255)),  # transparent -> white
        ("LA", lambda: Image.new("LA", (40, 30), (0, 255)), (0, 0, 0)),
        ("I;16", lambda: Image.fromarray(np.full((30, 40), 65535, dtype=np.uint16)), (255, 255, 255)),
        ("P", lambda: Image.new("RGB", (40, 30), BLUE).convert("P"), BLUE),
        ("CMYK", lambda: Image.new("CMYK", (40, 30), (0, 0, 0, 0)), (255, 255, 255)),
    ],
)
def test_any_mode_becomes_rgb(mode: str, make, expected: tuple[int, int, int]) -> None:  # type: ignore[no-untyped-def]
    image = make()
    assert image.mode == mode or (mode == "I;16" and image.mode.startswith("I;16"))
    out = Preprocess((16, 16), "center_crop").prepare(image)
    assert out.shape == (16, 16, 3) and out.dtype == np.uint8
    assert np.abs(out.astype(int) - expected).max() <= 1, f"{mode}: got {out[8, 8]}"


def test_16_bit_is_rescaled_not_clipped() -> None:
    ramp = np.tile(np.linspace(0, 65535, 64).astype(np.uint16), (8, 1))  # [8, 64]
    out = Preprocess((8, 64), "squash").prepare(Image.fromarray(ramp))
    assert out[4, 0, 0] <= 5 and out[4, -1, 0] >= 250 and 100 < out[4, 32, 0] < 160


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"size": (0, 10), "resize": "squash"}, "size"),
        ({"size": (10, 10), "resize": "stretch"}, "center_crop"),
        ({"size": (10, 10), "resize": "squash", "interpolation": "nearest"}, "bicubic"),
        ({"size": (10, 10), "resize": "squash", "crop_pct": 0.0}, "crop_pct"),
        ({"size": (10, 10), "resize": "squash", "crop_pct": 1.5}, "crop_pct"),
        ({"size": (10, 10), "resize": "squash", "mean": None}, "both"),
    ],
)
def test_invalid_settings_raise_with_the_valid_options(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        Preprocess(**kwargs)


def test_preprocess_module_does_not_import_torch() -> None:
    """Decode workers import it: they must not pay torch's ~3 s and ~650 MB."""
    code = "import sys, lvdkit.embeddings.preprocess; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
