"""Scale-out on Dask distributed: one writer per state shard, one owner of the commit record.

``streamcoadd ingest STATE PATH... --dask ADDRESS`` (``ADDRESS`` a scheduler such as
``tcp://host:8786``, or ``local:N`` for a :class:`distributed.LocalCluster` of N
single-threaded worker processes). See ``docs/scale-out.md`` for the design, the cost model
and how to run on a cluster.

Roles
-----
*Coordinator* (this process, :class:`DistributedIngestor`): holds the state's writer lock
and is the only one to write the ledger. For each warp it reads the file once (content
hash) and its primary/IMAGE headers (identity, band, pixel box), checks duplicates and
"same visit+detector, other content" against the ledger, the run and the shard manifests,
and queues the warp on every shard (patch, band) its box touches.

*Workers* (:func:`fold_shards`, a Dask task): a task takes a few neighbouring shards
homed on one worker and their queued warps, goes through the warps one by one (each read
and prepared once, folded into each of its shards in the task), then commits every shard on
its own, under the shard's lock with compare-and-swap on the manifest's commit counter
(``StateStore(shard_locking=True)``); :func:`fold_shard_batch` is the same for one shard.
A shard is in at most one task in flight at any time (the coordinator keeps a queue per
shard and sends what is queued with the shard's next task once the previous one returned),
and many shards run in parallel.

A warp is *done* (ledger row written, outcome returned) only when every shard it feeds
has committed it, i.e. it is durable. Exactly-once holds under Dask's own behaviour:

- a task that runs twice (rerun after a lost result, a worker that was thought dead) finds
  the warp's hash in the shard manifest and skips it (status ``present``);
- two copies running at once: the second commit fails the compare-and-swap
  (``ShardConflict``), drops its work and retries from disk, where it finds the hashes;
- a worker that dies before the manifest rename leaves only debris (unnamed generations),
  removed under the shard lock by the next commit; Dask reruns the task elsewhere;
- if the coordinator dies, warps whose ledger row is missing are submitted again by the
  next run and shards that already hold them skip them.
"""

from __future__ import annotations

import io
import logging
import os
import random
import sys
import threading
import time
import uuid
import warnings
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

from streamcoadd.core.config import RunConfig
from streamcoadd.core.errors import UserError, WarpRejected
from streamcoadd.core.skymap import Box, PatchId
from streamcoadd.core.version import __version__
from streamcoadd.core.warp import WarpId, file_hash
from streamcoadd.io.warp_reader import pixel_origin as pixel_origin
from streamcoadd.io.warp_reader import read_bytes as read_bytes
from streamcoadd.io.warp_reader import read_warp
from streamcoadd.pipeline.ingest import (
    Outcome,
    fold_into_shard,
    ledger_duplicate,
    shard_inputs,
)
from streamcoadd.store.ledger import WarpRecord

log = logging.getLogger("streamcoadd.pipeline.dask_executor")

ShardKey = tuple  # (tract, px, py, band): plain values, cheap to send to workers

MAX_CONFLICT_ATTEMPTS = 8  # compare-and-swap retries of one task on one shard


# =============================================================================== workers

# (thread id, state root) -> (state.json identity, worker StateStore): one store per
# executor thread, so that a task's commit() only ever sees its own shard.
_stores: dict[tuple[int, str], tuple[tuple, object]] = {}
_prepared_lock = threading.Lock()
_prepared: "OrderedDict[str, tuple[object, int]]" = OrderedDict()  # hash -> (PreparedWarp, bytes)


_counters = {"warps_read": 0}


class _Changed(Exception):
    """The warp file's content is not the one the coordinator hashed."""


def _worker_store(root: str):
    """This thread's worker store of ``root`` (shard-locking mode), kept between tasks so
    that a shard's accumulators stay in memory when its next task lands on the same worker."""
    from streamcoadd.pipeline.memory import retain_freed_memory
    from streamcoadd.store.state import StateStore

    retain_freed_memory()  # workers allocate and free a warp's arrays again and again
    st = os.stat(os.path.join(root, "state.json"))
    ident = (st.st_dev, st.st_ino, st.st_mtime_ns)  # a state re-created at the same path
    key = (threading.get_ident(), root)
    cached = _stores.get(key)
    if cached is not None and cached[0] == ident:
        return cached[1]
    if cached is not None:
        cached[1].close()
    store = StateStore.open(root, write=True, shard_locking=True)
    _stores[key] = (ident, store)
    return store


def _fresh_shard(store, patch: PatchId, band: str):
    """The shard as committed on disk: a cached copy is kept only if nobody committed the
    shard since (manifest commit counter unchanged) and it holds no uncommitted work."""
    key = (patch, band)
    cached = store.shards.get(key)
    if cached is not None:
        manifest = store.read_manifest(patch, band)
        on_disk = int(manifest["commit"]) if manifest else 0
        if on_disk != cached.commit or cached.changed:
            del store.shards[key]
            cached = None
    return store.shard(patch, band), cached is not None


def _prepared_warp(path: str, h: str, store, cache_bytes: int):
    """Read, validate and prepare a warp once per worker process (LRU by bytes): a warp
    spanning several patches is folded by several shard tasks, often on the same worker."""
    from streamcoadd.core.fold import prepare_warp

    with _prepared_lock:
        hit = _prepared.get(h)
        if hit is not None:
            _prepared.move_to_end(h)
            return hit[0]
    _counters["warps_read"] += 1
    data = read_bytes(path)
    if file_hash(data) != h:
        raise _Changed()
    fold = store.fold
    warp = read_warp(path, store.skymap, fold.bad_planes, fold.noise_realizations, data=data,
                     content_hash=h)
    del data
    prepared = prepare_warp(warp, fold)
    arrays = [prepared.image, prepared.variance, prepared.valid, prepared.bad,
              prepared.or_mask, *prepared.noise, *prepared.planes.values(),
              warp.image, warp.mask, warp.variance, *warp.noise]
    nbytes = sum(a.nbytes for a in arrays)
    if cache_bytes > 0:
        with _prepared_lock:
            _prepared[h] = (prepared, nbytes)
            total = sum(n for _, n in _prepared.values())
            while _prepared and total > cache_bytes:
                _, (_, n) = _prepared.popitem(last=False)
                total -= n
    return prepared


def drop_worker_caches(root: str | None = None) -> None:
    """Forget the prepared warps and the cached shards (of ``root``, or of every state) of
    this worker process. Run on every worker with ``client.run`` at the end of an ingest
    (no task of it is running then), so that a long-lived cluster does not keep the memory."""
    with _prepared_lock:
        _prepared.clear()
    for (_, r), (_, store) in list(_stores.items()):
        if root is None or r == root:
            store.shards.clear()


def _prepare(path: str, h: str, store, cache_bytes: int):
    """(PreparedWarp, None), or (None, result fields) if the warp is rejected or changed."""
    try:
        return _prepared_warp(path, h, store, cache_bytes), None
    except WarpRejected as e:
        return None, {"status": "rejected", "reason": e.reason}
    except _Changed:
        return None, {"status": "changed", "reason": "the file changed while it was being "
                                                     "ingested (its content hash differs); "
                                                     "deliver it again"}


def _fold_prepared(store, shard, tract, path: str, h: str, prepared, failed) -> dict:
    """Fold one prepared warp into one shard (in memory); the result for that pair."""
    t0 = time.perf_counter()
    res = {"hash": h, "path": path, "status": "", "cells": 0, "weight": 0.0, "reason": "",
           "visit": None, "detector": None}
    if prepared is None:
        res.update(failed)
        return res
    w = prepared.warp
    res.update(visit=w.id.visit, detector=w.id.detector, weight=float(prepared.weight))
    vd = (w.id.visit, w.id.detector)
    if w.band != shard.band or w.id.tract != shard.patch.tract:
        res.update(status="misrouted", reason=f"{w.id} band {w.band} was sent to shard "
                                              f"{shard.patch} band {shard.band}")
    elif h in shard.warps or h in shard.pending_warps:
        # Durable in this shard already: a rerun of this task, or a replay after a crash.
        res.update(status="present",
                   cells=len(shard_inputs(prepared, tract, shard.patch, store.fold)))
    elif any(v == vd and k != h for k, v in (*shard.warps.items(), *shard.pending_warps.items())):
        res.update(status="conflict", reason=f"{w.id} is already in shard {shard.patch} band "
                                             f"{shard.band} with different content")
    else:
        inputs = shard_inputs(prepared, tract, shard.patch, store.fold)
        n = fold_into_shard(store, shard, inputs, prepared)
        res.update(status="folded" if n else "no_cells", cells=n)
    res["ms"] = (time.perf_counter() - t0) * 1e3
    return res


def _warp_order(warps: list[tuple[str, str]]) -> list[int]:
    """Warps this worker has prepared already first (an earlier task of the same batch):
    visiting a batch in a fixed order would make the LRU cache thrash. The fold order
    within a shard does not matter (sums; groups are order independent)."""
    with _prepared_lock:
        return sorted(range(len(warps)), key=lambda i: warps[i][1] not in _prepared)


def fold_shard_batch(root: str, shard_key: ShardKey, warps: list[tuple[str, str]],
                     cache_bytes: int = int(2e9), prepared_cache_bytes: int = int(1e9)) -> dict:
    """Dask task: fold ``warps`` ([(absolute path, sha256)]) into ONE shard of the state at
    ``root`` and commit it. Idempotent: a warp whose hash the shard manifest already lists
    is skipped (``present``). Returns ``{"shard", "results", "commit", ...}`` with one
    result dict per warp, in the order given (``status`` one of folded, no_cells, present,
    rejected, changed, conflict, misrouted)."""
    from streamcoadd.store.state import ShardConflict

    t0 = time.perf_counter()
    tract_id, px, py, band = shard_key
    patch = PatchId(tract_id, px, py)
    store = _worker_store(root)
    store.cache_bytes = cache_bytes
    tract = store.skymap.tract(tract_id)
    last: BaseException | None = None
    read0 = _counters["warps_read"]
    order = _warp_order(warps)
    for attempt in range(1, MAX_CONFLICT_ATTEMPTS + 1):
        shard, cached = _fresh_shard(store, patch, band)
        try:
            results: list = [None] * len(warps)  # in the order given
            for i in order:
                path, h = warps[i]
                prepared, failed = _prepare(path, h, store, prepared_cache_bytes)
                results[i] = _fold_prepared(store, shard, tract, path, h, prepared, failed)
            written = len(shard.dirty)
            if shard.changed:
                store.commit()  # only this shard is dirty in this thread's store
            return {"shard": shard_key, "results": results, "commit": shard.commit,
                    "cells_written": written,
                    "attempts": attempt, "pid": os.getpid(), "host": os.uname().nodename,
                    "seconds": time.perf_counter() - t0, "shard_cached": cached,
                    "warps_read": _counters["warps_read"] - read0}
        except (ShardConflict, FileNotFoundError) as e:
            # Another writer committed the shard meanwhile (a second copy of this task, or
            # a superseded generation vanished while we read it): start again from disk.
            store.shards.pop((patch, band), None)
            last = e
            time.sleep(random.uniform(0.01, 0.05) * attempt)
        except BaseException:
            store.shards.pop((patch, band), None)  # never let half-folded memory survive
            raise
    raise RuntimeError(f"shard {patch} band {band}: gave up after {MAX_CONFLICT_ATTEMPTS} "
                       f"compare-and-swap conflicts ({last})")


def fold_shards(root: str, groups: list[tuple[ShardKey, list[tuple[str, str]]]],
                cache_bytes: int = int(2e9), prepared_cache_bytes: int = int(1e9)) -> dict:
    """Dask task: fold warps into SEVERAL shards (neighbouring patches, all placed on this
    worker), warp by warp, so that a warp feeding several of them is read and prepared
    once; then commit each shard on its own (lock + compare-and-swap), exactly as
    :func:`fold_shard_batch` does for one. ``groups``: [(shard key, [(path, sha256)])].
    Returns ``{"shards": {shard key: <fold_shard_batch result>}, ...}``."""
    from streamcoadd.store.state import ShardConflict

    t0 = time.perf_counter()
    read0 = _counters["warps_read"]
    if len(groups) == 1:
        key, warps = groups[0]
        r = fold_shard_batch(root, key, warps, cache_bytes, prepared_cache_bytes)
        return {"shards": {key: r}, "pid": r["pid"], "host": r["host"],
                "seconds": time.perf_counter() - t0,
                "warps_read": _counters["warps_read"] - read0}
    store = _worker_store(root)
    store.cache_bytes = cache_bytes
    shards, cached, tracts = {}, {}, {}
    paths: dict[str, str] = {}
    targets: dict[str, list[ShardKey]] = {}  # warp -> its shards in this task, in order
    for key, warps in groups:
        for path, h in warps:
            paths.setdefault(h, path)
            targets.setdefault(h, []).append(key)
    hashes = list(paths)
    results: dict = {key: {} for key, _ in groups}
    out: dict = {}
    try:
        for key, _ in groups:
            t, px, py, band = key
            shards[key], cached[key] = _fresh_shard(store, PatchId(t, px, py), band)
            tracts[key] = store.skymap.tract(t)
        for i in _warp_order([(paths[h], h) for h in hashes]):
            h = hashes[i]
            prepared, failed = _prepare(paths[h], h, store, prepared_cache_bytes)
            for key in targets[h]:
                results[key][h] = _fold_prepared(store, shards[key], tracts[key], paths[h],
                                                 h, prepared, failed)
        redo = []
        for key, warps in groups:
            shard = shards[key]
            written = len(shard.dirty)
            try:
                if shard.changed:
                    store.commit_shard(shard)  # this shard only, under its lock, CAS
            except ShardConflict:
                store.shards.pop((shard.patch, shard.band), None)
                redo.append((key, warps))
                continue
            out[key] = {"shard": key, "results": [results[key][h] for _, h in warps],
                        "commit": shard.commit, "cells_written": written, "attempts": 1,
                        "shard_cached": cached[key], "warps_read": 0, "seconds": 0.0}
    except (ShardConflict, FileNotFoundError):
        # A superseded generation vanished while we read it (another writer committed):
        # drop what is not committed and do the remaining shards one by one.
        redo = [(key, warps) for key, warps in groups if key not in out]
        for key, _ in redo:
            store.shards.pop((PatchId(*key[:3]), key[3]), None)
    except BaseException:
        for key, _ in groups:
            if key not in out:  # never let half-folded memory survive
                store.shards.pop((PatchId(*key[:3]), key[3]), None)
        raise
    for key, warps in redo:
        r = fold_shard_batch(root, key, warps, cache_bytes, prepared_cache_bytes)
        r["attempts"] += 1
        out[key] = r
    store.trim_cache(store.cache_bytes)
    return {"shards": out, "pid": os.getpid(), "host": os.uname().nodename,
            "seconds": time.perf_counter() - t0, "warps_read": _counters["warps_read"] - read0}


# =============================================================================== coordinator

@dataclass
class _Item:
    """One accepted warp on its way through the shard tasks."""

    outcome: Outcome
    abspath: str
    shards: set
    results: dict = field(default_factory=dict)  # shard key -> result dict
    errors: dict = field(default_factory=dict)  # shard key -> error text


@dataclass
class _Probe:
    warp_id: WarpId
    band: str
    box: Box


def _probe(path: str, data: bytes, store) -> _Probe:
    """Identity, band and pixel box from the primary and IMAGE headers (cheap). Anything
    odd falls back to the full reader, whose rejection message is the reference one."""
    from astropy.io import fits

    from streamcoadd.io.warp_reader import gunzip as gunzip
    from streamcoadd.io.warp_reader import int_key as int_key

    try:
        if data[:2] == b"\x1f\x8b":  # .fits.gz: the hash is of the file as delivered
            data = gunzip(path, data)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with fits.open(io.BytesIO(data), memmap=False, lazy_load_hdus=True) as hdul:
                ph = hdul[0].header
                ih = hdul["IMAGE"].header
                wid = WarpId(int_key(path, ph, "TRACT"), int_key(path, ph, "VISIT"),
                             int_key(path, ph, "DETECTOR"))
                band = ph["BAND"].strip()
                if not band or len(band) > 32 or not band.replace("_", "").replace("-", "").isalnum():
                    raise ValueError("band")
                store.skymap.tract(wid.tract)
                if ih["NAXIS"] != 2:
                    raise ValueError("naxis")
                x0, y0 = pixel_origin(path, ih)
                return _Probe(wid, band, Box(x0, y0, x0 + int(ih["NAXIS1"]),
                                             y0 + int(ih["NAXIS2"])))
    except Exception:  # noqa: BLE001 - the full reader says precisely what is wrong
        fold = store.fold
        warp = read_warp(path, store.skymap, fold.bad_planes, fold.noise_realizations, data=data)
        return _Probe(warp.id, warp.band, warp.box)


def _contributing_patches(tract, box: Box, fold) -> list[PatchId]:
    """Patches with at least one cell the warp's pixel box *could* contribute to: the cell
    centre inside the box and enough of the inner box covered (``cell_input``'s necessary
    geometric conditions; whether the pixels there are valid is for the worker to see).
    A warp always overlaps more patch *outer* boxes than it can feed; skipping the others
    saves reading it on workers that would find nothing to fold."""
    out = []
    for patch in tract.patches_overlapping(box):
        for cell in tract.cells_overlapping(patch, box):
            cx, cy = tract.cell_centre(cell)
            if not (box.x0 <= cx < box.x1 and box.y0 <= cy < box.y1):
                continue
            inner = tract.cell_inner_box(cell)
            part = inner.intersection(box)
            # same form as cell_input's test, with covered pixels <= part's area
            if not part.empty and (part.width * part.height) / (inner.width * inner.height) \
                    >= fold.min_overlap_fraction:
                out.append(patch)
                break
    return out


class DistributedIngestor:
    """The coordinator. Same contract as :class:`streamcoadd.pipeline.ingest.Ingestor`
    (``submit``, ``commit``, ``needs_commit``, ``pending``), so the daemon can use either:
    ``submit`` returns ``pending``, ``duplicate`` or ``rejected``; ``commit`` waits until
    every pending warp is durable in all its shards and returns their final outcomes.

    In addition ``collect()`` returns, without waiting, the outcomes of warps that became
    durable meanwhile (for pipelined callers such as ``ingest --dask``), and ``failed``
    lists warps whose shard tasks failed for good (worker lost too often, I/O error): they
    are NOT done; their files must be delivered again (a rerun finishes them exactly once).

    Work goes out when a waiting shard has ``batch`` warps queued (default
    ``run.commit_every``), or on ``commit``: then all the waiting shards of that shard's
    home worker go as one task (at most ``max_shards`` of them, from ``run.cache_gb``),
    each with up to ``max_batch`` (default 4 x ``batch``) warps. A shard's queue grows while
    it is in a task, which amortizes its next commit.
    """

    rescue_interval = 5.0  # s between checks for tasks stranded on vanished workers
    result_timeout = 5.0  # s to fetch a finished task's result before looking again later

    def __init__(self, store, run: RunConfig = RunConfig(), client=None, *,
                 batch: int | None = None, max_batch: int | None = None, retries: int = 3,
                 prepared_cache_gb: float = 1.0, allow_refold: bool = False,
                 log_failures: bool = False, logger: logging.Logger | None = None,
                 heartbeat=None):
        if not store.write or store.shard_locking:
            raise ValueError("the coordinator needs the state opened by its single writer")
        if client is None:
            from distributed import get_client

            client = get_client()
        self.store = store
        self.run = run
        self.client = client
        self.root = str(Path(store.root).absolute())
        self.batch = max(1, batch or run.commit_every)
        self.max_batch = max(self.batch, max_batch or 4 * self.batch)
        self.retries = retries
        self.allow_refold = allow_refold  # fold again warps that were retracted
        self.log_failures = log_failures  # the daemon: failed warps are logged, not kept
        self.log = logger or log
        self.heartbeat = heartbeat  # called about every second while waiting for tasks
        self.cache_bytes = int(run.cache_gb * 1e9)
        self.prepared_cache_bytes = int(prepared_cache_gb * 1e9)
        self._items: dict[str, _Item] = {}  # by content hash: accepted, not yet final
        self._queues: dict[ShardKey, list[str]] = {}  # shard -> hashes waiting for a task
        self._busy: dict[ShardKey, object] = {}  # shard -> its one future in flight
        # future -> ([(shard, hashes)], worker it was placed on or None)
        self._tasks: dict[object, tuple[list[tuple[ShardKey, list[str]]], str | None]] = {}
        self._ids: dict[ShardKey, dict[tuple[int, int], set[str]]] = {}  # manifest identities
        self._home: dict[ShardKey, str] = {}  # shard -> worker that holds it in memory
        self._inflight: dict[str, int] = {}  # worker -> tasks placed there, not finished
        self._workers: dict[str, int] = {}  # live worker -> threads
        self._workers_at = -1e9
        g = store.skymap.cells
        cell_bytes = 8 * (5 + store.fold.noise_realizations) * g.outer ** 2
        # shards per task: their cells are all in memory at once (bounded by cache_gb)
        self.max_shards = max(1, int(self.cache_bytes // (cell_bytes * g.cells_per_patch ** 2)))
        self._rescue_at = time.monotonic()
        self._ready: list[Outcome] = []
        self._first_pending_at: float | None = None
        self._flushing = False
        self.failed: list[Outcome] = []
        # shard_cached: tasks that found their shard in the worker's memory (else its
        # cells are read from disk); warps_read: warps read and prepared by workers;
        # cells_written: cell generations committed
        self.stats = {"tasks": 0, "shard_commits": 0, "task_seconds": 0.0,
                      "conflict_retries": 0, "present": 0, "shard_cached": 0, "warps_read": 0,
                      "cells_written": 0, "rescued": 0, "workers": set()}

    # ------------------------------------------------------------------ Ingestor contract
    @property
    def pending(self) -> int:
        return len(self._items)

    def needs_commit(self) -> bool:
        if not self._items:
            return False
        return (len(self._items) >= self.run.commit_every
                or time.monotonic() - self._first_pending_at >= self.run.commit_interval)

    def submit(self, path, then=None) -> Outcome:
        """``then`` (the next file, for the local Ingestor's loader) is not used: workers
        read the warps."""
        t0 = time.perf_counter()
        path = str(path)
        try:
            outcome = self._submit(path)
        except WarpRejected as e:
            self.store.ledger.record_rejection(path, e.reason)
            outcome = Outcome(path, "rejected", reason=e.reason)
        outcome.ms = (time.perf_counter() - t0) * 1e3
        self._pump(block=False)
        return outcome

    def commit(self) -> list[Outcome]:
        """Send every queued warp and wait until all pending warps are final. Returns the
        outcomes (folded / no_cells) not returned by ``collect`` yet; failures go to
        ``failed``."""
        self._flushing = True
        try:
            while self._items:
                self._pump(block=True)
                if self._items and not self._tasks and not any(self._queues.values()):
                    raise RuntimeError(f"{len(self._items)} pending warp(s) with no shard "
                                       "task (a bug in the coordinator); they stay undone")
        finally:
            self._flushing = False
        return self.collect()

    def collect(self) -> list[Outcome]:
        """Outcomes of warps that became durable since the last call (no waiting)."""
        self._pump(block=False)
        out, self._ready = self._ready, []
        return out

    def wait_below(self, n: int) -> None:
        """Block until at most ``n`` warps are pending (back-pressure for callers that
        submit faster than the cluster folds)."""
        self._flushing = True  # do not hold back partial batches while we wait
        try:
            while len(self._items) > n:
                self._pump(block=True)
        finally:
            self._flushing = False

    def take_failed(self) -> list[Outcome]:
        out, self.failed = self.failed, []
        return out

    # ------------------------------------------------------------------ submit
    def _submit(self, path: str) -> Outcome:
        store = self.store
        data = read_bytes(path)
        h = file_hash(data)
        known = ledger_duplicate(store, path, h, self.allow_refold)
        if known is not None:
            return known
        if h in self._items:
            o = self._items[h].outcome
            return Outcome(path, "duplicate", reason=f"same content as {o.path}",
                           warp_id=o.warp_id, band=o.band, content_hash=h)
        p = _probe(path, data, store)
        del data
        wid = p.warp_id
        for r in store.ledger.find_id(wid.tract, wid.visit, wid.detector):
            if r.content_hash != h and r.status != "retracted":
                raise WarpRejected(path, f"{wid} was already folded from {r.path} with "
                                         "different content; retract it first if this file "
                                         "replaces it")
        for it in self._items.values():
            if it.outcome.warp_id == wid and it.outcome.content_hash != h:
                raise WarpRejected(path, f"{wid} is also in {it.outcome.path} with different content")
        tract = store.skymap.tract(wid.tract)
        keys = [(pt.tract, pt.x, pt.y, p.band)
                for pt in _contributing_patches(tract, p.box, store.fold)]
        for key in keys:
            other = self._manifest_ids(key).get((wid.visit, wid.detector), set()) - {h}
            if other:
                raise WarpRejected(path, f"{wid} is already in the state with different "
                                         "content; retract it first if this is a replacement")
        outcome = Outcome(path, "pending", warp_id=wid, band=p.band, content_hash=h)
        if not keys:
            # Touches no patch: validate it fully here (nobody else will), then it is seen.
            fold = store.fold
            warp = read_warp(path, store.skymap, fold.bad_planes, fold.noise_realizations)
            from streamcoadd.core.fold import prepare_warp

            outcome.weight = prepare_warp(warp, fold).weight
            self._finish([_Item(outcome, path, set())])
            return Outcome(path, "pending", warp_id=wid, band=p.band, content_hash=h)
        item = _Item(outcome, str(Path(path).absolute()), set(keys))
        if not self._items:
            self._first_pending_at = time.monotonic()
        self._items[h] = item
        for key in keys:
            self._queues.setdefault(key, []).append(h)
        return Outcome(path, "pending", warp_id=wid, band=p.band, content_hash=h)

    def _manifest_ids(self, key: ShardKey) -> dict[tuple[int, int], set[str]]:
        """(visit, detector) -> hashes in the shard's manifest, read once per run; the
        shard tasks of this run are the only writers, and their warps are added below."""
        ids = self._ids.get(key)
        if ids is None:
            ids = self._ids[key] = {}
            m = self.store.read_manifest(PatchId(*key[:3]), key[3])
            for h, (v, d) in (m or {}).get("warps", {}).items():
                ids.setdefault((int(v), int(d)), set()).add(h)
        return ids

    # ------------------------------------------------------------------ scheduling
    def _live_workers(self, force: bool = False) -> dict[str, int]:
        now = time.monotonic()
        if force or now - self._workers_at > 2.0:
            try:
                self._workers = dict(self.client.nthreads())
            except Exception:  # noqa: BLE001 - scheduler unreachable: keep the last view
                pass
            self._workers_at = now
        return self._workers

    def _dispatch(self) -> None:
        """Send work for idle shards. Shards are grouped by their home worker into one task
        per free worker thread (neighbouring patches: a warp feeding several of them is
        read once). Nothing goes out until some idle shard has ``batch`` warps queued (or
        the caller flushes); then every idle shard of that worker with queued warps goes
        along. A worker with a free thread and no shard of its own takes over half of the
        waiting shards of the busiest worker."""
        idle = [k for k, q in self._queues.items() if q and k not in self._busy]
        if not idle:
            return
        if not self._flushing and not any(len(self._queues[k]) >= self.batch for k in idle):
            return
        workers = self._live_workers()
        if not workers:  # no placement possible: one task per shard, Dask decides
            for key in idle:
                self._send([key], None)
            return
        by_worker: dict[str, list[ShardKey]] = {w: [] for w in workers}
        for key in idle:
            home = self._home.get(key)
            if home not in workers:
                home = self._home[key] = self._spatial_home(key, sorted(workers))
            by_worker[home].append(key)
        free = {w: workers[w] - self._inflight.get(w, 0) for w in workers}
        for w in sorted(workers, key=lambda w: -free[w]):
            if free[w] <= 0 or by_worker[w]:
                continue
            donor = max(by_worker, key=lambda v: sum(len(self._queues[k]) for k in by_worker[v]))
            keys = sorted(by_worker[donor], key=lambda k: (k[3], k[1], k[2]))
            if len(keys) < 2 and free[donor] > 0:
                continue
            take = keys[len(keys) // 2:] if len(keys) > 1 else keys
            by_worker[donor] = [k for k in by_worker[donor] if k not in take]
            by_worker[w] = take
            for k in take:
                self._home[k] = w
        for w, keys in by_worker.items():
            keys = sorted(keys, key=lambda k: (k[3], k[1], k[2]))
            while keys and free[w] > 0:
                if not self._flushing and not any(len(self._queues[k]) >= self.batch
                                                  for k in keys):
                    break  # this worker's shards keep filling until one has a batch
                chunk, keys = keys[:self.max_shards], keys[self.max_shards:]
                self._send(chunk, w)
                free[w] -= 1

    def _spatial_home(self, key: ShardKey, workers: list[str]) -> str:
        """A first home for a shard: the tract's patch grid cut into one contiguous block
        of patches per worker (column by column)."""
        t, x, y, _ = key
        nx, ny = self.store.skymap.tract(t).num_patches
        return workers[(x * ny + y) * len(workers) // (nx * ny)]

    def _send(self, keys: list[ShardKey], worker: str | None) -> None:
        groups = []
        for key in keys:
            queue = self._queues[key]
            hashes, self._queues[key] = queue[:self.max_batch], queue[self.max_batch:]
            groups.append((key, hashes))
        payload = [(key, [(self._items[h].abspath, h) for h in hashes]) for key, hashes in groups]
        name = "-".join(f"{k[1]}.{k[2]}{k[3]}" for k in keys[:4]) + ("..." if len(keys) > 4 else "")
        fut = self.client.submit(
            fold_shards, self.root, payload, self.cache_bytes, self.prepared_cache_bytes,
            key=f"streamcoadd-fold-{name}-{uuid.uuid4().hex[:12]}", pure=False,
            retries=self.retries,
            **({"workers": [worker], "allow_other_workers": True} if worker else {}))
        for key, _ in groups:
            self._busy[key] = fut
        self._tasks[fut] = (groups, worker)
        if worker is not None:
            self._inflight[worker] = self._inflight.get(worker, 0) + 1

    def _release(self, fut) -> list[tuple[ShardKey, list[str]]]:
        groups, worker = self._tasks.pop(fut)
        for key, _ in groups:
            del self._busy[key]
        if worker is not None:
            self._inflight[worker] = self._inflight.get(worker, 0) - 1
        return groups

    def _rescue(self) -> None:
        """Send again tasks stranded on a vanished worker. A placement is only a
        preference, but Dask does not apply that to tasks that were left with no worker at
        all (every worker lost at once, e.g. a batch allocation ending) when new workers
        join: such a task stays 'no-worker' for ever. Cancel it and queue its warps again.
        Should the old copy run after all, the shard's compare-and-swap and manifest hashes
        make it harmless."""
        now = time.monotonic()
        if now - self._rescue_at < self.rescue_interval:
            return
        self._rescue_at = now
        live = self._live_workers(force=True)
        if not live:
            return
        # finished ones too: their result was on the vanished worker and is recomputed
        gone = {f.key: f for f, (_, w) in self._tasks.items() if w is not None and w not in live}
        if not gone:
            return

        def task_states(keys, dask_scheduler=None):  # nested: pickled by value
            return {k: (ts.state if (ts := dask_scheduler.tasks.get(k)) is not None else None)
                    for k in keys}

        try:
            states = self.client.run_on_scheduler(task_states, list(gone))
        except Exception as e:  # noqa: BLE001
            self.log.warning("cannot ask the scheduler about stranded tasks: %s", _first_line(e))
            return
        for k, fut in gone.items():
            if states.get(k) != "no-worker":
                continue
            worker = self._tasks[fut][1]
            groups = self._release(fut)
            fut.cancel()
            self.stats["rescued"] += 1
            self.log.warning("task for shard(s) %s stranded on vanished worker %s; sending "
                             "it again", ", ".join(map(str, (g[0] for g in groups))), worker)
            for key, hashes in groups:
                self._queues[key] = hashes + self._queues.get(key, [])
                self._home.pop(key, None)
        self._flushing, flushing = True, self._flushing
        try:
            self._dispatch()
        finally:
            self._flushing = flushing

    def _pump(self, block: bool) -> None:
        """Dispatch what can go, take in finished tasks, finalize complete warps."""
        from distributed import wait

        self._dispatch()
        if not self._tasks:
            return
        if block:
            if self.heartbeat is not None:
                self.heartbeat()  # e.g. the systemd watchdog: waiting for workers is no hang
            self._rescue()
            try:  # wake up regularly: Ctrl-C stays responsive
                wait(list(self._tasks), timeout=1.0, return_when="FIRST_COMPLETED")
            except TimeoutError:
                pass
        finished = [f for f in self._tasks if f.status in ("finished", "error", "cancelled")]
        complete: list[_Item] = []
        timeout = self.result_timeout
        for fut in finished:
            res = error = None
            if fut.status == "finished":
                try:
                    # The result lives on the worker that ran the task; if that worker
                    # died meanwhile Dask recomputes the task: do not block on it here
                    # (_rescue sends it again should it be stranded).
                    res = fut.result(timeout=timeout)
                except TimeoutError:
                    timeout = 0.1
                    continue
                except (KeyboardInterrupt, SystemExit):
                    raise
                except BaseException as e:  # noqa: BLE001
                    error = e
            else:
                try:
                    error = fut.exception(timeout=timeout)
                except TimeoutError:
                    timeout = 0.1
                    continue
                except BaseException as e:  # noqa: BLE001 - cancelled
                    error = e
                error = error or RuntimeError(f"task {fut.status}")
            groups = self._release(fut)
            fut.release()
            if error is not None:  # failed for good (retries exhausted), or cancelled
                reason = f"shard task failed: {type(error).__name__}: {_first_line(error)}"
                self.log.log(logging.ERROR if self.log_failures else logging.DEBUG,
                             "shard(s) %s: %s", ", ".join(str(g[0]) for g in groups), reason)
                for key, hashes in groups:
                    for h in hashes:
                        self._items[h].errors[key] = reason
            else:
                self._take_result(res)
            for key, hashes in groups:
                for h in hashes:
                    it = self._items[h]
                    if len(it.results) + len(it.errors) == len(it.shards) and it not in complete:
                        complete.append(it)
        if complete:
            self._finish(complete)
        self._dispatch()

    def _take_result(self, res: dict) -> None:
        st = self.stats
        st["tasks"] += 1
        st["task_seconds"] += res["seconds"]
        st["warps_read"] += res["warps_read"]
        st["workers"].add((res["host"], res["pid"]))
        for key, r in res["shards"].items():
            key = tuple(key)
            st["shard_commits"] += 1
            st["conflict_retries"] += r["attempts"] - 1
            st["shard_cached"] += bool(r["shard_cached"])
            st["cells_written"] += r["cells_written"]
            for x in r["results"]:
                it = self._items[x["hash"]]
                it.results[key] = x
                if x["status"] in ("folded", "present") and x["cells"]:
                    wid = it.outcome.warp_id
                    self._manifest_ids(key).setdefault((wid.visit, wid.detector),
                                                       set()).add(x["hash"])
                if x["status"] == "present":
                    st["present"] += 1

    def _finish(self, items: list[_Item]) -> None:
        """Decide each complete warp; one ledger transaction for all that are done."""
        records, done = [], []
        for it in items:
            self._items.pop(it.outcome.content_hash, None)
            o = it.outcome
            statuses = {r["status"] for r in it.results.values()}
            reasons = [r["reason"] for r in it.results.values() if r["reason"]]
            if it.errors or statuses & {"changed", "conflict", "misrouted"} or \
                    ("rejected" in statuses and len(statuses) > 1):
                o.status = "failed"
                o.reason = "; ".join(sorted(set(it.errors.values()) | set(reasons))) + \
                    " (not done: deliver the file again; shards that hold it skip it)"
                if self.log_failures:
                    self.log.error("%s not folded: %s; it stays in the inbox and is taken "
                                   "again", o.path, o.reason)
                else:
                    self.failed.append(o)
                continue
            if statuses == {"rejected"}:
                o.status, o.reason = "rejected", reasons[0]
                self.store.ledger.record_rejection(o.path, o.reason)
                self._ready.append(o)
                continue
            o.cells = sum(r["cells"] for r in it.results.values())
            o.ms = sum(r.get("ms", 0.0) for r in it.results.values())
            if it.results:
                o.weight = next(iter(it.results.values()))["weight"]
            o.status = "folded" if o.cells else "no_cells"
            records.append(WarpRecord(o.content_hash, o.warp_id.tract, o.warp_id.visit,
                                      o.warp_id.detector, o.band, o.path, o.status, o.cells,
                                      o.weight, time.time()))
            done.append(o)
        self.store.ledger.record_warps(records)
        self._ready += done
        if not self._items:
            self._first_pending_at = None


# =============================================================================== clusters

def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [""])[0][:300]


def _environment() -> dict:
    """Run as a task: what the cluster side runs (checked before any real work)."""
    return {"streamcoadd": __version__, "python": sys.version.split()[0],
            "host": os.uname().nodename}


def check_cluster(client, timeout: float = 120.0) -> dict:
    """Fail early, with a clear message, if the cluster cannot run streamcoadd tasks: the
    scheduler unpickles every task and the workers run them, so both need the same
    streamcoadd importable as this process (docs/scale-out.md)."""
    try:
        env = client.submit(_environment, pure=False).result(timeout=timeout)
    except TimeoutError:
        raise UserError(f"no Dask worker ran a test task within {timeout:.0f} s; are workers "
                        "connected to the scheduler?") from None
    except Exception as e:  # noqa: BLE001
        raise UserError("the Dask cluster cannot run streamcoadd tasks "
                        f"({type(e).__name__}: {_first_line(e)}); install the same streamcoadd "
                        "on the scheduler and the workers as here") from None
    if env["streamcoadd"] != __version__:
        raise UserError(f"Dask workers run streamcoadd {env['streamcoadd']} (on "
                        f"{env['host']}), this process {__version__}: use one version")
    return env


def connect(address: str, *, quiet: bool = True):
    """A ``distributed.Client`` for ``address``; ``local:N`` starts a LocalCluster of N
    single-threaded worker processes (closed with the client by :func:`close`)."""
    try:
        from distributed import Client, LocalCluster
    except ImportError:
        raise UserError("--dask needs Dask distributed: pip install 'streamcoadd[dask]' "
                        "(or pip install 'dask[distributed]')") from None
    if address.startswith("local:"):
        try:
            n = int(address.split(":", 1)[1])
            if n < 1:
                raise ValueError
        except ValueError:
            raise UserError(f"--dask {address!r}: expected local:N with N >= 1 workers") from None
        import dask

        # A worker killed (OOM, kill -9) is restarted by its nanny; do not let the cluster
        # close that nanny if the restart is slower than this (default 15 s, under load).
        dask.config.set({"distributed.deploy.lost-worker-timeout": "1h"})
        cluster = LocalCluster(n_workers=n, threads_per_worker=1, processes=True,
                               dashboard_address=None,
                               silence_logs=logging.ERROR if quiet else logging.WARNING)
        client = Client(cluster)
        client._streamcoadd_cluster = cluster
        return client
    try:
        return Client(address, timeout="30s")
    except OSError as e:
        raise UserError(f"--dask {address}: cannot reach the Dask scheduler ({e})") from None


def close(client) -> None:
    cluster = getattr(client, "_streamcoadd_cluster", None)
    client.close()
    if cluster is not None:
        cluster.close()


def ingest_distributed(state, paths, address="local:2", run_config: RunConfig = RunConfig(),
                       *, client=None, batch: int | None = None, retries: int = 3,
                       progress=None, store=None, allow_refold: bool = False) -> list[Outcome]:
    """Fold warp files into ``state`` on a Dask cluster; returns one outcome per file
    (folded, no_cells, duplicate, rejected, or failed = not done, deliver again).
    ``client``: an existing ``distributed.Client`` (else one is made from ``address``).
    ``progress(outcome)`` is called for every final outcome."""
    from streamcoadd.store.state import StateStore

    own_client = client is None
    if own_client:
        client = connect(address)
        try:
            check_cluster(client)
        except BaseException:
            close(client)
            raise
    own_store = store is None
    if own_store:
        store = StateStore.open(state, write=True)
    outcomes: list[Outcome] = []

    def report(os_):
        for o in os_:
            outcomes.append(o)
            if progress is not None:
                progress(o)

    try:
        ing = DistributedIngestor(store, run_config, client, batch=batch, retries=retries,
                                  allow_refold=allow_refold)
        window = max(4 * ing.max_batch, 64)
        for p in paths:
            o = ing.submit(p)
            if o.status != "pending":
                report([o])
            report(ing.collect())
            report(ing.take_failed())
            if ing.pending > window:
                ing.wait_below(window // 2)
                report(ing.collect())
                report(ing.take_failed())
        report(ing.commit())
        report(ing.take_failed())
        ingest_distributed.last_stats = ing.stats
        try:
            client.run(drop_worker_caches, ing.root)
        except Exception:  # noqa: BLE001 - a worker just lost; its memory is gone anyway
            pass
    finally:
        if own_store:
            store.close()
        if own_client:
            close(client)
    return outcomes


# =============================================================================== CLI


