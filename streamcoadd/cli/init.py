"""``streamcoadd init``: create a state from a skymap (the fold rules are fixed here)."""

from __future__ import annotations

import argparse

from streamcoadd.core.config import FoldConfig, site_config
from streamcoadd.core.skymap import load_skymap
from streamcoadd.store.state import StateStore


def register(subparsers) -> argparse.ArgumentParser:
    """Add ``init`` to the ``streamcoadd`` sub-command parsers."""
    s = subparsers.add_parser("init", help="create a state from a skymap")
    s.add_argument("state")
    s.add_argument("--skymap", required=True, help="skymap TOML (see config/)")
    s.add_argument("--config", help="settings TOML whose [fold] table fixes the fold rules")
    s.set_defaults(func=cmd_init)
    return s


def cmd_init(args: argparse.Namespace) -> int:
    """Create ``args.state`` with the skymap and the ``[fold]`` rules of the settings."""
    skymap = load_skymap(args.skymap)
    fold = FoldConfig.from_dict(site_config(args.config).get("fold", {}))
    StateStore.create(args.state, skymap, fold)
    ntr = len(skymap.tracts)
    print(f"created state {args.state} (skymap {skymap.name!r}, {ntr} tract(s), "
          f"{skymap.cells.cells_per_patch}x{skymap.cells.cells_per_patch} cells per patch)")
    return 0
