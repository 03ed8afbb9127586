"""``init=``: a run's student (and EMA teacher) start from an export, a timm state-dict file or hub weights."""

from __future__ import annotations

from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import load_file

from lvdkit.embeddings.backbones import create_torch_model
from lvdkit.embeddings.model_file import save_lvdkit_model
from lvdkit.pretrain.config import PretrainConfig
from lvdkit.pretrain.run import absolute_paths
from lvdkit.pretrain.train import build_method

TINY = {"patch_size": 8, "depth": 1, "embed_dim": 32, "num_heads": 2}
SIZE = 16


def _perturbed(model: torch.nn.Module) -> torch.nn.Module:
    """Weights unlike the seeded random init every build gets."""
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p))
    return model


@pytest.fixture(scope="module")
def export(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An lvdkit model file as ``lvdkit export`` writes it for a run of TINY at SIZE px."""
    kwargs = {**TINY, "dynamic_img_size": True, "img_size": SIZE}
    model, _ = create_torch_model("timm:vit_tiny_patch16_224", **kwargs)
    path = tmp_path_factory.mktemp("init") / "vit.safetensors"
    return save_lvdkit_model(_perturbed(model), "timm:vit_tiny_patch16_224", kwargs, path)


def _cfg(method: str, init: str, **model_kwargs: int) -> PretrainConfig:
    cfg = PretrainConfig(method=method, model="timm:vit_tiny_patch16_224", init=init)  # type: ignore[arg-type]
    cfg.model_kwargs = {**TINY, **model_kwargs}
    cfg.crops.global_size = SIZE
    cfg.dinov2.layerscale = None  # the export has no LayerScale
    for section in (cfg.dinov2, cfg.dino):
        section.head_out_dim, section.head_hidden_dim, section.head_bottleneck_dim = 64, 32, 16
    cfg.distill.teacher, cfg.distill.teacher_pretrained = str(init), False
    return cfg


@pytest.mark.parametrize("method", ["dinov2", "dino", "simclr", "distillation"])
def test_student_and_teacher_start_from_an_export(export: Path, method: str) -> None:
    weights = load_file(str(export))
    built = build_method(_cfg(method, str(export)), n_images=100)
    networks = [built.student.backbone]
    teacher = getattr(built, "teacher", None)
    if method in ("dinov2", "dino") and teacher is not None:
        networks.append(teacher.backbone)  # the EMA teacher is a copy of the initialised student
    for network in networks:
        state = network.state_dict()
        assert state.keys() == weights.keys()
        for key, value in weights.items():
            assert torch.equal(state[key], value), key


def test_timm_state_dict_file_with_a_head_and_a_resized_position_embedding(tmp_path: Path) -> None:
    donor = _perturbed(timm.create_model("vit_tiny_patch16_224", num_classes=10, img_size=SIZE, **TINY))
    path = tmp_path / "timm.pth"
    torch.save(donor.state_dict(), path)  # a plain state dict with its classifier: the head is dropped
    built = build_method(_cfg("simclr", str(path)), n_images=100)
    assert torch.equal(built.student.backbone.blocks[0].attn.qkv.weight, donor.blocks[0].attn.qkv.weight)
    bigger = _cfg("simclr", str(path))
    bigger.crops.global_size = 2 * SIZE  # 4 x 4 patches instead of 2 x 2: timm resamples the position embedding
    grown = build_method(bigger, n_images=100).student.backbone
    assert grown.pos_embed.shape == (1, 1 + 16, 32)
    assert torch.equal(grown.cls_token, donor.cls_token)


def test_unusable_init_is_refused_with_what_to_do(export: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"cannot start model=.*set model= and model_kwargs= to match.*do not fit"):
        build_method(_cfg("simclr", str(export), depth=2), n_images=100)  # a 2-block student, a 1-block file
    with pytest.raises(FileNotFoundError, match="no such weights file"):
        build_method(_cfg("simclr", str(tmp_path / "missing.safetensors")), n_images=100)
    pickled = tmp_path / "pickle.pth"
    torch.save({"model": torch.nn.Linear(2, 2)}, pickled)  # a module, not a state dict: unpickling would run code
    with pytest.raises(ValueError, match="refusing to load"):
        build_method(_cfg("simclr", str(pickled)), n_images=100)


def test_hub_weights_offline_say_how_to_use_a_file(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(RuntimeError, match=r"init=timm:vit_tiny_patch16_224: cannot build it .*pass init=w\.safe"):
        build_method(_cfg("simclr", "timm:vit_tiny_patch16_224"), n_images=100)


def test_init_path_becomes_absolute_and_names_stay_names(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert absolute_paths(PretrainConfig(init="w/vit.safetensors")).init == str(tmp_path / "w/vit.safetensors")
    assert absolute_paths(PretrainConfig(init="timm:resnet50.a1_in1k")).init == "timm:resnet50.a1_in1k"
    assert absolute_paths(PretrainConfig()).init is None
