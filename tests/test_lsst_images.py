"""``streamcoadd finalize --format lsst-images --butler``: Rubin ``CellCoadd`` files read back
with lsst-images' own reader (and through the butler the product created) equal the
independent float64 reference of ``tests/reference.py``.

Warps: several patches, partial coverage, fallback cells, a noise realization, on a
bordered skymap (the demo one: a CellCoadd holds the inner boxes) and a borderless one
(lsst_cells_v2-like, scaled down). Checked per populated cell: image, variance, noise and
the interpolated fraction within 1e-6 relative (interpolated pixels excluded), the PSF,
NO_DATA exactly where the reference has no data, the contributors exactly the reference's
with weights within 2 %, every contributor's polygon containing the cell centre, sky
coordinates at cell centres within 1 mas of astropy on the tract WCS, a sub-region read.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from pathlib import Path

import numpy as np
import pytest
from common import SKYMAP_FILE, skip_module_without_rubin

skip_module_without_rubin()

import astropy.units as u  # noqa: E402
from lsst.images import Box as LsstBox
from lsst.images.cells import CellCoadd, CellIJ
from matplotlib.path import Path as MplPath
from reference import close_rel, reference_coadd, run_cli
from warpgen import make_warp, stack_warp_set

from streamcoadd.core.config import FoldConfig
from streamcoadd.core.skymap import Box, PatchId, load_skymap, skymap_from_dict

DEMO = SKYMAP_FILE
FOLD = FoldConfig(noise_realizations=1)


def _borderless(tmp: Path) -> Path:
    """The demo skymap without cell borders (lsst_cells_v2's geometry, scaled down)."""
    d = load_skymap(DEMO).to_dict()
    d["skymap"]["name"] = "demo_v2"
    d["cells"]["border"] = 0
    path = tmp / "skymap-v2.toml"
    path.write_text(skymap_from_dict(d).to_toml())
    return path


@pytest.fixture(scope="module", params=["bordered", "borderless"])
def exported(request, tmp_path_factory):
    tmp = tmp_path_factory.mktemp(f"lsst_{request.param}")
    skymap_file = DEMO if request.param == "bordered" else _borderless(tmp)
    skymap = load_skymap(skymap_file)
    tract = skymap.tract(0)
    cfg = tmp / "fold.toml"
    cfg.write_text("[fold]\nnoise_realizations = 1\n")
    st = tmp / "state"
    run_cli("init", st, "--skymap", skymap_file, "--config", cfg)
    w = tmp / "w"
    paths = stack_warp_set(w, tract, 4, seed=8, region=Box(-20, 130, 250, 400),
                           noise_realizations=1)
    for i, xy0 in enumerate([(-60, -60), (200, -60)]):  # fallback cells
        paths.append(make_warp(w / f"heavy{i}.fits", tract, visit=50 + i, detector=0,
                               xy0=xy0, shape=(130, 130), noise_realizations=1,
                               heavy_mask=Box(xy0[0], xy0[1], xy0[0] + 130, xy0[1] + 130)))
    run_cli("ingest", st, "--quiet", w)
    out, repo = tmp / "out", tmp / "repo"
    run_cli("finalize", st, "--out", out, "--format", "lsst-images", "--butler", repo,
            "--band", "r", timeout=300)
    ref = reference_coadd(paths, skymap, FOLD)
    return {"skymap": skymap, "tract": tract, "out": out, "repo": repo, "ref": ref,
            "paths": paths}


def _file(ex, patch: PatchId) -> Path:
    return ex["out"] / f"coadd_t{patch.tract}_p{patch.x}-{patch.y}_r_cellcoadd.fits"


def _by_patch(ex) -> dict:
    out: dict = {}
    for (cell, band), rc in ex["ref"].items():
        if band == "r" and rc.inputs:
            out.setdefault(cell.patch, []).append(rc)
    return out


def test_cells_equal_the_reference(exported):
    ex = exported
    tract = ex["tract"]
    by_patch = _by_patch(ex)
    assert len(by_patch) >= 3 and sorted(p.name for p in ex["out"].iterdir()) == sorted(
        _file(ex, p).name for p in by_patch)
    n_fallback = 0
    for patch, cells in by_patch.items():
        cc = CellCoadd.read(str(_file(ex, patch)))
        assert cc.band == "r" and cc.skymap == ex["skymap"].name and cc.tract == 0
        assert cc.image.unit == u.nJy and cc.variance.unit == u.nJy**2
        ox, oy = tract.cell_grid_origin(patch)
        n = tract.cells.cells_per_patch
        assert cc.image.bbox.x.start == ox and cc.image.bbox.y.start == oy
        nodata = cc.mask.get("NO_DATA")
        populated = set()
        for rc in cells:
            cell = rc.cell
            populated.add((cell.y, cell.x))
            n_fallback += rc.fallback
            name = f"{cell} ({len(rc.inputs)} inputs)"
            inner = rc.inner_box
            dst = inner.slices((ox, oy))
            src = inner.slices((rc.outer_box.x0, rc.outer_box.y0))
            has = rc.sum_w[src] > 0
            clean = has & ~rc.interpolated[src]
            close_rel(cc.image.array[dst][clean], rc.image[src][clean], 1e-6, f"{name} image")
            close_rel(cc.variance.array[dst][clean], rc.variance[src][clean], 1e-6,
                      f"{name} variance")
            close_rel(cc.noise_realizations[0].array[dst][clean],
                      rc.noise_image(0)[src][clean], 1e-6, f"{name} noise")
            with np.errstate(invalid="ignore", divide="ignore"):
                frac = np.where(has, rc.sum_w_interp[src] / rc.sum_w[src], 0.0)
            close_rel(cc.mask_fractions["interpolated"].array[dst][has], frac[has], 1e-6,
                      f"{name} interpolated fraction")
            assert np.array_equal(nodata[dst], ~has), f"{name}: NO_DATA"
            close_rel(cc.psf[CellIJ(i=cell.y, j=cell.x)].array, rc.psf, 1e-6, f"{name} psf")
        # cells without data: NO_DATA everywhere, no PSF
        missing = {(c.i, c.j) for c in cc.psf.bounds.missing}
        assert missing == {(i, j) for i in range(n) for j in range(n)} - populated
        for i, j in missing:
            box = tract.cell_inner_box(next(c for c in tract.cells_of(patch)
                                            if (c.y, c.x) == (i, j)))
            assert nodata[box.slices((ox, oy))].all()
            assert np.isnan(cc.image.array[box.slices((ox, oy))]).all()
    assert n_fallback > 0  # the heavy warps made fallback cells


def test_provenance_equals_the_reference(exported):
    ex = exported
    tract = ex["tract"]
    mjd_day = (datetime(1858, 11, 17) + timedelta(days=60000.0 - 0.5)).strftime("%Y%m%d")
    for patch, cells in _by_patch(ex).items():
        cc = CellCoadd.read(str(_file(ex, patch)))
        prov = cc.provenance
        inputs = {(str(r["instrument"]), int(r["visit"]), int(r["detector"])): r
                  for r in prov.inputs}
        assert len(inputs) == len(prov.inputs)
        contrib = prov.contributions
        for rc in cells:
            cell = rc.cell
            rows = contrib[(contrib["cell_i"] == cell.y) & (contrib["cell_j"] == cell.x)]
            got = sorted((int(r["visit"]), int(r["detector"])) for r in rows)
            assert got == rc.used, f"{cell}: contributors {got} != reference {rc.used}"
            weights = {(i.visit, i.detector): i for i in rc.inputs}
            cx, cy = tract.cell_centre(cell)
            for r in rows:
                want = weights[(int(r["visit"]), int(r["detector"]))]
                assert abs(r["weight"] - want.weight) <= 0.02 * want.weight
                assert abs(r["unmasked_fraction"] - want.good_fraction) < 1e-9
                assert bool(r["overlaps_center"])
                poly = inputs[(str(r["instrument"]), int(r["visit"]), int(r["detector"]))]
                poly = poly["polygon"]
                vertices = np.column_stack([poly.x_vertices, poly.y_vertices])
                assert MplPath(vertices).contains_point((cx, cy)), \
                    f"{cell}: input {r['visit']}/{r['detector']} polygon misses the centre"
        for r in prov.inputs:
            assert str(r["day_obs"]) == mjd_day and r["physical_filter"]
        assert cc.metadata["STREAMCOADD_POLYGONS"] == "footprint"
        assert "STREAMCOADD_INPUTS" in cc.metadata


def test_sky_coordinates_at_cell_centres(exported):
    ex = exported
    tract = ex["tract"]
    wcs = tract.wcs()
    for patch in _by_patch(ex):
        cc = CellCoadd.read(str(_file(ex, patch)))
        cells = list(tract.cells_of(patch))
        xy = np.array([tract.cell_centre(c) for c in cells], float)
        got = cc.sky_projection.pixel_to_sky(x=xy[:, 0], y=xy[:, 1])
        want = wcs.pixel_to_world(xy[:, 0], xy[:, 1])
        assert got.separation(want).to(u.mas).max() < 1 * u.mas


def test_subregion_read_and_butler_get(exported):
    from lsst.daf.butler import Butler

    ex = exported
    patch = min(_by_patch(ex))
    path = _file(ex, patch)
    full = CellCoadd.read(str(path))
    b = full.image.bbox
    y0, x0 = b.y.start + 37, b.x.start + 61  # not cell-aligned
    sub = CellCoadd.read(str(path), bbox=LsstBox.factory[y0:y0 + 90, x0:x0 + 75])
    assert sub.image.array.shape == (90, 75)
    sl = (slice(37, 127), slice(61, 136))
    np.testing.assert_array_equal(sub.image.array, full.image.array[sl])
    np.testing.assert_array_equal(sub.variance.array, full.variance.array[sl])
    assert set(sub.provenance.contributions["visit"]) <= set(full.provenance.inputs["visit"])
    butler = Butler(str(ex["repo"]))
    got = butler.get("deep_coadd", skymap=ex["skymap"].name, tract=0,
                     patch=ex["tract"].num_patches[0] * patch.y + patch.x, band="r",
                     collections="streamcoadd/deep_coadd")
    np.testing.assert_array_equal(got.image.array, full.image.array)
    assert len(got.provenance.contributions) == len(full.provenance.contributions)
