"""Hostile and broken input: every bad file is rejected with a clear reason that names it,
and the state is untouched (shards byte-identical, no ledger row for a warp). Plus a
hypothesis fuzz test over the FITS reader: any input returns a Warp or raises WarpRejected.

Daemon-only concerns (a symlink pointing out of the inbox, a file vanishing between the
event and the read inside 'watch') are tested here when the daemon is in this checkout;
the vanishing file is also tested at the reader/ingestor level, which the daemon calls.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import io
import os
import shutil
import sqlite3
import sys
from pathlib import Path

import numpy as np
import pytest
from astropy.io import fits

ROOT = Path(__file__).resolve().parent.parent
spec = importlib.util.spec_from_file_location("torture", ROOT / "scripts" / "torture.py")
torture = importlib.util.module_from_spec(spec)
sys.modules.setdefault("torture", torture)
spec.loader.exec_module(torture)

from streamcoadd.cli.main import main
from streamcoadd.core.errors import WarpRejected
from streamcoadd.core.skymap import load_skymap
from streamcoadd.io import warp_reader as warp_mod

SKYMAP = load_skymap(torture.SKYMAP)
TRACT = SKYMAP.tract(0)


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A state with a few warps folded, and one valid warp (not yet folded) to mutate."""
    d = tmp_path_factory.mktemp("hostile")
    warps = torture.make_warp_set(d / "warps", n=4, seed=41)
    st = d / "state"
    torture._quiet(main, ["init", str(st), "--skymap", str(torture.SKYMAP)])
    assert torture._quiet(main, ["ingest", str(st), *map(str, warps), "--quiet"]) == 0
    good = torture.make_warp(d / "good.fits", TRACT, (60, 70), (120, 110), visit=5000,
                             detector=3, seed=5)
    return st, good, warps


def snapshot(st: Path) -> dict:
    files = {str(p.relative_to(st)): hashlib.sha256(p.read_bytes()).hexdigest()
             for p in sorted((st / "shards").rglob("*"))
             if p.is_file() and p.name != "shard.lock"}  # lock files are not state
    db = sqlite3.connect(f"file:{st / 'ledger.sqlite'}?mode=ro", uri=True)
    files["ledger.warps"] = sorted(db.execute("SELECT * FROM warps").fetchall())
    db.close()
    return files


def ingest_out(st, *paths):
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf), contextlib.redirect_stderr(io.StringIO()):
        rc = main(["ingest", str(st), *map(str, paths), "--quiet"])
    return rc, buf.getvalue()


def assert_rejected(base, path, *needles):
    st = base[0]
    before = snapshot(st)
    rc, out = ingest_out(st, path)
    assert rc == 1, out
    line = [ln for ln in out.splitlines() if ln.strip().startswith("rejected")]
    assert line and str(path) in line[0], out
    for n in needles:
        assert n.lower() in line[0].lower(), line[0]
    assert snapshot(st) == before, "the state changed"
    return line[0]


def edited(src: Path, dst: Path, fn) -> Path:
    with fits.open(src) as hdul:
        hdul = fits.HDUList([h.copy() for h in hdul])
    fn(hdul)
    hdul.writeto(dst, overwrite=True, output_verify="silentfix")
    return dst


def card_edit(src: Path, dst: Path, hdu: str, key: str, raw_value: str) -> Path:
    """Replace one header card's value with raw text (bypassing astropy's checks)."""
    data = bytearray(src.read_bytes())
    start = 0 if hdu == "PRIMARY" else data.index(f"EXTNAME = '{hdu}".encode()) // 2880 * 2880
    i = data.index(key.ljust(8).encode() + b"=", start)
    data[i:i + 80] = f"{key.ljust(8)}= {raw_value}".ljust(80)[:80].encode()
    dst.write_bytes(bytes(data))
    return dst


# ----------------------------------------------------------------------------- files
def test_the_good_warp_is_accepted(base, tmp_path):
    """Sanity: the file that all the mutations start from is valid (in a copy of the state)."""
    st = tmp_path / "s"
    shutil.copytree(base[0], st)
    rc, out = ingest_out(st, base[1])
    assert rc == 0, out


def test_empty_file(base, tmp_path):
    p = tmp_path / "empty.fits"
    p.write_bytes(b"")
    assert_rejected(base, p, "empty")


def test_not_fits(base, tmp_path):
    p = tmp_path / "notfits.fits"
    p.write_text("hello, I am a text file\n" * 200)
    assert_rejected(base, p, "not a FITS file")


def test_truncated(base, tmp_path):
    data = base[1].read_bytes()
    for n, cut in enumerate((100, len(data) // 2, len(data) - 2880, len(data) - 7)):
        p = tmp_path / f"trunc{n}.fits"
        p.write_bytes(data[:cut])
        assert_rejected(base, p)


def test_missing_hdus(base, tmp_path):
    for name in ("IMAGE", "MASK", "VARIANCE", "PSF"):
        p = edited(base[1], tmp_path / f"no{name}.fits", lambda h, n=name: h.pop(h.index_of(n)))
        assert_rejected(base, p, f"missing HDU '{name}'")


def test_shape_mismatch(base, tmp_path):
    def fn(h):
        h["MASK"].data = h["MASK"].data[:-3]
    assert_rejected(base, edited(base[1], tmp_path / "shape.fits", fn), "shape")

    def fn3(h):
        h["IMAGE"].data = np.stack([h["IMAGE"].data] * 2)
    assert_rejected(base, edited(base[1], tmp_path / "img3d.fits", fn3))


def test_wrong_units(base, tmp_path):
    def fn(h):
        h["IMAGE"].header["BUNIT"] = "adu"
    assert_rejected(base, edited(base[1], tmp_path / "adu.fits", fn), "BUNIT", "nJy")

    def fn2(h):
        del h["IMAGE"].header["BUNIT"]
    assert_rejected(base, edited(base[1], tmp_path / "nounit.fits", fn2), "BUNIT")


@pytest.mark.parametrize("how", ["crpix-half", "rotated", "other-tract", "scale", "no-wcs",
                                 "ltv-disagrees"])
def test_wcs_off_the_tract_grid(base, tmp_path, how):
    def fn(h):
        hd = h["IMAGE"].header
        if how == "crpix-half":
            hd["CRPIX1"] += 0.5
        elif how == "rotated":
            c, s = np.cos(0.01), np.sin(0.01)
            cd = np.array([[hd["CD1_1"] if "CD1_1" in hd else hd["CDELT1"], 0], [0, 1]])
            scale = abs(TRACT.pixel_scale / 3600)
            for k in ("PC1_1", "PC1_2", "PC2_1", "PC2_2", "CD1_1", "CD1_2", "CD2_1", "CD2_2",
                      "CDELT1", "CDELT2"):
                hd.pop(k, None)
            hd["CD1_1"], hd["CD1_2"] = -scale * c, scale * s
            hd["CD2_1"], hd["CD2_2"] = scale * s, scale * c
            del cd
        elif how == "other-tract":
            hd["CRVAL1"] += 1.0
        elif how == "scale":
            for k in list(hd):
                if k.startswith(("CDELT", "CD1_", "CD2_")):
                    hd[k] = hd[k] * 1.001
        elif how == "no-wcs":
            for k in ("CTYPE1", "CTYPE2", "CRVAL1", "CRVAL2"):
                hd.pop(k, None)
        elif how == "ltv-disagrees":
            hd["LTV1"] -= 3
    line = assert_rejected(base, edited(base[1], tmp_path / f"wcs-{how}.fits", fn))
    assert "WCS" in line or "origin" in line


def test_nonfinite_good_pixels(base, tmp_path):
    for n, (plane, value) in enumerate((("IMAGE", np.nan), ("IMAGE", np.inf),
                                        ("VARIANCE", np.nan), ("VARIANCE", -np.inf))):
        def fn(h, plane=plane, value=value):
            h[plane].data[10, 12] = value
        p = edited(base[1], tmp_path / f"nonfinite{n}.fits", fn)
        assert_rejected(base, p, plane, "good pixel")


def test_nan_under_nodata_is_fine(base, tmp_path):
    """Not hostile: NaN where the mask says NO_DATA is allowed (SPEC §2)."""
    def fn(h):
        h["IMAGE"].data[0:5, 0:5] = np.nan
        h["VARIANCE"].data[0:5, 0:5] = np.inf
        h["MASK"].data[0:5, 0:5] |= 1 << 8
    st = tmp_path / "s"
    shutil.copytree(base[0], st)
    rc, out = ingest_out(st, edited(base[1], tmp_path / "nodata-nan.fits", fn))
    assert rc == 0, out


def test_zero_and_negative_variance(base, tmp_path):
    for n, v in enumerate((0.0, -1.0)):
        def fn(h, v=v):
            h["VARIANCE"].data[20, 20] = v
        assert_rejected(base, edited(base[1], tmp_path / f"var{n}.fits", fn), "VARIANCE",
                        "non-positive")

    def everywhere(h):
        h["VARIANCE"].data[:] = 0.0
    assert_rejected(base, edited(base[1], tmp_path / "var0all.fits", everywhere), "VARIANCE")


@pytest.mark.parametrize("hdu,key,value,needle", [
    ("PRIMARY", "VISIT", "-5", "VISIT"),
    ("PRIMARY", "VISIT", "'abc'", "VISIT"),
    ("PRIMARY", "VISIT", "1.5", "VISIT"),
    ("PRIMARY", "VISIT", "99999999999999999999999", "VISIT"),
    ("PRIMARY", "DETECTOR", "T", "DETECTOR"),
    ("PRIMARY", "TRACT", "77", "tract"),
    ("PRIMARY", "BAND", "'r/../../etc'", "BAND"),
    ("PRIMARY", "BAND", "''", "BAND"),
    ("PRIMARY", "BAND", "42", "BAND"),
    ("IMAGE", "LTV1", "0.5", "origin"),
    ("IMAGE", "LTV1", "1E+20", "origin"),
    ("IMAGE", "CRVAL1", "'east'", ""),
    ("IMAGE", "CRPIX2", "NaN", ""),
])
def test_absurd_header_values(base, tmp_path, hdu, key, value, needle):
    p = card_edit(base[1], tmp_path / "absurd.fits", hdu, key, value)
    assert_rejected(base, p, needle)


@pytest.mark.parametrize("weight", [-1.0, 0.0, 1e-320, 1e300])
def test_absurd_weight(base, tmp_path, weight):
    def fn(h):
        h[0].header["WEIGHT"] = weight
    line = assert_rejected(base, edited(base[1], tmp_path / "weight.fits", fn))
    assert "WEIGHT" in line or "weight" in line


@pytest.mark.parametrize("how", ["even", "sum0", "nan", "4d", "cube-no-pos"])
def test_broken_psf(base, tmp_path, how):
    def fn(h):
        psf = h["PSF"].data
        if how == "even":
            h["PSF"].data = psf[:-1, :-1]
        elif how == "sum0":
            h["PSF"].data = psf * 0
        elif how == "nan":
            psf[3, 3] = np.nan
        elif how == "4d":
            h["PSF"].data = psf[None, None]
        elif how == "cube-no-pos":
            h["PSF"].data = np.stack([psf, psf])
    assert_rejected(base, edited(base[1], tmp_path / f"psf-{how}.fits", fn), "PSF")


def test_huge_declared_size_in_a_tiny_file(base, tmp_path):
    for n, axes in enumerate(((10**9,), (10**9, 10**9))):
        p = base[1]
        for k, v in zip(("NAXIS1", "NAXIS2"), axes):
            p = card_edit(p, tmp_path / f"huge{n}.fits", "IMAGE", k, str(v))
        line = assert_rejected(base, p)
        assert "truncated" in line or "shape" in line


def test_huge_file_is_refused_before_reading(base, tmp_path):
    p = tmp_path / "huge.fits"
    with open(p, "wb") as f:
        f.write(base[1].read_bytes()[:2880])
        f.truncate(9 * 2**30)  # sparse: takes no space
    assert_rejected(base, p, "GiB")


def test_duplicate_visit_detector_with_different_content(base, tmp_path):
    st, _, warps = base
    def fn(h):
        h["IMAGE"].data[30, 30] += 1.0
    twin = edited(warps[0], tmp_path / "twin.fits", fn)
    assert_rejected(base, twin, "different content")
    # and within one run: two new files with the same id
    a = card_edit(base[1], tmp_path / "a.fits", "PRIMARY", "VISIT", "7777")
    b = edited(a, tmp_path / "b.fits", fn)
    s2 = tmp_path / "s2"
    shutil.copytree(st, s2)
    rc, out = ingest_out(s2, a, b)
    assert rc == 1 and "rejected" in out and "different content" in out


def test_exact_duplicate_is_not_a_rejection(base, tmp_path):
    st, _, warps = base
    copy = tmp_path / "copy.fits"
    shutil.copyfile(warps[0], copy)
    before = snapshot(st)
    rc, out = ingest_out(st, copy)
    assert rc == 0 and "1 already present" in out
    assert snapshot(st) == before


def test_directory_and_vanished_file(base, tmp_path):
    from streamcoadd.pipeline.ingest import LocalIngestor
    from streamcoadd.store.state import StateStore

    st = base[0]
    d = tmp_path / "dir.fits"
    d.mkdir()
    gone = tmp_path / "gone.fits"
    shutil.copyfile(base[1], gone)
    before = snapshot(st)
    with StateStore.open(st, write=True) as store:
        ing = LocalIngestor(store)
        o1 = ing.submit(d)
        gone.unlink()  # vanishes between the event (listing) and the read
        o2 = ing.submit(gone)
        assert ing.commit() == []
    assert o1.status == "rejected" and "directory" in o1.reason
    assert o2.status == "rejected" and "disappeared" in o2.reason
    assert snapshot(st) == before


def test_unreadable_permissions(base, tmp_path, monkeypatch):
    """As root, chmod 000 does not stop reading, so the PermissionError is injected at the
    read (the same code path); as another user the real chmod is tested too."""
    p = tmp_path / "secret.fits"
    shutil.copyfile(base[1], p)
    if os.geteuid() != 0:
        p.chmod(0)
        assert_rejected(base, p, "permission denied")
        p.chmod(0o644)
    real_open = open

    def guarded(f, *a, **k):
        if str(f) == str(p):
            raise PermissionError(13, "Permission denied", str(f))
        return real_open(f, *a, **k)

    monkeypatch.setattr(warp_mod, "open", guarded, raising=False)
    assert_rejected(base, p, "permission denied")


def test_unknown_mask_planes_only_and_no_planes(base, tmp_path):
    def fn(h):
        for k in [k for k in h["MASK"].header if k.startswith("MP_")]:
            del h["MASK"].header[k]
    assert_rejected(base, edited(base[1], tmp_path / "noplanes.fits", fn), "MP_")

    def fn2(h):
        h["MASK"].header["HIERARCH MP_WEIRD"] = 40
    assert_rejected(base, edited(base[1], tmp_path / "bit40.fits", fn2), "0..31")


def test_mask_not_integer(base, tmp_path):
    def fn(h):
        h["MASK"].data = h["MASK"].data.astype(np.float32)
    assert_rejected(base, edited(base[1], tmp_path / "fmask.fits", fn), "MASK")


# ----------------------------------------------------------------------------- daemon
def test_daemon_symlink_out_of_inbox_and_broken_files(base, tmp_path):
    """The daemon rejects (moves to rejected/ with NAME.reason) each broken file, keeps
    running, and does not follow a symlink that points out of the inbox."""
    import subprocess

    st = tmp_path / "s"
    shutil.copytree(base[0], st)
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    outside = tmp_path / "outside.fits"
    shutil.copyfile(base[1], outside)
    (inbox / "link.fits").symlink_to(outside)
    (inbox / "empty.fits").write_bytes(b"")
    (inbox / "text.fits").write_text("not fits")
    trunc = base[1].read_bytes()
    (inbox / "trunc.fits").write_bytes(trunc[: len(trunc) // 3])
    before = snapshot(st)
    p = subprocess.run([sys.executable, "-m", "streamcoadd", "watch", str(st), "--inbox",
                        str(inbox), "--done", str(tmp_path / "done"), "--rejected",
                        str(tmp_path / "rejected"), "--until-idle", "1"],
                       capture_output=True, text=True, timeout=120,
                       env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert "Traceback" not in p.stderr, p.stderr
    rejected = tmp_path / "rejected"
    for name in ("empty.fits", "text.fits", "trunc.fits"):
        assert (rejected / name).exists(), sorted(os.listdir(tmp_path))
        assert (rejected / (name + ".reason")).read_text().strip()
    assert outside.exists()  # the target outside the inbox was neither moved nor deleted
    assert (rejected / "link.fits").is_symlink()
    assert "out of the inbox" in (rejected / "link.fits.reason").read_text()
    assert snapshot(st) == before  # nothing folded, nothing recorded as seen
    assert not any(inbox.iterdir())


# ----------------------------------------------------------------------------- fuzz
hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

_VALID = None


def _valid_bytes() -> bytes:
    global _VALID
    if _VALID is None:
        import tempfile

        with tempfile.TemporaryDirectory() as d:
            p = torture.make_warp(Path(d) / "f.fits", TRACT, (45, 45), (60, 60), visit=9,
                                  detector=1, seed=9, bad_fraction=0.05)
            _VALID = p.read_bytes()
    return _VALID


VALUES = st.sampled_from(["-1", "0", "1E+300", "-1E+300", "NaN", "'abc'", "T", "F", "''",
                          "99999999999999999999", "1000000000", "3.5", "'nJy'", "'PHYSICAL'",
                          "'RA---TAN'", "'IMAGE'", "17", "-64", "2147483648", "(1, 2)"])


def _keys(data: bytes) -> list[tuple[int, bytes]]:
    """(offset, keyword) of every header card that has a value."""
    out = []
    for off in range(0, len(data), 80):
        card = data[off:off + 80]
        if card[8:10] == b"= " and card[:1].isalpha():
            out.append((off, card[:8]))
    return out


def _check(data: bytes):
    try:
        w = warp_mod.read_warp("fuzz.fits", SKYMAP, ("BAD", "SAT", "CR"), data=data)
    except WarpRejected as e:
        assert e.reason and "fuzz.fits" in str(e)
        return None
    assert isinstance(w, warp_mod.Warp)
    # An accepted file must also fold without anything but WarpRejected (what ingest and
    # the daemon do next, before touching the state).
    from streamcoadd.core.config import FoldConfig
    from streamcoadd.core.fold import (
        CellAccumulator,
        cell_input,
        fold_cell,
        prepare_warp,
    )

    cfg = FoldConfig()
    try:
        pw = prepare_warp(w, cfg)
    except WarpRejected:
        return None
    tract = SKYMAP.tract(w.id.tract)
    for patch in tract.patches_overlapping(w.box):
        for cell in tract.cells_overlapping(patch, w.box):
            cin = cell_input(pw, tract, cell, cfg)
            if cin is not None:
                acc = CellAccumulator(cell=cell, outer=tract.cell_outer_box(cell))
                fold_cell(acc, cin, pw, cfg)
                g = acc.active()
                assert np.isfinite(g.sum_wI).all() and np.isfinite(g.sum_w2var).all()
    return w


@settings(max_examples=250, deadline=None, suppress_health_check=list(HealthCheck))
@given(flips=st.lists(st.tuples(st.integers(0, 10**9), st.integers(1, 255)), min_size=1,
                      max_size=8))
@example(flips=[(0, 1), (0, 1), (479001600, 1)])  # found: an HDU astropy cannot classify
def test_fuzz_bit_flips(flips):
    data = bytearray(_valid_bytes())
    for pos, x in flips:
        data[pos % len(data)] ^= x
    _check(bytes(data))


@settings(max_examples=100, deadline=None, suppress_health_check=list(HealthCheck))
@given(cut=st.integers(0, 10**9), tail=st.binary(max_size=200))
def test_fuzz_truncations(cut, tail):
    data = _valid_bytes()
    _check(data[: cut % len(data)] + tail)


@settings(max_examples=400, deadline=None, suppress_health_check=list(HealthCheck))
@given(edits=st.lists(st.tuples(st.integers(0, 10**6), VALUES), min_size=1, max_size=4))
@example(edits=[(2, "1000000000")])  # found: NAXIS = 10**9 made astropy loop for hours
@example(edits=[(1, "'abc'"), (2, "1E+9")])
def test_fuzz_header_edits(edits):
    data = bytearray(_valid_bytes())
    keys = _keys(bytes(data))
    for i, value in edits:
        off, key = keys[i % len(keys)]
        data[off:off + 80] = (key + b"= " + value.encode()).ljust(80)[:80]
    _check(bytes(data))


@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
@given(blob=st.binary(max_size=4000))
def test_fuzz_garbage_with_a_fits_start(blob):
    _check(b"SIMPLE  =                    T" + blob)
    _check(blob)


def test_variance_in_absurd_units(base, tmp_path):
    """A variance plane of ~1e300 (or ~1e-300) gives a weight whose square under- or
    overflows float64 in the sums: rejected before anything is folded."""
    for n, v in enumerate((1e38, 1e-38)):
        def fn(h, v=v):
            h["VARIANCE"].data[:] = np.float32(v)
        assert_rejected(base, edited(base[1], tmp_path / f"units{n}.fits", fn), "VARIANCE")
