"""PyTorch backbones by name (``timm:NAME``, ``torchvision:NAME``): the module, headless, and its preprocessing.

Every module returned here maps normalised float ``[B, 3, H, W]`` to pooled features ``[B, D]``: timm models are
built with ``num_classes=0``; torchvision models get their last classifier ``Linear`` replaced by ``Identity``.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lvdkit.embeddings.preprocess import IMAGENET_MEAN, IMAGENET_STD, Interpolation, Preprocess
from lvdkit.embeddings.weights import load_into, load_state_dict_file

BACKBONE_KINDS = ("timm", "torchvision")
RANDOM_INIT_SEED = 0
DINOV2_DEFAULT_SIZE = 224  # timm's DINOv2 ViTs default to 518 px (~6x the compute of 224): embeddings use 224
_TV_HEADS = ("fc", "classifier", "heads", "head")  # where torchvision classification models keep their head


def create_torch_model(
    name: str,
    *,
    img_size: int | None = None,
    pretrained: bool = False,
    checkpoint: str | Path | None = None,
    **kwargs: Any,
) -> tuple[nn.Module, Preprocess]:
    """``timm:NAME`` or ``torchvision:NAME`` -> (headless module in eval mode, its preprocessing).

    ``checkpoint`` (a ``.safetensors`` or weights-only torch state dict) is loaded instead of any download; without it
    ``pretrained=True`` downloads the library's default weights. ``kwargs`` go to the library's constructor.
    """
    kind, sep, model_name = name.partition(":")
    if not sep or kind not in _BUILDERS or not model_name:
        raise ValueError(f"{name!r} is not a PyTorch backbone name; valid: {tuple(k + ':NAME' for k in _BUILDERS)}")
    # Random initialisation is seeded: every process (driver, each actor) must build the same model from a name,
    # or a random-init baseline would embed differently on every worker. The caller's RNG state is left untouched.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(RANDOM_INIT_SEED)
        model, preprocess = _BUILDERS[kind](model_name, img_size, pretrained, checkpoint, kwargs)
    return model.eval(), preprocess


def _interpolation(value: object) -> Interpolation:
    # Preprocess offers bicubic and bilinear; the few models that ask for something else get bicubic.
    text = str(getattr(value, "value", value)).lower()  # torchvision's InterpolationMode has .value
    return "bilinear" if text == "bilinear" else "bicubic"


# --- timm ---------------------------------------------------------------------------------------------------------
def _unknown_timm(model_name: str) -> ValueError:
    import timm

    arch = model_name.split(".")[0]
    part = max(arch.replace("-", "_").split("_"), key=len)  # the most specific token, e.g. "dinov2"
    close = difflib.get_close_matches(arch, timm.list_models(f"*{part}*") or timm.list_models(), n=8, cutoff=0.4)
    close = close or difflib.get_close_matches(arch, timm.list_models(), n=8, cutoff=0.4)
    hint = f"; close names: {', '.join(close)}" if close else ""
    return ValueError(f"unknown timm model {model_name!r}{hint} (all: timm.list_models())")


def _build_timm(
    model_name: str, img_size: int | None, pretrained: bool, checkpoint: str | Path | None, kwargs: dict[str, Any]
) -> tuple[nn.Module, Preprocess]:
    import timm
    from timm.data import resolve_model_data_config
    from timm.models import get_pretrained_cfg, split_model_name_tag

    hub = model_name.startswith(("hf-hub:", "local-dir:"))  # timm resolves these itself
    if not hub and not timm.is_model(split_model_name_tag(model_name)[0]):
        raise _unknown_timm(model_name)
    if img_size is None and "dinov2" in model_name:
        img_size = DINOV2_DEFAULT_SIZE
    create: dict[str, Any] = {**kwargs, "num_classes": 0}
    if checkpoint is not None:
        if hub:
            raise ValueError(f"timm:{model_name}: checkpoint= takes a plain timm model name, not a hub/dir source")
        state = load_state_dict_file(checkpoint)
        cfg = get_pretrained_cfg(model_name)
        heads = cfg.classifier if cfg is not None and cfg.classifier else ()
        for head in (heads,) if isinstance(heads, str) else heads:
            state.pop(f"{head}.weight", None)
            state.pop(f"{head}.bias", None)
        # timm's own pretrained path (not a plain load_state_dict) so that its per-model checkpoint filters run
        # (e.g. resampling a 518 px DINOv2 position embedding to img_size); num_classes=0 in the overlay keeps that
        # load strict (timm relaxes it when the checkpoint's head size differs from the model's).
        create.update(pretrained=True, pretrained_cfg_overlay={"state_dict": state, "num_classes": 0})
    else:
        create["pretrained"] = pretrained
    try:
        model = _create_timm(model_name, img_size, create)
    except RuntimeError as exc:
        if checkpoint is not None:
            raise ValueError(f"weights in {checkpoint} do not fit timm:{model_name}: {exc}") from None
        raise
    except OSError as exc:
        if pretrained:
            cfg = None if hub else get_pretrained_cfg(model_name)
            where = f" (e.g. model.safetensors of the Hub repo {cfg.hf_hub_id})" if cfg and cfg.hf_hub_id else ""
            raise RuntimeError(
                f"timm:{model_name}: cannot get its pretrained weights ({type(exc).__name__}: {exc}). "
                f"Offline, pass checkpoint=PATH to a local copy{where}"
            ) from exc
        raise
    cfg_dict = getattr(model, "pretrained_cfg", None)
    if checkpoint is not None and isinstance(cfg_dict, dict):
        cfg_dict["state_dict"] = None  # timm keeps a deep copy of the overlay: free it

    config = resolve_model_data_config(model, use_test_size=True)  # eval-time size and crop, as timm validates
    size = (img_size, img_size) if img_size else (int(config["input_size"][1]), int(config["input_size"][2]))
    preprocess = Preprocess(
        size=size,
        resize="squash" if config.get("crop_mode") == "squash" else "center_crop",
        crop_pct=float(config.get("crop_pct") or 1.0),
        mean=tuple(config["mean"]),  # type: ignore[arg-type]
        std=tuple(config["std"]),  # type: ignore[arg-type]
        interpolation=_interpolation(config.get("interpolation")),
    )
    return model, preprocess


def _create_timm(model_name: str, img_size: int | None, create: dict[str, Any]) -> nn.Module:
    import timm

    if img_size is None:
        return timm.create_model(model_name, **create)
    try:
        return timm.create_model(model_name, img_size=img_size, **create)
    except TypeError as exc:
        if "img_size" not in str(exc):
            raise
        # CNNs take any input size and have no img_size argument: the size only shapes the preprocessing.
        return timm.create_model(model_name, **create)


# --- torchvision --------------------------------------------------------------------------------------------------
def _remove_tv_head(model: nn.Module, name: str) -> set[str]:
    """Replace the classifier's last ``Linear`` (and anything after it) by ``Identity``; return the removed keys."""
    before = set(model.state_dict())
    attr = next((a for a in _TV_HEADS if isinstance(getattr(model, a, None), nn.Module)), None)
    head = getattr(model, attr) if attr else None
    if isinstance(head, nn.Linear):
        setattr(model, attr, nn.Identity())  # type: ignore[arg-type]
    elif isinstance(head, nn.Sequential) and any(isinstance(m, nn.Linear) for m in head):
        # Only the last Linear goes: ConvNeXt's LayerNorm and VGG's fc6/fc7 stay, as in the usual feature recipes.
        last = max(i for i, m in enumerate(head) if isinstance(m, nn.Linear))
        for i in range(last, len(head)):
            head[i] = nn.Identity()
    else:
        raise ValueError(f"torchvision:{name}: no Linear classifier in {_TV_HEADS} to remove; use another model")
    return before - set(model.state_dict())


def _tv_preprocess(name: str, img_size: int | None) -> Preprocess:
    """From the default weights' own eval transform (crop and resize size, interpolation), ImageNet mean/std."""
    import torchvision

    crop, resize, interpolation = 224, 256, "bilinear"
    mean, std = IMAGENET_MEAN, IMAGENET_STD
    try:
        tf = torchvision.models.get_model_weights(name).DEFAULT.transforms()
        crop, resize = int(tf.crop_size[0]), int(tf.resize_size[0])
        interpolation = tf.interpolation
        mean, std = tuple(tf.mean), tuple(tf.std)  # type: ignore[assignment]
    except (AttributeError, TypeError, ValueError, IndexError):
        pass  # weights without an ImageClassification transform: the torchvision defaults above
    size = img_size or crop
    return Preprocess(
        size=(size, size),
        resize="center_crop",
        crop_pct=min(1.0, crop / resize),
        mean=mean,
        std=std,
        interpolation=_interpolation(interpolation),
    )


def _build_torchvision(
    model_name: str, img_size: int | None, pretrained: bool, checkpoint: str | Path | None, kwargs: dict[str, Any]
) -> tuple[nn.Module, Preprocess]:
    import torchvision

    valid = torchvision.models.list_models(module=torchvision.models)  # classification models only
    if model_name not in valid:
        close = difflib.get_close_matches(model_name, valid, n=8, cutoff=0.4)
        hint = f"; close names: {', '.join(close)}" if close else ""
        raise ValueError(
            f"unknown torchvision classification model {model_name!r}{hint} "
            "(all: torchvision.models.list_models(module=torchvision.models))"
        )
    if img_size is not None and model_name.startswith("vit_"):
        kwargs = {"image_size": img_size, **kwargs}  # torchvision's ViTs fix their position embedding size
    weights = "DEFAULT" if pretrained and checkpoint is None else None  # a checkpoint replaces the download
    try:
        model = torchvision.models.get_model(model_name, weights=weights, **kwargs)
    except OSError as exc:
        raise RuntimeError(
            f"torchvision:{model_name}: cannot get its pretrained weights ({exc}). Offline, pass "
            "checkpoint=PATH to a local state dict"
        ) from exc
    head_keys = _remove_tv_head(model, model_name)
    if checkpoint is not None:
        load_into(model, load_state_dict_file(checkpoint), str(checkpoint), ignore=head_keys)
    return model, _tv_preprocess(model_name, img_size)


_Builder = Callable[[str, int | None, bool, str | Path | None, dict[str, Any]], tuple[nn.Module, Preprocess]]
_BUILDERS: dict[str, _Builder] = {"timm": _build_timm, "torchvision": _build_torchvision}
