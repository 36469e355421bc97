"""The package's shape is checked, not hoped for (docs/architecture.md).

* the import-linter contracts of pyproject.toml: layers follow the data flow, the core does
  no I/O, only the store touches HDF5 and SQLite, no import cycles among a layer's modules;
* no private name (a leading underscore) imported from another module;
* imports inside functions only for optional heavy dependencies;
* no class over ~300 lines.
"""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "streamcoadd"
# Imported lazily on purpose: the optional extras (GalSim, matplotlib, Dask, lsst, tqdm),
# and heavy sub-packages a command may never touch (each costs 0.1 - 0.3 s of start-up
# over numpy + h5py + astropy.io.fits, measured; the daemon and ingest never need them).
LAZY_OK = ("galsim", "matplotlib", "dask", "distributed", "lsst", "tqdm",
           "astropy.coordinates", "astropy.nddata", "astropy.table", "astropy.visualization",
           "astropy.time", "astropy.units", "astropy.stats", "scipy.spatial", "scipy.ndimage",
           "scipy")
# The package's own lazy attribute: ``streamcoadd.open_state`` loads the reader API on
# first use, so that ``import streamcoadd`` stays cheap for the writers.
LAZY_OK_IN = {("streamcoadd/__init__.py", "streamcoadd.analysis")}
MAX_CLASS_LINES = 300
MAX_FUNCTION_LINES = 60


def modules():
    return sorted(p for p in PACKAGE.rglob("*.py"))


def _lint_imports() -> str | None:
    exe = Path(sys.executable).parent / "lint-imports"
    return str(exe) if exe.exists() else shutil.which("lint-imports")


def test_import_contracts_hold():
    exe = _lint_imports()
    if exe is None:
        pytest.skip("import-linter is not installed (pip install -e '.[test]')")
    r = subprocess.run([exe, "--no-cache"], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]


def _module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
    return ".".join(parts)


def test_no_private_name_imported_across_modules():
    bad = []
    for path in modules():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and \
                    node.module.startswith("streamcoadd"):
                for alias in node.names:
                    if alias.name.startswith("_") and alias.name != "__version__":
                        bad.append(f"{path.relative_to(ROOT)}:{node.lineno} {alias.name} "
                                   f"from {node.module}")
                if any(part.startswith("_") for part in node.module.split(".")):
                    bad.append(f"{path.relative_to(ROOT)}:{node.lineno} module {node.module}")
    assert not bad, "private names imported across modules:\n" + "\n".join(bad)


def test_imports_inside_functions_only_for_optional_dependencies():
    bad = []
    for path in modules():
        tree = ast.parse(path.read_text())
        for fn in ast.walk(tree):
            if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            for node in ast.walk(fn):
                if isinstance(node, ast.Import):
                    names = [a.name for a in node.names]
                elif isinstance(node, ast.ImportFrom):
                    names = [node.module or "."]
                else:
                    continue
                for name in names:
                    where = (str(path.relative_to(ROOT)), name)
                    if not name.startswith(LAZY_OK) and where not in LAZY_OK_IN:
                        bad.append(f"{path.relative_to(ROOT)}:{node.lineno} {name}")
    assert not bad, "imports inside functions (not an optional dependency):\n" + "\n".join(bad)


def test_no_class_over_300_lines():
    big = []
    for path in modules():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ClassDef):
                n = node.end_lineno - node.lineno + 1
                if n > MAX_CLASS_LINES:
                    big.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name}: {n} lines")
    assert not big, "classes over ~300 lines:\n" + "\n".join(big)


def test_every_layer_says_what_it_owns():
    for layer in ("core", "io", "store", "pipeline", "analysis", "service", "cli"):
        doc = ast.get_docstring(ast.parse((PACKAGE / layer / "__init__.py").read_text()))
        assert doc and "TODO" not in doc and "import" in doc, f"{layer}/__init__.py docstring"


def test_long_functions_say_why():
    """A function over ~60 lines carries a ``# Long because ...`` comment above it."""
    silent = []
    for path in modules():
        lines = path.read_text().splitlines()
        for node in ast.walk(ast.parse("\n".join(lines))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and \
                    node.end_lineno - node.lineno + 1 > MAX_FUNCTION_LINES:
                first = min([node.lineno] + [d.lineno for d in node.decorator_list]) - 1
                above = "\n".join(lines[max(0, first - 4):first])
                if "# Long because" not in above:
                    silent.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name}")
    assert not silent, "functions over ~60 lines without a reason:\n" + "\n".join(silent)
