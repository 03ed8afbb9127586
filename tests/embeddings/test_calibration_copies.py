"""embed's synthetic copies for calibration: every edit family, several per image on small pools, reproducible."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from lvdkit.core import schema
from lvdkit.curation.augment import COPY_EDITS, edit_families, synthetic_copy
from lvdkit.embeddings.preprocess import Preprocess
from lvdkit.embeddings.stage import EmbedConfig, calibration_rate, copies_of, decode_batch


def photo(seed: int, side: int = 96) -> Image.Image:
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 256, (side // 8, side // 8, 3), dtype=np.uint8)
    return Image.fromarray(base).resize((side, side), Image.Resampling.BICUBIC)


def test_small_pools_get_several_copies_per_image_and_large_pools_a_sample() -> None:
    assert calibration_rate(200, 1000) == 5.0
    assert calibration_rate(10, 1000) == len(COPY_EDITS)  # at most one copy per family
    assert calibration_rate(10_000, 1000) == 0.1 and calibration_rate(0, 1000) == 0.0
    keys = [f"hash{i}" for i in range(4000)]
    for rate in (0.1, 2.5):
        counts = np.array([copies_of(k, rate, seed=0) for k in keys])
        assert set(counts) == {int(rate), int(rate) + 1}
        assert abs(counts.mean() - rate) < 0.03
    assert [copies_of(k, 2.5, 0) for k in keys[:50]] == [copies_of(k, 2.5, 0) for k in keys[:50]]


def test_each_family_changes_the_image_and_the_same_seed_gives_the_same_copy() -> None:
    image = photo(1)
    for family in COPY_EDITS:
        copy, name = synthetic_copy(image, seed=7, edit=family)
        again, _ = synthetic_copy(image, seed=7, edit=family)
        assert name == family and copy.mode == "RGB"
        assert np.array_equal(np.asarray(copy), np.asarray(again))
        differs = copy.size != image.size or np.abs(np.asarray(copy, float) - np.asarray(image, float)).mean() > 1
        assert differs, family
    assert sorted(edit_families(3, len(COPY_EDITS))) == sorted(COPY_EDITS)
    with pytest.raises(ValueError, match="unknown copy edit"):
        synthetic_copy(image, seed=0, edit="sepia")


def test_decode_batch_gives_distinct_families_per_image(tmp_path: Path) -> None:
    uris = []
    for i in range(6):
        uris.append(str(tmp_path / f"{i}.png"))
        photo(i).save(uris[-1])
    ids = [f"id{i}" for i in range(6)]
    pre = {"copy": Preprocess(size=(32, 32), resize="squash")}
    out = decode_batch(ids, uris, pre, 2.5, EmbedConfig(), keys=[f"h{i}" for i in range(6)])
    copies = [(i, e) for i, e in zip(out[schema.IMAGE_ID], out[schema.EDIT], strict=True) if e]
    per_image = {i: [e for j, e in copies if j == i] for i in ids}
    assert all(len(v) in (2, 3) and len(set(v)) == len(v) for v in per_image.values())
    assert len(copies) == sum(copies_of(f"h{i}", 2.5, 0) for i in range(6))
    again = decode_batch(ids, uris, pre, 2.5, EmbedConfig(), keys=[f"h{i}" for i in range(6)])
    assert np.array_equal(out["pixels_copy"], again["pixels_copy"])


def test_decode_batch_adds_every_images_rotated_views_after_its_copies(tmp_path: Path) -> None:
    uris = []
    for i in range(3):
        uris.append(str(tmp_path / f"{i}.png"))
        photo(i).save(uris[-1])
    pre = {"copy": Preprocess(size=(32, 32), resize="squash")}
    cfg = EmbedConfig(copy_views=[6.0, -6.0])
    out = decode_batch(["a", "b", "c"], uris, pre, 0.0, cfg, keys=["h0", "h1", "h2"])
    rows = list(zip(out[schema.IMAGE_ID], out[schema.EDIT], strict=True))
    assert rows == [(i, e) for i in "abc" for e in ("", "view_rotate+6", "view_rotate-6")]
    turned = pre["copy"].prepare(Image.open(uris[1]).convert("RGB").rotate(-6.0, Image.Resampling.BILINEAR))
    np.testing.assert_array_equal(out["pixels_copy"][5], turned)
    assert not np.array_equal(out["pixels_copy"][5], out["pixels_copy"][3])


def test_side_sets_get_synthetic_copies_but_no_rotated_views(tmp_path: Path) -> None:
    from lvdkit.curation.ingest import IngestConfig
    from lvdkit.curation.side_sets import SideSetReader

    for i in range(4):
        photo(i, side=64).save(tmp_path / f"{i}.png")
    embed = EmbedConfig(models={"copy": "timm:resnet10t"}, model_options={}, copy_views=[6.0, -6.0])
    side = SideSetReader(IngestConfig(), embed).read("copy", [str(tmp_path)], copies=8)
    assert side.x.shape[0] == 4 and side.copies is not None and side.copy_edit is not None
    assert len(side.copies) == 8 and set(side.copy_edit) <= set(COPY_EDITS)  # two per image, no view among them
