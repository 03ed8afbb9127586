"""JPEGs decoded on a torch device: nvJPEG on a GPU through ``torchvision.io.decode_jpeg`` (libjpeg-turbo on a CPU),
and the header check that says which JPEGs give there the pixels Pillow's path (:func:`lvdkit.core.image.decode_rgb`)
would. Embedding and training both decode on their device with these when it is a GPU.
"""

from __future__ import annotations

import io
import warnings
from typing import TYPE_CHECKING

from PIL import Image

if TYPE_CHECKING:
    import torch

_ORIENTATION = 0x0112  # EXIF tag: the device decoder does not rotate, Pillow's path does (exif_transpose)


def plain_jpeg(data: bytes, max_pixels: int) -> bool:
    """True when the device decoder gives the pixels Pillow's path would: a JPEG in RGB or grayscale, upright (no
    EXIF rotation) and within ``max_pixels``. Reads the header only."""
    return plain_jpeg_size(data, max_pixels) is not None


def plain_jpeg_size(data: bytes, max_pixels: int) -> tuple[int, int] | None:
    """(width, height) of a :func:`plain_jpeg`, else None. Reads the header only."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # a too-large image is answered below, not warned about
            with Image.open(io.BytesIO(data), formats=["JPEG"]) as im:
                if im.format != "JPEG" or im.mode not in ("RGB", "L") or im.width * im.height > max_pixels:
                    return None
                return im.size if im.getexif().get(_ORIENTATION, 1) == 1 else None
    except Exception:  # anything Pillow cannot even open goes its way, which names the reason
        return None


def decode_jpegs(datas: list[bytes], device: torch.device) -> list[torch.Tensor | None]:
    """uint8 RGB ``[3, H, W]`` on ``device`` per JPEG, decoded in one batched call (nvJPEG takes a list at once);
    None where the decoder refuses one (it fails a whole batch, so a failed batch is retried image by image)."""
    import torch  # here, not at the top: the CPU decode tasks import this module and need no torch
    from torchvision.io import ImageReadMode, decode_jpeg

    tensors = [torch.frombuffer(bytearray(d), dtype=torch.uint8) for d in datas]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # torchvision 0.29 marks its decoders deprecated (TorchCodec)
        try:
            return list(decode_jpeg(tensors, mode=ImageReadMode.RGB, device=device))
        except RuntimeError:
            out: list[torch.Tensor | None] = []
            for t in tensors:
                try:
                    out.append(decode_jpeg(t, mode=ImageReadMode.RGB, device=device))
                except RuntimeError:
                    out.append(None)
            return out
