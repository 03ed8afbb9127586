"""HTML building blocks for the report: escaping, the page shell with its CSS, tables, CSS bars and an SVG histogram.

Plain string building with :func:`html.escape`; nothing here loads a script, a font or any URL, so the page works
offline and from ``file://``.
"""

from __future__ import annotations

import html
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

CSS = """
body { font: 14px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; color: #1d2330; margin: 0;
  background: #f6f7f9; }
header, main { max-width: 1120px; margin: 0 auto; padding: 0 24px; }
header { padding-top: 20px; }
h1 { font-size: 24px; margin: 0 0 4px; }
h2 { font-size: 19px; margin: 0 0 10px; border-bottom: 2px solid #d9dee7; padding-bottom: 4px; }
h3 { font-size: 15px; margin: 16px 0 6px; }
nav a { margin-right: 14px; color: #2457c5; }
section { background: #fff; border: 1px solid #e0e4ea; border-radius: 6px; padding: 14px 18px; margin: 16px 0; }
.muted { color: #6b7385; }
.missing { color: #8a5a00; background: #fff6e0; border-left: 4px solid #e0a400; padding: 6px 10px; }
table { border-collapse: collapse; }
td, th { padding: 3px 10px 3px 0; text-align: left; vertical-align: middle; }
td.n { text-align: right; font-variant-numeric: tabular-nums; }
tr.sub td:first-child { padding-left: 22px; color: #4a5264; }
.bar { width: 420px; height: 14px; background: #eef0f4; border-radius: 3px; overflow: hidden; }
.bar span { display: block; height: 100%; }
.b-in { background: #6c7a96; } .b-quarantined { background: #d0463b; } .b-duplicate { background: #e39b2d; }
.b-kept { background: #3b8f5a; } .b-curated { background: #2f6fd6; }
.grid { display: flex; flex-wrap: wrap; gap: 6px; align-items: flex-start; }
figure { margin: 0; width: var(--px); text-align: center; }
figure img, figure .ph { width: var(--px); height: var(--px); object-fit: contain; background: #eef0f4;
  border: 1px solid #d9dee7; display: block; }
figure .ph { display: flex; align-items: center; justify-content: center; font-size: 11px; color: #8a5a00; }
figcaption { font-size: 11px; line-height: 1.25; color: #4a5264; overflow-wrap: anywhere; }
figure.seed img { border: 2px solid #2f6fd6; } figure.kept img { border: 2px solid #3b8f5a; }
figure.dup img { border: 2px solid #e39b2d; }
.pairs { display: flex; flex-wrap: wrap; gap: 10px 18px; }
.pair { display: flex; gap: 4px; align-items: flex-start; padding: 4px; background: #fafbfc;
  border: 1px solid #e8ebf0; border-radius: 4px; }
.pair .m { width: 86px; font-size: 12px; align-self: center; }
.row { display: flex; gap: 12px; align-items: flex-start; margin: 6px 0; }
.row .arrow { align-self: center; color: #6b7385; font-size: 20px; }
svg.hist rect { fill: #2f6fd6; } svg.hist text { font-size: 11px; fill: #4a5264; }
svg.hist line { stroke: #6b7385; }
"""


@dataclass(frozen=True)
class Raw:
    """HTML that is already built (and escaped): table cells holding it are not escaped again."""

    html: str


def esc(value: object) -> str:
    """Text (file names, seed set names, reasons...) made safe for HTML content and attribute values."""
    return html.escape(str(value), quote=True)


def page(title: str, subtitle: str, nav: Sequence[tuple[str, str]], sections: Sequence[str], px: int) -> str:
    """The whole document: CSS inline, a nav of in-page anchors, then the sections."""
    links = "".join(f'<a href="#{esc(anchor)}">{esc(label)}</a>' for anchor, label in nav)
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{esc(title)}</title><style>{CSS}:root {{ --px: {int(px)}px; }}</style></head>\n"
        f'<body><header><h1>{esc(title)}</h1><div class="muted">{subtitle}</div><nav>{links}</nav></header>\n'
        f"<main>\n{''.join(sections)}</main></body></html>\n"
    )


def section(anchor: str, title: str, body: str) -> str:
    """One titled section with an id the nav links to."""
    return f'<section id="{esc(anchor)}"><h2>{esc(title)}</h2>\n{body}</section>\n'


def missing(text: str) -> str:
    """A visible note that an output is absent (a stage has not run)."""
    return f'<p class="missing">{esc(text)}</p>\n'


def para(text: str, cls: str = "muted") -> str:
    """A paragraph of plain (escaped) text."""
    return f'<p class="{esc(cls)}">{esc(text)}</p>\n'


def _cell(value: object) -> str:
    if isinstance(value, Raw):
        return f"<td>{value.html}</td>"
    if isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool):
        return f'<td class="n">{_number(value)}</td>'
    return f"<td>{esc(value)}</td>"


def _number(value: object) -> str:
    if isinstance(value, (int, np.integer)):
        return f"{int(value):,}"
    return f"{float(value):,.3g}"  # type: ignore[arg-type]


def _row(cells: Sequence[object], cls: str) -> str:
    attr = f' class="{esc(cls)}"' if cls else ""
    return f"<tr{attr}>{''.join(_cell(c) for c in cells)}</tr>"


def table(header: Sequence[str], rows: Sequence[tuple[Sequence[object], str]]) -> str:
    """A table; each row is ``(cells, css_class)``; numbers are right-aligned, :class:`Raw` cells kept as HTML."""
    head = "".join(f"<th>{esc(h)}</th>" for h in header)
    body = "".join(_row(cells, cls) for cells, cls in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>\n"


def bar(count: int, total: int, kind: str) -> Raw:
    """A CSS bar: ``count`` as a share of ``total``, coloured by ``kind`` (in, quarantined, duplicate, ...)."""
    share = 100.0 * count / total if total else 0.0
    return Raw(f'<div class="bar"><span class="b-{esc(kind)}" style="width:{share:.2f}%"></span></div>')


def histogram_svg(values: np.ndarray, label: str, bins: int = 24, width: int = 680, height: int = 210) -> str:
    """An inline SVG histogram of ``values`` (e.g. cluster sizes), bars with tooltips, min/max axis labels."""
    values = np.asarray(values)
    if values.size == 0:
        return missing("no values to plot")
    counts, edges = np.histogram(values, bins=max(1, min(bins, len(np.unique(values)))))
    left, bottom, top, right = 44, 40, 10, 10
    plot_w, plot_h = width - left - right, height - bottom - top
    step, tallest = plot_w / len(counts), max(int(counts.max()), 1)
    rects = []
    for i, count in enumerate(counts):
        h = plot_h * int(count) / tallest
        x, y = left + i * step, top + plot_h - h
        tip = f"{edges[i]:.0f} to {edges[i + 1]:.0f}: {int(count)}"
        rects.append(
            f'<rect x="{x:.1f}" y="{y:.1f}" width="{max(step - 1, 1):.1f}" height="{h:.1f}">'
            f"<title>{esc(tip)}</title></rect>"
        )
    base = top + plot_h
    ticks = [(left, f"{edges[0]:.0f}", "start"), (left + plot_w, f"{edges[-1]:.0f}", "end")]
    texts = "".join(f'<text x="{x}" y="{base + 14}" text-anchor="{a}">{esc(t)}</text>' for x, t, a in ticks)
    texts += f'<text x="{left + plot_w / 2:.0f}" y="{base + 32}" text-anchor="middle">{esc(label)}</text>'
    texts += f'<text x="{left - 6}" y="{top + 10}" text-anchor="end">{tallest}</text>'
    texts += f'<text x="{left - 6}" y="{base}" text-anchor="end">0</text>'
    axes = f'<line x1="{left}" y1="{base}" x2="{left + plot_w}" y2="{base}"/>'
    return (
        f'<svg class="hist" role="img" aria-label="{esc(label)}" viewBox="0 0 {width} {height}" '
        f'width="{width}" height="{height}">{"".join(rects)}{axes}{texts}</svg>\n'
    )
