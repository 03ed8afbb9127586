"""The layering rules, read from every module's imports (ast), and the size limits of source files and functions.

Layers (README, Architecture): ``lvdkit.core`` is the base and imports no other lvdkit package; stage code
(``curation``, ``embeddings``, ``cluster``) never imports the runner (``pipeline``); ``cluster`` never imports
``curation``; ``pretrain`` imports neither ``curation`` nor ``pipeline``.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "lvdkit"
PACKAGES = ("core", "curation", "embeddings", "cluster", "pipeline", "pretrain", "report")

# (importing package, imported package): forbidden edges
FORBIDDEN = {
    **{("core", p): "the base layer imports no other lvdkit package" for p in PACKAGES if p != "core"},
    **{(p, "pipeline"): "stage code never imports the runner" for p in ("curation", "embeddings", "cluster")},
    ("cluster", "curation"): "cluster never imports curation",
    ("pretrain", "curation"): "training never imports curation",
    ("pretrain", "pipeline"): "training never imports the curation runner",
}
MAX_FILE_LINES = 400
MAX_FUNCTION_LINES = 80


def package_of(module: str) -> str | None:
    """``lvdkit.X.y`` -> ``X`` for the packages above; None for top-level modules (cli, demo, ...) and others."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[0] == "lvdkit" and parts[1] in PACKAGES else None


def imported_modules(source: str, module: str) -> set[str]:
    """Every lvdkit module ``source`` (the text of ``module``) imports, anywhere in the file (functions and
    ``TYPE_CHECKING`` blocks included), with relative imports resolved."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = module.split(".")[: -node.level]
                base = ".".join([*anchor, base] if base else anchor)
            found.add(base)
            found.update(f"{base}.{a.name}" for a in node.names)  # ``from lvdkit import schema`` names a module
    return {m for m in found if m == "lvdkit" or m.startswith("lvdkit.")}


def violations(source: str, module: str) -> list[str]:
    """The forbidden edges ``module`` (with text ``source``) has, each with the rule it breaks."""
    mine = package_of(module)
    out = []
    for target in sorted(imported_modules(source, module)):
        theirs = package_of(target)
        if mine == "core" and theirs is None and target not in ("lvdkit",) and not target.startswith("lvdkit.core"):
            out.append(f"{module} imports {target}: the base layer imports no other lvdkit module")
        rule = FORBIDDEN.get((mine or "", theirs or ""))
        if rule:
            out.append(f"{module} imports {target}: {rule}")
    return out


def _modules() -> list[tuple[str, Path]]:
    return [
        (".".join(("lvdkit", *p.relative_to(SRC).with_suffix("").parts)).removesuffix(".__init__"), p)
        for p in sorted(SRC.rglob("*.py"))
    ]


def test_no_module_imports_across_a_forbidden_edge() -> None:
    broken = [v for module, path in _modules() for v in violations(path.read_text(), module)]
    assert not broken, "\n".join(broken)


@pytest.mark.parametrize(
    ("module", "line"),
    [
        ("lvdkit.core.io", "from lvdkit.pipeline.manifest import success"),
        ("lvdkit.core.views", "from lvdkit import demo"),
        ("lvdkit.cluster.kmeans", "from lvdkit.curation.ingest import IngestConfig"),
        ("lvdkit.curation.dedup_copy", "import lvdkit.pipeline.runner"),
        ("lvdkit.embeddings.stage", "from ..pipeline import faults"),
        ("lvdkit.pretrain.evaluate", "    from lvdkit.curation.ingest import list_for_ingest"),
        ("lvdkit.pretrain.run", "from lvdkit.pipeline.names import CURATE_ORDER"),
    ],
)
def test_the_checker_catches_a_deliberately_added_forbidden_import(module: str, line: str) -> None:
    source = f"def f():\n{line}\n" if line.startswith(" ") else f"{line}\n"
    assert violations(source, module), f"{line!r} in {module} should break a rule"


def test_allowed_imports_pass_the_checker() -> None:
    assert not violations("from lvdkit.core import schema\nfrom lvdkit.core.io import read_parts\n", "lvdkit.core.x")
    assert not violations("from lvdkit.core.views import alive\n", "lvdkit.curation.x")
    assert not violations("from lvdkit.embeddings import create_embedder\n", "lvdkit.pretrain.x")
    assert not violations("from lvdkit.curation.ingest import IngestConfig\n", "lvdkit.pipeline.x")


def test_pretraining_config_imports_where_faiss_cannot() -> None:
    """A training image need not carry Faiss: importing the pretraining config loads no curation code."""
    code = (
        "import sys; sys.modules['faiss'] = None\n"  # any `import faiss` now raises ImportError
        "import lvdkit.pretrain.config\n"
        "bad = [m for m in sys.modules if m.startswith(('lvdkit.curation', 'lvdkit.pipeline'))]\n"
        "assert not bad, bad\n"
        "print('ok')"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr


def test_no_source_file_over_400_lines_and_no_function_over_80() -> None:
    long_files, long_functions = [], []
    for module, path in _modules():
        text = path.read_text()
        if text.count("\n") > MAX_FILE_LINES:
            long_files.append(f"{module}: {text.count(chr(10))} lines")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = (node.end_lineno or node.lineno) - node.lineno + 1
                if n > MAX_FUNCTION_LINES:
                    long_functions.append(f"{module}.{node.name}: {n} lines")
    assert not long_files and not long_functions, "\n".join(long_files + long_functions)


def test_the_curation_driver_imports_no_torch() -> None:
    """The driver of `lvdkit curate` holds metadata: torch (about 450 MB resident) loads only in the workers that
    run models (a module-level torch import on the way once raised the driver's RSS from 278 to 751 MiB)."""
    code = "import sys, lvdkit.pipeline.runner, lvdkit.cli; print(sorted(m for m in sys.modules if m == 'torch'))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "[]", done.stdout + done.stderr
