#!/usr/bin/env python3
"""Make docs/science.png and print the numbers quoted in docs/science.md.

    python3 scripts/science_figure.py [--seed 0] [--workdir DIR] [--out docs/science.png]

Runs the science validation end to end as a user would: ``streamcoadd simulate`` (high-S/N
isolated stars, defects), ``init``, ``ingest``, then :func:`streamcoadd.analysis.science.measure`
(HSM moments of each star in its cell coadd and in a naive per-pixel-masked coadd, against
the cell's coadd PSF). Also measures the sub-pixel sampling bias of HSM on the simulator's
PSFs. Needs GalSim and matplotlib. About 20 s.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import streamcoadd  # noqa: E402
from streamcoadd.analysis.science import hsm_moments, measure, summarize  # noqa: E402

BINS = [(0, 2), (2, 4), (4, 8), (8, 18)]


def cli(*args) -> None:
    subprocess.run([sys.executable, "-m", "streamcoadd", *map(str, args)], cwd=ROOT,
                   check=True, stdout=subprocess.DEVNULL)


def subpixel_bias() -> float:
    """Largest |dT/T|, |de| between a PSF drawn centred and at sub-pixel offsets, over the
    simulator's extreme PSFs (25x25 stamps, 0.2"/px)."""
    import galsim

    worst = 0.0
    for prof in (galsim.Moffat(beta=2.5, fwhm=0.6), galsim.Kolmogorov(fwhm=0.6),
                 galsim.Moffat(beta=4.5, fwhm=1.2), galsim.Kolmogorov(fwhm=1.2)):
        prof = prof.shear(e1=0.08, e2=-0.06)
        ref = hsm_moments(prof.drawImage(nx=25, ny=25, scale=0.2, method="auto").array)
        for off in ((0.5, 0.5), (0.5, 0.0), (0.25, -0.4)):
            m = hsm_moments(prof.drawImage(nx=25, ny=25, scale=0.2, method="auto",
                                           offset=off).array)
            worst = max(worst, abs(m[0] / ref[0] - 1), abs(m[1] - ref[1]), abs(m[2] - ref[2]))
    return worst


def binned(t, col):
    """Median of |col| in the distance bins; returns (centres, medians, counts)."""
    out = []
    for lo, hi in BINS:
        sel = (t["r_masked"] >= lo) & (t["r_masked"] < hi)
        v = np.abs(np.asarray(t[col][sel], float))
        v = v[np.isfinite(v)]
        out.append((0.5 * (lo + hi), np.median(v) if v.size else np.nan, v.size))
    return np.array(out).T


def print_numbers(t, s, bias):
    clean, near = t[~t["flagged"]], t[t["near_masked"]]
    print(f"stars measured {s['n_stars']}, unflagged {s['n_clean']}, "
          f"near masked pixels {s['n_near_masked']}")
    print(f"sub-pixel sampling bias of HSM (max over PSFs and offsets): {bias:.1e}")
    print("\n| sample | coadd | median abs dT/T | median abs de1 | median abs de2 | n |")
    print("|---|---|---|---|---|---|")
    print(f"| unflagged | streamcoadd vs cell PSF | {s['clean_ours_dT']:.1e} | "
          f"{s['clean_ours_de1']:.1e} | {s['clean_ours_de2']:.1e} | {len(clean)} |")
    print(f"| unflagged | streamcoadd vs unweighted mean PSF | {s['clean_eqw_dT']:.1e} | "
          f"{s['clean_eqw_de1']:.1e} | {s['clean_eqw_de2']:.1e} | {len(clean)} |")
    for lo, hi in BINS:
        sub = near[(near["r_masked"] >= lo) & (near["r_masked"] < hi)]
        for k, label in (("ours", "streamcoadd (interpolated)"), ("naive", "naive per-pixel masked")):
            med = [np.nanmedian(np.abs(np.asarray(sub[f"{q}_{k}"], float)))
                   for q in ("dT", "de1", "de2")]
            n = int(np.isfinite(np.asarray(sub[f"dT_{k}"], float)).sum())
            print(f"| masked pixel at {lo}-{hi} px | {label} | {med[0]:.1e} | {med[1]:.1e} | "
                  f"{med[2]:.1e} | {n} |")
    edge = t[t["edge"] & ~t["near_masked"]]
    for k, label in (("ours", "streamcoadd cell coadd vs cell PSF"),
                     ("all", "classic per-pixel coadd of all warps vs its PSF at the star")):
        med = [np.nanmedian(np.abs(np.asarray(edge[f"{q}_{k}"], float)))
               for q in ("dT", "de1", "de2")]
        print(f"| warp data edge crosses the stamp | {label} | {med[0]:.1e} | {med[1]:.1e} | "
              f"{med[2]:.1e} | {len(edge)} |")
    holes = int(np.isnan(np.asarray(near["dT_naive"], float)).sum())
    print(f"\nnaive coadd has a hole (no good input) in the stamp of {holes} star(s)")


def figure(t, out: Path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    clean, near = t[~t["flagged"]], t[t["near_masked"]]
    edge = t[t["edge"] & ~t["near_masked"]]
    fig, ax = plt.subplots(2, 2, figsize=(13, 9.5))
    ax = ax.ravel()
    bins = np.logspace(-7, -0.5, 40)
    hists = ((ax[0], clean, f"(a) {len(clean)} stars without flagged pixels",
              (("dT_ours", "star vs cell coadd PSF", "C0"),
               ("dT_eqw", "star vs unweighted mean of input PSFs", "C3"))),
             (ax[1], edge, f"(b) {len(edge)} stars crossed by a warp's data edge",
              (("dT_ours", "streamcoadd cell coadd vs cell PSF", "C0"),
               ("dT_all", "classic per-pixel coadd vs its PSF at the star", "C2"))))
    for a, sub, title, series in hists:
        for col, label, c in series:
            v = np.abs(np.asarray(sub[col], float))
            a.hist(v[np.isfinite(v)], bins=bins, histtype="step", lw=2, color=c, label=label)
        a.axvline(1e-3, color="k", ls="--", lw=1)
        a.set_xscale("log")
        a.set_xlabel("|dT/T|")
        a.set_ylabel("stars")
        a.set_title(title)
        a.legend(fontsize=8, loc="upper left")
    for a, (q, name) in zip(ax[2:], (("dT", "|dT/T|"), ("de1", "|de1|"))):
        for k, label, c, m in (("ours", "streamcoadd (interpolated)", "C0", "o"),
                               ("naive", "naive per-pixel masked", "C1", "s")):
            v = np.abs(np.asarray(near[f"{q}_{k}"], float))
            jitter = 0.15 if k == "naive" else -0.15
            a.scatter(near["r_masked"] + jitter, v, s=10, color=c, alpha=0.5, marker=m)
            x, med, _ = binned(near, f"{q}_{k}")
            a.plot(x, med, color=c, marker=m, lw=2, ms=8, label=f"{label}: bin median")
        a.axhline(1e-3, color="k", ls="--", lw=1)
        a.set_yscale("log")
        a.set_ylim(1e-7, 1)
        a.set_xlabel("distance from star to nearest masked input pixel (px)")
        a.set_ylabel(f"{name} vs cell coadd PSF")
        a.set_title(f"({'c' if q == 'dT' else 'd'}) {len(near)} stars with masked input "
                    "pixels in their stamp")
        a.legend(fontsize=8, loc="upper right")
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    print(f"wrote {out}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workdir", type=Path, help="keep the simulation and state here")
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "science.png")
    args = ap.parse_args()
    tmp = None
    if args.workdir is None:
        tmp = tempfile.TemporaryDirectory()
        args.workdir = Path(tmp.name)
    sim, state = args.workdir / "sim", args.workdir / "state"
    if sim.exists() or state.exists():
        print(f"{args.workdir} already holds sim/ or state/; give a new --workdir",
              file=sys.stderr)
        return 2
    cli("simulate", sim, "--stars-only", "--high-snr", "--seed", args.seed)
    cli("init", state, "--skymap", sim / "skymap.toml")
    cli("ingest", state, sim / "warps")
    with streamcoadd.open_state(state) as st:
        t = measure(st, sim)
    print_numbers(t, summarize(t), subpixel_bias())
    args.out.parent.mkdir(parents=True, exist_ok=True)
    figure(t, args.out)
    if tmp:
        tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
