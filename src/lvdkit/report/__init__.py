"""``lvdkit report OUT``: one self-contained HTML page, ``OUT/report.html``, showing what a curation run did.

The page has no scripts and no external URLs: CSS inline, the cluster-size histogram as inline SVG, images as small
base64 JPEG thumbnails. It shows the funnel (images in, quarantined by reason, duplicates by stage, kept, curated by
selection reason), cluster sizes and samples of the largest clusters, duplicate pairs per dedup stage and the top
retrievals per seed set. Stages that have not run are named and their sections left empty.

Only the columns needed are read, and only the images shown (a few hundred at most, see :class:`ReportLimits`).
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path

from lvdkit import __version__
from lvdkit.core.io import write_bytes_atomic
from lvdkit.core.storage import Location, location
from lvdkit.report.page import esc, page, section
from lvdkit.report.sections import (
    Context,
    ReportLimits,
    clusters_section,
    duplicates_section,
    funnel_section,
    retrieval_section,
    stages_section,
)
from lvdkit.report.thumbs import Thumbnailer

__all__ = ["REPORT_NAME", "SECTIONS", "ReportLimits", "build_report", "write_report"]

REPORT_NAME = "report.html"
# (anchor, heading, builder): the page's sections in order.
SECTIONS = (
    ("stages", "Stages", stages_section),
    ("funnel", "Funnel", funnel_section),
    ("clusters", "Clusters", clusters_section),
    ("duplicates", "Duplicate pairs", duplicates_section),
    ("retrieval", "Retrieval", retrieval_section),
)


def build_report(out: str | Path, limits: ReportLimits | None = None) -> str:
    """The report of the run in ``out`` (a folder, or a prefix on object storage) as an HTML string."""
    run = location(out)
    if not run.is_dir():
        raise FileNotFoundError(f"{run} is not a folder: give the OUT folder of a curation run")
    limits = limits or ReportLimits()
    ctx = Context(out=run, limits=limits, thumbs=Thumbnailer(limits.thumb_px))
    body = [section(anchor, title, build(ctx)) for anchor, title, build in SECTIONS]
    stamp = dt.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")
    subtitle = f"run in <code>{esc(run.resolve())}</code> &middot; lvdkit {esc(__version__)} &middot; {esc(stamp)}"
    nav = [(anchor, title) for anchor, title, _ in SECTIONS]
    return page("lvdkit curation report", subtitle, nav, body, limits.thumb_px)


def write_report(out: str | Path, path: str | Path | None = None, limits: ReportLimits | None = None) -> Location:
    """Write the report of ``out`` to ``path`` (default ``OUT/report.html``) atomically; returns the path."""
    html = build_report(out, limits)
    target = location(path) if path is not None else location(out) / REPORT_NAME
    write_bytes_atomic(target, html.encode("utf-8"))
    return target
