"""The local executor: fold warp files into a state, several per durable commit.

``LocalIngestor.submit(path)`` reads, validates and folds one warp in memory; ``commit()``
makes every pending warp durable at once. Callers (``ingest``, the daemon) must keep a
warp's file until an outcome other than ``pending`` has been returned for it: the files are
the replay log. A copy of a warp of the uncommitted batch is ``pending`` too, and its
``duplicate`` outcome comes with its original's, from ``commit()``.
``submit(path, then=next_path)`` reads and prepares the next file on a second core while
``path`` folds (``RunConfig.prefetch``; see :mod:`streamcoadd.pipeline.loader`).
"""

from __future__ import annotations

import time
from dataclasses import replace

from streamcoadd.core.config import RunConfig
from streamcoadd.core.errors import WarpRejected
from streamcoadd.core.fold import CellInput
from streamcoadd.pipeline.admission import (
    Admission,
    ContentVerdict,
    ShardVerdict,
    shard_verdict,
)
from streamcoadd.pipeline.fold_step import fold_into_shard
from streamcoadd.pipeline.loader import WarpLoader
from streamcoadd.pipeline.memory import retain_freed_memory
from streamcoadd.pipeline.outcome import Outcome, OutcomeStatus
from streamcoadd.store.ledger import WarpRecord
from streamcoadd.store.state import Shard, StateStore

__all__ = ["LocalIngestor", "Outcome", "OutcomeStatus", "warp_records"]


def warp_records(outcomes: list[Outcome]) -> list[WarpRecord]:
    """The ledger rows of final folded / no_cells outcomes."""
    now = time.time()
    return [WarpRecord(o.content_hash, o.warp_id.tract, o.warp_id.visit, o.warp_id.detector,
                       o.band, o.path, str(o.status), o.cells, o.weight, now)
            for o in outcomes]


class LocalIngestor:
    """Folds warps in this process (implements :class:`streamcoadd.pipeline.outcome.Ingestor`).

    Parameters
    ----------
    store : StateStore
        Opened for writing.
    run : RunConfig
        Batch size and age, cache, prefetch depth, commit processes.
    allow_refold : bool
        Fold again warps that were retracted.
    """

    def __init__(self, store: StateStore, run: RunConfig = RunConfig(),
                 allow_refold: bool = False):
        if not store.write:
            raise ValueError("LocalIngestor needs a state opened for writing")
        retain_freed_memory()
        self.store = store
        self.run = run
        self.admission = Admission(store, allow_refold)
        store.tune(int(run.cache_gb * 1e9), run.commit_processes)
        self.loader = WarpLoader(store.skymap, store.fold, depth=run.prefetch)
        self._pending: list[Outcome] = []
        self._copies: list[Outcome] = []  # in-batch duplicates, released at the commit
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
        return len(self._pending) + len(self._copies)

    def needs_commit(self) -> bool:
        if not self.pending:
            return False
        return (self.pending >= self.run.commit_every
                or time.monotonic() - self._first_pending_at >= self.run.commit_interval
                or self.store.dirty_bytes() >= self.store.cache_bytes)

    def submit(self, path, then=None) -> Outcome:
        """Read, validate and fold ``path`` in memory. ``then``: the file that will be
        submitted next, read and prepared in the background while this one folds."""
        t0 = time.perf_counter()
        path = str(path)
        copy = False
        # Clean cells (a cache of committed ones) give way before this warp adds its own,
        # so clean + dirty stay within cache_gb plus one warp's cells, also for warps
        # spread over many patches (detector warps), which leave many clean cells behind.
        self.store.trim_cache(self.store.cache_bytes)
        try:
            outcome, copy = self._submit(path, then)
        except WarpRejected as e:
            self.store.ledger.record_rejection(path, e.reason)
            outcome = Outcome(path, OutcomeStatus.REJECTED, reason=e.reason)
        outcome = replace(outcome, ms=(time.perf_counter() - t0) * 1e3)
        if outcome.status == OutcomeStatus.PENDING:
            if not self.pending:
                self._first_pending_at = time.monotonic()
            (self._copies if copy else self._pending).append(outcome)
        return outcome

    def commit(self) -> list[Outcome]:
        """Make all pending warps durable; returns their final outcomes, and those of the
        in-batch copies (``duplicate``), now that their originals are durable."""
        if not self.pending:
            return []
        self.store.commit()
        done = [replace(o, status=OutcomeStatus.FOLDED if o.cells else OutcomeStatus.NO_CELLS)
                for o in self._pending]
        self.store.ledger.record_warps(warp_records(done))
        self.admission.committed([(o.content_hash, o.warp_id, o.cells > 0) for o in done])
        done += [replace(o, status=OutcomeStatus.DUPLICATE) for o in self._copies]
        self._pending, self._copies = [], []
        return done

    # ------------------------------------------------------------------ internals
    def _submit(self, path: str, then) -> tuple[Outcome, bool]:
        """The outcome, and whether it is an in-batch copy of a pending warp."""
        loaded = self.loader.take(path)
        if then is not None:
            self.loader.prefetch(then)
        h = loaded.content_hash
        seen = self.admission.by_content(path, h)
        if seen.verdict == ContentVerdict.DUPLICATE:
            return Outcome(path, OutcomeStatus.DUPLICATE, reason=f"already folded from "
                           f"{seen.original}", warp_id=seen.warp_id, band=seen.band,
                           content_hash=h), False
        if seen.verdict == ContentVerdict.IN_BATCH:
            # Not durable yet: acknowledged with the original, at its commit.
            first = next(o for o in self._pending if o.content_hash == h)
            return replace(first, path=path, reason=f"same content as {first.path}"), True
        if loaded.rejection is not None:
            raise loaded.rejection
        prepared = loaded.prepared
        warp = prepared.warp
        self.admission.by_identity(path, h, warp.id)

        # Plan everything first, so that a rejection leaves memory untouched.
        plan: list[tuple[Shard, list[CellInput]]] = []
        durable_cells = 0
        for patch, inputs in loaded.inputs.items():  # the overlap rule, applied by the loader
            shard = self.store.shard(patch, warp.band)
            verdict = shard_verdict(shard, warp.id, warp.band, h)
            if verdict == ShardVerdict.PRESENT:
                # Durable in this shard already (replay after a crash): count, don't fold.
                durable_cells += len(inputs)
            elif verdict == ShardVerdict.FOLD:
                plan.append((shard, inputs))
            else:
                raise WarpRejected(path, f"{warp.id} is already in the state with different "
                                         "content; retract it first if this is a replacement")
        n_cells = durable_cells
        try:
            for shard, inputs in plan:
                n_cells += fold_into_shard(self.store, shard, inputs, prepared)
        except BaseException:
            # A half-folded warp must never reach a commit: drop all uncommitted work.
            self.store.discard_uncommitted()
            self._pending, self._copies = [], []
            self.admission.discard_pending()
            raise
        self.admission.add_pending(path, h, warp.id)
        return Outcome(path, OutcomeStatus.PENDING, warp_id=warp.id, band=warp.band,
                       cells=n_cells, content_hash=h, weight=prepared.weight,
                       pixels=warp.box.width * warp.box.height), False

