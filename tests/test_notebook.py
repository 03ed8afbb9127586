"""``notebooks/inspect_curated.ipynb`` runs top to bottom on a real small curated run, in a kernel of this Python."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import pytest

from .curated_run import small_curated_run

NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "inspect_curated.ipynb"


@pytest.fixture(scope="module")
def run_dir(
    small_demo: Path, tmp_path_factory: pytest.TempPathFactory, pool_run: tuple[Path, dict], ray_local: None
) -> Path:
    return small_curated_run(small_demo, tmp_path_factory, pool_run[0])


def _kernel_manager(tmp: Path) -> Any:
    """A kernel manager whose kernel is ``sys.executable`` (this venv), whatever kernelspecs the machine has."""
    from jupyter_client.kernelspec import KernelSpecManager
    from jupyter_client.manager import KernelManager

    spec_dir = tmp / "kernels" / "lvdkit-test"
    spec_dir.mkdir(parents=True)
    spec = {
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "lvdkit tests",
        "language": "python",
    }
    (spec_dir / "kernel.json").write_text(json.dumps(spec))
    km = KernelManager(
        kernel_name="lvdkit-test", kernel_spec_manager=KernelSpecManager(kernel_dirs=[str(tmp / "kernels")])
    )
    assert km.format_kernel_cmd()[0] == sys.executable
    return km


def _outputs(cell: Any) -> tuple[str, set[str]]:
    """A code cell's printed/returned text and the MIME types it displayed."""
    text, mimes = "", set()
    for out in cell.get("outputs", []):
        text += out.get("text", "") + out.get("data", {}).get("text/plain", "")
        mimes |= set(out.get("data", {}))
    return text, mimes


def test_notebook_is_committed_without_outputs() -> None:
    import nbformat

    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(nb)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert code and all(not c.outputs and c.execution_count is None for c in code)
    assert nb.metadata["kernelspec"]["name"] == "python3"
    source = "\n".join(c.source for c in code)
    assert "lvdkit.load_curated" in source and "pq.read_table" in source and "LVDKIT_OUT" in source


def test_notebook_runs_on_a_curated_run(run_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import nbformat
    from nbclient import NotebookClient

    monkeypatch.setenv("LVDKIT_OUT", str(run_dir))
    monkeypatch.setenv("MPLBACKEND", "module://matplotlib_inline.backend_inline")
    nb = nbformat.read(NOTEBOOK, as_version=4)
    client = NotebookClient(
        nb, km=_kernel_manager(tmp_path), timeout=300, resources={"metadata": {"path": str(NOTEBOOK.parent)}}
    )
    client.execute()  # raises CellExecutionError on any failing cell
    cells = [_outputs(c) for c in nb.cells if c.cell_type == "code"]
    assert not any(o.get("output_type") == "error" for c in nb.cells for o in c.get("outputs", []))

    import lvdkit

    frame = lvdkit.load_curated(run_dir, as_="pandas", columns=["reason"])
    counts = frame["reason"].value_counts()
    loaded, by_reason, by_set, grid, cluster = cells
    assert f"{len(frame)} curated images in {run_dir / 'curated'}" in loaded[0]
    assert all(f"{reason}" in by_reason[0] and str(n) in by_reason[0] for reason, n in counts.items())
    assert "seed_set" in by_set[0] and "reason_count" in by_set[0]
    assert "image/png" in grid[1] and "image/png" in cluster[1]
    assert "level-1 cluster" in cluster[0]
