"""``streamcoadd simulate``: write simulated warps (GalSim), a skymap and a truth catalogue."""

from __future__ import annotations

import argparse
import sys

from streamcoadd.core.errors import UserError
from streamcoadd.io.simulate import simulate


def register(subparsers) -> argparse.ArgumentParser:
    """Add the ``simulate`` subcommand to an argparse ``add_subparsers()`` object."""
    p = subparsers.add_parser(
        "simulate", help="write simulated warps (GalSim) plus skymap and truth catalogue",
        description="Simulate visits of stars and galaxies with GalSim and write SPEC warps "
                    "to OUTDIR/warps, with OUTDIR/skymap.toml, truth.fits, visits.ecsv.")
    p.add_argument("outdir", help="output directory (created; must not hold warps already)")
    p.add_argument("--skymap", help="skymap TOML (default: built-in demo skymap)")
    p.add_argument("--tract", type=int, help="tract id (default: the first of the skymap)")
    p.add_argument("--visits", type=int, default=6, help="number of visits (default 6)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--band", default="r", help="band name (default r)")
    p.add_argument("--detectors", type=int, default=2, help="detectors per visit (default 2)")
    p.add_argument("--noise-realizations", type=int, default=0,
                   help="NOISEk HDUs per warp (default 0)")
    p.add_argument("--no-psf-grid", action="store_true",
                   help="one PSF per visit instead of a per-cell PSF grid")
    p.add_argument("--stars-only", action="store_true",
                   help="one isolated star per cell, no galaxies (for PSF validation)")
    p.add_argument("--high-snr", action="store_true", help="noise x 0.01")
    p.add_argument("--no-defects", action="store_true", help="no bad pixels, CRs, etc.")
    p.add_argument("--overwrite", action="store_true", help="replace existing warps in OUTDIR")
    p.set_defaults(func=cmd_simulate)
    return p


def cmd_simulate(args: argparse.Namespace) -> int:
    """Handler of ``streamcoadd simulate``; returns the exit code."""
    try:
        s = simulate(args.outdir, skymap=args.skymap, visits=args.visits, seed=args.seed,
                     band=args.band, detectors=args.detectors, psf_grid=not args.no_psf_grid,
                     noise_realizations=args.noise_realizations, stars_only=args.stars_only,
                     defects=not args.no_defects, high_snr=args.high_snr, tract=args.tract,
                     overwrite=args.overwrite, progress=print)
    except UserError as e:
        print(f"streamcoadd simulate: error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {len(s['warps'])} warps ({s['visits']} visits, {s['n_stars']} stars, "
          f"{s['n_galaxies']} galaxies) to {s['outdir']}/warps in {s['seconds']:.1f} s; "
          f"skymap {s['outdir']}/skymap.toml, truth {s['outdir']}/truth.fits")
    return 0
