"""The numba kernels (streamcoadd.core.kernels) against their references: astropy's
SigmaClip for the clipped weight, the numpy fold (core.fold.accumulate_pixels) for the
fused fold."""

from __future__ import annotations

import numpy as np
import pytest
from astropy.stats import SigmaClip

from streamcoadd.core import kernels
from streamcoadd.core.fold import REFERENCE_ENV, weight_from_variances


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
