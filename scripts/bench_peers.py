"""Peers for the benchmark: Montage ``mAdd`` and SWarp on the same, already aligned warps.

Both compute a plain weighted mean of the images, no resampling, no background
subtraction. Their inputs are prepared outside the timed region (``convert``): for each
warp, a single-HDU float32 image (bad and NO_DATA pixels set to 0) with the warp's WCS,
and a weight map ``w * good`` where ``w`` is the warp's scalar weight computed exactly as
streamcoadd does (1 / 3-sigma-clipped mean variance of good pixels). With these weights
the peers' mean is, on pixels where every warp is good, the same number as ours.

    python3 scripts/bench_peers.py convert WARP... --dir D
    python3 scripts/bench_peers.py madd  --dir D --out coadd_madd.fits
    python3 scripts/bench_peers.py swarp --dir D --out coadd_swarp.fits [--threads 1]
    python3 scripts/bench_peers.py compare --dir D --state STATE --patch X,Y --json J
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from astropy.io import fits

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench_floor import BAD_PLANES, NO_DATA, weight_of  # noqa: E402

WCS_KEYS = ("CTYPE1", "CTYPE2", "CUNIT1", "CUNIT2", "CRVAL1", "CRVAL2", "CRPIX1", "CRPIX2",
            "CD1_1", "CD1_2", "CD2_1", "CD2_2", "RADESYS", "EQUINOX", "LONPOLE", "LATPOLE")


def montage_exe(name):
    return shutil.which(name)


def swarp_exe():
    return shutil.which("swarp") or shutil.which("SWarp")


def available():
    """{'madd': path or None, 'swarp': path or None}"""
    return {"madd": montage_exe("mAdd") if montage_exe("mImgtbl") else None,
            "swarp": swarp_exe()}


def _wcs_header(ih, shape, bitpix=-32):
    """A plain TAN header with a CD matrix (what Montage and SWarp both read)."""
    from astropy.wcs import WCS

    w = WCS(ih, naxis=2)
    src = w.to_header()
    h = fits.Header()
    h["SIMPLE"] = True
    h["BITPIX"] = bitpix
    h["NAXIS"] = 2
    h["NAXIS1"], h["NAXIS2"] = shape[1], shape[0]
    for k in WCS_KEYS:
        if k in src and not k.startswith("CD"):
            h[k] = src[k]
    cd = w.pixel_scale_matrix
    h["CD1_1"], h["CD1_2"], h["CD2_1"], h["CD2_2"] = cd[0, 0], cd[0, 1], cd[1, 0], cd[1, 1]
    h["EQUINOX"] = 2000.0
    return h


def convert(warps, d):
    d = Path(d)
    (d / "img").mkdir(parents=True, exist_ok=True)
    rows = []
    for p in warps:
        with fits.open(p, memmap=True) as hl:
            ih = hl["IMAGE"].header
            img = hl["IMAGE"].data.astype(np.float32)
            mask = hl["MASK"].data.astype(np.int32)
            var = hl["VARIANCE"].data.astype(np.float32)
            w = weight_of(mask, var, hl[0].header.get("WEIGHT"))
            xy0 = (-int(ih["LTV1"]), -int(ih["LTV2"]))
        good = (mask & (NO_DATA | BAD_PLANES)) == 0
        hdr = _wcs_header(ih, img.shape)
        stem = Path(p).stem
        fits.PrimaryHDU(np.where(good, img, np.float32(0)), hdr.copy()).writeto(
            d / "img" / f"{stem}.fits", overwrite=True)
        fits.PrimaryHDU((good * w).astype(np.float32), hdr.copy()).writeto(
            d / "img" / f"{stem}_area.fits", overwrite=True)
        rows.append(dict(warp=str(p), stem=stem, weight=w, xy0=xy0))
        np.save(d / f"{stem}.good.npy", np.packbits(good))
    hdr = _wcs_header(ih, img.shape, -64)
    (d / "template.hdr").write_text(
        "".join(f"{c.image:80s}\n" for c in hdr.cards) + f"{'END':80s}\n")
    (d / "images.txt").write_text("\n".join(r["stem"] + ".fits" for r in rows) + "\n")
    (d / "meta.json").write_text(json.dumps(dict(rows=rows, shape=list(img.shape),
                                                 xy0=list(xy0))))


def _run(cmd, cwd=None):
    r = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    if r.returncode != 0 or "ERROR" in r.stdout[:200]:
        raise SystemExit(f"{cmd[0]} failed ({r.returncode}): {r.stdout[-2000:]} {r.stderr[-2000:]}")
    return r


def setup_madd(d):
    """mImgtbl (the image table): metadata only, not part of the timed coadd."""
    d = Path(d)
    r = _run(["mImgtbl", str(d / "img"), str(d / "images.tbl")])  # skips *_area.fits
    n = len((d / "images.txt").read_text().split())
    if f"count={n}," not in r.stdout:
        raise SystemExit(f"mImgtbl did not list the {n} images: {r.stdout}")


def run_madd(d, out):
    d = Path(d)
    return _run(["mAdd", "-p", str(d / "img"), str(d / "images.tbl"), str(d / "template.hdr"),
                 str(out)])


def run_swarp(d, out, threads=1):
    return _run(swarp_cmd(d, out, threads), cwd=d)


def swarp_cmd(d, out, threads=1):
    """The SWarp command line (the output grid is the warps' grid: no resampling)."""
    d = Path(d)
    names = [str(d / "img" / n) for n in (d / "images.txt").read_text().split()]
    meta = json.loads((d / "meta.json").read_text())
    ny, nx = meta["shape"]
    # centre/size of the common grid in pixels of the first image: no resampling
    hdr = fits.getheader(names[0])
    from astropy.wcs import WCS

    ra, dec = WCS(hdr).all_pix2world([[(nx - 1) / 2 + 0, (ny - 1) / 2]], 0)[0]
    cmd = [swarp_exe(), *names, "-c", "/dev/null",
           "-IMAGEOUT_NAME", str(out), "-WEIGHTOUT_NAME", str(out).replace(".fits", ".weight.fits"),
           "-COMBINE_TYPE", "WEIGHTED", "-RESAMPLE", "N", "-SUBTRACT_BACK", "N",
           "-WEIGHT_TYPE", "MAP_WEIGHT", "-WEIGHT_SUFFIX", "_area.fits",
           "-CENTER_TYPE", "MANUAL", "-CENTER", f"{ra},{dec}",
           "-PIXELSCALE_TYPE", "MANUAL", "-PIXEL_SCALE", f"{abs(hdr['CD1_1']) * 3600:.10f}",
           "-IMAGE_SIZE", f"{nx},{ny}", "-PROJECTION_TYPE", "TAN",
           "-FSCALASTRO_TYPE", "NONE", "-NTHREADS", str(threads),
           "-COMBINE_BUFSIZE", "1024", "-MEM_MAX", "2048", "-VMEM_DIR", str(d),
           "-RESAMPLE_DIR", str(d), "-WRITE_XML", "N", "-VERBOSE_TYPE", "QUIET",
           "-COPY_KEYWORDS", "", "-BLANK_BADPIXELS", "Y"]
    return cmd


def compare(d, state, patch, band="r"):
    """Compare peers' coadds with ours on patch ``patch``'s inner cells where every warp
    is good (so interpolation, cell membership and masks play no role)."""
    from astropy.wcs import WCS

    from streamcoadd import open_state
    from streamcoadd.core.skymap import CellId, PatchId

    d = Path(d)
    meta = json.loads((d / "meta.json").read_text())
    shape = tuple(meta["shape"])
    x0, y0 = meta["xy0"]
    n = len(meta["rows"])
    allgood = np.ones(shape, bool)
    for r in meta["rows"]:
        allgood &= np.unpackbits(np.load(d / f"{r['stem']}.good.npy"),
                                 count=shape[0] * shape[1]).reshape(shape).astype(bool)
    ours = np.full(shape, np.nan)
    sig = np.full(shape, np.nan)
    with open_state(state) as st:
        tract = st.skymap.tract(st.skymap.tracts and next(iter(st.skymap.tracts)))
        pid = PatchId(tract.id, *patch)
        ncell = tract.cells.cells_per_patch
        full = 0
        for cy in range(ncell):
            for cx in range(ncell):
                co = st.cell(CellId(pid, cx, cy), band)
                if co is None or co.n_inputs != n:
                    continue
                full += 1
                ib = co.inner_box
                sl = (slice(ib.y0 - y0, ib.y1 - y0), slice(ib.x0 - x0, ib.x1 - x0))
                ours[sl] = co.inner(co.image)
                sig[sl] = np.sqrt(co.inner(co.variance))
    ref_wcs = WCS(fits.Header.fromstring((d / "template.hdr").read_text(), sep="\n"))
    sel = allgood & np.isfinite(ours)
    out = dict(pixels_compared=int(sel.sum()), cells_with_all_inputs=full)
    for name in ("madd", "swarp"):
        f = d / f"coadd_{name}.fits"
        if not f.exists():
            continue
        with fits.open(f) as h:
            data = h[0].data.astype(np.float64)
            w = WCS(h[0].header)
        # pixel offset of the peer's grid relative to the warps' grid
        ox, oy = (np.round(w.all_world2pix(ref_wcs.all_pix2world([[0, 0]], 0), 0)[0])).astype(int)
        peer = np.full(shape, np.nan)
        hh, ww = data.shape
        ys, xs = slice(max(0, -oy), min(shape[0], hh - oy)), slice(max(0, -ox), min(shape[1], ww - ox))
        peer[ys, xs] = data[ys.start + oy:ys.stop + oy, xs.start + ox:xs.stop + ox]
        s = sel & np.isfinite(peer)
        diff = np.abs(peer[s] - ours[s])
        bright = np.abs(ours[s]) > 10 * sig[s]
        out[name] = dict(
            pixels=int(s.sum()), grid_offset=[int(ox), int(oy)],
            max_abs_diff_over_sigma=float((diff / sig[s]).max(initial=0)),
            max_rel_diff=float((diff / np.maximum(np.abs(ours[s]), sig[s])).max(initial=0)),
            max_rel_diff_bright=float((diff[bright] / np.abs(ours[s][bright])).max(initial=0)),
            bright_pixels=int(bright.sum()))
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("what", choices=["convert", "madd-setup", "madd", "swarp", "swarp-cmd",
                                     "compare"])
    ap.add_argument("warps", nargs="*")
    ap.add_argument("--dir", required=True)
    ap.add_argument("--out")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--state")
    ap.add_argument("--patch")
    ap.add_argument("--json")
    a = ap.parse_args(argv)
    t0 = time.perf_counter()
    if a.what == "convert":
        convert(a.warps, a.dir)
    elif a.what == "madd-setup":
        setup_madd(a.dir)
    elif a.what == "madd":
        run_madd(a.dir, a.out)
    elif a.what == "swarp":
        run_swarp(a.dir, a.out, a.threads)
    elif a.what == "swarp-cmd":
        (Path(a.dir) / "swarp_cmd.json").write_text(json.dumps(swarp_cmd(a.dir, a.out, a.threads)))
    else:
        res = compare(a.dir, a.state, tuple(int(v) for v in a.patch.split(",")))
        Path(a.json).write_text(json.dumps(res, indent=1))
    print(f"{a.what}: {time.perf_counter() - t0:.2f} s", file=sys.stderr)


if __name__ == "__main__":
    main()
