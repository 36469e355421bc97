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

import logging
import os
import random
import sys
import threading
import time
import uuid
from collections import OrderedDict
from dataclasses import dataclass, field, replace
from pathlib import Path

from streamcoadd.core.config import RunConfig
from streamcoadd.core.errors import UserError, WarpRejected
from streamcoadd.core.fold import PreparedWarp
from streamcoadd.core.skymap import PatchId
from streamcoadd.core.version import __version__
from streamcoadd.core.warp import file_hash
from streamcoadd.io.warp_reader import read_bytes
from streamcoadd.pipeline.admission import (
    Admission,
    ContentVerdict,
    ShardVerdict,
    shard_verdict,
)
from streamcoadd.pipeline.fold_step import (
    cached_shard,
    fold_into_shard,
    forget_shard,
    forget_shards,
)
from streamcoadd.pipeline.ingest import warp_records
from streamcoadd.pipeline.outcome import Outcome, OutcomeStatus
from streamcoadd.pipeline.source import (
    WarpChanged,
    contributing_patches,
    load_warp,
    probe_warp,
    route,
)
from streamcoadd.store.state import ShardConflict

log = logging.getLogger("streamcoadd.pipeline.dask_executor")

ShardKey = tuple  # (tract, px, py, band): plain values, cheap to send to workers

MAX_CONFLICT_ATTEMPTS = 8  # compare-and-swap retries of one task on one shard


# =============================================================================== workers

# (thread id, state root) -> (state.json identity, worker StateStore): one store per
# executor thread, so that a task's commit() only ever sees its own shard.
_stores: dict[tuple[int, str], tuple[tuple, object]] = {}
_prepared_lock = threading.Lock()
_prepared: OrderedDict[str, tuple[PreparedWarp, int]] = OrderedDict()  # hash -> (warp, bytes)


_counters = {"warps_read": 0}


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
    cached = cached_shard(store, patch, band)
    if cached is not None:
        manifest = store.load_manifest(patch, band)
        on_disk = manifest.commit if manifest else 0
        if on_disk != cached.commit or cached.changed:
            forget_shard(store, patch, band)
            cached = None
    return store.shard(patch, band), cached is not None


def _worker_warp(path: str, h: str, store, cache_bytes: int) -> PreparedWarp:
    """Read, validate and prepare a warp once per worker process (LRU by bytes): a warp
    spanning several patches is folded by several shard tasks, often on the same worker.
    Raises :class:`WarpRejected` (:class:`WarpChanged` if the content is not ``h``)."""
    with _prepared_lock:
        hit = _prepared.get(h)
        if hit is not None:
            _prepared.move_to_end(h)
            return hit[0]
    _counters["warps_read"] += 1
    loaded = load_warp(path, store.skymap, store.fold, expect_hash=h, patches=())
    if loaded.rejection is not None:
        raise loaded.rejection
    # w·I and w²·var once per warp, as the local loader does (bit-identical sums)
    prepared = loaded.prepared.with_products()
    arrays = [prepared.w_image, prepared.w2_variance, prepared.valid, prepared.bad,
              prepared.or_mask, *prepared.noise, *prepared.planes.values()]
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
            forget_shards(store)


def _prepare(path: str, h: str, store, cache_bytes: int):
    """(PreparedWarp, None), or (None, result fields) if the warp is rejected or changed."""
    try:
        return _worker_warp(path, h, store, cache_bytes), None
    except WarpChanged as e:
        return None, {"status": "changed", "reason": e.reason}
    except WarpRejected as e:
        return None, {"status": "rejected", "reason": e.reason}


def _fold_prepared(store, shard, path: str, h: str, prepared, failed) -> dict:
    """Fold one prepared warp into one shard (in memory); the result for that pair."""
    t0 = time.perf_counter()
    res = {"hash": h, "path": path, "status": "", "cells": 0, "weight": 0.0, "reason": "",
           "visit": None, "detector": None}
    if prepared is None:
        res.update(failed)
        return res
    w = prepared.warp
    res.update(visit=w.id.visit, detector=w.id.detector, weight=float(prepared.weight))
    verdict = shard_verdict(shard, w.id, w.band, h)
    if verdict == ShardVerdict.MISROUTED:
        res.update(status="misrouted", reason=f"{w.id} band {w.band} was sent to shard "
                                              f"{shard.patch} band {shard.band}")
    elif verdict == ShardVerdict.CONFLICT:
        res.update(status="conflict", reason=f"{w.id} is already in shard {shard.patch} band "
                                             f"{shard.band} with different content")
    else:
        inputs = route(prepared, store.skymap, store.fold, [shard.patch])[shard.patch]
        if verdict == ShardVerdict.PRESENT:
            # Durable in this shard already: a rerun of this task, or a replay after a crash.
            res.update(status="present", cells=len(inputs))
        else:
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
    t0 = time.perf_counter()
    tract_id, px, py, band = shard_key
    patch = PatchId(tract_id, px, py)
    store = _worker_store(root)
    store.cache_bytes = cache_bytes
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
                results[i] = _fold_prepared(store, shard, path, h, prepared, failed)
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
            forget_shard(store, patch, band)
            last = e
            time.sleep(random.uniform(0.01, 0.05) * attempt)
        except BaseException:
            forget_shard(store, patch, band)  # never let half-folded memory survive
            raise
    raise RuntimeError(f"shard {patch} band {band}: gave up after {MAX_CONFLICT_ATTEMPTS} "
                       f"compare-and-swap conflicts ({last})")


def fold_shards(root: str, groups: list[tuple[ShardKey, list[tuple[str, str]]]],
                cache_bytes: int = int(2e9), prepared_cache_bytes: int = int(1e9)) -> dict:
    """Dask task: fold warps into SEVERAL shards (all those of this worker with work
    queued), warp by warp, so that a warp feeding several of them is read and prepared
    once; each shard is committed on its own (lock + compare-and-swap), exactly as
    :func:`fold_shard_batch` does for one: whenever the uncommitted cells reach
    ``cache_bytes`` (the local ingestor's rule, so memory stays bounded however many
    shards the task holds) and at the end. ``groups``: [(shard key, [(path, sha256)])].
    Returns ``{"shards": {shard key: <fold_shard_batch result>}, ...}``."""
    t0 = time.perf_counter()
    read0 = _counters["warps_read"]
    store = _worker_store(root)
    store.cache_bytes = cache_bytes
    run = _MultiShardRun(store, groups, prepared_cache_bytes)
    try:
        run.fold_all()
    except (ShardConflict, FileNotFoundError):
        # A superseded generation vanished while we read it (another writer committed):
        # drop what is not committed and do the shards again one by one (what was
        # committed meanwhile is found there, 'present').
        run.redo.update((key, warps) for key, warps in groups)
    except BaseException:
        for key, _ in groups:  # never let half-folded memory survive
            forget_shard(store, PatchId(*key[:3]), key[3])
        raise
    out = run.results()
    for key, warps in run.redo.items():
        forget_shard(store, PatchId(*key[:3]), key[3])
        r = fold_shard_batch(root, key, warps, cache_bytes, prepared_cache_bytes)
        r["attempts"] += 1
        out[key] = r
    store.trim_cache(store.cache_bytes)
    return {"shards": out, "pid": os.getpid(), "host": os.uname().nodename,
            "seconds": time.perf_counter() - t0, "warps_read": _counters["warps_read"] - read0}


class _MultiShardRun:
    """One :func:`fold_shards` task's bookkeeping: its shards, warp by warp, with
    memory-bounded intermediate commits (a shard whose commit loses the compare-and-swap
    goes to ``redo`` and takes no more warps here)."""

    def __init__(self, store, groups, prepared_cache_bytes: int):
        self.store = store
        self.groups = groups
        self.prepared_cache_bytes = prepared_cache_bytes
        self.paths: dict[str, str] = {}
        self.targets: dict[str, list[ShardKey]] = {}  # warp -> its shards here, in order
        for key, warps in groups:
            for path, h in warps:
                self.paths.setdefault(h, path)
                self.targets.setdefault(h, []).append(key)
        self.shards: dict = {}
        self.cached: dict = {}
        self.written = {key: 0 for key, _ in groups}
        self.per_warp: dict = {key: {} for key, _ in groups}
        self.redo: dict = {}

    def fold_all(self) -> None:
        store = self.store
        for key, _ in self.groups:
            t, px, py, band = key
            self.shards[key], self.cached[key] = _fresh_shard(store, PatchId(t, px, py), band)
        hashes = list(self.paths)
        for i in _warp_order([(self.paths[h], h) for h in hashes]):
            h = hashes[i]
            keys = [k for k in self.targets[h] if k not in self.redo]
            if not keys:
                continue
            prepared, failed = _prepare(self.paths[h], h, store, self.prepared_cache_bytes)
            for key in keys:
                self.per_warp[key][h] = _fold_prepared(store, self.shards[key], self.paths[h],
                                                       h, prepared, failed)
            del prepared
            if store.dirty_bytes() >= store.cache_bytes:
                self.commit()
                store.trim_cache(store.cache_bytes)
        self.commit()

    def commit(self) -> None:
        """Commit every changed shard of the task, each alone (lock + compare-and-swap)."""
        warps_of = dict(self.groups)
        for key, shard in self.shards.items():
            if key in self.redo or not shard.changed:
                continue
            n = len(shard.dirty)
            try:
                self.store.commit_shard(shard)
            except ShardConflict:
                forget_shard(self.store, shard.patch, shard.band)
                self.redo[key] = warps_of[key]
                continue
            self.written[key] += n

    def results(self) -> dict:
        return {key: {"shard": key, "results": [self.per_warp[key][h] for _, h in warps],
                      "commit": self.shards[key].commit, "cells_written": self.written[key],
                      "attempts": 1, "shard_cached": self.cached[key], "warps_read": 0,
                      "seconds": 0.0}
                for key, warps in self.groups if key not in self.redo}


# =============================================================================== coordinator

@dataclass
class _Item:
    """One accepted warp on its way through the shard tasks (the coordinator's own
    bookkeeping: mutable, never leaves this process)."""

    outcome: Outcome
    abspath: str
    shards: set
    results: dict = field(default_factory=dict)  # shard key -> result dict
    errors: dict = field(default_factory=dict)  # shard key -> error text
    copies: list = field(default_factory=list)  # in-batch duplicates (pending Outcomes)


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
    home worker go as one task (at most ``max_shards`` of them, default all; the worker
    commits whenever its uncommitted cells reach ``run.cache_gb``), each with up to ``max_batch`` (default 4 x ``batch``) warps. A shard's queue grows while
    it is in a task, which amortizes its next commit.
    """

    rescue_interval = 5.0  # s between checks for tasks stranded on vanished workers
    result_timeout = 5.0  # s to fetch a finished task's result before looking again later

    def __init__(self, store, run: RunConfig = RunConfig(), client=None, *,
                 batch: int | None = None, max_batch: int | None = None, retries: int = 3,
                 prepared_cache_gb: float = 1.0, allow_refold: bool = False,
                 log_failures: bool = False, logger: logging.Logger | None = None,
                 heartbeat=None, max_shards: int | None = None):
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
        self.admission = Admission(store, allow_refold)
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
        self._home: dict[ShardKey, str] = {}  # shard -> worker that holds it in memory
        self._inflight: dict[str, int] = {}  # worker -> tasks placed there, not finished
        self._workers: dict[str, int] = {}  # live worker -> threads
        self._workers_at = -1e9
        # Shards per task: all the waiting shards of a worker by default (a warp feeding
        # several is then prepared once there); the worker bounds its memory by committing
        # whenever its uncommitted cells reach cache_gb, as the local ingestor does.
        self.max_shards = max(1, max_shards or 1 << 30)
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
        """Warps (and in-batch copies) whose final outcome has not been returned."""
        return len(self._items) + sum(len(it.copies) for it in self._items.values()) \
            + len(self._ready)

    def close(self) -> None:
        """Nothing to release here: the caller owns the client (pending work is not
        committed: call commit first)."""

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
            outcome = Outcome(path, OutcomeStatus.REJECTED, reason=e.reason)
        outcome = replace(outcome, ms=(time.perf_counter() - t0) * 1e3)
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
        seen = self.admission.by_content(path, h)
        if seen.verdict == ContentVerdict.DUPLICATE:
            return Outcome(path, OutcomeStatus.DUPLICATE,
                           reason=f"already folded from {seen.original}",
                           warp_id=seen.warp_id, band=seen.band, content_hash=h)
        if seen.verdict == ContentVerdict.IN_BATCH:
            # Not durable yet: acknowledged with the original, when it is final.
            item = self._items[h]
            copy = replace(item.outcome, path=path, reason=f"same content as {seen.original}")
            item.copies.append(copy)
            return copy
        p = probe_warp(path, data, store.skymap, store.fold)
        del data
        wid = p.warp_id
        self.admission.by_identity(path, h, wid)
        tract = store.skymap.tract(wid.tract)
        keys = [(pt.tract, pt.x, pt.y, p.band)
                for pt in contributing_patches(tract, p.box, store.fold)]
        outcome = Outcome(path, OutcomeStatus.PENDING, warp_id=wid, band=p.band, content_hash=h)
        if not keys:
            # Touches no patch: validate it fully here (nobody else will), then it is seen.
            loaded = load_warp(path, store.skymap, store.fold, expect_hash=h, patches=())
            if loaded.rejection is not None:
                raise loaded.rejection
            item = _Item(replace(outcome, weight=loaded.prepared.weight), path, set())
            self._items[h] = item
            self._finish([item])
            return outcome
        item = _Item(outcome, str(Path(path).absolute()), set(keys))
        if not self._items:
            self._first_pending_at = time.monotonic()
        self._items[h] = item
        self.admission.add_pending(path, h, wid)
        for key in keys:
            self._queues.setdefault(key, []).append(h)
        return outcome

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
        """A first home for a shard: the tract's patch grid cut into one contiguous,
        near-square block of patches per worker. A warp crossing a block boundary is read
        and prepared on both sides: square blocks have the least boundary per area
        (columns of one patch would make every detector warp cross one)."""
        t, x, y, _ = key
        nx, ny = self.store.skymap.tract(t).num_patches
        bx, by = block_grid(len(workers), nx, ny)
        return workers[(x * bx // nx) * by + y * by // ny]

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
                self._items[x["hash"]].results[key] = x
                if x["status"] == "present":
                    st["present"] += 1

    def _finish(self, items: list[_Item]) -> None:
        """Decide each complete warp; one ledger transaction for all that are done. The
        in-batch copies of a warp get their outcome now, with it: duplicate once it is
        durable, else the original's failure or rejection."""
        done, failed, rejected = [], [], []
        for it in items:
            self._items.pop(it.outcome.content_hash, None)
            o = self._decide(it)
            if o.status == OutcomeStatus.FAILED:
                failed += [o, *(replace(c, status=o.status, reason=o.reason) for c in it.copies)]
            elif o.status == OutcomeStatus.REJECTED:
                rejected += [o, *(replace(c, status=o.status, reason=o.reason) for c in it.copies)]
            else:
                done.append((o, it))
        self.store.ledger.record_warps(warp_records([o for o, _ in done]))
        self.admission.committed([(o.content_hash, o.warp_id, o.cells > 0) for o, _ in done])
        for o in failed:
            self.admission.drop_pending(o.content_hash)
            if self.log_failures:
                self.log.error("%s not folded: %s; it stays in the inbox and is taken "
                               "again", o.path, o.reason)
            else:
                self.failed.append(o)
        for o in rejected:
            self.admission.drop_pending(o.content_hash)
            self.store.ledger.record_rejection(o.path, o.reason)
        self._ready += rejected
        for o, it in done:
            self._ready += [o, *(replace(c, status=OutcomeStatus.DUPLICATE) for c in it.copies)]
        if not self._items:
            self._first_pending_at = None

    @staticmethod
    def _decide(it: _Item) -> Outcome:
        """The final outcome of one warp from its shards' results."""
        o = it.outcome
        statuses = {r["status"] for r in it.results.values()}
        reasons = [r["reason"] for r in it.results.values() if r["reason"]]
        if it.errors or statuses & {"changed", "conflict", "misrouted"} or \
                ("rejected" in statuses and len(statuses) > 1):
            reason = "; ".join(sorted(set(it.errors.values()) | set(reasons))) + \
                " (not done: deliver the file again; shards that hold it skip it)"
            return replace(o, status=OutcomeStatus.FAILED, reason=reason)
        if statuses == {"rejected"}:
            return replace(o, status=OutcomeStatus.REJECTED, reason=reasons[0])
        cells = sum(r["cells"] for r in it.results.values())
        return replace(o, status=OutcomeStatus.FOLDED if cells else OutcomeStatus.NO_CELLS,
                       cells=cells,
                       ms=sum(r.get("ms", 0.0) for r in it.results.values()) or o.ms,
                       weight=next(iter(it.results.values()))["weight"] if it.results
                       else o.weight)


# =============================================================================== clusters

def block_grid(n: int, nx: int, ny: int) -> tuple[int, int]:
    """(bx, by) with bx * by == n blocks over an nx x ny patch grid, the blocks as square as
    possible (least total boundary: the sum of the block sides nx / bx + ny / by smallest)."""
    return min(((d, n // d) for d in range(1, n + 1) if n % d == 0),
               key=lambda b: (max(nx / b[0], ny / b[1]) / min(nx / b[0], ny / b[1]),
                              b[0] * ny + b[1] * nx))


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


@dataclass(frozen=True)
class DaskStats:
    """What the cluster did in one :func:`run_distributed`.

    Attributes
    ----------
    tasks : int
        Shard tasks that returned.
    shard_commits : int
        Shard commits (one per shard per task).
    task_seconds : float
        Wall time summed over tasks, s.
    conflict_retries : int
        Compare-and-swap retries (another copy of a task committed first).
    present : int
        (warp, shard) pairs found already durable (reruns, replays).
    shard_cached : int
        Shard tasks that found their shard in the worker's memory.
    warps_read : int
        Warps read and prepared by workers (a warp feeding shards on two workers: 2).
    cells_written : int
        Cell generations committed.
    rescued : int
        Tasks sent again after being stranded on a vanished worker.
    workers : frozenset of (host, pid)
        Worker processes that ran tasks.
    """

    tasks: int = 0
    shard_commits: int = 0
    task_seconds: float = 0.0
    conflict_retries: int = 0
    present: int = 0
    shard_cached: int = 0
    warps_read: int = 0
    cells_written: int = 0
    rescued: int = 0
    workers: frozenset = frozenset()

    @classmethod
    def of(cls, stats: dict) -> DaskStats:
        return cls(**{**stats, "workers": frozenset(stats["workers"])})

    def __getitem__(self, key: str):
        """``stats["tasks"]``: the former dict access (kept for callers of the dict)."""
        return getattr(self, key)

    def get(self, key: str, default=None):
        return getattr(self, key, default)


@dataclass(frozen=True)
class DistributedRun:
    """The result of :func:`run_distributed`: one final outcome per file, in the order
    they became final, and the cluster's statistics."""

    outcomes: tuple[Outcome, ...]
    stats: DaskStats


def run_distributed(state, paths, address="local:2", run_config: RunConfig = RunConfig(),
                    *, client=None, batch: int | None = None, retries: int = 3,
                    progress=None, store=None, allow_refold: bool = False) -> DistributedRun:
    """Fold warp files into ``state`` on a Dask cluster.

    Parameters
    ----------
    state : path
        The state directory (opened for writing here unless ``store`` is given).
    paths : iterable of path
        Warp files.
    address : str
        Scheduler address, or ``local:N`` (used only without ``client``).
    client : distributed.Client, optional
        An existing client (else one is made from ``address`` and closed at the end).
    batch, retries
        Warps per shard task; retries of a failed task.
    progress : callable, optional
        ``progress(outcome)`` for every final outcome.

    Returns
    -------
    DistributedRun
        Outcomes: folded, no_cells, duplicate, rejected, or failed (not done: deliver
        again).
    """
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
            if o.status != OutcomeStatus.PENDING:
                report([o])
            report(ing.collect())
            report(ing.take_failed())
            if ing.pending > window:
                ing.wait_below(window // 2)
                report(ing.collect())
                report(ing.take_failed())
        report(ing.commit())
        report(ing.take_failed())
        try:
            client.run(drop_worker_caches, ing.root)
        except Exception:  # noqa: BLE001 - a worker just lost; its memory is gone anyway
            pass
    finally:
        if own_store:
            store.close()
        if own_client:
            close(client)
    return DistributedRun(tuple(outcomes), DaskStats.of(ing.stats))


def ingest_distributed(state, paths, address="local:2", run_config: RunConfig = RunConfig(),
                       **kwargs) -> list[Outcome]:
    """Former API: :func:`run_distributed`'s outcomes as a list; its statistics stay
    readable as ``ingest_distributed.last_stats`` until the CLI uses ``run_distributed``
    (deprecated: a function attribute is a side channel)."""
    run = run_distributed(state, paths, address, run_config, **kwargs)
    ingest_distributed.last_stats = run.stats
    return list(run.outcomes)
