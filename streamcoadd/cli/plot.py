"""``streamcoadd plot``: depth / weight / PSF maps or a quick-look image as a PNG."""

from __future__ import annotations

import argparse

from streamcoadd.analysis.plot import KINDS, make_figure, require_matplotlib, save
from streamcoadd.analysis.reader import open_state
from streamcoadd.cli.options import add_priority_option, parse_pair


def register(subparsers) -> argparse.ArgumentParser:
    """Add ``plot`` to the ``streamcoadd`` sub-command parsers."""
    s = subparsers.add_parser(
        "plot", help="depth / weight / PSF maps or a quick-look image as a PNG",
        description="Draw a picture of the state: 'depth' (inputs per cell), 'weight' "
                    "(effective weight per cell), 'psf' (coadd PSF FWHM and ellipticity per "
                    "cell) or 'quicklook' (the stitched coadd). Needs matplotlib.")
    s.add_argument("kind", choices=KINDS)
    s.add_argument("state")
    s.add_argument("--out", required=True, help="output image (PNG; the suffix picks the format)")
    s.add_argument("--patch", type=parse_pair, help="X,Y: one patch (default: the whole tract)")
    s.add_argument("--band", help="band (default: the only band of the state)")
    s.add_argument("--tract", type=int, help="tract id (default: the only populated tract)")
    s.add_argument("--dpi", type=int, default=150)
    add_priority_option(s)
    s.set_defaults(func=cmd_plot)
    return s


def cmd_plot(args: argparse.Namespace) -> int:
    """Draw ``args.kind`` of the state into ``--out``."""
    require_matplotlib()  # fail early and plainly when matplotlib is missing
    with open_state(args.state) as st:
        fig = make_figure(args.kind, st, args.band, args.tract, args.patch)
        out = save(fig, args.out, args.dpi)
    print(f"wrote {out} ({args.kind})")
    return 0
