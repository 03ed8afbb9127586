"""Small inline thumbnails: read one image (local path or filesystem URI), shrink it, embed it as a ``data:`` URI.

Only the images the report shows are read, each once. A file that is gone or unreadable becomes a labelled
placeholder, never an error: the report describes a run, it does not re-validate it.
"""

from __future__ import annotations

import base64
import io
from pathlib import PurePosixPath

from PIL import Image, ImageOps

from lvdkit.report.page import esc

MAX_THUMB_SOURCE_BYTES = 64 * 2**20  # larger files are not read for a thumbnail
MAX_THUMB_SOURCE_PIXELS = 100_000_000  # ingest's default max_pixels: larger images are not decoded


def thumbnail_bytes(data: bytes, px: int) -> bytes:
    """JPEG bytes of the image in ``data`` scaled to fit ``px`` x ``px`` (upright, alpha on white)."""
    from lvdkit.core.image import to_rgb

    previous = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = MAX_THUMB_SOURCE_PIXELS
    try:
        im = Image.open(io.BytesIO(data))
        if im.width * im.height > MAX_THUMB_SOURCE_PIXELS:
            raise ValueError(f"{im.width}x{im.height} is too large for a thumbnail")
        im.draft("RGB", (px, px))  # JPEG: decode at a reduced scale (no-op for other formats)
        upright = ImageOps.exif_transpose(im) or im
        rgb = to_rgb(upright)
    finally:
        Image.MAX_IMAGE_PIXELS = previous
    rgb.thumbnail((px, px), Image.Resampling.LANCZOS)
    buf = io.BytesIO()
    rgb.save(buf, format="JPEG", quality=85)
    return buf.getvalue()


def read_image_bytes(uri: str) -> bytes:
    """The file at ``uri`` as ingest lists it (a local path or a pyarrow filesystem URI)."""
    from lvdkit.core.files import read_bytes

    return read_bytes(uri, MAX_THUMB_SOURCE_BYTES)


class Thumbnailer:
    """Makes ``<figure>`` elements with inline thumbnails, reading each image at most once."""

    def __init__(self, px: int) -> None:
        self.px = px
        self._cache: dict[str, str | None] = {}
        self.read = 0  # images actually read (the report's I/O bound)

    def data_uri(self, uri: str) -> str | None:
        """``data:image/jpeg;base64,...`` for the image at ``uri``, or None when it cannot be read."""
        if uri not in self._cache:
            self.read += 1
            try:
                jpeg = thumbnail_bytes(read_image_bytes(uri), self.px)
                self._cache[uri] = "data:image/jpeg;base64," + base64.b64encode(jpeg).decode("ascii")
            except Exception:  # gone, unreadable, not an image: shown as a placeholder
                self._cache[uri] = None
        return self._cache[uri]

    def figure(self, uri: str | None, caption: str = "", kind: str = "") -> str:
        """A thumbnail with a caption; ``kind`` (seed, kept, dup) styles its border. File names are escaped."""
        name = PurePosixPath(uri).name if uri else "unknown image"
        src = self.data_uri(uri) if uri else None
        if src is None:
            pic = f'<div class="ph" title="{esc(uri or "")}">unreadable</div>'
        else:
            pic = f'<img src="{src}" alt="{esc(name)}" title="{esc(uri)}">'
        cls = f' class="{esc(kind)}"' if kind else ""
        cap = f"<figcaption>{esc(caption)}</figcaption>" if caption else ""
        return f"<figure{cls}>{pic}{cap}</figure>"
