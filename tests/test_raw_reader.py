"""The raw FITS reader (planes straight from the file's bytes, hashed while read) gives
the same Warp, and the same rejection, as astropy's fits.open on the same bytes."""

from __future__ import annotations

import gzip
import hashlib
import sys
from pathlib import Path

import numpy as np
import pytest
from astropy.io import fits

sys.path.insert(0, str(Path(__file__).parent))
import warpgen

from streamcoadd.core.errors import WarpRejected
from streamcoadd.core.skymap import load_skymap
from streamcoadd.io import warp_reader
from streamcoadd.io.warp_reader import read_and_hash, read_warp


@pytest.fixture(scope="module")
def skymap():
    import importlib.util

    root = Path(__file__).parents[1]
    spec = importlib.util.spec_from_file_location("torture", root / "scripts" / "torture.py")
    torture = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("torture", torture)
    spec.loader.exec_module(torture)
    return load_skymap(torture.SKYMAP)


@pytest.fixture(params=[0, None], ids=["every-image-a-view", "large-images-views"])
def views(request, monkeypatch):
    """RAW_MIN_BYTES 0: every image HDU of the small test warps is a view of the buffer
    (the path a patch-sized warp takes); None: the default threshold."""
    if request.param is not None:
        monkeypatch.setattr(warp_reader, "RAW_MIN_BYTES", request.param)


def assert_same_warp(a, b):
    for name in ("path", "content_hash", "id", "band", "xy0", "weight_override", "instrument",
                 "physical_filter", "unknown_planes"):
        assert getattr(a, name) == getattr(b, name), name
    assert a.mjd == b.mjd or (np.isnan(a.mjd) and np.isnan(b.mjd))
    for name in ("image", "mask", "variance"):
        x, y = getattr(a, name), getattr(b, name)
        assert x.dtype == y.dtype and x.dtype.isnative and x.shape == y.shape, name
        assert np.array_equal(x.view(np.uint8), y.view(np.uint8)), name  # NaNs included
    assert len(a.noise) == len(b.noise)
    for x, y in zip(a.noise, b.noise):
        assert x.dtype == y.dtype and np.array_equal(x.view(np.uint8), y.view(np.uint8))
    assert np.array_equal(a.psf.stamps, b.psf.stamps)
    assert (a.psf.positions is None) == (b.psf.positions is None)
    if a.psf.positions is not None:
        assert np.array_equal(a.psf.positions, b.psf.positions)


def outcome(path, skymap, data, raw, noise=0):
    try:
        return read_warp(path, skymap, ("BAD", "SAT", "CR"), noise, data=data, raw=raw)
    except WarpRejected as e:
        return str(e)


@pytest.mark.parametrize("seed", range(6))
def test_generated_warps_read_the_same(tmp_path, skymap, views, seed):
    tract = skymap.tract(0)
    rng = np.random.default_rng(seed)
    kw = {"coverage": str(rng.choice(["full", "rotated", "chipgap"])),
          "psf": "grid" if seed % 2 else "stamp", "psf_grid": (2, 3), "noise_realizations": 2}
    p = warpgen.make_warp(tmp_path / "w.fits", tract, visit=7 + seed, detector=1,
                          xy0=(int(rng.integers(-20, 40)), int(rng.integers(-20, 40))),
                          shape=(int(rng.integers(60, 150)), int(rng.integers(60, 150))),
                          seed=seed, afw_style=bool(seed % 3 == 0), nan_in_bad=bool(seed % 2),
                          **kw)
    data, h = read_and_hash(str(p))
    assert h == hashlib.sha256(p.read_bytes()).hexdigest()
    assert data.tobytes() == p.read_bytes() and data.flags.writeable
    ref = read_warp(str(p), skymap, ("BAD", "SAT", "CR"), 2, data=p.read_bytes(), raw=False)
    got = read_warp(str(p), skymap, ("BAD", "SAT", "CR"), 2, data=data, content_hash=h)
    assert_same_warp(got, ref)
    got2 = read_warp(str(p), skymap, ("BAD", "SAT", "CR"), 2, data=p.read_bytes())
    assert_same_warp(got2, ref)  # raw over immutable bytes: copies instead of views
    gz = tmp_path / "w.fits.gz"
    gz.write_bytes(gzip.compress(p.read_bytes()))
    data, h = read_and_hash(str(gz))
    got = read_warp(str(gz), skymap, ("BAD", "SAT", "CR"), 2, data=data, content_hash=h)
    ref = read_warp(str(gz), skymap, ("BAD", "SAT", "CR"), 2, data=gz.read_bytes(), raw=False)
    assert_same_warp(got, ref)


def test_raw_reader_does_not_modify_the_file(tmp_path, skymap, views):
    p = warpgen.make_warp(tmp_path / "w.fits", skymap.tract(0), visit=1, detector=0,
                          shape=(80, 90))
    before = p.read_bytes()
    data, h = read_and_hash(str(p))
    read_warp(str(p), skymap, data=data, content_hash=h)
    assert p.read_bytes() == before


HOSTILE_VALUES = ["-1", "0", "1E+300", "NaN", "'abc'", "T", "F", "''", "99999999999999999999",
                  "3.5", "'nJy'", "'IMAGE'", "17", "-64", "2147483648", "(1, 2)", "1000000"]


def _cards(data: bytes) -> list[int]:
    return [off for off in range(0, len(data), 80)
            if data[off + 8:off + 10] == b"= " and data[off:off + 1].isalpha()]


def test_hostile_headers_same_outcome(tmp_path, skymap, views):
    """Every valued card of a warp set in turn to hostile values (and a few random byte
    flips): the raw reader accepts exactly what astropy accepts, with the same Warp, and
    rejects the rest with the same message."""
    p = warpgen.make_warp(tmp_path / "w.fits", skymap.tract(0), visit=1, detector=0,
                          shape=(70, 80), psf="grid", psf_grid=(2, 2), noise_realizations=1)
    base = p.read_bytes()
    rng = np.random.default_rng(5)
    cases = []
    for off in _cards(base):
        for v in rng.choice(HOSTILE_VALUES, 2, replace=False):
            d = bytearray(base)
            d[off + 10:off + 80] = f"{v:>20}".ljust(70).encode()
            cases.append(bytes(d))
    for _ in range(40):  # byte flips anywhere in the headers or data
        d = bytearray(base)
        i = int(rng.integers(len(d)))
        d[i] = int(rng.integers(256))
        cases.append(bytes(d))
    cases += [base + b"\0" * 2880, base[:-2880], base[:2880 * 3]]
    accepted = 0
    for d in cases:
        ref = outcome("h.fits", skymap, d, raw=False, noise=1)
        got = outcome("h.fits", skymap, np.frombuffer(d, np.uint8).copy(), raw=True, noise=1)
        if isinstance(ref, str):
            assert got == ref
        else:
            assert not isinstance(got, str), got
            assert_same_warp(got, ref)
            accepted += 1
    assert accepted > 10  # (the mutations are not all fatal: both paths were compared)


def test_unusual_files_fall_back_to_astropy(tmp_path, skymap):
    """A scaled image (BZERO) or an extra HDU after the last: open_raw declines or reads
    it through astropy; read_warp gives the same result either way."""
    p = warpgen.make_warp(tmp_path / "w.fits", skymap.tract(0), visit=1, detector=0,
                          shape=(64, 64))
    with fits.open(p) as hdul:
        hdul["IMAGE"].header["BZERO"] = 0.0
        hdul.append(fits.ImageHDU(np.zeros((3, 3), np.int16), name="EXTRA"))
        hdul.writeto(tmp_path / "x.fits")
    q = tmp_path / "x.fits"
    ref = outcome(str(q), skymap, q.read_bytes(), raw=False)
    got = outcome(str(q), skymap, np.frombuffer(q.read_bytes(), np.uint8).copy(), raw=True)
    if isinstance(ref, str):
        assert got == ref
    else:
        assert_same_warp(got, ref)
