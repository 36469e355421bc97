"""What many test modules share: the repository root, the demo skymap (a small cell
skymap, config/skymap-demo.toml) and its tract. Fixtures live in ``conftest.py``."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

import pytest

from streamcoadd.core.skymap import load_skymap

ROOT = Path(__file__).resolve().parent.parent
SKYMAP_FILE = ROOT / "config" / "skymap-demo.toml"
SKYMAP = load_skymap(SKYMAP_FILE)
TRACT = SKYMAP.tract(0)


def skip_module_without_rubin() -> None:
    """Skip the calling test module, with one line saying why, where Rubin's packages
    (lsst-images, lsst-daf-butler, and the requests lsst-resources needs) cannot run."""
    if sys.version_info < (3, 12):
        pytest.skip("lsst-images and lsst-daf-butler need Python >= 3.12",
                    allow_module_level=True)
    for name in ("lsst.images", "lsst.daf.butler", "requests"):
        try:
            importlib.import_module(name)
        except ImportError as e:
            pytest.skip(f"lsst-images / lsst-daf-butler not installed ({e}): pip install "
                        "'streamcoadd[rubin]'", allow_module_level=True)
