"""Science validation: do the stars in a cell coadd have the shape of the cell's coadd PSF?

For every truth star whose measurement stamp lies in the inner box of a populated cell, we
measure GalSim HSM adaptive moments (``T = Ixx + Iyy`` in px², distortions ``e1``, ``e2``) of

* the star in the streamcoadd cell coadd (bad pixels interpolated in each warp),
* the star in a *naive* coadd of the same inputs with the same weights, computed here in
  numpy, where bad pixels are excluded per pixel instead of interpolated,
* the star in a classic per-pixel coadd of *every* warp with data at each pixel (no cell
  overlap rule), against the weighted mean PSF of the warps with data at the star,
* the cell's coadd PSF, and (a sensitivity check) the unweighted mean of the inputs' PSFs,

all on stamps of ``2 * half + 1`` px centred on the star's nearest pixel (the PSF stamps on
their centre pixel). HSM fits the centroid, and T, e are shift invariant, so the sub-pixel
offset of a star matters only through pixel sampling: for FWHM >= 0.6" at 0.2"/px that is
below 4e-5 in dT/T and de (``scripts/science_figure.py`` measures it).

Needs GalSim (``pip install 'streamcoadd[sim]'``).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from astropy.table import Table

from streamcoadd.core.errors import UserError
from streamcoadd.core.fold import warp_weight
from streamcoadd.core.masks import bitmask
from streamcoadd.core.psf import resize_stamp
from streamcoadd.core.skymap import Box
from streamcoadd.io.simulate import galsim_module
from streamcoadd.io.warp_reader import read_warp

FLAG_PLANES = ("INTRP", "INEXACT_PSF", "SAT", "NO_DATA")


def hsm_moments(stamp: np.ndarray) -> tuple[float, float, float]:
    """HSM adaptive moments of a 2-D stamp: ``(T, e1, e2)``, T in px², e distortions
    (``T = 2 sigma² / sqrt(1 - e²)``). NaNs if HSM fails."""
    galsim = galsim_module()
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


def naive_coadd(box, inputs, bad_planes) -> np.ndarray:
    """Per-pixel-masked weighted mean over ``box`` (float64, NaN where no input is good):
    ``sum(w I good) / sum(w good)``, good = has data and no bad plane; no interpolation.
    ``inputs``: list of (Warp, weight)."""
    num, den = np.zeros(box.shape), np.zeros(box.shape)
    bad = bitmask(bad_planes) | bitmask(["NO_DATA"])
    for w, weight in inputs:
        part = box.intersection(w.box)
        if part.empty:
            continue
        ws, cs = part.slices(w.xy0), part.slices((box.x0, box.y0))
        good = (w.mask[ws] & bad) == 0
        num[cs] += np.where(good, w.image[ws], 0.0) * weight
        den[cs] += good * weight
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, num / den, np.nan)


def _crop(stamp, size, half):
    c = size // 2
    return resize_stamp(stamp, size)[c - half:c + half + 1, c - half:c + half + 1]


# Long because one pass over the stars; each column of the measurement table is computed
# where its inputs are at hand.
def measure(state, sim_dir, band: str = "r", half: int = 12) -> Table:
    """One row per truth star measured (each star once, in the first cell that holds it).

    ``state``: an open state (``streamcoadd.open_state``); ``sim_dir``: the simulation
    (``truth.fits``, ``warps/``). Columns: ``id``, ``x``, ``y``, ``cell``, ``n_inputs``,
    ``flagged`` (a FLAG_PLANES bit in the coadd stamp), ``near_masked`` (an input has a bad
    pixel in the stamp), ``r_masked`` (px from the star to the nearest such pixel, inf if
    none), ``edge`` (a warp's data boundary crosses the stamp), ``T_psf`` (px²), and
    ``dT_<k>`` (relative), ``de1_<k>``, ``de2_<k>`` for

    * ``ours``: the star in the cell coadd vs the cell coadd PSF;
    * ``eqw``: the same star vs the unweighted mean of the inputs' PSFs (sensitivity check);
    * ``naive``: the star in the naive coadd of the cell's inputs vs the cell coadd PSF;
    * ``all``: the star in a naive coadd of *every* warp with data at each pixel (no cell
      overlap rule, like a classic per-pixel coadd) vs the weighted mean PSF of the warps
      with good data at the star (what a classic CoaddPsf gives there).
    """
    sim_dir = Path(sim_dir)
    truth = Table.read(sim_dir / "truth.fits")
    stars = truth[truth["type"] == "star"]
    if len(stars) == 0:
        raise UserError(f"{sim_dir}/truth.fits has no stars")
    warps = load_warps(sorted((sim_dir / "warps").glob("*.fits")), state.skymap)
    weights = {k: warp_weight(w, state.fold) for k, w in warps.items()}
    fold, size = state.fold, state.fold.psf_size
    flag_bits, bad_bits = bitmask(FLAG_PLANES), bitmask(fold.bad_planes)
    ix = np.floor(np.asarray(stars["x"]) + 0.5).astype(int)
    iy = np.floor(np.asarray(stars["y"]) + 0.5).astype(int)
    done, rows = set(), []
    for cid in state.populated_cells(band):
        tract = state.skymap.tract(cid.patch.tract)
        inner = tract.cell_inner_box(cid)
        inside = np.nonzero((ix - half >= inner.x0) & (ix + half < inner.x1)
                            & (iy - half >= inner.y0) & (iy + half < inner.y1))[0]
        todo = [k for k in inside if int(stars["id"][k]) not in done]
        cell = state.cell(cid, band) if todo else None
        if cell is None:
            continue
        keys = [(int(r["visit"]), int(r["detector"])) for r in cell.contributors]
        box = cell.outer_box
        naive = naive_coadd(box, [(warps[k], r["weight"]) for k, r in
                                  zip(keys, cell.contributors)], fold.bad_planes)
        every = naive_coadd(box, [(w, weights[k]) for k, w in warps.items()], fold.bad_planes)
        m_psf = hsm_moments(_crop(cell.psf, size, half))
        centre = tract.cell_centre(cid)
        m_eqw = hsm_moments(np.mean([_crop(warps[k].psf.at(*centre), size, half)
                                     for k in keys], axis=0))
        for k in todo:
            done.add(int(stars["id"][k]))
            stamp = Box(ix[k] - half, iy[k] - half, ix[k] + half + 1, iy[k] + half + 1)
            sl = stamp.slices((box.x0, box.y0))
            r_masked = _distance_to_bad([warps[c] for c in keys], bad_bits, stamp)
            m_all, edge = _classic_psf(warps, weights, bad_bits, stamp, size, half,
                                       float(stars["x"][k]), float(stars["y"][k]))
            row = {"id": int(stars["id"][k]), "x": float(stars["x"][k]),
                   "y": float(stars["y"][k]), "cell": str(cid), "n_inputs": cell.n_inputs,
                   "flagged": bool((cell.mask[sl] & flag_bits).any()),
                   "near_masked": bool(np.isfinite(r_masked)), "r_masked": r_masked,
                   "edge": edge, "T_psf": m_psf[0]}
            m_ours = hsm_moments(cell.image[sl])
            for name, img, ref in (("ours", None, m_psf), ("eqw", None, m_eqw),
                                   ("naive", naive[sl], m_psf), ("all", every[sl], m_all)):
                star = m_ours if img is None else _moments_or_nan(img)
                row[f"dT_{name}"] = star[0] / ref[0] - 1
                row[f"de1_{name}"] = star[1] - ref[1]
                row[f"de2_{name}"] = star[2] - ref[2]
            rows.append(row)
    return Table(rows=rows)


def _moments_or_nan(img):
    return hsm_moments(img) if np.isfinite(img).all() else (np.nan,) * 3


def _distance_to_bad(inputs, bad_bits, stamp: Box) -> float:
    """Distance (px) from the stamp centre to the nearest bad pixel of any input within the
    stamp; inf if none. Inputs cover the stamp (it lies in the cell inner box)."""
    half = stamp.width // 2
    yy, xx = np.mgrid[-half:half + 1, -half:half + 1]
    best = np.inf
    for w in inputs:
        bad = (w.mask[stamp.slices(w.xy0)] & bad_bits) != 0
        if bad.any():
            best = min(best, float(np.hypot(xx[bad], yy[bad]).min()))
    return best


def _classic_psf(warps, weights, bad_bits, stamp: Box, size, half, x, y):
    """HSM moments of the weighted mean PSF of the warps with good data at the star centre,
    and whether some warp's data boundary crosses the stamp."""
    no_data = bitmask(["NO_DATA"])
    cx, cy = stamp.x0 + half, stamp.y0 + half
    num, den, edge = 0.0, 0.0, False
    for k, w in warps.items():
        part = stamp.intersection(w.box)
        if part.empty:
            continue
        valid = (w.mask[part.slices(w.xy0)] & no_data) == 0
        if part != stamp or not valid.all():
            edge |= bool(valid.any())
        if w.box.contains(Box(cx, cy, cx + 1, cy + 1)) and \
                not w.mask[cy - w.xy0[1], cx - w.xy0[0]] & (bad_bits | no_data):
            num = num + weights[k] * _crop(w.psf.at(x, y), size, half)
            den += weights[k]
    return hsm_moments(num / den), edge


def summarize(t: Table) -> dict:
    """Medians of |dT/T|, |de1|, |de2|: unflagged stars (ours, equal-weight PSF), stars near
    masked pixels (ours, naive) and stars crossed by a warp's data edge (ours, all)."""
    clean = t[~t["flagged"]]
    near = t[t["near_masked"]]
    edge = t[t["edge"] & ~t["near_masked"]]
    out = {"n_stars": len(t), "n_clean": len(clean), "n_near_masked": len(near),
           "n_edge": len(edge)}
    for label, sub, kinds in (("clean", clean, ("ours", "eqw")),
                              ("near_masked", near, ("ours", "naive")),
                              ("edge", edge, ("ours", "all"))):
        for k in kinds:
            for q in ("dT", "de1", "de2"):
                v = np.abs(np.asarray(sub[f"{q}_{k}"], float))
                v = v[np.isfinite(v)]
                out[f"{label}_{k}_{q}"] = float(np.median(v)) if v.size else np.nan
    return out
