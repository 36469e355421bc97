"""Independent brute-force reference coadd, written from SPEC §3 only.

It does NOT use streamcoadd's fold, state or warp-reading code: FITS files are read with astropy
directly, mask bits are remapped here from the ``MP_*`` keywords, and everything is summed in
float64 with explicit loops over warps and cells.  Only the skymap geometry
(:mod:`streamcoadd.core.skymap`), the canonical bit numbers and :class:`FoldConfig` are shared.

Rules (SPEC §3):

* a warp contributes to a cell iff every pixel of the cell INNER box is inside the warp and not
  ``NO_DATA``, and the centre pixel ``inner_min + inner // 2`` is covered;
* per pixel of the OUTER box, ``valid`` = inside the warp and not ``NO_DATA``;
* weight = header ``WEIGHT`` or ``1 / mean(sigma_clipped_stats(var[good], 3 sigma, 2 iters))``
  with good = not NO_DATA, no bad-plane bit, finite;
* good fraction = fraction of inner-box pixels without a bad-plane bit; the input is "fallback"
  if good fraction <= 1 - max_maskfrac; a cell uses only its good inputs if any, else all;
* sums over used inputs: ``sum_w = Σ w·valid``, ``sum_wI = Σ w·valid·I``,
  ``sum_w2var = Σ w²·valid·var``, ``sum_w_interp = Σ w·valid·bad``, ``psf_sum = Σ w·psf(centre)``
  (nearest grid stamp, cropped / zero-padded symmetrically to ``psf_size``), ``psf_w = Σ w``.

The core interpolates bad pixels before accumulating; the reference does not.  At pixels where
any used input had a bad-plane bit (``RefCell.interpolated``) the reference's ``sum_wI``,
``sum_w2var`` and noise sums leave that input out, so they are NOT comparable there; ``sum_w``
and ``sum_w_interp`` are comparable everywhere.
"""

from __future__ import annotations

import hashlib
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from astropy.io import fits
from astropy.stats import sigma_clipped_stats

from streamcoadd.core.config import FoldConfig
from streamcoadd.core.masks import CANONICAL_PLANES
from streamcoadd.core.skymap import Box, CellId, SkyMap

NO_DATA_BIT = 1 << CANONICAL_PLANES["NO_DATA"]


def bits_of(names) -> int:
    out = 0
    for n in names:
        out |= 1 << CANONICAL_PLANES[n]
    return out


@dataclass
class RefWarp:
    path: str
    content_hash: str
    tract: int
    visit: int
    detector: int
    band: str
    x0: int
    y0: int
    image: np.ndarray  # float64
    mask: np.ndarray  # int64, canonical bits
    variance: np.ndarray  # float64
    psf_stamps: np.ndarray  # (n, h, w) float64
    psf_positions: np.ndarray | None  # (n, 2) or None
    noise: list
    weight: float

    @property
    def box(self) -> Box:
        h, w = self.image.shape
        return Box(self.x0, self.y0, self.x0 + w, self.y0 + h)

    def psf_at(self, x: float, y: float) -> np.ndarray:
        if self.psf_positions is None:
            return self.psf_stamps[0]
        best, best_d = 0, None
        for i, (px, py) in enumerate(self.psf_positions):
            d = (px - x) ** 2 + (py - y) ** 2
            if best_d is None or d < best_d:
                best, best_d = i, d
        return self.psf_stamps[best]


@dataclass
class RefInput:
    visit: int
    detector: int
    weight: float
    good_fraction: float
    fallback: bool


@dataclass
class RefCell:
    cell: CellId
    band: str
    outer_box: Box
    inner_box: Box
    sum_w: np.ndarray
    sum_wI: np.ndarray
    sum_w2var: np.ndarray
    sum_w_interp: np.ndarray
    psf_sum: np.ndarray
    psf_w: float
    noise_sums: list
    interpolated: np.ndarray  # bool: some used input had a bad-plane pixel here
    mask_or: np.ndarray  # OR over valid pixels of used inputs of non-bad, non-dropped bits
    rejected_weight: dict  # bad plane -> Σ w·valid·(plane set)
    inputs: list  # RefInput of the used inputs
    fallback: bool  # True when the cell holds only fallback inputs

    @property
    def used(self) -> list[tuple[int, int]]:
        return sorted((i.visit, i.detector) for i in self.inputs)

    @property
    def image(self) -> np.ndarray:
        with np.errstate(invalid="ignore", divide="ignore"):
            return self.sum_wI / self.sum_w

    @property
    def variance(self) -> np.ndarray:
        with np.errstate(invalid="ignore", divide="ignore"):
            return self.sum_w2var / self.sum_w**2

    @property
    def psf(self) -> np.ndarray:
        return self.psf_sum / self.psf_w

    def noise_image(self, k: int) -> np.ndarray:
        with np.errstate(invalid="ignore", divide="ignore"):
            return self.noise_sums[k] / self.sum_w


class Reference(dict):
    """``{(CellId, band): RefCell}`` plus ``.warps`` (the RefWarp of every distinct input) and
    ``.candidates``: ``{(CellId, band): [(visit, detector), ...]}`` of every input that
    passed the overlap rule (used or not: fallback inputs of a cell with good inputs)."""

    warps: list
    candidates: dict


# --------------------------------------------------------------------------------------------


def read_warp_raw(path, fold_config: FoldConfig = FoldConfig(), noise_realizations: int = 0) -> RefWarp:
    """Read a SPEC §2 warp with astropy, independently of streamcoadd.io.warp_reader."""
    path = str(path)
    data = Path(path).read_bytes()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with fits.open(path, memmap=False) as hdul:
            ph = hdul[0].header
            ih = hdul["IMAGE"].header
            image = np.array(hdul["IMAGE"].data, dtype=np.float64)
            variance = np.array(hdul["VARIANCE"].data, dtype=np.float64)
            raw_mask = np.array(hdul["MASK"].data).astype(np.int64) & 0xFFFFFFFF
            mh = hdul["MASK"].header
            mask = np.zeros(raw_mask.shape, np.int64)
            for key in mh.keys():
                if key.startswith("MP_") and key[3:] in CANONICAL_PLANES:
                    src = int(mh[key])
                    mask |= ((raw_mask >> src) & 1) << CANONICAL_PLANES[key[3:]]
            if "LTV1" in ih:
                x0, y0 = -int(round(ih["LTV1"])), -int(round(ih["LTV2"]))
            else:
                x0 = int(round(ih["CRVAL1A"] - (ih.get("CRPIX1A", 1.0) - 1)))
                y0 = int(round(ih["CRVAL2A"] - (ih.get("CRPIX2A", 1.0) - 1)))
            psf = np.array(hdul["PSF"].data, dtype=np.float64)
            if psf.ndim == 2:
                stamps, positions = psf[None], None
            else:
                t = hdul["PSFPOS"].data
                stamps = psf
                positions = np.column_stack([np.asarray(t["x"], float), np.asarray(t["y"], float)])
            noise = [np.array(hdul[f"NOISE{k}"].data, dtype=np.float64)
                     for k in range(noise_realizations)]
            if "WEIGHT" in ph:
                weight = float(ph["WEIGHT"])
            else:
                bad = bits_of(fold_config.bad_planes) | NO_DATA_BIT
                good = ((mask & bad) == 0) & np.isfinite(variance)
                mean, _median, _std = sigma_clipped_stats(variance[good], sigma=3, maxiters=2)
                weight = 1.0 / float(mean)
            return RefWarp(
                path=path, content_hash=hashlib.sha256(data).hexdigest(),
                tract=int(ph["TRACT"]), visit=int(ph["VISIT"]), detector=int(ph["DETECTOR"]),
                band=str(ph["BAND"]).strip(), x0=x0, y0=y0, image=image, mask=mask,
                variance=variance, psf_stamps=stamps, psf_positions=positions, noise=noise,
                weight=weight)


def fit_stamp(stamp: np.ndarray, size: int) -> np.ndarray:
    """Crop or zero-pad an odd (h, w) stamp symmetrically about its centre to (size, size)."""
    out = np.zeros((size, size))
    h, w = stamp.shape
    for i in range(size):
        si = i - size // 2 + h // 2
        if not 0 <= si < h:
            continue
        for j in range(size):
            sj = j - size // 2 + w // 2
            if 0 <= sj < w:
                out[i, j] = stamp[si, sj]
    return out


def _cut(warp: RefWarp, arr: np.ndarray, box: Box, fill) -> np.ndarray:
    """``arr`` (warp-shaped) over tract ``box``; pixels outside the warp are ``fill``."""
    out = np.full(box.shape, fill, dtype=arr.dtype)
    inter = box.intersection(warp.box)
    if not inter.empty:
        out[inter.slices((box.x0, box.y0))] = arr[inter.slices((warp.x0, warp.y0))]
    return out


def reference_coadd(paths, skymap: SkyMap, fold_config: FoldConfig = FoldConfig(),
                    noise_realizations: int | None = None) -> Reference:
    """Brute-force coadd of the warp files ``paths``: ``{(CellId, band): RefCell}``.

    Duplicate files (same tract/visit/detector and same bytes) count once; the same
    tract/visit/detector with different content raises ``ValueError``.
    """
    cfg = fold_config
    nrz = cfg.noise_realizations if noise_realizations is None else noise_realizations
    bad_bits = bits_of(cfg.bad_planes)
    keep_bits = 0xFFFFFFFF & ~(bad_bits | bits_of(cfg.drop_planes) | NO_DATA_BIT)
    n_psf = cfg.psf_size

    warps: dict = {}
    for p in paths:
        w = read_warp_raw(p, cfg, nrz)
        key = (w.tract, w.visit, w.detector)
        if key in warps:
            if warps[key].content_hash != w.content_hash:
                raise ValueError(f"{p}: visit {w.visit} detector {w.detector} already seen "
                                 "with different content")
            continue
        warps[key] = w

    # candidates[(cell, band)] = list of (warp, good_fraction, fallback)
    candidates: dict = {}
    for w in warps.values():
        tract = skymap.tract(w.tract)
        wbox = w.box
        valid_full = (w.mask & NO_DATA_BIT) == 0
        for patch in tract.patches():
            if not tract.patch_outer_box(patch).overlaps(wbox):
                continue
            for cell in tract.cells_of(patch):
                inner = tract.cell_inner_box(cell)
                if not wbox.contains(inner):
                    continue
                v_inner = valid_full[inner.slices((w.x0, w.y0))]
                if not v_inner.all():
                    continue
                cx, cy = tract.cell_centre(cell)
                if not valid_full[cy - w.y0, cx - w.x0]:
                    continue
                m_inner = w.mask[inner.slices((w.x0, w.y0))]
                good_fraction = np.count_nonzero((m_inner & bad_bits) == 0) / m_inner.size
                fallback = good_fraction <= 1 - cfg.max_maskfrac
                candidates.setdefault((cell, w.band), []).append((w, good_fraction, fallback))

    result = Reference()
    result.warps = list(warps.values())
    result.candidates = {k: sorted((w.visit, w.detector) for w, _, _ in v)
                         for k, v in candidates.items()}
    for (cell, band), cands in candidates.items():
        tract = skymap.tract(cell.patch.tract)
        good = [c for c in cands if not c[2]]
        used = good if good else cands
        outer = tract.cell_outer_box(cell)
        shape = outer.shape
        sum_w = np.zeros(shape)
        sum_wI = np.zeros(shape)
        sum_w2var = np.zeros(shape)
        sum_w_interp = np.zeros(shape)
        noise_sums = [np.zeros(shape) for _ in range(nrz)]
        interpolated = np.zeros(shape, bool)
        mask_or = np.zeros(shape, np.int64)
        rejected = {p: np.zeros(shape) for p in cfg.bad_planes}
        psf_sum = np.zeros((n_psf, n_psf))
        psf_w = 0.0
        inputs = []
        cx, cy = tract.cell_centre(cell)
        for w, gf, fb in used:
            wt = w.weight
            m = _cut(w, w.mask, outer, NO_DATA_BIT)
            valid = (m & NO_DATA_BIT) == 0
            bad = valid & ((m & bad_bits) != 0)
            clean = valid & ~bad
            img = _cut(w, w.image, outer, np.nan)
            var = _cut(w, w.variance, outer, np.nan)
            sum_w += wt * valid
            sum_w_interp += wt * bad
            sum_wI += np.where(clean, wt * np.where(clean, img, 0.0), 0.0)
            sum_w2var += np.where(clean, wt * wt * np.where(clean, var, 0.0), 0.0)
            for k in range(nrz):
                nz = _cut(w, w.noise[k], outer, np.nan)
                noise_sums[k] += np.where(clean, wt * np.where(clean, nz, 0.0), 0.0)
            interpolated |= bad
            mask_or |= np.where(valid, m & keep_bits, 0)
            for plane in cfg.bad_planes:
                rejected[plane] += wt * (valid & ((m & bits_of([plane])) != 0))
            psf_sum += wt * fit_stamp(w.psf_at(cx, cy), n_psf)
            psf_w += wt
            inputs.append(RefInput(w.visit, w.detector, wt, gf, fb))
        result[(cell, band)] = RefCell(
            cell=cell, band=band, outer_box=outer, inner_box=tract.cell_inner_box(cell),
            sum_w=sum_w, sum_wI=sum_wI, sum_w2var=sum_w2var, sum_w_interp=sum_w_interp,
            psf_sum=psf_sum, psf_w=psf_w, noise_sums=noise_sums, interpolated=interpolated,
            mask_or=mask_or, rejected_weight=rejected, inputs=inputs, fallback=not good)
    return result


# --------------------------------------------------------------------------------------------
# helpers for the tests that compare the core with this reference

ROOT = Path(__file__).resolve().parents[1]
INTRP_BIT = 1 << CANONICAL_PLANES["INTRP"]
INEXACT_BIT = 1 << CANONICAL_PLANES["INEXACT_PSF"]


def run_cli(*args, check: int | None = 0, timeout: float = 120):
    """Run ``python -m streamcoadd ARGS`` from the repo root; returns CompletedProcess.
    ``check``: expected exit status (None: do not check)."""
    import os
    import subprocess
    import sys

    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env.pop("STREAMCOADD_DEBUG", None)
    p = subprocess.run([sys.executable, "-m", "streamcoadd", *map(str, args)], cwd=ROOT,
                       env=env, capture_output=True, text=True, timeout=timeout)
    if check is not None and p.returncode != check:
        raise AssertionError(f"streamcoadd {' '.join(map(str, args))} exited {p.returncode} "
                             f"(expected {check})\nstdout:\n{p.stdout}\nstderr:\n{p.stderr}")
    return p


def close_rel(a, b, rtol, what=""):
    """Assert ``a`` ≈ ``b`` elementwise: |a-b| <= rtol * max(|b|, scale) with scale =
    max |b| * 1e-3 (so values near zero are compared relative to the array's scale)."""
    a = np.asarray(a, np.float64)
    b = np.asarray(b, np.float64)
    assert a.shape == b.shape, f"{what}: shape {a.shape} != {b.shape}"
    if b.size == 0:
        return
    scale = np.max(np.abs(b)) * 1e-3 if np.isfinite(b).all() else 0.0
    tol = rtol * np.maximum(np.abs(b), scale)
    err = np.abs(a - b)
    bad = ~(err <= tol)
    if bad.any():
        i = np.unravel_index(np.argmax(np.where(bad, err / np.maximum(tol, 1e-300), 0)), a.shape)
        raise AssertionError(f"{what}: {int(bad.sum())} element(s) differ beyond rtol {rtol}; "
                             f"worst at {i}: core {a[i]!r} vs reference {b[i]!r}")


def compare_cell(core, ref: RefCell, fold_config: FoldConfig = FoldConfig(),
                 sums_rtol: float = 1e-10, rtol: float = 1e-6) -> None:
    """Compare one core cell (``State.cell``) with a :class:`RefCell` (see module doc)."""
    name = f"{ref.cell} band {ref.band}"
    assert core is not None, f"{name}: populated in the reference, empty in the core"
    assert core.outer_box == ref.outer_box and core.inner_box == ref.inner_box, name
    got = sorted((int(v), int(d)) for v, d in zip(core.contributors["visit"],
                                                  core.contributors["detector"]))
    assert got == ref.used, f"{name}: inputs {got} != reference {ref.used}"
    assert core.n_inputs == len(ref.inputs)
    # weights and fractions per contributor
    byid = {(i.visit, i.detector): i for i in ref.inputs}
    for row in core.contributors:
        r = byid[(int(row["visit"]), int(row["detector"]))]
        assert abs(row["weight"] - r.weight) <= 1e-12 * r.weight, f"{name}: weight"
        assert abs(row["good_fraction"] - r.good_fraction) < 1e-12, f"{name}: good fraction"
        assert bool(row["fallback"]) == r.fallback, f"{name}: fallback flag"
    s = core.sums
    has = ref.sum_w > 0
    clean = has & ~ref.interpolated
    close_rel(s["sum_w"], ref.sum_w, sums_rtol, f"{name} sum_w")
    close_rel(s["sum_w_interp"], ref.sum_w_interp, sums_rtol, f"{name} sum_w_interp")
    close_rel(s["sum_wI"][clean], ref.sum_wI[clean], sums_rtol, f"{name} sum_wI")
    close_rel(s["sum_w2var"][clean], ref.sum_w2var[clean], sums_rtol, f"{name} sum_w2var")
    close_rel(s["psf_sum"], ref.psf_sum, sums_rtol, f"{name} psf_sum")
    close_rel(s["psf_w"], ref.psf_w, sums_rtol, f"{name} psf_w")
    # finalized planes
    close_rel(core.image[clean], ref.image[clean], rtol, f"{name} image")
    close_rel(core.variance[clean], ref.variance[clean], rtol, f"{name} variance")
    close_rel(core.psf, ref.psf, rtol, f"{name} psf")
    for k, _ in enumerate(ref.noise_sums):
        close_rel(core.noise[k][clean], ref.noise_image(k)[clean], rtol, f"{name} noise {k}")
    # every valid pixel: finite image and positive finite variance (interpolation included)
    assert np.isfinite(core.image[has]).all(), f"{name}: non-finite image where data"
    assert (np.isfinite(core.variance[has]) & (core.variance[has] > 0)).all(), \
        f"{name}: bad variance where data"
    # mask
    m = np.asarray(core.mask).astype(np.int64) & 0xFFFFFFFF
    nod = (m & NO_DATA_BIT) != 0
    assert np.array_equal(nod, ~has), f"{name}: NO_DATA != (no input has data)"
    plain = ~(INTRP_BIT | INEXACT_BIT)
    keep = 0xFFFFFFFF & ~(bits_of(fold_config.bad_planes) | bits_of(fold_config.drop_planes)
                          | NO_DATA_BIT)
    assert np.array_equal((m & keep & plain)[has], (ref.mask_or & plain)[has]), \
        f"{name}: OR-ed mask bits differ"
    want_intrp = ref.interpolated | ((ref.mask_or & INTRP_BIT) != 0)
    assert np.array_equal(((m & INTRP_BIT) != 0)[has], want_intrp[has]), f"{name}: INTRP"
    with np.errstate(invalid="ignore", divide="ignore"):
        frac = np.where(has, ref.sum_w_interp / ref.sum_w, 0)
    want_inexact = (frac > fold_config.inexact_psf_threshold) | ((ref.mask_or & INEXACT_BIT) != 0)
    assert np.array_equal(((m & INEXACT_BIT) != 0)[has], want_inexact[has]), f"{name}: INEXACT_PSF"
    for plane in fold_config.bad_planes:
        bit = bits_of([plane])
        if plane in fold_config.propagate_thresholds:
            with np.errstate(invalid="ignore", divide="ignore"):
                pf = np.where(has, ref.rejected_weight[plane] / ref.sum_w, 0)
            want = pf > fold_config.propagate_thresholds[plane]
            assert np.array_equal(((m & bit) != 0)[has], want[has]), f"{name}: {plane} propagation"
        else:
            assert not (m & bit).any(), f"{name}: bad plane {plane} leaked into the coadd mask"
    for plane in fold_config.drop_planes:
        assert not (m & bits_of([plane])).any(), f"{name}: dropped plane {plane} in the mask"
