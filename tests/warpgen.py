"""Fast numpy generator of realistic small warps for the tests (demo skymap sized).

A generated warp has: a sky level plus gaussian sources convolved with the warp's PSF,
per-warp noise (variance = read/sky noise + source Poisson term), an arbitrary ``xy0`` (negative
tract coordinates and several patches allowed), partial coverage (``NO_DATA``: image NaN,
variance inf or NaN), defects (BAD column segments, CR blobs, SAT cores with a bleed trail,
a SUSPECT rectangle), informational bits (DETECTED, EDGE, NOT_DEBLENDED), optionally a heavily
masked box (to trigger the fallback rule), a PSF as a single stamp or a grid (cube + positions),
optional noise realizations, optional header ``WEIGHT`` and optional non-canonical mask bits.
Everything is written through :func:`streamcoadd.io.warp_writer.write_warp`.

:func:`write_broken` writes one deliberately malformed file for every SPEC §2 rejection case.

Masks are generated in the canonical bits (:data:`streamcoadd.core.masks.CANONICAL_PLANES`); with
``mask_planes`` the file is written with another bit assignment (the same planes, remapped).
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from astropy.io import fits

from streamcoadd.core.masks import CANONICAL_PLANES
from streamcoadd.core.skymap import Box, Tract
from streamcoadd.io.warp_writer import write_warp

BIT = {name: 1 << b for name, b in CANONICAL_PLANES.items()}


# --------------------------------------------------------------------------------------------
# PSF helpers


def gaussian_stamp(shape: tuple[int, int], sigma_x: float, sigma_y: float | None = None,
                   theta: float = 0.0, dx: float = 0.0, dy: float = 0.0) -> np.ndarray:
    """Normalised (sum 1) elliptical gaussian on an odd (h, w) stamp, centred (+ dx, dy)."""
    h, w = shape
    sigma_y = sigma_x if sigma_y is None else sigma_y
    y, x = np.mgrid[0:h, 0:w].astype(float)
    x -= (w - 1) / 2 + dx
    y -= (h - 1) / 2 + dy
    c, s = math.cos(theta), math.sin(theta)
    u, v = c * x + s * y, -s * x + c * y
    p = np.exp(-0.5 * ((u / sigma_x) ** 2 + (v / sigma_y) ** 2))
    return p / p.sum()


def shuffled_planes(seed: int) -> dict[str, int]:
    """A non-canonical assignment of every canonical plane to a bit (a permutation of 0..31)."""
    rng = np.random.default_rng(seed)
    bits = rng.permutation(32)[: len(CANONICAL_PLANES)]
    planes = {name: int(b) for name, b in zip(CANONICAL_PLANES, bits)}
    assert planes != dict(CANONICAL_PLANES)
    return planes


def canonical_to_planes(mask: np.ndarray, planes: dict[str, int]) -> np.ndarray:
    """Re-express a canonical-bit mask in the bit assignment ``planes`` (name -> bit)."""
    out = np.zeros(mask.shape, np.int64)
    for name, bit in planes.items():
        out |= ((mask >> CANONICAL_PLANES[name]) & 1).astype(np.int64) << bit
    # int32 view of a 32-bit pattern (bit 31 becomes the sign bit)
    return out.astype(np.uint32).view(np.int32)


# --------------------------------------------------------------------------------------------
# generator


@dataclass
class GenWarp:
    """Arrays of one generated warp; pixel [0, 0] is tract pixel ``xy0``; mask canonical."""

    xy0: tuple[int, int]
    image: np.ndarray
    mask: np.ndarray
    variance: np.ndarray
    psf: np.ndarray  # (h, w) or (n, h, w)
    psf_positions: np.ndarray | None = None
    noise: list = field(default_factory=list)

    @property
    def box(self) -> Box:
        h, w = self.image.shape
        return Box(self.xy0[0], self.xy0[1], self.xy0[0] + w, self.xy0[1] + h)

    def valid(self) -> np.ndarray:
        return (self.mask & BIT["NO_DATA"]) == 0


def _psf_model(rng, psf, psf_shape, psf_grid, box, seeing):
    """Return (psf array, positions or None, function (x, y) -> (sigma_x, sigma_y, theta))."""
    e = rng.uniform(0.0, 0.15)
    theta0 = rng.uniform(0, math.pi)
    gx, gy = rng.uniform(-0.15, 0.15, 2) / max(box.width, box.height)

    def params(x, y):
        s = seeing * (1 + gx * (x - box.x0) + gy * (y - box.y0))
        return s * (1 + e), s * (1 - e), theta0

    if psf == "stamp":
        sx, sy, th = params((box.x0 + box.x1) / 2, (box.y0 + box.y1) / 2)
        return gaussian_stamp(psf_shape, sx, sy, th), None, params
    if psf == "grid":
        nx, ny = psf_grid
        # positions slightly irregular so that no cell centre is equidistant from two stamps
        xs = box.x0 + (np.arange(nx) + 0.5) * box.width / nx + 0.137
        ys = box.y0 + (np.arange(ny) + 0.5) * box.height / ny + 0.311
        pos, stamps = [], []
        for y in ys:
            for x in xs:
                sx, sy, th = params(x, y)
                pos.append((x, y))
                stamps.append(gaussian_stamp(psf_shape, sx, sy, th))
        return np.array(stamps), np.array(pos, float), params
    raise ValueError(f"psf must be 'stamp' or 'grid', got {psf!r}")


def _coverage_mask(rng, coverage, box):
    """Boolean valid map (True = has data) over ``box``."""
    h, w = box.shape
    if coverage is None or coverage == "full":
        return np.ones((h, w), bool)
    if isinstance(coverage, Box):
        v = np.zeros((h, w), bool)
        inter = coverage.intersection(box)
        if not inter.empty:
            v[inter.slices((box.x0, box.y0))] = True
        return v
    if isinstance(coverage, np.ndarray):
        assert coverage.shape == (h, w)
        return coverage.astype(bool)
    if coverage == "rotated":
        # a detector footprint: rotated rectangle inside the warp box
        ang = rng.uniform(-0.25, 0.25)
        cx, cy = (w - 1) / 2 + rng.uniform(-0.05, 0.05) * w, (h - 1) / 2 + rng.uniform(-0.05, 0.05) * h
        hw, hh = rng.uniform(0.36, 0.48) * w, rng.uniform(0.36, 0.48) * h
        y, x = np.mgrid[0:h, 0:w].astype(float)
        c, s = math.cos(ang), math.sin(ang)
        u, v = c * (x - cx) + s * (y - cy), -s * (x - cx) + c * (y - cy)
        return (np.abs(u) <= hw) & (np.abs(v) <= hh)
    if coverage == "chipgap":
        v = np.ones((h, w), bool)
        x0 = int(rng.integers(w // 4, 3 * w // 4))
        v[:, x0: x0 + int(rng.integers(3, 8))] = False
        return v
    raise ValueError(f"unknown coverage {coverage!r}")


def _paint_gaussian(img, x, y, flux, sigma, x0, y0):
    """Add a round gaussian source of ``flux`` at tract (x, y) to ``img`` (origin x0, y0)."""
    h, w = img.shape
    r = int(math.ceil(5 * sigma))
    lx, ly = x - x0, y - y0
    i0, i1 = max(0, int(ly) - r), min(h, int(ly) + r + 2)
    j0, j1 = max(0, int(lx) - r), min(w, int(lx) + r + 2)
    if i0 >= i1 or j0 >= j1:
        return
    yy, xx = np.mgrid[i0:i1, j0:j1]
    img[i0:i1, j0:j1] += flux / (2 * math.pi * sigma**2) * np.exp(
        -0.5 * ((xx - lx) ** 2 + (yy - ly) ** 2) / sigma**2)


def generate(tract: Tract, *, xy0: tuple[int, int], shape: tuple[int, int], seed: int,
             noise_sigma: float | None = None, sky: float | None = None,
             n_sources: int | None = None, coverage="full", defects: bool = True,
             heavy_mask: Box | list | None = None, heavy_fraction: float = 0.7,
             psf: str = "stamp", psf_shape: tuple[int, int] | None = None,
             psf_grid: tuple[int, int] = (2, 2), seeing: float | None = None,
             noise_realizations: int = 0, nan_in_bad: bool = False,
             nodata_variance: str = "mixed") -> GenWarp:
    """Generate one realistic warp of ``shape = (H, W)`` at tract pixel ``xy0``.

    ``heavy_mask``: tract box(es) in which ``heavy_fraction`` of the pixels are BAD (random
    columns-and-blobs pattern), to make inputs that count as fallback for the cells there.
    ``nan_in_bad``: put NaN image values in some BAD pixels (allowed: they are interpolated).
    """
    rng = np.random.default_rng(seed)
    h, w = shape
    box = Box(xy0[0], xy0[1], xy0[0] + w, xy0[1] + h)
    noise_sigma = float(rng.uniform(3.0, 12.0)) if noise_sigma is None else float(noise_sigma)
    sky = float(rng.uniform(-2.0, 2.0)) if sky is None else float(sky)
    seeing = float(rng.uniform(1.3, 2.6)) if seeing is None else float(seeing)
    if psf_shape is None:
        psf_shape = tuple(int(s) for s in rng.choice([21, 25, 35, 41], 2))
    psf_arr, psf_pos, psf_params = _psf_model(rng, psf, psf_shape, psf_grid, box, seeing)

    # --- sources, convolved with the (local) PSF width
    model = np.full((h, w), sky, np.float64)
    n_sources = int(rng.integers(5, 6 + h * w // 1500)) if n_sources is None else n_sources
    xs = rng.uniform(box.x0 - 5, box.x1 + 5, n_sources)
    ys = rng.uniform(box.y0 - 5, box.y1 + 5, n_sources)
    fluxes = noise_sigma * 40 * rng.pareto(1.5, n_sources) + noise_sigma * 20
    for x, y, f in zip(xs, ys, fluxes):
        sx, sy, _ = psf_params(x, y)
        _paint_gaussian(model, x, y, f, math.sqrt(sx * sy), box.x0, box.y0)
    variance = noise_sigma**2 + np.maximum(model - sky, 0) / 4.0
    image = model + rng.standard_normal((h, w)) * np.sqrt(variance)
    mask = np.zeros((h, w), np.int64)
    det = (model - sky) > 3 * noise_sigma
    mask[det] |= BIT["DETECTED"]
    blend = det & (rng.random((h, w)) < 0.02)
    mask[blend] |= BIT["NOT_DEBLENDED"]

    if defects:
        # BAD column segments
        for _ in range(int(rng.integers(1, 3))):
            c = int(rng.integers(0, w))
            r0 = int(rng.integers(0, h))
            r1 = min(h, r0 + int(rng.integers(h // 4 + 1, h + 1)))
            mask[r0:r1, c] |= BIT["BAD"]
            image[r0:r1, c] = rng.choice([0.0, 1e5, -3e3])
            if nan_in_bad:
                image[r0: r0 + max(1, (r1 - r0) // 3), c] = np.nan
        # cosmic rays: small blobs, bright
        for _ in range(int(rng.integers(2, 6))):
            cy, cx = int(rng.integers(0, h)), int(rng.integers(0, w))
            n = int(rng.integers(2, 7))
            for _k in range(n):
                yy = min(h - 1, max(0, cy + int(rng.integers(-2, 3))))
                xx = min(w - 1, max(0, cx + int(rng.integers(-2, 3))))
                mask[yy, xx] |= BIT["CR"]
                image[yy, xx] += noise_sigma * rng.uniform(30, 300)
        # saturation core + bleed trail around a bright star
        sat_level = float(noise_sigma * rng.uniform(80, 200))
        sx, sy = int(rng.integers(5, max(6, w - 5))), int(rng.integers(5, max(6, h - 5)))
        _paint_gaussian(model, box.x0 + sx, box.y0 + sy, sat_level * 60, seeing, box.x0, box.y0)
        yy, xx = np.mgrid[0:h, 0:w]
        core = (xx - sx) ** 2 + (yy - sy) ** 2 <= int(rng.integers(2, 5)) ** 2
        trail = (xx == sx) & (np.abs(yy - sy) <= int(rng.integers(3, 12)))
        sat = core | trail
        mask[sat] |= BIT["SAT"]
        image[sat] = sat_level
        # SUSPECT rectangle
        if rng.random() < 0.7:
            r0, c0 = int(rng.integers(0, h)), int(rng.integers(0, w))
            mask[r0: r0 + int(rng.integers(2, 6)), c0: c0 + int(rng.integers(2, 8))] |= BIT["SUSPECT"]

    if heavy_mask is not None:
        boxes = heavy_mask if isinstance(heavy_mask, (list, tuple)) else [heavy_mask]
        for hb in boxes:
            inter = hb.intersection(box)
            if inter.empty:
                continue
            sl = inter.slices((box.x0, box.y0))
            sub = mask[sl]
            # whole columns first (like a bad amplifier), then random pixels, to reach the
            # requested fraction within the box
            ncols = sub.shape[1]
            ncol_bad = int(ncols * heavy_fraction * 0.8)
            cols = rng.choice(ncols, ncol_bad, replace=False)
            sub[:, cols] |= BIT["BAD"]
            remaining = heavy_fraction * sub.size - np.count_nonzero(sub & BIT["BAD"])
            if remaining > 0:
                free = np.flatnonzero((sub & BIT["BAD"]) == 0)
                pick = rng.choice(free, min(len(free), int(math.ceil(remaining))), replace=False)
                sub.reshape(-1)[pick] |= BIT["BAD"]
            mask[sl] = sub

    # --- coverage (NO_DATA) last, so it overrides everything
    valid = _coverage_mask(rng, coverage, box)
    nodata = ~valid
    # EDGE: a 2-px band inside the valid region along its boundary (dropped from the coadd)
    if nodata.any():
        from scipy.ndimage import binary_dilation
        edge = binary_dilation(nodata, iterations=2) & valid
        mask[edge] |= BIT["EDGE"]
    mask[nodata] = BIT["NO_DATA"]
    image[nodata] = np.nan
    if nodata_variance == "inf":
        variance[nodata] = np.inf
    elif nodata_variance == "nan":
        variance[nodata] = np.nan
    else:
        variance[nodata] = np.where(rng.random(int(nodata.sum())) < 0.5, np.inf, np.nan)

    noise = []
    for _k in range(noise_realizations):
        n = (rng.standard_normal((h, w)) * np.sqrt(np.where(valid, variance, 1.0))).astype(np.float32)
        n[nodata] = np.nan
        noise.append(n)

    return GenWarp(xy0=(int(xy0[0]), int(xy0[1])), image=image.astype(np.float32),
                   mask=mask.astype(np.int32), variance=variance.astype(np.float32),
                   psf=psf_arr, psf_positions=psf_pos, noise=noise)


def write_gen(path, tract: Tract, g: GenWarp, *, visit: int, detector: int, band: str = "r",
              weight: float | None = None, mask_planes: dict[str, int] | None = None,
              afw_style: bool = False, mjd: float | None = 60000.0) -> Path:
    """Write a :class:`GenWarp` through ``write_warp`` (mask remapped if ``mask_planes``)."""
    mask = g.mask if mask_planes is None else canonical_to_planes(g.mask, mask_planes)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    return write_warp(path, tract=tract, xy0=g.xy0, image=g.image, mask=mask,
                      variance=g.variance, psf=g.psf, psf_positions=g.psf_positions,
                      visit=visit, detector=detector, band=band, noise=g.noise, weight=weight,
                      mask_planes=mask_planes, afw_style=afw_style, mjd=mjd)


def make_warp(path, tract: Tract, *, visit: int, detector: int, band: str = "r",
              xy0=(0, 0), shape=(120, 120), seed: int | None = None, weight=None,
              mask_planes=None, afw_style=False, **kw) -> Path:
    """Generate and write one warp; returns the path. ``kw`` go to :func:`generate`."""
    if seed is None:
        seed = (visit * 1009 + detector * 7 + sum(map(ord, band))) % 2**31
    g = generate(tract, xy0=xy0, shape=shape, seed=seed, **kw)
    return write_gen(path, tract, g, visit=visit, detector=detector, band=band, weight=weight,
                     mask_planes=mask_planes, afw_style=afw_style)


def random_warp_set(directory, tract: Tract, n: int, seed: int, *, bands=("r",),
                    size_range=(80, 200), psf_grid_prob=0.4, xy_range=None,
                    **kw) -> list[Path]:
    """``n`` warps with random boxes over the tract (incl. negative coordinates), coverage,
    PSF kinds and bands; distinct (visit, detector)."""
    rng = np.random.default_rng(seed)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    g = tract.cells
    lo = -g.patch_border
    hi = tract.inner_box.x1 + g.patch_border
    xy_range = (lo, hi) if xy_range is None else xy_range
    out = []
    for i in range(n):
        w, h = (int(v) for v in rng.integers(size_range[0], size_range[1] + 1, 2))
        x0 = int(rng.integers(xy_range[0], xy_range[1] - w + 1))
        y0 = int(rng.integers(xy_range[0], xy_range[1] - h + 1))
        cov = str(rng.choice(["full", "rotated", "chipgap"], p=[0.4, 0.4, 0.2]))
        psf = "grid" if rng.random() < psf_grid_prob else "stamp"
        band = str(bands[i % len(bands)])
        visit, det = 1000 + i // 3, i % 3
        p = make_warp(directory / f"warp_v{visit}_d{det}_{band}.fits", tract, visit=visit,
                      detector=det, band=band, xy0=(x0, y0), shape=(h, w),
                      seed=int(rng.integers(2**31)), coverage=cov, psf=psf,
                      psf_grid=(int(rng.integers(1, 4)), int(rng.integers(1, 4))), **kw)
        out.append(p)
    return out


# --------------------------------------------------------------------------------------------
# broken files: one per SPEC §2 rejection case

#: case -> regular expression (case-insensitive) the rejection reason must match
BROKEN_CASES: dict[str, str] = {
    "empty": r"empty",
    "not_fits": r"not a FITS",
    "truncated_data": r"truncat|readable|missing|short|data|size",
    "truncated_header": r"truncat|readable|missing|header|END|FITS",
    "garbage_after_header": r"readable|FITS|truncat|header",
    "truncated_at_hdu": r"MASK|VARIANCE|missing|truncat",
    "missing_image": r"IMAGE",
    "missing_mask": r"MASK",
    "missing_variance": r"VARIANCE",
    "missing_psf": r"PSF",
    "empty_image_hdu": r"IMAGE.*(no data|missing)|no data",
    "mask_shape": r"MASK.*shape|shape.*MASK",
    "variance_shape": r"VARIANCE.*shape|shape.*VARIANCE",
    "image_3d": r"2-D|dimension|shape",
    "wcs_half_pixel": r"WCS",
    "wcs_shifted": r"WCS",
    "wcs_wrong_scale": r"WCS",
    "wcs_wrong_crval": r"WCS",
    "wcs_not_tan": r"WCS|TAN",
    "wcs_missing": r"WCS|TAN|CTYPE",
    "no_origin": r"origin|LTV",
    "origin_disagree": r"origin|disagree",
    "origin_fractional": r"origin|integer",
    "nonfinite_image_good": r"IMAGE.*non-finite",
    "inf_image_good": r"IMAGE.*non-finite",
    "nonfinite_variance_good": r"VARIANCE.*non-finite|VARIANCE.*non-positive",
    "negative_variance_good": r"VARIANCE.*non-positive",
    "bunit_wrong": r"BUNIT|nJy|unit",
    "bunit_missing": r"BUNIT|nJy|unit",
    "no_mask_planes": r"MP_",
    "float_mask": r"MASK.*integer|integer",
    "missing_visit": r"VISIT",
    "missing_detector": r"DETECTOR",
    "missing_band": r"BAND",
    "missing_tract": r"TRACT",
    "unknown_tract": r"tract",
    "weight_nonpositive": r"WEIGHT",
    "weight_nan": r"WEIGHT",
    "psf_even": r"PSF.*odd|odd",
    "psf_cube_no_psfpos": r"PSFPOS",
    "psfpos_wrong_rows": r"PSFPOS.*rows|rows",
    "psfpos_no_columns": r"PSFPOS.*column|column",
    "psf_nonfinite": r"PSF.*non-finite",
    "psf_not_normalised": r"PSF.*sum",
    "psf_1d": r"PSF.*(2-D|3-D|shape)",
}


def _good_warp_hdul(tract: Tract, *, xy0=(20, 30), shape=(60, 70), seed=1, psf="stamp",
                    visit=1, detector=2, band="r", tmp: Path):
    """Write a good warp to ``tmp`` and return it opened as an in-memory HDUList."""
    g = generate(tract, xy0=xy0, shape=shape, seed=seed, psf=psf, psf_shape=(21, 21),
                 coverage=Box(xy0[0], xy0[1], xy0[0] + shape[1], xy0[1] + shape[0] - 10))
    write_gen(tmp, tract, g, visit=visit, detector=detector, band=band)
    with fits.open(tmp) as hdul:
        hdul = fits.HDUList([h.copy() for h in hdul])
    return hdul, g


def write_broken(directory, tract: Tract, case: str, name: str | None = None) -> Path:
    """Write the malformed file for ``case`` (a key of :data:`BROKEN_CASES`); returns its path.

    Every file is a good warp with exactly one thing wrong.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / (name or f"broken_{case}.fits")
    tmp = directory / f".good_for_{case}.fits"
    psf = "grid" if case.startswith("psfpos") or case == "psf_cube_no_psfpos" else "stamp"
    hdul, g = _good_warp_hdul(tract, tmp=tmp, psf=psf)
    raw = tmp.read_bytes()
    tmp.unlink()
    ph, ih = hdul[0].header, hdul["IMAGE"].header

    def good_pixel():
        v = g.valid() & (g.mask & (BIT["BAD"] | BIT["SAT"] | BIT["CR"] | BIT["SUSPECT"]) == 0)
        r, c = np.argwhere(v)[len(np.argwhere(v)) // 2]
        return int(r), int(c)

    if case == "empty":
        path.write_bytes(b"")
        return path
    if case == "not_fits":
        path.write_bytes(b"This is not a FITS file at all, just some text.\n" * 100)
        return path
    if case == "truncated_data":
        path.write_bytes(raw[: int(len(raw) * 0.6) // 2880 * 2880 + 1000])
        return path
    if case == "truncated_header":
        path.write_bytes(raw[: 2880 + 1200])  # inside the IMAGE header
        return path
    if case == "garbage_after_header":
        path.write_bytes(raw[:2880] + b"\x00\x17garbage" * 500)
        return path

    if case == "truncated_at_hdu":
        # cut cleanly after the IMAGE HDU: a valid FITS file that lacks the rest
        with fits.open(io.BytesIO(raw)) as h:
            info = h.fileinfo(1)
            end = info["datLoc"] + info["datSpan"]
        path.write_bytes(raw[:end])
        return path

    if case.startswith("missing_") and case[8:].upper() in ("IMAGE", "MASK", "VARIANCE", "PSF"):
        del hdul[case[8:].upper()]
    elif case == "empty_image_hdu":
        hdul["IMAGE"] = fits.ImageHDU(None, ih, name="IMAGE")
        hdul["IMAGE"].header["BUNIT"] = "nJy"
    elif case == "mask_shape":
        m = hdul["MASK"]
        hdul["MASK"] = fits.ImageHDU(m.data[:-1, :], m.header, name="MASK")
    elif case == "variance_shape":
        v = hdul["VARIANCE"]
        hdul["VARIANCE"] = fits.ImageHDU(v.data[:, :-3], v.header, name="VARIANCE")
    elif case == "image_3d":
        im = hdul["IMAGE"]
        hdul["IMAGE"] = fits.ImageHDU(np.stack([im.data, im.data]), ih, name="IMAGE")
    elif case == "wcs_half_pixel":
        ih["CRPIX1"] += 0.5
    elif case == "wcs_shifted":
        ih["CRPIX1"] += 3.0  # the grid of another origin: LTV and WCS disagree by 3 px
    elif case == "wcs_wrong_scale":
        for k in ("CDELT1", "CDELT2", "CD1_1", "CD2_2", "PC1_1", "PC2_2"):
            if k in ih:
                ih[k] = ih[k] * 1.01
    elif case == "wcs_wrong_crval":
        ih["CRVAL2"] = ih["CRVAL2"] + 0.01
    elif case == "wcs_not_tan":
        ih["CTYPE1"], ih["CTYPE2"] = "RA---SIN", "DEC--SIN"
    elif case == "wcs_missing":
        for k in list(ih.keys()):
            if k[:5] in ("CTYPE", "CRVAL", "CRPIX", "CDELT", "CUNIT") and not k.endswith("A") \
                    or k.startswith(("CD1_", "CD2_", "PC1_", "PC2_")):
                del ih[k]
    elif case == "no_origin":
        del ih["LTV1"], ih["LTV2"]
    elif case == "origin_disagree":
        ih["WCSNAMEA"] = "PHYSICAL"
        ih["CRPIX1A"], ih["CRPIX2A"] = 1.0, 1.0
        ih["CRVAL1A"], ih["CRVAL2A"] = float(g.xy0[0] + 5), float(g.xy0[1])
    elif case == "origin_fractional":
        ih["LTV1"] = -g.xy0[0] - 0.5
    elif case in ("nonfinite_image_good", "inf_image_good"):
        r, c = good_pixel()
        hdul["IMAGE"].data[r, c] = np.nan if case.startswith("nonfinite") else np.inf
    elif case == "nonfinite_variance_good":
        r, c = good_pixel()
        hdul["VARIANCE"].data[r, c] = np.nan
    elif case == "negative_variance_good":
        r, c = good_pixel()
        hdul["VARIANCE"].data[r, c] = -1.0
    elif case == "bunit_wrong":
        ih["BUNIT"] = "count"
    elif case == "bunit_missing":
        del ih["BUNIT"]
    elif case == "no_mask_planes":
        mh = hdul["MASK"].header
        for k in [k for k in mh.keys() if k.startswith("MP_")]:
            del mh[k]
    elif case == "float_mask":
        m = hdul["MASK"]
        hdul["MASK"] = fits.ImageHDU(m.data.astype(np.float32), m.header, name="MASK")
    elif case in ("missing_visit", "missing_detector", "missing_band", "missing_tract"):
        del ph[case[8:].upper()]
    elif case == "unknown_tract":
        ph["TRACT"] = 4242
    elif case == "weight_nonpositive":
        ph["WEIGHT"] = -1.0
    elif case == "weight_nan":
        ph["WEIGHT"] = "NaN"
    elif case == "psf_even":
        hdul["PSF"] = fits.ImageHDU(gaussian_stamp((20, 20), 2.0), name="PSF")
    elif case == "psf_cube_no_psfpos":
        del hdul["PSFPOS"]
    elif case == "psfpos_wrong_rows":
        from astropy.table import Table
        t = Table(hdul["PSFPOS"].data)
        hdul["PSFPOS"] = fits.BinTableHDU(t[:-1], name="PSFPOS")
    elif case == "psfpos_no_columns":
        from astropy.table import Table
        t = Table(hdul["PSFPOS"].data)
        t.rename_columns(["x", "y"], ["u", "v"])
        hdul["PSFPOS"] = fits.BinTableHDU(t, name="PSFPOS")
    elif case == "psf_nonfinite":
        d = hdul["PSF"].data.copy()
        d[3, 4] = np.nan
        hdul["PSF"] = fits.ImageHDU(d, name="PSF")
    elif case == "psf_not_normalised":
        hdul["PSF"] = fits.ImageHDU(hdul["PSF"].data * 3.0, name="PSF")
    elif case == "psf_1d":
        hdul["PSF"] = fits.ImageHDU(np.ones(11) / 11, name="PSF")
    else:
        raise ValueError(f"unknown broken case {case!r}")
    hdul.writeto(path, overwrite=True, output_verify="silentfix")
    return path


def stack_warp_set(directory, tract: Tract, n: int, seed: int, *, region: Box,
                   jitter: int = 15, band: str = "r", visit0: int = 100,
                   coverage_choices=("full", "rotated", "chipgap"), psf_grid_prob=0.5,
                   weight_prob=0.0, remap_prob=0.0, afw_prob=0.0, **kw) -> list[Path]:
    """``n`` warps all covering roughly ``region`` (each shifted by up to ``jitter`` px and
    grown/shrunk a little), so most cells in ``region`` get several inputs."""
    rng = np.random.default_rng(seed)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    out = []
    for i in range(n):
        dx0, dy0, dx1, dy1 = (int(v) for v in rng.integers(-jitter, jitter + 1, 4))
        x0, y0 = region.x0 + dx0, region.y0 + dy0
        w, h = region.width + dx1 - dx0, region.height + dy1 - dy0
        cov = str(rng.choice(list(coverage_choices)))
        psf = "grid" if rng.random() < psf_grid_prob else "stamp"
        visit, det = visit0 + i // 2, i % 2
        weight = float(rng.uniform(0.005, 0.05)) if rng.random() < weight_prob else None
        planes = shuffled_planes(int(rng.integers(2**31))) if rng.random() < remap_prob else None
        afw = bool(rng.random() < afw_prob)
        p = make_warp(directory / f"stack_{band}_v{visit}_d{det}.fits", tract, visit=visit,
                      detector=det, band=band, xy0=(x0, y0), shape=(h, w),
                      seed=int(rng.integers(2**31)), coverage=cov, psf=psf,
                      psf_grid=(int(rng.integers(1, 4)), int(rng.integers(1, 4))),
                      weight=weight, mask_planes=planes, afw_style=afw, **kw)
        out.append(p)
    return out
