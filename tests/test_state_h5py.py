"""Read a state with plain h5py / json / sqlite3 following ``docs/state-format.md`` only, and
check what is read against the independent reference (no streamcoadd code reads the state
here; streamcoadd is used only to run the CLI and, at the end, to cross-check open_state)."""

from __future__ import annotations

import hashlib
import json
import re
import sqlite3
import zlib
from collections import Counter
from pathlib import Path

import h5py
import numpy as np
import pytest
from common import ROOT, SKYMAP, SKYMAP_FILE, TRACT
from reference import close_rel, reference_coadd, run_cli
from warpgen import make_warp, stack_warp_set, write_broken

from streamcoadd.core.config import FoldConfig
from streamcoadd.core.skymap import Box, CellId, PatchId

DOC = ROOT / "docs" / "state-format.md"


class Cell:
    """A version-3 cell file decoded following the document's tables only."""

    def __init__(self, h: h5py.File):
        self.h = h
        blob, _, crc = h["header"][()].tobytes().rpartition(b"\n")
        assert zlib.crc32(blob) == int(crc, 16)
        self.header = json.loads(blob)
        assert not h.attrs and all(not h[k].attrs for k in h), "version 3 has no attributes"
        for name, want in self.header["crc32"].items():
            assert zlib.crc32(np.ascontiguousarray(h[name][()])) == want, name
        ob = self.header["outer_box"]
        self.shape = (ob[3] - ob[1], ob[2] - ob[0])
        self.encodings = Counter()

    def plane(self, group: str, name: str):
        for i, (lname, kind, enc, arg) in enumerate(self.header["groups"][group]["layers"]):
            if lname != name:
                continue
            self.encodings[enc] += 1
            if enc == "dense":
                return self.h[f"{group}.{kind}"][arg]
            if enc == "constant":
                return np.full(self.shape, arg, kind)
            assert enc == "sparse", enc
            rows = self.h[f"{group}.sparse"][()]
            rows = rows[rows["layer"] == i]
            out = np.zeros(self.shape, kind)
            out.flat[rows["index"]] = rows["value"]
            return out
        return None

    def sum_w(self, group: str) -> np.ndarray:
        wp = self.plane(group, "w_partial")
        return self.header["groups"][group]["w_full"] + (np.zeros(self.shape) if wp is None else wp)

    def zero_or(self, group: str, name: str, dtype=np.float64) -> np.ndarray:
        p = self.plane(group, name)
        return np.zeros(self.shape, dtype) if p is None else p

    def mask_or(self, group: str) -> np.ndarray:
        out = np.zeros(self.shape, np.int64)
        for lname, *_ in self.header["groups"][group]["layers"]:
            if lname.startswith("bit_counts/"):
                out |= (self.plane(group, lname) > 0).astype(np.int64) << int(lname[11:])
        return out


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """A state with two bands, noise realizations, fallback inputs, a no-cell warp and a
    rejected file; plus the reference for it."""
    tmp = tmp_path_factory.mktemp("h5state")
    cfg_file = tmp / "fold.toml"
    cfg_file.write_text("[fold]\nnoise_realizations = 1\n")
    st = tmp / "state"
    run_cli("init", st, "--skymap", SKYMAP_FILE, "--config", cfg_file)
    region = Box(60, 110, 330, 330)  # covers patch 0 cell (3, 4) and crosses into patch 1
    # cell (5, 5): every r input is heavily masked -> a fallback-only cell;
    # cell (4, 5): two of the r inputs are -> unused fallback inputs next to good ones
    fb_only = TRACT.cell_inner_box(CellId(PatchId(0, 0, 0), 5, 5)).grown(2)
    fb_some = TRACT.cell_inner_box(CellId(PatchId(0, 0, 0), 4, 5)).grown(2)
    paths = stack_warp_set(tmp / "in", TRACT, 6, seed=21, region=region, band="r",
                           noise_realizations=1, coverage_choices=("full", "rotated"),
                           heavy_mask=[fb_only], heavy_fraction=0.75)
    paths += stack_warp_set(tmp / "in", TRACT, 2, seed=22, region=region, band="r",
                            visit0=300, noise_realizations=1, heavy_mask=[fb_only, fb_some],
                            heavy_fraction=0.8, coverage_choices=("full",))
    paths += stack_warp_set(tmp / "in", TRACT, 3, seed=23, region=region, band="i",
                            visit0=700, noise_realizations=1)
    nocell = make_warp(tmp / "in" / "tiny.fits", TRACT, visit=900, detector=0, xy0=(5, 5),
                       shape=(30, 30), noise_realizations=1)
    write_broken(tmp / "in", TRACT, "bunit_wrong")
    out = run_cli("ingest", st, "--quiet", tmp / "in", check=1)
    assert "11 folded" in out.stdout and "1 valid but covering no cell" in out.stdout, out.stdout
    cfg = FoldConfig(noise_realizations=1)
    ref = reference_coadd(paths + [nocell], SKYMAP, cfg)
    return st, ref, paths, nocell


def _manifests(st: Path):
    out = {}
    for m in sorted((st / "shards").glob("t*/p*/*/manifest.json")):
        out[m.parent] = json.loads(m.read_text())
    return out


def _geometry_from_state_json(meta, patch_xy, cell_xy):
    """Cell boxes from state.json alone, by the formulas of docs/state-format.md."""
    c = meta["skymap"]["cells"]
    inner, border = c["inner"], c["border"]
    P = inner * c["cells_per_patch_inner"]
    grow = inner * c["cells_in_patch_border"] + border
    px0, py0 = patch_xy[0] * P - grow, patch_xy[1] * P - grow
    x0 = px0 + border + cell_xy[0] * inner
    y0 = py0 + border + cell_xy[1] * inner
    ib = (x0, y0, x0 + inner, y0 + inner)
    ob = (x0 - border, y0 - border, x0 + inner + border, y0 + inner + border)
    return ib, ob


def test_doc_exists_and_is_versioned():
    text = DOC.read_text()
    assert re.search(r"version", text, re.I)
    for word in ("manifest.json", "sum_w", "sum_wI", "sum_w2var", "psf_sum", "contributors",
                 "h5py"):
        assert word in text, word


def test_state_json(built):
    st, *_ = built
    meta = json.loads((st / "state.json").read_text())
    assert meta["format"] == "streamcoadd-state" and meta["version"] == 2
    assert meta["fold"]["noise_realizations"] == 1
    assert meta["skymap"]["cells"]["inner"] == SKYMAP.cells.inner


def test_every_cell_read_with_plain_h5py_matches_reference(built):
    st, ref, paths, _ = built
    meta = json.loads((st / "state.json").read_text())
    K = meta["fold"]["noise_realizations"]
    P = meta["fold"]["psf_size"]
    seen = set()
    encodings = Counter()
    hashes = {hashlib.sha256(Path(p).read_bytes()).hexdigest(): p for p in paths}
    for shard, man in _manifests(st).items():
        assert man["format"] == "streamcoadd-shard" and man["version"] == 2
        tract, (px, py), band = man["tract"], man["patch"], man["band"]
        assert shard.name == band and shard.parent.name == f"p{px}-{py}"
        for key, gen in man["cells"].items():
            cx, cy = (int(v) for v in key.split("-"))
            f = shard / f"c{cx}-{cy}.g{gen}.h5"
            cid = CellId(PatchId(tract, px, py), cx, cy)
            rc = ref[(cid, band)]
            seen.add((cid, band))
            with h5py.File(f, "r", locking=False) as h:
                c = Cell(h)
                a = c.header
                assert a["format"] == "streamcoadd-cell" and a["version"] == 3
                assert a["tract"] == tract and tuple(a["patch"]) == (px, py)
                assert tuple(a["cell"]) == (cx, cy) and a["band"] == band
                assert a["generation"] == gen
                ib, ob = _geometry_from_state_json(meta, (px, py), (cx, cy))
                assert tuple(a["inner_box"]) == ib and tuple(a["outer_box"]) == ob
                rb = rc.outer_box
                assert ob == (rb.x0, rb.y0, rb.x1, rb.y1)
                active = a["active_group"]
                assert active == ("fallback" if rc.fallback else "good")
                assert set(a["groups"]) <= {"good", "fallback"}
                g = a["groups"][active]
                H, W = rc.outer_box.shape
                assert h[f"{active}.psf"].shape == (P, P)
                assert g["n_noise"] == K
                clean = (rc.sum_w > 0) & ~rc.interpolated
                sum_w = c.sum_w(active)
                close_rel(sum_w, rc.sum_w, 1e-10, f"{cid} sum_w")
                close_rel(c.zero_or(active, "interp"), rc.sum_w_interp, 1e-10, f"{cid} interp")
                close_rel(c.plane(active, "sum_wI")[clean], rc.sum_wI[clean], 1e-10, f"{cid} wI")
                close_rel(c.plane(active, "sum_w2var")[clean], rc.sum_w2var[clean], 1e-10,
                          f"{cid} w2var")
                close_rel(c.plane(active, "noise/0")[clean], rc.noise_sums[0][clean], 1e-10,
                          f"{cid} noise")
                psf_sum = h[f"{active}.psf"][()]
                close_rel(psf_sum, rc.psf_sum, 1e-10, f"{cid} psf_sum")
                close_rel(float(g["psf_w"]), rc.psf_w, 1e-10, f"{cid} psf_w")
                # integer counts: inputs with data exactly where sum_w > 0
                n_data = g["n_full"] + c.zero_or(active, "n_partial", np.int32)
                assert g["counts"] == "exact"
                assert np.array_equal(n_data > 0, rc.sum_w > 0), cid
                assert np.array_equal(c.zero_or(active, "n_interp", np.int32) > 0,
                                      rc.sum_w_interp > 0), cid
                with np.errstate(invalid="ignore", divide="ignore"):
                    image = c.plane(active, "sum_wI") / sum_w
                close_rel(image[clean], rc.image[clean], 1e-6, f"{cid} image")
                close_rel(psf_sum / g["psf_w"], rc.psf, 1e-6, f"{cid} psf")
                mor = c.mask_or(active)
                assert np.array_equal(mor[rc.sum_w > 0], rc.mask_or[rc.sum_w > 0])
                sat = c.plane(active, "planes/SAT")
                if sat is not None:
                    close_rel(sat, rc.rejected_weight["SAT"], 1e-10, "SAT")
                else:
                    assert not rc.rejected_weight["SAT"].any()
                encodings.update(c.encodings)
                con = h[f"{active}.contributors"][()]
                assert len(con) == g["n_contributors"]
                assert sorted(zip(con["visit"].tolist(), con["detector"].tolist())) == rc.used
                verts = h[f"{active}.footprints"][()]
                assert verts.shape == (int(con["footprint_n"].sum()), 2)
                for row in con:
                    hsh = row["content_hash"].decode()
                    assert hsh in hashes, "content_hash is the sha256 of the warp file"
                    assert hsh in man["warps"]
                    assert man["warps"][hsh] == [int(row["visit"]), int(row["detector"])]
                byid = {(i.visit, i.detector): i for i in rc.inputs}
                for row in con:
                    r = byid[(int(row["visit"]), int(row["detector"]))]
                    assert abs(row["weight"] - r.weight) <= 1e-12 * r.weight
                    assert 0.9 <= row["psf_sum"] <= 1.1
                # the other group, if any, holds exactly the unused candidates
                unused = sorted(set(ref.candidates[(cid, band)]) - set(rc.used))
                other = "good" if active == "fallback" else "fallback"
                if unused:
                    oc = h[f"{other}.contributors"][()]
                    assert sorted(zip(oc["visit"].tolist(), oc["detector"].tolist())) == unused
                else:
                    assert other not in a["groups"]
    assert seen == set(ref), "manifests must list exactly the populated cells"
    assert {"dense", "sparse"} <= set(encodings), encodings
    assert any(rc.fallback for rc in ref.values()), "fixture should have a fallback cell"
    assert any(set(ref.candidates[k]) != set(rc.used) for k, rc in ref.items()), \
        "fixture should have a cell whose fallback inputs are unused"


def test_manifest_warps_are_the_folded_warps(built):
    st, ref, paths, _ = built
    folded = {}
    for (cid, band), cands in ref.candidates.items():
        folded.setdefault((cid.patch, band), set()).update(cands)
    for shard, man in _manifests(st).items():
        key = (PatchId(man["tract"], *man["patch"]), man["band"])
        assert {tuple(v) for v in man["warps"].values()} == folded[key], key


def test_ledger_with_sqlite3(built):
    st, ref, paths, nocell = built
    con = sqlite3.connect(f"file:{st / 'ledger.sqlite'}?mode=ro", uri=True)
    try:
        rows = con.execute("SELECT content_hash, tract, visit, detector, band, path, status, "
                           "n_cells FROM warps").fetchall()
        rej = con.execute("SELECT path, reason FROM rejections").fetchall()
    finally:
        con.close()
    by_path = {Path(r[5]).name: r for r in rows}
    assert len(rows) == len(paths) + 1
    for p in paths:
        r = by_path[Path(p).name]
        assert r[0] == hashlib.sha256(Path(p).read_bytes()).hexdigest()
        assert r[6] == "folded" and r[7] > 0
    assert by_path["tiny.fits"][6] == "no_cells"
    assert len(rej) == 1 and rej[0][0].endswith("broken_bunit_wrong.fits")
    assert "nJy" in rej[0][1] or "BUNIT" in rej[0][1]


def test_doc_example_runs(built):
    """The documentation's plain-h5py example, run on this state."""
    st, ref, *_ = built
    text = DOC.read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, re.S)
    code = next(b for b in blocks if "h5py.File" in b)
    code = code.replace("STATE", str(st))
    ns: dict = {}
    exec(compile(code, str(DOC), "exec"), ns)
    # whatever cell the example reads, its image/psf must be the reference's
    m = re.search(r"t(\d+)/p(\d+)-(\d+)/(\w+)", code)
    c = re.search(r'\["cells"\]\["(\d+)-(\d+)"\]', code)
    cid = CellId(PatchId(int(m.group(1)), int(m.group(2)), int(m.group(3))),
                 int(c.group(1)), int(c.group(2)))
    rc = ref[(cid, m.group(4))]
    clean = (rc.sum_w > 0) & ~rc.interpolated
    close_rel(ns["image"][clean], rc.image[clean], 1e-6, "doc example image")
    close_rel(ns["psf"], rc.psf, 1e-6, "doc example psf")
    assert sorted(set(np.asarray(ns["visits"]).tolist())) == sorted({v for v, _ in rc.used})


def test_open_state_agrees_with_h5py(built):
    import streamcoadd

    st, ref, *_ = built
    with streamcoadd.open_state(st) as s:
        assert sorted(s.bands()) == ["i", "r"]
        for (cid, band), rc in list(ref.items())[::3]:
            c = s.cell(cid, band)
            man = json.loads((st / "shards" / f"t{cid.patch.tract}" /
                              f"p{cid.patch.x}-{cid.patch.y}" / band / "manifest.json").read_text())
            gen = man["cells"][f"{cid.x}-{cid.y}"]
            f = st / "shards" / f"t{cid.patch.tract}" / f"p{cid.patch.x}-{cid.patch.y}" / band / \
                f"c{cid.x}-{cid.y}.g{gen}.h5"
            with h5py.File(f, "r", locking=False) as h:
                cf = Cell(h)
                active = cf.header["active_group"]
                assert np.array_equal(c.sums["sum_w"], cf.sum_w(active))
                assert np.array_equal(c.sums["sum_wI"], cf.plane(active, "sum_wI"))
            # the WCS of the cell maps outer-box pixel (0, 0) to tract pixel outer.x0, y0
            tw = TRACT.wcs()
            ra, dec = c.wcs.pixel_to_world_values(0, 0)
            x, y = tw.world_to_pixel_values(ra, dec)
            assert abs(x - c.outer_box.x0) < 1e-6 and abs(y - c.outer_box.y0) < 1e-6
