"""Fast numpy generator of LSST-like patch warps for the benchmark (scripts/bench.py).

Each warp covers the outer box of one patch (3400 x 3400 px on the LSST skymap) and has:

* a static sky of point sources (same positions in every warp, power-law fluxes), drawn
  with the warp's own Gaussian PSF (FWHM varies per visit and slightly across the patch),
* Gaussian noise from a variance plane = sky variance (per visit, with a gentle gradient)
  + source Poisson term,
* masks: a few BAD columns (full and partial), cosmic-ray tracks (CR), saturated cores
  with vertical bleed trails (SAT, image clipped), a few SUSPECT blocks, DETECTED
  footprints, for one visit in three a dead amplifier (a 509 x 2000 px BAD block), and
  for about one visit in four a NO_DATA strip along one edge (a chip gap / field edge),
  so that the overlap rule excludes some cells for some warps (issue 17's "realistic
  masks": bad columns, cosmic rays, saturation bleeds, dead amplifiers, PSF grids on
  40 % of visits),
* a PSF cube with a PSFPOS table: 3 x 3 stamps (41 x 41) on 40 % of the visits, one
  stamp on the others.

Usage (normally called by bench.py)::

    python3 scripts/bench_gen.py OUTDIR --n 8 [--small] [--seed 1] [--jobs 2]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from streamcoadd.core.masks import CANONICAL_PLANES  # noqa: E402
from streamcoadd.core.skymap import PatchId, load_skymap  # noqa: E402
from streamcoadd.io.warp_writer import write_warp  # noqa: E402

BIT = {k: np.int32(1 << v) for k, v in CANONICAL_PLANES.items()}

LSST = dict(skymap=ROOT / "config" / "skymap-lsst.toml", tract=9813, patch=(2, 2))
SMALL = dict(skymap=ROOT / "config" / "skymap-demo.toml", tract=0, patch=(1, 1))

SKY_SIGMA = 30.0  # nJy per pixel, typical single-visit sky noise
SATURATION = 2.0e5  # nJy per pixel


def geometry(small: bool):
    g = SMALL if small else LSST
    sm = load_skymap(g["skymap"])
    tract = sm.tract(g["tract"])
    patch = PatchId(tract.id, *g["patch"])
    return g["skymap"], tract, patch


def star_catalog(shape, seed=12345):
    """Static sky: positions and fluxes (nJy), same for every warp."""
    rng = np.random.default_rng(seed)
    h, w = shape
    n = max(20, int(3000 * h * w / 3400**2))
    x = rng.uniform(0, w, n)
    y = rng.uniform(0, h, n)
    # power law N(>f) ~ f^-1.5 from 1500 nJy (faint, peak ~ 3 sigma) upwards, plus a few
    # bright stars (log-uniform 1e6 - 3e8 nJy) whose cores saturate and bleed
    flux = 1500.0 * (1 - rng.uniform(0, 1, n)) ** (-1 / 1.5)
    nb = max(2, n // 300)
    flux[:nb] = 10 ** rng.uniform(6, 8.5, nb)
    flux = np.minimum(flux, 5e8)
    return x, y, flux


def gaussian_stamp(sigma, half, dx=0.0, dy=0.0):
    ax = np.arange(-half, half + 1, dtype=np.float64)
    gx = np.exp(-0.5 * ((ax - dx) / sigma) ** 2)
    gy = np.exp(-0.5 * ((ax - dy) / sigma) ** 2)
    s = np.outer(gy, gx)
    return s / s.sum()


def make_warp(shape, visit, seed, stars):
    """Image, mask, variance (float32/int32) and a PSF cube + positions (local pixels)."""
    rng = np.random.default_rng([seed, visit])
    h, w = shape
    fwhm = rng.uniform(3.0, 5.0)  # px (0.6 - 1.0 arcsec)
    sigma0 = fwhm / 2.355

    # --- noiseless model: stars drawn with a PSF whose width varies a little over the field
    model = np.zeros(shape, np.float32)
    sx, sy, sflux = stars
    half = 10
    for x, y, f in zip(sx, sy, sflux):
        ix, iy = int(x), int(y)
        s = sigma0 * (1 + 0.05 * (x / w - 0.5) + 0.03 * (y / h - 0.5))
        y0, y1 = max(iy - half, 0), min(iy + half + 1, h)
        x0, x1 = max(ix - half, 0), min(ix + half + 1, w)
        if y0 >= y1 or x0 >= x1:
            continue
        st = gaussian_stamp(s, half, x - ix - 0.5, y - iy - 0.5)
        model[y0:y1, x0:x1] += (f * st[y0 - iy + half:y1 - iy + half,
                                       x0 - ix + half:x1 - ix + half]).astype(np.float32)

    # --- variance: sky (per visit, gradient) + source term
    sky_var = (SKY_SIGMA * rng.uniform(0.8, 1.3)) ** 2
    gy = np.linspace(-1, 1, h, dtype=np.float32)[:, None]
    gx = np.linspace(-1, 1, w, dtype=np.float32)[None, :]
    grad = rng.uniform(-0.05, 0.05, 2).astype(np.float32)
    variance = np.float32(sky_var) * (1 + grad[0] * gx + grad[1] * gy)
    variance = variance + np.float32(0.02 * np.sqrt(sky_var)) * np.maximum(model, 0)
    variance = variance.astype(np.float32)

    image = model + np.sqrt(variance) * rng.standard_normal(shape, dtype=np.float32)
    image += np.float32(rng.normal(0, 0.1 * SKY_SIGMA))  # residual background offset

    mask = np.zeros(shape, np.int32)
    det = model > np.float32(0.5 * np.sqrt(sky_var))  # footprints, grown below a 1 sigma
    det[:, 1:] |= det[:, :-1]
    det[1:, :] |= det[:-1, :]
    mask[det] |= BIT["DETECTED"]

    # --- saturation: cores above the level, plus vertical bleed trails
    sat = image > SATURATION
    if sat.any():
        lab_y, lab_x = np.nonzero(sat)
        mask[sat] |= BIT["SAT"]
        # bleed: extend each saturated column up and down proportionally to the excess
        cols = np.unique(lab_x)
        for c in cols:
            rows = lab_y[lab_x == c]
            excess = float(image[rows, c].sum() / SATURATION)
            ext = int(min(200, 2 * excess))
            r0, r1 = max(rows.min() - ext, 0), min(rows.max() + ext + 1, h)
            mask[r0:r1, c] |= BIT["SAT"]
            image[r0:r1, c] = np.float32(SATURATION)
    # --- bad columns: 4 full, 6 partial; values garbage
    scale = w / 3400
    for _ in range(max(1, int(4 * scale))):
        c = rng.integers(0, w)
        mask[:, c] |= BIT["BAD"]
        image[:, c] = rng.normal(5e3, 1e3, h).astype(np.float32)
    for _ in range(max(1, int(6 * scale))):
        c = rng.integers(0, w)
        r0 = rng.integers(0, h)
        r1 = min(h, r0 + rng.integers(50, max(51, h // 2)))
        mask[r0:r1, c] |= BIT["BAD"]
        image[r0:r1, c] = np.float32(-2e3)
    # --- cosmic rays: ~1200 tracks per patch, 1-12 px long, 1-2 px wide
    ncr = max(5, int(1200 * h * w / 3400**2))
    length = rng.integers(1, 13, ncr)
    ang = rng.uniform(0, np.pi, ncr)
    x0 = rng.uniform(0, w, ncr)
    y0 = rng.uniform(0, h, ncr)
    amp = rng.uniform(20, 300, ncr) * SKY_SIGMA
    idx = np.repeat(np.arange(ncr), length)
    t = np.arange(idx.size) - np.repeat(np.cumsum(length) - length, length)
    cx = (x0[idx] + t * np.cos(ang[idx])).astype(int)
    cy = (y0[idx] + t * np.sin(ang[idx])).astype(int)
    wide = rng.uniform(0, 1, ncr)[idx] < 0.4
    cx = np.concatenate([cx, cx[wide] + 1])
    cy = np.concatenate([cy, cy[wide]])
    a = np.concatenate([amp[idx], amp[idx][wide]]).astype(np.float32)
    ok = (cx >= 0) & (cx < w) & (cy >= 0) & (cy < h)
    cx, cy, a = cx[ok], cy[ok], a[ok]
    np.add.at(image, (cy, cx), a)
    mask[cy, cx] |= BIT["CR"]
    # --- suspect: a few small blocks
    for _ in range(max(1, int(3 * scale))):
        bx, by = rng.integers(0, w - 8), rng.integers(0, h - 8)
        bw, bh = rng.integers(3, 9, 2)
        mask[by:by + bh, bx:bx + bw] |= BIT["SUSPECT"]

    # --- dead amplifier for one visit in three: an amp-sized block (LSST amps are
    # 509 x 2000 px) of BAD pixels with garbage values, somewhere in the patch: long
    # interpolated runs and, where the block meets a NO_DATA strip, orphans
    if rng.uniform() < 1 / 3:
        aw, ah = max(2, int(509 * scale)), max(2, int(2000 * h / 3400))
        ax0, ay0 = rng.integers(0, max(1, w - aw)), rng.integers(0, max(1, h - ah))
        mask[ay0:ay0 + ah, ax0:ax0 + aw] |= BIT["BAD"]
        image[ay0:ay0 + ah, ax0:ax0 + aw] = rng.normal(0, 1e4, (min(ah, h - ay0),
                                                                 min(aw, w - ax0)))
    # --- NO_DATA strip along one edge for one visit in four
    if rng.uniform() < 0.25:
        width = int(rng.uniform(0.02, 0.09) * w)
        edge = rng.integers(0, 4)
        sl = [(slice(None), slice(0, width)), (slice(None), slice(w - width, w)),
              (slice(0, width), slice(None)), (slice(h - width, h), slice(None))][edge]
        mask[sl] = BIT["NO_DATA"]
        image[sl] = np.nan
        variance[sl] = np.inf

    # --- PSF: a 3 x 3 grid of 41 x 41 stamps (positions in local pixels) on 40 % of
    # the visits, else one stamp at the centre (a cube of one, with its position)
    stamps, pos = [], []
    grid = (1 / 6, 1 / 2, 5 / 6) if rng.uniform() < 0.4 else (1 / 2,)
    for fy in grid:
        for fx in grid:
            s = sigma0 * (1 + 0.05 * (fx - 0.5) + 0.03 * (fy - 0.5))
            stamps.append(gaussian_stamp(s, 20))
            pos.append((fx * w, fy * h))
    return image, mask, variance, np.array(stamps), np.array(pos)


def write_one(args):
    out, small, visit, seed = args
    skymap_path, tract, patch = geometry(small)
    box = tract.patch_outer_box(patch)
    stars = star_catalog(box.shape)
    image, mask, variance, psf, pos = make_warp(box.shape, visit, seed, stars)
    pos = pos + np.array([box.x0, box.y0])
    path = Path(out) / f"warp_v{visit:06d}.fits"
    write_warp(path, tract=tract, xy0=(box.x0, box.y0), image=image, mask=mask,
               variance=variance, psf=psf, psf_positions=pos, visit=visit, detector=0,
               band="r", mjd=60000.0 + visit / 1000)
    return str(path)


def generate(out, n, small=False, seed=1, jobs=2, first_visit=1000) -> list[str]:
    Path(out).mkdir(parents=True, exist_ok=True)
    tasks = [(str(out), small, first_visit + i, seed) for i in range(n)]
    if jobs > 1 and n > 1:
        with ProcessPoolExecutor(jobs) as ex:
            return list(ex.map(write_one, tasks))
    return [write_one(t) for t in tasks]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out")
    ap.add_argument("--n", type=int, default=8)
    ap.add_argument("--small", action="store_true")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1))
    ap.add_argument("--first-visit", type=int, default=1000)
    a = ap.parse_args(argv)
    t0 = time.perf_counter()
    paths = generate(a.out, a.n, a.small, a.seed, a.jobs, a.first_visit)
    print(f"{len(paths)} warps in {time.perf_counter() - t0:.1f} s -> {a.out}")


if __name__ == "__main__":
    main()
