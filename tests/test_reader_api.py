"""The analysis reader API (streamcoadd.open_state and its tract/patch/cell views), on a real
state made by the real CLI from warp files written with ``write_warp``.

``build_state`` is shared with test_plot.py and test_analysis_docs.py.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
from astropy.io import fits
from astropy.nddata import CCDData
from astropy.table import Table

import streamcoadd
from streamcoadd.core.masks import CANONICAL_PLANES
from streamcoadd.core.skymap import CellId, PatchId, load_skymap
from streamcoadd.io.warp_writer import write_warp

ROOT = Path(__file__).resolve().parent.parent
SKYMAP = ROOT / "config" / "skymap-demo.toml"
NO_DATA = 1 << CANONICAL_PLANES["NO_DATA"]

# Demo skymap: 50 px cells, 10 px border, 8x8 cells per patch; patch (0,0) cell (cx, cy)
# has inner box x in [-50 + 50 cx, 50 cx), same in y.
#   visit: (xy0, (w, h), level nJy, variance nJy^2, PSF (sigma_x, sigma_y) px)
WARPS = {
    1: ((-60, -60), (420, 420), 10.0, 4.0, (1.5, 1.5)),   # all of patch 0,0 (but cell 7,7)
    2: ((90, 90), (170, 170), 20.0, 1.0, (2.0, 2.0)),      # cells 3..5 x 3..5
    3: ((-60, 140), (220, 120), 30.0, 2.0, (2.2, 1.6)),    # cells 0..3 x 4..5, elliptical PSF
}
STAR = (125.0, 125.0, 2.0e5)  # tract px x, y and flux (nJy)


def expected_inputs(cx: int, cy: int) -> list[int]:
    """Visits that fully cover the inner box of patch (0,0) cell (cx, cy), by geometry."""
    x0, y0 = -50 + 50 * cx, -50 + 50 * cy
    out = []
    for v, ((wx, wy), (w, h), *_ ) in WARPS.items():
        if wx <= x0 and wy <= y0 and x0 + 50 <= wx + w and y0 + 50 <= wy + h:
            if v == 1 and (cx, cy) == (7, 7):
                continue  # NO_DATA corner of visit 1
            out.append(v)
    return out


def gaussian(sx: float, sy: float, size: int = 25) -> np.ndarray:
    yy, xx = np.mgrid[: size, : size] - size // 2
    p = np.exp(-0.5 * ((xx / sx) ** 2 + (yy / sy) ** 2))
    return p / p.sum()


def warp_arrays(visit: int):
    (x0, y0), (w, h), level, var, (sx, sy) = WARPS[visit]
    rng = np.random.default_rng(visit)
    yy, xx = np.mgrid[y0:y0 + h, x0:x0 + w]
    sx_, sy_, flux = STAR
    s = 1.8
    image = level + rng.normal(0, np.sqrt(var), (h, w)) \
        + flux * np.exp(-0.5 * ((xx - sx_) ** 2 + (yy - sy_) ** 2) / s**2) / (2 * np.pi * s**2)
    mask = np.zeros((h, w), np.int32)
    variance = np.full((h, w), var)
    if visit == 1:  # no data over cell (7,7) of patch 0,0 (tract px 300..360)
        sel = (xx >= 300) & (yy >= 300)
        mask[sel] = NO_DATA
        image[sel] = np.nan
        variance[sel] = np.inf
    return image.astype(np.float32), mask, variance.astype(np.float32), gaussian(sx, sy)


def cli(*args, ok=True, env=None):
    r = subprocess.run([sys.executable, "-m", "streamcoadd", *map(str, args)], cwd=ROOT,
                       capture_output=True, text=True, env=env)
    if ok:
        assert r.returncode == 0, r.stdout + r.stderr
    return r


def write_warps(d: Path, visits=None, band="r", visit_offset=0) -> list[Path]:
    """Warps of ``visits`` (keys of WARPS) in ``band``; a visit has one band, so another
    band needs a ``visit_offset`` (its visit ids are ``v + visit_offset``)."""
    tract = load_skymap(SKYMAP).tract(0)
    d.mkdir(parents=True, exist_ok=True)
    paths = []
    for v in visits or WARPS:
        image, mask, variance, psf = warp_arrays(v)
        paths.append(write_warp(d / f"{band}_v{v}.fits", tract=tract, xy0=WARPS[v][0],
                                image=image, mask=mask, variance=variance, psf=psf,
                                visit=v + visit_offset,
                                detector=0, band=band, mjd=60000.0 + v))
    return paths


def build_state(tmp: Path, bands=("r",)) -> Path:
    """A state with visits 1-3 (band r; other bands get the same warps) via the CLI."""
    state = tmp / "state"
    cli("init", state, "--skymap", SKYMAP)
    for i, b in enumerate(bands):
        cli("ingest", state, *write_warps(tmp / f"warps_{b}", band=b, visit_offset=100 * i),
            "--quiet")
    return state


@pytest.fixture(scope="module")
def state(tmp_path_factory) -> Path:
    return build_state(tmp_path_factory.mktemp("reader"))


P00 = PatchId(0, 0, 0)


def test_state_listing(state):
    with streamcoadd.open_state(state) as st:
        assert st.bands() == ["r"]
        assert st.patches("r") == [PatchId(0, x, y) for x in (0, 1) for y in (0, 1)]
        assert [t.id for t in st.tracts()] == [0]
        tr = st.tract(0)
        assert tr.bands() == ["r"]
        assert [p.id for p in tr.patches("r")] == st.patches("r")
        w = st.warps()
        assert isinstance(w, Table) and sorted(w["visit"]) == [1, 2, 3]
        assert set(w["status"]) == {"folded"}
        assert len(st.rejections()) == 0 and len(st.events()) == 0


def test_depth_map_matches_geometry(state):
    with streamcoadd.open_state(state) as st:
        p = st.patch(P00, "r")
        depth = p.depth_map()
        assert depth.shape == (8, 8)
        want = np.array([[len(expected_inputs(cx, cy)) for cx in range(8)] for cy in range(8)])
        np.testing.assert_array_equal(depth, want)
        assert depth[7, 7] == 0 and p.cell(7, 7) is None
        # old API unchanged
        np.testing.assert_array_equal(st.depth_map(P00, "r"), want)
        assert len(st.populated_cells("r", P00)) == int((want > 0).sum())
        # the tuple form and the PatchId form are the same patch
        np.testing.assert_array_equal(st.patch((0, 0, 0), "r").depth_map(), want)


def test_weight_map_and_summary(state):
    with streamcoadd.open_state(state) as st:
        p = st.patch(P00, "r")
        wmap = p.weight_map()
        t = p.summary()
        assert len(t) == 63 and t["weight"].unit == "1/nJy2"
        for r in t:
            vis = expected_inputs(r["cell_x"], r["cell_y"])
            w = sum(1 / WARPS[v][3] for v in vis)
            assert r["n_inputs"] == len(vis)
            assert wmap[r["cell_y"], r["cell_x"]] == pytest.approx(w, rel=1e-12)
            assert r["group"] == "good"
            # coadd variance of a plain weighted mean with w = 1/var: 1 / sum w
            assert r["variance"] == pytest.approx(1 / w, rel=1e-6)
        assert np.isnan(wmap[7, 7])
        assert np.all(np.isfinite(t["ra"])) and np.all(np.isfinite(t["limiting_mag"]))


def test_psf_maps(state):
    with streamcoadd.open_state(state) as st:
        p = st.patch(P00, "r")
        fwhm = p.fwhm_map()
        e1, e2 = p.ellipticity_map()
        # cell (0,0): visit 1 only, round Gaussian sigma 1.5 px at 0.2"/px
        assert fwhm[0, 0] == pytest.approx(2.3548 * 1.5 * 0.2, rel=0.01)
        assert abs(e1[0, 0]) < 1e-3 and abs(e2[0, 0]) < 1e-3
        # cell (0,4): visits 1 (round) and 3 (sigma_x > sigma_y): elongated along x
        assert e1[4, 0] > 0.02 and abs(e2[4, 0]) < 1e-3
        # CellView.psf_shape agrees with the map
        c = p.cell(0, 4)
        assert c.psf_shape()["fwhm"] == pytest.approx(fwhm[4, 0], rel=1e-9)
        assert np.isnan(fwhm[7, 7])


def test_cell_view_coadd_equals_weighted_mean(state):
    with streamcoadd.open_state(state) as st:
        c = st.patch(P00, "r").cell(3, 4)  # visits 1, 2, 3
        assert sorted(c.contributors["visit"]) == [1, 2, 3]
        ib = c.inner_box
        num = np.zeros(ib.shape)
        den = 0.0
        for v in (1, 2, 3):
            image, *_ = warp_arrays(v)
            (x0, y0), *_ = WARPS[v]
            w = 1 / WARPS[v][3]
            num += w * image[ib.slices((x0, y0))].astype(np.float64)
            den += w
        np.testing.assert_allclose(c.inner(c.image), num / den, rtol=1e-10)
        assert c.image.shape == (70, 70) and c.psf.shape == (35, 35)
        assert c.psf.sum() == pytest.approx(1.0, abs=1e-6)
        # the WCS maps the array's pixel (0,0) to tract pixel (outer.x0, outer.y0)
        tract_wcs = st.skymap.tract(0).wcs()
        ob = c.outer_box
        np.testing.assert_allclose(c.wcs.pixel_to_world_values(3, 5),
                                   tract_wcs.pixel_to_world_values(ob.x0 + 3, ob.y0 + 5))
        assert c.center.separation(c.wcs.pixel_to_world(35, 35)).arcsec < 0.2


def test_cell_view_accumulators_and_ccddata(state, tmp_path):
    with streamcoadd.open_state(state) as st:
        c = st.patch(P00, "r").cell(3, 4)  # visits 1, 2, 3
        acc = c.accumulators()
        assert set(acc) >= {"sum_w", "sum_wI", "sum_w2var", "sum_w_interp", "mask_or",
                            "noise", "psf_sum", "psf_w", "planes", "bit_counts",
                            "contributors"}
        with np.errstate(invalid="ignore", divide="ignore"):
            np.testing.assert_allclose(acc["sum_wI"] / acc["sum_w"], c.image, rtol=1e-12)
        assert acc["psf_w"] == pytest.approx(acc["contributors"]["weight"].sum())
        assert c.groups == ["good"]
        with pytest.raises(KeyError):
            c.accumulators("fallback")
        ccd = c.to_ccddata()
        assert isinstance(ccd, CCDData) and ccd.unit == "nJy"
        np.testing.assert_array_equal(ccd.data, c.image)
        np.testing.assert_array_equal(ccd.flags, c.mask)
        np.testing.assert_allclose(ccd.uncertainty.array, c.variance)
        assert ccd.meta["NINPUTS"] == c.n_inputs == 3
        out = tmp_path / "cell.fits"
        ccd.write(out)
        back = CCDData.read(out)
        np.testing.assert_allclose(back.data, c.image)
        assert back.wcs.wcs.crpix[0] == pytest.approx(c.wcs.wcs.crpix[0])
        # same numbers as the original State.cell API
        old = st.cell(CellId(P00, 3, 4), "r")
        np.testing.assert_array_equal(old.image, c.image)


def test_contributors_tables(state):
    with streamcoadd.open_state(state) as st:
        p = st.patch(P00, "r")
        t = p.contributors()
        assert {"cell_x", "cell_y", "visit", "detector", "weight", "psf_ixx",
                "content_hash", "mjd"} <= set(t.colnames)
        assert len(t) == int(p.depth_map().sum())
        sel = (t["cell_x"] == 3) & (t["cell_y"] == 4)
        assert sorted(t["visit"][sel]) == [1, 2, 3]
        assert all(len(h) == 64 for h in t["content_hash"])
        cc = p.cell(4, 4).contributors
        assert sorted(cc["visit"]) == expected_inputs(4, 4) == [1, 2]
        assert cc["weight"].unit == "1/nJy2"


def test_stitched_matches_finalize_cli(state, tmp_path):
    out = tmp_path / "fin"
    cli("finalize", state, "--out", out, "--patch", "0,0", "--band", "r")
    with fits.open(out / "coadd_t0_p0-0_r_stitched.fits") as hdul:
        img, msk, hdr = hdul["IMAGE"].data, hdul["MASK"].data, hdul["IMAGE"].header
    with streamcoadd.open_state(state) as st:
        p = st.patch(P00, "r")
        ccd = p.stitched()
        assert isinstance(ccd, CCDData) and ccd.unit == "nJy"
        assert ccd.shape == p.outer_box.shape == img.shape
        np.testing.assert_array_equal(ccd.data, img)
        np.testing.assert_array_equal(ccd.flags, msk)
        # mask: NO_DATA by default; the empty cell (7,7) is masked, its image NaN
        ib = st.skymap.tract(0).cell_inner_box(CellId(P00, 7, 7))
        sl = ib.slices((p.outer_box.x0, p.outer_box.y0))
        assert ccd.mask[sl].all() and np.isnan(ccd.data[sl]).all()
        assert not ccd.mask[100:200, 100:200].any()
        # WCS: same sky position as the FITS header's
        from astropy.wcs import WCS

        np.testing.assert_allclose(ccd.wcs.pixel_to_world_values(10, 20),
                                   WCS(hdr).pixel_to_world_values(10, 20))
        # the star is where it was put
        x, y, _ = STAR
        sky = st.skymap.tract(0).wcs().pixel_to_world(x, y)
        px, py = ccd.wcs.world_to_pixel(sky)
        yy, xx = np.unravel_index(np.nanargmax(ccd.data), ccd.shape)
        assert abs(xx - px) <= 1 and abs(yy - py) <= 1


def test_tract_maps(state):
    with streamcoadd.open_state(state) as st:
        tr = st.tract(0)
        assert tr.cell_grid() == (12, 12)
        d = tr.depth_map("r")
        # tract inner cell (i, j) of patch 0,0 is patch cell (i+1, j+1)
        p = st.patch(P00, "r").depth_map()
        np.testing.assert_array_equal(d[:6, :6], p[1:7, 1:7])
        t = tr.summary("r")
        assert set(zip(t["patch_x"], t["patch_y"])) == {(0, 0), (0, 1), (1, 0), (1, 1)}
        assert t["inner"].sum() == int((d > 0).sum())
        assert np.isfinite(tr.fwhm_map("r")[0, 0])


def set_cell_version(path, version: int) -> None:
    """Rewrite the version of a version-3 cell file's header (and its checksum)."""
    import zlib

    with h5py.File(path, "r+") as f:
        blob = f["header"][()].tobytes().rpartition(b"\n")[0]
        header = json.loads(blob)
        header["version"] = version
        blob = json.dumps(header).encode()
        blob += b"\n%08x" % zlib.crc32(blob)
        del f["header"]
        f["header"] = np.frombuffer(blob, np.uint8)


def test_reader_refuses_unknown_versions(state, tmp_path):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(state, copy)
    shard = copy / "shards" / "t0" / "p0-0" / "r"
    m = json.loads((shard / "manifest.json").read_text())
    gen = m["cells"]["2-2"]
    set_cell_version(shard / f"c2-2.g{gen}.h5", 99)
    with streamcoadd.open_state(copy) as st:
        p = st.patch(P00, "r")
        with pytest.raises(streamcoadd.core.errors.StateError, match="version"):
            p.summary()
        with pytest.raises(Exception, match="version"):
            p.cell(2, 2).image
    m["version"] = 99
    (shard / "manifest.json").write_text(json.dumps(m))
    with streamcoadd.open_state(copy) as st:
        with pytest.raises(streamcoadd.core.errors.StateError, match="version"):
            st.patch(P00, "r")


def test_bad_selection_errors(state):
    with streamcoadd.open_state(state) as st:
        with pytest.raises(streamcoadd.core.errors.UserError, match="outside the tract"):
            st.patch(PatchId(0, 5, 0), "r")
        with pytest.raises(streamcoadd.core.errors.UserError, match="outside the patch"):
            st.patch(P00, "r").cell(9, 0)
        empty = st.patch(P00, "i")  # a band with nothing: an empty patch, not an error
        assert empty.cells() == [] and empty.depth_map().sum() == 0
        assert len(empty.summary()) == 0 and np.isnan(empty.weight_map()).all()


def test_reads_while_ingest_commits(tmp_path):
    """A reader polling the patch while 'ingest' commits after every warp sees every cell
    whole: in each cell read, the sum of weights equals the sum of the listed contributors'
    weights, and the image is sum_wI / sum_w of that same read."""
    state = tmp_path / "state"
    cli("init", state, "--skymap", SKYMAP)
    tract = load_skymap(SKYMAP).tract(0)
    d = tmp_path / "w"
    d.mkdir()
    weights = {}
    for v in range(1, 13):
        image, mask, variance, psf = warp_arrays(1)
        var = float(2 ** (v % 5))  # distinct weights, so a mix-up would show
        weights[v] = 1 / var
        write_warp(d / f"v{v:02d}.fits", tract=tract, xy0=WARPS[1][0], image=image + v,
                   mask=mask, variance=np.full_like(variance, var), psf=psf, visit=v,
                   detector=0, band="r")
    proc = subprocess.Popen([sys.executable, "-m", "streamcoadd", "ingest", str(state), str(d),
                             "--quiet", "--commit-every", "1"], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    reads = 0
    seen_depths = set()
    errors = []
    try:
        with streamcoadd.open_state(state) as st:
            while proc.poll() is None or reads < 5:
                p = st.patch(P00, "r")
                for c in p.cells()[::7]:
                    acc = c.accumulators()
                    w = acc["sum_w"][c.inner_box.slices((c.outer_box.x0, c.outer_box.y0))]
                    visits = list(c.contributors["visit"])
                    want = sum(weights[v] for v in visits)
                    if not np.allclose(w, want, rtol=1e-12):
                        errors.append((c.id, visits, float(w.mean()), want))
                    seen_depths.add(len(visits))
                    reads += 1
                t = p.summary()
                for r in t:
                    if not 1 <= r["n_inputs"] <= 12:
                        errors.append(("summary", r["cell_x"], r["cell_y"], r["n_inputs"]))
                if proc.poll() is not None and reads >= 5:
                    break
    finally:
        out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, out + err
    assert not errors, errors[:5]
    assert len(seen_depths) >= 2, f"reads did not overlap the commits: {seen_depths}"
    with streamcoadd.open_state(state) as st:
        assert st.patch(P00, "r").depth_map()[0, 0] == 12


def test_status_table_and_json(tmp_path):
    """'streamcoadd status': per band and patch, cells populated, median depth, last update;
    --json carries the same numbers; a retraction is listed with its reason."""
    state = build_state(tmp_path)
    with streamcoadd.open_state(state) as st:
        depth = st.patch(P00, "r").depth_map()
    median = float(np.median(depth[depth > 0]))
    r = cli("status", state)
    lines = r.stdout.splitlines()
    header = next(line for line in lines if line.startswith("band"))
    for col in ("tract", "patch", "cells", "median depth", "max depth", "last update"):
        assert col in header
    row = next(line for line in lines if line.split()[:3] == ["r", "0", "0,0"])
    fields = row.split()
    assert fields[3] == f"{int((depth > 0).sum())}/64"
    assert float(fields[4]) == median and int(fields[5]) == depth.max() == 3
    assert "ago)" in row
    rep = json.loads(cli("status", state, "--json").stdout)
    s = next(s for s in rep["shards"] if s["patch"] == [0, 0] and s["band"] == "r")
    assert s["median_depth"] == median and s["cells_populated"] == 63
    assert s["cells_total"] == 64 and s["updated"] > 0
    assert rep["warps"] == {"folded": 3} and rep["retractions"] == []

    cli("retract", state, "--visit", 3, "--reason", "QA: satellite trail")
    r = cli("status", state)
    assert "retract: visit 3 detector 0" in r.stdout and "QA: satellite trail" in r.stdout
    assert "1 retracted" in r.stdout
    row = next(line for line in r.stdout.splitlines() if line.split()[:3] == ["r", "0", "0,0"])
    with streamcoadd.open_state(state) as st:
        depth = st.patch(P00, "r").depth_map()
        assert 3 not in st.patch(P00, "r").contributors()["visit"]
    assert float(row.split()[4]) == float(np.median(depth[depth > 0]))
