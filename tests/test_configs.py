"""Every preset under configs/ loads into its config class: a misspelt key fails here, not in a user's run."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from lvdkit.core.settings import load_config
from lvdkit.pipeline.config import CurateConfig
from lvdkit.pretrain.config import PretrainConfig

PRESETS = sorted((Path(__file__).parents[1] / "configs").glob("*.yaml"))


def test_there_are_presets() -> None:
    assert len(PRESETS) >= 6


@pytest.mark.parametrize("path", PRESETS, ids=lambda p: p.name)
def test_preset_loads_with_every_key_known(path: Path) -> None:
    data = yaml.safe_load(path.read_text())
    cls = PretrainConfig if "method" in data else CurateConfig
    cfg = load_config(cls, path)
    if isinstance(cfg, PretrainConfig):
        assert cfg.method == data["method"] and cfg.model == data["model"]
