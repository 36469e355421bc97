"""Simulated warps with GalSim: realistic demo data and the input of the science validation.

``simulate(outdir, ...)`` writes, for one tract of a cell-based skymap:

* ``outdir/warps/*.fits`` — SPEC §2 warps (one per visit and detector) via
  :func:`streamcoadd.io.warp_writer.write_warp`;
* ``outdir/skymap.toml`` — the skymap used;
* ``outdir/truth.fits`` — the scene: stars and galaxies, tract pixel ``x``/``y`` (0-based pixel
  centres), ``ra``/``dec`` (deg), ``flux`` (nJy), ``mag`` (AB), galaxy shape parameters;
* ``outdir/visits.ecsv`` — per visit: PSF type, FWHM (arcsec) and ellipticity at the field
  centre, pixel noise sigma (nJy), saturation level (nJy), dither and rotation;
* ``outdir/warps.ecsv`` — per warp: file, origin, shape, number of PSF stamps, the box that was
  heavily masked (if any).

Model (all on the tract pixel grid, 0-based pixel centres, arcsec via the tract pixel scale):

* **PSF**: per visit a Moffat (beta 2.5-4.5) or Kolmogorov profile, FWHM 0.6"-1.2", distortion
  |e| <= 0.1, varying linearly across the field.  The PSF is *piecewise constant on cells*: a
  source whose centre lies in a cell's inner box is drawn with the PSF evaluated at that cell's
  centre, and the warp's PSF cube holds exactly those stamps, one per cell centre (``PSFPOS``),
  so a reader taking "the stamp nearest the cell centre" gets the PSF of every source of the
  cell.  Stamps are pixel-convolved GalSim drawings (``method='auto'``), 41x41, centred on the
  central pixel, normalised to sum 1.  With ``psf_grid=False`` one PSF per visit (a 2-D stamp).
* **Footprint**: each visit is a rotated (±4°), dithered focal plane of ``detectors`` rectangular
  detectors with gaps; a warp is the bounding box of one detector's footprint, pixels outside it
  are ``NO_DATA`` (image NaN, variance inf), so some cells are only partly covered.
* **Noise**: Gaussian sky noise, sigma per visit (1 + frac(0.618 v)) x 20 nJy, a low-discrepancy
  sequence in [1, 2) so that any two visits already differ by 1.6x (weights by 2.6x, up to 4x);
  x 0.01 with ``high_snr``; variance plane = sigma^2.
* **Defects** (``defects=True``): bad columns (``BAD``), cosmic-ray tracks (``CR``), saturated
  cores with bleed trails along columns (``SAT``, bright stars), non-linear patches
  (``SUSPECT``), and in every second visit one region masking 75-100 % of a cell's inner box
  (``BAD``) to exercise the fallback rule.  Values under bad planes are finite garbage.

Deterministic given ``seed``: visit ``v`` draws from ``numpy.random.default_rng([seed, v])``;
GalSim drawing is deterministic (no photon shooting).
"""

from __future__ import annotations

import math
import shutil
import time
from pathlib import Path

import numpy as np
from astropy.table import Table

from streamcoadd.core.errors import UserError
from streamcoadd.core.masks import CANONICAL_PLANES
from streamcoadd.core.skymap import (
    Box,
    PatchId,
    SkyMap,
    Tract,
    load_skymap,
    skymap_from_dict,
)
from streamcoadd.io.warp_writer import write_warp

# Same as config/skymap-demo.toml, built in so that simulate works from an installed package.
DEMO_SKYMAP = {
    "skymap": {"name": "demo"},
    "cells": {"inner": 50, "border": 10, "cells_per_patch_inner": 6, "cells_in_patch_border": 1},
    "tract": [{"id": 0, "ra": 150.0, "dec": 2.2, "pixel_scale": 0.2, "num_patches": [2, 2]}],
}
PSF_STAMP = 41  # px, odd
MAX_REGION_PX = 2048  # larger tracts are simulated on patch (0, 0) only unless patches= is given
BASE_SIGMA = 20.0  # nJy, sky noise per pixel of the best visit
HIGH_SNR_FACTOR = 0.01  # noise scale in high_snr mode
SAT_LEVEL = 1.2e5  # nJy per pixel, typical saturation level
AB_ZERO_NJY = 3631e9  # nJy of AB magnitude 0
BIT = {name: np.int32(1 << b) for name, b in CANONICAL_PLANES.items()}


def galsim_module():
    try:
        import galsim
    except ImportError:
        raise UserError("GalSim is needed for simulate: pip install 'streamcoadd[sim]'") from None
    return galsim


def mag_to_njy(mag):
    """AB magnitude -> flux in nJy."""
    return AB_ZERO_NJY * 10.0 ** (-0.4 * np.asarray(mag, float))


# ---------------------------------------------------------------- geometry

class CellLattice:
    """The tract's cell inner boxes form one square lattice of step ``inner`` px."""

    def __init__(self, tract: Tract):
        self.step = tract.cells.inner
        ox, oy = tract.cell_grid_origin(PatchId(tract.id, 0, 0))
        self.ox, self.oy = ox % self.step, oy % self.step

    def index(self, x, y):
        """Lattice index (i, j) of the cell whose inner box holds the point (x, y) (px)."""
        i = np.floor((np.asarray(x) + 0.5 - self.ox) / self.step).astype(int)
        j = np.floor((np.asarray(y) + 0.5 - self.oy) / self.step).astype(int)
        return i, j

    def centre(self, i, j):
        """Cell centre pixel (x, y) of lattice index (i, j), as ``Tract.cell_centre``."""
        return (self.ox + np.asarray(i) * self.step + self.step // 2,
                self.oy + np.asarray(j) * self.step + self.step // 2)

    def inner_box(self, i, j) -> Box:
        x0, y0 = self.ox + i * self.step, self.oy + j * self.step
        return Box(x0, y0, x0 + self.step, y0 + self.step)

    def indices_overlapping(self, box: Box):
        """All (i, j) whose inner box overlaps ``box``, as two flat int arrays."""
        i0, j0 = self.index(box.x0, box.y0)
        i1, j1 = self.index(box.x1 - 1, box.y1 - 1)
        jj, ii = np.mgrid[j0:j1 + 1, i0:i1 + 1]
        return ii.ravel(), jj.ravel()


def _region(tract: Tract, patches) -> Box:
    """Union of the outer boxes of ``patches`` (default: all, or patch 0,0 of a big tract)."""
    if patches is None:
        patches = list(tract.patches())
        union = _union([tract.patch_outer_box(p) for p in patches])
        if max(union.width, union.height) > MAX_REGION_PX:
            patches = [PatchId(tract.id, 0, 0)]
    else:
        known = set(tract.patches())
        patches = [p if isinstance(p, PatchId) else PatchId(tract.id, *p) for p in patches]
        missing = [str(p) for p in patches if p not in known]
        if missing:
            raise UserError(f"{', '.join(missing)} not in tract {tract.id}")
    return _union([tract.patch_outer_box(p) for p in patches])


def _union(boxes) -> Box:
    return Box(min(b.x0 for b in boxes), min(b.y0 for b in boxes),
               max(b.x1 for b in boxes), max(b.y1 for b in boxes))


# ---------------------------------------------------------------- scene

def make_scene(rng, region: Box, lattice: CellLattice, *, stars_only: bool, high_snr: bool,
               pixel_scale: float) -> Table:
    """The truth catalogue: positions in tract px, flux in nJy.

    ``stars_only``: one isolated star per cell, within ``min(inner/4, inner/2 - 13)`` px of the
    cell centre (so a 25x25 stamp stays in the inner box), mag 18-19.5 (never saturated).
    Otherwise random stars (mag 17-24, a few 14.5-16.5 that saturate) and galaxies (mag 20-24,
    Sersic n in {1, 1.5, 2.5, 4}, half-light radius 0.3-1.2", |e| < 0.5).
    """
    area_arcmin2 = region.width * region.height * (pixel_scale / 60.0) ** 2
    rows = []
    if stars_only:
        ii, jj = lattice.indices_overlapping(region.grown(-lattice.step // 2))
        cx, cy = lattice.centre(ii, jj)
        r = max(0.0, min(lattice.step / 4, lattice.step / 2 - 13))
        x = cx + rng.uniform(-r, r, cx.size)
        y = cy + rng.uniform(-r, r, cy.size)
        mag = rng.uniform(18.0, 19.5, cx.size)
        for k in range(cx.size):
            rows.append(("star", x[k], y[k], mag[k], np.nan, np.nan, 0.0, 0.0))
        return _scene_table(rows)
    n_star = max(5, int(round(15 * area_arcmin2)))
    n_bright = max(3, n_star // 10)
    n_gal = 0 if stars_only else max(5, int(round(20 * area_arcmin2)))
    inner = region.grown(-5)
    for k in range(n_star):
        mag = rng.uniform(14.5, 16.5) if k < n_bright else rng.uniform(17.0, 24.0)
        rows.append(("star", rng.uniform(inner.x0, inner.x1 - 1), rng.uniform(inner.y0, inner.y1 - 1),
                     mag, np.nan, np.nan, 0.0, 0.0))
    for _ in range(n_gal):
        e = rng.uniform(0, 0.5)
        phi = rng.uniform(0, np.pi)
        rows.append(("galaxy", rng.uniform(inner.x0, inner.x1 - 1),
                     rng.uniform(inner.y0, inner.y1 - 1), rng.uniform(20.0, 24.0),
                     float(rng.choice([1.0, 1.5, 2.5, 4.0])), rng.uniform(0.3, 1.2),
                     e * math.cos(2 * phi), e * math.sin(2 * phi)))
    return _scene_table(rows)


def _scene_table(rows) -> Table:
    t = Table(rows=rows, names=("type", "x", "y", "mag", "sersic_n", "hlr_arcsec", "e1", "e2"),
              dtype=("U6", float, float, float, float, float, float, float))
    t.add_column(np.arange(1, len(t) + 1), name="id", index=0)
    t.add_column(mag_to_njy(t["mag"]), name="flux", index=5)
    t["x"].unit = t["y"].unit = "pix"
    t["flux"].unit = "nJy"
    t["hlr_arcsec"].unit = "arcsec"
    return t


# ---------------------------------------------------------------- visits and PSFs

def plan_visit(rng, v: int, region: Box) -> dict:
    """Per-visit observing conditions (PSF, noise, pointing)."""
    e = rng.uniform(0.0, 0.07)
    phi = rng.uniform(0, np.pi)
    return {
        "visit": 100 + v,
        "psf_type": "moffat" if rng.uniform() < 0.5 else "kolmogorov",
        "fwhm": rng.uniform(0.65, 1.1),  # arcsec at the field centre
        "beta": rng.uniform(2.5, 4.5),
        "e1": e * math.cos(2 * phi), "e2": e * math.sin(2 * phi),
        "grad": rng.uniform(-0.05, 0.05, 6),  # d(fwhm)/fwhm, de1, de2 per unit field (x, y)
        "sigma_factor": 1.0 + (v * 0.6180339887) % 1.0,  # spread in [1, 2) for any n visits
        "sat_level": SAT_LEVEL * rng.uniform(0.8, 1.2),
        "dither": rng.uniform(-0.12, 0.12, 2) * (region.width, region.height),
        "rotation": rng.uniform(-4.0, 4.0),  # deg
        "mjd": 61000.0 + 0.73 * v,
    }


class VisitPsf:
    """A visit's PSF model: GalSim objects per cell (or one), with their 41x41 stamps."""

    def __init__(self, galsim, plan: dict, region: Box, lattice: CellLattice, grid: bool,
                 pixel_scale: float):
        self.gs, self.plan, self.region, self.lattice = galsim, plan, region, lattice
        self.grid, self.scale = grid, pixel_scale
        self._cache: dict = {}  # key -> GalSim profile
        self._stamps: dict = {}  # key -> (stamp, raw sum)

    def params_at(self, x: float, y: float) -> tuple[float, float, float]:
        """(FWHM arcsec, e1, e2) of the smooth field model at tract pixel (x, y)."""
        p, b = self.plan, self.region
        u = 2 * (x - (b.x0 + b.x1) / 2) / b.width
        w = 2 * (y - (b.y0 + b.y1) / 2) / b.height
        g = p["grad"]
        fwhm = float(np.clip(p["fwhm"] * (1 + g[0] * u + g[1] * w), 0.6, 1.2))
        e1, e2 = p["e1"] + g[2] * u + g[3] * w, p["e2"] + g[4] * u + g[5] * w
        e = math.hypot(e1, e2)
        if e > 0.1:
            e1, e2 = e1 * 0.1 / e, e2 * 0.1 / e
        return fwhm, e1, e2

    def key(self, x: float, y: float):
        """Which PSF applies to a source centred at (x, y): its cell (or the visit's one)."""
        if not self.grid:
            return None
        i, j = self.lattice.index(x, y)
        return int(i), int(j)

    def obj(self, key):
        """GalSim profile (flux 1) for ``key`` (cached)."""
        if key not in self._cache:
            if key is None:
                b = self.region
                x, y = (b.x0 + b.x1) / 2, (b.y0 + b.y1) / 2
            else:
                x, y = self.lattice.centre(*key)
            fwhm, e1, e2 = self.params_at(x, y)
            if self.plan["psf_type"] == "moffat":
                prof = self.gs.Moffat(beta=self.plan["beta"], fwhm=fwhm)
            else:
                prof = self.gs.Kolmogorov(fwhm=fwhm)
            self._cache[key] = prof.shear(e1=e1, e2=e2)
        return self._cache[key]

    def stamp(self, key) -> np.ndarray:
        """The pixel-convolved PSF, (41, 41) float64, centred on the central pixel, sum 1.

        The profile's flux outside the stamp (up to 2 % for wide Moffat wings) is dropped and
        the stamp renormalised; stars are drawn with the same factor (:meth:`flux_scale`), so
        a star of flux F is F x this stamp, and the weights of the visits in a coadd PSF are
        the same as in the coadd of the stars."""
        if key not in self._stamps:
            img = self.obj(key).drawImage(nx=PSF_STAMP, ny=PSF_STAMP, scale=self.scale,
                                          method="auto", dtype=np.float64).array
            self._stamps[key] = (img / img.sum(), float(img.sum()))
        return self._stamps[key][0]

    def flux_scale(self, key) -> float:
        """1 / (fraction of the profile's flux inside the 41x41 stamp)."""
        self.stamp(key)
        return 1.0 / self._stamps[key][1]

    def for_box(self, box: Box):
        """``(stamps (n, 41, 41), positions (n, 2) or None)`` for a warp covering ``box``:
        one stamp per cell overlapping it, at the cell centre."""
        if not self.grid:
            return self.stamp(None), None
        ii, jj = self.lattice.indices_overlapping(box)
        stamps = np.stack([self.stamp((int(i), int(j))) for i, j in zip(ii, jj)])
        cx, cy = self.lattice.centre(ii, jj)
        return stamps, np.column_stack([cx, cy]).astype(float)


# ---------------------------------------------------------------- rendering

def render(galsim, scene: Table, psf: VisitPsf, region: Box) -> np.ndarray:
    """Noiseless image of ``scene`` over ``region`` (float64, nJy per pixel, shape region.shape).

    Each source is drawn with the PSF of its cell at its sub-pixel position (``offset`` from the
    nearest pixel centre), so a star is exactly ``flux`` x the PSF stamp, shifted (within the
    41x41 stamp; bright stars are drawn on 121x121 to show their wings).
    """
    img = np.zeros(region.shape)
    scale = psf.scale
    for row in scene:
        x, y = float(row["x"]), float(row["y"])
        ix, iy = int(math.floor(x + 0.5)), int(math.floor(y + 0.5))
        key = psf.key(x, y)
        p = psf.obj(key)
        if row["type"] == "star":
            prof = p.withFlux(float(row["flux"]) * psf.flux_scale(key))
            half = 20 if row["mag"] > 17 else 60
        else:
            gal = galsim.Sersic(n=float(row["sersic_n"]), half_light_radius=float(row["hlr_arcsec"]),
                                flux=float(row["flux"]))
            prof = galsim.Convolve(gal.shear(e1=float(row["e1"]), e2=float(row["e2"])), p)
            half = int(np.clip(8 * row["hlr_arcsec"] / scale, 16, 64))
        stamp = prof.drawImage(nx=2 * half + 1, ny=2 * half + 1, scale=scale, method="auto",
                               offset=(x - ix, y - iy), dtype=np.float64).array
        _add(img, stamp, ix - half - region.x0, iy - half - region.y0)
    return img


def _add(img, stamp, x0, y0):
    """img[y0:, x0:] += stamp, clipped to img."""
    h, w = stamp.shape
    ys, xs = max(0, -y0), max(0, -x0)
    ye, xe = min(h, img.shape[0] - y0), min(w, img.shape[1] - x0)
    if ye > ys and xe > xs:
        img[y0 + ys:y0 + ye, x0 + xs:x0 + xe] += stamp[ys:ye, xs:xe]


def detector_footprints(plan: dict, region: Box, n: int, gap: int) -> list[np.ndarray]:
    """Boolean maps (region.shape) of each detector of the visit's rotated, dithered focal plane."""
    ncol = math.ceil(math.sqrt(n))
    nrow = math.ceil(n / ncol)
    size = 0.9 * min(region.width, region.height)
    dw, dh = (size - (ncol - 1) * gap) / ncol, (size - (nrow - 1) * gap) / nrow
    cx = (region.x0 + region.x1 - 1) / 2 + plan["dither"][0]
    cy = (region.y0 + region.y1 - 1) / 2 + plan["dither"][1]
    t = math.radians(plan["rotation"])
    yy, xx = np.mgrid[region.y0:region.y1, region.x0:region.x1]
    u = math.cos(t) * (xx - cx) + math.sin(t) * (yy - cy)
    w = -math.sin(t) * (xx - cx) + math.cos(t) * (yy - cy)
    out = []
    for k in range(n):
        c, r = k % ncol, k // ncol
        uc = -size / 2 + dw / 2 + c * (dw + gap)
        wc = -size / 2 + dh / 2 + r * (dh + gap)
        out.append((np.abs(u - uc) <= dw / 2) & (np.abs(w - wc) <= dh / 2))
    return out


def saturate(img: np.ndarray, mask: np.ndarray, level: float) -> None:
    """Clip pixels above ``level`` and bleed the excess along columns (in place, SAT)."""
    sat = img > level
    if not sat.any():
        return
    for col in np.unique(np.nonzero(sat)[1]):
        rows = np.nonzero(sat[:, col])[0]
        excess = float((img[rows, col] - level).sum())
        extra = int(math.ceil(excess / level / 2))
        lo, hi = max(0, rows.min() - extra), min(img.shape[0], rows.max() + extra + 1)
        img[lo:hi, col] = level
        mask[lo:hi, col] |= BIT["SAT"]


def add_defects(rng, img, mask, foot: np.ndarray, lattice: CellLattice, region: Box,
                heavy: bool):
    """Bad columns, cosmic rays, suspect patches and optionally one heavily masked cell, inside
    the footprint ``foot`` (in place). Returns the heavily masked box (tract px) or None."""
    ys, xs = np.nonzero(foot)
    if xs.size == 0:
        return None
    x_lo, x_hi = xs.min(), xs.max()
    for _ in range(rng.integers(1, 3)):  # bad columns, 1-2 px wide, along the detector
        c = int(rng.integers(x_lo, x_hi + 1))
        sl = np.s_[:, c:c + int(rng.integers(1, 3))]
        hit = foot[sl]
        img[sl][hit] += 800.0
        mask[sl][hit] |= BIT["BAD"]
    n_cr = max(3, int(xs.size / 1e4))
    for _ in range(n_cr):  # cosmic-ray tracks, 1-12 px
        k = int(rng.integers(xs.size))
        ang = rng.uniform(0, np.pi)
        length = rng.uniform(1, 12)
        tt = np.linspace(0, length, int(length) * 2 + 2)
        px = np.clip(np.round(xs[k] + tt * math.cos(ang)).astype(int), 0, img.shape[1] - 1)
        py = np.clip(np.round(ys[k] + tt * math.sin(ang)).astype(int), 0, img.shape[0] - 1)
        ok = foot[py, px]
        img[py[ok], px[ok]] += rng.uniform(300, 3000)
        mask[py[ok], px[ok]] |= BIT["CR"]
    for _ in range(2):  # suspect (non-linear) patches
        k = int(rng.integers(xs.size))
        h, w = int(rng.integers(10, 40)), int(rng.integers(2, 7))
        sl = np.s_[ys[k]:ys[k] + h, xs[k]:xs[k] + w]
        hit = foot[sl]
        img[sl][hit] *= 1.05
        mask[sl][hit] |= BIT["SUSPECT"]
    if not heavy:
        return None
    # One cell fully inside the footprint gets 75-100 % of its inner box masked BAD.
    cand = []
    for i, j in zip(*lattice.indices_overlapping(region)):
        b = lattice.inner_box(int(i), int(j))
        if region.contains(b) and foot[b.slices((region.x0, region.y0))].all():
            cand.append(b)
    if not cand:
        return None
    b = cand[int(rng.integers(len(cand)))]
    w = int(round(b.width * rng.uniform(0.75, 1.0)))
    box = Box(b.x0, b.y0, b.x0 + w, b.y1)
    sl = box.slices((region.x0, region.y0))
    img[sl] = 5000.0
    mask[sl] |= BIT["BAD"]
    return box


# ---------------------------------------------------------------- driver

# Long because the simulation recipe, step by step, as docs/science.md describes it.
def simulate(outdir, skymap=None, visits: int = 6, seed: int = 0, band: str = "r",
             detectors: int = 2, psf_grid: bool = True, noise_realizations: int = 0,
             stars_only: bool = False, defects: bool = True, high_snr: bool = False,
             tract: int | None = None, patches=None, overwrite: bool = False,
             progress=None) -> dict:
    """Simulate ``visits`` visits of ``detectors`` detectors on one tract and write the files
    listed in the module docstring under ``outdir``.

    ``skymap``: a :class:`SkyMap`, a path to a skymap TOML, or None for the built-in demo
    skymap. ``tract``: tract id (default: the first). ``patches``: list of (x, y) patch indices
    whose outer boxes to cover (default: all, or patch 0,0 if the tract exceeds 2048 px).
    ``stars_only``: one isolated star per cell, no galaxies. ``high_snr``: noise x 0.01.
    ``progress``: optional callable(str) for progress messages.

    Returns a summary dict: ``outdir``, ``warps`` (paths), ``n_stars``, ``n_galaxies``,
    ``visits``, ``region`` (Box), ``heavily_masked`` (list of (visit, detector, Box)),
    ``seconds``.
    """
    t_start = time.perf_counter()
    galsim = galsim_module()
    if int(visits) < 1 or int(detectors) < 1 or int(noise_realizations) < 0:
        raise UserError("visits and detectors must be >= 1, noise realizations >= 0")
    sm = _as_skymap(skymap)
    tr = sm.tract(sorted(sm.tracts)[0] if tract is None else int(tract))
    outdir = Path(outdir)
    wdir = outdir / "warps"
    if wdir.exists() and any(wdir.glob("*.fits")):
        if not overwrite:
            raise UserError(f"{wdir} already holds warps; choose an empty directory "
                            "(or pass --overwrite)")
        shutil.rmtree(wdir)
    try:
        wdir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create {wdir}: {e.strerror or e}") from None
    region = _region(tr, patches)
    lattice = CellLattice(tr)
    scene = make_scene(np.random.default_rng([seed, 2**20]), region, lattice,
                       stars_only=stars_only, high_snr=high_snr, pixel_scale=tr.pixel_scale)
    ra, dec = tr.wcs().pixel_to_world_values(scene["x"], scene["y"])
    scene.add_column(ra, name="ra", index=4)
    scene.add_column(dec, name="dec", index=5)
    scene["ra"].unit = scene["dec"].unit = "deg"
    gap = max(6, tr.cells.inner // 4)
    visit_rows, warp_rows, paths, heavy = [], [], [], []
    for v in range(int(visits)):
        rng = np.random.default_rng([seed, v])
        plan = plan_visit(rng, v, region)
        psf = VisitPsf(galsim, plan, region, lattice, psf_grid, tr.pixel_scale)
        sigma = BASE_SIGMA * plan["sigma_factor"] * (HIGH_SNR_FACTOR if high_snr else 1.0)
        img = render(galsim, scene, psf, region) + rng.normal(0.0, sigma, region.shape)
        mask = np.zeros(region.shape, np.int32)
        saturate(img, mask, plan["sat_level"])
        heavy_visit = v % 2 == 1
        for d, foot in enumerate(detector_footprints(plan, region, int(detectors), gap)):
            if not foot.any():
                continue
            drng = np.random.default_rng([seed, v, d + 1])
            hbox = add_defects(drng, img, mask, foot, lattice, region,
                               heavy_visit and d == 0) if defects else None
            path, row = _write_one(wdir, tr, band, plan, psf, img, mask, foot, sigma, region,
                                   d, drng, int(noise_realizations))
            row["heavy_box"] = [hbox.x0, hbox.y0, hbox.x1, hbox.y1] if hbox else [-1, -1, -1, -1]
            if hbox:
                heavy.append((plan["visit"], d, hbox))
            paths.append(path)
            warp_rows.append(row)
        fwhm, e1, e2 = psf.params_at((region.x0 + region.x1) / 2, (region.y0 + region.y1) / 2)
        visit_rows.append({"visit": plan["visit"], "psf_type": plan["psf_type"],
                           "fwhm_arcsec": fwhm, "e1": e1, "e2": e2,
                           "beta": plan["beta"] if plan["psf_type"] == "moffat" else np.nan,
                           "noise_sigma_njy": sigma, "weight": 1 / sigma**2,
                           "sat_level_njy": plan["sat_level"], "dither_x": plan["dither"][0],
                           "dither_y": plan["dither"][1], "rotation_deg": plan["rotation"],
                           "mjd": plan["mjd"]})
        if progress:
            progress(f"visit {plan['visit']}: {len(paths)} warps written")
    (outdir / "skymap.toml").write_text(sm.to_toml())
    scene.write(outdir / "truth.fits", overwrite=True)
    Table(rows=visit_rows).write(outdir / "visits.ecsv", overwrite=True)
    Table(rows=warp_rows).write(outdir / "warps.ecsv", overwrite=True)
    return {"outdir": outdir, "warps": paths, "n_stars": int(np.sum(scene["type"] == "star")),
            "n_galaxies": int(np.sum(scene["type"] == "galaxy")), "visits": int(visits),
            "region": region, "heavily_masked": heavy,
            "seconds": time.perf_counter() - t_start}


def _write_one(wdir, tr, band, plan, psf, img, mask, foot, sigma, region, d, rng, n_noise):
    """Cut detector ``d`` out of the visit arrays and write its warp; returns (path, row)."""
    ys, xs = np.nonzero(foot)
    box = Box(int(xs.min()) + region.x0, int(ys.min()) + region.y0,
              int(xs.max()) + 1 + region.x0, int(ys.max()) + 1 + region.y0)
    sl = box.slices((region.x0, region.y0))
    f = foot[sl]
    image = np.where(f, img[sl], np.nan)
    m = np.where(f, mask[sl], BIT["NO_DATA"]).astype(np.int32)
    var = np.where(f, sigma**2, np.inf)
    noise = [np.where(f, rng.normal(0.0, sigma, f.shape), np.nan) for _ in range(n_noise)]
    stamps, pos = psf.for_box(box)
    visit = plan["visit"]
    path = wdir / f"warp_t{tr.id}_v{visit}_d{d}.fits"
    write_warp(path, tract=tr, xy0=(box.x0, box.y0), image=image, mask=m, variance=var,
               psf=stamps, psf_positions=pos, visit=visit, detector=d, band=band, noise=noise,
               mjd=plan["mjd"], afw_style=(d % 2 == 1))
    row = {"file": path.name, "visit": visit, "detector": d, "x0": box.x0, "y0": box.y0,
           "width": box.width, "height": box.height,
           "n_psf": 1 if pos is None else len(pos), "valid_fraction": float(f.mean())}
    return path, row


def _as_skymap(skymap) -> SkyMap:
    if skymap is None:
        return skymap_from_dict(DEMO_SKYMAP, "built-in demo skymap")
    if isinstance(skymap, SkyMap):
        return skymap
    return load_skymap(skymap)


# ---------------------------------------------------------------- CLI


