"""The streaming ``finalize`` (``streamcoadd.analysis.finalize.finalize_patch``) writes the same
files, byte for byte, as the original astropy implementation kept frozen in
``tests/finalize_reference.py``: same HDUs, headers, columns and values.

The state covers the cases the writers treat differently: several patches and bands,
cells missing inside a patch (stitched fill values), fallback cells, interpolated and
saturated pixels (mask bits), a noise realization (extra columns), edge cells of the
stitched image, one cell only (``--cell``), one and two worker processes, and a cell that
disappears between the manifest read and the cell read (rows closed up).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from astropy.io import fits
from common import SKYMAP, SKYMAP_FILE, TRACT
from finalize_reference import reference_finalize
from reference import run_cli
from warpgen import generate, make_warp, stack_warp_set, write_gen

import streamcoadd
from streamcoadd.analysis.finalize import file_stem, finalize_patch
from streamcoadd.cli.main import main as cli
from streamcoadd.core.skymap import Box, CellId, PatchId


@pytest.fixture(scope="module")
def state(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("fin_eq")
    st = tmp / "state"
    cfg = tmp / "fold.toml"
    cfg.write_text("[fold]\nnoise_realizations = 1\n")
    run_cli("init", st, "--skymap", SKYMAP_FILE, "--config", cfg)
    w = tmp / "w"
    # band r: a stack over parts of patches (0,0), (1,0), (0,1), (1,1); cells partly covered
    stack_warp_set(w, TRACT, 4, seed=8, region=Box(-20, 130, 250, 400), noise_realizations=1)
    # two heavily masked inputs: fallback cells where nothing better covers them
    for i, xy0 in enumerate([(-60, -60), (200, -60)]):
        make_warp(w / f"heavy{i}.fits", TRACT, visit=50 + i, detector=0, xy0=xy0,
                  shape=(130, 130), heavy_mask=Box(xy0[0], xy0[1], xy0[0] + 130, xy0[1] + 130),
                  noise_realizations=1)
    # band g: warps without MJD-OBS (mjd NaN), two detectors of one visit
    for det in (0, 1):
        g = generate(TRACT, xy0=(-40 + 60 * det, -40), shape=(150, 150), seed=70 + det,
                     noise_realizations=1)
        write_gen(w / f"g_d{det}.fits", TRACT, g, visit=77, detector=det, band="g", mjd=None)
    run_cli("ingest", st, "--quiet", w)
    return st


def _same_files(a: Path, b: Path) -> None:
    names = sorted(p.name for p in a.iterdir())
    assert names and names == sorted(p.name for p in b.iterdir())
    for name in names:
        x, y = (a / name).read_bytes(), (b / name).read_bytes()
        if x != y:  # say where
            with fits.open(a / name) as ha, fits.open(b / name) as hb:
                assert len(ha) == len(hb), name
                for i, (u, v) in enumerate(zip(ha, hb)):
                    assert u.header.tostring() == v.header.tostring(), f"{name} HDU {i} header"
            pos = next(i for i in range(min(len(x), len(y))) if x[i] != y[i]) \
                if len(x) == len(y) else min(len(x), len(y))
            raise AssertionError(f"{name}: {len(x)} vs {len(y)} bytes, first difference at "
                                 f"byte {pos}")


def _reference(state, out, **kw):
    assert reference_finalize(state, out, **kw) > 0
    return out


@pytest.mark.parametrize("workers", [1, 2])
def test_band_r_identical_to_reference(state, tmp_path, workers):
    ref = _reference(state, tmp_path / "ref", band="r")
    new = tmp_path / "new"
    assert cli(["finalize", str(state), "--out", str(new), "--band", "r",
                     "--workers", str(workers)]) == 0
    _same_files(ref, new)
    # the state is meaningful: fallback cells, missing cells in a patch, several patches
    with streamcoadd.open_state(state) as st:
        patches = st.patches("r")
        assert len(patches) >= 2
        cells = st.populated_cells("r")
        groups = {st.cell(c, "r").group for c in cells}
        assert groups == {"good", "fallback"}
        assert any(len(st.populated_cells("r", p)) < SKYMAP.cells.cells_per_patch**2
                   for p in patches)
    with fits.open(new / "coadd_t0_p0-0_r_cells.fits") as h:
        assert "noise_00" in h["CELLS"].columns.names
        assert (h["CELLS"].data["mask"] != 0).any()


def test_one_cell_identical_to_reference(state, tmp_path):
    with streamcoadd.open_state(state) as st:
        some = st.populated_cells("r")[3]
    args = dict(patch=(some.patch.x, some.patch.y), cell=(some.x, some.y), band="r")
    ref = _reference(state, tmp_path / "ref", **args)
    new = tmp_path / "new"
    run_cli("finalize", state, "--out", new, "--band", "r", "--patch",
            f"{some.patch.x},{some.patch.y}", "--cell", f"{some.x},{some.y}")
    _same_files(ref, new)
    assert [p.name for p in new.iterdir()] == [f"{file_stem(some.patch, 'r')}_cells.fits"]


def test_nan_mjd_visits_listed_once(state, tmp_path):
    """Warps without MJD-OBS: the old writer listed such a visit once per contributor row
    (NaN != NaN in its set); now once. Everything else is as before."""
    ref = _reference(state, tmp_path / "ref", band="g")
    new = tmp_path / "new"
    assert cli(["finalize", str(state), "--out", str(new), "--band", "g"]) == 0
    for f in sorted(ref.iterdir()):
        with fits.open(f) as a, fits.open(new / f.name) as b:
            assert [h.name for h in a] == [h.name for h in b]
            for ha, hb in zip(a, b):
                if ha.name == "VISIT":
                    assert len(ha.data) > 1  # the old duplicates
                    assert list(hb.data["visit"]) == [77]
                    assert np.isnan(hb.data["mjd"][0])
                    assert hb.data["instrument"][0] == "SIMCAM"
                    continue
                assert ha.header.tostring() == hb.header.tostring()
                if ha.data is not None:
                    assert ha.data.tobytes() == hb.data.tobytes()


@pytest.mark.parametrize("workers", [1, 2])
def test_cell_gone_meanwhile_is_left_out(state, tmp_path, workers):
    """A cell listed but without input any more when read (retracted meanwhile): its row
    is left out and the rows after it move up; the result is the patch without it."""
    with streamcoadd.open_state(state) as st:
        patch = PatchId(0, 0, 0)
        cells = st.populated_cells("r", patch)
        n = SKYMAP.cells.cells_per_patch
        ghost = next(CellId(patch, x, y) for x in range(n) for y in range(n)
                     if CellId(patch, x, y) not in cells)
        listed = sorted([*cells, ghost])
        assert listed.index(ghost) < len(listed) - 1  # rows after it must move
        out = tmp_path / "new"
        out.mkdir()
        got = finalize_patch(st.store, st.skymap.name, patch, "r", listed,
                             out / file_stem(patch, "r"), workers=workers)
        assert got == len(cells)
    ref = _reference(state, tmp_path / "ref", patch=(0, 0), band="r")
    _same_files(ref, out)


def test_nothing_left_writes_nothing(state, tmp_path):
    with streamcoadd.open_state(state) as st:
        patch = PatchId(0, 0, 0)
        n = SKYMAP.cells.cells_per_patch
        cells = set(st.populated_cells("r", patch))
        ghosts = [CellId(patch, x, y) for x in range(n) for y in range(n)
                  if CellId(patch, x, y) not in cells][:2]
        got = finalize_patch(st.store, st.skymap.name, patch, "r", ghosts,
                             tmp_path / file_stem(patch, "r"))
    assert got == 0 and list(tmp_path.iterdir()) == []
