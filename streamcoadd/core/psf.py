"""PSF stamps: centring to the configured size and adaptive second moments."""

from __future__ import annotations

import numpy as np


def resize_stamp(stamp: np.ndarray, size: int) -> np.ndarray:
    """Crop or zero-pad an odd-sized centred stamp to ``size`` x ``size`` (odd), keeping
    the centre pixel in the centre. Returns float64."""
    h, w = stamp.shape
    out = np.zeros((size, size), np.float64)
    half = size // 2
    hy, hx = h // 2, w // 2
    ry, rx = min(half, hy), min(half, hx)
    out[half - ry:half + ry + 1, half - rx:half + rx + 1] = \
        stamp[hy - ry:hy + ry + 1, hx - rx:hx + rx + 1]
    return out


def psf_moments(stamp: np.ndarray, max_iter: int = 50, tol: float = 1e-6):
    """Adaptive (elliptical-Gaussian-weighted) second moments of a PSF image, in px².

    Iterates ``M <- 2 * sum(W I r r^T) / sum(W I)`` with ``W = exp(-r^T M^-1 r / 2)``
    (the SdssShape/HSM fixed point). Returns ``(ixx, iyy, ixy, flag)``; ``flag`` is True
    when the iteration did not converge or the stamp has no positive flux.
    """
    img = np.asarray(stamp, np.float64)
    h, w = img.shape
    y, x = np.mgrid[0:h, 0:w].astype(np.float64)
    total = img.sum()
    if not total > 0:
        return (np.nan, np.nan, np.nan, True)
    cx, cy = (img * x).sum() / total, (img * y).sum() / total
    ixx = iyy = 4.0
    ixy = 0.0
    for _ in range(max_iter):
        det = ixx * iyy - ixy * ixy
        if not det > 0:
            return (np.nan, np.nan, np.nan, True)
        dx, dy = x - cx, y - cy
        q = (iyy * dx * dx - 2 * ixy * dx * dy + ixx * dy * dy) / det
        wi = np.exp(-0.5 * q) * img
        s = wi.sum()
        if not s > 0:
            return (np.nan, np.nan, np.nan, True)
        cx, cy = cx + (wi * dx).sum() / s, cy + (wi * dy).sum() / s
        nxx = 2 * (wi * dx * dx).sum() / s
        nyy = 2 * (wi * dy * dy).sum() / s
        nxy = 2 * (wi * dx * dy).sum() / s
        done = max(abs(nxx - ixx), abs(nyy - iyy), abs(nxy - ixy)) < tol * (nxx + nyy)
        ixx, iyy, ixy = nxx, nyy, nxy
        if done:
            return (float(ixx), float(iyy), float(ixy), False)
    return (float(ixx), float(iyy), float(ixy), True)
