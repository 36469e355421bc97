"""The core (real CLI, real HDF5 state) against the independent brute-force reference.

Sums must agree to 1e-10 relative, image / variance / PSF to 1e-6, excluding pixels where
the core interpolated (see ``reference.py``). Also: overlap edge cases, several patches,
negative coordinates, the fallback rule, PSF grids, two bands in one state, duplicates and
same-id-different-content refusals, rejections that change nothing, finalize output.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from astropy.io import fits
from common import ROOT, SKYMAP, SKYMAP_FILE, TRACT
from reference import (
    _cut,
    compare_cell,
    fit_stamp,
    read_warp_raw,
    reference_coadd,
    run_cli,
)
from warpgen import (
    BIT,
    BROKEN_CASES,
    gaussian_stamp,
    generate,
    make_warp,
    stack_warp_set,
    write_broken,
    write_gen,
)

import streamcoadd
from streamcoadd.core.config import FoldConfig
from streamcoadd.core.skymap import Box, CellId, PatchId, load_skymap

G = SKYMAP.cells
P00 = PatchId(0, 0, 0)


# ------------------------------------------------------------------------------ helpers

_TEMPLATES: dict = {}


def new_state(tmp_path, name="state", fold: dict | None = None) -> Path:
    """A new empty state (``init`` through the CLI once per fold config, then copied)."""
    st = tmp_path / name
    key = tuple(sorted((fold or {}).items()))
    if key in _TEMPLATES and _TEMPLATES[key].exists():
        shutil.copytree(_TEMPLATES[key], st)
        return st
    args = ["init", st, "--skymap", SKYMAP_FILE]
    if fold:
        cfg = tmp_path / f"{name}-fold.toml"
        lines = ["[fold]"]
        for k, v in fold.items():
            lines.append(f"{k} = {v!r}" if not isinstance(v, (list, tuple))
                         else f"{k} = {list(v)!r}".replace("'", '"'))
        cfg.write_text("\n".join(lines) + "\n")
        args += ["--config", cfg]
    run_cli(*args)
    _TEMPLATES[key] = tmp_path / f".template-{name}"
    shutil.copytree(st, _TEMPLATES[key])
    return st


def ingest(state, *paths, check=0):
    return run_cli("ingest", state, "--quiet", *paths, check=check)


def compare_all(state, ref, fold=FoldConfig()):
    with streamcoadd.open_state(state) as st:
        bands = {b for (_, b) in ref}
        assert sorted(st.bands()) == sorted(bands)
        for band in bands:
            want = sorted(c for (c, b) in ref if b == band)
            assert sorted(st.populated_cells(band)) == want, f"populated cells of band {band}"
        for (cid, band), rc in ref.items():
            compare_cell(st.cell(cid, band), rc, fold)


def snapshot(state) -> dict:
    """All sums of all populated cells (copies), for before/after comparisons."""
    out = {}
    with streamcoadd.open_state(state) as st:
        for band in st.bands():
            for cid in st.populated_cells(band):
                c = st.cell(cid, band)
                out[(cid, band)] = ({k: np.array(v, copy=True) for k, v in c.sums.items()
                                     if isinstance(v, np.ndarray)}, c.n_inputs)
    return out


def assert_same_snapshot(a, b):
    assert a.keys() == b.keys()
    for k in a:
        (sa, na), (sb, nb) = a[k], b[k]
        assert na == nb, k
        for name in sa:
            assert np.array_equal(sa[name], sb[name]), (k, name)


def cell(x, y, patch=P00):
    return CellId(patch, x, y)


# ------------------------------------------------------------------ the reference itself

def test_reference_single_warp_is_the_warp(tmp_path):
    """Sanity of the reference, no core involved: one clean warp's coadd is the warp."""
    c = cell(3, 3)
    ob = TRACT.cell_outer_box(c)
    g = generate(TRACT, xy0=(ob.x0 - 5, ob.y0 - 7), shape=(ob.height + 12, ob.width + 10),
                 seed=4, defects=False, psf_shape=(21, 41))
    p = write_gen(tmp_path / "a.fits", TRACT, g, visit=1, detector=1)
    ref = reference_coadd([p], SKYMAP)
    rc = ref[(c, "r")]
    sl = ob.slices(g.xy0)
    np.testing.assert_allclose(rc.image, g.image[sl], rtol=1e-12)
    np.testing.assert_allclose(rc.variance, g.variance[sl], rtol=1e-12)
    # 21 rows zero-padded by 7 each side, 41 columns cropped by 3 each side
    np.testing.assert_allclose(rc.psf[7:28, :], g.psf[:, 3:38], rtol=1e-12)
    assert (rc.psf[:7] == 0).all() and (rc.psf[28:] == 0).all()
    assert rc.used == [(1, 1)] and not rc.interpolated.any()
    # the weight is 1 / clipped mean variance
    w = read_warp_raw(p).weight
    assert 1 / w == pytest.approx(np.mean(g.variance), rel=0.2)
    # and an identical image with 3x the weight leaves the coadd unchanged
    p2 = write_gen(tmp_path / "b.fits", TRACT, g, visit=2, detector=1, weight=3 * w)
    rc2 = reference_coadd([p, p2], SKYMAP)[(c, "r")]
    np.testing.assert_allclose(rc2.image, rc.image, rtol=1e-12)
    np.testing.assert_allclose(rc2.variance, rc.variance * (1 + 9) / 16, rtol=1e-12)


def test_fit_stamp_centring():
    s = np.arange(9 * 15, dtype=float).reshape(9, 15)
    out = fit_stamp(s, 5)
    assert out[2, 2] == s[4, 7]
    big = fit_stamp(s, 17)
    assert big[8, 8] == s[4, 7] and big[0].sum() == 0 and big[:, 0].sum() == 0


# ------------------------------------------------------------------ core vs reference

def test_random_stack_two_bands_noise(tmp_path):
    """A realistic mix: partial coverage, defects, PSF grids of various stamp sizes, remapped
    mask bits, afw-style origins, header weights, NaN in BAD pixels, noise realizations, two
    bands in one state, warps straddling two patches."""
    fold = {"noise_realizations": 1}
    region = Box(200, -30, 410, 170)  # crosses the patch 0 / patch 1 overlap in x
    r = stack_warp_set(tmp_path / "w", TRACT, 8, seed=10, region=region, band="r",
                       remap_prob=0.4, afw_prob=0.4, weight_prob=0.3, noise_realizations=1,
                       nan_in_bad=True)
    i = stack_warp_set(tmp_path / "w", TRACT, 5, seed=11, region=region, band="i",
                       visit0=500, noise_realizations=1)
    st = new_state(tmp_path, fold=fold)
    out = ingest(st, tmp_path / "w")
    assert "13 folded" in out.stdout, out.stdout
    cfg = FoldConfig(noise_realizations=1)
    ref = reference_coadd(r + i, SKYMAP, cfg)
    assert len({p for (c, _) in ref for p in [c.patch]}) == 2
    depth = [len(rc.inputs) for rc in ref.values()]
    assert max(depth) >= 4 and sum(rc.interpolated.any() for rc in ref.values()) > 3
    compare_all(st, ref, cfg)


def test_warp_spanning_four_patches_and_negative_coordinates(tmp_path):
    c = G.patch_inner
    a = make_warp(tmp_path / "w/a.fits", TRACT, visit=1, detector=0, xy0=(c - 130, c - 120),
                  shape=(250, 260), coverage="rotated", psf="grid", psf_grid=(3, 3))
    b = make_warp(tmp_path / "w/b.fits", TRACT, visit=2, detector=0, xy0=(c - 110, c - 140),
                  shape=(260, 240), coverage="full")
    neg = make_warp(tmp_path / "w/n.fits", TRACT, visit=3, detector=0, xy0=(-60, -60),
                    shape=(140, 150), coverage="full")
    st = new_state(tmp_path)
    ingest(st, tmp_path / "w")
    ref = reference_coadd([a, b, neg], SKYMAP)
    patches = {cid.patch for (cid, _) in ref}
    assert patches == {PatchId(0, x, y) for x in (0, 1) for y in (0, 1)}
    # the negative-coordinate warp fills patch 0's bottom-left border cells
    assert (cell(0, 0), "r") in ref and (cell(1, 1), "r") in ref
    compare_all(st, ref)


VARIANTS = ["exact", "short_left", "short_right", "short_bottom", "short_top", "nodata_pixel",
            "nodata_centre"]


def _edge_case_warp(path, c, variant, visit):
    ib, ob = TRACT.cell_inner_box(c), TRACT.cell_outer_box(c)
    box = {"exact": ib,
           "short_left": Box(ib.x0 + 1, ib.y0, ib.x1, ib.y1),
           "short_right": Box(ib.x0, ib.y0, ib.x1 - 1, ib.y1),
           "short_bottom": Box(ib.x0, ib.y0 + 1, ib.x1, ib.y1),
           "short_top": Box(ib.x0, ib.y0, ib.x1, ib.y1 - 1)}.get(variant, ob)
    if variant.startswith("short"):  # the warp box itself is one pixel short
        g = generate(TRACT, xy0=(box.x0, box.y0), shape=box.shape, seed=visit, defects=False)
    else:  # a larger warp whose valid pixels are exactly `box`
        g = generate(TRACT, xy0=(ob.x0 - 3, ob.y0 - 3), shape=(ob.height + 6, ob.width + 6),
                     seed=visit, coverage=box, defects=False)
    if variant == "nodata_pixel":
        g.mask[ib.y0 + 9 - g.xy0[1], ib.x1 - 1 - g.xy0[0]] = BIT["NO_DATA"]
        g.image[ib.y0 + 9 - g.xy0[1], ib.x1 - 1 - g.xy0[0]] = np.nan
    if variant == "nodata_centre":
        cx, cy = TRACT.cell_centre(c)
        g.mask[cy - g.xy0[1], cx - g.xy0[0]] = BIT["NO_DATA"]
        g.image[cy - g.xy0[1], cx - g.xy0[0]] = np.nan
    return write_gen(path, TRACT, g, visit=visit, detector=1)


def test_overlap_edge_cases(tmp_path):
    """A warp whose data cover a cell's inner box exactly contributes (border pixels get
    zero weight); one pixel short on any side, one NO_DATA pixel inside, or the centre
    without data: it contributes nothing. Each variant on its own cell, one ingest."""
    cells = {v: cell(1 + (k % 3) * 2, 1 + (k // 3) * 2) for k, v in enumerate(VARIANTS)}
    paths = {v: _edge_case_warp(tmp_path / "w" / f"{v}.fits", cells[v], v, 1 + k)
             for k, v in enumerate(VARIANTS)}
    st = new_state(tmp_path)
    out = ingest(st, tmp_path / "w")
    assert "1 folded" in out.stdout and "6 valid but covering no cell" in out.stdout, out.stdout
    ref = reference_coadd(list(paths.values()), SKYMAP)
    assert list(ref) == [(cells["exact"], "r")]
    with streamcoadd.open_state(st) as s:
        assert s.populated_cells("r") == [cells["exact"]]
        for v in VARIANTS[1:]:
            assert s.cell(cells[v], "r") is None, v
        c = cells["exact"]
        core = s.cell(c, "r")
        compare_cell(core, ref[(c, "r")])
        ib, ob = TRACT.cell_inner_box(c), TRACT.cell_outer_box(c)
        inner = np.zeros(ob.shape, bool)
        inner[ib.slices((ob.x0, ob.y0))] = True
        assert (core.sums["sum_w"][~inner] == 0).all()
        assert (core.sums["sum_w"][inner] > 0).all()
        assert ((core.mask[~inner] & BIT["NO_DATA"]) != 0).all()
        assert np.isnan(core.image[~inner]).all()
    # re-delivery of warps that covered no cell is a no-op too (they were recorded as seen)
    again = ingest(st, tmp_path / "w")
    assert "7 already present" in again.stdout, again.stdout


def _fallback_warp(path, c, visit, bad_pixels, seed, weight=None):
    """A warp covering cell ``c`` (and its border) with exactly ``bad_pixels`` BAD pixels in
    the inner box (clean otherwise)."""
    ob, ib = TRACT.cell_outer_box(c), TRACT.cell_inner_box(c)
    g = generate(TRACT, xy0=(ob.x0, ob.y0), shape=ob.shape, seed=seed, defects=False)
    inner = g.mask[ib.slices(g.xy0)]
    flat = inner.reshape(-1)
    order = np.random.default_rng(seed).permutation(flat.size)
    # columns from the left first (like a dead amplifier), so interpolation has good pixels
    order = np.argsort(np.arange(flat.size) % ib.width, kind="stable")
    flat[order[:bad_pixels]] |= BIT["BAD"]
    inner[...] = flat.reshape(inner.shape)
    return write_gen(path, TRACT, g, visit=visit, detector=0, weight=weight)


def test_fallback_rule_and_order_independence(tmp_path):
    c = cell(2, 5)
    n = G.inner * G.inner
    half = n // 2  # good fraction exactly 0.5: fallback (<= 1 - max_maskfrac)
    f1 = _fallback_warp(tmp_path / "w/f1.fits", c, 1, half, seed=1)
    f2 = _fallback_warp(tmp_path / "w/f2.fits", c, 2, int(0.8 * n), seed=2)
    g1 = _fallback_warp(tmp_path / "w/g1.fits", c, 3, half - 1, seed=3)  # just good
    g2 = _fallback_warp(tmp_path / "w/g2.fits", c, 4, 10, seed=4)
    ref_f = reference_coadd([f1, f2], SKYMAP)[(c, "r")]
    assert ref_f.fallback and ref_f.used == [(1, 0), (2, 0)]
    ref_all = reference_coadd([f1, f2, g1, g2], SKYMAP)[(c, "r")]
    assert not ref_all.fallback and ref_all.used == [(3, 0), (4, 0)]

    # only fallback inputs: the cell holds all of them
    st = new_state(tmp_path, "only_fallback")
    ingest(st, f1, f2)
    with streamcoadd.open_state(st) as s:
        core = s.cell(c, "r")
        compare_cell(core, ref_f)
        assert core.group == "fallback"
    # fallback first, then good (separate runs): the good inputs reset the cell
    ingest(st, g1)
    ingest(st, g2)
    with streamcoadd.open_state(st) as s:
        compare_cell(s.cell(c, "r"), ref_all)
    # good first, then fallback, one run: same result, bit for bit on the inputs used
    st2 = new_state(tmp_path, "good_first")
    ingest(st2, g2, f2, g1, f1)
    with streamcoadd.open_state(st2) as s:
        compare_cell(s.cell(c, "r"), ref_all)
        assert s.cell(c, "r").group == "good"


def test_psf_grids_nearest_stamp(tmp_path):
    """Stamps that differ strongly across the warp: each cell gets the stamp nearest its
    centre (21 px stamps zero-padded, 41x45 stamps cropped, to 35)."""
    region = Box(-40, -40, 260, 240)
    paths = []
    for k, (shape, grid) in enumerate([((21, 21), (3, 3)), ((41, 45), (2, 4)),
                                       ((35, 35), (1, 1)), ((25, 31), (4, 2))]):
        g = generate(TRACT, xy0=(region.x0 + 3 * k, region.y0 - 2 * k),
                     shape=(region.height, region.width), seed=30 + k, psf="grid",
                     psf_grid=grid, psf_shape=shape, defects=k % 2 == 0)
        # make neighbouring stamps very different: sizes from 1.2 to 3.5 px
        nst = len(g.psf)
        for j in range(nst):
            g.psf[j] = gaussian_stamp(shape, 1.2 + 2.3 * j / max(1, nst - 1),
                                      1.0 + 0.2 * j, 0.3 * j)
        paths.append(write_gen(tmp_path / f"w/psf{k}.fits", TRACT, g, visit=10 + k, detector=0))
    st = new_state(tmp_path)
    ingest(st, tmp_path / "w")
    ref = reference_coadd(paths, SKYMAP)
    psfs = [rc.psf for rc in ref.values()]
    assert len(psfs) >= 9
    assert max(np.abs(p - psfs[0]).max() for p in psfs) > 1e-3, "PSF grid had no effect"
    compare_all(st, ref)
    with streamcoadd.open_state(st) as s:
        for (cid, band), rc in ref.items():
            c = s.cell(cid, band)
            assert c.psf.shape == (35, 35)
            assert abs(c.psf.sum() - 1) < 0.01


def test_two_bands_are_independent(tmp_path):
    xy0, shape = (10, 20), (160, 170)
    a = make_warp(tmp_path / "w/r.fits", TRACT, visit=7, detector=1, band="r", xy0=xy0,
                  shape=shape, seed=1)
    # a visit has one band: the i-band warp is another visit of the same field
    b = make_warp(tmp_path / "w/i.fits", TRACT, visit=8, detector=1, band="i", xy0=xy0,
                  shape=shape, seed=2)
    st = new_state(tmp_path)
    ingest(st, a)
    only_r = snapshot(st)
    ingest(st, b)
    ref = reference_coadd([a, b], SKYMAP)
    compare_all(st, ref)
    with streamcoadd.open_state(st) as s:
        assert s.bands() == ["i", "r"]
        assert s.populated_cells("r") == s.populated_cells("i")
    # adding the i-band warp did not touch the r-band cells
    after = {k: v for k, v in snapshot(st).items() if k[1] == "r"}
    assert_same_snapshot(only_r, after)


def test_duplicate_warp_is_a_no_op(tmp_path):
    region = Box(50, 50, 200, 210)
    ws = stack_warp_set(tmp_path / "w", TRACT, 3, seed=5, region=region)
    st = new_state(tmp_path)
    ingest(st, *ws)
    before = snapshot(st)
    copy = tmp_path / "copy_of_first.fits"
    shutil.copyfile(ws[0], copy)
    out = ingest(st, ws[0], copy, ws[1])
    assert "3 already present" in out.stdout, out.stdout
    assert_same_snapshot(before, snapshot(st))
    # within one run, the same content twice is folded once
    st2 = new_state(tmp_path, "st2")
    out = ingest(st2, ws[0], copy, ws[1], ws[2])
    assert "3 folded" in out.stdout and "1 already present" in out.stdout, out.stdout
    assert_same_snapshot(before, snapshot(st2))
    compare_all(st2, reference_coadd(ws, SKYMAP))


def test_same_visit_detector_different_content_refused(tmp_path):
    region = Box(50, 50, 200, 210)
    a = make_warp(tmp_path / "a.fits", TRACT, visit=9, detector=4, xy0=(50, 50),
                  shape=(160, 150), seed=1)
    a2 = make_warp(tmp_path / "a2.fits", TRACT, visit=9, detector=4, xy0=(50, 50),
                   shape=(160, 150), seed=2)
    st = new_state(tmp_path)
    ingest(st, a)
    before = snapshot(st)
    out = ingest(st, a2, check=1)
    assert "a2.fits" in out.stdout and re.search("different content", out.stdout), out.stdout
    assert_same_snapshot(before, snapshot(st))
    # in the same run: the second is refused, the first folded
    st2 = new_state(tmp_path, "st2")
    out = ingest(st2, a, a2, check=1)
    assert "1 folded" in out.stdout and "1 rejected" in out.stdout, out.stdout
    assert_same_snapshot(before, snapshot(st2))
    compare_all(st2, reference_coadd([a], SKYMAP))
    del region


def test_rejections_change_nothing(tmp_path):
    good = make_warp(tmp_path / "in/good.fits", TRACT, visit=1, detector=1, xy0=(0, 0),
                     shape=(150, 160))
    cases = sorted(BROKEN_CASES)
    for case in cases:
        write_broken(tmp_path / "in", TRACT, case)
    st = new_state(tmp_path)
    out = run_cli("ingest", st, "--quiet", tmp_path / "in", check=1)
    text = out.stdout + out.stderr
    assert "Traceback" not in text
    assert f"{len(cases)} rejected" in out.stdout, out.stdout
    for case in cases:
        line = [ln for ln in out.stdout.splitlines() if f"broken_{case}.fits" in ln]
        assert line and re.search(BROKEN_CASES[case], line[0], re.I), (case, line)
    compare_all(st, reference_coadd([good], SKYMAP))


def test_header_weight_overrides(tmp_path):
    a = make_warp(tmp_path / "w/a.fits", TRACT, visit=1, detector=1, xy0=(0, 0),
                  shape=(110, 110), weight=0.25)
    b = make_warp(tmp_path / "w/b.fits", TRACT, visit=2, detector=1, xy0=(0, 0),
                  shape=(110, 110))
    st = new_state(tmp_path)
    ingest(st, tmp_path / "w")
    ref = reference_coadd([a, b], SKYMAP)
    compare_all(st, ref)
    with streamcoadd.open_state(st) as s:
        t = s.cell(cell(2, 2), "r").contributors
        assert float(t["weight"][t["visit"] == 1][0]) == 0.25


def test_finalize_outputs_match_reference(tmp_path):
    region = Box(-20, 130, 250, 400)
    ws = stack_warp_set(tmp_path / "w", TRACT, 5, seed=8, region=region)
    st = new_state(tmp_path)
    ingest(st, tmp_path / "w")
    ref = reference_coadd(ws, SKYMAP)
    out = tmp_path / "out"
    run_cli("finalize", st, "--out", out)
    patches = sorted({c.patch for (c, _) in ref})
    for patch in patches:
        f = out / f"coadd_t{patch.tract}_p{patch.x}-{patch.y}_r_cells.fits"
        assert f.exists() and (out / f.name.replace("_cells", "_stitched")).exists()
        with fits.open(f) as h:
            rows = h[1].data
            assert len(rows) == sum(1 for (c, _) in ref if c.patch == patch)
            for row in rows:
                cid = CellId(patch, int(row["cell_id"][0]), int(row["cell_id"][1]))
                rc = ref[(cid, "r")]
                clean = (rc.sum_w > 0) & ~rc.interpolated
                img = np.asarray(row["image"], np.float64)
                assert img.shape == rc.image.shape
                np.testing.assert_allclose(img[clean], rc.image[clean], rtol=1e-6,
                                           atol=1e-6 * np.abs(rc.image[clean]).max())
                var = np.asarray(row["variance"], np.float64)
                np.testing.assert_allclose(var[clean], rc.variance[clean], rtol=1e-6)
                np.testing.assert_allclose(row["psf"], rc.psf, rtol=1e-6, atol=1e-12)
    # one cell only
    some = next(iter(ref))[0]
    out1 = tmp_path / "one"
    run_cli("finalize", st, "--out", out1, "--patch", f"{some.patch.x},{some.patch.y}",
            "--cell", f"{some.x},{some.y}")
    with fits.open(out1 / f"coadd_t0_p{some.patch.x}-{some.patch.y}_r_cells.fits") as h:
        assert len(h[1].data) == 1
        assert tuple(h[1].data["cell_id"][0]) == (some.x, some.y)


def test_finalize_nothing_populated_fails(tmp_path):
    st = new_state(tmp_path)
    p = run_cli("finalize", st, "--out", tmp_path / "out", check=None)
    assert p.returncode != 0
    assert "Traceback" not in p.stderr and p.stderr.strip()


def test_bad_pixel_values_never_leak(tmp_path):
    """Whatever the interpolation method, a constant image stays constant: garbage (NaN,
    huge values) under bad planes must not reach the coadd, and every input keeps its full
    weight at every pixel (sum_w constant over the covered area)."""
    paths = []
    for k in range(2):
        g = generate(TRACT, xy0=(-60 + 7 * k, -60 + 3 * k), shape=(200, 190), seed=50 + k,
                     defects=True, nan_in_bad=True, coverage="full")
        badmask = (g.mask & (BIT["BAD"] | BIT["SAT"] | BIT["CR"] | BIT["SUSPECT"])) != 0
        assert badmask.sum() > 20
        g.image[:] = 5.0
        g.image[badmask] = np.where(np.arange(badmask.sum()) % 2, np.nan, 1e6)
        g.variance[:] = 2.0
        g.variance[badmask] = 1e9
        paths.append(write_gen(tmp_path / "w" / f"c{k}.fits", TRACT, g, visit=60 + k,
                               detector=0))
    st = new_state(tmp_path)
    ingest(st, tmp_path / "w")
    ref = reference_coadd(paths, SKYMAP)
    assert any(rc.interpolated.any() for rc in ref.values())
    with streamcoadd.open_state(st) as s:
        for (cid, band), rc in ref.items():
            c = s.cell(cid, band)
            has = rc.sum_w > 0
            np.testing.assert_allclose(c.image[has], 5.0, rtol=1e-6)
            # var = 2 * sum(w^2) / sum(w)^2 over the inputs with data at the pixel, the bad
            # ones included (they count at full weight after interpolation)
            w2 = np.zeros(rc.outer_box.shape)
            for inp in rc.inputs:
                rw = next(w for w in ref.warps if (w.visit, w.detector) == (inp.visit, inp.detector))
                valid = _cut(rw, (rw.mask & BIT["NO_DATA"]) == 0, rc.outer_box, False)
                w2 += inp.weight ** 2 * valid
            np.testing.assert_allclose(c.variance[has], 2.0 * w2[has] / rc.sum_w[has] ** 2,
                                       rtol=1e-6)
            compare_cell(c, rc)


def test_warp_without_good_pixels_rejected(tmp_path):
    """No WEIGHT keyword and no good pixel to compute one from: rejected with a reason."""
    g = generate(TRACT, xy0=(0, 0), shape=(120, 120), seed=3, defects=False)
    g.mask[g.valid()] |= BIT["BAD"]
    p = write_gen(tmp_path / "allbad.fits", TRACT, g, visit=1, detector=1)
    st = new_state(tmp_path)
    out = ingest(st, p, check=1)
    assert "allbad.fits" in out.stdout and re.search("weight", out.stdout, re.I), out.stdout
    with streamcoadd.open_state(st) as s:
        assert s.bands() == []


def test_lsst_sized_skymap(tmp_path):
    """The LSST geometry (150 px cells, 50 px border, patch border 200 px): two 520 px warps
    around the tract origin, in patch 0's border cells (negative tract pixels)."""
    sm_file = ROOT / "config" / "skymap-lsst.toml"
    sm = load_skymap(sm_file)
    tract = next(iter(sm.tracts.values()))
    paths = [make_warp(tmp_path / "w" / f"l{k}.fits", tract, visit=70 + k, detector=k,
                       xy0=(-200 + 11 * k, -190 + 5 * k), shape=(520, 530),
                       coverage=("full", "rotated")[k], psf="grid", psf_grid=(2, 2),
                       psf_shape=(41, 41))
             for k in range(2)]
    st = tmp_path / "lsst-state"
    run_cli("init", st, "--skymap", sm_file)
    ingest(st, tmp_path / "w")
    ref = reference_coadd(paths, sm)
    assert (CellId(PatchId(tract.id, 0, 0), 0, 0), "r") in ref
    with streamcoadd.open_state(st) as s:
        assert sorted(s.populated_cells("r")) == sorted(c for (c, _) in ref)
        for (cid, band), rc in ref.items():
            c = s.cell(cid, band)
            assert c.image.shape == (250, 250)
            compare_cell(c, rc)
