"""The daemon's batch: the ingestor, and the inbox files folded in memory but not yet
durable, until a commit returns their final outcomes (then the quarantine takes them out
of the inbox) or the batch is dropped (then they go back to the inbox's queue)."""

from __future__ import annotations

import logging
import os
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum
from pathlib import Path

from streamcoadd.core.config import RunConfig
from streamcoadd.core.errors import WarpRejected
from streamcoadd.pipeline.outcome import Ingestor
from streamcoadd.service.inbox import Inbox, fingerprint
from streamcoadd.service.logs import event, log
from streamcoadd.service.pause import WritePause, is_write_error
from streamcoadd.service.quarantine import Quarantine
from streamcoadd.service.stats import DaemonStats, WarpEvent
from streamcoadd.store import durable
from streamcoadd.store.state import StateStore

# make_ingestor(store, run_config) -> the local ingestor or Dask's coordinator
IngestorFactory = Callable[[StateStore, RunConfig], Ingestor]


@dataclass(frozen=True)
class InFlight:
    """A file submitted and folded in memory, waiting for its commit."""

    name: str
    fp: tuple  # (dev, ino, size, mtime_ns) at submit
    ms: float  # the ingestor's submit time, milliseconds
    t_start: float  # monotonic s when it was taken
    pixels: int  # input pixels (throughput)


class CommitResult(Enum):
    DONE = "done"  # durable; the files left the inbox
    WRITE_ERROR = "write-error"  # a pause was requested; nothing was lost
    FAILED = "failed"  # an unexpected error (a bug): the batch is abandoned to the inbox


class Batch:
    """The ingestor and its files in flight (owned by the daemon loop)."""

    def __init__(self, store: StateStore, run: RunConfig, make_ingestor: IngestorFactory,
                 inbox: Inbox, quarantine: Quarantine, stats: DaemonStats, pause: WritePause):
        self.store = store
        self.run = run
        self.make_ingestor = make_ingestor
        self.inbox = inbox
        self.quarantine = quarantine
        self.stats = stats
        self.pause = pause
        self.ing = make_ingestor(store, run)
        self.inflight: dict[str, InFlight] = {}  # by the path submitted

    @property
    def pending(self) -> int:
        """Warps folded in memory, not yet durable (as the ingestor counts them)."""
        return self.ing.pending

    def needs_commit(self) -> bool:
        return self.ing.needs_commit()

    def take(self, name: str, t_take: float) -> bool:
        """Submit inbox file ``name`` (taken at ``t_take``, monotonic s) and dispose of
        it if its outcome is final. False: an internal error left the batch in memory
        unaccounted for (the caller must exit; the files stay in the inbox)."""
        path = self.inbox.path / name
        try:
            st = os.stat(path)
        except FileNotFoundError:
            self.inbox.forget(name)
            return True
        fp = fingerprint(st)
        if path.is_symlink():
            target = Path(os.path.realpath(path))
            if Path(os.path.realpath(self.inbox.path)) not in target.parents:
                self._reject(name, fp, f"symbolic link pointing out of the inbox (to {target}); "
                                       "refused: deliver the file itself (write NAME.tmp, "
                                       "rename)", None)
                return True
        nxt = self.inbox.peek_ready()  # read and prepared on a second core meanwhile
        try:
            o = self.ing.submit(path, then=self.inbox.path / nxt if nxt else None)
        except WarpRejected as e:  # contract: rejections are outcomes, but be lenient
            self._reject(name, fp, e.reason, None)
            return True
        except FileNotFoundError:
            self.inbox.forget(name)
            return True
        except Exception as e:  # noqa: BLE001
            if is_write_error(e):
                # e.g. the ledger could not record a rejection on a full disk: not the
                # file's fault; it stays in the inbox and is looked at after the pause
                self.inbox.release(name)
                self.pause.request("submit", e, requeued=1)
                return True
            return self._internal_error(name, fp, e)
        return self._submitted(name, path, fp, o, t_take)

    def _submitted(self, name: str, path: Path, fp: tuple, o, t_take: float) -> bool:
        status = str(o.status)
        if status == "pending":
            self.inflight[str(path)] = InFlight(name, fp, o.ms, t_take, o.pixels)
        elif status == "duplicate":
            self.quarantine.finish(WarpEvent.of(name, o, "duplicate"), fp)
        elif status == "rejected":
            self._reject(name, fp, o.reason or "rejected (no reason given)", o)
        elif status in ("folded", "no_cells"):  # an ingestor that commits by itself
            if status == "folded":
                self.stats.throughput.add(t_take, time.monotonic(), o.pixels)
            self.quarantine.finish(WarpEvent.of(name, o, status), fp)
        else:
            return self._internal_error(name, fp,
                                        RuntimeError(f"unexpected outcome status {status!r}"))
        return True

    def _reject(self, name: str, fp: tuple, reason: str, o, detail: str | None = None) -> None:
        self.quarantine.reject(WarpEvent.of(name, o, "rejected", reason), fp, detail)

    def _internal_error(self, name: str, fp: tuple, exc: BaseException) -> bool:
        """A bug, or an unexpected error (I/O, memory) while reading or folding one file.

        The file is quarantined in rejected/ with the traceback (so that a restart does not
        trip on it again). The core drops all uncommitted work when a fold fails half-way:
        then the files of the dropped batch are handed back to the queue and folded again.
        If the in-memory batch cannot be accounted for, abandon it (it stays in the inbox,
        the replay log) and exit non-zero."""
        tb = traceback.format_exc()
        log.error("internal error on %s: %s: %s\n%s", name, type(exc).__name__, exc,
                  tb.rstrip())
        self.stats.error(f"{name}: {type(exc).__name__}: {exc}")
        self._reject(name, fp, f"internal error while folding ({type(exc).__name__}: {exc}); "
                               "see the daemon log", None, detail=tb)
        return self._after_fold_error()

    def commit(self, why: str) -> CommitResult:
        """Make the batch durable and hand every file to the quarantine."""
        n = self.ing.pending
        t = time.monotonic()
        try:
            need = self.store.dirty_bytes()
        except Exception:  # noqa: BLE001 - an estimate only
            need = 0
        try:
            outcomes = self.ing.commit()
        except OSError as e:  # StateWriteError (disk full, quota, EIO), or any I/O error
            self.pause.request("commit", e, need=need)
            return CommitResult.WRITE_ERROR
        except Exception as e:  # noqa: BLE001
            self.stats.error(f"commit failed: {type(e).__name__}: {e}")
            log.exception("commit failed (pending warps stay in the inbox and are replayed)")
            self.inflight.clear()
            return CommitResult.FAILED
        t_done = time.monotonic()
        durable.crash_point("daemon-before-done")  # durable, in the inbox: replayed as duplicate
        self.stats.commit(n, t_done - t, why)
        self.pause.writes_work()
        handed = [self._committed(o, t_done) for o in outcomes or ()]
        if any(handed):
            self.quarantine.sync_dirs()
        for inf in self.inflight.values():
            # not reported by commit: leave it in the inbox; it is replayed (duplicate) later
            log.warning("commit did not report %s; leaving it in the inbox", inf.name)
            self.inbox.forget(inf.name)
        self.inflight.clear()
        event(logging.INFO, "commit", warps=n, seconds=round(t_done - t, 3), why=why)
        return CommitResult.DONE

    def _committed(self, o, t_done: float) -> bool:
        """Hand one final outcome of a commit to the quarantine; False if it matches no
        file in flight."""
        key = str(o.path)
        inf = self.inflight.pop(key, None)
        if inf is None:  # match on the name (the ingestor may have normalised the path)
            k = next((k for k, v in self.inflight.items() if v.name == Path(key).name), None)
            inf = self.inflight.pop(k) if k is not None else None
        if inf is None:
            log.warning("commit returned an outcome for an unknown file %s", key)
            return False
        status = str(o.status)
        if status == "rejected":
            self.quarantine.reject(WarpEvent.of(inf.name, o, "rejected", o.reason or "rejected"),
                                   inf.fp)
            return True
        outcome = status if status in ("duplicate", "no_cells") else "folded"
        if outcome == "folded":
            self.stats.throughput.add(inf.t_start, t_done, inf.pixels)
        self.quarantine.finish(WarpEvent.of(inf.name, o, outcome, ms=o.ms or inf.ms), inf.fp,
                               fsync=False)
        return True

    def _after_fold_error(self) -> bool:
        """After an internal error while folding one file: True if the batch in memory is
        still accounted for (intact, or dropped by the core and requeued here), False if
        it is not (the caller must abandon it to the inbox and exit)."""
        pending = self.ing.pending
        if pending == len(self.inflight):
            return True
        if pending == 0:
            event(logging.WARNING, "requeue", files=len(self.inflight),
                  note="uncommitted batch dropped by the core; folding those files again")
            self.requeue()
            return True
        event(logging.ERROR, "abort", reason="internal error", pending_abandoned=pending,
              note="pending warps stay in the inbox and are replayed at the next start")
        self.abandon()
        return False

    def requeue(self) -> None:
        """Hand the files in flight back to the inbox's queue, in their order."""
        names = [inf.name for inf in self.inflight.values()]
        self.inflight.clear()
        for name in reversed(names):
            self.inbox.release(name)

    def abandon(self) -> None:
        """Forget the files in flight: they stay in the inbox for the next start."""
        self.inflight.clear()

    def drop_uncommitted(self) -> int:
        """Forget the folded, uncommitted batch (in memory only) and start a fresh
        ingestor; its files go back to the queue. The inbox is the replay log: nothing is
        lost. Returns how many warps were dropped."""
        n = self.ing.pending
        try:
            self.store.discard_uncommitted()
        finally:
            self.close()
            self.ing = self.make_ingestor(self.store, self.run)
            self.requeue()
        return n

    def close(self) -> None:
        """Close the ingestor (its loader thread); errors are logged, never raised."""
        try:
            self.ing.close()
        except Exception as e:  # noqa: BLE001 - replacing or leaving it anyway
            log.error("closing the ingestor failed: %s", e)
