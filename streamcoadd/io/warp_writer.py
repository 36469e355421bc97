"""Write warp FITS files in the SPEC §2 layout (used by the simulator, tests and benchmarks).

The inverse of :mod:`streamcoadd.io.warp_reader`: an LSST afw-exposure-like file with a primary
header (VISIT, DETECTOR, BAND, TRACT, ...), ``IMAGE``, ``MASK``, ``VARIANCE``, ``PSF``
(stamp, or cube plus ``PSFPOS`` table) and optional ``NOISEk`` HDUs.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from astropy.io import fits
from astropy.table import Table

from streamcoadd.core.masks import CANONICAL_PLANES
from streamcoadd.core.skymap import Tract


def warp_header(tract: Tract, xy0: tuple[int, int], afw_style: bool = False) -> fits.Header:
    """IMAGE-HDU header: the tract WCS shifted to ``xy0`` plus the pixel origin keywords.

    ``afw_style`` writes CRVAL1A/CRVAL2A (WCSNAMEA = 'PHYSICAL') instead of LTV1/LTV2.
    """
    w = tract.wcs()
    w.wcs.crpix = [w.wcs.crpix[0] - xy0[0], w.wcs.crpix[1] - xy0[1]]
    h = w.to_header()
    h["BUNIT"] = "nJy"
    if afw_style:
        h["WCSNAMEA"] = "PHYSICAL"
        h["CTYPE1A"], h["CTYPE2A"] = "LINEAR", "LINEAR"
        h["CRPIX1A"], h["CRPIX2A"] = 1.0, 1.0
        h["CRVAL1A"], h["CRVAL2A"] = float(xy0[0]), float(xy0[1])
        h["CUNIT1A"], h["CUNIT2A"] = "PIXEL", "PIXEL"
    else:
        h["LTV1"], h["LTV2"] = -xy0[0], -xy0[1]
    return h


def write_warp(path: str | Path, *, tract: Tract, xy0: tuple[int, int], image: np.ndarray,
               mask: np.ndarray, variance: np.ndarray, psf: np.ndarray,
               psf_positions: np.ndarray | None = None, visit: int, detector: int, band: str,
               noise: list[np.ndarray] = (), weight: float | None = None,
               mask_planes: dict[str, int] | None = None, instrument: str = "SIMCAM",
               mjd: float | None = None, afw_style: bool = False, atomic: bool = True) -> Path:
    """Write one warp. ``mask`` is in the bits of ``mask_planes`` (default canonical).

    ``psf``: (h, w) stamp, or (n, h, w) cube with ``psf_positions`` (n, 2) tract (x, y).
    With ``atomic`` the file is written as ``path + '.tmp'`` and renamed, the convention
    the daemon's inbox expects.
    """
    path = Path(path)
    planes = CANONICAL_PLANES if mask_planes is None else mask_planes
    ph = fits.Header()
    ph["VISIT"], ph["DETECTOR"], ph["BAND"], ph["TRACT"] = int(visit), int(detector), band, tract.id
    ph["INSTRUME"], ph["PHYSFILT"] = instrument, f"{band}~sim"
    if mjd is not None:
        ph["MJD-OBS"] = float(mjd)
    if weight is not None:
        ph["WEIGHT"] = float(weight)
    hdr = warp_header(tract, xy0, afw_style)
    mh = hdr.copy()
    del mh["BUNIT"]
    for name, bit in planes.items():
        mh[f"HIERARCH MP_{name}"] = bit
    vh = hdr.copy()
    vh["BUNIT"] = "nJy2"
    hdus = [fits.PrimaryHDU(header=ph),
            fits.ImageHDU(np.asarray(image, np.float32), hdr, name="IMAGE"),
            fits.ImageHDU(np.asarray(mask, np.int32), mh, name="MASK"),
            fits.ImageHDU(np.asarray(variance, np.float32), vh, name="VARIANCE"),
            fits.ImageHDU(np.asarray(psf, np.float64), name="PSF")]
    if psf_positions is not None:
        pos = np.asarray(psf_positions, float)
        hdus.append(fits.BinTableHDU(Table({"x": pos[:, 0], "y": pos[:, 1]}), name="PSFPOS"))
    for k, n in enumerate(noise):
        hdus.append(fits.ImageHDU(np.asarray(n, np.float32), hdr, name=f"NOISE{k}"))
    target = path.with_name(path.name + ".tmp") if atomic else path
    fits.HDUList(hdus).writeto(target, overwrite=True)
    if atomic:
        os.replace(target, path)
    return path
