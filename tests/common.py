"""What many test modules share: the repository root, the demo skymap (a small cell
skymap, config/skymap-demo.toml) and its tract. Fixtures live in ``conftest.py``."""

from __future__ import annotations

from pathlib import Path

from streamcoadd.core.skymap import load_skymap

ROOT = Path(__file__).resolve().parent.parent
SKYMAP_FILE = ROOT / "config" / "skymap-demo.toml"
SKYMAP = load_skymap(SKYMAP_FILE)
TRACT = SKYMAP.tract(0)
