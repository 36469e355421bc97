#!/usr/bin/env python3
"""The README quick start: needs only python3.

    python3 scripts/quickstart.py demo    # the main job on simulated data
    python3 scripts/quickstart.py test    # the test suite

Both create ``.venv`` in the repository (once) and install streamcoadd with its extras
there; ``--no-venv`` uses the current interpreter instead (CI images that already have it).
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


def python_with_deps(use_venv: bool) -> str:
    if not use_venv:
        py = sys.executable
    else:
        py = str(VENV / "bin" / "python")
        if not Path(py).exists():
            print(f"creating {VENV} ...", flush=True)
            venv.EnvBuilder(with_pip=True).create(VENV)
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
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
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
