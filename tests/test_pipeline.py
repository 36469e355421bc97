"""The ingest pipeline's parallel parts change nothing in the result: the warp loader thread
(``prefetch``), the forked cell-file writers (``commit_processes``) and the compact cell
encodings (constant / sparse planes). Real CLI processes, real HDF5, real SIGKILL."""

from __future__ import annotations

import gzip
import shutil
import signal
import sys
from pathlib import Path

import numpy as np
import pytest
from common import ROOT, SKYMAP, SKYMAP_FILE, TRACT
from reference import compare_cell, reference_coadd, run_cli
from test_order_split import assert_same_sums, sums_of
from warpgen import stack_warp_set, write_broken

import streamcoadd
from streamcoadd.core.skymap import Box


@pytest.fixture(scope="module")
def warps(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("pipeline")
    paths = stack_warp_set(tmp / "w", TRACT, 6, seed=91, region=Box(230, 180, 400, 350),
                           jitter=10, psf_grid_prob=0.5)
    # one gzipped copy of a seventh warp: its content hash is the hash of the stored bytes
    extra = stack_warp_set(tmp / "x", TRACT, 1, seed=92, region=Box(230, 180, 400, 350),
                           visit0=700)[0]
    gz = tmp / "w" / (extra.name + ".gz")
    gz.write_bytes(gzip.compress(extra.read_bytes()))
    broken = write_broken(tmp / "w", TRACT, "bunit_wrong")
    return tmp, [*paths[:3], broken, *paths[3:], gz], [*paths, extra]


def _ingest(tmp, name, files, *opts, check=None):
    st = tmp / name
    if st.exists():
        shutil.rmtree(st)
    run_cli("init", st, "--skymap", SKYMAP_FILE)
    p = run_cli("ingest", st, "--quiet", *opts, *files, check=check)
    return st, p


def test_prefetch_and_forked_commits_change_nothing(warps):
    tmp, files, good = warps
    serial, p1 = _ingest(tmp, "serial", files, "--prefetch", "0", "--commit-processes", "1")
    parallel, p2 = _ingest(tmp, "parallel", files, "--prefetch", "2", "--commit-processes", "3",
                           "--commit-every", "2")
    for p in (p1, p2):  # the broken file is rejected with its reason, the others folded
        assert p.returncode == 1, p.stderr
        assert "broken_bunit_wrong.fits" in p.stdout and "nJy" in p.stdout
        assert "7 folded" in p.stdout, p.stdout
    a, b = sums_of(serial), sums_of(parallel)
    assert_same_sums(b, a)
    for key in a:  # same arithmetic in the same order: bit-identical, not just close
        for name, arr in a[key].items():
            if isinstance(arr, np.ndarray):
                assert np.array_equal(arr, b[key][name]), (key, name)
    ref = reference_coadd(good, SKYMAP)
    with streamcoadd.open_state(parallel) as s:
        for (cid, band), rc in ref.items():
            compare_cell(s.cell(cid, band), rc)
    run_cli("verify", parallel)  # exit 0: every checksum and manifest agrees


def test_gzipped_warp_is_a_duplicate_of_itself_only(warps):
    """The content hash of a .fits.gz is that of the stored bytes, in the ledger, the
    manifests and the contributor lists alike, so a re-delivery is recognised."""
    tmp, files, _ = warps
    st, _ = _ingest(tmp, "gz", [files[-1]])
    p = run_cli("ingest", st, "--quiet", files[-1])
    assert "1 already present" in p.stdout, p.stdout
    import hashlib
    h = hashlib.sha256(files[-1].read_bytes()).hexdigest()
    with streamcoadd.open_state(st) as s:
        hashes = {str(x) for cid in s.populated_cells("r")
                  for x in s.cell(cid, "r").contributors["content_hash"]}
    assert hashes == {h}


def test_crash_in_a_forked_writer_kills_the_ingest_and_a_rerun_completes(warps):
    tmp, files, good = warps
    st = tmp / "crash"
    run_cli("init", st, "--skymap", SKYMAP_FILE)
    import os
    os.environ["STREAMCOADD_CRASH_AT"] = "cell-tmp-written:2"
    try:  # the 2nd cell file of each process: the child reaches it too, and takes the parent
        p = run_cli("ingest", st, "--quiet", "--commit-processes", "2", *good, check=None)
    finally:
        del os.environ["STREAMCOADD_CRASH_AT"]
    assert p.returncode == -signal.SIGKILL, (p.returncode, p.stderr)
    run_cli("ingest", st, "--quiet", *good)
    assert not list(st.rglob("*.tmp"))
    ref = reference_coadd(good, SKYMAP)
    with streamcoadd.open_state(st) as s:
        assert sorted(s.populated_cells("r")) == sorted(c for (c, b) in ref if b == "r")
        for (cid, band), rc in ref.items():
            compare_cell(s.cell(cid, band), rc)


def test_a_file_replaced_after_it_was_read_ahead_is_read_again(warps, tmp_path):
    """The loader reads the next file early; if a re-delivery replaces it before it is
    taken, what is folded must be the new content (never the stale bytes)."""
    import hashlib
    import os

    from streamcoadd.core.config import FoldConfig
    from streamcoadd.pipeline.loader import WarpLoader

    _, _, good = warps
    target = tmp_path / "next.fits"
    target.write_bytes(good[0].read_bytes())
    loader = WarpLoader(SKYMAP, FoldConfig(), depth=1)
    try:
        loader.prefetch(target)
        first = loader._ahead[str(target)].result()  # read ahead, done
        assert first.content_hash == hashlib.sha256(good[0].read_bytes()).hexdigest()
        tmp = tmp_path / "next.fits.tmp"
        tmp.write_bytes(good[1].read_bytes())
        os.replace(tmp, target)  # a re-delivery under the same name
        got = loader.take(target)
        assert got.content_hash == hashlib.sha256(good[1].read_bytes()).hexdigest()
        assert got.prepared.warp.id != first.prepared.warp.id
        # unchanged file: the read-ahead result itself is used
        loader.prefetch(good[2])
        ahead = loader._ahead[str(good[2])].result()
        assert loader.take(good[2]) is ahead
    finally:
        loader.close()


# ------------------------------------------------------------------ admission (issue 15)

def _ingestor_state(tmp, name):
    from streamcoadd.core.config import FoldConfig
    from streamcoadd.store.state import StateStore

    st = tmp / name
    if st.exists():
        shutil.rmtree(st)
    StateStore.create(st, SKYMAP, FoldConfig())
    return st


def test_in_batch_duplicate_waits_for_its_original(tmp_path):
    """A copy of a warp of the uncommitted batch is not acknowledged ('duplicate' means
    durable) before its original's commit: ``submit`` says pending, ``commit`` duplicate."""
    from warpgen import make_warp

    from streamcoadd.pipeline.ingest import LocalIngestor
    from streamcoadd.pipeline.outcome import Ingestor, OutcomeStatus
    from streamcoadd.store.state import StateStore

    a = make_warp(tmp_path / "a.fits", TRACT, visit=1, detector=0, xy0=(100, 100),
                  shape=(150, 150))
    copy = tmp_path / "copy.fits"
    shutil.copy(a, copy)
    st = _ingestor_state(tmp_path, "st")
    with StateStore.open(st, write=True) as store, LocalIngestor(store) as ing:
        assert isinstance(ing, Ingestor)
        assert ing.submit(a).status == OutcomeStatus.PENDING
        o = ing.submit(copy)
        assert o.status == OutcomeStatus.PENDING and "same content as" in o.reason
        assert ing.pending == 2
        assert store.ledger.get(o.content_hash) is None  # nothing durable yet
        done = {Path(x.path).name: x.status for x in ing.commit()}
        assert done == {"a.fits": "folded", "copy.fits": "duplicate"}
        assert ing.pending == 0
        # once durable, a further copy is a duplicate at once
        assert ing.submit(copy).status == OutcomeStatus.DUPLICATE


_CRASHING_INGEST = """
import sys
from streamcoadd.core.config import RunConfig
from streamcoadd.pipeline.ingest import LocalIngestor
from streamcoadd.store.state import StateStore
with StateStore.open(sys.argv[1], write=True) as store:
    ing = LocalIngestor(store, RunConfig(commit_processes=1, prefetch=0))
    print(ing.submit(sys.argv[2]).status, flush=True)
    ing.commit()
"""


def test_identity_held_by_a_half_committed_warp(tmp_path):
    """kill -9 after the first of a warp's two shard commits, before its ledger row: a
    different file with the same (visit, detector) that feeds only the other shard is
    refused until the first is replayed; the replay completes it in both shards."""
    import os
    import subprocess

    from warpgen import make_warp

    from streamcoadd.core.skymap import PatchId
    from streamcoadd.pipeline.ingest import LocalIngestor
    from streamcoadd.pipeline.outcome import OutcomeStatus
    from streamcoadd.store.state import StateStore

    # A feeds patches (0,0) and (1,0); B (same identity, other content) only (1,0)
    a = make_warp(tmp_path / "a.fits", TRACT, visit=5, detector=3, xy0=(150, 100),
                  shape=(150, 300), coverage="full")
    b = make_warp(tmp_path / "b.fits", TRACT, visit=5, detector=3, xy0=(420, 100),
                  shape=(150, 150), coverage="full", seed=77)
    st = _ingestor_state(tmp_path, "st")
    env = dict(os.environ, STREAMCOADD_CRASH_AT="manifest-committed:1",
               PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    p = subprocess.run([sys.executable, "-c", _CRASHING_INGEST, str(st), str(a)], env=env,
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == -signal.SIGKILL, p.stderr
    with StateStore.open(st, write=True) as store:
        held = [pt for pt, band in store.shard_keys() if store.load_manifest(pt, band).warps]
        assert len(held) == 1  # one shard committed A, the other not; no ledger row
        assert not store.ledger.warps()
        with LocalIngestor(store) as ing:
            ob = ing.submit(b)
            assert ob.status == OutcomeStatus.REJECTED, ob
            assert "deliver that file again first" in ob.reason
            oa = ing.submit(a)
            assert oa.status == OutcomeStatus.PENDING
            assert [o.status for o in ing.commit()] == [OutcomeStatus.FOLDED]
        m = {pt: set(store.load_manifest(pt, "r").warps)
             for pt in (PatchId(0, 0, 0), PatchId(0, 1, 0))}
        assert m[PatchId(0, 0, 0)] == m[PatchId(0, 1, 0)] == {oa.content_hash}
        # and B stays refused, now by the ledger
        with LocalIngestor(store) as ing:
            assert ing.submit(b).status == OutcomeStatus.REJECTED
