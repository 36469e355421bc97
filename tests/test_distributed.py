"""Scale-out on Dask distributed (streamcoadd.pipeline.dask_executor) on a LocalCluster of 2 workers.

Every test compares the distributed result with a single-process ``LocalIngestor`` run on the
same warps: per cell the same contributors (content hashes, per group) and the same sums
to 1e-10 relative; and the same ledger (status, cells, weight per warp; rejections).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

distributed = pytest.importorskip("distributed")

from streamcoadd.core.config import FoldConfig, RunConfig
from streamcoadd.core.errors import UserError
from streamcoadd.core.masks import CANONICAL_PLANES
from streamcoadd.core.skymap import CellId, PatchId, load_skymap
from streamcoadd.core.warp import file_hash
from streamcoadd.io.warp_writer import write_warp
from streamcoadd.pipeline import dask_cluster as C
from streamcoadd.pipeline import dask_executor as D
from streamcoadd.pipeline import dask_worker as W
from streamcoadd.pipeline.dask_dispatch import ShardDispatcher
from streamcoadd.pipeline.ingest import LocalIngestor
from streamcoadd.store.state import StateStore

ROOT = Path(__file__).resolve().parent.parent
SKYMAP = ROOT / "config" / "skymap-demo.toml"
BIT = {k: 1 << v for k, v in CANONICAL_PLANES.items()}


# ----------------------------------------------------------------------------- warps

def _psf(n=15, sigma=1.6, dx=0.0):
    y, x = np.mgrid[:n, :n] - n // 2
    p = np.exp(-((x - dx) ** 2 + y ** 2) / (2 * sigma ** 2))
    return p / p.sum()


def make_warps(d: Path, seed: int = 1) -> dict[str, Path]:
    """Warps on the demo skymap (2x2 patches of 8x8 cells of 50 px + 10 px border; patch
    (0,0) cell (i,j) inner x from -50+50i) spanning 1-4 patches, plus awkward ones."""
    tract = load_skymap(SKYMAP).tract(0)
    rng = np.random.default_rng(seed)
    d.mkdir(parents=True, exist_ok=True)
    out = {}

    def warp(name, x0, y0, w, h, visit, det, *, var=1.0, nodata=None, bad=None, nan_at=None,
             psf=None, psf_positions=None, band="r"):
        img = rng.normal(10.0, 1.0, (h, w)).astype(np.float32)
        variance = np.full((h, w), var, np.float32) * rng.uniform(0.9, 1.1, (h, w)).astype(np.float32)
        mask = np.zeros((h, w), np.int32)
        cr = rng.integers(0, h, 15), rng.integers(0, w, 15)
        mask[cr] |= BIT["CR"]
        mask[rng.integers(0, h, 5), rng.integers(0, w, 5)] |= BIT["DETECTED"]
        if nodata is not None:
            mask[nodata] |= BIT["NO_DATA"]
            img[nodata] = np.nan
        if bad is not None:
            mask[bad] |= BIT["BAD"]
        if nan_at is not None:
            img[nan_at] = np.nan
        out[name] = write_warp(d / f"{name}.fits", tract=tract, xy0=(x0, y0), image=img,
                               mask=mask, variance=variance,
                               psf=_psf() if psf is None else psf, psf_positions=psf_positions,
                               visit=visit, detector=det, band=band)

    warp("a4", 100, 100, 400, 300, 1001, 1)                       # 4 patches
    warp("b4", -40, 150, 300, 200, 1002, 2, var=2.0)               # 4 patches
    warp("c2", 250, -50, 300, 250, 1003, 3, var=0.5)               # 2 patches
    warp("d4", 50, 300, 200, 250, 1004, 4,                          # 4 patches, 2 without cells
         nodata=(slice(0, 60), slice(0, 200)))
    cube = np.stack([_psf(dx=-0.5), _psf(dx=0.5)])
    warp("e4", 0, 0, 600, 600, 1005, 5, var=1.5,                    # all 4 patches, NO_DATA hole
         nodata=(slice(200, 320), slice(350, 480)),
         psf=cube, psf_positions=np.array([[150.0, 300.0], [450.0, 300.0]]))
    warp("f2", 120, 120, 200, 300, 1006, 6,                         # fallback in many cells
         bad=(slice(0, 300), slice(0, 140)))
    warp("g0", 400, 400, 30, 30, 1007, 7)                           # touches a patch, no cell
    warp("h0", 3000, 3000, 40, 40, 1008, 8)                         # outside every patch
    warp("i3", 300, 250, 150, 120, 1009, 9, band="g")               # another band
    warp("nan", 200, 200, 200, 200, 1010, 10, nan_at=(50, 60))      # rejected by the reader
    shutil.copy(out["a4"], d / "a4copy.fits")                       # duplicate content
    out["a4copy"] = d / "a4copy.fits"
    warp("b4other", -40, 150, 300, 200, 1002, 2, var=3.0)           # same id as b4, other data
    data = out["c2"].read_bytes()
    (d / "trunc.fits").write_bytes(data[: len(data) * 2 // 3])     # truncated file
    out["trunc"] = d / "trunc.fits"
    return out


ORDER = ["a4", "b4", "c2", "d4", "e4", "f2", "g0", "h0", "i3", "nan", "a4copy", "b4other",
         "trunc"]


def new_state(path: Path) -> Path:
    StateStore.create(path, load_skymap(SKYMAP), FoldConfig())
    return path


def single_process(state: Path, files) -> dict[str, str]:
    with StateStore.open(state, write=True) as store:
        ing = LocalIngestor(store)
        status = {}
        for f in files:
            o = ing.submit(f)
            status[Path(o.path).stem] = o.status
        final = ing.commit()
        for o in final:
            status[Path(o.path).stem] = o.status
    assert_pixels(final)
    return status


def assert_pixels(outcomes) -> None:
    """Folded / no_cells outcomes carry the warp's IMAGE size (NAXIS1 x NAXIS2)."""
    from astropy.io import fits

    for o in outcomes:
        if o.status in ("folded", "no_cells"):
            h = fits.getheader(o.path, "IMAGE")
            assert o.pixels == h["NAXIS1"] * h["NAXIS2"] > 0, o


# ----------------------------------------------------------------------------- comparison

def snapshot(root: Path) -> dict:
    out = {}
    with StateStore.open(root) as st:
        for patch, band in st.shard_keys():
            m = st.load_manifest(patch, band)
            for cx, cy in m.cells:
                out[(patch, band, (cx, cy))] = st.read_cell(CellId(patch, cx, cy), band)[0]
            out[(patch, band, "warps")] = set(m.warps)
        ledger = {w.content_hash: (w.status, w.n_cells, round(w.weight, 9), Path(w.path).name)
                  for w in st.ledger.warps()}
        rejections = sorted(Path(p).name for p, _, _ in st.ledger.rejections())
    return {"cells": out, "ledger": ledger, "rejections": rejections}


def assert_same_state(a: Path, b: Path, rtol: float = 1e-10, skip_rejections=()) -> int:
    A, B = snapshot(a), snapshot(b)
    assert A["ledger"] == B["ledger"]
    assert [r for r in A["rejections"] if r not in skip_rejections] == \
        [r for r in B["rejections"] if r not in skip_rejections]
    assert A["cells"].keys() == B["cells"].keys()
    n = 0
    for key, x in A["cells"].items():
        y = B["cells"][key]
        if key[2] == "warps":
            assert x == y, key
            continue
        n += 1
        assert x.groups.keys() == y.groups.keys(), key
        assert x.active_group() == y.active_group(), key
        for g in x.groups:
            gx, gy = x.groups[g], y.groups[g]
            assert sorted(c.content_hash for c in gx.contributors) == \
                sorted(c.content_hash for c in gy.contributors), key
            for ds in ("sum_w", "sum_wI", "sum_w2var", "sum_w_interp", "psf_sum", "noise"):
                np.testing.assert_allclose(getattr(gx, ds), getattr(gy, ds), rtol=rtol,
                                           atol=0, err_msg=f"{key} {g} {ds}")
            assert gx.psf_w == pytest.approx(gy.psf_w, rel=rtol)
            np.testing.assert_array_equal(gx.mask_or, gy.mask_or)
            assert gx.bit_counts.keys() == gy.bit_counts.keys()
            for bit in gx.bit_counts:
                np.testing.assert_array_equal(gx.bit_counts[bit], gy.bit_counts[bit])
    return n


# ----------------------------------------------------------------------------- fixtures

@pytest.fixture(scope="module")
def client():
    import dask

    # Tests kill workers several times in a row; the LocalCluster must not give up on a
    # worker whose restart is slower than that timeout (it would close its nanny).
    dask.config.set({"distributed.deploy.lost-worker-timeout": "1h"})
    cluster = distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                                       dashboard_address=None, silence_logs=50)
    c = distributed.Client(cluster)
    c.run(lambda: __import__("streamcoadd.core.fold") and None)  # warm the imports
    yield c
    c.close()
    cluster.close()


@pytest.fixture(scope="module")
def warps(tmp_path_factory):
    return make_warps(tmp_path_factory.mktemp("warps"))


@pytest.fixture(scope="module")
def reference(tmp_path_factory, warps):
    """The single-process result of ingesting ORDER."""
    state = new_state(tmp_path_factory.mktemp("ref") / "state")
    status = single_process(state, [warps[k] for k in ORDER])
    return state, status


def _ready(client, n=2):
    client.wait_for_workers(n, timeout=60)
    client.run(lambda: __import__("streamcoadd.core.fold") and None)


# ----------------------------------------------------------------------------- tests

def test_same_as_single_process(client, warps, reference, tmp_path):
    ref, ref_status = reference
    assert ref_status == {"a4": "folded", "b4": "folded", "c2": "folded", "d4": "folded",
                          "e4": "folded", "f2": "folded", "g0": "no_cells", "h0": "no_cells",
                          "i3": "folded", "nan": "rejected", "a4copy": "duplicate",
                          "b4other": "rejected", "trunc": "rejected"}
    state = new_state(tmp_path / "state")
    run = D.run_distributed(state, [warps[k] for k in ORDER], client=client, batch=2)
    outcomes = run.outcomes
    status = {Path(o.path).stem: o.status for o in outcomes}
    assert status == ref_status
    assert len(outcomes) == len(ORDER)
    assert_pixels(outcomes)
    n = assert_same_state(ref, state)
    assert n > 100
    stats = run.stats
    assert len(stats.workers) == 2  # both workers folded
    # tasks grouping several shards, several commits per shard (batch=2), never two
    # tasks on one shard at once: no compare-and-swap conflict
    assert stats.tasks >= 2 and stats.shard_commits > stats.tasks
    assert stats.shard_commits > 10 and stats.conflict_retries == 0
    assert stats.warps_read <= 2 * 9  # 9 warps sent to workers, each read at most twice
    # a second run is a no-op: everything is a duplicate
    again = D.run_distributed(state, [warps[k] for k in ORDER[:6]], client=client)
    assert {o.status for o in again.outcomes} == {"duplicate"}
    assert_same_state(ref, state)


def test_task_commits_as_it_goes_within_its_memory(client, warps, reference, tmp_path):
    """A task takes all the waiting shards of its worker and folds warp by warp (each warp
    prepared once per worker); with a tiny cache it commits its shards after every warp
    (the local ingestor's rule), each under its lock with compare-and-swap: same state."""
    ref, ref_status = reference
    state = new_state(tmp_path / "state")
    run = D.run_distributed(state, [warps[k] for k in ORDER], client=client, batch=100,
                            run_config=RunConfig(cache_gb=1e-6))
    assert {Path(o.path).stem: o.status for o in run.outcomes} == ref_status
    n = assert_same_state(ref, state)
    stats = run.stats
    assert stats.conflict_retries == 0 and stats.present == 0
    assert stats.cells_written > n  # cells rewritten by the intermediate commits
    assert stats.warps_read <= 2 * 9  # each of the 9 warps sent: at most once per worker


def test_task_rerun_is_noop(client, warps, reference, tmp_path):
    """Dask may run a task twice: sequentially (lost result) or at the same time (a worker
    thought dead). Neither may fold a warp twice."""
    ref, _ = reference
    state = new_state(tmp_path / "state")
    good = [warps[k] for k in ["a4", "b4", "c2", "d4", "e4", "f2", "g0", "i3"]]
    D.run_distributed(state, good, client=client, batch=3)
    items = [(str(p), file_hash(p.read_bytes())) for p in good if p.stem != "i3"]
    key = (0, 0, 0, "r")
    before = (state / "shards/t0/p0-0/r/manifest.json").read_text()
    # the same task again, in this process and twice at once on the cluster
    r = W.fold_shard_batch(str(state), key, items)
    assert {x["status"] for x in r["results"]} <= {"present", "no_cells"}
    futs = [client.submit(W.fold_shard_batch, str(state), key, items, pure=False)
            for _ in range(2)]
    for f in futs:
        assert {x["status"] for x in f.result()["results"]} <= {"present", "no_cells"}
    assert (state / "shards/t0/p0-0/r/manifest.json").read_text() == before
    wrong = W.fold_shard_batch(str(state), (0, 0, 0, "g"), items[:1])  # band r into a g shard
    assert wrong["results"][0]["status"] == "misrouted"
    present = {x["hash"]: x["cells"] for x in r["results"] if x["status"] == "present"}
    with StateStore.open(state) as st:
        for h, cells in present.items():
            assert st.ledger.get(h).n_cells >= cells > 0

    # two copies of a task that has real work, started together on a fresh state:
    # one commits, the other hits the compare-and-swap, retries from disk, finds the hashes
    fresh = new_state(tmp_path / "fresh")
    futs = [client.submit(W.fold_shard_batch, str(fresh), key, items, pure=False)
            for _ in range(2)]
    res = [f.result() for f in futs]
    folded = [sum(x["status"] == "folded" for x in r["results"]) for r in res]
    assert sorted(folded)[0] == 0 and sorted(folded)[1] > 0
    with StateStore.open(fresh) as st:
        m = st.load_manifest(PatchId(0, 0, 0), "r")
        for cx, cy in m.cells:
            acc, _ = st.read_cell(CellId(PatchId(0, 0, 0), cx, cy), "r")
            hashes = [c.content_hash for g in acc.groups.values() for c in g.contributors]
            assert len(hashes) == len(set(hashes))  # nobody twice in a cell


@pytest.mark.parametrize("point", ["cells-durable", "manifest-committed"])
def test_worker_dies_in_commit(client, warps, reference, tmp_path, point):
    """A worker killed (SIGKILL) in the middle of a shard commit, before or after the
    manifest rename: Dask reruns the task elsewhere and the state is still exact."""
    ref, ref_status = reference
    _ready(client)
    victim = sorted(client.scheduler_info()["workers"])[0]
    spec = f"{point}:2"  # the victim SIGKILLs itself at its second shard commit
    client.run(lambda: os.environ.__setitem__("STREAMCOADD_CRASH_AT", spec), workers=[victim])
    assert client.run(lambda: os.environ.get("STREAMCOADD_CRASH_AT"))[victim] == spec
    try:
        state = new_state(tmp_path / "state")
        run = D.run_distributed(state, [warps[k] for k in ORDER], client=client, batch=2)
    finally:
        try:
            client.run(lambda: os.environ.pop("STREAMCOADD_CRASH_AT", None))
        except Exception:
            pass
    assert {Path(o.path).stem: o.status for o in run.outcomes} == ref_status
    assert_same_state(ref, state)
    stats = run.stats
    assert victim not in client.run(os.getpid)  # it died (the nanny starts a new one)
    if point == "manifest-committed":
        assert stats.present > 0  # the rerun found the committed warps and skipped them


def test_all_workers_killed_from_outside(client, warps, reference, tmp_path, monkeypatch):
    """kill -9 of every worker process while the run is going on (a batch allocation
    ending): the nannies start new workers; tasks left with no worker at all are sent
    again by the coordinator; the state is exact."""
    ref, ref_status = reference
    _ready(client)
    monkeypatch.setattr(ShardDispatcher, "rescue_interval", 1.0)
    pids = client.run(os.getpid)
    state = new_state(tmp_path / "state")
    result = {}

    def run():
        result["outcomes"] = D.run_distributed(state, [warps[k] for k in ORDER],
                                               client=client, batch=1).outcomes

    t = threading.Thread(target=run)
    t.start()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:  # wait until the first shard commit is on disk
        if list((state / "shards").glob("t0/p*/*/manifest.json")):
            break
        time.sleep(0.02)
    for pid in pids.values():
        os.kill(pid, signal.SIGKILL)
    t.join(120)
    assert not t.is_alive()
    assert {Path(o.path).stem: o.status for o in result["outcomes"]} == ref_status
    assert_same_state(ref, state)
    assert not set(client.run(os.getpid).values()) & set(pids.values())


def test_coordinator_crash_between_shards(client, warps, reference, tmp_path):
    """The coordinator died after some shard tasks committed and before the ledger row:
    the next run folds the remaining shards only, and records the full cell count. A file
    with the same visit+detector but other content is rejected before anything is sent."""
    ref, ref_status = reference
    state = new_state(tmp_path / "state")
    a4, b4 = warps["a4"], warps["b4"]
    for key in [(0, 0, 0, "r"), (0, 1, 1, "r")]:
        W.fold_shard_batch(str(state), key, [(str(a4), file_hash(a4.read_bytes())),
                                             (str(b4), file_hash(b4.read_bytes()))])
    # the ledger knows nothing of b4, the manifests do: b4other must be refused up front
    o = D.run_distributed(state, [warps["b4other"]], client=client).outcomes
    assert [x.status for x in o] == ["rejected"] and "different content" in o[0].reason
    with StateStore.open(state) as st:
        assert st.ledger.warps() == []
    run = D.run_distributed(state, [warps[k] for k in ORDER if k != "b4other"],
                            client=client, batch=2)
    status = {Path(x.path).stem: x.status for x in run.outcomes}
    assert status == {k: v for k, v in ref_status.items() if k != "b4other"}
    assert run.stats.present == 3  # a4 in 2 shards, b4 in 1
    assert_same_state(ref, state)


def _cli(*a, timeout=180):
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.pop("NOTIFY_SOCKET", None)
    return subprocess.run([sys.executable, "-m", "streamcoadd", *map(str, a)],
                          capture_output=True, text=True, env=env, timeout=timeout)


def test_cli_ingest_dask(client, warps, reference, tmp_path):
    """``streamcoadd ingest ... --dask ADDRESS`` against the running scheduler."""
    ref, _ = reference
    _ready(client)
    state = new_state(tmp_path / "state")
    p = _cli("ingest", state, *[warps[k] for k in ORDER], "--dask", client.scheduler.address,
             "--dask-batch", "3", "--quiet")
    assert p.returncode == 1, p.stderr  # three files are rejected
    assert "7 folded, 2 valid but covering no cell, 1 already present, 3 rejected, 0 failed" \
        in p.stdout, p.stdout
    assert "on Dask (2 worker process(es)" in p.stdout
    assert_same_state(ref, state)
    with pytest.raises(UserError, match="local:N"):
        C.connect("local:x")


def test_watch_dask(client, warps, reference, tmp_path):
    """``streamcoadd watch ... --dask ADDRESS``: the daemon folds on the cluster; warps leave
    the inbox (to done/ or rejected/) only once durable; same state as single-process."""
    ref, _ = reference
    _ready(client)
    state = new_state(tmp_path / "state")
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    names = [k for k in ORDER if k not in ("a4copy", "b4other")]  # no order-dependent pairs
    for k in names:
        shutil.copy(warps[k], inbox / f"{k}.fits.tmp")
        os.replace(inbox / f"{k}.fits.tmp", inbox / f"{k}.fits")
    p = _cli("watch", state, "--inbox", inbox, "--stable-seconds", "0.3", "--reconcile", "2",
             "--until-idle", "1.5", "--commit-every", "4", "--dask", client.scheduler.address)
    assert p.returncode == 0, p.stdout + p.stderr
    assert sorted(f.name for f in inbox.iterdir()) == []
    assert sorted(f.stem for f in (tmp_path / "done").iterdir()) == \
        sorted(k for k in names if k not in ("nan", "trunc"))
    assert sorted(f.name for f in (tmp_path / "rejected").iterdir()) == \
        ["nan.fits", "nan.fits.reason", "trunc.fits", "trunc.fits.reason"]
    assert_same_state(ref, state, skip_rejections={"b4other.fits"})


def test_concurrent_copies_conflict_and_retry(warps, reference, tmp_path, monkeypatch):
    """Two copies of one shard task fold at the same time (threads stand in for two
    workers): both load commit 0; the first commit wins, the second hits the compare-and-
    swap, drops its memory, reloads from disk and finds every warp present."""
    state = new_state(tmp_path / "state")
    names = ["a4", "b4", "d4", "e4", "f2"]
    items = [(str(warps[k]), file_hash(warps[k].read_bytes())) for k in names]
    barrier = threading.Barrier(2)
    real = W.fold_prepared
    first = threading.local()

    def fold_one(*a, **k):
        r = real(*a, **k)
        if not getattr(first, "done", False):
            first.done = True
            barrier.wait(10)  # both copies hold commit 0 with one warp folded in memory
        return r

    monkeypatch.setattr(W, "fold_prepared", fold_one)
    res = [None, None]
    threads = [threading.Thread(target=lambda i=i: res.__setitem__(
        i, W.fold_shard_batch(str(state), (0, 0, 0, "r"), items))) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    res.sort(key=lambda r: r["attempts"])
    assert [r["attempts"] for r in res] == [1, 2]
    assert [x["status"] for x in res[0]["results"]] == ["folded"] * 2 + ["no_cells"] + ["folded"] * 2
    assert [x["status"] for x in res[1]["results"]] == ["present"] * 2 + ["no_cells"] + ["present"] * 2
    assert [x["cells"] for x in res[0]["results"]] == [x["cells"] for x in res[1]["results"]]
    with StateStore.open(state) as st:
        m = st.load_manifest(PatchId(0, 0, 0), "r")
        assert m.commit == 1 and set(m.warps) == {h for k, (_, h) in zip(names, items)
                                                        if k != "d4"}


def test_in_batch_duplicate_waits_for_its_original(client, warps, tmp_path):
    """The coordinator does not acknowledge a copy of an in-flight warp before the
    original is durable in all its shards: pending at submit, duplicate at commit."""
    from streamcoadd.pipeline.outcome import Ingestor, OutcomeStatus
    from streamcoadd.store.state import StateStore

    _ready(client)
    state = new_state(tmp_path / "state")
    with StateStore.open(state, write=True) as store:
        ing = D.DistributedIngestor(store, RunConfig(commit_every=100), client)
        assert isinstance(ing, Ingestor)
        assert ing.submit(warps["a4"]).status == OutcomeStatus.PENDING
        o = ing.submit(warps["a4copy"])
        assert o.status == OutcomeStatus.PENDING and "same content as" in o.reason
        assert ing.pending == 2 and store.ledger.get(o.content_hash) is None
        done = {Path(x.path).stem: x.status for x in ing.commit()}
        assert done == {"a4": "folded", "a4copy": "duplicate"}
        assert ing.pending == 0 and not ing.take_failed()
        assert ing.submit(warps["a4copy"]).status == OutcomeStatus.DUPLICATE
        ing.close()
    run = D.run_distributed(state, [warps["a4"], warps["b4"]], client=client)
    assert [o.status for o in run.outcomes] == ["duplicate", "folded"]
    assert run.stats.tasks >= 1 and len(run.stats.workers) >= 1
