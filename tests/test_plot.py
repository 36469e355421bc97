"""``streamcoadd plot``: real CLI on a real state; PNGs are written and hold what they claim."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("matplotlib")

from test_reader_api import ROOT, build_state, cli, expected_inputs  # noqa: E402

import streamcoadd  # noqa: E402
from streamcoadd.analysis.plot import KINDS, make_figure  # noqa: E402


@pytest.fixture(scope="module")
def state(tmp_path_factory) -> Path:
    return build_state(tmp_path_factory.mktemp("plot"))


def read_png(path: Path) -> np.ndarray:
    from matplotlib.image import imread

    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    return imread(path)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("where", [[], ["--patch", "0,0"]])
def test_cli_writes_png(state, tmp_path, kind, where):
    out = tmp_path / f"{kind}.png"
    r = cli("plot", kind, state, "--out", out, *where)
    assert f"wrote {out}" in r.stdout
    img = read_png(out)
    h, w = img.shape[:2]
    assert 700 < w < 2500 and 600 < h < 2500
    assert img[..., :3].std() > 0.05  # not blank


def _mesh(fig):
    from matplotlib.collections import QuadMesh

    ax = fig.axes[0]
    return [c for c in ax.collections if isinstance(c, QuadMesh)][0]


def test_depth_figure_shows_the_depth_map(state):
    with streamcoadd.open_state(state) as st:
        fig = make_figure("depth", st, patch=(0, 0))
        shown = _mesh(fig).get_array()
        want = np.array([[len(expected_inputs(cx, cy)) for cx in range(8)] for cy in range(8)])
        assert np.ma.getmaskarray(shown).reshape(8, 8)[7, 7]  # empty cell: not coloured
        np.testing.assert_array_equal(np.ma.filled(shown, 0).reshape(8, 8), want)
        texts = {t.get_text() for t in fig.axes[0].texts}
        assert "patch 0,0 inner region" in texts and "3" in texts
        assert "inputs per cell" in fig.axes[0].get_title()
        # tract view: the patch-inner cells of all four patches, patch labels
        fig = make_figure("depth", st)
        shown = np.ma.filled(_mesh(fig).get_array(), 0).reshape(12, 12)
        np.testing.assert_array_equal(shown, st.tract(0).depth_map("r"))
        texts = {t.get_text() for t in fig.axes[0].texts}
        assert {"patch 0,0", "patch 1,0", "patch 0,1", "patch 1,1"} <= texts


def test_weight_and_psf_figures(state):
    with streamcoadd.open_state(state) as st:
        p = st.patch((0, 0, 0), "r")
        fig = make_figure("weight", st, patch=(0, 0))
        shown = _mesh(fig).get_array().reshape(8, 8)
        w = p.weight_map()
        scale = 10.0 ** np.floor(np.log10(np.nanmax(w)))
        np.testing.assert_allclose(np.ma.filled(shown, np.nan), w / scale, equal_nan=True)
        fig = make_figure("psf", st, patch=(0, 0))
        shown = _mesh(fig).get_array().reshape(8, 8)
        np.testing.assert_allclose(np.ma.filled(shown, np.nan), p.fwhm_map(), equal_nan=True)
        from matplotlib.quiver import Quiver

        q = [c for c in fig.axes[0].collections if isinstance(c, Quiver)][0]
        assert q.N == 63  # one whisker per populated cell


def test_quicklook_shows_the_stitched_patch(state):
    from matplotlib.image import AxesImage

    with streamcoadd.open_state(state) as st:
        p = st.patch((0, 0, 0), "r")
        fig = make_figure("quicklook", st, patch=(0, 0))
        im = [a for a in fig.axes[0].get_images() if isinstance(a, AxesImage)][0]
        data = im.get_array()
        ccd = p.stitched()
        b = st.skymap.tract(0).cells.border
        np.testing.assert_array_equal(np.ma.filled(data, np.nan), ccd.data[b:-b, b:-b])
        # the empty cell is outlined and the colour bar is in nJy
        assert any("nJy" in a.get_ylabel() for a in fig.axes[1:])
        legend = fig.axes[0].get_legend()
        assert "empty cell (no input): 1" in [t.get_text() for t in legend.get_texts()]


def test_selection_errors(state, tmp_path):
    r = cli("plot", "depth", state, "--out", tmp_path / "x.png", "--patch", "1,1", "--band",
            "g", ok=False)
    assert r.returncode == 3 and "band 'g' has no populated cell" in r.stderr
    r = cli("plot", "depth", state, "--out", tmp_path / "x.png", "--tract", "7", ok=False)
    assert r.returncode == 2 and "tract 7 is not in skymap" in r.stderr
    r = cli("plot", "depth", state, "--out", tmp_path / "nodir" / "x.png", ok=False)
    assert r.returncode == 2 and "does not exist" in r.stderr
    assert "Traceback" not in r.stderr


def test_empty_state_and_two_bands(tmp_path):
    from test_reader_api import SKYMAP, write_warps

    state = tmp_path / "s"
    cli("init", state, "--skymap", SKYMAP)
    r = cli("plot", "depth", state, "--out", tmp_path / "x.png", ok=False)
    assert r.returncode == 3 and "no cell is populated" in r.stderr
    cli("ingest", state, *write_warps(tmp_path / "r", visits=[2], band="r"), "--quiet")
    cli("ingest", state, *write_warps(tmp_path / "g", visits=[2], band="g", visit_offset=100), "--quiet")
    r = cli("plot", "depth", state, "--out", tmp_path / "x.png", ok=False)
    assert r.returncode == 2 and "bands g, r: choose one with --band" in r.stderr
    cli("plot", "depth", state, "--out", tmp_path / "x.png", "--band", "g")
    r = cli("plot", "depth", state, "--out", tmp_path / "y.png", "--band", "g", "--patch", "1,1",
            ok=False)
    assert r.returncode == 3 and "populated patches: 0,0" in r.stderr


def test_without_matplotlib_one_clear_line(state, tmp_path):
    """matplotlib is an optional extra: hide it and the command says so in one line."""
    fake = tmp_path / "fake"
    (fake / "matplotlib").mkdir(parents=True)
    (fake / "matplotlib" / "__init__.py").write_text(
        "raise ModuleNotFoundError(\"No module named 'matplotlib'\", name='matplotlib')\n")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [str(fake), str(ROOT), os.environ.get("PYTHONPATH", "")]))
    r = subprocess.run([sys.executable, "-m", "streamcoadd", "plot", "depth", str(state),
                        "--out", str(tmp_path / "x.png")], cwd=ROOT, capture_output=True,
                       text=True, env=env)
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "matplotlib" in lines[0] and "streamcoadd[plot]" in lines[0]
    assert not (tmp_path / "x.png").exists()
    # the rest of the CLI still works without it
    r = subprocess.run([sys.executable, "-m", "streamcoadd", "status", str(state)], cwd=ROOT,
                       capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stderr


def test_big_quicklook_is_binned_patch_by_patch(state, monkeypatch):
    """Large areas are block-averaged (factor dividing the patch size) before drawing."""
    from matplotlib.image import AxesImage

    import streamcoadd.analysis.plot as plot

    monkeypatch.setattr(plot, "MAX_IMAGE_PX", 200)
    with streamcoadd.open_state(state) as st:
        view = plot.select(st)
        f = plot.binning(view)
        assert f == 3  # 600 px tract -> 200 px; 3 divides the 300 px patch
        fig = plot.quicklook_figure(view)
        im = [a for a in fig.axes[0].get_images() if isinstance(a, AxesImage)][0]
        data = np.ma.filled(im.get_array(), np.nan)
        assert data.shape == (200, 200)
        p = st.patch((0, 0, 0), "r")
        full = p.stitched().data[60:360, 60:360]  # patch 0,0 inner region, tract px 0..300
        want = np.nanmean(full.reshape(100, 3, 100, 3), axis=(1, 3))
        np.testing.assert_allclose(data[:100, :100], want, rtol=1e-6, equal_nan=True)
        assert "binned 3×3" in fig.axes[0].get_title()
