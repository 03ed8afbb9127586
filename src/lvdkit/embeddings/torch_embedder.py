"""Run any PyTorch module (timm, torchvision, TorchScript) as an :class:`~lvdkit.embeddings.base.Embedder`."""

from __future__ import annotations

import contextlib

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from lvdkit.embeddings.base import DEVICES, check_pixels
from lvdkit.embeddings.preprocess import Preprocess


def resolve_device(device: str) -> torch.device:
    """``auto`` -> ``cuda`` when available, else ``cpu``; anything else must be a device torch knows and has."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"device must be one of {DEVICES}, got {device!r}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={device!r} but torch sees no CUDA device here: use device='auto' or 'cpu'")
    return dev


def set_threads(num_threads: int | None) -> None:
    """Set torch's intra-op threads (process-wide: one model process should own its cores)."""
    if num_threads is None:
        return
    if num_threads < 1:
        raise ValueError(f"num_threads must be >= 1 or None (torch's default), got {num_threads}")
    torch.set_num_threads(num_threads)


def _is_cnn(model: nn.Module) -> bool:
    """More than one 2-d convolution: a CNN (a ViT has exactly one, its patch embedding)."""
    # TorchScript submodules are RecursiveScriptModules; their original class name is in ``original_name``.
    convs = sum(
        getattr(m, "original_name", type(m).__name__) == "Conv2d" or isinstance(m, nn.Conv2d) for m in model.modules()
    )
    return convs > 1


class TorchEmbedder:
    """A PyTorch module whose forward maps normalised float NCHW images to pooled features ``[B, D]``.

    ``embed`` moves the uint8 batch to the device as is (4x fewer bytes than float; pinned memory and a non-blocking
    copy on CUDA), converts and normalises it there, runs the model under ``torch.inference_mode()`` (bf16 autocast on
    CUDA, fp32 on CPU) and returns float32 L2-normalised rows. With ``preprocess.mean`` None the model gets [0, 1].
    """

    def __init__(
        self,
        model: nn.Module,
        preprocess: Preprocess,
        name: str,
        device: str = "auto",
        num_threads: int | None = None,
    ) -> None:
        set_threads(num_threads)
        self.name = name
        self.preprocess = preprocess
        self.device = resolve_device(device)
        self.model = model.eval().to(self.device)
        # channels_last lets cuDNN pick its fastest (NHWC, tensor-core) convolution kernels; a ViT gains nothing.
        self.channels_last = self.device.type == "cuda" and _is_cnn(model)
        if self.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
        mean = torch.tensor(preprocess.mean or (0.0, 0.0, 0.0), dtype=torch.float32)
        std = torch.tensor(preprocess.std or (1.0, 1.0, 1.0), dtype=torch.float32)
        # (x / 255 - mean) / std folded into one multiply-add: x * scale + shift, shaped [1, 3, 1, 1].
        self._scale = (1.0 / (255.0 * std)).view(1, 3, 1, 1).to(self.device)
        self._shift = (-mean / std).view(1, 3, 1, 1).to(self.device)
        self.dim = 0
        self.dim = int(self.embed(np.zeros((1, *preprocess.size, 3), dtype=np.uint8)).shape[1])

    def _autocast(self) -> contextlib.AbstractContextManager[object]:
        if self.device.type == "cuda":
            return torch.autocast(device_type="cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()  # fp32 on CPU: bf16 there is slow on most CPUs and changes results

    def embed(self, pixels: np.ndarray) -> np.ndarray:
        """uint8 ``[B, H, W, 3]`` -> float32 ``[B, D]``, rows L2-normalised."""
        pixels = check_pixels(pixels, self.preprocess)
        if len(pixels) == 0 and self.dim:
            return np.zeros((0, self.dim), dtype=np.float32)
        if not pixels.flags.writeable:
            pixels = pixels.copy()  # torch.from_numpy warns on read-only arrays (Ray Data hands out such batches)
        batch = torch.from_numpy(pixels)  # [B, H, W, 3] uint8, no copy
        if self.device.type == "cuda":
            batch = batch.pin_memory().to(self.device, non_blocking=True)
        return self.embed_tensor(batch)

    def embed_tensor(self, batch: torch.Tensor) -> np.ndarray:
        """uint8 ``[B, H, W, 3]`` already in torch (on any device: decoded there, say) -> float32 ``[B, D]``."""
        batch = batch.to(self.device)
        fmt = torch.channels_last if self.channels_last else torch.contiguous_format
        with torch.inference_mode(), self._autocast():
            # permute gives an NCHW view of NHWC memory; float() keeps those strides; contiguous() picks the layout.
            x = (batch.permute(0, 3, 1, 2).float() * self._scale + self._shift).contiguous(memory_format=fmt)
            out = self.model(x)
            if isinstance(out, (tuple, list)):
                out = out[0]  # some TorchScript exports return (embedding, ...)
            if not isinstance(out, torch.Tensor):
                raise TypeError(f"{self.name}: the model returned {type(out).__name__}, expected a [B, D] tensor")
            feats = F.normalize(out.float().flatten(1), dim=1)  # [B, D]; flatten covers [B, D, 1, 1] outputs
        return feats.cpu().numpy()
