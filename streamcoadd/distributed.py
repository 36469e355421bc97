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

*Workers* (:func:`fold_shard_batch`, a Dask task): a task folds a list of warps into ONE
shard and commits it under the shard's own lock with compare-and-swap on the manifest's
commit counter (``StateStore(shard_locking=True)``). At most one task per shard is in
flight at any time (the coordinator keeps a queue per shard and sends everything queued as
the next task when the previous one has finished), and many shards run in parallel.

A warp is *done* (ledger row written, outcome returned) only when every shard task it
belongs to has returned, i.e. is durable. Exactly-once holds under Dask's own behaviour:

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

import argparse
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

from .config import RunConfig
from .errors import UserError, WarpRejected
from .ingest import Outcome, fold_into_shard, ledger_duplicate, shard_inputs
from .ledger import WarpRecord
from .skymap import Box, PatchId
from .warp import WarpId, _pixel_origin, _read_bytes, file_hash, read_warp

log = logging.getLogger("streamcoadd.distributed")

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
    from .memory import retain_freed_memory
    from .state import StateStore

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
    from .fold import prepare_warp

    with _prepared_lock:
        hit = _prepared.get(h)
        if hit is not None:
            _prepared.move_to_end(h)
            return hit[0]
    _counters["warps_read"] += 1
    data = _read_bytes(path)
    if file_hash(data) != h:
        raise _Changed()
    fold = store.fold
    warp = read_warp(path, store.skymap, fold.bad_planes, fold.noise_realizations, data=data)
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


def _fold_one(store, shard, tract, path: str, h: str, cache_bytes: int) -> dict:
    t0 = time.perf_counter()
    res = {"hash": h, "path": path, "status": "", "cells": 0, "weight": 0.0, "reason": "",
           "visit": None, "detector": None}
    try:
        prepared = _prepared_warp(path, h, store, cache_bytes)
    except WarpRejected as e:
        res.update(status="rejected", reason=e.reason)
        return res
    except _Changed:
        res.update(status="changed", reason="the file changed while it was being ingested "
                                             "(its content hash differs); deliver it again")
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


def fold_shard_batch(root: str, shard_key: ShardKey, warps: list[tuple[str, str]],
                     cache_bytes: int = int(2e9), prepared_cache_bytes: int = int(1e9)) -> dict:
    """Dask task: fold ``warps`` ([(absolute path, sha256)], in order) into ONE shard of the
    state at ``root`` and commit it. Idempotent: a warp whose hash the shard manifest
    already lists is skipped (``present``). Returns ``{"shard", "results", "commit", ...}``
    with one result dict per warp (``status`` one of folded, no_cells, present, rejected,
    changed, conflict, misrouted)."""
    from .state import ShardConflict

    t0 = time.perf_counter()
    tract_id, px, py, band = shard_key
    patch = PatchId(tract_id, px, py)
    store = _worker_store(root)
    store.cache_bytes = cache_bytes
    tract = store.skymap.tract(tract_id)
    last: BaseException | None = None
    read0 = _counters["warps_read"]
    # Warps this worker has prepared already first (an earlier shard task of the same
    # batch): visiting the batch in a fixed order would make the LRU cache thrash.
    # Within a shard the fold order does not matter (sums; groups are order independent).
    with _prepared_lock:
        order = sorted(range(len(warps)), key=lambda i: warps[i][1] not in _prepared)
    for attempt in range(1, MAX_CONFLICT_ATTEMPTS + 1):
        shard, cached = _fresh_shard(store, patch, band)
        try:
            results: list = [None] * len(warps)  # in the order given
            for i in order:
                results[i] = _fold_one(store, shard, tract, *warps[i], prepared_cache_bytes)
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

    from .warp import _gunzip, _int_key

    try:
        if data[:2] == b"\x1f\x8b":  # .fits.gz: the hash is of the file as delivered
            data = _gunzip(path, data)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with fits.open(io.BytesIO(data), memmap=False, lazy_load_hdus=True) as hdul:
                ph = hdul[0].header
                ih = hdul["IMAGE"].header
                wid = WarpId(_int_key(path, ph, "TRACT"), _int_key(path, ph, "VISIT"),
                             _int_key(path, ph, "DETECTOR"))
                band = ph["BAND"].strip()
                if not band or len(band) > 32 or not band.replace("_", "").replace("-", "").isalnum():
                    raise ValueError("band")
                store.skymap.tract(wid.tract)
                if ih["NAXIS"] != 2:
                    raise ValueError("naxis")
                x0, y0 = _pixel_origin(path, ih)
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
    """The coordinator. Same contract as :class:`streamcoadd.ingest.Ingestor`
    (``submit``, ``commit``, ``needs_commit``, ``pending``), so the daemon can use either:
    ``submit`` returns ``pending``, ``duplicate`` or ``rejected``; ``commit`` waits until
    every pending warp is durable in all its shards and returns their final outcomes.

    In addition ``collect()`` returns, without waiting, the outcomes of warps that became
    durable meanwhile (for pipelined callers such as ``ingest --dask``), and ``failed``
    lists warps whose shard tasks failed for good (worker lost too often, I/O error): they
    are NOT done; their files must be delivered again (a rerun finishes them exactly once).

    ``batch`` is the number of warps a shard task takes when the shard is idle (default
    ``run.commit_every``); while a shard is busy its queue grows and the next task takes
    up to ``max_batch`` (default 4 x ``batch``) at once, which amortizes the commits.
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
        self._tasks: dict[object, tuple[ShardKey, list[str]]] = {}  # future -> (shard, hashes)
        self._ids: dict[ShardKey, dict[tuple[int, int], set[str]]] = {}  # manifest identities
        self._home: dict[ShardKey, str] = {}  # shard -> worker that holds it in memory
        self._load: dict[str, int] = {}  # worker -> warp-shard units sent, not finished
        self._workers: list[str] = []
        self._workers_at = -1e9
        self._rescue_at = time.monotonic()
        self._ready: list[Outcome] = []
        self._first_pending_at: float | None = None
        self._flushing = False
        self.failed: list[Outcome] = []
        # shard_cached: tasks that found their shard in the worker's memory (else its
        # cells are read from disk); warps_read: warps read and prepared by workers;
        # cells_written: cell generations committed
        self.stats = {"tasks": 0, "task_seconds": 0.0, "conflict_retries": 0, "present": 0,
                      "shard_cached": 0, "warps_read": 0, "cells_written": 0, "rescued": 0,
                      "workers": set()}

    # ------------------------------------------------------------------ Ingestor contract
    @property
    def pending(self) -> int:
        return len(self._items)

    def needs_commit(self) -> bool:
        if not self._items:
            return False
        return (len(self._items) >= self.run.commit_every
                or time.monotonic() - self._first_pending_at >= self.run.commit_interval)

    def submit(self, path) -> Outcome:
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
        data = _read_bytes(path)
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
            from .fold import prepare_warp

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
    def _dispatch(self) -> None:
        for key, queue in self._queues.items():
            if not queue or key in self._busy:
                continue
            if len(queue) < self.batch and not self._flushing:
                continue
            hashes, self._queues[key] = queue[:self.max_batch], queue[self.max_batch:]
            self._send(key, hashes)

    def _send(self, key: ShardKey, hashes: list[str]) -> None:
        warps = [(self._items[h].abspath, h) for h in hashes]
        worker = self._place(key, len(hashes))
        fut = self.client.submit(
            fold_shard_batch, self.root, key, warps, self.cache_bytes,
            self.prepared_cache_bytes, key=f"streamcoadd-fold-{key[0]}-{key[1]}-{key[2]}-"
                                            f"{key[3]}-{uuid.uuid4().hex[:12]}",
            pure=False, retries=self.retries,
            **({"workers": [worker], "allow_other_workers": True} if worker else {}))
        self._busy[key] = fut
        self._tasks[fut] = (key, hashes, worker)

    def _rescue(self) -> None:
        """Re-send tasks stranded on a vanished worker. A placement is only a preference,
        but Dask does not apply that to tasks that were left with no worker at all (every
        worker lost at once, e.g. a batch allocation ending) when new workers join: such a
        task stays 'no-worker' for ever. Cancel it and send it again. Should the old copy
        run after all, the shard's compare-and-swap and manifest hashes make it harmless."""
        now = time.monotonic()
        if now - self._rescue_at < self.rescue_interval:
            return
        self._rescue_at = now
        try:
            live = set(self.client.nthreads())
        except Exception:  # noqa: BLE001 - scheduler unreachable: try later
            return
        self._workers, self._workers_at = sorted(live), now
        if not live:
            return
        # finished ones too: their result was on the vanished worker and is recomputed
        gone = {f.key: f for f, (_, _, w) in self._tasks.items()
                if w is not None and w not in live}
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
            key, hashes, worker = self._tasks.pop(fut)
            del self._busy[key]
            self._load[worker] = self._load.get(worker, 0) - len(hashes)
            fut.cancel()
            self.stats["rescued"] += 1
            self.log.warning("shard %s: task stranded on vanished worker %s; sending it again",
                             key, worker)
            self._send(key, hashes)

    def _place(self, key: ShardKey, units: int) -> str | None:
        """The worker for a shard task (a preference: if that worker is gone, Dask runs the
        task elsewhere). A shard keeps a *home* worker, which holds its cells in memory
        between tasks. The first home comes from a spatial split of the tract's patch grid
        into one contiguous block per worker, so that a warp spanning neighbouring patches
        is mostly read and prepared by one worker. A shard moves to the least loaded worker
        when its home has more than two tasks' worth of work queued beyond that one (input
        concentrated on part of the sky must not leave workers idle)."""
        now = time.monotonic()
        if now - self._workers_at > 2.0:
            try:
                self._workers = sorted(self.client.nthreads())
            except Exception:  # noqa: BLE001 - no placement then; Dask decides
                self._workers = []
            self._workers_at = now
        if not self._workers:
            return None
        load = {w: self._load.get(w, 0) for w in self._workers}
        least = min(load, key=lambda w: (load[w], w))
        home = self._home.get(key)
        if home not in load:
            t, x, y, _ = key
            nx, ny = self.store.skymap.tract(t).num_patches
            home = self._workers[(x * ny + y) * len(self._workers) // (nx * ny)]
        if load[home] > load[least] + 2 * max(units, self.batch):
            home = least
        self._home[key] = home
        self._load[home] = load[home] + units
        return home

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
                    # (_rescue re-sends it should it be stranded).
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
            key, hashes, worker = self._tasks.pop(fut)
            del self._busy[key]
            if worker is not None:
                self._load[worker] = self._load.get(worker, 0) - len(hashes)
            if error is not None:  # failed for good (retries exhausted), or cancelled
                e = error
                reason = f"shard task failed: {type(e).__name__}: {_first_line(e)}"
                self.log.log(logging.ERROR if self.log_failures else logging.DEBUG,
                             "shard %s: %s", key, reason)
                for h in hashes:
                    self._items[h].errors[key] = reason
            else:  # res
                self.stats["tasks"] += 1
                self.stats["task_seconds"] += res["seconds"]
                self.stats["conflict_retries"] += res["attempts"] - 1
                self.stats["workers"].add((res["host"], res["pid"]))
                self.stats["shard_cached"] += bool(res["shard_cached"])
                self.stats["warps_read"] += res["warps_read"]
                self.stats["cells_written"] += res["cells_written"]
                for r in res["results"]:
                    self._items[r["hash"]].results[key] = r
                    if r["status"] in ("folded", "present") and r["cells"]:
                        it = self._items[r["hash"]]
                        self._manifest_ids(key).setdefault(
                            (it.outcome.warp_id.visit, it.outcome.warp_id.detector),
                            set()).add(r["hash"])
                    if r["status"] == "present":
                        self.stats["present"] += 1
            fut.release()
            for h in hashes:
                it = self._items[h]
                if len(it.results) + len(it.errors) == len(it.shards):
                    complete.append(it)
        if complete:
            self._finish(complete)
        self._dispatch()

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
    import streamcoadd

    return {"streamcoadd": streamcoadd.__version__, "python": sys.version.split()[0],
            "host": os.uname().nodename}


def check_cluster(client, timeout: float = 120.0) -> dict:
    """Fail early, with a clear message, if the cluster cannot run streamcoadd tasks: the
    scheduler unpickles every task and the workers run them, so both need the same
    streamcoadd importable as this process (docs/scale-out.md)."""
    import streamcoadd

    try:
        env = client.submit(_environment, pure=False).result(timeout=timeout)
    except TimeoutError:
        raise UserError(f"no Dask worker ran a test task within {timeout:.0f} s; are workers "
                        "connected to the scheduler?") from None
    except Exception as e:  # noqa: BLE001
        raise UserError("the Dask cluster cannot run streamcoadd tasks "
                        f"({type(e).__name__}: {_first_line(e)}); install the same streamcoadd "
                        "on the scheduler and the workers as here") from None
    if env["streamcoadd"] != streamcoadd.__version__:
        raise UserError(f"Dask workers run streamcoadd {env['streamcoadd']} (on "
                        f"{env['host']}), this process {streamcoadd.__version__}: use one version")
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
    from .state import StateStore

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

def register_ingest_options(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("scale-out (Dask distributed; docs/scale-out.md)")
    g.add_argument("--dask", metavar="ADDRESS",
                   help="fold on a Dask cluster: a scheduler address (tcp://host:8786) or "
                        "local:N for N local worker processes")
    g.add_argument("--dask-batch", type=int, metavar="N", dest="dask_batch",
                   help="warps per shard task when the shard is idle (default "
                        "--commit-every); a busy shard's next task takes up to 4N")
    g.add_argument("--dask-retries", type=int, default=3, metavar="N", dest="dask_retries",
                   help="retries of a failed shard task (default 3)")


def cmd_ingest_dask(args) -> int:
    from . import cli

    files = cli.warp_files(args.paths)
    rc = cli.run_config(args)
    if args.dask_batch is not None and args.dask_batch < 1:
        raise UserError("--dask-batch must be >= 1")
    counts = {"folded": 0, "no_cells": 0, "duplicate": 0, "rejected": 0, "failed": 0}
    bad: list[Outcome] = []
    t0 = time.perf_counter()
    bar = cli._progress(len(files), args.quiet)

    def progress(o: Outcome) -> None:
        counts[o.status] = counts.get(o.status, 0) + 1
        if o.status in ("rejected", "failed"):
            bad.append(o)
        bar.update(1)
        bar.set_postfix_str(f"{Path(o.path).name}: {o.status}")

    try:
        ingest_distributed(args.state, files, args.dask, rc, batch=args.dask_batch,
                           retries=args.dask_retries, progress=progress,
                           allow_refold=getattr(args, "allow_refold", False))
    finally:
        bar.close()
    dt = time.perf_counter() - t0
    st = getattr(ingest_distributed, "last_stats", {})
    print(f"{len(files)} file(s) in {dt:.1f} s on Dask ({len(st.get('workers', ()))} "
          f"worker process(es), {st.get('tasks', 0)} shard task(s)): {counts['folded']} "
          f"folded, {counts['no_cells']} valid but covering no cell, {counts['duplicate']} "
          f"already present, {counts['rejected']} rejected, {counts['failed']} failed")
    by_reason: dict[tuple[str, str], list[str]] = {}
    for o in bad:
        by_reason.setdefault((o.status, o.reason), []).append(o.path)
    for (status, reason), paths in by_reason.items():
        if len(paths) == 1:
            print(f"  {status} {paths[0]}: {reason}")
        else:
            more = f" and {len(paths) - 3} more" if len(paths) > 3 else ""
            print(f"  {status} {len(paths)} files ({', '.join(paths[:3])}{more}): {reason}")
    return 1 if bad else 0


def cmd_watch_dask(args) -> int:
    """``streamcoadd watch ... --dask ADDRESS``: the daemon, folding on a Dask cluster.
    The daemon process is the coordinator (state lock, ledger, inbox); a batch of warps
    leaves the inbox only when every shard task of every warp in it has returned."""
    from . import daemon

    if args.dask_batch is not None and args.dask_batch < 1:
        print("streamcoadd watch: --dask-batch must be >= 1", file=sys.stderr)
        return daemon.EXIT_ERROR
    try:
        client = connect(args.dask)
    except UserError as e:
        print(f"streamcoadd watch: {e}", file=sys.stderr)
        return daemon.EXIT_ERROR
    try:
        check_cluster(client)
    except UserError as e:
        close(client)
        print(f"streamcoadd watch: {e}", file=sys.stderr)
        return daemon.EXIT_ERROR

    notify = daemon._SdNotify()

    def make_ingestor(store, run):
        return DistributedIngestor(store, run, client, batch=args.dask_batch,
                                   retries=args.dask_retries, log_failures=True,
                                   logger=daemon.log, heartbeat=notify.ping)

    try:
        return daemon.handler(args, make_ingestor=make_ingestor)
    finally:
        try:
            client.run(drop_worker_caches, str(Path(args.state).absolute()))
        except Exception:  # noqa: BLE001
            pass
        close(client)


def _wrap(parser: argparse.ArgumentParser, dask_cmd) -> None:
    register_ingest_options(parser)
    plain = parser.get_default("func")

    def cmd(args, _plain=plain):
        if getattr(args, "dask", None):
            return dask_cmd(args)
        return _plain(args)

    parser.set_defaults(func=cmd)


def register(subparsers) -> None:
    """Called by ``streamcoadd.cli`` (after the core subcommands and the daemon's): add
    ``--dask`` to ``ingest`` and ``watch``."""
    if "ingest" in subparsers.choices:
        _wrap(subparsers.choices["ingest"], cmd_ingest_dask)
    if "watch" in subparsers.choices:
        _wrap(subparsers.choices["watch"], cmd_watch_dask)
