"""The fold: pure numpy functions that add one warp to the accumulators of one cell (SPEC §3).

No I/O here. The flow for one warp is::

    prepared = prepare_warp(warp, config)            # weight, interpolation, masks (once)
    for cell in cells the warp touches:
        cin = cell_input(prepared, tract, cell, config)   # overlap rule, good fraction
        if cin is not None:
            fold_cell(accumulator, cin, prepared, config)

Arrays of a cell have the shape of the cell's *outer* box ``(outer, outer)``; sums are
float64.  Every input contributes to every valid pixel of a cell with the same scalar
weight; bad pixels are interpolated first (see :func:`interpolate_bad_pixels`), so the
coadd PSF is the weighted mean of the input PSFs.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field, replace

import numpy as np
from astropy.stats import SigmaClip

from streamcoadd.core import kernels
from streamcoadd.core.config import FoldConfig
from streamcoadd.core.errors import StateError, WarpRejected
from streamcoadd.core.masks import CANONICAL_PLANES, bitmask
from streamcoadd.core.psf import psf_moments, resize_stamp
from streamcoadd.core.skymap import Box, CellId, PatchId, Tract
from streamcoadd.core.warp import NO_DATA, WEIGHT_RANGE, Warp

GROUPS = ("good", "fallback")

#: environment variable naming the numba kernels to bypass in favour of the numpy/astropy
#: reference code ("clip", "fold", "read", comma-separated, or "all"): for A/B timing and
#: for checking a result against the reference; read at each call
REFERENCE_ENV = "STREAMCOADD_REFERENCE"


def use_reference(what: str) -> bool:
    """True when ``what`` ("clip", "fold" or "read") must take the reference path
    (named in the ``STREAMCOADD_REFERENCE`` environment variable, or "all" is)."""
    named = os.environ.get(REFERENCE_ENV, "")
    return bool(named) and (what in named.split(",") or named == "all")


# --------------------------------------------------------------------------- warp level

# Integer per-pixel counts (inputs with data, interpolated, per mask bit and plane) are
# uint16: half the memory of int32 (a patch warp dirties ~680 cells; their counts are a
# third of a cell's bytes), exact up to MAX_INPUTS inputs in one group of one cell --
# decades of LSST depth; fold_cell refuses to go past it rather than wrap.
COUNT_DTYPE = np.dtype(np.uint16)
MAX_INPUTS = int(np.iinfo(COUNT_DTYPE).max)

@dataclass
class PreparedWarp:
    """A warp made ready to fold: NO_DATA pixels zeroed, bad pixels interpolated.

    ``valid``: pixels with data (bool, warp shape); ``bad``: valid pixels under a bad plane
    that were interpolated; ``or_mask``: bits that are OR-ed into the coadd mask (0 outside
    ``valid``); ``planes``: bool maps of the planes propagated by threshold.
    """

    warp: Warp
    weight: float
    image: np.ndarray | None
    variance: np.ndarray | None
    noise: list[np.ndarray]
    valid: np.ndarray
    bad: np.ndarray
    or_mask: np.ndarray
    planes: dict[str, np.ndarray]
    # w·I and w²·var (float64), when precomputed once per warp by :meth:`with_products`;
    # then ``image`` and ``variance`` are dropped
    w_image: np.ndarray | None = None
    w2_variance: np.ndarray | None = None
    # outline of the valid pixels in tract pixels (see :func:`valid_footprint`)
    footprint: tuple[tuple[float, float], ...] = ()

    _moments: dict = field(default_factory=dict)

    def with_products(self) -> PreparedWarp:
        """Precompute ``w·I`` and ``w²·var`` in float64 once for the whole warp (a warp
        pixel falls into up to ~4 cells with their borders) and drop the float32 planes.
        The per-cell sums are then bit-identical to computing the products per cell.
        Called by :meth:`WarpLoader.take <streamcoadd.pipeline.loader.WarpLoader.take>` when the
        warp is about to fold, so that only one warp's products are held at a time."""
        if self.w_image is None:
            w = np.float64(self.weight)
            self.w_image = self.image.astype(np.float64)
            self.w_image *= w
            self.w2_variance = self.variance.astype(np.float64)
            self.w2_variance *= w * w
            if self.warp.image is self.image:  # consumed: the warp's own arrays
                self.warp.image = None
            if self.warp.variance is self.variance:
                self.warp.variance = None
            self.image = self.variance = None
        return self

    @property
    def box(self) -> Box:
        return self.warp.box

    def moments(self, centre: tuple[int, int], stamp: np.ndarray) -> tuple:
        """PSF moments of the stamp used at ``centre``, computed once per distinct stamp."""
        key = self.warp.psf.index_at(*centre)
        if key not in self._moments:
            self._moments[key] = psf_moments(stamp)
        return self._moments[key]


def warp_weight(warp: Warp, config: FoldConfig) -> float:
    """Scalar weight: header ``WEIGHT``, else 1 / (3-sigma, 2-iteration clipped mean
    variance over the warp's good pixels: not NO_DATA, no bad plane, finite)."""
    if warp.weight_override is not None:
        return warp.weight_override
    return weight_from_variances(good_variances(warp, config), warp.path)


def good_variances(warp: Warp, config: FoldConfig) -> np.ndarray:
    """The finite variances of the good pixels (a new 1-D array)."""
    good = (warp.mask & (NO_DATA | bitmask(config.bad_planes))) == 0
    good &= np.isfinite(warp.variance)
    return warp.variance[good]


def weight_from_variances(var: np.ndarray, path: str) -> float:
    """1 / clipped mean of ``var`` (see :func:`warp_weight`); ``var`` may be reordered."""
    if var.size == 0:
        raise WarpRejected(path, "no good pixels to compute the weight from and no "
                                 "WEIGHT keyword in the primary header")
    # float64, as astropy's sigma_clipped_stats: clipping the float32 values is faster
    # but can keep a different pixel at the 3-sigma edge (seen: one warp in 32).
    # A new SigmaClip per call: it keeps per-call state on the instance (not thread-safe).
    # sigma 3, 2 iterations, median centre and std width (astropy's defaults; the median
    # is exact here, there are no NaNs, and partitioning our own copy in place is 2-4x
    # faster than bottleneck's nanmedian).
    # The numba kernel keeps exactly astropy's pixels (None: it cannot be sure, a value
    # lies within round-off of a bound, or the input is not float32): ~2x faster.
    fast = None if use_reference("clip") else kernels.clipped_mean_weight(var)
    if fast is not None:
        weight = fast[0]
    else:
        clip = SigmaClip(sigma=3.0, maxiters=2, cenfunc=_median_in_place, stdfunc="std")
        kept = clip(var.astype(np.float64), masked=False, copy=False)
        weight = 1.0 / float(np.mean(kept, dtype=np.float64))
    if not WEIGHT_RANGE[0] <= weight <= WEIGHT_RANGE[1]:  # also catches inf, nan, <= 0
        raise WarpRejected(path, f"weight 1/<variance> = {weight!r} is not in "
                                      f"{WEIGHT_RANGE[0]:g}..{WEIGHT_RANGE[1]:g}; check the "
                                      "VARIANCE plane (units nJy^2)")
    return weight


def _median_in_place(data: np.ndarray, axis=None) -> np.ndarray:
    """np.median that may reorder ``data`` (a private float64 copy of the variances)."""
    return np.median(data, axis=axis, overwrite_input=True)


def prepare_warp(warp: Warp, config: FoldConfig, consume: bool = False,
                 weight: float | None = None, check_weight: bool = True) -> PreparedWarp:
    """Weight, interpolation and mask planes of a warp, ready to fold into any cell.
    ``consume=True`` reuses the warp's own image, variance, noise and mask arrays for the
    prepared planes (they are overwritten: saves ~140 MB per patch-sized warp).
    ``weight``: already computed (else :func:`warp_weight` here). ``check_weight``: bound a
    header ``WEIGHT`` against the variance-derived weight (:func:`check_header_weight`;
    off when re-reading a warp already folded, e.g. to retract it with its stored weight).

    Raises :class:`WarpRejected` for a warp with valid pixels but no good one (nothing
    to interpolate from or weigh) or with a non-finite value left in any plane."""
    valid = (warp.mask & NO_DATA) == 0
    bad = valid & ((warp.mask & bitmask(config.bad_planes)) != 0)
    if valid.any() and bad.sum() == valid.sum():
        raise WarpRejected(warp.path, "every valid pixel is under a bad mask plane ("
                           f"{', '.join(config.bad_planes)}): there is nothing to interpolate "
                           "them from nor to check the weight against; mark the warp's unusable "
                           "pixels NO_DATA or drop it")
    if check_weight and warp.weight_override is not None:
        check_header_weight(warp, config)
    if weight is None:
        weight = warp_weight(warp, config)
    planes = [warp.image, warp.variance, *warp.noise]
    filled = interpolate_bad_pixels(planes, valid, bad, inplace=consume)
    check_finite(warp.path, filled)
    keep = ~(bitmask(config.bad_planes) | bitmask(config.drop_planes) | NO_DATA)
    propagated = {}
    for name in config.propagate_thresholds:
        plane = valid & ((warp.mask & (1 << CANONICAL_PLANES[name])) != 0)
        if plane.any():
            propagated[name] = plane
    if consume and warp.mask.flags.writeable:
        or_mask = warp.mask
        or_mask &= np.int32(keep)
        np.copyto(or_mask, 0, where=~valid)
    else:
        or_mask = np.where(valid, warp.mask & np.int32(keep), np.int32(0))
    return PreparedWarp(warp=warp, weight=weight, image=filled[0], variance=filled[1],
                        noise=filled[2:], valid=valid, bad=bad, or_mask=or_mask,
                        planes=propagated, footprint=valid_footprint(valid, warp.xy0))


# Good variances the header-weight bound is computed from (a strided sample: the bound is
# a factor, it needs no more precision than ~1 %).
WEIGHT_CHECK_SAMPLE = 200_000


def check_header_weight(warp: Warp, config: FoldConfig) -> None:
    """Reject a header ``WEIGHT`` more than ``config.max_weight_ratio`` times above or below
    1 / (clipped mean variance of the good pixels), computed on a strided sample of at most
    ``WEIGHT_CHECK_SAMPLE`` good pixels. A header weight may legitimately differ from the
    variance-derived one (another estimator, a photometric-quality factor), but not by
    orders of magnitude: that is a unit or bookkeeping error, and such a weight would
    dominate (and, retracted, wipe out the precision of) every cell it reaches."""
    var = good_variances(warp, config)
    if var.size == 0:
        return  # (a warp without good pixels is rejected by prepare_warp)
    var = var[::max(1, var.size // WEIGHT_CHECK_SAMPLE)]
    derived = weight_from_variances(var, warp.path)
    ratio = warp.weight_override / derived
    if not 1.0 / config.max_weight_ratio <= ratio <= config.max_weight_ratio:
        raise WarpRejected(warp.path, f"header WEIGHT = {warp.weight_override:.6g} is {ratio:.3g}x "
                           f"the weight 1/<variance> = {derived:.6g} of its good pixels (allowed: "
                           f"a factor {config.max_weight_ratio:g}; [fold] max_weight_ratio); fix "
                           "the WEIGHT keyword or the VARIANCE plane (units nJy^2)")


def check_finite(path: str, planes: list[np.ndarray]) -> None:
    """Guard: no non-finite value may reach a sum. The prepared planes are zero outside the
    valid pixels, so one float64 sum per plane is finite exactly when every value is."""
    for name, plane in zip(("IMAGE", "VARIANCE", *(f"NOISE{k}" for k in range(len(planes)))),
                           planes):
        if not np.isfinite(np.sum(plane, dtype=np.float64)):
            raise WarpRejected(path, f"{name} still has non-finite values in valid pixels "
                                     "after interpolation; mark them NO_DATA in the mask")


def valid_footprint(valid: np.ndarray, xy0: tuple[int, int]) -> tuple[tuple[float, float], ...]:
    """Counter-clockwise convex hull of the corners of the ``valid`` pixels, in tract pixel
    coordinates (pixel centres on integers, as the tract WCS: pixel (x, y) spans
    x-0.5..x+0.5). Only each row's leftmost and rightmost valid pixel can be a hull vertex,
    so the hull is taken over their corners (4 points per row). Empty when nothing is valid.
    """
    from scipy.spatial import ConvexHull

    rows = np.flatnonzero(valid.any(axis=1))
    if rows.size == 0:
        return ()
    sub = valid[rows]
    left = np.argmax(sub, axis=1)
    right = sub.shape[1] - 1 - np.argmax(sub[:, ::-1], axis=1)
    x = np.concatenate([left - 0.5, left - 0.5, right + 0.5, right + 0.5]) + xy0[0]
    y = np.concatenate([rows - 0.5, rows + 0.5, rows - 0.5, rows + 0.5]) + xy0[1]
    pts = np.column_stack([x, y])
    hull = ConvexHull(pts)  # 2-D vertices come counter-clockwise
    return tuple((float(pts[i, 0]), float(pts[i, 1])) for i in hull.vertices)


# Long because half of it is the docstring saying exactly what happens at gaps and edges.
def interpolate_bad_pixels(planes: list[np.ndarray], valid: np.ndarray,
                           bad: np.ndarray, inplace: bool = False) -> list[np.ndarray]:
    """Fill ``bad`` pixels of each plane from good neighbours; zero pixels outside ``valid``.

    Interpolation never crosses NO_DATA (a chip gap, the warp's edge): a bad pixel is
    filled only from good pixels of its own *run*, the stretch of valid pixels of its row
    between NO_DATA pixels or the array edges.

    - Both sides of the bad run have a good pixel in the run: linear interpolation along
      the row between the nearest good pixels to the left and right.
    - Only one side has (the run touches a gap or an edge on the other): the value of that
      one good neighbour (constant extrapolation).
    - Neither side has (the run has no good pixel: "orphan" pixels): the value of the
      nearest good pixel in 2-D (Euclidean distance) among the good pixels *connected to
      it through valid pixels* (4-connected region of ``valid``), so never one across a gap.
    - A region of valid pixels with no good pixel at all: its bad pixels keep their
      values (:func:`prepare_warp` rejects a warp whose planes are then not finite, and a
      warp with no good pixel at all).

    Returns float32 copies (inputs untouched), or with ``inplace`` the float32, writeable
    input planes, filled.
    """
    if inplace and all(p.dtype == np.float32 and p.flags.writeable for p in planes):
        out = planes
        for p in out:
            np.copyto(p, 0, where=~valid)
    else:
        out = [np.where(valid, p, np.float32(0)).astype(np.float32, copy=False) for p in planes]
    if not bad.any():
        return out
    good = valid & ~bad
    w = good.shape[1]
    good_flat = np.flatnonzero(good)
    if not good_flat.size:
        return out  # nothing to interpolate from: the bad pixels keep their values
    bad_flat = np.flatnonzero(bad)
    ys, xs = np.divmod(bad_flat, w)
    nxt = np.searchsorted(good_flat, bad_flat)  # first good pixel after each bad one
    lflat = good_flat[np.maximum(nxt - 1, 0)]
    rflat = good_flat[np.minimum(nxt, good_flat.size - 1)]
    # the neighbour must be on the same row with no NO_DATA pixel in between: the number
    # of invalid pixels before it (in flat order) must equal the bad pixel's
    gaps = np.flatnonzero(~valid)
    run = np.searchsorted(gaps, bad_flat)
    has_l = (nxt > 0) & (lflat // w == ys) & (np.searchsorted(gaps, lflat) == run)
    has_r = (nxt < good_flat.size) & (rflat // w == ys) & (np.searchsorted(gaps, rflat) == run)
    lx, rx = lflat % w, rflat % w
    lxc, rxc = np.where(has_l, lx, rx), np.where(has_r, rx, lx)
    frac = np.where(has_l & has_r, (xs - lxc) / np.maximum(rxc - lxc, 1), 0.0)
    src_y = ys.copy()
    orphan = ~(has_l | has_r)
    if orphan.any():
        src_y[orphan], lxc[orphan] = nearest_connected_good(valid, good, ys[orphan], xs[orphan])
        rxc[orphan] = lxc[orphan]
        keep = src_y >= 0  # orphans in a region without good pixels keep their values
        if not keep.all():
            ys, xs, src_y, lxc, rxc, frac = (a[keep] for a in (ys, xs, src_y, lxc, rxc, frac))
    for o in out:
        lv = o[src_y, lxc].astype(np.float64)
        rv = o[src_y, rxc].astype(np.float64)
        o[ys, xs] = lv + (rv - lv) * frac
    return out


def nearest_connected_good(valid: np.ndarray, good: np.ndarray, oy: np.ndarray,
                           ox: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For the pixels (oy, ox): the (y, x) of the nearest good pixel (Euclidean distance)
    in the same 4-connected region of ``valid`` pixels, or (-1, -1) where the region has
    no good pixel. Each region is searched in its own bounding box."""
    from scipy import ndimage  # (rare: imported only when needed, ~0.2 s)

    labels, _ = ndimage.label(valid)
    src_y = np.full(oy.size, -1, np.intp)
    src_x = np.full(oy.size, -1, np.intp)
    own = labels[oy, ox]
    boxes = ndimage.find_objects(labels)
    for lab in np.unique(own):
        sl = boxes[lab - 1]
        region_good = good[sl] & (labels[sl] == lab)
        if not region_good.any():
            continue
        _, (ny, nx) = ndimage.distance_transform_edt(~region_good, return_indices=True)
        sel = own == lab
        ly, lx = oy[sel] - sl[0].start, ox[sel] - sl[1].start
        src_y[sel] = ny[ly, lx] + sl[0].start
        src_x[sel] = nx[ly, lx] + sl[1].start
    return src_y, src_x


# --------------------------------------------------------------------------- cell level

@dataclass
class Contributor:
    """One input of one cell (a row of the contributor list)."""

    visit: int
    detector: int
    weight: float
    overlap_fraction: float  # of the inner box covered by valid pixels
    good_fraction: float  # of the inner box that is valid and not bad
    fallback: bool
    psf_ixx: float
    psf_iyy: float
    psf_ixy: float
    psf_flag: bool
    content_hash: str
    folded_at: float  # unix time
    instrument: str = ""
    physical_filter: str = ""
    mjd: float = float("nan")
    # sum of the input's PSF stamp at the cell centre, before resizing (NaN: not recorded)
    psf_sum: float = float("nan")
    # outline of the warp's valid (not NO_DATA) pixels in tract pixel coordinates (pixel
    # centres on integers, as the tract WCS), counter-clockwise: the convex hull of the
    # valid pixels' corners; the same for every cell of one warp (empty: not recorded)
    footprint: tuple[tuple[float, float], ...] = ()


@dataclass
class CellSums:
    """Running float64 sums of one group (good or fallback inputs) of one cell.

    Image-like arrays have the cell outer shape (H, W); ``noise`` is (K, H, W). Planes that
    are usually uniform or mostly zero are held compactly and read through properties:

    - ``sum_w`` = ``w_full`` (the weight of inputs with data on every pixel of the outer
      box: a scalar) + ``w_partial`` (per-pixel weight of the other inputs, or None);
    - ``sum_w_interp`` (weight that came from interpolated pixels): allocated on first use
      (None = all zero);
    - ``bit_counts[bit]``: number of inputs with that mask bit set; ``mask_or``
      (OR of the inputs' kept mask bits) is derived from them, unless ``mask_bits`` holds
      it (a cell read for a coadd only, without its counts);
    - ``planes[name]``: weight of inputs carrying that propagated plane.

    Integer counts (COUNT_DTYPE arrays of the outer shape; None / absent = all zero) decide
    coverage and flags, so that a retraction is exact (the float sums are snapped to exactly
    0 where a count reaches 0):

    - ``n_full``: inputs with data on every pixel of the outer box (a scalar);
    - ``n_partial``: the other inputs with data at each pixel;
    - ``n_interp``: inputs interpolated at each pixel;
    - ``plane_counts[name]``: inputs carrying a propagated plane at each pixel;
    - ``counted``: the counts are complete. False for a group read from a version-1 cell
      file (no counts): coverage and flags then fall back to the float tests.
    - ``w_peak``: the largest total weight (``psf_w``) the group has held since it was
      built by folds alone; bounds the round-off left by retractions (see
      :func:`needs_rebuild`).
    """

    shape: tuple[int, int]
    sum_wI: np.ndarray
    sum_w2var: np.ndarray
    noise: np.ndarray
    psf_sum: np.ndarray
    psf_w: float = 0.0
    w_full: float = 0.0
    w_partial: np.ndarray | None = None
    interp: np.ndarray | None = None
    mask_bits: np.ndarray | None = None
    planes: dict[str, np.ndarray] = field(default_factory=dict)
    bit_counts: dict[int, np.ndarray] = field(default_factory=dict)  # bit -> count of inputs
    contributors: list[Contributor] = field(default_factory=list)
    n_full: int = 0
    n_partial: np.ndarray | None = None
    n_interp: np.ndarray | None = None
    plane_counts: dict[str, np.ndarray] = field(default_factory=dict)
    counted: bool = False
    w_peak: float = 0.0

    @classmethod
    def zeros(cls, shape: tuple[int, int], psf_size: int, n_noise: int) -> CellSums:
        shape = tuple(shape)
        return cls(shape=shape, sum_wI=np.zeros(shape, np.float64),
                   sum_w2var=np.zeros(shape, np.float64),
                   noise=np.zeros((n_noise, *shape), np.float64),
                   psf_sum=np.zeros((psf_size, psf_size), np.float64), counted=True)

    @property
    def n_data(self) -> np.ndarray:
        """Number of inputs with data at each pixel (int32, (H, W); a new array)."""
        if self.n_partial is None:
            return np.full(self.shape, self.n_full, np.int32)
        return self.n_partial + np.int32(self.n_full)

    @property
    def sum_w(self) -> np.ndarray:
        """Σ w over the inputs with data at each pixel (float64, (H, W); a new array)."""
        if self.w_partial is None:
            return np.full(self.shape, self.w_full, np.float64)
        return self.w_partial + self.w_full

    @property
    def sum_w_interp(self) -> np.ndarray:
        return self.interp if self.interp is not None else np.zeros(self.shape, np.float64)

    @property
    def mask_or(self) -> np.ndarray:
        if self.mask_bits is not None:
            return self.mask_bits
        out = np.zeros(self.shape, np.int32)
        for bit, cnt in self.bit_counts.items():
            out |= (cnt > 0).astype(np.int32) << bit
        return out

    def plane_zeros(self, dtype) -> np.ndarray:
        return np.zeros(self.shape, dtype)

    @property
    def nbytes(self) -> int:
        arrays = [self.sum_wI, self.sum_w2var, self.w_partial, self.interp, self.mask_bits,
                  self.noise, self.psf_sum, *self.planes.values(), *self.bit_counts.values(),
                  self.n_partial, self.n_interp, *self.plane_counts.values()]
        return sum(a.nbytes for a in arrays if a is not None)


@dataclass
class CellAccumulator:
    """Both groups of one cell. The coadd uses ``good`` if it has any input, else
    ``fallback``; keeping both makes the result independent of arrival order."""

    cell: CellId
    outer: Box
    groups: dict[str, CellSums] = field(default_factory=dict)

    def active(self) -> CellSums | None:
        for name in GROUPS:
            g = self.groups.get(name)
            if g is not None and g.contributors:
                return g
        return None

    def active_group(self) -> str | None:
        for name in GROUPS:
            g = self.groups.get(name)
            if g is not None and g.contributors:
                return name
        return None

    def hashes(self) -> set[str]:
        return {c.content_hash for g in self.groups.values() for c in g.contributors}

    @property
    def nbytes(self) -> int:
        return sum(g.nbytes for g in self.groups.values())


@dataclass(frozen=True)
class CellInput:
    """How one prepared warp meets one cell."""

    cell: CellId
    inner: Box
    outer: Box
    centre: tuple[int, int]
    overlap_fraction: float
    good_fraction: float


def cell_input(pw: PreparedWarp, tract: Tract, cell: CellId,
               config: FoldConfig) -> CellInput | None:
    """Apply the overlap rule: the warp's valid pixels must cover at least
    ``min_overlap_fraction`` of the cell inner box (default: all of it) and the centre."""
    inner = tract.cell_inner_box(cell)
    centre = tract.cell_centre(cell)
    box = pw.box
    if not (box.x0 <= centre[0] < box.x1 and box.y0 <= centre[1] < box.y1):
        return None
    if not pw.valid[centre[1] - box.y0, centre[0] - box.x0]:
        return None
    part = inner.intersection(box)
    if part.empty:
        return None
    sl = part.slices(pw.warp.xy0)
    n_inner = inner.width * inner.height
    covered = int(np.count_nonzero(pw.valid[sl]))
    overlap = covered / n_inner
    if overlap < config.min_overlap_fraction:
        return None
    good = (covered - int(np.count_nonzero(pw.bad[sl]))) / n_inner
    return CellInput(cell=cell, inner=inner, outer=tract.cell_outer_box(cell),
                     centre=centre, overlap_fraction=overlap, good_fraction=good)


def shard_inputs(prepared: PreparedWarp, tract: Tract, patch: PatchId,
                 config: FoldConfig) -> list[CellInput]:
    """The cells of ``patch`` that a prepared warp contributes to (overlap rule applied).
    Pure: touches no state. Used by the warp loader and by distributed workers."""
    return [cin for cell in tract.cells_overlapping(patch, prepared.box)
            if (cin := cell_input(prepared, tract, cell, config)) is not None]


def is_fallback(cin: CellInput, config: FoldConfig) -> bool:
    return cin.good_fraction <= 1.0 - config.max_maskfrac


def fold_cell(acc: CellAccumulator, cin: CellInput, pw: PreparedWarp,
              config: FoldConfig) -> None:
    """Add one prepared warp to one cell accumulator (in place)."""
    if not (np.isfinite(pw.weight) and pw.weight > 0):  # guard: nothing non-finite in a sum
        raise WarpRejected(pw.warp.path, f"weight {pw.weight!r} is not a positive finite number")
    fallback = is_fallback(cin, config)
    name = "fallback" if fallback else "good"
    sums = acc.groups.get(name)
    if sums is None:
        sums = acc.groups[name] = CellSums.zeros(acc.outer.shape, config.psf_size,
                                                 config.noise_realizations)
    if len(sums.contributors) >= MAX_INPUTS:  # the uint16 counts would wrap
        raise StateError(f"cell {acc.cell} already holds {MAX_INPUTS} {name} inputs, the most "
                         "its integer counts can count; retract old visits or start a new "
                         "state for further epochs")
    fold_pixels(sums, pw, acc.outer)
    w = np.float64(pw.weight)
    raw = pw.warp.psf.at(*cin.centre)
    stamp = resize_stamp(raw, config.psf_size)
    sums.psf_sum += w * stamp
    sums.psf_w += float(w)
    sums.w_peak = max(sums.w_peak, sums.psf_w)
    ixx, iyy, ixy, flag = pw.moments(cin.centre, stamp)
    wp = pw.warp
    sums.contributors.append(Contributor(
        visit=wp.id.visit, detector=wp.id.detector, weight=float(w),
        overlap_fraction=cin.overlap_fraction, good_fraction=cin.good_fraction,
        fallback=fallback, psf_ixx=ixx, psf_iyy=iyy, psf_ixy=ixy, psf_flag=flag,
        content_hash=wp.content_hash, folded_at=time.time(), instrument=wp.instrument,
        physical_filter=wp.physical_filter, mjd=wp.mjd, psf_sum=float(raw.sum()),
        footprint=pw.footprint))


def unfold_cell(acc: CellAccumulator, content_hash: str, pw: PreparedWarp,
                centre: tuple[int, int], config: FoldConfig) -> bool:
    """Remove one warp's contribution from a cell (retraction); the inverse of
    :func:`fold_cell`. Returns False if the warp is not a contributor of the cell.

    The weight subtracted is the one stored in the contributor row at fold time (never
    recomputed), with the same PSF stamp. Every float sum whose integer count reaches 0 is
    set to exactly 0, and a group left without inputs is dropped whole, so coverage and
    flags are exactly those of a fresh fold of the remaining inputs. What is left is
    round-off in the remaining sums, bounded by :func:`needs_rebuild`."""
    for name, sums in list(acc.groups.items()):
        rows = [c for c in sums.contributors if c.content_hash == content_hash]
        if not rows:
            continue
        sums.contributors = [c for c in sums.contributors if c.content_hash != content_hash]
        if not sums.contributors:
            del acc.groups[name]
            return True
        w = np.float64(rows[0].weight)
        if pw.weight != w:  # the stored weight, whatever the weight code says today
            if pw.w_image is not None:
                raise ValueError("unfold_cell needs a prepared warp without products "
                                 "(w·I was computed with another weight)")
            pw = replace(pw, weight=float(w), _moments={})
        fold_pixels(sums, pw, acc.outer, sign=-1)
        sums.psf_sum -= w * resize_stamp(pw.warp.psf.at(*centre), config.psf_size)
        sums.psf_w -= float(w)
        return True
    return False


# A retraction leaves round-off of at most ~eps·w_peak per operation in every weight-like
# sum (eps = 2.2e-16; w_peak: the largest total weight the group held). Relative to the
# smallest remaining per-pixel weight R that is eps·w_peak/R: with w_peak/R <= 1e4 each
# operation adds <= 2.2e-12 relative (1e-10 after ~45 operations at the bound, far more in
# practice as round-off does not add up coherently); beyond it the cell is rebuilt.
REBUILD_RATIO = 1e4


def needs_rebuild(sums: CellSums) -> bool:
    """True when a group that lost an input by subtraction must be rebuilt from its
    remaining inputs instead: it has no integer counts (a version-1 group: coverage could
    not be decided exactly), or its peak total weight exceeds ``REBUILD_RATIO`` times the
    smallest remaining per-pixel weight (the subtraction lost too much precision)."""
    if not sums.contributors:
        return False
    if not sums.counted:
        return True
    covered = sums.n_data > 0
    if not covered.any():
        return True  # cannot happen with a contributor (its cell centre has data)
    r_min = float(sums.sum_w[covered].min())
    return not r_min > 0 or max(sums.w_peak, sums.psf_w) > REBUILD_RATIO * r_min


def fold_pixels(sums: CellSums, pw: PreparedWarp, outer: Box, sign: int = 1) -> None:
    """The per-pixel part of a fold (``sign = -1``: of a retraction): the numba
    :func:`accumulate_pixels_fused`, or the numpy reference :func:`accumulate_pixels`
    when ``STREAMCOADD_REFERENCE`` names "fold" (the two give identical sums and counts)."""
    if use_reference("fold"):
        accumulate_pixels(sums, pw, outer, sign)
    else:
        accumulate_pixels_fused(sums, pw, outer, sign)


# stand-ins for the arrays a kernel does not touch (its flag is off): numba needs arrays
# of the right dtype and rank
_NONE_F64 = np.zeros((1, 1), np.float64)
_NONE_COUNT = np.zeros((1, 1), COUNT_DTYPE)


# Long because the docstring and the plumbing of one kernel call (which planes exist decides
# its arguments).
def accumulate_pixels_fused(sums: CellSums, pw: PreparedWarp, outer: Box,
                            sign: int = 1) -> None:
    """:func:`accumulate_pixels` by the numba kernels of :mod:`streamcoadd.core.kernels`:
    the same float64 sums bit for bit (the same product and one addition per pixel and
    sum), the same integer counts and the same optional planes allocated. One scan of the
    warp's masks decides what to allocate; then one pass updates Σw·I, Σw²·var, the
    partial weight and count and the interpolated weight and count, and one pass per
    noise realization, propagated plane and mask bit (each accumulator is read and
    written once). Works with or without :meth:`PreparedWarp.with_products`."""
    part = outer.intersection(pw.box)
    if part.empty:
        accumulate_pixels(sums, pw, outer, sign)  # (never happens in a fold: no pixel)
        return
    by, bx = part.y0 - pw.warp.xy0[1], part.x0 - pw.warp.xy0[0]  # box origin in the warp
    ay, ax = part.y0 - outer.y0, part.x0 - outer.x0  # in the cell
    h, wd = part.shape
    w = np.float64(pw.weight)
    ws_ = np.float64(sign) * w
    isign = np.int32(sign)
    valid, bad, or_mask = pw.valid, pw.bad, pw.or_mask
    all_valid, any_bad, bits = kernels.scan_box(valid, bad, or_mask, by, bx, h, wd)
    partial = not (part == outer and all_valid)
    if not partial:
        sums.w_full += float(ws_)
        sums.n_full += sign
        if sign < 0 and not sums.counted and abs(sums.w_full) <= 1e-9 * w:
            sums.w_full = 0.0  # version-1 group (no counts): the last full input left
    else:
        if sums.w_partial is None:
            sums.w_partial = sums.plane_zeros(np.float64)
        if sums.counted and sums.n_partial is None:
            sums.n_partial = sums.plane_zeros(COUNT_DTYPE)
    if any_bad:
        if sums.interp is None:
            sums.interp = sums.plane_zeros(np.float64)
        if sums.counted and sums.n_interp is None:
            sums.n_interp = sums.plane_zeros(COUNT_DTYPE)
    if pw.w_image is not None:  # precomputed w·I, w²·var: multiply by ±1 (exact)
        img, var, f_img, f_var = pw.w_image, pw.w2_variance, np.float64(sign), 1.0
    else:
        img, var, f_img, f_var = pw.image, pw.variance, ws_, w
    kernels.fold_box(
        sums.sum_wI, sums.sum_w2var, ay, ax, img, var, by, bx, h, wd, f_img, f_var, ws_, valid,
        partial, _or(sums.w_partial, _NONE_F64), _or(sums.n_partial, _NONE_COUNT),
        partial and sums.counted, bad, any_bad, _or(sums.interp, _NONE_F64),
        _or(sums.n_interp, _NONE_COUNT), any_bad and sums.counted, isign)
    for k, noise in enumerate(pw.noise):
        kernels.add_scaled_box(sums.noise[k], ay, ax, noise, by, bx, h, wd, ws_, valid,
                               partial)
    _fold_planes(sums, pw, part.slices(pw.warp.xy0), (ay, ax, by, bx, h, wd), ws_, isign)
    if bits:
        for bit in range(32):
            if bits >> bit & 1:
                cnt = sums.bit_counts.get(bit)
                if cnt is None:
                    cnt = sums.bit_counts[bit] = sums.plane_zeros(COUNT_DTYPE)
                kernels.count_bit_box(cnt, ay, ax, or_mask, by, bx, h, wd, np.int32(bit),
                                      isign)
        sums.mask_bits = None  # mask_or is derived from the counts from now on
    if sign < 0:
        snap_emptied(sums)


def _or(a: np.ndarray | None, stand_in: np.ndarray) -> np.ndarray:
    return stand_in if a is None else a


def _fold_planes(sums: CellSums, pw: PreparedWarp, ws, box: tuple, ws_: np.float64,
                 isign: np.int32) -> None:
    """The propagated planes present in the box (``ws``: its warp slices; ``box``:
    ay, ax, by, bx, h, w as in :func:`accumulate_pixels_fused`)."""
    for name, plane in pw.planes.items():
        if not plane[ws].any():
            continue
        arr = sums.planes.get(name)
        if arr is None:
            arr = sums.planes[name] = sums.plane_zeros(np.float64)
        cnt = sums.plane_counts.get(name) if sums.counted else None
        if sums.counted and cnt is None:
            cnt = sums.plane_counts[name] = sums.plane_zeros(COUNT_DTYPE)
        ay, ax, by, bx, h, wd = box
        kernels.add_plane_box(arr, _or(cnt, _NONE_COUNT), sums.counted, plane, ay, ax, by, bx,
                              h, wd, ws_, isign)


def accumulate_pixels(sums: CellSums, pw: PreparedWarp, outer: Box, sign: int = 1) -> None:
    """Per-pixel sums and integer counts over the part of the cell outer box that the warp
    covers (``sign = -1`` subtracts them again, then :func:`snap_emptied` sets every float
    sum whose count reached 0 to exactly 0)."""
    part = outer.intersection(pw.box)
    ws = part.slices(pw.warp.xy0)
    cs = part.slices((outer.x0, outer.y0))
    w = np.float64(pw.weight)
    ws_ = np.float64(sign) * w  # signed weight
    valid = pw.valid[ws]
    if part == outer and valid.all():
        wv = ws_  # the common case: one scalar weight over the whole box
        sums.w_full += float(ws_)
        sums.n_full += sign
        if sign < 0 and not sums.counted and abs(sums.w_full) <= 1e-9 * w:
            sums.w_full = 0.0  # version-1 group (no counts): the last full input left
    else:
        wv = valid * ws_
        if sums.w_partial is None:
            sums.w_partial = sums.plane_zeros(np.float64)
        sums.w_partial[cs] += wv
        if sums.counted:
            _add_count(sums, "n_partial", cs, valid, sign)
    tmp = np.empty(part.shape, np.float64) if pw.w_image is None or pw.noise else None
    if pw.w_image is not None:
        # w·I, w²·var precomputed (0 outside valid: those pixels were zeroed)
        for acc, prod in ((sums.sum_wI[cs], pw.w_image[ws]),
                          (sums.sum_w2var[cs], pw.w2_variance[ws])):
            if sign > 0:
                acc += prod
            else:
                acc -= prod
    else:
        _add_product(sums.sum_wI[cs], pw.image[ws], wv, tmp)
        _add_product(sums.sum_w2var[cs], pw.variance[ws], wv * w, tmp)
    for k, noise in enumerate(pw.noise):
        _add_product(sums.noise[k][cs], noise[ws], wv, tmp)
    bad = pw.bad[ws]
    if bad.any():
        if sums.interp is None:
            sums.interp = sums.plane_zeros(np.float64)
        view = sums.interp[cs]
        np.add(view, ws_, out=view, where=bad)  # (bad pixels are few: no product array)
        if sums.counted:
            _add_count(sums, "n_interp", cs, bad, sign)
    for name, plane in pw.planes.items():
        p = plane[ws]
        if p.any():
            arr = sums.planes.get(name)
            if arr is None:
                arr = sums.planes[name] = sums.plane_zeros(np.float64)
            arr[cs] += p * ws_
            if sums.counted:
                cnt = sums.plane_counts.get(name)
                if cnt is None:
                    cnt = sums.plane_counts[name] = sums.plane_zeros(COUNT_DTYPE)
                _add_int(cnt[cs], p, sign)
    _count_bits(sums, pw.or_mask[ws], cs, sign)
    if sign < 0:
        snap_emptied(sums)


def _add_count(sums: CellSums, name: str, cs, where: np.ndarray, sign: int) -> None:
    """``sums.<name>[cs] += sign * where`` on a count plane allocated on first use."""
    cnt = getattr(sums, name)
    if cnt is None:
        cnt = sums.plane_zeros(COUNT_DTYPE)
        setattr(sums, name, cnt)
    _add_int(cnt[cs], where, sign)


def _add_int(view: np.ndarray, where: np.ndarray, sign: int) -> None:
    """``view += sign * where`` on a count plane (modular in COUNT_DTYPE, exact because a
    count never leaves 0..MAX_INPUTS: see :func:`fold_cell`)."""
    if sign > 0:
        np.add(view, where, out=view, casting="unsafe")
    else:
        np.subtract(view, where, out=view, casting="unsafe")


def _count_bits(sums: CellSums, or_mask: np.ndarray, cs, sign: int) -> None:
    """Per-bit input counts: they make the mask OR reversible (retraction)."""
    bits = int(np.bitwise_or.reduce(or_mask, axis=None))
    if not bits:
        return
    for bit in range(32):
        if bits >> bit & 1:
            cnt = sums.bit_counts.get(bit)
            if cnt is None:
                cnt = sums.bit_counts[bit] = sums.plane_zeros(COUNT_DTYPE)
            # one bit in the cell (the usual case): its pixels are the non-zero ones
            has_bit = or_mask != 0 if bits == 1 << bit else (or_mask >> bit) & 1
            _add_int(cnt[cs], has_bit, sign)
    sums.mask_bits = None  # mask_or is derived from the counts from now on


def snap_emptied(sums: CellSums) -> None:
    """After a subtraction: every float sum whose integer count is 0 becomes exactly 0 (no
    round-off residue decides coverage or flags), and count planes that are all zero are
    released, so the group is as if the removed inputs had never been folded.

    Without counts (``counted`` False, a version-1 group) only the scalar full weight is
    snapped, when its remainder is below 1e-9 of the weight removed (the version-1 rule)."""
    for bit, cnt in list(sums.bit_counts.items()):
        if not cnt.any():
            del sums.bit_counts[bit]  # no input carries it any more
    if not sums.counted:
        return
    if sums.n_full == 0:
        sums.w_full = 0.0
    if sums.n_partial is not None:
        emptied = sums.n_partial == 0
        if emptied.all():
            sums.n_partial = sums.w_partial = None
        elif sums.w_partial is not None:
            sums.w_partial[emptied] = 0.0
    if sums.w_partial is not None and sums.n_partial is None:
        sums.w_partial = None  # no partial input left
    if sums.n_full == 0:
        nodata = np.ones(sums.shape, bool) if sums.n_partial is None else sums.n_partial == 0
        if nodata.any():
            for arr in (sums.sum_wI, sums.sum_w2var, *sums.noise):
                arr[nodata] = 0.0
    _snap_plane(sums, "n_interp", "interp")
    for name in list(sums.planes):
        cnt = sums.plane_counts.get(name)
        if cnt is None or not cnt.any():
            del sums.planes[name]
            sums.plane_counts.pop(name, None)
        else:
            sums.planes[name][cnt == 0] = 0.0


def _snap_plane(sums: CellSums, count: str, plane: str) -> None:
    cnt = getattr(sums, count)
    if cnt is None or not cnt.any():
        setattr(sums, count, None)
        setattr(sums, plane, None)
    else:
        getattr(sums, plane)[cnt == 0] = 0.0


def _add_product(acc: np.ndarray, plane: np.ndarray, factor, tmp: np.ndarray) -> None:
    """``acc += plane * factor`` in float64 (``tmp``: scratch of acc's shape). Casting the
    float32 plane into ``tmp`` first, then scaling in place, is ~1.4x faster than a mixed-
    type multiply; a per-pixel ``factor`` array is multiplied in as well."""
    tmp[...] = plane
    tmp *= factor
    acc += tmp
