"""Errors a run reports to the user, and unwrapping lvdkit's own errors from Ray's wrappers."""

from __future__ import annotations

import re

import ray

from lvdkit.core.io import DiskFullError, is_disk_full
from lvdkit.core.stage import PartWork
from lvdkit.core.storage import Location
from lvdkit.curation.curated import ChangedSinceIngest
from lvdkit.embeddings.stage import EmbedInputError


class StageError(RuntimeError):
    """A stage could not finish; the message names the parts and files and says what to do."""


_OWN_ERRORS = (DiskFullError, StageError, ChangedSinceIngest, EmbedInputError)
_OWN_ERROR_LINE = re.compile(
    r"^lvdkit\.[\w.]+\.(" + "|".join(c.__name__ for c in _OWN_ERRORS) + r"): (.+)$", re.MULTILINE
)


def own_text(exc: BaseException) -> str:
    """``Name: message`` of one of lvdkit's own errors (a worker hands it to the driver as data, since an exception
    escaping a Ray Data actor stalls a pipeline with a task stage before it); "" for any other error."""
    return f"{type(exc).__name__}: {exc}" if isinstance(exc, _OWN_ERRORS) else ""


def raise_own_text(text: str) -> None:
    """Raise the error :func:`own_text` described."""
    name, _, message = text.partition(": ")
    raise next(c for c in _OWN_ERRORS if c.__name__ == name)(message)


def is_own(exc: BaseException) -> bool:
    return isinstance(exc, _OWN_ERRORS)


def raise_own(exc: BaseException) -> None:
    """Re-raise the lvdkit error (disk full, a stage's own message) that Ray wrapped into ``exc``, if any, without
    Ray's wrapping (its remote traceback is noise next to a message written for the user)."""
    seen: set[int] = set()
    todo: list[BaseException | None] = [exc]
    while todo:
        e = todo.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, ray.exceptions.RayTaskError):  # also an instance of its cause's class: look at the cause
            todo.append(e.cause)
            continue
        if isinstance(e, _OWN_ERRORS) and e is not exc:
            raise next(c for c in _OWN_ERRORS if isinstance(e, c))(str(e)) from None
        if isinstance(e, OSError) and is_disk_full(e):
            raise DiskFullError.writing(getattr(e, "filename", None) or "an output", e) from None
        todo.extend([e.__cause__, e.__context__])
    # Ray Data passes a UDF's exception on as text only: find the last line of its traceback.
    found = _OWN_ERROR_LINE.findall(str(exc))
    if found:
        name, message = found[-1]
        raise next(c for c in _OWN_ERRORS if c.__name__ == name)(message) from None


INFLIGHT = ".tmp-inflight"  # .part-NNNNNN.parquet.tmp-inflight: the part is being worked on (removed after)


def crash_message(stage: str, stage_dir: Location, work: PartWork, retries: int, exc: BaseException) -> str:
    """A part task that Ray gave up on (its worker died on every attempt, or an error escaped it): name the parts
    that were running, from their in-flight markers."""
    running = sorted(int(p.name.split("-")[1].split(".")[0]) for p in stage_dir.glob(f".part-*{INFLIGHT}"))
    lines = [f"{stage}: a part task failed on all {retries + 1} attempts (its worker died, or: {_last_line(exc)})"]
    for index in running[:10]:
        try:
            uris = work.uris(work.load(index))
        except Exception:  # naming the files is a courtesy; the error above is the news
            uris = []
        lines.append(f"  part {index} was running: {some(uris)}")
    lines.append("Finished parts are kept; rerun to retry the rest.")
    return "\n".join(lines)


def failed_parts_message(stage: str, failures: list[str], pending: int, retries: int, on_error: str) -> str:
    return (
        f"{stage}: {len(failures)} of {pending} parts failed on all {retries + 1} attempts "
        f"(on_part_error={on_error}):\n  "
        + "\n  ".join(failures[:20])
        + ("\n  ..." if len(failures) > 20 else "")
        + "\nThe other parts finished and are kept. Fix or remove these files (or set on_part_error=quarantine) "
        "and rerun: only the failed parts are redone."
    )


def describe(exc: BaseException | None) -> str:
    return f"{type(exc).__name__}: {exc}" if exc is not None else "unknown error"


def some(uris: list[str], limit: int = 3) -> str:
    return ", ".join(uris[:limit]) + (f" and {len(uris) - limit} more" if len(uris) > limit else "")


def _last_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[-1][:500] if text else type(exc).__name__
