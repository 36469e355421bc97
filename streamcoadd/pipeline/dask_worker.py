"""The Dask worker side: the task functions that fold queued warps into shards and commit.

Dask pickles a task function by reference (module and name): every function submitted
from :mod:`streamcoadd.pipeline.dask_executor` is a module-level function here, importable
on the workers. A task takes a few neighbouring shards homed on one worker and their queued
warps (:func:`fold_shards`; :func:`fold_shard_batch` for one shard), goes through the warps
one by one (each read and prepared once per worker process, folded into each of its shards
in the task), then commits every shard on its own, under the shard's lock with
compare-and-swap on the manifest's commit counter (``StateStore(shard_locking=True)``).
Idempotent: a warp whose hash a shard manifest lists already is skipped (``present``), so
a task Dask runs twice, or two copies at once, never folds a warp twice.
"""

from __future__ import annotations

import os
import random
import threading
import time
from collections import OrderedDict

from streamcoadd.core.errors import WarpRejected
from streamcoadd.core.fold import PreparedWarp
from streamcoadd.core.skymap import PatchId
from streamcoadd.pipeline.admission import ShardVerdict, shard_verdict
from streamcoadd.pipeline.fold_step import (
    cached_shard,
    fold_into_shard,
    forget_shard,
    forget_shards,
)
from streamcoadd.pipeline.memory import retain_freed_memory
from streamcoadd.pipeline.source import WarpChanged, load_warp, route
from streamcoadd.store.state import ShardConflict, StateStore

ShardKey = tuple  # (tract, px, py, band): plain values, cheap to send to workers

MAX_CONFLICT_ATTEMPTS = 8  # compare-and-swap retries of one task on one shard

# (thread id, state root) -> (state.json identity, worker StateStore): one store per
# executor thread, so that a task's commit() only ever sees its own shard.
_stores: dict[tuple[int, str], tuple[tuple, object]] = {}
_prepared_lock = threading.Lock()
_prepared: OrderedDict[str, tuple[PreparedWarp, int]] = OrderedDict()  # hash -> (warp, bytes)


_counters = {"warps_read": 0}


def _worker_store(root: str):
    """This thread's worker store of ``root`` (shard-locking mode), kept between tasks so
    that a shard's accumulators stay in memory when its next task lands on the same worker."""
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


def fold_prepared(store, shard, path: str, h: str, prepared, failed) -> dict:
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
    store.tune(cache_bytes)
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
                results[i] = fold_prepared(store, shard, path, h, prepared, failed)
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
    store.tune(cache_bytes)
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
                self.per_warp[key][h] = fold_prepared(store, self.shards[key], self.paths[h],
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
