"""An earlier output a changed stage can still use in part: embed's columns of the models that did not change.

A stage with views (embed: one per model, see :class:`~lvdkit.pipeline.kinds.Stage`) whose config changed but whose
inputs did not keeps its finished output aside (``OUT/_previous/STAGE``) instead of removing it, when some of its
views are unchanged; its work then copies those views from it (:meth:`lvdkit.core.stage.PartWork.reuse`) and
computes only the rest. The folder is removed once the stage finishes. An interrupted rerun finds it again.

Only on local disk: on object storage a folder cannot be renamed, and the earlier output is removed as before.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Any

from lvdkit.core.storage import Location, remove_tree
from lvdkit.pipeline.manifest import RunKey, success

PREVIOUS = "_previous"


def keep_previous(
    stage_dir: Location, key: RunKey, views: dict[str, str], force: bool
) -> tuple[Path | None, tuple[str, ...]]:
    """Set the finished output in ``stage_dir`` aside when this run (``key``, ``views``) can reuse some of its views;
    returns (the kept output, the views to reuse), or (None, ()) when there is nothing to reuse."""
    if force or not isinstance(stage_dir, Path):
        return None, ()
    aside = stage_dir.parent / PREVIOUS / stage_dir.name
    record = success(stage_dir)
    if record is not None and not key.matches(record) and _reusable(record, key, views):
        remove_tree(aside)  # an older one, superseded
        aside.parent.mkdir(parents=True, exist_ok=True)
        os.rename(stage_dir, aside)
    old = success(aside) if aside.is_dir() else None
    keys = _reusable(old, key, views) if old is not None else ()
    if not keys:
        remove_tree(aside)  # of no use to this run (its inputs changed since): lvdkit's own output
        return None, ()
    return aside, keys


def drop_previous(stage_dir: Location) -> None:
    """Remove the output set aside for ``stage_dir``'s stage, once the stage has finished."""
    if isinstance(stage_dir, Path):
        aside = stage_dir.parent / PREVIOUS
        remove_tree(aside / stage_dir.name)
        with contextlib.suppress(OSError):  # another stage's output may still lie there
            aside.rmdir()


def _reusable(record: dict[str, Any], key: RunKey, views: dict[str, str]) -> tuple[str, ...]:
    """The views of ``record``'s output this run may reuse: same inputs, same view identity."""
    if record.get("fingerprint") != key.fingerprint:
        return ()
    old = record.get("views") or {}
    return tuple(sorted(k for k, v in views.items() if old.get(k) == v))
