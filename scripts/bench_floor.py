"""The benchmark's floor: the same cell math as streamcoadd's fold (SPEC §3), done batch,
in memory, with plain numpy, no persistence and no bookkeeping (no content hash, no
ledger, no per-bit mask counts, no validation beyond what the math needs).

Per warp: read the FITS planes; weight = 1 / sigma_clipped_stats(var[good], sigma=3,
maxiters=2) mean; linear interpolation of bad pixels along rows (nearest good pixel on
each side in the same row; rows without any good pixel take the nearest good pixel in
2-D); then for every cell whose inner box and centre the warp's valid pixels fully cover:
accumulate, over the cell's 250 x 250 outer box, Σw, Σw·I, Σw²·var, Σw·[interpolated],
Σw·[SAT], OR of the kept mask bits, and Σw·PSF (nearest stamp to the cell centre, cropped
to 35 x 35) with the PSF adaptive moments (once per stamp) for the contributor row.
Inputs whose good fraction of the inner box is <= 0.5 go to a separate fallback group.

This module does not import streamcoadd.core.fold: it is an independent implementation, so
comparing its coadd with ours also checks the core (``--check STATE``). The skymap is only
used for geometry (where the cells are).

    python3 scripts/bench_floor.py WARP... --skymap config/skymap-lsst.toml --json out.json
        [--check STATE] [--ours-fold]

``--ours-fold`` runs the second line, "floor using our fold functions": streamcoadd's
read_warp / prepare_warp / cell_input / fold_cell into in-memory accumulators, still no
persistence.
"""

from __future__ import annotations

import time

T_START = time.perf_counter()

import argparse
import json
import resource
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np
from astropy.io import fits
from astropy.stats import sigma_clipped_stats

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from streamcoadd.core.masks import CANONICAL_PLANES  # noqa: E402
from streamcoadd.core.skymap import Box, load_skymap  # noqa: E402

B = {k: 1 << v for k, v in CANONICAL_PLANES.items()}
NO_DATA = B["NO_DATA"]
BAD_PLANES = B["BAD"] | B["SAT"] | B["CR"] | B["SUSPECT"] | B["CLIPPED"]
DROP_PLANES = B["EDGE"] | B["NOT_DEBLENDED"]
KEEP = ~(BAD_PLANES | DROP_PLANES | NO_DATA)
SAT = B["SAT"]
PSF_SIZE = 35
MAX_MASKFRAC = 0.5


# ------------------------------------------------------------------------------ read
def read(path):
    with fits.open(path, memmap=True) as h:
        ph = h[0].header
        ih = h["IMAGE"].header
        xy0 = (-int(ih["LTV1"]), -int(ih["LTV2"]))
        mh = h["MASK"].header
        for k, v in mh.items():  # the generator writes canonical bits: no remap needed
            if k.startswith("MP_") and CANONICAL_PLANES.get(k[3:], v) != v:
                raise SystemExit(f"{path}: mask bits are not canonical; the floor does not remap")
        image = h["IMAGE"].data.astype(np.float32)
        mask = h["MASK"].data.astype(np.int32)
        var = h["VARIANCE"].data.astype(np.float32)
        stamps = np.asarray(h["PSF"].data, np.float64)
        if stamps.ndim == 2:
            stamps, pos = stamps[None], None
        else:
            t = h["PSFPOS"].data
            pos = np.column_stack([np.asarray(t["x"], float), np.asarray(t["y"], float)])
        return dict(visit=int(ph["VISIT"]), detector=int(ph["DETECTOR"]), xy0=xy0,
                    image=image, mask=mask, var=var, stamps=stamps, pos=pos,
                    weight_kw=ph.get("WEIGHT"))


# ------------------------------------------------------------------------------ warp math
def weight_of(mask, var, weight_kw=None):
    if weight_kw is not None:
        return float(weight_kw)
    v = var[(mask & (NO_DATA | BAD_PLANES)) == 0].astype(np.float64)
    v = v[np.isfinite(v)]
    mean, _, _ = sigma_clipped_stats(v, sigma=3.0, maxiters=2)
    return 1.0 / float(mean)


def interpolate(planes, valid, bad):
    """Fill bad pixels: linear along the row between the nearest good pixels on each side
    (one side missing: copy the other); no good pixel in the row: nearest good in 2-D."""
    out = [np.where(valid, p, np.float32(0)) for p in planes]
    h, w = valid.shape
    bad_idx = np.flatnonzero(bad)
    if not bad_idx.size:
        return out
    # runs of non-good pixels, split at row ends; the pixels just outside a run are good
    ng = np.flatnonzero(~(valid & ~bad))
    brk = np.ones(ng.size, bool)
    brk[1:] = (np.diff(ng) != 1) | (ng[1:] % w == 0)
    run = np.cumsum(brk) - 1
    starts = ng[brk]
    ends = np.append(ng[np.flatnonzero(brk)[1:] - 1], ng[-1])
    has_l = starts % w != 0
    has_r = (ends + 1) % w != 0
    r = run[np.searchsorted(ng, bad_idx)]  # run of each bad pixel
    hl, hr = has_l[r], has_r[r]
    li = np.where(hl, starts[r] - 1, ends[r] + 1)
    ri = np.where(hr, ends[r] + 1, starts[r] - 1)
    both = hl & hr
    frac = np.zeros(bad_idx.size)
    frac[both] = (bad_idx[both] - li[both]) / (ri[both] - li[both])
    orphan = ~(hl | hr)
    if orphan.any():
        from scipy import ndimage

        good = valid & ~bad
        if not good.any():
            return out
        _, (ny, nx) = ndimage.distance_transform_edt(~good, return_indices=True)
        o = bad_idx[orphan]
        li[orphan] = ri[orphan] = ny.ravel()[o] * w + nx.ravel()[o]
    for p in out:
        f = p.ravel()
        lv = f[li].astype(np.float64)
        rv = f[ri].astype(np.float64)
        f[bad_idx] = lv + (rv - lv) * frac
    return out


def crop(stamp, size=PSF_SIZE):
    out = np.zeros((size, size))
    h, w = stamp.shape
    half = size // 2
    ry, rx = min(half, h // 2), min(half, w // 2)
    out[half - ry:half + ry + 1, half - rx:half + rx + 1] = \
        stamp[h // 2 - ry:h // 2 + ry + 1, w // 2 - rx:w // 2 + rx + 1]
    return out


def adaptive_moments(img, iters=50, tol=1e-6):
    h, w = img.shape
    y, x = np.mgrid[0:h, 0:w].astype(float)
    t = img.sum()
    cx, cy = (img * x).sum() / t, (img * y).sum() / t
    m = np.array([4.0, 4.0, 0.0])
    for _ in range(iters):
        det = m[0] * m[1] - m[2] ** 2
        dx, dy = x - cx, y - cy
        wi = img * np.exp(-0.5 * (m[1] * dx * dx - 2 * m[2] * dx * dy + m[0] * dy * dy) / det)
        s = wi.sum()
        cx, cy = cx + (wi * dx).sum() / s, cy + (wi * dy).sum() / s
        new = 2 * np.array([(wi * dx * dx).sum(), (wi * dy * dy).sum(), (wi * dx * dy).sum()]) / s
        done = np.abs(new - m).max() < tol * (new[0] + new[1])
        m = new
        if done:
            return (*m, False)
    return (*m, True)


# ------------------------------------------------------------------------------ the floor
class Floor:
    """Accumulators of every cell, kept in memory (float64)."""

    def __init__(self, tract):
        self.tract = tract
        self.g = tract.cells
        self.shape = (self.g.outer, self.g.outer)
        self.groups = {"good": {}, "fallback": {}}  # cell -> dict of sums
        self.t = defaultdict(float)

    def sums(self, group, cell):
        d = self.groups[group].get(cell)
        if d is None:
            z = lambda: np.zeros(self.shape)  # noqa: E731
            d = self.groups[group][cell] = dict(
                w=z(), wI=z(), w2var=z(), w_interp=z(), w_sat=z(),
                mask=np.zeros(self.shape, np.int32), psf=np.zeros((PSF_SIZE, PSF_SIZE)),
                psf_w=0.0, contrib=[])
        return d

    def add(self, path):
        t = self.t
        t0 = time.perf_counter()
        wp = read(path)
        t1 = time.perf_counter()
        t["read"] += t1 - t0
        mask, var = wp["mask"], wp["var"]
        w = weight_of(mask, var, wp["weight_kw"])
        t2 = time.perf_counter()
        t["weight"] += t2 - t1
        valid = (mask & NO_DATA) == 0
        bad = valid & ((mask & BAD_PLANES) != 0)
        image, var = interpolate([wp["image"], var], valid, bad)
        or_mask = np.where(valid, mask & KEEP, 0).astype(np.int32)
        sat = valid & ((mask & SAT) != 0)
        # the per-pixel products, once per warp (float64, as the sums)
        wI = np.multiply(image, np.float64(w), dtype=np.float64)
        w2v = np.multiply(var, np.float64(w) * np.float64(w), dtype=np.float64)
        t3 = time.perf_counter()
        t["interp"] += t3 - t2

        tract, g = self.tract, self.g
        h, wd = image.shape
        box = Box(wp["xy0"][0], wp["xy0"][1], wp["xy0"][0] + wd, wp["xy0"][1] + h)
        moments = {}
        for patch in tract.patches():
            pbox = tract.patch_outer_box(patch)
            if not pbox.overlaps(box):
                continue
            for cell in tract.cells_overlapping(patch, box):
                inner = tract.cell_inner_box(cell)
                cx, cy = inner.x0 + g.inner // 2, inner.y0 + g.inner // 2
                if not (box.x0 <= cx < box.x1 and box.y0 <= cy < box.y1):
                    continue
                if not valid[cy - box.y0, cx - box.x0]:
                    continue
                if not box.contains(inner):
                    continue
                isl = inner.slices(wp["xy0"])
                n_in = inner.width * inner.height
                covered = np.count_nonzero(valid[isl])
                if covered < n_in:
                    continue
                gf = (covered - np.count_nonzero(bad[isl])) / n_in
                group = "fallback" if gf <= 1 - MAX_MASKFRAC else "good"
                s = self.sums(group, cell)
                outer = inner.grown(g.border)
                part = outer.intersection(box)
                ws = part.slices(wp["xy0"])
                cs = part.slices((outer.x0, outer.y0))
                v = valid[ws]
                if v.all():
                    s["w"][cs] += w
                else:
                    s["w"][cs] += v * w
                s["wI"][cs] += wI[ws]
                s["w2var"][cs] += w2v[ws]
                b = bad[ws]
                if b.any():
                    s["w_interp"][cs] += b * w
                sp = sat[ws]
                if sp.any():
                    s["w_sat"][cs] += sp * w
                s["mask"][cs] |= or_mask[ws]
                k = 0 if wp["pos"] is None else int(np.argmin(
                    (wp["pos"][:, 0] - cx) ** 2 + (wp["pos"][:, 1] - cy) ** 2))
                stamp = crop(wp["stamps"][k])
                if k not in moments:
                    moments[k] = adaptive_moments(stamp)
                s["psf"] += w * stamp
                s["psf_w"] += w
                s["contrib"].append((wp["visit"], wp["detector"], w, covered / n_in, gf,
                                     *moments[k]))
        t["accumulate"] += time.perf_counter() - t3

    def coadd(self, cell):
        """image, variance, psf of a cell (the group that counts)."""
        s = self.groups["good"].get(cell) or self.groups["fallback"].get(cell)
        if s is None:
            return None
        with np.errstate(divide="ignore", invalid="ignore"):
            has = s["w"] > 0
            return dict(image=np.where(has, s["wI"] / s["w"], np.nan),
                        variance=np.where(has, s["w2var"] / s["w"] ** 2, np.inf),
                        psf=s["psf"] / s["psf_w"], n=len(s["contrib"]), sums=s)

    def cells(self):
        return set(self.groups["good"]) | set(self.groups["fallback"])


def run_floor(paths, skymap_path, tract_id):
    tract = load_skymap(skymap_path).tract(tract_id)
    fl = Floor(tract)
    per = []
    t0 = time.perf_counter()
    for p in paths:
        a = time.perf_counter()
        fl.add(p)
        per.append(time.perf_counter() - a)
    return fl, time.perf_counter() - t0, per


def run_ours_fold(paths, skymap_path, tract_id):
    """streamcoadd's own fold functions, in memory, no persistence (no state, no ledger)."""
    from streamcoadd.core.config import FoldConfig
    from streamcoadd.core.fold import (
        CellAccumulator,
        cell_input,
        fold_cell,
        prepare_warp,
    )
    from streamcoadd.io.warp_reader import read_warp

    sm = load_skymap(skymap_path)
    tract = sm.tract(tract_id)
    cfg = FoldConfig()
    accs = {}
    per = []
    t = defaultdict(float)
    t0 = time.perf_counter()
    for p in paths:
        a = time.perf_counter()
        warp = read_warp(p, sm, cfg.bad_planes)
        b = time.perf_counter()
        pw = prepare_warp(warp, cfg)
        c = time.perf_counter()
        for patch in tract.patches_overlapping(warp.box):
            for cell in tract.cells_overlapping(patch, warp.box):
                cin = cell_input(pw, tract, cell, cfg)
                if cin is None:
                    continue
                acc = accs.get(cell)
                if acc is None:
                    acc = accs[cell] = CellAccumulator(cell=cell, outer=tract.cell_outer_box(cell))
                fold_cell(acc, cin, pw, cfg)
        d = time.perf_counter()
        t["read+validate+hash"] += b - a
        t["prepare (weight+interp)"] += c - b
        t["cells"] += d - c
        per.append(d - a)
    return accs, time.perf_counter() - t0, per, t


# ------------------------------------------------------------------------------ check
def check_against_state(fl, state, band="r"):
    """Max relative differences between the floor's coadd and the state's, over every
    cell the floor populated (image relative to the per-pixel coadd sigma)."""
    from streamcoadd import open_state

    worst = dict(image_over_sigma=0.0, variance_rel=0.0, psf_abs=0.0, sum_wI_rel=0.0,
                 cells=0, cells_missing=0, n_inputs_mismatch=0, mask_sat_mismatch=0)
    with open_state(state) as st:
        for cell in sorted(fl.cells(), key=lambda c: (c.patch.x, c.patch.y, c.y, c.x)):
            ours = st.cell(cell, band)
            mine = fl.coadd(cell)
            if ours is None:
                worst["cells_missing"] += 1
                continue
            worst["cells"] += 1
            if ours.n_inputs != mine["n"]:
                worst["n_inputs_mismatch"] += 1
            has = np.isfinite(mine["image"])
            sig = np.sqrt(mine["variance"][has])
            d = np.abs(ours.image[has] - mine["image"][has]) / sig
            worst["image_over_sigma"] = max(worst["image_over_sigma"], float(d.max(initial=0)))
            dv = np.abs(ours.variance[has] / mine["variance"][has] - 1)
            worst["variance_rel"] = max(worst["variance_rel"], float(dv.max(initial=0)))
            worst["psf_abs"] = max(worst["psf_abs"], float(np.abs(ours.psf - mine["psf"]).max()))
            s = ours.sums["sum_wI"][has]
            m = mine["sums"]["wI"][has]
            scale = np.abs(mine["sums"]["w"][has]) * np.sqrt(mine["variance"][has]) + np.abs(m)
            worst["sum_wI_rel"] = max(worst["sum_wI_rel"], float((np.abs(s - m) / scale).max(initial=0)))
    return worst


def keep_freed_memory() -> bool:
    """glibc: serve blocks up to 1 GiB from the heap and never trim it, so the per-warp
    temporaries reuse warm pages instead of faulting fresh ones in every warp (the same
    process tuning streamcoadd's ingest applies; without it the floor would pay page
    faults that ours does not)."""
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return libc.mallopt(-3, 1 << 30) == 1 and libc.mallopt(-1, 1 << 62) == 1
    except (OSError, AttributeError):
        return False


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("warps", nargs="+")
    ap.add_argument("--skymap", required=True)
    ap.add_argument("--tract", type=int, required=True)
    ap.add_argument("--json", required=True)
    ap.add_argument("--check", help="state to compare the floor's coadd with (untimed)")
    ap.add_argument("--ours-fold", action="store_true",
                    help="run streamcoadd's fold functions in memory instead")
    ap.add_argument("--save", help="npz with the floor's stitched inner coadd of a patch X,Y")
    ap.add_argument("--no-malloc-tuning", action="store_true",
                    help="leave glibc's malloc thresholds alone")
    a = ap.parse_args(argv)
    out = {"import_s": time.perf_counter() - T_START}
    out["malloc_tuning"] = False if a.no_malloc_tuning else keep_freed_memory()
    if a.ours_fold:
        accs, total, per, t = run_ours_fold(a.warps, a.skymap, a.tract)
        out.update(total_s=total, per_warp_s=per, split_s=dict(t), cells=len(accs))
    else:
        fl, total, per = run_floor(a.warps, a.skymap, a.tract)
        out.update(total_s=total, per_warp_s=per, split_s=dict(fl.t), cells=len(fl.cells()))
        if a.check:
            t0 = time.perf_counter()
            out["check"] = check_against_state(fl, a.check)
            out["check"]["seconds"] = time.perf_counter() - t0
        if a.save:
            save_stitched(fl, a.save)
    out["maxrss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    Path(a.json).write_text(json.dumps(out, indent=1))


def save_stitched(fl, path):
    """Stitch the floor's inner cells of every patch it touched into one float64 image
    over the union of the inner boxes (for the peer comparison)."""
    from streamcoadd.core.skymap import CellId  # noqa: F401

    cells = sorted(fl.cells(), key=lambda c: (c.patch.x, c.patch.y, c.y, c.x))
    boxes = [fl.tract.cell_inner_box(c) for c in cells]
    x0, y0 = min(b.x0 for b in boxes), min(b.y0 for b in boxes)
    x1, y1 = max(b.x1 for b in boxes), max(b.y1 for b in boxes)
    img = np.full((y1 - y0, x1 - x0), np.nan)
    var = np.full((y1 - y0, x1 - x0), np.inf)
    for c, b in zip(cells, boxes):
        co = fl.coadd(c)
        sl = b.slices((x0, y0))
        osl = b.slices((b.x0 - fl.g.border, b.y0 - fl.g.border))
        img[sl] = co["image"][osl]
        var[sl] = co["variance"][osl]
    np.savez(path, image=img, variance=var, xy0=np.array([x0, y0]))


if __name__ == "__main__":
    main()
