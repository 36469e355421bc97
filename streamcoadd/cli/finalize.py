"""``streamcoadd finalize``: write coadd FITS files from a state (read-only).

Options of later output formats (``--format``, ``--butler``) are added in ``register``
and dispatched in ``cmd_finalize``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from streamcoadd.analysis.finalize import export_cell_coadd, file_stem, finalize_patch
from streamcoadd.analysis.reader import open_state
from streamcoadd.cli.options import add_priority_option, parse_pair
from streamcoadd.core.errors import NoWorkFound
from streamcoadd.io.butler import (
    DEFAULT_COLLECTION,
    DEFAULT_DATASET_TYPE,
    CoaddFile,
    put_coadds,
    require_butler,
)
from streamcoadd.io.lsst_images import require_lsst

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
    add_rubin_options(s)
    s.set_defaults(func=cmd_finalize)
    return s


def cmd_finalize(args: argparse.Namespace) -> int:
    """Finalize every populated cell matching ``--tract/--patch/--cell/--band`` into
    ``--out``; exit 3 (``NoWorkFound``) when nothing matches."""
    if args.cell and not args.patch:
        print("streamcoadd: error: --cell needs --patch", file=sys.stderr)
        return EXIT_USAGE
    if rubin_requested(args):
        return cmd_finalize_rubin(args)
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


# ------------------------------------------------------------------ Rubin formats
# --format lsst-images writes one lsst.images CellCoadd per patch and band; --butler also
# ingests them into a data butler (docs/file-formats.md, docs/analysis.md).

FORMATS = ("fits", "lsst-images")
COMPRESSIONS = ("lossless", "none", "lossy16")


def add_rubin_options(s: argparse.ArgumentParser) -> None:
    """The options of the Rubin outputs (``--format``, ``--compression``, ``--butler``,
    ``--collection``, ``--dataset-type``)."""
    s.add_argument("--format", choices=FORMATS, default=None,
                   help="fits: streamcoadd's cells and stitched FITS files (default); "
                        "lsst-images: one Rubin CellCoadd file per patch and band "
                        "(Python >= 3.12, pip install 'streamcoadd[rubin]')")
    s.add_argument("--compression", choices=COMPRESSIONS, default="lossless",
                   help="lsst-images pixel compression (default lossless; lossy16: "
                        "Rubin's quantized q=16 on image, variance and noise)")
    s.add_argument("--butler", metavar="REPO",
                   help="also put the CellCoadd files into this data butler repository "
                        "(created if missing; implies --format lsst-images)")
    s.add_argument("--collection", default=DEFAULT_COLLECTION,
                   help=f"CHAINED collection the new run is put first in "
                        f"(default {DEFAULT_COLLECTION})")
    s.add_argument("--dataset-type", default=DEFAULT_DATASET_TYPE,
                   help=f"butler dataset type (default {DEFAULT_DATASET_TYPE})")


def rubin_requested(args: argparse.Namespace) -> bool:
    return getattr(args, "format", None) == "lsst-images" or bool(getattr(args, "butler", None))


def cmd_finalize_rubin(args: argparse.Namespace) -> int:
    """``--format lsst-images`` / ``--butler``: CellCoadd files in ``--out``, then (with
    ``--butler``) one new run in the repository."""
    if args.format == "fits":
        print("streamcoadd: error: --butler stores Rubin CellCoadd files: use "
              "--format lsst-images (or leave --format out)", file=sys.stderr)
        return EXIT_USAGE
    if args.cell:
        print("streamcoadd: error: --cell writes the FITS cells file only; a CellCoadd "
              "holds a whole patch (drop --cell, or use --format fits)", file=sys.stderr)
        return EXIT_USAGE
    if args.butler:
        require_butler()
    require_lsst()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    with open_state(args.state) as st:
        skymap = st.skymap
        for band in [args.band] if args.band else st.bands():
            for patch in st.patches(band):
                if args.tract is not None and patch.tract != args.tract:
                    continue
                if args.patch and (patch.x, patch.y) != tuple(args.patch):
                    continue
                got = export_cell_coadd(st.store, skymap.name, patch, band,
                                        st.populated_cells(band, patch), out,
                                        args.compression)
                if got is not None:
                    print(f"{patch} band {band}: {got.n_cells} cell(s) -> {got.path.name}")
                    written.append(got)
    if not written:
        raise NoWorkFound("no populated cell matches the selection; nothing finalized "
                          "(ingest warps first, or check --tract/--patch/--band)")
    if args.butler:
        filters: dict = {}
        for w in written:
            for inst, pf in w.filters:
                filters.setdefault(inst, {})[pf] = w.band
        res = put_coadds(args.butler, [CoaddFile(w.path, w.patch.tract, w.patch_id, w.band)
                                       for w in written],
                         skymap=skymap, filters=filters, collection=args.collection,
                         dataset_type=args.dataset_type)
        print(f"butler {args.butler}: {len(res.refs)} {args.dataset_type} dataset(s) in "
              f"run {res.run}, first in collection {res.collection}")
    return 0
