"""State format 1 -> 2: read compatibility, ``migrate`` equality and kill -9 at any instant.

The format-1 state is ``tests/data/v1_state.tar.gz``, written by the release before format 2
(``tests/data/make_v1_state.py``). Coadds are compared cell by cell (image, variance, mask,
PSF, masked fraction: bit-identical) and through ``streamcoadd finalize``'s FITS files."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest

import streamcoadd
from streamcoadd.analysis.verify import verify_state
from streamcoadd.store.migrate import migrate_state

ROOT = Path(__file__).resolve().parents[1]
FIXTURE = ROOT / "tests" / "data" / "v1_state.tar.gz"


@pytest.fixture
def v1_state(tmp_path) -> Path:
    with tarfile.open(FIXTURE) as tar:
        tar.extractall(tmp_path, filter="data")
    return tmp_path / "v1_state"


def coadds(state: Path) -> dict:
    """Every populated cell's coadd planes, by (cell, band)."""
    out = {}
    with streamcoadd.open_state(state, priority="normal") as st:
        for band in st.bands():
            for cell in st.populated_cells(band):
                c = st.cell(cell, band)
                out[(cell, band)] = {k: np.array(getattr(c, k)) for k in
                                     ("image", "variance", "mask", "psf", "maskfrac")}
                out[(cell, band)]["inputs"] = sorted(c.contributors["visit"].tolist())
    return out


def assert_same_coadds(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        for name in a[key]:
            x, y = a[key][name], b[key][name]
            if isinstance(x, list):
                assert x == y, (key, name)
            else:
                assert np.array_equal(x, y, equal_nan=True), (key, name)


def test_v1_state_is_read_unchanged(v1_state):
    meta = json.loads((v1_state / "state.json").read_text())
    assert meta["version"] == 1
    assert verify_state(v1_state) == []
    got = coadds(v1_state)
    assert len(got) >= 10
    # partial coverage is in the fixture (NO_DATA pixels inside some cell)
    assert any(np.isnan(c["image"]).any() for c in got.values())
    with pytest.raises(streamcoadd.core.errors.StateError, match="streamcoadd migrate"):
        from streamcoadd.store.state import StateStore

        StateStore.open(v1_state, write=True)


def _finalize(state: Path, out: Path) -> dict:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    p = subprocess.run([sys.executable, "-m", "streamcoadd", "finalize", str(state), "--out",
                        str(out)], env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout + p.stderr
    from astropy.io import fits

    data = {}
    for f in sorted(out.glob("*.fits")):
        with fits.open(f) as h:
            for i, hdu in enumerate(h):
                if hdu.data is None:
                    continue
                if hdu.is_image:
                    data[(f.name, i)] = np.array(hdu.data)
                else:
                    for col in hdu.columns.names:
                        data[(f.name, i, col)] = np.array(hdu.data[col])
    return data


def test_migrated_state_finalizes_to_the_same_coadd(v1_state, tmp_path):
    before_cells = coadds(v1_state)
    before = _finalize(v1_state, tmp_path / "before")
    r = migrate_state(v1_state)
    assert r.status == "migrated" and r.cells == len(before_cells)
    meta = json.loads((v1_state / "state.json").read_text())
    assert meta["version"] == 2 and meta["migrated_from"] == 1
    assert not (v1_state / "shards").exists()
    assert verify_state(v1_state) == []
    assert_same_coadds(before_cells, coadds(v1_state))
    after = _finalize(v1_state, tmp_path / "after")
    assert before.keys() <= after.keys()  # (format 2 may add contributor columns)
    for k in before:
        if before[k].dtype.kind == "f":
            assert np.array_equal(before[k], after[k], equal_nan=True), k
        else:
            assert np.array_equal(before[k], after[k]), k
    assert migrate_state(v1_state).status == "already"
    # a migrated state takes new warps
    from streamcoadd.store.state import StateStore

    StateStore.open(v1_state, write=True).close()


POINTS = ["migrate-cell-written:1", "migrate-cell-written:7", "migrate-manifest-tmp-written:2",
          "migrate-built", "migrate-state-json-tmp-written", "migrate-switched"]


def _run_migrate(state: Path, crash_at: str | None = None, kill_after: float | None = None):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    env.pop("STREAMCOADD_CRASH_AT", None)
    if crash_at:
        env["STREAMCOADD_CRASH_AT"] = crash_at
    code = "import sys; from streamcoadd.store.migrate import migrate_state; " \
           "migrate_state(sys.argv[1])"
    p = subprocess.Popen([sys.executable, "-c", code, str(state)], env=env)
    if kill_after is not None:
        time.sleep(kill_after)
        p.send_signal(signal.SIGKILL)
    return p.wait(timeout=300)


@pytest.mark.parametrize("how", POINTS + ["random:0", "random:1", "random:2"])
def test_kill_9_during_migration_leaves_either_version(v1_state, how):
    ref = coadds(v1_state)
    if how.startswith("random"):
        rng = random.Random(int(how.split(":")[1]))
        rc = _run_migrate(v1_state, kill_after=rng.uniform(0.3, 2.5))
    else:
        rc = _run_migrate(v1_state, crash_at=how)
        assert rc == -signal.SIGKILL
    version = json.loads((v1_state / "state.json").read_text())["version"]
    assert version in (1, 2)
    problems = verify_state(v1_state)
    assert all(p.severity == "benign" for p in problems), problems
    assert_same_coadds(ref, coadds(v1_state))  # whole: either version, never a mix
    assert _run_migrate(v1_state) == 0  # finish it
    assert verify_state(v1_state) == []
    assert json.loads((v1_state / "state.json").read_text())["version"] == 2
    assert_same_coadds(ref, coadds(v1_state))
