"""create_embedder: each kind builds a real (random-init, small) model and embeds; weights come from local files."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach the Hub (each retry costs ~50 s offline)

import numpy as np
import pytest
import torch
from PIL import Image

from lvdkit.embeddings import Embedder, create_embedder, save_lvdkit_model
from lvdkit.embeddings.factory import KINDS
from lvdkit.embeddings.torch_embedder import TorchEmbedder

from .helpers import imagenet_input
from .onnx_writer import float_conv_model, uint8_color_model

KINDS_UNDER_TEST: list[tuple[str, dict[str, Any], int]] = [
    ("timm:vit_tiny_patch16_224", {"img_size": 32}, 192),
    ("timm:resnet10t", {"img_size": 64}, 512),
    ("torchvision:resnet18", {"img_size": 64}, 512),
    ("torchvision:mobilenet_v3_small", {"img_size": 64}, 1024),
]


def pictures(n: int, width: int = 96, height: int = 72) -> list[Image.Image]:
    """``n`` clearly different RGB pictures (gradients and checkerboards at different scales and phases)."""
    y, x = np.mgrid[0:height, 0:width].astype(np.float64)
    out = []
    for i in range(n):
        r = 127 + 120 * np.sin(x / width * 2 * np.pi * (i + 1))
        g = 255 * ((y / height) ** (i + 1))
        b = 255 * (((x + 7 * i) // (4 + 2 * i) + y // (4 + 2 * i)) % 2)
        out.append(Image.fromarray(np.stack([r, g, b], -1).clip(0, 255).astype(np.uint8)))
    return out


def batch_for(embedder: Embedder, n: int = 3) -> np.ndarray:
    return np.stack([embedder.preprocess.prepare(im) for im in pictures(n)])  # [n, H, W, 3] uint8


def assert_unit_rows(emb: np.ndarray, n: int, dim: int) -> None:
    assert emb.shape == (n, dim) and emb.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)


@pytest.fixture(scope="module")
def built() -> dict[str, Embedder]:
    """Each kind built once (random init) for the module's tests."""
    torch.manual_seed(0)
    return {name: create_embedder(name, device="cpu", num_threads=2, **opts) for name, opts, _ in KINDS_UNDER_TEST}


@pytest.mark.parametrize(("name", "options", "dim"), KINDS_UNDER_TEST, ids=[k[0] for k in KINDS_UNDER_TEST])
def test_each_kind_builds_and_embeds(built: dict[str, Embedder], name: str, options: dict, dim: int) -> None:
    embedder = built[name]
    assert isinstance(embedder, Embedder)
    assert embedder.name == name and embedder.dim == dim
    assert embedder.preprocess.size == (options["img_size"],) * 2
    pixels = batch_for(embedder)
    emb = embedder.embed(pixels)
    assert_unit_rows(emb, 3, dim)
    np.testing.assert_array_equal(emb, embedder.embed(pixels), err_msg="not deterministic")
    np.testing.assert_allclose(embedder.embed(pixels[1:2])[0], emb[1], atol=1e-5, err_msg="depends on the batch")
    for i, j in ((0, 1), (0, 2), (1, 2)):
        assert np.abs(emb[i] - emb[j]).max() > 1e-4, f"images {i} and {j} got the same embedding"
    assert embedder.embed(pixels[:0]).shape == (0, dim)


def test_embed_rejects_pixels_that_were_not_prepared(built: dict[str, Embedder]) -> None:
    embedder = built["timm:resnet10t"]
    with pytest.raises(ValueError, match="uint8"):
        embedder.embed(batch_for(embedder).astype(np.float32))
    with pytest.raises(ValueError, match="expects 64x64"):
        embedder.embed(np.zeros((1, 32, 32, 3), dtype=np.uint8))


def test_timm_preprocess_comes_from_the_data_config(built: dict[str, Embedder]) -> None:
    vit = built["timm:vit_tiny_patch16_224"]
    assert vit.preprocess.mean == (0.5, 0.5, 0.5) and vit.preprocess.crop_pct == 0.9
    assert vit.preprocess.resize == "center_crop" and vit.preprocess.interpolation == "bicubic"
    resnet = create_embedder("timm:resnet10t", device="cpu")
    assert resnet.preprocess.size == (224, 224)  # resnet10t's test_input_size, not its 176 px train size


def test_dinov2_defaults_to_224_px() -> None:
    embedder = create_embedder("timm:vit_small_patch14_dinov2", device="cpu")
    assert embedder.preprocess.size == (224, 224) and embedder.dim == 384
    assert isinstance(embedder, TorchEmbedder)
    assert embedder.model.patch_embed.img_size == (224, 224)  # type: ignore[union-attr]


# --- checkpoint= ----------------------------------------------------------------------------------------------------
def _save(state: dict[str, torch.Tensor], path: Path) -> Path:
    if path.suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    else:
        torch.save(state, path)
    return path


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
@pytest.mark.parametrize("name", ["timm:resnet10t", "torchvision:resnet18"])
def test_checkpoint_loads_the_saved_weights(built: dict[str, Embedder], tmp_path: Path, name: str, suffix: str) -> None:
    saved = built[name]
    assert isinstance(saved, TorchEmbedder)
    path = _save(saved.model.state_dict(), tmp_path / f"weights{suffix}")
    loaded = create_embedder(name, device="cpu", img_size=64, checkpoint=str(path))
    pixels = batch_for(saved)
    # The factory's own random init differs (the global RNG moved on): equality means the file was loaded.
    np.testing.assert_allclose(loaded.embed(pixels), saved.embed(pixels), atol=1e-6)


@pytest.mark.parametrize("name", ["timm:resnet10t", "torchvision:resnet18"])
def test_checkpoint_with_a_classifier_head_loads(tmp_path: Path, name: str) -> None:
    """Checkpoints of the full classification model (head included) are what libraries publish."""
    import timm
    import torchvision

    kind, model_name = name.split(":")
    full = timm.create_model(model_name) if kind == "timm" else torchvision.models.get_model(model_name)
    path = _save(full.state_dict(), tmp_path / "full.pt")
    embedder = create_embedder(name, device="cpu", img_size=64, checkpoint=str(path))
    assert isinstance(embedder, TorchEmbedder)
    trunk = {k: v for k, v in full.state_dict().items() if not k.startswith("fc.")}
    for key, value in embedder.model.state_dict().items():
        torch.testing.assert_close(value, trunk[key], msg=key)


def test_timm_checkpoint_goes_through_timm_filters(tmp_path: Path) -> None:
    """A ViT checkpoint saved at another size (e.g. DINOv2's 518 px) loads: timm resamples the position embedding."""
    import timm
    from safetensors.torch import save_file

    big = timm.create_model("vit_tiny_patch16_224", img_size=64, num_classes=10)  # 4x4 patches + a 10-class head
    save_file(big.state_dict(), str(tmp_path / "vit64.safetensors"))
    embedder = create_embedder(
        "timm:vit_tiny_patch16_224", device="cpu", img_size=32, checkpoint=str(tmp_path / "vit64.safetensors")
    )
    assert isinstance(embedder, TorchEmbedder)
    assert embedder.model.pos_embed.shape == (1, 1 + 2 * 2, 192)  # type: ignore[union-attr]
    torch.testing.assert_close(embedder.model.blocks[0].attn.qkv.weight, big.blocks[0].attn.qkv.weight)  # type: ignore


class Payload:
    """Not a tensor: torch.load(weights_only=True) must refuse to unpickle it."""


@pytest.mark.parametrize("name", ["timm:resnet10t", "torchvision:resnet18"])
def test_checkpoint_with_pickled_objects_is_refused(tmp_path: Path, name: str) -> None:
    path = tmp_path / "evil.pt"
    torch.save({"conv1.weight": torch.zeros(1), "payload": Payload()}, path)
    with pytest.raises(ValueError, match="weights_only"):
        create_embedder(name, device="cpu", checkpoint=str(path))


def test_checkpoint_of_another_model_is_an_error(built: dict[str, Embedder], tmp_path: Path) -> None:
    other = built["torchvision:resnet18"]
    assert isinstance(other, TorchEmbedder)
    path = _save(other.model.state_dict(), tmp_path / "resnet18.safetensors")
    with pytest.raises(ValueError, match="do not fit"):
        create_embedder("timm:resnet10t", device="cpu", checkpoint=str(path))
    with pytest.raises(ValueError, match="do not fit"):
        create_embedder("torchvision:mobilenet_v3_small", device="cpu", checkpoint=str(path))


def test_missing_checkpoint_file(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"absent\.pt"):
        create_embedder("timm:resnet10t", device="cpu", checkpoint=str(tmp_path / "absent.pt"))


# --- lvdkit model files ----------------------------------------------------------------------------------------------
def test_lvdkit_model_file_round_trip(built: dict[str, Embedder], tmp_path: Path) -> None:
    saved = built["timm:vit_tiny_patch16_224"]
    assert isinstance(saved, TorchEmbedder)
    path = save_lvdkit_model(saved.model, "timm:vit_tiny_patch16_224", {"img_size": 32}, tmp_path / "m.safetensors")
    sidecar = json.loads((tmp_path / "m.json").read_text())
    assert sidecar["model"] == "timm:vit_tiny_patch16_224" and sidecar["kwargs"] == {"img_size": 32}
    pixels = batch_for(saved)
    for name in (str(path), f"lvdkit:{path}"):
        loaded = create_embedder(name, device="cpu")
        assert loaded.dim == saved.dim and loaded.preprocess == saved.preprocess
        np.testing.assert_allclose(loaded.embed(pixels), saved.embed(pixels), atol=1e-6)
    with pytest.raises(ValueError, match="differ from the saved"):
        create_embedder(str(path), device="cpu", img_size=64)


def test_lvdkit_model_file_refuses_a_model_that_does_not_match_its_name(tmp_path: Path) -> None:
    import timm

    with_head = timm.create_model("resnet10t")  # num_classes=1000: fc.* is not in the headless module
    with pytest.raises(ValueError, match=r"unexpected: fc\.bias, fc\.weight"):
        save_lvdkit_model(with_head, "timm:resnet10t", {}, tmp_path / "m.safetensors")
    assert not (tmp_path / "m.safetensors").exists()


def test_lvdkit_model_file_needs_its_sidecar(built: dict[str, Embedder], tmp_path: Path) -> None:
    saved = built["timm:resnet10t"]
    assert isinstance(saved, TorchEmbedder)
    path = save_lvdkit_model(saved.model, "timm:resnet10t", {}, tmp_path / "m.safetensors")
    path.with_suffix(".json").unlink()
    with pytest.raises(FileNotFoundError, match="save_lvdkit_model"):
        create_embedder(str(path), device="cpu")


# --- onnx:PATH -------------------------------------------------------------------------------------------------------
def test_onnx_float_nchw_graph_matches_torch(tmp_path: Path) -> None:
    """A float [2, 3, 16, 16] graph (fixed batch 2: embed pads): normalised here with ImageNet mean/std."""
    rng = np.random.default_rng(0)
    weight, bias = rng.normal(size=(8, 3, 3, 3)).astype(np.float32), rng.normal(size=8).astype(np.float32)
    path = float_conv_model(tmp_path / "conv.onnx", weight, bias, size=16, batch=2)
    embedder = create_embedder(f"onnx:{path}", device="cpu", num_threads=1)
    assert embedder.preprocess.size == (16, 16) and embedder.preprocess.mean == (0.485, 0.456, 0.406)
    assert embedder.dim == 8
    pixels = batch_for(embedder, 3)
    feats = torch.nn.functional.conv2d(imagenet_input(pixels), torch.from_numpy(weight), torch.from_numpy(bias))
    ref = torch.nn.functional.normalize(feats.mean((2, 3)), dim=1).numpy()
    emb = embedder.embed(pixels)
    assert_unit_rows(emb, 3, 8)
    np.testing.assert_allclose(emb, ref, atol=1e-5)


def test_onnx_uint8_nhwc_graph_gets_raw_pixels(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    weight = rng.normal(size=(3, 6)).astype(np.float32)
    path = uint8_color_model(tmp_path / "color.onnx", weight)
    embedder = create_embedder(f"onnx:{path}", device="cpu", img_size=40)
    assert embedder.preprocess.size == (40, 40) and embedder.preprocess.mean is None
    pixels = batch_for(embedder, 3)
    ref = pixels.reshape(3, -1, 3).astype(np.float64).mean(1) @ weight
    np.testing.assert_allclose(embedder.embed(pixels), ref / np.linalg.norm(ref, axis=1, keepdims=True), atol=1e-5)
    assert create_embedder(f"onnx:{path}", device="cpu").preprocess.size == (224, 224)  # dynamic: default size


def test_onnx_errors(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"nothing\.onnx"):
        create_embedder(f"onnx:{tmp_path / 'nothing.onnx'}")
    path = float_conv_model(tmp_path / "conv.onnx", np.ones((2, 3, 1, 1), np.float32), np.zeros(2, np.float32), 8, 1)
    with pytest.raises(ValueError, match="img_size=16 differs"):
        create_embedder(f"onnx:{path}", img_size=16)
    with pytest.raises(ValueError, match="checkpoint"):
        create_embedder(f"onnx:{path}", checkpoint=str(path))


# --- names -----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["resnet50", "hf:resnet50", "timm:", "clip:ViT-B/32", "model.onnx"])
def test_unknown_kind_lists_the_valid_kinds(name: str) -> None:
    with pytest.raises(ValueError) as info:
        create_embedder(name)
    for kind in KINDS:
        assert kind in str(info.value)


def test_unknown_timm_model_is_named_with_suggestions() -> None:
    with pytest.raises(ValueError, match=r"unknown timm model 'vit_smal_patch14_dinov2'.*vit_small_patch14_dinov2"):
        create_embedder("timm:vit_smal_patch14_dinov2")


def test_unknown_torchvision_model_is_named_with_suggestions() -> None:
    with pytest.raises(ValueError, match=r"unknown torchvision classification model 'resnet19'.*resnet18"):
        create_embedder("torchvision:resnet19")


def test_bad_device_lists_the_valid_ones() -> None:
    with pytest.raises(ValueError, match="auto"):
        create_embedder("timm:resnet10t", device="tpu")


# --- CUDA (make test-all on a GPU machine) ---------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize(("name", "options", "dim"), KINDS_UNDER_TEST, ids=[k[0] for k in KINDS_UNDER_TEST])
def test_cuda_bf16_matches_cpu_fp32(name: str, options: dict, dim: int) -> None:
    torch.manual_seed(0)
    cpu = create_embedder(name, device="cpu", **options)
    assert isinstance(cpu, TorchEmbedder)
    cuda = TorchEmbedder(cpu.model, cpu.preprocess, name, device="cuda")  # the same weights, moved
    assert cuda.device.type == "cuda" and cuda.channels_last == (not name.startswith("timm:vit"))
    pixels = batch_for(cpu, 8)
    got = cuda.embed(pixels)
    assert_unit_rows(got, 8, dim)
    cos = (got * TorchEmbedder(cpu.model.cpu(), cpu.preprocess, name, device="cpu").embed(pixels)).sum(1)
    assert cos.min() > 0.99, f"bf16 on CUDA drifts from fp32 on CPU: cosines {cos.round(4)}"
