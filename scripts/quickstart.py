#!/usr/bin/env python3
"""The README quick start: needs only python3.

    python3 scripts/quickstart.py demo    # the main job on simulated data
    python3 scripts/quickstart.py test    # the test suite

Both create ``.venv`` in the repository (once) and install streamcoadd with its extras
there; ``--no-venv`` uses the current interpreter instead (CI images that already have it).

Which Python: the core runs on 3.10+, but Rubin's ``lsst-images`` and ``lsst-daf-butler``
(the ``CellCoadd`` and butler outputs) need 3.12+. So the venv is made with the newest
Python >= 3.12 this machine has -- this interpreter, ``python3.12``/``python3.13`` on the
PATH, or a pyenv installation; the oldest such, whose wheels are the most widely built --
and only where none exists with this one, in which case the Rubin tests are skipped with
one line saying so.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
VENV = ROOT / ".venv"
RUBIN_MIN = (3, 12)
CANDIDATES = ("python3.12", "python3.13", "python3.14")


def _version_of(python: str) -> tuple[int, int] | None:
    """(major, minor) of an interpreter that really runs (a pyenv shim that is not
    selected exits non-zero), else None."""
    try:
        out = subprocess.run([python, "-c", "import sys, venv; print(*sys.version_info[:2])"],
                             capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if out.returncode != 0:
        return None
    major, minor = out.stdout.split()
    return int(major), int(minor)


def _pyenv_pythons() -> list[str]:
    roots = [os.environ.get("PYENV_ROOT"), str(Path.home() / ".pyenv")]
    found = []
    for root in filter(None, roots):
        versions = Path(root) / "versions"
        if versions.is_dir():
            found += [str(p / "bin" / "python3") for p in sorted(versions.iterdir(), reverse=True)
                      if (p / "bin" / "python3").exists()]
    return found


def best_python() -> str:
    """The oldest interpreter >= 3.12 found, else this one."""
    if sys.version_info[:2] >= RUBIN_MIN:
        return sys.executable
    best, best_version = sys.executable, None
    for python in [*CANDIDATES, *_pyenv_pythons()]:
        v = _version_of(python)
        if v is not None and v >= RUBIN_MIN and (best_version is None or v < best_version):
            best, best_version = python, v
    return best


def python_with_deps(use_venv: bool) -> str:
    if not use_venv:
        py = sys.executable
    else:
        py = str(VENV / "bin" / "python")
        if not Path(py).exists():
            base = best_python()
            print(f"creating {VENV} with {base} ...", flush=True)
            subprocess.run([base, "-m", "venv", str(VENV)], check=True)
    stamp = Path(py).parent.parent / ".streamcoadd-installed" if use_venv else None
    pyproject = ROOT / "pyproject.toml"
    if stamp is None or not stamp.exists() or stamp.stat().st_mtime < pyproject.stat().st_mtime:
        print("installing streamcoadd and its extras (first run only) ...", flush=True)
        subprocess.run([py, "-m", "pip", "install", "--quiet", "--upgrade", "pip"], check=True)
        subprocess.run([py, "-m", "pip", "install", "--quiet", "-e", f"{ROOT}[all]"], check=True)
        if stamp is not None:
            stamp.touch()
    return py


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("what", choices=["demo", "test"])
    ap.add_argument("--no-venv", action="store_true", help="install into the current Python")
    ap.add_argument("rest", nargs=argparse.REMAINDER, help="passed on to pytest or the demo")
    args = ap.parse_args()
    py = python_with_deps(not args.no_venv)
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    if args.what == "test":
        cmd = [py, "-m", "pytest", "-q", *args.rest]
    else:
        cmd = [py, str(ROOT / "scripts" / "demo.py"), *args.rest]
    return subprocess.run(cmd, cwd=ROOT, env=env).returncode


if __name__ == "__main__":
    sys.exit(main())
