"""The numba kernels (streamcoadd.core.kernels) against their references: astropy's
SigmaClip for the clipped weight, the numpy fold (core.fold.accumulate_pixels) for the
fused fold."""

from __future__ import annotations

import copy

import numpy as np
import pytest
from astropy.stats import SigmaClip

from streamcoadd.core import kernels
from streamcoadd.core.config import FoldConfig
from streamcoadd.core.fold import (
    REFERENCE_ENV,
    CellSums,
    accumulate_pixels,
    accumulate_pixels_fused,
    prepare_warp,
    weight_from_variances,
)
from streamcoadd.core.masks import CANONICAL_PLANES
from streamcoadd.core.skymap import Box
from streamcoadd.core.warp import NO_DATA, PsfModel, Warp, WarpId


def reference_clip(var: np.ndarray) -> tuple[float, int]:
    """astropy SigmaClip (3 sigma, 2 iterations, median, std) on the float64 values."""
    clip = SigmaClip(sigma=3.0, maxiters=2, cenfunc="median", stdfunc="std")
    kept = clip(var.astype(np.float64), masked=False, copy=True)
    return 1.0 / float(np.mean(kept, dtype=np.float64)), int(kept.size)


def variances(rng: np.random.Generator, n: int, kind: str) -> np.ndarray:
    base = rng.uniform(1.0, 3000.0)
    v = base * (1 + 0.05 * rng.standard_normal(n))
    if kind == "tails":  # sources and cosmic rays: a heavy upper tail, a few tiny values
        k = max(1, n // 20)
        v[:k] += rng.pareto(1.2, k) * base
        v[k:k + 50] = rng.uniform(1e-3, 10, v[k:k + 50].size)
        rng.shuffle(v)
    elif kind == "ties":  # quantized: many equal values
        v = np.round(v / (base * 0.01)) * (base * 0.01)
    elif kind == "lognormal":
        v = base * rng.lognormal(0, 1, n)
    elif kind == "bimodal":  # two amplifiers at different gains
        v[: n // 3] *= 4
    return np.abs(v).astype(np.float32) + np.float32(1e-3)


KINDS = ["plain", "tails", "ties", "lognormal", "bimodal"]


@pytest.mark.parametrize("seed", range(8))
@pytest.mark.parametrize("kind", KINDS)
def test_clip_keeps_astropys_pixels(seed, kind):
    rng = np.random.default_rng(seed)
    var = variances(rng, int(rng.integers(2, 300_000)), kind)
    ref_w, ref_n = reference_clip(var)
    before = var.copy()
    got = kernels.clipped_mean_weight(var)
    assert np.array_equal(var, before)  # input untouched
    if got is not None:  # (None: the guard, a value within round-off of a bound)
        w, n = got
        assert n == ref_n
        assert abs(w - ref_w) <= 1e-15 * abs(ref_w)
    # the public function: the kernel or, where it declines, astropy itself
    w = weight_from_variances(var.copy(), "x")
    assert abs(w - ref_w) <= 1e-15 * abs(ref_w)


def test_clip_guard_declines_rarely():
    """The guard must not hide the kernel: on realistic inputs it answers nearly always."""
    rng = np.random.default_rng(42)
    answered = sum(kernels.clipped_mean_weight(variances(rng, 50_000, k)) is not None
                   for k in KINDS for _ in range(4))
    assert answered >= 16


@pytest.mark.parametrize("values", [[5.0], [5.0, 5.0], [1.0, 2.0], [1.0, 2.0, 300.0],
                                    [3.0] * 7 + [1e6], [0.0, 1.0, 2.0], list(range(1, 12))])
def test_clip_tiny_and_degenerate(values):
    var = np.asarray(values, np.float32)
    ref_w, ref_n = reference_clip(var)
    got = kernels.clipped_mean_weight(var)
    if got is not None:
        assert got[1] == ref_n
        assert abs(got[0] - ref_w) <= 1e-15 * abs(ref_w)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -1.0, -0.0])
def test_clip_declines_values_that_do_not_sort_as_bits(bad):
    var = np.full(100, 7.0, np.float32)
    var[3] = bad
    assert kernels.clipped_mean_weight(var) is None


def test_clip_declines_float64():
    assert kernels.clipped_mean_weight(np.ones(10)) is None  # float64: not float32 bits


def test_reference_switch(monkeypatch):
    """STREAMCOADD_REFERENCE=clip takes astropy's path: the same weight to 1e-15."""
    var = variances(np.random.default_rng(3), 100_000, "tails")
    fast = weight_from_variances(var.copy(), "x")
    monkeypatch.setenv(REFERENCE_ENV, "clip")
    ref = weight_from_variances(var.copy(), "x")
    assert abs(fast - ref) <= 1e-15 * ref


# ------------------------------------------------------------------------- the fold

B = CANONICAL_PLANES
CONFIG = FoldConfig(propagate_thresholds={"SAT": 0.1, "DETECTED": 0.5, "STREAK": 0.2},
                    noise_realizations=2)


def random_prepared(rng, shape=(120, 130), xy0=(-7, 5), nodata_strip=False,
                    weight=None, products=False, many_bits=True):
    """A warp prepared by the real prepare_warp: NO_DATA (a strip and scattered
    pixels), bad pixels (interpolated), mask bits, propagated planes, noise."""
    w = shape[1]
    mask = np.zeros(shape, np.int32)
    r = rng.random(shape)
    mask[r < 0.03] |= 1 << B["BAD"]
    mask[(r > 0.03) & (r < 0.05)] |= 1 << B["SAT"]
    mask[(r > 0.05) & (r < 0.06)] |= 1 << B["CR"]
    mask[rng.random(shape) < 0.3] |= 1 << B["DETECTED"]
    if many_bits:
        mask[rng.random(shape) < 0.02] |= 1 << B["STREAK"]
        mask[rng.random(shape) < 0.1] |= 1 << B["EDGE"]  # dropped
        mask[rng.random(shape) < 0.01] |= np.int32(-2**31)  # bit 31 (the sign bit), kept
        mask[:, int(rng.integers(0, w))] |= 1 << B["BAD"]  # a bad column
    if nodata_strip:
        mask[:, : int(w * rng.uniform(0.1, 0.5))] |= NO_DATA
        mask[rng.random(shape) < 0.01] |= NO_DATA
    image = rng.normal(0, 50, shape).astype(np.float32)
    variance = rng.uniform(500, 1500, shape).astype(np.float32)
    noise = [rng.normal(0, 30, shape).astype(np.float32) for _ in range(2)]
    warp = Warp(path="x", content_hash=f"h{rng.integers(1 << 60)}", id=WarpId(0, 1, 0),
                band="r", xy0=xy0, image=image, mask=mask, variance=variance,
                psf=PsfModel(np.ones((1, 3, 3)) / 9, None), noise=noise)
    pw = prepare_warp(warp, CONFIG, weight=weight or float(rng.uniform(1e-4, 2e-3)))
    if products:
        pw.with_products()
    return pw


def assert_same_sums(got: CellSums, ref: CellSums) -> None:
    """Every float sum bit-identical (so within any relative tolerance), every count,
    mask and the set of allocated planes identical."""
    for name in ("sum_wI", "sum_w2var", "noise", "w_partial", "interp", "psf_sum"):
        x, y = getattr(got, name), getattr(ref, name)
        assert (x is None) == (y is None), name
        if x is not None:
            assert x.dtype == y.dtype and x.shape == y.shape, name
            np.testing.assert_allclose(x, y, rtol=1e-12, atol=0, err_msg=name)
            assert np.array_equal(x.view(np.uint64), y.view(np.uint64)), \
                f"{name} not bit-identical"
    for name in ("n_partial", "n_interp", "mask_bits"):
        x, y = getattr(got, name), getattr(ref, name)
        assert (x is None) == (y is None), name
        if x is not None:
            assert x.dtype == y.dtype and np.array_equal(x, y), name
    assert (got.w_full, got.n_full, got.counted) == (ref.w_full, ref.n_full, ref.counted)
    for name in ("planes", "plane_counts", "bit_counts"):
        x, y = getattr(got, name), getattr(ref, name)
        assert x.keys() == y.keys(), name
        for k in x:
            assert x[k].dtype == y[k].dtype, (name, k)
            assert np.array_equal(x[k].view(np.uint8), y[k].view(np.uint8)), (name, k)
    assert np.array_equal(got.mask_or, ref.mask_or)


# cell outer boxes against the warp box (-7..123, 5..125): inside, clipped by each edge,
# over the NO_DATA strip, covering the whole warp
OUTERS = [Box(40, 40, 90, 90), Box(-20, 0, 30, 30), Box(100, 100, 150, 150),
          Box(0, 60, 50, 110), Box(-10, 0, 130, 130), Box(60, 10, 122, 30)]


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("products", [False, True])
@pytest.mark.parametrize("nodata_strip", [False, True])
def test_fused_fold_and_unfold_equal_reference(seed, products, nodata_strip):
    rng = np.random.default_rng(1000 + seed)
    warps = [random_prepared(rng, nodata_strip=nodata_strip and k != 1, products=products,
                             many_bits=k != 2) for k in range(3)]
    ref = [CellSums.zeros(o.shape, 5, 2) for o in OUTERS]
    got = copy.deepcopy(ref)
    for pw in warps:
        for i, outer in enumerate(OUTERS):
            accumulate_pixels(ref[i], pw, outer)
            accumulate_pixels_fused(got[i], pw, outer)
            assert_same_sums(got[i], ref[i])
    # retract the middle warp, then the others: down to an empty group
    for pw in (warps[1], warps[0], warps[2]):
        for i, outer in enumerate(OUTERS):
            accumulate_pixels(ref[i], pw, outer, sign=-1)
            accumulate_pixels_fused(got[i], pw, outer, sign=-1)
            assert_same_sums(got[i], ref[i])
    for g in got:  # nothing left: every sum exactly 0, every optional plane released
        assert not g.sum_wI.any() and g.w_partial is None and not g.bit_counts


def test_fused_fold_full_box_is_scalar_weight():
    rng = np.random.default_rng(7)
    pw = random_prepared(rng, shape=(60, 60), xy0=(0, 0))
    outer = Box(10, 10, 40, 40)
    a, b = CellSums.zeros(outer.shape, 5, 2), CellSums.zeros(outer.shape, 5, 2)
    accumulate_pixels(a, pw, outer)
    accumulate_pixels_fused(b, pw, outer)
    assert b.w_partial is None and b.n_full == 1
    assert_same_sums(b, a)


def test_fused_fold_version1_group():
    """A group without counts (read from a version-1 cell file): no count is allocated,
    the scalar full weight snaps to 0 by the version-1 rule."""
    rng = np.random.default_rng(8)
    pws = [random_prepared(rng, shape=(60, 60), xy0=(0, 0)) for _ in range(2)]
    outers = [Box(10, 10, 40, 40), Box(-5, -5, 20, 20)]
    for outer in outers:
        a = CellSums.zeros(outer.shape, 5, 2)
        a.counted = False
        b = copy.deepcopy(a)
        for sign in (1, -1):
            for pw in pws:
                accumulate_pixels(a, pw, outer, sign)
                accumulate_pixels_fused(b, pw, outer, sign)
                assert_same_sums(b, a)
        assert b.n_partial is None and b.n_interp is None and not b.plane_counts


def test_fused_fold_on_uncounted_v1_arrays_is_reference_switchable(monkeypatch):
    """fold_pixels takes the numpy path when STREAMCOADD_REFERENCE names "fold"."""
    from streamcoadd.core import fold

    calls = []
    monkeypatch.setattr(fold, "accumulate_pixels", lambda *a: calls.append(a))
    monkeypatch.setenv(REFERENCE_ENV, "fold")
    outer = Box(0, 0, 10, 10)
    fold.fold_pixels(CellSums.zeros(outer.shape, 5, 0), None, outer)
    assert len(calls) == 1
