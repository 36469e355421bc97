"""Fold warp files into a state, several per durable commit.

``Ingestor.submit(path)`` reads, validates and folds one warp in memory; ``commit()``
makes every pending warp durable at once. Callers (``ingest``, the daemon) must keep a
warp's file until ``commit()`` has returned its outcome: the files are the replay log.
``Ingestor.submit(path, then=next_path)`` reads and prepares the next file on a second
core while ``path`` folds (``RunConfig.prefetch``; see :mod:`streamcoadd.pipeline.loader`).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from streamcoadd.core.config import RunConfig
from streamcoadd.core.errors import WarpRejected
from streamcoadd.core.fold import CellInput, PreparedWarp, fold_cell, shard_inputs  # noqa: F401 (re-export)
from streamcoadd.core.warp import WarpId
from streamcoadd.pipeline.loader import WarpLoader
from streamcoadd.pipeline.memory import retain_freed_memory
from streamcoadd.store.ledger import WarpRecord
from streamcoadd.store.state import Shard, StateStore


@dataclass
class Outcome:
    """What happened to one file. ``status``: pending (folded in memory, not yet
    durable), folded, no_cells (valid, covers no cell fully; recorded as seen),
    duplicate (already in the state), rejected (``reason`` says why)."""

    path: str
    status: str
    reason: str = ""
    warp_id: WarpId | None = None
    band: str = ""
    cells: int = 0
    ms: float = 0.0
    content_hash: str = ""
    weight: float = 0.0


class Ingestor:
    def __init__(self, store: StateStore, run: RunConfig = RunConfig(),
                 allow_refold: bool = False):
        if not store.write:
            raise ValueError("Ingestor needs a state opened for writing")
        retain_freed_memory()
        self.store = store
        self.run = run
        self.allow_refold = allow_refold  # fold again warps that were retracted
        store.cache_bytes = int(run.cache_gb * 1e9)
        store.commit_processes = run.commit_processes
        self.loader = WarpLoader(store.skymap, store.fold, depth=run.prefetch)
        self._pending: list[Outcome] = []
        self._first_pending_at: float | None = None

    def close(self) -> None:
        """Stop the loader thread (pending work is not committed: call commit first)."""
        self.loader.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    @property
    def pending(self) -> int:
        return len(self._pending)

    def needs_commit(self) -> bool:
        if not self._pending:
            return False
        return (len(self._pending) >= self.run.commit_every
                or time.monotonic() - self._first_pending_at >= self.run.commit_interval
                or self.store.dirty_bytes() >= self.store.cache_bytes)

    def submit(self, path, then=None) -> Outcome:
        """Read, validate and fold ``path`` in memory. ``then``: the file that will be
        submitted next, read and prepared in the background while this one folds."""
        t0 = time.perf_counter()
        path = str(path)
        try:
            outcome = self._submit(path, then)
        except WarpRejected as e:
            self.store.ledger.record_rejection(path, e.reason)
            outcome = Outcome(path, "rejected", reason=e.reason)
        outcome.ms = (time.perf_counter() - t0) * 1e3
        if outcome.status == "pending":
            if not self._pending:
                self._first_pending_at = time.monotonic()
            self._pending.append(outcome)
        return outcome

    def commit(self) -> list[Outcome]:
        """Make all pending warps durable; returns their final outcomes."""
        if not self._pending:
            return []
        self.store.commit()
        records = []
        for o in self._pending:
            o.status = "folded" if o.cells else "no_cells"
            records.append(WarpRecord(o.content_hash, o.warp_id.tract, o.warp_id.visit,
                                      o.warp_id.detector, o.band, o.path, o.status, o.cells,
                                      o.weight, time.time()))
        self.store.ledger.record_warps(records)
        done, self._pending = self._pending, []
        return done

    # ------------------------------------------------------------------ internals
    def _submit(self, path: str, then) -> Outcome:
        store = self.store
        loaded = self.loader.take(path)
        if then is not None:
            self.loader.prefetch(then)
        h = loaded.content_hash
        known = ledger_duplicate(store, path, h, self.allow_refold)
        if known is not None:
            return known
        for o in self._pending:
            if o.content_hash == h:
                return Outcome(path, "duplicate", reason=f"same content as {o.path}",
                               warp_id=o.warp_id, band=o.band, content_hash=h)
        if loaded.rejection is not None:
            raise loaded.rejection
        prepared = loaded.prepared
        warp = prepared.warp
        self._check_identity(warp.id, h, path)

        # Plan everything first, so that a rejection leaves memory untouched.
        plan: list[tuple[Shard, list[CellInput]]] = []
        durable_cells = 0
        for patch, inputs in loaded.inputs.items():  # the overlap rule, applied by the loader
            shard = store.shard(patch, warp.band)
            if h in shard.warps:
                # Durable in this shard already (replay after a crash): count, don't fold.
                durable_cells += len(inputs)
                continue
            prior = _same_id(shard.warps, warp.id, h) or _same_id(shard.pending_warps, warp.id, h)
            if prior:
                raise WarpRejected(path, f"{warp.id} is already in the state with different "
                                         "content; retract it first if this is a replacement")
            plan.append((shard, inputs))

        n_cells = durable_cells
        try:
            for shard, inputs in plan:
                n_cells += fold_into_shard(store, shard, inputs, prepared)
        except BaseException:
            # A half-folded warp must never reach a commit: drop all uncommitted work.
            store.discard_uncommitted()
            self._pending = []
            raise
        return Outcome(path, "pending", warp_id=warp.id, band=warp.band, cells=n_cells,
                       content_hash=h, weight=prepared.weight)

    def _check_identity(self, wid: WarpId, h: str, path: str) -> None:
        for rec in self.store.ledger.find_id(wid.tract, wid.visit, wid.detector):
            if rec.content_hash != h and rec.status != "retracted":
                raise WarpRejected(path, f"{wid} was already folded from {rec.path} with "
                                         "different content; retract it first if this file "
                                         "replaces it")
        for o in self._pending:
            if o.warp_id == wid and o.content_hash != h:
                raise WarpRejected(path, f"{wid} is also in {o.path} with different content")


def fold_into_shard(store: StateStore, shard: Shard, inputs: list[CellInput],
                    prepared: PreparedWarp) -> int:
    """Fold a prepared warp into the cells ``inputs`` of ``shard`` (in memory) and mark it
    pending in the shard, so that the shard's next commit lists its hash. The caller has
    checked that the hash is not in ``shard.warps`` already. Returns the number of cells."""
    for cin in inputs:
        fold_cell(store.cell_for_write(shard, cin.cell), cin, prepared, store.fold)
    if inputs:
        w = prepared.warp
        shard.pending_warps[w.content_hash] = (w.id.visit, w.id.detector)
    return len(inputs)


def ledger_duplicate(store: StateStore, path: str, h: str,
                     allow_refold: bool) -> Outcome | None:
    """The ``duplicate`` outcome if the ledger already has this content; raises
    ``WarpRejected`` for retracted content unless ``allow_refold``; None if new."""
    rec = store.ledger.get(h)
    if rec is None:
        return None
    if rec.status != "retracted":
        return Outcome(path, "duplicate", reason=f"already folded from {rec.path}",
                       warp_id=WarpId(rec.tract, rec.visit, rec.detector), band=rec.band,
                       content_hash=h)
    if not allow_refold:
        raise WarpRejected(path, f"visit {rec.visit} detector {rec.detector} was retracted; "
                                 "to fold it again use 'streamcoadd ingest --allow-refold'")
    return None


def _same_id(warps: dict[str, tuple[int, int]], wid: WarpId, h: str) -> bool:
    return any(v == (wid.visit, wid.detector) and k != h for k, v in warps.items())
