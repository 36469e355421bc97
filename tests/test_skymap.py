"""Cell skymap geometry (SPEC §1), checked against brute force and LSST's numbers."""

from __future__ import annotations

import numpy as np
import pytest
from astropy.wcs.utils import proj_plane_pixel_scales
from common import ROOT

from streamcoadd.core.errors import UserError
from streamcoadd.core.skymap import Box, CellId, PatchId, load_skymap, skymap_from_dict

DEMO = ROOT / "config" / "skymap-demo.toml"
LSST = ROOT / "config" / "skymap-lsst.toml"


@pytest.fixture(scope="module")
def lsst():
    return load_skymap(LSST)


@pytest.fixture(scope="module")
def demo():
    return load_skymap(DEMO)


def test_lsst_numbers(lsst):
    g = lsst.cells
    assert (g.inner, g.border, g.cells_per_patch_inner, g.cells_in_patch_border) == (150, 50, 20, 1)
    assert g.patch_inner == 3000 and g.patch_border == 200 and g.outer == 250
    assert g.cells_per_patch == 22
    t = next(iter(lsst.tracts.values()))
    p00 = PatchId(t.id, 0, 0)
    assert t.patch_inner_box(p00) == Box(0, 0, 3000, 3000)
    # patch outer boxes extend past the tract inner area, like LSST (patch 0 starts at -200)
    assert t.patch_outer_box(p00) == Box(-200, -200, 3200, 3200)
    assert t.patch_outer_box(PatchId(t.id, 3, 5)) == Box(8800, 14800, 12200, 18200)
    cells = list(t.cells_of(p00))
    assert len(cells) == 484
    assert t.cell_inner_box(CellId(p00, 0, 0)) == Box(-150, -150, 0, 0)
    assert t.cell_outer_box(CellId(p00, 0, 0)) == Box(-200, -200, 50, 50)
    assert t.cell_inner_box(CellId(p00, 21, 21)) == Box(3000, 3000, 3150, 3150)
    assert t.cell_outer_box(CellId(p00, 21, 21)).shape == (250, 250)
    # LSST centre convention: inner minimum + 75 for 150 px cells
    assert t.cell_centre(CellId(p00, 1, 2)) == (0 + 75, 150 + 75)


@pytest.mark.parametrize("which", ["demo", "lsst"])
def test_cells_tile_patch(which, demo, lsst):
    sm = demo if which == "demo" else lsst
    t = next(iter(sm.tracts.values()))
    g = sm.cells
    for patch in [PatchId(t.id, 0, 0), PatchId(t.id, t.num_patches[0] - 1, 1)]:
        outer = t.patch_outer_box(patch)
        tiled = outer.grown(-g.border)
        cover = np.zeros(tiled.shape, np.int32)
        outers = np.zeros(outer.shape, bool)
        cells = list(t.cells_of(patch))
        assert len(cells) == g.cells_per_patch**2
        assert len(set(cells)) == len(cells)
        for c in cells:
            ib, ob = t.cell_inner_box(c), t.cell_outer_box(c)
            assert ib.shape == (g.inner, g.inner)
            assert ob == ib.grown(g.border) and ob.shape == (g.outer, g.outer)
            assert outer.contains(ob)
            cover[ib.slices((tiled.x0, tiled.y0))] += 1
            outers[ob.slices((outer.x0, outer.y0))] = True
            cx, cy = t.cell_centre(c)
            assert (cx, cy) == (ib.x0 + g.inner // 2, ib.y0 + g.inner // 2)
        # inner boxes tile the patch outer box eroded by the cell border: no gap, no overlap
        assert (cover == 1).all()
        # and the outer boxes reach exactly the patch outer box
        assert outers.all()
        # the inner patch region is covered by the non-border cells
        nb = g.cells_in_patch_border
        inner_cells = [c for c in cells if nb <= c.x < g.cells_per_patch - nb
                       and nb <= c.y < g.cells_per_patch - nb]
        xs = [t.cell_inner_box(c).x0 for c in inner_cells]
        ys = [t.cell_inner_box(c).y0 for c in inner_cells]
        pib = t.patch_inner_box(patch)
        assert min(xs) == pib.x0 and max(xs) + g.inner == pib.x1
        assert min(ys) == pib.y0 and max(ys) + g.inner == pib.y1


def test_demo_numbers(demo):
    g = demo.cells
    t = demo.tract(0)
    assert g.patch_inner == g.inner * g.cells_per_patch_inner
    assert g.patch_border == g.inner * g.cells_in_patch_border + g.border
    assert t.inner_box == Box(0, 0, 2 * g.patch_inner, 2 * g.patch_inner)
    p = PatchId(0, 1, 1)
    assert t.patch_outer_box(p) == t.patch_inner_box(p).grown(g.patch_border)
    # neighbouring patches overlap by two patch borders
    a, b = t.patch_outer_box(PatchId(0, 0, 0)), t.patch_outer_box(PatchId(0, 1, 0))
    assert a.x1 - b.x0 == 2 * g.patch_border


def test_borderless_cells():
    d = {"skymap": {"name": "v2"},
         "cells": {"inner": 150, "border": 0, "cells_per_patch_inner": 20,
                   "cells_in_patch_border": 1},
         "tract": [{"id": 1, "ra": 10.0, "dec": -5.0, "pixel_scale": 0.2, "num_patches": [3, 3]}]}
    sm = skymap_from_dict(d)
    t = sm.tract(1)
    p = PatchId(1, 1, 1)
    assert sm.cells.outer == 150
    assert t.patch_outer_box(p).shape == (3300, 3300)  # lsst_cells_v2: outer 3300
    c = CellId(p, 4, 7)
    assert t.cell_outer_box(c) == t.cell_inner_box(c)


def test_not_cell_based_refused(tmp_path):
    f = tmp_path / "plain.toml"
    f.write_text('[skymap]\nname = "rings"\n\n[[tract]]\nid = 0\nra = 1.0\ndec = 2.0\n'
                 'num_patches = [2, 2]\n')
    with pytest.raises(UserError, match="skymap is not cell-based"):
        load_skymap(f)
    f2 = tmp_path / "partial.toml"
    f2.write_text('[cells]\nborder = 10\n\n[[tract]]\nid = 0\nra = 1.0\ndec = 2.0\n'
                  'num_patches = [2, 2]\n')
    with pytest.raises(UserError, match="not cell-based"):
        load_skymap(f2)


@pytest.mark.parametrize("text,match", [
    ("[cells\n", "TOML"),
    ('[cells]\ninner = 51\ncells_per_patch_inner = 4\n[[tract]]\nid = 0\nra = 1.0\ndec = 0.0\n'
     'num_patches = [1, 1]\n', "even"),
    ('[cells]\ninner = 50\ncells_per_patch_inner = 4\n', "tract"),
    ('[cells]\ninner = 50\ncells_per_patch_inner = 4\n[[tract]]\nid = 0\nra = 1.0\ndec = 0.0\n'
     'num_patches = [1, 1]\n[[tract]]\nid = 0\nra = 1.0\ndec = 0.0\nnum_patches = [1, 1]\n',
     "twice"),
])
def test_bad_skymap_files(tmp_path, text, match):
    f = tmp_path / "s.toml"
    f.write_text(text)
    with pytest.raises(UserError, match=match):
        load_skymap(f)


def test_missing_skymap_file(tmp_path):
    with pytest.raises(UserError, match="not found"):
        load_skymap(tmp_path / "nope.toml")


def test_unknown_tract_named(demo):
    with pytest.raises(UserError, match="tract 77"):
        demo.tract(77)


def test_toml_roundtrip(tmp_path, lsst, demo):
    for sm in (lsst, demo):
        f = tmp_path / f"{sm.name}.toml"
        f.write_text(sm.to_toml())
        again = load_skymap(f)
        assert again.cells == sm.cells
        assert again.tracts == sm.tracts
        assert again.name == sm.name


def test_tract_wcs(lsst):
    t = next(iter(lsst.tracts.values()))
    w = t.wcs()
    assert "TAN" in w.wcs.ctype[0] and "TAN" in w.wcs.ctype[1]
    scales = proj_plane_pixel_scales(w) * 3600
    np.testing.assert_allclose(scales, [t.pixel_scale, t.pixel_scale], rtol=1e-12)
    # the tract centre (between the middle pixels) is the tangent point
    b = t.inner_box
    ra, dec = w.pixel_to_world_values((b.width - 1) / 2, (b.height - 1) / 2)
    assert abs(ra - t.ra) < 1e-9 and abs(dec - t.dec) < 1e-9
    # east is left (RA decreases with x), north is up
    ra1, dec1 = w.pixel_to_world_values((b.width - 1) / 2 + 100, (b.height - 1) / 2 + 100)
    assert ra1 < t.ra and dec1 > t.dec
    # round trip at negative pixels (patch borders extend outside the tract)
    x, y = w.world_to_pixel_values(*w.pixel_to_world_values(-200.0, -150.0))
    assert abs(x + 200) < 1e-6 and abs(y + 150) < 1e-6


def test_cells_and_patches_overlapping_brute_force(demo):
    t = demo.tract(0)
    rng = np.random.default_rng(5)
    g = demo.cells
    lo, hi = -g.patch_border - 30, t.inner_box.x1 + g.patch_border + 30
    for _ in range(150):
        x0, y0 = (int(v) for v in rng.integers(lo, hi, 2))
        w, h = (int(v) for v in rng.integers(1, 260, 2))
        box = Box(x0, y0, x0 + w, y0 + h)
        want_p = [p for p in t.patches() if t.patch_outer_box(p).overlaps(box)]
        assert t.patches_overlapping(box) == want_p
        for p in t.patches():
            want = [c for c in t.cells_of(p) if box.overlaps(t.cell_inner_box(c))]
            assert sorted(t.cells_overlapping(p, box)) == sorted(want), (box, p)
    # a one-pixel box at a cell's inner corners, and just outside it
    c = CellId(PatchId(0, 0, 0), 3, 2)
    ib = t.cell_inner_box(c)
    for x, y in ((ib.x0, ib.y0), (ib.x1 - 1, ib.y1 - 1)):
        assert c in t.cells_overlapping(c.patch, Box(x, y, x + 1, y + 1))
    for x, y in ((ib.x0 - 1, ib.y0), (ib.x1, ib.y1 - 1)):
        assert c not in t.cells_overlapping(c.patch, Box(x, y, x + 1, y + 1))


def test_box_semantics():
    b = Box(-3, 2, 5, 10)
    assert b.shape == (8, 8) and b.width == 8 and b.height == 8
    assert b.grown(2) == Box(-5, 0, 7, 12)
    assert not Box(0, 0, 0, 5).overlaps(Box(0, 0, 5, 5))
    assert Box(0, 0, 5, 5).intersection(Box(5, 0, 9, 5)).empty
    arr = np.arange(100).reshape(10, 10)  # pixel [0,0] at tract (-5, 0)
    sub = arr[Box(-3, 2, 0, 4).slices((-5, 0))]
    assert sub.shape == (2, 3) and sub[0, 0] == arr[2, 2]
    with pytest.raises(Exception):
        b.x0 = 4  # frozen
