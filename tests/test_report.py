"""``lvdkit report OUT``: the HTML page of a real small run, its numbers against summary.json, a partial run with
hostile file names, and a render check in headless Chromium (skipped when Chromium is not installed)."""

from __future__ import annotations

import base64
import io
import json
import os
import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import pytest
from PIL import Image

from lvdkit.report import ReportLimits, build_report, write_report
from lvdkit.report.sections import DEDUP_KINDS

from .conftest import run_cli
from .curated_run import small_curated_run

SECTION_HEADINGS = ("Stages", "Funnel", "Clusters", "Duplicate pairs", "Retrieval")
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
)


@pytest.fixture(scope="module")
def run_dir(
    small_demo: Path, tmp_path_factory: pytest.TempPathFactory, pool_run: tuple[Path, dict], ray_local: None
) -> Path:
    return small_curated_run(small_demo, tmp_path_factory, pool_run[0])


class Page(HTMLParser):
    """What the tests look at: headings, table rows per section, image sources."""

    def __init__(self, text: str) -> None:
        super().__init__()
        self.section = ""
        self.headings: dict[str, list[str]] = {}  # tag -> texts
        self.rows: dict[str, list[list[str]]] = {}  # section id -> table rows (cell texts)
        self.images: list[str] = []
        self.titles: list[str] = []  # an image's title is its file's URI
        self._tag: str | None = None
        self._text: list[str] = []
        self._cells: list[str] | None = None
        self.feed(text)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        if tag == "section":
            self.section = a.get("id") or ""
        elif tag == "img":
            self.images.append(a.get("src") or "")
            self.titles.append(a.get("title") or "")
        elif tag == "tr":
            self._cells = []
        elif tag in ("h2", "h3", "td", "th"):
            self._tag, self._text = tag, []

    def handle_data(self, data: str) -> None:
        if self._tag:
            self._text.append(data)

    def handle_endtag(self, tag: str) -> None:
        if tag != self._tag:
            if tag == "tr" and self._cells is not None:
                self.rows.setdefault(self.section, []).append(self._cells)
                self._cells = None
            return
        text = "".join(self._text).strip()
        if tag in ("td", "th") and self._cells is not None:
            self._cells.append(text)
        elif tag in ("h2", "h3"):
            self.headings.setdefault(tag, []).append(text)
        self._tag = None


def _funnel(page: Page) -> dict[str, int]:
    """Funnel table: label -> count (numbers are written with thousands separators)."""
    return {row[0]: int(row[1].replace(",", "")) for row in page.rows["funnel"] if row[1].replace(",", "").isdigit()}


def test_report_cli_writes_a_self_contained_page_matching_summary_json(run_dir: Path) -> None:
    result = run_cli("report", str(run_dir))
    assert result.returncode == 0, result.stderr
    path = run_dir / "report.html"
    assert str(path) in result.stdout
    text = path.read_text(encoding="utf-8")
    page = Page(text)
    assert page.headings["h2"] == list(SECTION_HEADINGS)
    summary = json.loads((run_dir / "summary.json").read_text())
    funnel = _funnel(page)
    for key, label in [("images_in", "images in"), ("quarantined", "quarantined"), ("duplicates", "duplicates")]:
        assert funnel[label] == summary[key]
    assert funnel["kept"] == summary["kept"] and funnel["curated"] == summary["curated"]
    assert summary["quarantined_by_reason"] and all(funnel[r] == n for r, n in summary["quarantined_by_reason"].items())
    for stage, n in summary["duplicates_by_stage"].items():
        assert funnel[f"{stage}: {DEDUP_KINDS[stage]}"] == n
    by_reason = summary["stages"]["curated"]["stats"]["by_reason"]
    assert {label[3:]: n for label, n in funnel.items() if label.startswith("by ")} == by_reason
    # every stage finished, so no section says something is missing
    assert "has not run" not in text and "not run yet" not in text


def test_report_command_has_help(capsys: pytest.CaptureFixture[str]) -> None:
    from lvdkit.cli import main

    with pytest.raises(SystemExit) as exc:
        main(["report", "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert "usage: lvdkit report" in out and "report.html" in out and "--thumb-px" in out


def test_report_shows_images_inline_and_bounded_and_nothing_external(
    run_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from lvdkit.report import thumbs

    read: list[str] = []
    real = thumbs.read_image_bytes
    monkeypatch.setattr(thumbs, "read_image_bytes", lambda uri: read.append(uri) or real(uri))
    limits = ReportLimits(thumb_px=64, clusters=2, per_cluster=4, pairs=3, seeds=2, hits=3)
    text = build_report(run_dir, limits)
    page = Page(text)
    assert len(read) == len(set(read)) and set(read) == set(page.titles)  # only the images shown, each read once
    assert page.images and all(re.fullmatch(r"data:image/jpeg;base64,[A-Za-z0-9+/=]+", s) for s in page.images)
    thumb = Image.open(io.BytesIO(base64.b64decode(page.images[0].split(",", 1)[1])))
    assert max(thumb.size) <= 64
    assert not re.search(r"https?://", text) and "<script" not in text.lower()
    # bounded: clusters x per_cluster + 2 x pairs per dedup stage + seeds and hits per seed set
    assert len(page.images) <= 2 * 4 + 4 * 2 * 3 + 2 * (2 + 2 * 3) + 2 * 3 * 2
    h3 = page.headings["h3"]
    assert "Level-1 cluster sizes" in h3 and sum(h.startswith("cluster ") for h in h3) == 2
    assert all(f"{stage}: {kind}" in h3 for stage, kind in DEDUP_KINDS.items())
    assert {"two", "five"} <= set(h3)  # one heading per seed set
    assert '<svg class="hist"' in text and text.count("<rect") >= 1


def test_report_of_a_partial_run_names_what_is_missing_and_escapes_file_names(
    small_demo: Path, tmp_path: Path, ray_local: None
) -> None:
    from lvdkit.core.settings import load_config
    from lvdkit.pipeline.config import CurateConfig
    from lvdkit.pipeline.runner import run

    pool = tmp_path / "pool"
    pool.mkdir()
    originals = sorted((small_demo / "raw").rglob("*.png"))[:6]
    for i, src in enumerate(originals):
        shutil.copy(src, pool / f"img_{i}.png")
    hostile = "<img src=x onerror=alert(1)>&\"q'.png"
    shutil.copy(originals[0], pool / hostile)  # an exact copy: shown as a dedup_exact pair
    out = tmp_path / "out"
    cfg = load_config(CurateConfig, None, [f"out={out}", f"ingest.inputs=[{pool}]", "progress=false"])
    run(cfg, ("ingest", "dedup_exact", "dedup_phash"))

    path = write_report(out)
    text = path.read_text(encoding="utf-8")
    page = Page(text)
    assert page.headings["h2"] == list(SECTION_HEADINGS)
    assert "not run yet: embed, dedup_copy, dedup_relative, cluster, retrieve, curated" in text
    for note in ("cluster has not run", "retrieve has not run", "curated has not run", "dedup_copy has not run"):
        assert note in text
    assert _funnel(page)["images in"] == 7 and _funnel(page)["dedup_exact: identical bytes"] == 1
    assert "<img src=x" not in text and "onerror=alert(1)>" not in text
    assert "&lt;img src=x onerror=alert(1)&gt;&amp;&quot;q&#x27;.png" in text
    assert len(page.images) == 2  # the one exact pair, both images readable


def test_report_of_a_folder_that_is_not_a_run_is_a_clear_error(tmp_path: Path) -> None:
    result = run_cli("report", str(tmp_path / "nope"))
    assert result.returncode == 2 and "is not a folder" in result.stderr
    (tmp_path / "empty").mkdir()
    page = Page(build_report(tmp_path / "empty"))
    assert page.headings["h2"] == list(SECTION_HEADINGS)


def _chromium(*args: str, tmp: Path) -> subprocess.CompletedProcess[str]:
    profile = tmp / "chromium-profile"
    return subprocess.run(
        [CHROMIUM, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", *args],
        capture_output=True,
        text=True,
        timeout=180,
        env={**os.environ, "HOME": str(tmp)},
    )


def test_report_renders_in_headless_chromium(run_dir: Path, tmp_path: Path) -> None:
    if not Path(CHROMIUM).exists():
        if os.environ.get("LVDKIT_REQUIRE_CHROMIUM"):
            pytest.fail(f"{CHROMIUM} is not installed (make check-report installs it)")
        pytest.skip(f"{CHROMIUM} is not installed: `apt-get install chromium` or `make check-report`")
    report = write_report(run_dir, tmp_path / "report.html")
    url = report.resolve().as_uri()
    shot = tmp_path / "report.png"
    result = _chromium(f"--screenshot={shot}", "--window-size=1200,3000", url, tmp=tmp_path)
    assert result.returncode == 0 and shot.exists(), result.stderr[-2000:]
    image = Image.open(shot).convert("RGB")
    assert image.size == (1200, 3000)
    colours = image.getcolors(maxcolors=1 << 20)
    assert colours is None or len(colours) > 50  # text, bars and thumbnails, not a blank page
    dom = _chromium("--dump-dom", url, tmp=tmp_path)
    assert dom.returncode == 0, dom.stderr[-2000:]
    assert all(f"<h2>{h}</h2>" in dom.stdout for h in SECTION_HEADINGS)
    assert dom.stdout.count("<img ") == len(Page(report.read_text(encoding="utf-8")).images)
    if os.environ.get("LVDKIT_REPORT_SCREENSHOT"):  # keep the screenshot to look at
        shutil.copy(shot, os.environ["LVDKIT_REPORT_SCREENSHOT"])
