"""The legacy ``*_cells.fits`` tells the truth: it does not claim lsst.cell_coadds' format
(whose 0.8 reader needs a ``VISIT_SUMMARY`` HDU and reads its own header layout), it says
it is streamcoadd's own layout (``SCFORMAT``/``SCFMTVER``), and ``OCELL1/2`` is the outer
cell size, as LSST's keyword means: placing every ``CELLS`` row at ``GRMIN + cell_id *
GRCELL - (OCELL - GRCELL) / 2`` puts it where the stitched image has the same pixels.

Also: the Rubin outputs fail with one line saying what to install when lsst is missing.
"""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
from astropy.io import fits
from common import ROOT, SKYMAP_FILE, TRACT
from warpgen import make_warp

from streamcoadd.cli.main import main


@pytest.fixture(scope="module")
def state(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cells_fits")
    st = tmp / "state"
    assert main(["init", str(st), "--skymap", str(SKYMAP_FILE)]) == 0
    make_warp(tmp / "w" / "a.fits", TRACT, visit=1, detector=0, xy0=(-40, -40),
              shape=(230, 260))
    assert main(["ingest", str(st), "--quiet", str(tmp / "w")]) == 0
    return st


def test_cells_file_places_cells_by_outer_size(state, tmp_path):
    assert main(["finalize", str(state), "--out", str(tmp_path), "--patch", "0,0"]) == 0
    g = TRACT.cells
    with fits.open(tmp_path / "coadd_t0_p0-0_r_cells.fits") as cf, \
            fits.open(tmp_path / "coadd_t0_p0-0_r_stitched.fits") as sf:
        h = cf[0].header
        assert "VERSION" not in h and "VERSION" not in cf["CELLS"].header
        assert h["SCFORMAT"] == "streamcoadd-cells" and h["SCFMTVER"] == 2
        assert (h["OCELL1"], h["OCELL2"]) == (g.outer, g.outer) == (g.inner + 2 * g.border,) * 2
        assert (h["GRCELL1"], h["GRCELL2"]) == (g.inner, g.inner)
        pad = (h["OCELL1"] - h["GRCELL1"]) // 2
        stitched = sf["IMAGE"].data
        sx0, sy0 = -sf["IMAGE"].header["LTV1"], -sf["IMAGE"].header["LTV2"]
        rows = cf["CELLS"].data
        assert len(rows) > 4
        for row in rows:
            cx, cy = (int(v) for v in row["cell_id"])
            # the cell's outer box in tract pixels, from the header alone
            x0 = h["GRMIN1"] + cx * h["GRCELL1"] - pad
            y0 = h["GRMIN2"] + cy * h["GRCELL2"] - pad
            img = row["image"]
            assert img.shape == (h["OCELL2"], h["OCELL1"])
            # its inner box is where the stitched image holds the same pixels
            inner = img[pad:pad + g.inner, pad:pad + g.inner]
            st = stitched[y0 + pad - sy0:y0 + pad - sy0 + g.inner,
                          x0 + pad - sx0:x0 + pad - sx0 + g.inner]
            np.testing.assert_array_equal(inner, st)


@pytest.mark.parametrize("option", [["--format", "lsst-images"], ["--butler", "REPO"]])
def test_rubin_outputs_without_lsst_say_what_to_install(state, tmp_path, option):
    """lsst made unimportable (as on Python < 3.12 or without the extra): one line."""
    option = [str(tmp_path / "repo") if o == "REPO" else o for o in option]
    code = ("import sys; sys.modules['lsst'] = None; sys.modules['lsst.images'] = None; "
            "from streamcoadd.cli.main import main; "
            f"sys.exit(main(['finalize', {str(state)!r}, '--out', {str(tmp_path / 'o')!r}, "
            f"*{option!r}]))")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       env=env, cwd=ROOT, timeout=60)
    assert p.returncode == 2, p.stderr
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in p.stderr, p.stderr
    what = "--butler" if option[0] == "--butler" else "--format lsst-images"
    assert lines[0].startswith(f"streamcoadd: error: {what} needs Python >= 3.12")
    assert "pip install 'streamcoadd[rubin]'" in lines[0]
