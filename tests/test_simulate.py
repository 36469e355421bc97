"""The GalSim simulator writes valid, deterministic warps with the promised features."""

from __future__ import annotations

import argparse
import sys

import numpy as np
import pytest
from astropy.io import fits
from astropy.table import Table

pytest.importorskip("galsim")

from streamcoadd.cli.simulate import register
from streamcoadd.core.errors import UserError  # noqa: E402
from streamcoadd.core.masks import CANONICAL_PLANES  # noqa: E402
from streamcoadd.core.skymap import load_skymap  # noqa: E402
from streamcoadd.io.simulate import simulate  # noqa: E402
from streamcoadd.io.warp_reader import read_warp  # noqa: E402

BAD_PLANES = ("BAD", "SAT", "CR", "SUSPECT")


def bits(mask, name):
    return (mask >> CANONICAL_PLANES[name]) & 1 == 1


@pytest.fixture(scope="module")
def sim(tmp_path_factory):
    """The default scene (stars, galaxies, defects), 3 visits x 2 detectors, 1 noise plane."""
    out = tmp_path_factory.mktemp("sim")
    s = simulate(out, visits=3, seed=1, noise_realizations=1)
    sm = load_skymap(out / "skymap.toml")
    warps = [read_warp(p, sm, noise_realizations=1) for p in s["warps"]]
    return s, sm, warps


@pytest.fixture(scope="module")
def stars(tmp_path_factory):
    """High-S/N isolated stars, 2 visits x 1 detector."""
    out = tmp_path_factory.mktemp("stars")
    s = simulate(out, visits=2, detectors=1, seed=5, stars_only=True, high_snr=True)
    return s, out


def test_every_warp_is_valid_and_matches_its_table(sim):
    s, sm, warps = sim
    assert len(warps) == 6  # 3 visits x 2 detectors
    table = Table.read(s["outdir"] / "warps.ecsv")
    assert len(table) == len(warps)
    for w, row in zip(warps, table):
        assert (w.id.visit, w.id.detector, w.band) == (row["visit"], row["detector"], "r")
        assert w.xy0 == (row["x0"], row["y0"])
        assert w.image.shape == (row["height"], row["width"])
        assert len(w.noise) == 1
    # both pixel-origin conventions are written (LTV and afw's CRVAL1A)
    headers = [fits.getheader(p, "IMAGE") for p in s["warps"]]
    assert any("LTV1" in h for h in headers) and any("CRVAL1A" in h for h in headers)


def test_defects_and_no_data_are_present(sim):
    s, sm, warps = sim
    visits = {r["visit"]: r for r in Table.read(s["outdir"] / "visits.ecsv")}
    for name in ("BAD", "SAT", "CR", "SUSPECT", "NO_DATA"):
        assert sum(int(bits(w.mask, name).sum()) for w in warps) > 0, name
    for w in warps:
        nod = bits(w.mask, "NO_DATA")
        assert nod.any() and not nod.all()
        assert np.isnan(w.image[nod]).all() and np.isinf(w.variance[nod]).all()
        assert np.isfinite(w.image[~nod]).all()  # garbage under bad planes is finite
        sat = bits(w.mask, "SAT")
        level = np.float32(visits[w.id.visit]["sat_level_njy"])
        assert np.all(w.image[sat & ~bits(w.mask, "CR") & ~bits(w.mask, "BAD")
                              & ~bits(w.mask, "SUSPECT")] == level)
        # a bad column: one column BAD over most of its valid pixels
        bad, valid = bits(w.mask, "BAD").sum(axis=0), (~nod).sum(axis=0)
        assert np.any(bad > 0.9 * valid)


def cell_fractions(sm, w, plane=None):
    """(valid fraction, plane fraction) of each cell inner box overlapping warp ``w``."""
    tract = sm.tract(w.id.tract)
    out = []
    for patch in tract.patches():
        for cell in tract.cells_of(patch):
            b = tract.cell_inner_box(cell)
            if not w.box.overlaps(b):
                continue
            inter = b.intersection(w.box)
            m = w.mask[inter.slices(w.xy0)]
            n = b.width * b.height
            valid = np.count_nonzero(~bits(m, "NO_DATA")) / n
            masked = np.count_nonzero(bits(m, plane)) / n if plane else 0.0
            out.append((cell, valid, masked))
    return out


def test_some_cells_are_only_partially_covered(sim):
    s, sm, warps = sim
    fr = [v for w in warps for _, v, _ in cell_fractions(sm, w)]
    assert any(0 < v < 1 for v in fr)
    assert sum(v == 1 for v in fr) > 50


def test_some_cells_are_heavily_masked(sim):
    s, sm, warps = sim
    assert s["heavily_masked"], "no heavily masked warp"
    by_id = {(w.id.visit, w.id.detector): w for w in warps}
    for visit, det, box in s["heavily_masked"]:
        w = by_id[(visit, det)]
        heavy = [(v, m) for c, v, m in cell_fractions(sm, w, "BAD")
                 if sm.tract(0).cell_inner_box(c).contains(box.intersection(
                     sm.tract(0).cell_inner_box(c))) and v == 1 and m > 0.5]
        assert heavy, f"visit {visit}: no fully covered cell with > 50 % BAD"


def test_psf_grid_stamps_are_normalised_centred_and_at_cell_centres(sim):
    s, sm, warps = sim
    tract = sm.tract(0)
    sizes = []
    for w in warps:
        st, pos = w.psf.stamps, w.psf.positions
        assert st.shape[1:] == (41, 41) and pos is not None and len(pos) > 1
        assert np.allclose(st.sum(axis=(1, 2)), 1.0, atol=1e-12)
        yy, xx = np.mgrid[-20:21, -20:21]
        assert np.abs((st * xx).sum(axis=(1, 2))).max() < 1e-6
        assert np.abs((st * yy).sum(axis=(1, 2))).max() < 1e-6
        # one stamp at the centre of every cell the warp fully covers
        full = {tract.cell_centre(c) for c, v, _ in cell_fractions(sm, w) if v == 1}
        assert full and full <= {(int(x), int(y)) for x, y in pos}
        sizes.append((st * (xx**2 + yy**2)).sum(axis=(1, 2)).mean())
        # the PSF varies across the field
        assert np.ptp((st * xx**2).sum(axis=(1, 2))) > 0
    assert max(sizes) > 1.2 * min(sizes)  # visits have different seeing
    v = Table.read(s["outdir"] / "visits.ecsv")
    assert np.all((v["fwhm_arcsec"] >= 0.6) & (v["fwhm_arcsec"] <= 1.2))
    assert np.all(np.hypot(v["e1"], v["e2"]) <= 0.1)
    assert v["noise_sigma_njy"].max() / v["noise_sigma_njy"].min() > 1.5


def test_noise_realizations_have_the_variance(sim):
    s, sm, warps = sim
    for w in warps:
        good = ~bits(w.mask, "NO_DATA")
        assert np.isnan(w.noise[0][~good]).all()
        ratio = np.std(w.noise[0][good]) / np.sqrt(np.median(w.variance[good]))
        assert 0.97 < ratio < 1.03


def test_truth_catalogue(sim):
    s, sm, warps = sim
    t = Table.read(s["outdir"] / "truth.fits")
    assert set(t["type"]) == {"star", "galaxy"}
    assert (t["flux"] > 0).all()
    assert (t["mag"][t["type"] == "star"] < 16.5).sum() >= 3  # saturating stars
    ra, dec = sm.tract(0).wcs().pixel_to_world_values(t["x"], t["y"])
    assert np.allclose(ra, t["ra"]) and np.allclose(dec, t["dec"])


def hsm_T_e(a):
    import galsim
    r = galsim.hsm.FindAdaptiveMom(galsim.Image(np.asarray(a, float), scale=1.0))
    e1, e2 = r.observed_shape.e1, r.observed_shape.e2
    return 2 * r.moments_sigma**2 / np.sqrt(1 - e1**2 - e2**2), e1, e2


def test_stars_are_drawn_with_the_written_psf(stars):
    """An unmasked star in a warp has the moments of the PSF stamp nearest to it."""
    s, out = stars
    sm = load_skymap(out / "skymap.toml")
    truth = Table.read(out / "truth.fits")
    assert set(truth["type"]) == {"star"}
    h, diffs = 12, []
    for p in s["warps"]:
        w = read_warp(p, sm)
        for x, y in zip(truth["x"], truth["y"]):
            ix, iy = int(np.floor(x + 0.5)) - w.xy0[0], int(np.floor(y + 0.5)) - w.xy0[1]
            sl = np.s_[iy - h:iy + h + 1, ix - h:ix + h + 1]
            if min(iy, ix) < h or iy + h >= w.image.shape[0] or ix + h >= w.image.shape[1] \
                    or w.mask[sl].any():
                continue
            psf = w.psf.at(x, y)[20 - h:21 + h, 20 - h:21 + h]
            (ts, e1s, e2s), (tp, e1p, e2p) = hsm_T_e(w.image[sl]), hsm_T_e(psf)
            diffs.append((ts / tp - 1, e1s - e1p, e2s - e2p))
    diffs = np.abs(np.array(diffs))
    assert len(diffs) > 50
    assert np.all(np.median(diffs, axis=0) < 1e-4), np.median(diffs, axis=0)


def test_same_seed_same_files_other_seed_other_files(stars, tmp_path):
    s, out = stars
    again = simulate(tmp_path / "a", visits=2, detectors=1, seed=5, stars_only=True,
                     high_snr=True)
    other = simulate(tmp_path / "b", visits=2, detectors=1, seed=6, stars_only=True,
                     high_snr=True)
    names = ["skymap.toml", "truth.fits", "visits.ecsv", "warps.ecsv"]
    names += [f"warps/{p.name}" for p in s["warps"]]
    assert [p.name for p in again["warps"]] == [p.name for p in s["warps"]]
    for n in names:
        assert (out / n).read_bytes() == (tmp_path / "a" / n).read_bytes(), n
    assert (out / "truth.fits").read_bytes() != (tmp_path / "b" / "truth.fits").read_bytes()
    assert s["warps"][0].read_bytes() != other["warps"][0].read_bytes()


def test_single_psf_and_no_defects(tmp_path):
    s = simulate(tmp_path, visits=1, detectors=3, psf_grid=False, defects=False,
                 stars_only=True)
    sm = load_skymap(tmp_path / "skymap.toml")
    assert len(s["warps"]) == 3 and not s["heavily_masked"]
    for p in s["warps"]:
        w = read_warp(p, sm)
        assert w.psf.positions is None and w.psf.stamps.shape == (1, 41, 41)
        assert fits.getdata(p, "PSF").ndim == 2
        assert not (w.mask & ~np.int32(1 << CANONICAL_PLANES["NO_DATA"])).any()


def test_user_mistakes_are_clear_errors(tmp_path, monkeypatch):
    with pytest.raises(UserError, match="visits"):
        simulate(tmp_path / "x", visits=0)
    with pytest.raises(UserError, match="not in tract"):
        simulate(tmp_path / "y", patches=[(5, 5)])
    with pytest.raises(UserError, match="not found"):
        simulate(tmp_path / "z", skymap=tmp_path / "missing.toml")
    monkeypatch.setitem(sys.modules, "galsim", None)  # as if GalSim were not installed
    with pytest.raises(UserError, match=r"pip install 'streamcoadd\[sim\]'"):
        simulate(tmp_path / "w")


def test_cli_subcommand(tmp_path, capsys):
    parser = argparse.ArgumentParser(prog="streamcoadd")
    register(parser.add_subparsers())
    out = tmp_path / "o"
    args = parser.parse_args(["simulate", str(out), "--visits", "1", "--detectors", "1",
                              "--stars-only", "--no-psf-grid", "--seed", "3"])
    assert args.func(args) == 0
    assert len(list((out / "warps").glob("*.fits"))) == 1
    assert "wrote 1 warps" in capsys.readouterr().out
    # simulating again into the same directory is refused without a traceback
    assert args.func(args) == 2
    assert "already holds warps" in capsys.readouterr().err
    args = parser.parse_args(["simulate", str(out), "--visits", "1", "--detectors", "1",
                              "--stars-only", "--overwrite"])
    assert args.func(args) == 0
