"""TODO docstring (cli.plot, split from plot.py)."""

from __future__ import annotations

from streamcoadd.analysis.plot import KINDS, _mpl, make_figure, save


def cmd_plot(args) -> int:
    _mpl()  # fail early and plainly when matplotlib is missing
    from streamcoadd.analysis.reader import open_state

    with open_state(args.state) as st:
        fig = make_figure(args.kind, st, args.band, args.tract, args.patch)
        out = save(fig, args.out, args.dpi)
    print(f"wrote {out} ({args.kind})")
    return 0


def register(subparsers) -> None:
    from streamcoadd.cli.options import parse_pair

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
    s.set_defaults(func=cmd_plot)
