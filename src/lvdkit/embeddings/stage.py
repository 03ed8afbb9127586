"""Stage ``embed``: the per-image work, without Ray. Decoding and preprocessing run on CPU tasks; models on actors.

Besides one embedding per image and model, a deterministic sample of images is also embedded as synthetic copies
(``lvdkit.curation.augment``): ``dedup_copy`` calibrates its threshold on them.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from lvdkit.core import schema
from lvdkit.core.files import MAX_FILE_BYTES, read_bytes
from lvdkit.core.image import decode, to_rgb
from lvdkit.curation.augment import synthetic_copy

if TYPE_CHECKING:
    from lvdkit.embeddings.preprocess import Preprocess

PIXELS_PREFIX = "pixels_"  # decode output: uint8 [H, W, 3] per model key (models may want different sizes)


@dataclass
class EmbedConfig:
    """Which models embed every kept image, and how the work is spread."""

    models: dict[str, str] = field(
        default_factory=lambda: {"copy": "sscd", "semantic": "timm:vit_small_patch14_dinov2"}
    )
    model_options: dict[str, dict[str, Any]] = field(default_factory=lambda: {"semantic": {"pretrained": True}})
    images_per_shard: int = 1000  # one part file (and one resumable unit) per this many images
    batch_size: int = 32  # images per model forward
    num_actors: int = 1  # model replicas (one per GPU on a GPU cluster)
    actor_cpus: float = 1.0  # CPUs Ray reserves per actor (the rest decode)
    decode_cpus: float = 0.5  # CPUs per decode task (differs from actor_cpus so Ray keeps decode out of the actor)
    threads_per_actor: int | None = None  # intra-op threads of each model; default: the node's CPUs / num_actors
    device: str = "auto"  # auto: cuda when available
    calibration_copies: int = 1000  # synthetic copies embedded for dedup_copy's threshold calibration
    max_pixels: int = 100_000_000
    seed: int = 0

    def options(self, key: str) -> dict[str, Any]:
        """Factory keyword arguments for model ``key``."""
        return dict(self.model_options.get(key, {}))


def calibration_rate(n_images: int, copies: int) -> float:
    """Fraction of images that also get a synthetic copy."""
    return min(1.0, copies / n_images) if n_images else 0.0


def is_calibration_sample(image_id: str, rate: float, seed: int) -> bool:
    """Deterministic per image: the same images are sampled on every run, on every worker."""
    h = hashlib.blake2b(f"{seed}:{image_id}".encode(), digest_size=8).digest()
    return int.from_bytes(h, "little") < rate * 2**64


def decode_batch(
    image_ids: list[str], uris: list[str], preprocess: dict[str, Preprocess], rate: float, cfg: EmbedConfig
) -> dict[str, np.ndarray]:
    """Decode and preprocess images (and the synthetic copies of sampled ones) for every model.

    Returns columns ``image_id`` [B'], ``edit`` [B'] ('' for the image itself) and ``pixels_<key>`` [B', H, W, 3]
    uint8, where B' = B + the number of sampled images.
    """
    ids, edits = [], []
    pixels: dict[str, list[np.ndarray]] = {k: [] for k in preprocess}
    for image_id, uri in zip(image_ids, uris, strict=True):
        try:
            image = to_rgb(decode(read_bytes(uri, MAX_FILE_BYTES), cfg.max_pixels).image)
        except Exception as exc:  # ingest decoded this file: it changed or vanished since
            raise RuntimeError(f"embed: cannot decode {uri} (it decoded at ingest; did it change?): {exc}") from exc
        variants = [(image, "")]
        if is_calibration_sample(image_id, rate, cfg.seed):
            variants.append(synthetic_copy(image, seed=_seed_of(image_id, cfg.seed)))
        for img, edit in variants:
            ids.append(image_id)
            edits.append(edit)
            for key, pre in preprocess.items():
                pixels[key].append(pre.prepare(img))
    out: dict[str, np.ndarray] = {schema.IMAGE_ID: np.asarray(ids, dtype=object), schema.EDIT: np.asarray(edits)}
    for key, arrays in pixels.items():
        out[PIXELS_PREFIX + key] = np.stack(arrays)
    return out


def _seed_of(image_id: str, seed: int) -> int:
    return int.from_bytes(hashlib.blake2b(f"copy:{seed}:{image_id}".encode(), digest_size=8).digest(), "little")
