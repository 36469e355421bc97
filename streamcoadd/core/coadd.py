"""The finalize formulas: a cell's coadd from its accumulated sums (SPEC §3).

``image = Σ w·I / Σ w``, ``variance = Σ w²·var / (Σ w)²``, ``maskfrac = Σ w·interp / Σ w``,
``psf = Σ w·psf / Σ w`` (scalar weights), with coverage and mask flags decided by the
integer counts kept beside the sums (see :func:`coadd_planes`)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from astropy.table import Table
from astropy.wcs import WCS

from streamcoadd.core.config import FoldConfig
from streamcoadd.core.contributors import contributors_table
from streamcoadd.core.fold import CellAccumulator
from streamcoadd.core.masks import CANONICAL_PLANES
from streamcoadd.core.skymap import Box, CellId, Tract

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


# Long because the finalize formulas, one plane after the other in the order docs/state-
# format.md gives them, with their docstring.
def coadd_planes(sums, config: FoldConfig, out: dict | None = None) -> dict:
    """The finalize formulas (module docstring) on one group's sums.

    Coverage and flags come from the group's integer counts when it has them
    (``sums.counted``): NO_DATA where no input has data (``n_full + n_partial == 0``),
    INTRP where ``n_interp > 0``, the masked fraction exactly 0 where ``n_interp == 0``,
    a propagated plane (SAT) where its count > 0 and its weight fraction > the threshold.
    A version-1 group (no counts) uses the float tests ``sum_w > 0`` and ``maskfrac > 0``.

    Returns ``image``, ``variance``, ``maskfrac`` (float64 unless ``out`` says otherwise),
    ``noise`` (K planes), ``psf`` (float64) and ``mask`` (int32). ``out`` may give the
    arrays to write ``image``, ``variance``, ``maskfrac`` and ``psf`` into and a sequence
    of K arrays for ``noise`` (e.g. the big-endian float32 fields of a FITS row): values
    are computed in float64 and rounded once on assignment, as a float64 result cast."""
    sum_w = sums.sum_w
    shape = sum_w.shape
    if out is None:
        out = {"image": np.empty(shape), "variance": np.empty(shape),
               "noise": np.empty(sums.noise.shape), "psf": None, "maskfrac": None}
    counted = getattr(sums, "counted", False)
    # coverage and flags from the integer counts (exact under retraction); a version-1
    # group without counts falls back to the float tests
    has = sums.n_data > 0 if counted else sum_w > 0
    nohas = None if has.all() else ~has
    with np.errstate(divide="ignore", invalid="ignore"):
        image = np.divide(sums.sum_wI, sum_w, out=out["image"])
        variance = np.divide(sums.sum_w2var, np.square(sum_w), out=out["variance"])
        maskfrac = np.divide(sums.sum_w_interp, sum_w)  # float64: the mask rules use it
        if counted:  # exactly 0 where no input was interpolated
            maskfrac[interp_count(sums) == 0] = 0.0
        noise = out["noise"]
        for k in range(len(sums.noise)):
            np.divide(sums.noise[k], sum_w, out=noise[k])
        if nohas is not None:
            image[nohas] = np.nan
            variance[nohas] = np.inf
            maskfrac[nohas] = 0.0
            for k in range(len(sums.noise)):
                noise[k][nohas] = np.nan
        mask = np.array(sums.mask_or, np.int32)  # a copy: the sums stay untouched
        for name, threshold in config.propagate_thresholds.items():
            plane = sums.planes.get(name)
            if plane is not None:
                over = np.divide(plane, sum_w) > threshold
                if counted:
                    cnt = sums.plane_counts.get(name)
                    if cnt is None:
                        continue  # no input carries the plane
                    over &= cnt > 0
                if nohas is not None:
                    over[nohas] = 0.0 > threshold
                np.bitwise_or(mask, BIT[name], out=mask, where=over)
    interpolated = interp_count(sums) > 0 if counted else maskfrac > 0
    np.bitwise_or(mask, BIT["INTRP"], out=mask, where=interpolated)
    np.bitwise_or(mask, BIT["INEXACT_PSF"], out=mask,
                  where=maskfrac > config.inexact_psf_threshold)
    if nohas is not None:
        np.bitwise_or(mask, BIT["NO_DATA"], out=mask, where=nohas)
    psf = sums.psf_sum / sums.psf_w
    if out["psf"] is not None:
        out["psf"][...] = psf
        psf = out["psf"]
    if out["maskfrac"] is not None:
        out["maskfrac"][...] = maskfrac
        maskfrac = out["maskfrac"]
    return {"image": image, "variance": variance, "mask": mask, "psf": psf,
            "maskfrac": maskfrac, "noise": noise}


def interp_count(sums) -> np.ndarray:
    """Number of inputs interpolated at each pixel (int32, (H, W))."""
    return sums.n_interp if sums.n_interp is not None else np.zeros(sums.shape, np.int32)


def coadd_cell(acc: CellAccumulator, band: str, tract: Tract, config: FoldConfig) -> CellCoadd | None:
    """Finalize one cell; None if it has no input."""
    sums = acc.active()
    if sums is None:
        return None
    p = coadd_planes(sums, config)
    outer = acc.outer
    return CellCoadd(cell=acc.cell, band=band, outer_box=outer,
                     inner_box=tract.cell_inner_box(acc.cell), image=p["image"],
                     variance=p["variance"], mask=p["mask"], psf=p["psf"],
                     maskfrac=p["maskfrac"], noise=p["noise"],
                     group=acc.active_group(), contributors=contributors_table(sums.contributors),
                     wcs=box_wcs(tract, outer), accumulator=acc)


def box_wcs(tract: Tract, box: Box) -> WCS:
    """The tract WCS for an array whose pixel [0, 0] is tract pixel (box.x0, box.y0)."""
    w = tract.wcs()
    w.wcs.crpix = [w.wcs.crpix[0] - box.x0, w.wcs.crpix[1] - box.y0]
    return w
