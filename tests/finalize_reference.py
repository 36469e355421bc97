"""FROZEN copy of ``streamcoadd/finalize.py`` before the streaming rewrite (commit 3a23dca),
kept as the reference the new finalize output is compared with (tests/test_finalize_equivalence.py).
Do not optimise this file.

Turn accumulators into coadds (pure), and write them as FITS (SPEC §5).

Per cell (arrays of the cell outer shape)::

    image    = sum_wI / sum_w                 nJy
    variance = sum_w2var / sum_w**2           nJy^2
    psf      = psf_sum / psf_w                (psf_size, psf_size)
    maskfrac = sum_w_interp / sum_w           weight fraction that came from interpolation

Mask: the OR of the inputs' kept planes; a propagated plane (``SAT``) where its weight
fraction exceeds its threshold; ``INTRP`` where any weight was interpolated;
``INEXACT_PSF`` where the interpolated fraction exceeds ``inexact_psf_threshold``;
``NO_DATA`` (image NaN, variance inf) where no input has data.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from astropy.io import fits
from astropy.table import Table
from astropy.wcs import WCS

from streamcoadd.core.config import FoldConfig
from streamcoadd.core.fold import CellAccumulator
from streamcoadd.core.masks import CANONICAL_PLANES
from streamcoadd.core.skymap import Box, CellId, PatchId, Tract

BIT = {name: np.int32(1 << b) for name, b in CANONICAL_PLANES.items()}


@dataclass
class CellCoadd:
    """The finalized coadd of one cell (arrays of the outer box shape, float64)."""

    cell: CellId
    band: str
    outer_box: Box
    inner_box: Box
    image: np.ndarray
    variance: np.ndarray
    mask: np.ndarray  # int32, canonical bits
    psf: np.ndarray
    maskfrac: np.ndarray
    noise: np.ndarray  # (K, H, W)
    group: str  # 'good' or 'fallback'
    contributors: Table
    wcs: WCS
    accumulator: CellAccumulator | None = None

    @property
    def n_inputs(self) -> int:
        return len(self.contributors)

    @property
    def sums(self) -> dict:
        """The raw float64 accumulators of the group that counts (see docs/state-format.md)."""
        g = self.accumulator.groups[self.group]
        return {"sum_w": g.sum_w, "sum_wI": g.sum_wI, "sum_w2var": g.sum_w2var,
                "sum_w_interp": g.sum_w_interp, "mask_or": g.mask_or, "noise": g.noise,
                "psf_sum": g.psf_sum, "psf_w": g.psf_w, "planes": g.planes}

    def to_ccddata(self):
        """The coadd as an :class:`astropy.nddata.CCDData` (outer box, unit nJy)."""
        from astropy.nddata import CCDData, VarianceUncertainty

        return CCDData(self.image, unit="nJy", wcs=self.wcs, mask=self.mask != 0,
                       uncertainty=VarianceUncertainty(self.variance, unit="nJy2"),
                       meta={"cell": str(self.cell), "band": self.band,
                             "n_inputs": self.n_inputs})

    def inner(self, plane: np.ndarray) -> np.ndarray:
        """View of ``plane`` (outer shape) restricted to the inner box."""
        return plane[self.inner_box.slices((self.outer_box.x0, self.outer_box.y0))]


def contributors_table(acc_group) -> Table:
    rows = acc_group.contributors
    cols = ["visit", "detector", "weight", "overlap_fraction", "good_fraction", "fallback",
            "psf_ixx", "psf_iyy", "psf_ixy", "psf_flag", "content_hash", "folded_at",
            "instrument", "physical_filter", "mjd"]
    t = Table({c: [getattr(r, c) for r in rows] for c in cols} if rows else
              {c: [] for c in cols})
    t["weight"].unit = "1/nJy2"
    return t


def coadd_cell(acc: CellAccumulator, band: str, tract: Tract, config: FoldConfig) -> CellCoadd | None:
    """Finalize one cell; None if it has no input."""
    sums = acc.active()
    if sums is None:
        return None
    with np.errstate(divide="ignore", invalid="ignore"):
        has = sums.sum_w > 0
        image = np.where(has, sums.sum_wI / sums.sum_w, np.nan)
        variance = np.where(has, sums.sum_w2var / sums.sum_w**2, np.inf)
        maskfrac = np.where(has, sums.sum_w_interp / sums.sum_w, 0.0)
        noise = np.where(has, sums.noise / sums.sum_w, np.nan)
        mask = sums.mask_or.copy()
        for name, threshold in config.propagate_thresholds.items():
            if name in sums.planes:
                frac = np.where(has, sums.planes[name] / sums.sum_w, 0.0)
                mask[frac > threshold] |= BIT[name]
    mask[maskfrac > 0] |= BIT["INTRP"]
    mask[maskfrac > config.inexact_psf_threshold] |= BIT["INEXACT_PSF"]
    mask[~has] |= BIT["NO_DATA"]
    psf = sums.psf_sum / sums.psf_w
    outer = acc.outer
    return CellCoadd(cell=acc.cell, band=band, outer_box=outer,
                     inner_box=tract.cell_inner_box(acc.cell), image=image, variance=variance,
                     mask=mask, psf=psf, maskfrac=maskfrac, noise=noise,
                     group=acc.active_group(), contributors=contributors_table(sums),
                     wcs=box_wcs(tract, outer), accumulator=acc)


def box_wcs(tract: Tract, box: Box) -> WCS:
    """The tract WCS for an array whose pixel [0, 0] is tract pixel (box.x0, box.y0)."""
    w = tract.wcs()
    w.wcs.crpix = [w.wcs.crpix[0] - box.x0, w.wcs.crpix[1] - box.y0]
    return w


def _wcs_header(tract: Tract, box: Box) -> fits.Header:
    h = box_wcs(tract, box).to_header()
    h["LTV1"], h["LTV2"] = -box.x0, -box.y0
    return h


def maskdef_table() -> Table:
    names = list(CANONICAL_PLANES)
    return Table({"MASK_NAME": names, "BIT_VALUE": [CANONICAL_PLANES[n] for n in names]})


def file_stem(patch: PatchId, band: str) -> str:
    return f"coadd_t{patch.tract}_p{patch.x}-{patch.y}_{band}"


def write_cells_fits(path, patch: PatchId, band: str, tract: Tract, coadds: list[CellCoadd],
                     skymap_name: str, config: FoldConfig) -> None:
    """LSST ``cell_coadds`` layout: primary HDU with the tract WCS, one binary-table row
    per populated cell, then ``CELL``, ``VISIT`` and ``MASKDEF`` tables."""
    g = tract.cells
    outer = g.outer
    n = g.cells_per_patch
    origin = tract.cell_grid_origin(patch)
    ph = fits.Header(tract.wcs().to_header())
    # (the one change since this copy was frozen: the cells file no longer claims LSST's
    # cell_coadds VERSION 0.8, and OCELL1/2 is the outer cell size as LSST's reader takes it)
    ph.update({"SCFORMAT": "streamcoadd-cells", "SCFMTVER": 2, "SKYMAP": skymap_name, "TRACT": patch.tract,
               "PATCH_X": patch.x, "PATCH_Y": patch.y, "FILTER": band, "BAND": band,
               "GRCELL1": g.inner, "GRCELL2": g.inner, "GRSHAPE1": n, "GRSHAPE2": n,
               "GRMIN1": origin[0], "GRMIN2": origin[1], "OCELL1": g.outer,
               "OCELL2": g.outer, "PSFSIZE1": config.psf_size, "PSFSIZE2": config.psf_size,
               "NNOISE": config.noise_realizations, "BUNIT": "nJy"})
    k = len(coadds)
    dim = f"({outer},{outer})"
    npx = outer * outer
    psfdim = f"({config.psf_size},{config.psf_size})"
    cols = [
        fits.Column("cell_id", "2I", array=np.array([[c.cell.x, c.cell.y] for c in coadds],
                                                     np.int16).reshape(k, 2)),
        fits.Column("image", f"{npx}E", dim=dim, unit="nJy",
                    array=np.array([c.image for c in coadds], np.float32).reshape(k, outer, outer)),
        fits.Column("mask", f"{npx}J", dim=dim,
                    array=np.array([c.mask for c in coadds], np.int32).reshape(k, outer, outer)),
        fits.Column("variance", f"{npx}E", dim=dim, unit="nJy2",
                    array=np.array([c.variance for c in coadds], np.float32).reshape(k, outer, outer)),
        fits.Column("psf", f"{config.psf_size**2}D", dim=psfdim,
                    array=np.array([c.psf for c in coadds]).reshape(k, config.psf_size, config.psf_size)),
        fits.Column("maskfrac", f"{npx}E", dim=dim,
                    array=np.array([c.maskfrac for c in coadds], np.float32).reshape(k, outer, outer)),
    ]
    for i in range(config.noise_realizations):
        cols.append(fits.Column(f"noise_{i:02d}", f"{npx}E", dim=dim, unit="nJy",
                                array=np.array([c.noise[i] for c in coadds], np.float32)
                                .reshape(k, outer, outer)))
    cells_hdu = fits.BinTableHDU.from_columns(cols, name="CELLS")
    inner0 = coadds[0].inner_box if coadds else None
    if inner0 is not None:
        cells_hdu.header.update({"INBBOX11": g.border, "INBBOX12": g.border + g.inner - 1,
                                 "INBBOX21": g.border, "INBBOX22": g.border + g.inner - 1})
    cell_rows = []
    for c in coadds:
        for r in c.contributors:
            cell_rows.append({"cell_x": c.cell.x, "cell_y": c.cell.y, "visit": r["visit"],
                              "detector": r["detector"], "overlaps_center": True,
                              "overlap_fraction": r["overlap_fraction"],
                              "unmasked_overlap_fraction": r["good_fraction"],
                              "weight": r["weight"], "psf_shape_ixx": r["psf_ixx"],
                              "psf_shape_iyy": r["psf_iyy"], "psf_shape_ixy": r["psf_ixy"],
                              "psf_shape_flag": r["psf_flag"], "fallback": r["fallback"]})
    cell_table = Table(rows=cell_rows) if cell_rows else Table(
        names=["cell_x", "cell_y", "visit", "detector"], dtype=[int, int, int, int])
    visits = sorted({(int(r["visit"]), str(r["instrument"]), str(r["physical_filter"]),
                      float(r["mjd"])) for c in coadds for r in c.contributors})
    visit_table = Table(rows=visits, names=["visit", "instrument", "physical_filter", "mjd"]) \
        if visits else Table(names=["visit"], dtype=[int])
    hdul = fits.HDUList([
        fits.PrimaryHDU(header=ph), cells_hdu,
        fits.table_to_hdu(cell_table), fits.table_to_hdu(visit_table),
        fits.table_to_hdu(maskdef_table())])
    hdul[2].name, hdul[3].name, hdul[4].name = "CELL", "VISIT", "MASKDEF"
    hdul.writeto(path, overwrite=True)


def stitch(patch: PatchId, tract: Tract, coadds: list[CellCoadd]) -> tuple[Box, dict]:
    """Stitch inner cells into a patch image (like ``cell_coadds.StitchedCoadd``): each
    cell fills its inner box, and cells on the patch edge also their border towards the
    outside, so the result covers the patch outer box. Missing cells: NaN, inf, NO_DATA."""
    box = tract.patch_outer_box(patch)
    n = tract.cells.cells_per_patch
    out = {"IMAGE": np.full(box.shape, np.nan, np.float32),
           "MASK": np.full(box.shape, BIT["NO_DATA"], np.int32),
           "VARIANCE": np.full(box.shape, np.inf, np.float32),
           "MASKFRAC": np.zeros(box.shape, np.float32)}
    for c in coadds:
        region = c.inner_box
        x0 = c.outer_box.x0 if c.cell.x == 0 else region.x0
        y0 = c.outer_box.y0 if c.cell.y == 0 else region.y0
        x1 = c.outer_box.x1 if c.cell.x == n - 1 else region.x1
        y1 = c.outer_box.y1 if c.cell.y == n - 1 else region.y1
        region = Box(x0, y0, x1, y1)
        dst = region.slices((box.x0, box.y0))
        src = region.slices((c.outer_box.x0, c.outer_box.y0))
        out["IMAGE"][dst] = c.image[src]
        out["MASK"][dst] = c.mask[src]
        out["VARIANCE"][dst] = c.variance[src]
        out["MASKFRAC"][dst] = c.maskfrac[src]
    return box, out


def write_stitched_fits(path, patch: PatchId, band: str, tract: Tract,
                        coadds: list[CellCoadd]) -> None:
    box, planes = stitch(patch, tract, coadds)
    h = _wcs_header(tract, box)
    ph = fits.Header()
    ph.update({"TRACT": patch.tract, "PATCH_X": patch.x, "PATCH_Y": patch.y, "BAND": band,
               "NCELLS": len(coadds)})
    hdus = [fits.PrimaryHDU(header=ph)]
    for name, arr in planes.items():
        hh = h.copy()
        if name == "IMAGE":
            hh["BUNIT"] = "nJy"
        elif name == "VARIANCE":
            hh["BUNIT"] = "nJy2"
        else:
            for pname, b in CANONICAL_PLANES.items():
                hh[f"HIERARCH MP_{pname}"] = b
        hdus.append(fits.ImageHDU(arr, hh, name=name))
    fits.HDUList(hdus).writeto(path, overwrite=True)


def reference_finalize(state, out, patch=None, cell=None, band=None) -> int:
    """The old ``cmd_finalize`` loop (CellCoadd lists, astropy writers)."""
    from pathlib import Path

    from streamcoadd.analysis.reader import open_state

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    written = 0
    with open_state(state) as st:
        for b in ([band] if band else st.bands()):
            for p in st.patches(b):
                if patch and (p.x, p.y) != tuple(patch):
                    continue
                cells = st.populated_cells(b, p)
                if cell:
                    cells = [c for c in cells if (c.x, c.y) == tuple(cell)]
                tract = st.skymap.tract(p.tract)
                coadds = [c for c in (coadd_cell(st.store.read_cell(cid, b)[0], b, tract, st.fold)
                                      for cid in cells) if c is not None]
                if not coadds:
                    continue
                stem = out / file_stem(p, b)
                write_cells_fits(f"{stem}_cells.fits", p, b, tract, coadds, st.skymap.name, st.fold)
                if not cell:
                    write_stitched_fits(f"{stem}_stitched.fits", p, b, tract, coadds)
                written += len(coadds)
    return written
