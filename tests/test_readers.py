"""Concurrent readers: a reader process loops over ``open_state(...).cell(...)`` while a
writer folds and commits; it must never see a torn cell nor raise, and it must not block
the writer. The writer's slowdown is measured and printed (not asserted: shared CI
machines are too noisy for a timing assertion; see docs/reliability.md)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torture
from common import ROOT

READER = r'''
import json, os, sys, time, traceback
from collections import Counter
import numpy as np
import streamcoadd

state, stop, out = sys.argv[1], sys.argv[2], sys.argv[3]
reads = passes = 0
errors = []
max_contributors = 0
while not os.path.exists(stop) or passes < 2:
    try:
        with streamcoadd.open_state(state) as st:
            for band in st.bands():
                for cid in st.populated_cells(band):
                    c = st.cell(cid, band)
                    if c is None:   # emptied since the listing (not in this test)
                        errors.append(f"{cid} {band}: listed but empty")
                        continue
                    reads += 1
                    s = c.sums
                    w = np.asarray(c.contributors["weight"], float)
                    max_contributors = max(max_contributors, len(w))
                    if not np.isclose(s["psf_w"], w.sum(), rtol=1e-9, atol=0):
                        errors.append(f"{cid} {band}: psf_w {s['psf_w']} != sum of weights {w.sum()}")
                    has = s["sum_w"] > 0
                    if not np.isfinite(c.image[has]).all():
                        errors.append(f"{cid} {band}: non-finite image where sum_w > 0")
                    if s["sum_w"].max() > w.sum() * (1 + 1e-9):
                        errors.append(f"{cid} {band}: sum_w exceeds the contributors' weight")
                    inner = c.inner(s["sum_w"])
                    # every input covers the whole inner box: sum_w there is the total weight
                    if not np.allclose(inner, w.sum(), rtol=1e-9):
                        errors.append(f"{cid} {band}: inner sum_w {inner.min()}..{inner.max()} "
                                      f"!= total weight {w.sum()}")
                    ids = Counter(zip(c.contributors["visit"], c.contributors["detector"]))
                    if any(n > 1 for n in ids.values()):
                        errors.append(f"{cid} {band}: duplicate contributor {ids}")
        passes += 1
    except Exception:
        errors.append(traceback.format_exc())
    if len(errors) > 20:
        break
json.dump({"reads": reads, "passes": passes, "errors": errors,
           "max_contributors": max_contributors}, open(out, "w"))
'''


def _env():
    return {**os.environ, "PYTHONPATH": str(ROOT)}


def _ingest(state, warps, commit_every=1):
    t0 = time.perf_counter()
    p = subprocess.run([sys.executable, "-m", "streamcoadd", "ingest", str(state),
                        *map(str, warps), "--commit-every", str(commit_every), "--quiet"],
                       capture_output=True, text=True, env=_env())
    assert p.returncode == 0, p.stdout + p.stderr
    return time.perf_counter() - t0


def _init(state):
    subprocess.run([sys.executable, "-m", "streamcoadd", "init", str(state), "--skymap",
                    str(torture.SKYMAP)], check=True, capture_output=True, env=_env())


def test_reader_never_sees_a_torn_cell(tmp_path):
    warps = torture.make_warp_set(tmp_path / "w", n=24, seed=31)
    # a first warp so that the reader has cells from the start
    alone, busy = tmp_path / "alone", tmp_path / "busy"
    for st in (alone, busy):
        _init(st)
        _ingest(st, warps[:1])
    t_alone = _ingest(alone, warps[1:])

    stop, out = tmp_path / "stop", tmp_path / "reader.json"
    reader = subprocess.Popen([sys.executable, "-c", READER, str(busy), str(stop), str(out)],
                              env=_env())
    try:
        time.sleep(1.0)
        t_busy = _ingest(busy, warps[1:])
    finally:
        stop.write_text("")
        reader.wait(timeout=120)
    res = json.loads(out.read_text())
    slowdown = t_busy / t_alone - 1
    print(f"\nwriter alone {t_alone:.2f} s, with a reader looping {t_busy:.2f} s "
          f"({slowdown:+.0%}); reader: {res['reads']} cell reads in {res['passes']} passes, "
          f"up to {res['max_contributors']} contributors")
    assert reader.returncode == 0
    assert res["errors"] == [], "\n".join(res["errors"][:5])
    assert res["reads"] > 50
    assert torture.compare_states(alone, busy) == []


def test_plain_h5py_reader_per_docs_while_writing(tmp_path):
    """The recipe of docs/state-format.md (manifest, then the named generation, opened with
    locking=False) is safe during commits when it re-reads the manifest if the file has
    just been replaced."""
    warps = torture.make_warp_set(tmp_path / "w", n=10, seed=32)
    st = tmp_path / "s"
    _init(st)
    _ingest(st, warps[:1])
    writer = subprocess.Popen([sys.executable, "-m", "streamcoadd", "ingest", str(st),
                               *map(str, warps[1:]), "--commit-every", "1", "--quiet"],
                              env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    import h5py
    import numpy as np

    reads = retries = 0
    while writer.poll() is None or reads < 20:
        for m in (st / "shards").glob("t*/p*/*/manifest.json"):
            for _ in range(50):
                cells = json.loads(m.read_text())["cells"]
                k, g = sorted(cells.items())[0]
                try:
                    with h5py.File(m.parent / f"c{k}.g{g}.h5", "r", locking=False) as f:
                        blob = f["header"][()].tobytes().rpartition(b"\n")[0]
                        header = json.loads(blob)
                        active = header["active_group"]
                        grp = header["groups"][active]
                        w = f[f"{active}.contributors"]["weight"]
                        assert np.isclose(grp["psf_w"], w.sum(), rtol=1e-9)
                        assert grp["w_full"] <= w.sum() * (1 + 1e-9)
                    reads += 1
                    break
                except FileNotFoundError:
                    retries += 1  # superseded between the two reads: read the manifest again
            else:
                pytest.fail("a cell generation kept disappearing")
    assert writer.returncode == 0, writer.stderr.read()
    print(f"\nplain h5py reader: {reads} reads, {retries} retries")


HOLDER = r'''
import sqlite3, sys, time, json, h5py
state, cell, ready = sys.argv[1], sys.argv[2], sys.argv[3]
f = h5py.File(cell, "r", locking=False)          # a generation that will be superseded
db = sqlite3.connect(f"file:{state}/ledger.sqlite?mode=ro", uri=True, isolation_level=None)
db.execute("BEGIN")
n = db.execute("SELECT count(*) FROM warps").fetchone()[0]   # an open read transaction
open(ready, "w").write(str(n))
time.sleep(600)
'''


def test_a_reader_holding_files_open_does_not_block_the_writer(tmp_path):
    """A reader that keeps a cell generation open and a ledger read transaction open
    forever: the writer must still commit (supersede that generation, write the ledger)."""
    warps = torture.make_warp_set(tmp_path / "w", n=8, seed=33)
    st = tmp_path / "s"
    _init(st)
    _ingest(st, warps[:3])
    m = sorted((st / "shards").glob("t*/p*/*/manifest.json"))[0]
    k, g = sorted(json.loads(m.read_text())["cells"].items())[0]
    ready = tmp_path / "ready"
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(st),
                               str(m.parent / f"c{k}.g{g}.h5"), str(ready)], env=_env())
    try:
        for _ in range(600):
            if ready.exists() or holder.poll() is not None:
                break
            time.sleep(0.05)
        assert ready.exists(), "holder did not start"
        # fold everything again into the same cells: supersedes the held generation
        p = subprocess.run([sys.executable, "-m", "streamcoadd", "ingest", str(st),
                            *map(str, warps[3:]), "--commit-every", "1", "--quiet"],
                           capture_output=True, text=True, env=_env(), timeout=120)
        assert p.returncode == 0, p.stdout + p.stderr
    finally:
        holder.kill()
        holder.wait()
    from streamcoadd.analysis.verify import verify_state

    assert verify_state(st) == []


HOLD_READER = r'''
import json, os, sys, time, h5py
import streamcoadd
state, ready, priority = sys.argv[1:4]
st = streamcoadd.open_state(state, **({} if priority == "-" else {"priority": priority}))
held = []
for band in st.bands():
    for p in st.patches(band):
        pv = st.patch(p, band)
        for c in pv.cells():
            c.image                                     # a whole read through the API
            f = h5py.File(c.path, "r", locking=False)   # then stay inside a read:
            g = f["good.f8"] if "good.f8" in f else f["fallback.f8"]  # the generation open,
            g[0, :1]                                    # a dataset half read
            held.append((str(c.path), f, g))
db = st.store.ledger.db
db.execute("BEGIN")
db.execute("SELECT count(*) FROM warps").fetchone()     # an open read transaction
json.dump({"held": [h[0] for h in held], "nice": os.getpriority(os.PRIO_PROCESS, 0),
           "policy": os.sched_getscheduler(0)},
          open(ready + ".tmp", "w"))
os.rename(ready + ".tmp", ready)
time.sleep(600)
'''


def test_readers_inside_a_read_do_not_block_the_daemon(tmp_path):
    """Reader processes sit inside reads (every current cell generation open, a dataset
    half read, a ledger read transaction open) while the daemon starts, folds, supersedes
    those very generations and commits: it never waits for them. A reader opened while no
    writer runs keeps its priority; one opened while the daemon holds the state lowers
    itself to nice 19 (priority "auto"), unless it asks for "normal". No timing asserts:
    the daemon must simply finish with everything durable while the readers still hold on."""
    from test_daemon import Daemon, wait_for

    warps = torture.make_warp_set(tmp_path / "w", n=10, seed=34)
    st, ref = tmp_path / "s", tmp_path / "ref"
    for s in (st, ref):
        _init(s)
    _ingest(ref, warps, commit_every=2)
    _ingest(st, warps[:4], commit_every=2)

    def hold(name, priority):
        ready = tmp_path / f"{name}.json"
        p = subprocess.Popen([sys.executable, "-c", HOLD_READER, str(st), str(ready), priority],
                             env=_env())
        return p, ready

    def wait_ready(p, ready):
        wait_for(lambda: ready.exists() or p.poll() is not None, 60, "holder did not start")
        assert p.poll() is None, "holder died"
        return json.loads(ready.read_text())

    holders = []
    d = None
    try:
        holders.append(hold("before", "-"))  # opened before the daemon exists
        before = wait_ready(*holders[-1])
        inbox = tmp_path / "box" / "inbox"
        inbox.mkdir(parents=True)
        d = Daemon(st, inbox, "--commit-every", "2", "--idle-commit", "0.1")
        d.wait_running()  # a reader holding the state open never delays the writer lock
        holders.append(hold("auto", "-"))
        holders.append(hold("normal", "normal"))
        auto, normal = wait_ready(*holders[-2]), wait_ready(*holders[-1])
        for w in warps[4:]:
            tmp = inbox / (w.name + ".tmp")
            tmp.write_bytes(w.read_bytes())
            os.rename(tmp, inbox / w.name)
        done = inbox.parent / "done"
        wait_for(lambda: done.exists() and len(list(done.iterdir())) == len(warps) - 4, 120,
                 lambda: f"daemon did not fold everything; log:\n{d.text()}")
        wait_for(lambda: (s := d.status()) and s["pending"] == 0 and s["counts"]["commits"], 30)
        assert all(p.poll() is None for p, _ in holders), "a reader died"
        d.signal(signal.SIGTERM)
        assert d.wait(60) == 0, d.text()
    finally:
        if d is not None:
            d.kill()
        for p, _ in holders:
            p.kill()
            p.wait()
    held = set(before["held"]) | set(auto["held"])
    superseded = [h for h in held if not Path(h).exists()]
    assert superseded, "the daemon did not replace any generation a reader held open"
    own = os.getpriority(os.PRIO_PROCESS, 0)
    assert before["nice"] == own          # no writer when it opened: untouched
    assert auto["nice"] == max(own, 19)   # opened while the daemon runs: lowest priority
    assert auto["policy"] == os.SCHED_IDLE and before["policy"] == normal["policy"] \
        == os.sched_getscheduler(0)
    assert normal["nice"] == own          # opted out
    from streamcoadd.analysis.verify import verify_state

    assert verify_state(st) == []
    assert torture.compare_states(ref, st) == []
