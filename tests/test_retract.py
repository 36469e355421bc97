"""Retraction equals a fresh fold of the remaining warps (real CLI, real state)."""

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import streamcoadd
from streamcoadd.core.masks import CANONICAL_PLANES
from streamcoadd.core.skymap import load_skymap
from streamcoadd.io.warp_writer import write_warp

ROOT = Path(__file__).resolve().parent.parent
SKYMAP = ROOT / "config" / "skymap-demo.toml"
BAD = 1 << CANONICAL_PLANES["BAD"]
DETECTED = 1 << CANONICAL_PLANES["DETECTED"]
NO_DATA = 1 << CANONICAL_PLANES["NO_DATA"]


def cli(*args, ok=True):
    r = subprocess.run([sys.executable, "-m", "streamcoadd", *map(str, args)], cwd=ROOT,
                       capture_output=True, text=True)
    if ok:
        assert r.returncode == 0, r.stdout + r.stderr
    return r


def make_warps(d: Path) -> list[Path]:
    """Visit 1: good everywhere; visit 2: heavily BAD-masked over the left patch cells
    (fallback there); visit 3: good, with DETECTED bits; visit 4: only covers part."""
    tract = load_skymap(SKYMAP).tract(0)
    rng = np.random.default_rng(7)
    yy, xx = np.mgrid[-7:8, -7:8]
    paths = []
    for visit, (x0, y0, w, h) in {1: (-40, -40, 330, 320), 2: (-40, -40, 330, 320),
                                  3: (150, -45, 200, 300), 4: (60, 60, 130, 140)}.items():
        img = rng.normal(5, 2, (h, w)).astype(np.float32)
        var = np.full((h, w), 2.0 + visit, np.float32)
        mask = np.zeros((h, w), np.int32)
        if visit == 2:
            mask[:, : w // 2] |= BAD * (rng.random((h, w // 2)) < 0.8)
        if visit == 3:
            mask[100:140, 100:160] |= DETECTED
            mask[:, 150] |= BAD
        if visit == 4:
            mask[:20, :] = NO_DATA
            img[:20, :] = np.nan
        s = 1.5 + 0.2 * visit
        psf = np.exp(-(xx**2 + yy**2) / (2 * s * s))
        paths.append(write_warp(d / f"v{visit}.fits", tract=tract, xy0=(x0, y0), image=img,
                                mask=mask, variance=var, psf=psf / psf.sum(), visit=visit,
                                detector=0, band="r"))
    return paths


def compare_states(a: Path, b: Path):
    sa, sb = streamcoadd.open_state(a), streamcoadd.open_state(b)
    cells = sb.populated_cells("r")
    assert sa.populated_cells("r") == cells
    assert cells
    for c in cells:
        x, y = sa.cell(c, "r"), sb.cell(c, "r")
        assert x.group == y.group, c
        assert sorted(x.contributors["visit"]) == sorted(y.contributors["visit"]), c
        for k in ("sum_w", "sum_wI", "sum_w2var", "sum_w_interp", "psf_sum"):
            scale = max(np.abs(y.sums[k]).max(), 1e-300)
            assert np.abs(x.sums[k] - y.sums[k]).max() <= 1e-10 * scale, (c, k)
        assert np.array_equal(x.mask, y.mask), c
    return cells


@pytest.mark.parametrize("retracted", [1, 3])
def test_retract_equals_fresh_fold(tmp_path, retracted):
    warps = make_warps(tmp_path)
    cli("init", tmp_path / "a", "--skymap", SKYMAP)
    cli("ingest", tmp_path / "a", *warps, "--quiet")
    before = streamcoadd.open_state(tmp_path / "a")
    groups = {c: before.cell(c, "r").group for c in before.populated_cells("r")}
    r = cli("retract", tmp_path / "a", "--visit", retracted, "--reason", "QA failed")
    assert "1 warp(s) retracted" in r.stdout
    cli("init", tmp_path / "b", "--skymap", SKYMAP)
    cli("ingest", tmp_path / "b", *[w for w in warps if w.name != f"v{retracted}.fits"], "--quiet")
    cells = compare_states(tmp_path / "a", tmp_path / "b")
    after = streamcoadd.open_state(tmp_path / "a")
    if retracted == 1:
        # retracting the only good input of the left cells hands them to the fallback input
        switched = [c for c in cells if groups[c] == "good" and after.cell(c, "r").group == "fallback"]
        assert switched
    events = after.store.ledger.events()
    assert events[-1][0] == "retract" and "QA failed" in events[-1][1]
    # Re-delivery is refused unless --allow-refold; then the state equals the original.
    r = cli("ingest", tmp_path / "a", warps[retracted - 1], "--quiet", ok=False)
    assert r.returncode == 1 and "retracted" in r.stdout
    cli("ingest", tmp_path / "a", warps[retracted - 1], "--quiet", "--allow-refold")
    cli("init", tmp_path / "c", "--skymap", SKYMAP)
    cli("ingest", tmp_path / "c", *warps, "--quiet")
    compare_states(tmp_path / "a", tmp_path / "c")


def test_retract_unknown_visit_and_missing_file(tmp_path):
    warps = make_warps(tmp_path)
    cli("init", tmp_path / "s", "--skymap", SKYMAP)
    cli("ingest", tmp_path / "s", *warps, "--quiet")
    r = cli("retract", tmp_path / "s", "--visit", 99, ok=False)
    assert r.returncode == 2 and "visit 99 is not in the state" in r.stderr
    moved = tmp_path / "elsewhere"
    moved.mkdir()
    warps[0].rename(moved / warps[0].name)
    r = cli("retract", tmp_path / "s", "--visit", 1, ok=False)
    assert r.returncode == 2 and "--search" in r.stderr and "Traceback" not in r.stderr
    cli("retract", tmp_path / "s", "--visit", 1, "--search", moved)
