"""Science validation: do the stars in a cell coadd have the shape of the cell's coadd PSF?

For every truth star whose measurement stamp lies in the inner box of a populated cell, we
measure GalSim HSM adaptive moments (``T = Ixx + Iyy`` in px², distortions ``e1``, ``e2``) of

* the star in the streamcoadd cell coadd (bad pixels interpolated in each warp),
* the star in a *naive* coadd of the same inputs with the same weights, computed here in
  numpy, where bad pixels are excluded per pixel instead of interpolated,
* the cell's coadd PSF, and (a sensitivity check) the unweighted mean of the inputs' PSFs,

all on stamps of ``2 * half + 1`` px centred on the star's nearest pixel (the PSF stamps on
their centre pixel). HSM fits the centroid, and T, e are shift invariant, so the sub-pixel
offset of a star matters only through pixel sampling: for FWHM >= 0.6" at 0.2"/px that is
below 3e-5 in dT/T and de (checked in ``docs/science.md``).

Needs GalSim (``pip install 'streamcoadd[sim]'``).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from astropy.table import Table

from .errors import UserError
from .masks import bitmask
from .psf import resize_stamp
from .warp import read_warp

FLAG_PLANES = ("INTRP", "INEXACT_PSF", "SAT", "NO_DATA")


def hsm_moments(stamp: np.ndarray) -> tuple[float, float, float]:
    """HSM adaptive moments of a 2-D stamp: ``(T, e1, e2)``, T in px², e distortions
    (``T = 2 sigma² / sqrt(1 - e²)``). NaNs if HSM fails."""
    from .simulate import _galsim

    galsim = _galsim()
    res = galsim.hsm.FindAdaptiveMom(galsim.Image(np.asarray(stamp, np.float64), scale=1.0),
                                     strict=False)
    if res.moments_status != 0:
        return (np.nan, np.nan, np.nan)
    e1, e2 = res.observed_shape.e1, res.observed_shape.e2
    return (2 * res.moments_sigma**2 / np.sqrt(1 - e1**2 - e2**2), e1, e2)


def load_warps(paths, skymap) -> dict:
    """``{(visit, detector): Warp}`` of the given warp files (validated)."""
    out = {}
    for p in paths:
        w = read_warp(p, skymap)
        out[(w.id.visit, w.id.detector)] = w
    return out


def naive_coadd(cell, warps: dict, bad_planes) -> np.ndarray:
    """Per-pixel-masked weighted mean of the cell's contributors over its outer box:
    ``sum(w I good) / sum(w good)`` with good = has data and no bad plane; NaN where no input
    is good. Same inputs and weights as the cell coadd, no interpolation."""
    box = cell.outer_box
    num, den = np.zeros(box.shape), np.zeros(box.shape)
    bad = bitmask(bad_planes) | bitmask(["NO_DATA"])
    for r in cell.contributors:
        w = warps[(int(r["visit"]), int(r["detector"]))]
        part = box.intersection(w.box)
        ws, cs = part.slices(w.xy0), part.slices((box.x0, box.y0))
        good = (w.mask[ws] & bad) == 0
        num[cs] += np.where(good, w.image[ws], 0.0) * r["weight"]
        den[cs] += good * r["weight"]
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, num / den, np.nan)


def measure(state, sim_dir, band: str = "r", half: int = 12) -> Table:
    """One row per truth star measured (each star once, in the first cell that holds it).

    ``state``: an open state (``streamcoadd.open_state``); ``sim_dir``: the simulation
    (``truth.fits``, ``warps/``). Columns: ``id``, ``x``, ``y``, ``cell``, ``n_inputs``,
    ``flagged`` (a FLAG_PLANES bit in the coadd stamp), ``near_masked`` (an input has a bad
    pixel in the stamp), ``r_masked`` (px from the star to the nearest such pixel, inf if
    none), and for ``ours``, ``naive``, ``eqw`` (star vs the equal-weight PSF mean):
    ``dT_<k>`` (relative), ``de1_<k>``, ``de2_<k>``; ``T_psf`` (px²).
    """
    sim_dir = Path(sim_dir)
    truth = Table.read(sim_dir / "truth.fits")
    stars = truth[truth["type"] == "star"]
    if len(stars) == 0:
        raise UserError(f"{sim_dir}/truth.fits has no stars")
    warps = load_warps(sorted((sim_dir / "warps").glob("*.fits")), state.skymap)
    bad_planes = state.fold.bad_planes
    flag_bits = bitmask(FLAG_PLANES)
    bad_bits = bitmask(bad_planes)
    ix = np.floor(np.asarray(stars["x"]) + 0.5).astype(int)
    iy = np.floor(np.asarray(stars["y"]) + 0.5).astype(int)
    done, rows = set(), []
    for cid in state.populated_cells(band):
        inner = state.skymap.tract(cid.patch.tract).cell_inner_box(cid)
        inside = np.nonzero((ix - half >= inner.x0) & (ix + half < inner.x1)
                            & (iy - half >= inner.y0) & (iy + half < inner.y1))[0]
        todo = [k for k in inside if int(stars["id"][k]) not in done]
        if not todo:
            continue
        cell = state.cell(cid, band)
        if cell is None:
            continue
        naive = naive_coadd(cell, warps, bad_planes)
        c = state.fold.psf_size // 2
        psf = cell.psf[c - half:c + half + 1, c - half:c + half + 1]
        stamps = [resize_stamp(warps[(int(r["visit"]), int(r["detector"]))].psf.at(
            *state.skymap.tract(cid.patch.tract).cell_centre(cid)), state.fold.psf_size)
            for r in cell.contributors]
        eqw = np.mean(stamps, axis=0)[c - half:c + half + 1, c - half:c + half + 1]
        m_psf, m_eqw = hsm_moments(psf), hsm_moments(eqw)
        for k in todo:
            done.add(int(stars["id"][k]))
            sl = np.s_[iy[k] - half - cell.outer_box.y0:iy[k] + half + 1 - cell.outer_box.y0,
                       ix[k] - half - cell.outer_box.x0:ix[k] + half + 1 - cell.outer_box.x0]
            r_masked = _distance_to_bad(cell, warps, bad_bits, ix[k], iy[k], half)
            row = {"id": int(stars["id"][k]), "x": float(stars["x"][k]),
                   "y": float(stars["y"][k]), "cell": str(cid), "n_inputs": cell.n_inputs,
                   "flagged": bool((cell.mask[sl] & flag_bits).any()),
                   "near_masked": bool(np.isfinite(r_masked)), "r_masked": r_masked,
                   "T_psf": m_psf[0]}
            m_ours = hsm_moments(cell.image[sl])
            m_naive = hsm_moments(naive[sl]) if np.isfinite(naive[sl]).all() else (np.nan,) * 3
            for name, star, ref in (("ours", m_ours, m_psf), ("naive", m_naive, m_psf),
                                    ("eqw", m_ours, m_eqw)):
                row[f"dT_{name}"] = star[0] / ref[0] - 1
                row[f"de1_{name}"] = star[1] - ref[1]
                row[f"de2_{name}"] = star[2] - ref[2]
            rows.append(row)
    return Table(rows=rows)


def _distance_to_bad(cell, warps, bad_bits, x, y, half) -> float:
    """Distance (px) from (x, y) to the nearest bad pixel of any contributor within the
    stamp of half-size ``half``; inf if none."""
    box_x0, box_y0 = x - half, y - half
    best = np.inf
    yy, xx = np.mgrid[-half:half + 1, -half:half + 1]
    for r in cell.contributors:
        w = warps[(int(r["visit"]), int(r["detector"]))]
        sl = np.s_[box_y0 - w.xy0[1]:box_y0 - w.xy0[1] + 2 * half + 1,
                   box_x0 - w.xy0[0]:box_x0 - w.xy0[0] + 2 * half + 1]
        bad = (w.mask[sl] & bad_bits) != 0
        if bad.any():
            best = min(best, float(np.hypot(xx[bad], yy[bad]).min()))
    return best


def summarize(t: Table) -> dict:
    """Medians of |dT/T|, |de1|, |de2| for the clean stars (ours, equal-weight PSF) and for
    the stars near masked pixels (ours, naive)."""
    clean = t[~t["flagged"]]
    near = t[t["near_masked"]]
    out = {"n_stars": len(t), "n_clean": len(clean), "n_near_masked": len(near)}
    for label, sub, kinds in (("clean", clean, ("ours", "eqw")),
                              ("near_masked", near, ("ours", "naive"))):
        for k in kinds:
            for q in ("dT", "de1", "de2"):
                v = np.abs(np.asarray(sub[f"{q}_{k}"], float))
                v = v[np.isfinite(v)]
                out[f"{label}_{k}_{q}"] = float(np.median(v)) if v.size else np.nan
    return out
