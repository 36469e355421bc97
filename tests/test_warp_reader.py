"""Warp reader and validator (SPEC §2): round trips, both xy0 conventions, remapped mask bits,
PSF grids, noise realizations, and every rejection case (message names the file and reason)."""

from __future__ import annotations

import re

import numpy as np
import pytest
from common import ROOT
from warpgen import (
    BIT,
    BROKEN_CASES,
    canonical_to_planes,
    generate,
    shuffled_planes,
    write_broken,
    write_gen,
)

from streamcoadd.core.config import FoldConfig
from streamcoadd.core.errors import WarpRejected
from streamcoadd.core.skymap import Box, load_skymap
from streamcoadd.io.warp_reader import read_warp

SKYMAP = load_skymap(ROOT / "config" / "skymap-demo.toml")
TRACT = SKYMAP.tract(0)
BAD = FoldConfig().bad_planes


def _read(p, **kw):
    kw.setdefault("bad_planes", BAD)
    return read_warp(p, SKYMAP, **kw)


def _same_float(a, b):
    """Equal including NaN/inf positions."""
    a, b = np.asarray(a), np.asarray(b)
    return a.shape == b.shape and np.array_equal(a, b, equal_nan=True)


@pytest.mark.parametrize("afw_style", [False, True], ids=["LTV", "CRVAL1A"])
@pytest.mark.parametrize("xy0", [(17, 23), (-60, -45), (250, 290)])
def test_round_trip(tmp_path, afw_style, xy0):
    g = generate(TRACT, xy0=xy0, shape=(90, 130), seed=11, coverage="rotated",
                 noise_realizations=2)
    p = write_gen(tmp_path / "w.fits", TRACT, g, visit=123456, detector=42, band="i",
                  afw_style=afw_style)
    w = _read(p, noise_realizations=2)
    assert w.xy0 == xy0
    assert w.box == Box(xy0[0], xy0[1], xy0[0] + 130, xy0[1] + 90)
    assert (w.id.visit, w.id.detector, w.id.tract, w.band) == (123456, 42, 0, "i")
    assert _same_float(w.image, g.image)
    assert _same_float(w.variance, g.variance)
    assert np.array_equal(w.mask, g.mask)
    assert len(w.noise) == 2 and _same_float(w.noise[1], g.noise[1])
    assert np.allclose(w.psf.stamps[0], g.psf)
    assert w.weight_override is None
    # the file has NO_DATA with NaN image and inf/NaN variance, and defects: still accepted
    assert np.isnan(g.image[~g.valid()]).all()
    assert (g.mask & BIT["SAT"]).any() and (g.mask & BIT["CR"]).any()


def test_both_conventions_agree(tmp_path):
    g = generate(TRACT, xy0=(-33, 101), shape=(70, 80), seed=3)
    a = _read(write_gen(tmp_path / "a.fits", TRACT, g, visit=1, detector=1))
    b = _read(write_gen(tmp_path / "b.fits", TRACT, g, visit=1, detector=1, afw_style=True))
    assert a.xy0 == b.xy0 == (-33, 101)
    assert _same_float(a.image, b.image) and np.array_equal(a.mask, b.mask)


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_remapped_mask_bits(tmp_path, seed):
    g = generate(TRACT, xy0=(0, 0), shape=(80, 90), seed=seed, coverage="chipgap",
                 heavy_mask=Box(10, 10, 40, 40))
    planes = shuffled_planes(seed)
    p = write_gen(tmp_path / "w.fits", TRACT, g, visit=5, detector=6, mask_planes=planes)
    # the file really is in other bits
    from astropy.io import fits
    with fits.open(p) as h:
        raw = h["MASK"].data
        assert not np.array_equal(raw, g.mask)
        assert h["MASK"].header["MP_NO_DATA"] == planes["NO_DATA"]
    w = _read(p)
    assert np.array_equal(w.mask, g.mask)
    for name in ("BAD", "SAT", "CR", "NO_DATA", "EDGE", "DETECTED"):
        assert np.array_equal((w.mask & BIT[name]) != 0, (g.mask & BIT[name]) != 0), name


def test_mask_bit_31(tmp_path):
    """A plane on the sign bit of the int32 mask is read correctly."""
    g = generate(TRACT, xy0=(5, 5), shape=(60, 60), seed=9)
    planes = dict(shuffled_planes(4))
    # swap so that BAD sits on bit 31
    other = next(n for n, b in planes.items() if b == 31) if 31 in planes.values() else None
    if other:
        planes[other] = planes["BAD"]
    planes["BAD"] = 31
    assert (g.mask & BIT["BAD"]).any()
    p = write_gen(tmp_path / "w.fits", TRACT, g, visit=5, detector=6, mask_planes=planes)
    w = _read(p)
    assert np.array_equal(w.mask, g.mask)


def test_extra_unknown_plane_tolerated(tmp_path):
    g = generate(TRACT, xy0=(5, 5), shape=(60, 60), seed=9)
    planes = {**{n: b for n, b in shuffled_planes(7).items()}}
    used = set(planes.values())
    free = next(b for b in range(32) if b not in used)
    planes_file = dict(planes, MY_PRIVATE_PLANE=free)
    mask = canonical_to_planes(g.mask, planes)
    mask[0, :10] |= np.int32(1 << free) if free < 31 else 0
    from streamcoadd.io.warp_writer import write_warp
    p = write_warp(tmp_path / "w.fits", tract=TRACT, xy0=g.xy0, image=g.image, mask=mask,
                   variance=g.variance, psf=g.psf, visit=1, detector=1, band="r",
                   mask_planes=planes_file)
    w = _read(p)
    assert np.array_equal(w.mask, g.mask)  # unknown plane dropped, known ones kept
    assert "MY_PRIVATE_PLANE" in w.unknown_planes


def test_psf_grid(tmp_path):
    g = generate(TRACT, xy0=(-20, 40), shape=(120, 150), seed=21, psf="grid", psf_grid=(3, 2),
                 psf_shape=(25, 31))
    assert g.psf.shape == (6, 25, 31) and g.psf_positions.shape == (6, 2)
    p = write_gen(tmp_path / "w.fits", TRACT, g, visit=1, detector=1)
    w = _read(p)
    assert np.allclose(w.psf.stamps, g.psf)
    assert np.allclose(w.psf.positions, g.psf_positions)
    rng = np.random.default_rng(0)
    for _ in range(50):
        x, y = rng.uniform(-20, 130), rng.uniform(40, 160)
        d = np.hypot(g.psf_positions[:, 0] - x, g.psf_positions[:, 1] - y)
        assert np.array_equal(w.psf.at(x, y), g.psf[np.argmin(d)])
    # stamps differ from each other (the grid is not a constant PSF)
    assert not np.allclose(g.psf[0], g.psf[-1])


def test_header_weight_and_metadata(tmp_path):
    g = generate(TRACT, xy0=(0, 0), shape=(60, 60), seed=2)
    p = write_gen(tmp_path / "w.fits", TRACT, g, visit=9, detector=3, band="g", weight=0.0123)
    w = _read(p)
    assert w.weight_override == pytest.approx(0.0123, rel=1e-12)
    assert w.band == "g"
    assert w.instrument == "SIMCAM"


def test_nan_in_bad_pixels_only_allowed_under_bad_planes(tmp_path):
    g = generate(TRACT, xy0=(0, 0), shape=(80, 80), seed=8, nan_in_bad=True)
    bad = (g.mask & BIT["BAD"]) != 0
    assert np.isnan(g.image[bad]).any()
    p = write_gen(tmp_path / "w.fits", TRACT, g, visit=9, detector=3)
    w = _read(p)  # BAD is a bad plane: NaN there is fine (interpolated)
    assert np.isnan(w.image[bad]).any()
    with pytest.raises(WarpRejected, match="IMAGE has non-finite"):
        _read(p, bad_planes=("SAT",))


def test_noise_realizations_required(tmp_path):
    g = generate(TRACT, xy0=(0, 0), shape=(60, 60), seed=2, noise_realizations=1)
    p = write_gen(tmp_path / "w.fits", TRACT, g, visit=9, detector=3)
    assert len(_read(p, noise_realizations=1).noise) == 1
    with pytest.raises(WarpRejected) as e:
        _read(p, noise_realizations=2)
    assert str(p) in str(e.value) and "NOISE1" in e.value.reason


@pytest.mark.parametrize("case", sorted(BROKEN_CASES))
def test_every_rejection(tmp_path, case):
    p = write_broken(tmp_path, TRACT, case)
    before = p.read_bytes()
    with pytest.raises(WarpRejected) as e:
        _read(p)
    err = e.value
    assert err.path == str(p)
    assert str(p) in str(err), "message must name the file"
    assert re.search(BROKEN_CASES[case], err.reason, re.I), \
        f"reason for {case!r} does not say what is wrong: {err.reason!r}"
    assert "Traceback" not in str(err)
    assert p.read_bytes() == before  # reading never modifies the file


def test_broken_files_are_broken_only_in_one_way(tmp_path):
    """Sanity of the helper: the good warp it starts from is accepted."""
    from warpgen import _good_warp_hdul
    for psf in ("stamp", "grid"):
        hdul, _ = _good_warp_hdul(TRACT, tmp=tmp_path / f"g_{psf}.fits", psf=psf)
        hdul.writeto(tmp_path / f"ok_{psf}.fits")
        w = _read(tmp_path / f"ok_{psf}.fits")
        assert w.id.visit == 1


def test_missing_file_and_directory(tmp_path):
    with pytest.raises(WarpRejected, match="disappeared|not found|exist") as e:
        _read(tmp_path / "nothere.fits")
    assert "nothere.fits" in str(e.value)
    d = tmp_path / "adir.fits"
    d.mkdir()
    with pytest.raises(WarpRejected, match="directory"):
        _read(d)
