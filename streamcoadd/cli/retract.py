"""``streamcoadd retract``: remove a visit's contribution from every cell it touched."""

from __future__ import annotations

import argparse

from streamcoadd.pipeline.retract import retract
from streamcoadd.store.state import StateStore


def register(subparsers) -> argparse.ArgumentParser:
    """Add ``retract`` to the ``streamcoadd`` sub-command parsers."""
    s = subparsers.add_parser("retract", help="remove a visit's contribution from every cell")
    s.add_argument("state")
    s.add_argument("--visit", type=int, required=True)
    s.add_argument("--detector", type=int)
    s.add_argument("--tract", type=int)
    s.add_argument("--reason", default="", help="logged in the state (status shows it)")
    s.add_argument("--file", action="append", default=[],
                   help="the warp file, if it is no longer where it was folded from")
    s.add_argument("--search", action="append", default=[],
                   help="directory to look for the warp file in (e.g. done/)")
    s.set_defaults(func=cmd_retract)
    return s


def cmd_retract(args: argparse.Namespace) -> int:
    """Retract ``--visit`` (optionally one ``--detector`` / ``--tract``) and report."""
    with StateStore.open(args.state, write=True) as store:
        rep = retract(store, args.visit, args.detector, args.tract, args.reason,
                      args.file, args.search)
    for r in rep.warps:
        print(f"retracted visit {r.visit} detector {r.detector} (tract {r.tract}, band {r.band})")
    print(f"{len(rep.warps)} warp(s) retracted from {rep.cells} cell(s)")
    return 0
