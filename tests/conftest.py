"""Suite-wide set-up.

* ``--runslow`` runs the long soak/torture tests too;
* the test helpers (``tests/``: ``common``, ``reference``, ``warpgen``, ...) and the
  repository root are importable from every test module;
* ``import torture`` gives ``scripts/torture.py`` (its warp generator and fault-injection
  harness are shared by the crash, disk-full, verify and hostile-input tests).
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent
for _path in (str(TESTS), str(ROOT)):
    if _path not in sys.path:
        sys.path.insert(0, _path)

if "torture" not in sys.modules:
    _spec = importlib.util.spec_from_file_location("torture", ROOT / "scripts" / "torture.py")
    _torture = importlib.util.module_from_spec(_spec)
    sys.modules["torture"] = _torture
    _spec.loader.exec_module(_torture)


def pytest_addoption(parser):
    parser.addoption("--runslow", action="store_true", default=False,
                     help="also run long soak/torture tests (minutes to an hour)")
