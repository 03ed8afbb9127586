"""Starting a pretraining run from weights (``init=``) instead of a random initialisation.

The student backbone is always built from ``model=`` and ``model_kwargs`` (that is what an export rebuilds); ``init``
only says where its starting weights come from, and they must fit it exactly (every parameter, every shape):

- an lvdkit export or model file, ``FILE.safetensors`` with its ``FILE.json`` sidecar (``lvdkit export``);
- a timm or torchvision state dict, ``.safetensors``/``.pth``/``.pt``/``.bin``/``.ckpt``, read as weights only (a
  pickle holding code is refused, see :mod:`lvdkit.embeddings.weights`); a classifier head in it is dropped;
- ``timm:NAME`` or ``torchvision:NAME``: the library's pretrained hub weights of NAME (a tag such as
  ``timm:vit_small_patch14_dinov2.lvd142m`` picks one set), which needs the network or a filled cache.

Files go through the library's own checkpoint loading (timm resamples a ViT's position embedding to
``crops.global_size``), so a 224 px checkpoint starts a 98 px run. Methods with an EMA teacher copy the student after
this, so the teacher starts from the same weights.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

from lvdkit.embeddings.backbones import create_torch_model
from lvdkit.embeddings.weights import load_into

INIT_KINDS = (
    "FILE.safetensors (an lvdkit export with its .json)",
    "FILE.safetensors/.pth/.pt/.bin/.ckpt (a timm or torchvision state dict)",
    "timm:NAME or torchvision:NAME (hub weights; needs the network)",
)
HUB_PREFIXES = ("timm:", "torchvision:")


def is_hub(init: str) -> bool:
    """True for ``timm:NAME`` / ``torchvision:NAME`` (pretrained weights by name), False for a file."""
    return init.startswith(HUB_PREFIXES)


def init_path(init: str) -> Path:
    """The weights file ``init`` names (``lvdkit:`` prefix allowed), checked to exist."""
    path = Path(init.removeprefix("lvdkit:")).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"init={init!r}: no such weights file; valid: {'; '.join(INIT_KINDS)}")
    return path


def _hub_donor(init: str, img_size: int, build: dict[str, Any]) -> nn.Module:
    try:
        donor, _ = create_torch_model(init, img_size=img_size, pretrained=True, **build)
    except (RuntimeError, OSError) as exc:
        raise RuntimeError(
            f"init={init}: cannot build it with its pretrained weights ({exc}). When the download is what failed "
            "(no network), save the weights where there is one (safetensors.torch.save_file(timm.create_model("
            "NAME, pretrained=True).state_dict(), 'w.safetensors')) and pass init=w.safetensors: a file needs no "
            "download"
        ) from None
    return donor


def _file_donor(model: str, init: str, img_size: int, build: dict[str, Any]) -> nn.Module:
    path = init_path(init)
    sidecar = path.with_suffix(".json")
    made_from = ""
    if path.suffix == ".safetensors" and sidecar.is_file():
        from lvdkit.embeddings.model_file import read_sidecar

        name, kwargs = read_sidecar(path)
        made_from = f" (the file holds {name} {kwargs}: set model= and model_kwargs= to match)"
    try:
        donor, _ = create_torch_model(model, img_size=img_size, checkpoint=path, **build)
    except (ValueError, RuntimeError) as exc:
        raise ValueError(f"init={init}: cannot start model={model} {build} from it{made_from}: {exc}") from None
    return donor


def load_init(backbone: nn.Module, model: str, init: str, img_size: int, build: dict[str, Any]) -> None:
    """Copy the weights ``init`` names into ``backbone`` (built as ``create_torch_model(model, img_size, **build)``),
    strictly: every parameter and buffer, same shapes. Raises ``ValueError``/``FileNotFoundError`` naming what does
    not fit, ``RuntimeError`` when hub weights cannot be fetched (offline)."""
    if not isinstance(init, str) or not init.strip():
        raise ValueError(f"init={init!r}: valid: {'; '.join(INIT_KINDS)}")
    donor = _hub_donor(init, img_size, build) if is_hub(init) else _file_donor(model, init, img_size, build)
    load_into(backbone, donor.state_dict(), f"init={init}")
