"""``streamcoadd finalize``: write coadd FITS files from a state (read-only).

Options of later output formats (``--format``, ``--butler``) are added in ``register``
and dispatched in ``cmd_finalize``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from streamcoadd.analysis.finalize import file_stem, finalize_patch
from streamcoadd.analysis.reader import open_state
from streamcoadd.cli.options import add_priority_option, parse_pair
from streamcoadd.core.errors import NoWorkFound

EXIT_USAGE = 2  # as argparse and UserError


def register(subparsers) -> argparse.ArgumentParser:
    """Add ``finalize`` to the ``streamcoadd`` sub-command parsers."""
    s = subparsers.add_parser("finalize", help="write coadd FITS files from the state")
    s.add_argument("state")
    s.add_argument("--out", required=True)
    s.add_argument("--tract", type=int)
    s.add_argument("--patch", type=parse_pair, help="X,Y")
    s.add_argument("--cell", type=parse_pair, help="X,Y (one cell; with --patch)")
    s.add_argument("--band")
    s.add_argument("--workers", type=int,
                   help="processes finalizing cells in parallel (default: cores, at most 4)")
    add_priority_option(s)
    s.set_defaults(func=cmd_finalize)
    return s


def cmd_finalize(args: argparse.Namespace) -> int:
    """Finalize every populated cell matching ``--tract/--patch/--cell/--band`` into
    ``--out``; exit 3 (``NoWorkFound``) when nothing matches."""
    if args.cell and not args.patch:
        print("streamcoadd: error: --cell needs --patch", file=sys.stderr)
        return EXIT_USAGE
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    written = 0
    with open_state(args.state) as st:
        for band in [args.band] if args.band else st.bands():
            for patch in st.patches(band):
                written += _finalize_one(st, args, out, patch, band)
    if not written:
        raise NoWorkFound("no populated cell matches the selection; nothing finalized "
                          "(ingest warps first, or check --tract/--patch/--cell/--band)")
    return 0


def _finalize_one(st, args: argparse.Namespace, out: Path, patch, band: str) -> int:
    """Finalize the selected cells of one patch and band; returns how many were written."""
    if args.tract is not None and patch.tract != args.tract:
        return 0
    if args.patch and (patch.x, patch.y) != tuple(args.patch):
        return 0
    cells = st.populated_cells(band, patch)
    if args.cell:
        cells = [c for c in cells if (c.x, c.y) == tuple(args.cell)]
    if not cells:
        return 0
    stem = out / file_stem(patch, band)
    n = finalize_patch(st.store, st.skymap.name, patch, band, cells, stem,
                       stitched=not args.cell, workers=args.workers)
    if n:
        print(f"{patch} band {band}: {n} cell(s) -> {stem.name}_*.fits")
    return n
