"""Weight files are data, never code: a checkpoint carrying a pickle payload is refused before anything runs."""

from __future__ import annotations

import os
import pickle
import zipfile
from pathlib import Path

import pytest
import torch
from safetensors import SafetensorError

from lvdkit.embeddings import create_embedder
from lvdkit.embeddings.weights import load_state_dict_file


class Payload:
    """Unpickling this runs ``touch MARKER`` (what an attacker's checkpoint would do, with worse commands)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (os.system, (f"touch {self.marker}",))


def test_the_payload_really_runs_when_unpickled(tmp_path: Path) -> None:
    """The control: without lvdkit's guard the file would run its command."""
    marker = tmp_path / "ran"
    pickle.loads(pickle.dumps(Payload(marker)))  # the point of this test
    assert marker.exists()


def _torch_zip(path: Path, marker: Path) -> Path:
    torch.save({"conv1.weight": torch.zeros(1), "payload": Payload(marker)}, path)
    return path


def _legacy_pickle(path: Path, marker: Path) -> Path:
    with open(path, "wb") as fh:
        pickle.dump({"conv1.weight": Payload(marker)}, fh)
    return path


@pytest.mark.parametrize("make", [_torch_zip, _legacy_pickle], ids=["torch_save_zip", "plain_pickle"])
@pytest.mark.parametrize("suffix", [".pt", ".pth", ".bin", ".ckpt"])
def test_a_checkpoint_with_a_pickle_payload_is_refused_and_nothing_runs(
    tmp_path: Path, make: object, suffix: str
) -> None:
    marker = tmp_path / "ran"
    path = make(tmp_path / f"evil{suffix}", marker)  # type: ignore[operator]
    with pytest.raises(ValueError, match=r"refusing to load .*weights_only=True"):
        load_state_dict_file(path)
    with pytest.raises(ValueError, match="refusing to load"):
        create_embedder("timm:resnet10t", device="cpu", checkpoint=str(path))
    assert not marker.exists()


def test_a_pickle_named_safetensors_is_not_unpickled(tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    path = _legacy_pickle(tmp_path / "evil.safetensors", marker)
    with pytest.raises(SafetensorError, match="header"):  # safetensors' own parser: a bad header, never an unpickle
        load_state_dict_file(path)
    path.with_suffix(".json").write_text('{"format": "lvdkit.model/1", "model": "timm:resnet10t", "kwargs": {}}')
    with pytest.raises((SafetensorError, ValueError)):  # an lvdkit model file (PATH.safetensors + its .json)
        create_embedder(str(path), device="cpu")
    assert not marker.exists()


def test_sscd_torchscript_loading_refuses_a_pickle_payload(tmp_path: Path) -> None:
    """SSCD's weights are TorchScript (read by torch's C++ unpickler, which knows no Python callables)."""
    marker = tmp_path / "ran"
    with pytest.raises(ValueError, match="not a TorchScript file"):
        create_embedder("sscd", device="cpu", checkpoint=str(_torch_zip(tmp_path / "evil.pt", marker)))
    # A real TorchScript archive whose constants are replaced by the payload.
    scripted = tmp_path / "scripted.pt"
    torch.jit.save(torch.jit.script(torch.nn.Linear(2, 2)), str(scripted))
    evil = tmp_path / "evil_script.pt"
    with zipfile.ZipFile(scripted) as src, zipfile.ZipFile(evil, "w") as dst:
        for item in src.infolist():
            data = src.read(item.filename)
            if item.filename.endswith(("constants.pkl", "data.pkl")):
                data = pickle.dumps(Payload(marker), protocol=2)
            dst.writestr(item, data)
    with pytest.raises(ValueError, match="is not a TorchScript file"):  # torch's C++ unpickler refused it
        create_embedder("sscd", device="cpu", checkpoint=str(evil))
    assert not marker.exists()
