"""``create_embedder(name)``: every embedding model by name through one factory, like ``timm.create_model``.

Names (the kind is the prefix):

- ``timm:NAME``: a timm model's pooled features (``num_classes=0``); ViTs are built for ``img_size``.
- ``torchvision:NAME``: a torchvision classification model with its last classifier ``Linear`` removed.
- ``onnx:PATH``: an ONNX graph (uint8 NHWC or float NCHW input) run by ONNX Runtime.
- ``sscd``, ``sscd_distilled``: Meta's SSCD copy-detection descriptor, 512-d (:mod:`lvdkit.embeddings.sscd`).
- ``lvdkit:PATH`` or ``PATH.safetensors``: a model file written by :func:`save_lvdkit_model` (pretraining, export).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lvdkit.embeddings.base import Embedder

KINDS = ("timm:NAME", "torchvision:NAME", "onnx:PATH", "sscd", "sscd_distilled", "lvdkit:PATH", "PATH.safetensors")
_PREFIXES = ("timm", "torchvision", "onnx", "lvdkit")
_SSCD = ("sscd", "sscd_distilled")


def parse_name(name: str) -> tuple[str, str]:
    """``"timm:resnet50"`` -> ``("timm", "resnet50")``; ``"sscd"`` -> ``("sscd", "sscd")``; ``"x.safetensors"`` ->
    ``("lvdkit", "x.safetensors")``. Raises ``ValueError`` listing the valid kinds otherwise."""
    if not isinstance(name, str):
        raise ValueError(f"model name must be a string, got {type(name).__name__}; valid kinds: {', '.join(KINDS)}")
    if name in _SSCD:
        return "sscd", name
    prefix, sep, rest = name.partition(":")
    if sep and prefix in _PREFIXES:
        if not rest.strip():
            raise ValueError(f"{name!r}: nothing after '{prefix}:'; valid kinds: {', '.join(KINDS)}")
        return prefix, rest
    if name.endswith(".safetensors"):
        return "lvdkit", name
    raise ValueError(f"unknown embedding model {name!r}; valid kinds: {', '.join(KINDS)}")


def _no_extra(kind: str, kwargs: dict[str, Any], checkpoint: str | Path | None = None) -> None:
    if kwargs:
        raise ValueError(
            f"{kind} models take no options {sorted(kwargs)} (only device, num_threads, img_size"
            f"{'' if kind == 'onnx' else ', checkpoint'})"
        )
    if kind == "onnx" and checkpoint is not None:
        raise ValueError("onnx:PATH takes no checkpoint=: the weights are in the ONNX file")


def create_embedder(
    name: str,
    *,
    device: str = "auto",
    num_threads: int | None = None,
    img_size: int | None = None,
    pretrained: bool = False,
    checkpoint: str | Path | None = None,
    **kwargs: Any,
) -> Embedder:
    """Load the embedding model ``name`` (kinds in the module docstring) ready to :meth:`~Embedder.embed`.

    ``device``: ``auto`` (CUDA when available), ``cpu``, ``cuda``, ``cuda:N``. ``num_threads``: intra-op CPU threads
    (torch's are process-wide). ``img_size``: input side in pixels (ViTs are built for it; DINOv2 defaults to 224;
    SSCD to 288). ``pretrained``: timm/torchvision download their default weights (ignored by kinds whose weights
    are always in their file). ``checkpoint``: a local weights file loaded instead of any download (a state dict
    for timm/torchvision; ONNX or TorchScript for SSCD). ``kwargs`` go to the timm/torchvision model constructor.
    """
    kind, spec = parse_name(name)
    if kind in ("timm", "torchvision"):
        from lvdkit.embeddings.backbones import create_torch_model
        from lvdkit.embeddings.torch_embedder import TorchEmbedder

        module, preprocess = create_torch_model(
            name, img_size=img_size, pretrained=pretrained, checkpoint=checkpoint, **kwargs
        )
        return TorchEmbedder(module, preprocess, name, device=device, num_threads=num_threads)
    if kind == "sscd":
        from lvdkit.embeddings.sscd import create_sscd

        _no_extra("sscd", kwargs)
        return create_sscd(
            spec, name=name, device=device, num_threads=num_threads, img_size=img_size, checkpoint=checkpoint
        )
    if kind == "onnx":
        from lvdkit.embeddings.onnx_embedder import OnnxEmbedder

        _no_extra("onnx", kwargs, checkpoint)
        return OnnxEmbedder(
            Path(spec).expanduser(), None, name, num_threads=num_threads, device=device, img_size=img_size
        )
    return _create_lvdkit(spec, name, device, num_threads, img_size, checkpoint, kwargs)


def _create_lvdkit(
    spec: str,
    name: str,
    device: str,
    num_threads: int | None,
    img_size: int | None,
    checkpoint: str | Path | None,
    kwargs: dict[str, Any],
) -> Embedder:
    """A :func:`save_lvdkit_model` file; ``pretrained`` is moot (the weights are the file's)."""
    from lvdkit.embeddings.model_file import load_lvdkit_model, read_sidecar
    from lvdkit.embeddings.torch_embedder import TorchEmbedder

    path = Path(spec).expanduser()
    if checkpoint is not None:
        raise ValueError(f"{name}: an lvdkit model file holds its weights; checkpoint= does not apply")
    _, saved = read_sidecar(path)
    asked = {**kwargs, **({"img_size": img_size} if img_size is not None else {})}
    conflicts = {k: (v, saved.get(k)) for k, v in asked.items() if saved.get(k) != v}
    if conflicts:
        # The weights fit only the module they were saved from (e.g. a ViT's position embedding fixes its size).
        raise ValueError(f"{name}: options {conflicts} (asked, saved) differ from the saved model's {saved}")
    module, preprocess, _, _ = load_lvdkit_model(path)
    return TorchEmbedder(module, preprocess, name, device=device, num_threads=num_threads)
