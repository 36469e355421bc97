"""Numba kernels for the hot loops of ingest; pure (no I/O), like the rest of the core.

- :func:`clipped_mean_weight`: 1 / (3-sigma, 2-iteration clipped mean) of the good
  variances with exactly the pixels astropy ``SigmaClip`` keeps (exact medians from a
  histogram of the float32 bit patterns, float64 sums in blocks), and a guard that hands
  back to astropy when a value lies within round-off of a clip bound.
- :func:`accumulate_pixels_fused`: the fold of one prepared warp into one cell, equal to
  the numpy reference :func:`streamcoadd.core.fold.accumulate_pixels` (same float64
  products, one addition per pixel and sum in the same order: bit-identical sums; the
  same integer counts and the same lazy allocation of optional planes).

Every kernel is ``@njit(cache=True)``: compiled once per machine (a few seconds), then
loaded from ``__pycache__``.
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit

# ------------------------------------------------------------------ the clipped weight

_BLOCK = 4096
_REASSOC = {"reassoc"}  # lets LLVM vectorize the in-block sums (no other fast-math flag)

#: a value this close to a clip bound (relative to |centre| + sigma * std) could lie on
#: the other side of astropy's bound, whose std is summed in another order (the sums here
#: differ from numpy's by < ~300 eps): then the caller uses astropy
GUARD_RTOL = 1e-12


@njit(cache=True, nogil=True, fastmath=_REASSOC)
def _block(xb, lo, hi, centre, a, b, tol):
    """Over one block: Σv and Σ(v - centre)² of the v in [lo, hi], their count, the
    count below lo and the count within tol of a or b (v: float64 of the float32 xb)."""
    s = 0.0
    q = 0.0
    c = 0
    below = 0
    near = 0
    for i in range(xb.size):
        v = np.float64(xb[i])
        inside = (v >= lo) & (v <= hi)
        d = v - centre
        s += v if inside else 0.0
        q += d * d if inside else 0.0
        c += 1 if inside else 0
        below += 1 if v < lo else 0
        near += 1 if (abs(v - a) <= tol) | (abs(v - b) <= tol) else 0
    return s, q, c, below, near


@njit(cache=True, nogil=True)
def _stats(x, lo, hi, centre, a, b, tol):
    """:func:`_block` over blocks of ``_BLOCK`` values; the per-block float64 sums are
    returned as arrays (the caller sums them pairwise with numpy)."""
    n = x.size
    nb = -(-n // _BLOCK)
    s = np.empty(nb)
    q = np.empty(nb)
    c = 0
    below = 0
    near = 0
    for k in range(nb):
        s[k], q[k], ck, bk, nk = _block(x[k * _BLOCK:(k + 1) * _BLOCK], lo, hi, centre,
                                        a, b, tol)
        c += ck
        below += bk
        near += nk
    return s, q, c, below, near


@njit(cache=True, nogil=True)
def _hist16(bits):
    """Histogram of the top 16 bits of the float32 bit patterns (int64, 65536 bins)."""
    h = np.zeros(65536, np.int64)
    for i in range(bits.size):
        h[bits[i] >> 16] += 1
    return h


@njit(cache=True, nogil=True)
def _collect(bits, top1, top2):
    """The bit patterns whose top 16 bits are ``top1`` or ``top2`` (a new array)."""
    out = np.empty(bits.size, np.uint32)
    k = 0
    for i in range(bits.size):
        t = bits[i] >> 16
        if t == top1 or t == top2:
            out[k] = bits[i]
            k += 1
    return out[:k]


def _median(bits: np.ndarray, cum: np.ndarray, lo_rank: int, n: int) -> float:
    """``np.median`` (float64) of the values of ranks ``lo_rank .. lo_rank + n - 1`` of
    the non-negative float32 values whose bit patterns are ``bits`` (``cum``: cumulative
    histogram of their top 16 bits). Exact: the median is an order statistic (or the mean
    of two, computed as numpy does: (a + b) / 2 in float64)."""
    h = n // 2
    ranks = [lo_rank + h] if n % 2 else [lo_rank + h - 1, lo_rank + h]
    # non-negative floats sort as their bit patterns: the bin of rank k is found by count
    tops = [int(np.searchsorted(cum, k, side="right")) for k in ranks]
    members = _collect(bits, tops[0], tops[-1])
    below = int(cum[tops[0] - 1]) if tops[0] else 0
    kth = [k - below for k in ranks]
    members.partition(kth)
    vals = [np.float64(members[k].view(np.float32)) for k in kth]
    if len(vals) == 1:
        return float(vals[0])
    return float((vals[0] + vals[1]) / np.float64(2.0))


def clipped_mean_weight(var: np.ndarray, sigma: float = 3.0,
                        maxiters: int = 2) -> tuple[float, int] | None:
    """1 / clipped mean of float32 variances, with exactly astropy's kept pixels.

    The rule is astropy ``SigmaClip(sigma, maxiters, cenfunc=median, stdfunc=std)`` on
    the float64 values: each iteration keeps the values within ``sigma`` standard
    deviations of the median of the values kept so far. The kept values after an
    iteration are an interval of ranks of the sorted input, so every median is an order
    statistic of the whole array (histogram of bit patterns + selection in one bin: no
    sort, no filtered copy); the std and the mean are float64 sums over blocks.

    Parameters
    ----------
    var : numpy.ndarray
        float32 variances (nJy^2), any shape; not modified.
    sigma : float
    maxiters : int

    Returns
    -------
    (float, int) or None
        ``(weight in 1/nJy^2, number of values kept)``; None when the input is not
        float32, is empty or has a negative, NaN or infinite value, or when a value lies
        within ``GUARD_RTOL`` of a clip bound. The caller then uses astropy, so the kept
        set is always astropy's. The weight may differ from astropy's in the last bits
        (its mean sums in another order): ~1e-16 relative.
    """
    if var.dtype != np.float32 or var.size == 0:
        return None
    x = np.ascontiguousarray(var).reshape(-1)
    bits = x.view(np.uint32)
    hist = _hist16(bits)
    if hist[0x7F80:].any():  # sign bit, inf or nan: bit order is not value order
        return None
    cum = np.cumsum(hist)
    lo, hi = -np.inf, np.inf
    rank0, n = 0, x.size
    s = None
    for _ in range(maxiters):
        if s is None:
            s = np.sum(_stats(x, lo, hi, 0.0, 0.0, 0.0, -1.0)[0])
        mean = s / np.float64(n)
        std = math.sqrt(np.sum(_stats(x, lo, hi, mean, 0.0, 0.0, -1.0)[1]) / np.float64(n))
        cen = np.float64(_median(bits, cum, rank0, n))
        new_lo = cen - np.float64(std) * np.float64(sigma)
        new_hi = cen + np.float64(std) * np.float64(sigma)
        tol = GUARD_RTOL * (abs(cen) + abs(std) * sigma)
        lo, hi = max(lo, new_lo), min(hi, new_hi)  # astropy clips the already kept set
        sb, _, kept, below, near = _stats(x, lo, hi, 0.0, new_lo, new_hi, tol)
        if near:
            return None
        s = np.sum(sb)
        changed = n - kept
        rank0, n = below, kept  # the kept values are the ranks below .. below + kept - 1
        if changed == 0 or n == 0:
            break
    if n == 0:
        return None
    return 1.0 / float(s / np.float64(n)), int(n)


# ------------------------------------------------------------------------- the fold
#
# Kernels take whole arrays plus the origin of the box in each (ay, ax: in the cell's
# accumulators; by, bx: in the warp) and the box size (h, w): numba then sees contiguous
# rows it vectorizes (2-D slice views would be typed as strided and not vectorized). They
# walk the box row by row, so each row of the inputs is read from memory once and every
# accumulator row is read and written once. ``ws`` is the signed weight (sign * w) and
# ``isign`` the signed count step (+1 fold, -1 retraction). Where a pixel is not valid the
# numpy reference multiplies by ``valid * ws`` (0.0 * ws, a signed zero); so do these.


@njit(cache=True, nogil=True)
def scan_box(valid, bad, or_mask, by, bx, h, w):
    """Over the box of the warp: (every pixel valid, any pixel bad, OR of ``or_mask``):
    what decides which optional planes the fold allocates."""
    invalid = np.uint8(0)
    anybad = np.uint8(0)
    bits = np.int32(0)
    for r in range(h):
        Q = valid[by + r, bx:bx + w]
        D = bad[by + r, bx:bx + w]
        M = or_mask[by + r, bx:bx + w]
        for x in range(w):
            invalid |= np.uint8(1) - np.uint8(Q[x])
            anybad |= np.uint8(D[x])
            bits |= M[x]
    return invalid == 0, anybad != 0, bits


@njit(cache=True, nogil=True)
def fold_box(sum_wI, sum_w2var, ay, ax, img, var, by, bx, h, w, fimg, fvar, ws, valid,
             partial, w_partial, n_partial, count_partial, bad, has_bad, interp, n_interp,
             count_interp, isign):
    """The fold's main pass over one box, row by row:

    - ``sum_wI += f64(img) * g`` and ``sum_w2var += f64(var) * (g * fvar)`` with
      ``g = fimg`` (``partial`` False: every pixel valid) or ``g = valid ? fimg : 0.0 * fimg``;
    - ``partial``: ``w_partial += valid ? ws : 0.0 * ws`` and (``count_partial``)
      ``n_partial += isign * valid``;
    - ``has_bad``: ``interp += ws`` where ``bad`` and (``count_interp``)
      ``n_interp += isign * bad``.

    ``img``/``var`` are the float32 planes (``fimg`` = ws, ``fvar`` = w) or the
    precomputed float64 products (``fimg`` = ±1, ``fvar`` = 1: multiplying by ±1 is
    exact). Arrays whose flag is off may be any array of their dtype."""
    zero = ws * 0.0
    gzero = fimg * 0.0
    for r in range(h):
        A = sum_wI[ay + r, ax:ax + w]
        B = sum_w2var[ay + r, ax:ax + w]
        II = img[by + r, bx:bx + w]
        V = var[by + r, bx:bx + w]
        if partial:
            Q = valid[by + r, bx:bx + w]
            P = w_partial[ay + r, ax:ax + w]
            for x in range(w):
                g = fimg if Q[x] else gzero
                A[x] += np.float64(II[x]) * g
                B[x] += np.float64(V[x]) * (g * fvar)
                P[x] += ws if Q[x] else zero
            if count_partial:
                N = n_partial[ay + r, ax:ax + w]
                for x in range(w):
                    N[x] += isign * np.int32(Q[x])
        else:
            gv = fimg * fvar
            for x in range(w):
                A[x] += np.float64(II[x]) * fimg
                B[x] += np.float64(V[x]) * gv
        if has_bad:
            D = bad[by + r, bx:bx + w]
            X = interp[ay + r, ax:ax + w]
            for x in range(w):
                if D[x]:
                    X[x] += ws
            if count_interp:
                N = n_interp[ay + r, ax:ax + w]
                for x in range(w):
                    N[x] += isign * np.int32(D[x])


@njit(cache=True, nogil=True)
def add_scaled_box(acc, ay, ax, plane, by, bx, h, w, ws, valid, partial):
    """``acc += f64(plane) * f`` over the box, ``f`` as in :func:`fold_box` (noise)."""
    zero = ws * 0.0
    for r in range(h):
        A = acc[ay + r, ax:ax + w]
        S = plane[by + r, bx:bx + w]
        if partial:
            Q = valid[by + r, bx:bx + w]
            for x in range(w):
                A[x] += np.float64(S[x]) * (ws if Q[x] else zero)
        else:
            for x in range(w):
                A[x] += np.float64(S[x]) * ws


@njit(cache=True, nogil=True)
def add_plane_box(acc, cnt, count, plane, ay, ax, by, bx, h, w, ws, isign):
    """A propagated plane: ``acc += plane ? ws : 0.0 * ws`` and (``count``)
    ``cnt += isign * plane`` over the box."""
    zero = ws * 0.0
    for r in range(h):
        A = acc[ay + r, ax:ax + w]
        S = plane[by + r, bx:bx + w]
        for x in range(w):
            A[x] += ws if S[x] else zero
        if count:
            N = cnt[ay + r, ax:ax + w]
            for x in range(w):
                N[x] += isign * np.int32(S[x])


@njit(cache=True, nogil=True)
def count_bit_box(cnt, ay, ax, or_mask, by, bx, h, w, bit, isign):
    """``cnt += isign * ((or_mask >> bit) & 1)`` over the box (per-bit input counts)."""
    for r in range(h):
        N = cnt[ay + r, ax:ax + w]
        M = or_mask[by + r, bx:bx + w]
        for x in range(w):
            N[x] += isign * ((M[x] >> bit) & 1)
