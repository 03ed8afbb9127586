"""Faiss, from whichever wheel the user installed: ``lvdkit[cpu]`` (faiss-cpu) or ``lvdkit[gpu]`` (faiss-gpu-cu12).

Both wheels install the same ``faiss`` module, so they must not sit side by side (the second overwrites the first's
files and the result depends on install order). lvdkit's base install has neither; this module says which to add,
and warns when both are present.
"""

from __future__ import annotations

import warnings
from importlib import metadata

CPU_WHEEL, GPU_WHEELS = "faiss-cpu", ("faiss-gpu-cu12", "faiss-gpu-cu11", "faiss-gpu")


def installed_wheels() -> list[str]:
    """The Faiss distributions installed in this environment (normally exactly one)."""
    found = []
    for name in (CPU_WHEEL, *GPU_WHEELS):
        try:
            metadata.distribution(name)
        except metadata.PackageNotFoundError:
            continue
        found.append(name)
    return found


try:
    import faiss
except ImportError as exc:  # neither extra installed
    raise ImportError(
        "lvdkit needs Faiss and none is installed: pip install 'lvdkit[cpu]' (faiss-cpu), or on a CUDA 12 machine "
        "'lvdkit[gpu]' (faiss-gpu-cu12). Install one, not both: they provide the same `faiss` module"
    ) from exc

if len(installed_wheels()) > 1:
    warnings.warn(
        f"several Faiss wheels are installed ({', '.join(installed_wheels())}); they share the `faiss` module and "
        f"overwrite each other. Keep one: pip uninstall -y {CPU_WHEEL} (GPU machines) or the GPU wheel (CPU machines)",
        stacklevel=2,
    )

__all__ = ["faiss", "installed_wheels"]
