"""``streamcoadd watch``: the daemon loop that folds warps as they arrive in an inbox.

The event source (which inbox files are complete) is :class:`streamcoadd.service.inbox.Inbox`;
this module is the loop: take a file, submit it to the ingestor, commit, and hand the file
to :class:`~streamcoadd.service.quarantine.Quarantine` once its outcome is final. Settings:
:mod:`~streamcoadd.service.settings`; log: :mod:`~streamcoadd.service.logs`; write-error
pause: :mod:`~streamcoadd.service.pause`; counts and throughput:
:mod:`~streamcoadd.service.stats`; status file: :mod:`~streamcoadd.service.status`;
systemd: :mod:`~streamcoadd.service.systemd`. Guarantees (see ``docs/operations.md``):

* **The inbox is the replay log.** A file leaves the inbox only after the ingestor's
  ``commit()`` returned its outcome (folded / no cells: the contribution is durable),
  or at once when it is a duplicate (already durable) or rejected (state untouched).  If the
  process dies at any instant, the next run re-submits what is still in the inbox and the
  core skips what is already durable.
* A write error (disk full, quota, I/O error) while committing, recording a rejection or
  moving a file to done/ or rejected/ **pauses** folding: the uncommitted batch is dropped
  from memory (its files stay in the inbox), the status says ``paused``, and a cheap probe
  is retried with bounded exponential back-off; folding resumes by itself once writing
  works again (``on_write_error = "exit"``: exit 75 instead).
* One daemon per state: the state's exclusive lock is taken before anything else.
* SIGTERM / SIGINT: stop taking files, commit what is pending (``on_stop = "commit"``) or
  leave it in the inbox (``"abandon"``), exit 0.  A second signal abandons at once.
* Memory is bounded: only names of inbox files are tracked (at most ``max_tracked``), and a
  file is read only when it is submitted.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from dataclasses import asdict
from pathlib import Path

from streamcoadd.service.batch import Batch, CommitResult, IngestorFactory
from streamcoadd.service.inbox import Inbox
from streamcoadd.service.logs import event, flush, log, utcnow
from streamcoadd.service.pause import WritePause
from streamcoadd.service.quarantine import Quarantine
from streamcoadd.service.settings import Settings
from streamcoadd.service.signals import StopSignals
from streamcoadd.service.stats import DaemonStats
from streamcoadd.service.status import StatusWriter
from streamcoadd.service.systemd import SdNotify
from streamcoadd.store.state import StateStore
from streamcoadd.store.status_file import STATUS_VERSION, status_path

# exit codes (documented in docs/operations.md and used by config/streamcoadd.service)
EXIT_OK = 0
EXIT_ERROR = 2  # configuration / usage / no state: restarting will not help (as the CLI)
EXIT_LOCKED = 4  # another process holds the state's writer lock
EXIT_SOFTWARE = 70  # internal error (a bug); pending warps stay in the inbox
EXIT_TEMPFAIL = 75  # write error with on_write_error = "exit" (disk full, ...): retry later

__all__ = [
    "EXIT_ERROR",
    "EXIT_LOCKED",
    "EXIT_OK",
    "EXIT_SOFTWARE",
    "EXIT_TEMPFAIL",
    "Daemon",
    "IngestorFactory",
]


class Daemon:
    """One daemon on one state. ``run()`` returns the exit status (``EXIT_*``)."""

    def __init__(self, state_dir: Path, settings: Settings, make_ingestor: IngestorFactory):
        cfg = self.cfg = settings.daemon
        self.state_dir = Path(state_dir)
        self.run_config = settings.run
        self.make_ingestor = make_ingestor
        self.inbox_dir = Path(cfg.inbox).absolute()
        self.done_dir = Path(cfg.done).absolute() if cfg.done else self.inbox_dir.parent / "done"
        self.rejected_dir = (Path(cfg.rejected).absolute() if cfg.rejected
                             else self.inbox_dir.parent / "rejected")
        self.status_writer = StatusWriter(
            Path(cfg.status_file) if cfg.status_file else status_path(self.state_dir),
            Path(cfg.metrics_file) if cfg.metrics_file else None, cfg.status_interval)
        self.signals = StopSignals(self._abandon_now)
        self.stats = DaemonStats(cfg.throughput_window, cfg.throughput_warps)
        self.pause = WritePause(self.state_dir, cfg.write_retry_initial, cfg.write_retry_max)
        self.notify = SdNotify()
        self.wake = threading.Event()
        self.started = utcnow()
        self.t0 = time.monotonic()
        self.state = "starting"
        self.store: StateStore | None = None
        self.batch: Batch | None = None
        self.inbox: Inbox | None = None
        self.quarantine: Quarantine | None = None
        self._last_take = 0.0
        self._idle_since: float | None = None

    # ---------------------------------------------------------------- main
    def run(self) -> int:
        # the lock first: a second daemon must not touch anything
        self.store = StateStore.open(self.state_dir, write=True)
        self.status_writer.remove_stale_tmp()
        try:
            Quarantine.prepare_dirs(self.inbox_dir, self.done_dir, self.rejected_dir,
                                    self.cfg.delete_done)
            self.signals.install()
            self.inbox = Inbox(self.inbox_dir, stable_seconds=self.cfg.stable_seconds,
                               poll=self.cfg.poll or None,
                               reconcile_interval=self.cfg.reconcile_interval,
                               patterns=self.cfg.patterns, max_tracked=self.cfg.max_tracked,
                               wake=self.wake)
            self.quarantine = Quarantine(self.inbox, self.done_dir, self.rejected_dir,
                                         self.cfg.delete_done, self.state_dir, self.pause,
                                         self.stats)
            self.batch = Batch(self.store, self.run_config, self.make_ingestor, self.inbox,
                               self.quarantine, self.stats, self.pause)
            self.inbox.start()
            event(logging.INFO, "start", pid=os.getpid(), state=str(self.state_dir),
                  inbox=str(self.inbox_dir),
                  done="(delete)" if self.cfg.delete_done else str(self.done_dir),
                  rejected=str(self.rejected_dir), observer=self.inbox.observer_kind,
                  stable_s=self.cfg.stable_seconds, commit_every=self.run_config.commit_every,
                  commit_interval_s=self.run_config.commit_interval,
                  status=str(self.status_writer.status_file))
            self._set_state("running")
            self.notify.send(f"READY=1\nMAINPID={os.getpid()}\nSTATUS=watching {self.inbox_dir}")
            return self._loop()
        finally:
            self._shutdown()

    def _loop(self) -> int:
        while True:
            if self.signals.stop_requested:
                return self._stop()
            if self.pause.requested:
                code = self._enter_pause()
                if code is not None:
                    return code
            if self.pause.active:
                self._paused_step()
                self._idle_since = None
                continue
            self.notify.ping()
            if self.signals.take_rescan():
                self.inbox.request_rescan()
            self.inbox.ensure_alive()
            self.inbox.refresh()
            name = self.inbox.next_ready()
            code = self._work_step(name) if name is not None else self._idle_step()
            if code is not None:
                return code

    def _work_step(self, name: str) -> int | None:
        self._idle_since = None
        if self.state == "idle":
            self._set_state("running")
        code = self._take(name)
        if code is not None or self.pause.requested:
            return code
        if self.batch.needs_commit():
            return self._commit("batch")
        self._write_status()
        return None

    def _idle_step(self) -> int | None:
        """Nothing ready now: commit a quiet batch, notice idleness, then wait."""
        now = time.monotonic()
        until_idle = self.cfg.until_idle
        quiet = now - self._last_take >= self.cfg.idle_commit
        if self.batch.pending and ((quiet and not self.inbox.has_waiting())
                                 or self.batch.needs_commit()):
            return self._commit("interval" if self.batch.needs_commit() else "idle")
        busy = self.batch.pending or self.inbox.has_untaken() or self.batch.inflight
        if busy:
            self._idle_since = None
        elif self._idle_since is None:
            self._idle_since = now
            self._set_state("idle")
        if until_idle and self._idle_since is not None and now - self._idle_since >= until_idle:
            # events are hints: one last full scan before concluding there is nothing
            self.inbox.request_rescan()
            self.inbox.refresh()
            if not self.inbox.has_untaken():
                event(logging.INFO, "idle-exit", idle_s=round(now - self._idle_since, 1))
                return self._stop(reason="idle")
            self._idle_since = None
            return None
        if busy and self.state == "idle":
            self._set_state("running")
        self._write_status()
        self._wait(self._idle_timeout(now))
        return None

    def _idle_timeout(self, now: float) -> float:
        timeout = min(1.0, self.cfg.status_interval, self.inbox.time_to_reconcile(now))
        nxt = self.inbox.next_check_in(now)
        if nxt is not None:
            timeout = min(timeout, nxt + 0.01)
        if self.batch.pending:
            timeout = min(timeout, max(0.05, self._last_take + self.cfg.idle_commit - now))
        if self.cfg.until_idle and self._idle_since is not None:
            timeout = min(timeout, max(0.0, self._idle_since + self.cfg.until_idle - now) + 0.01)
        return timeout

    def _wait(self, timeout: float) -> None:
        # every wait is at most 1 s (signals only set flags) and at most the watchdog's half
        if self.notify.watchdog:
            timeout = min(timeout, self.notify.watchdog)
        self.wake.wait(max(timeout, 0.01))
        self.wake.clear()

    def _set_state(self, s: str) -> None:
        if s != self.state:
            self.state = s
            self._write_status(force=True)

    # ---------------------------------------------------------------- one file
    def _take(self, name: str) -> int | None:
        self._last_take = time.monotonic()
        if self.batch.take(name, self._last_take):
            return None
        self.state = "failed"  # an internal error left the batch unaccounted for
        return EXIT_SOFTWARE

    # ---------------------------------------------------------------- commit
    def _commit(self, why: str) -> int | None:
        result = self.batch.commit(why)
        if result is CommitResult.FAILED:
            self.state = "failed"
            return EXIT_SOFTWARE
        if result is CommitResult.DONE:
            self._write_status(force=True)
        return None

    # ---------------------------------------------------------------- write-error pause
    def _enter_pause(self) -> int | None:
        req = self.pause.take_request()
        self.stats.error(req.message, write_error=True)
        requeued = req.requeued + self.batch.drop_uncommitted()
        if self.cfg.on_write_error == "exit":
            event(logging.ERROR, "commit-failed", during=req.during, path=req.path,
                  errno=req.errno, error=req.error, pending=requeued,
                  note="on_write_error = exit: the warps stay in the inbox and are folded "
                       "at the next start (exit status 75)")
            self.state = "failed"
            return EXIT_TEMPFAIL
        self.pause.begin(req, requeued)
        self.state = "paused"
        self.notify.send(f"STATUS=paused: cannot write {req.path} ({req.error})")
        self._write_status(force=True)
        return None

    def _paused_step(self) -> None:
        now = time.monotonic()
        probed, ok = self.pause.step(now)
        if ok:
            self.pause.end()
            self.state = "running"
            self.inbox.request_rescan()
            self.notify.send("STATUS=running")
            self._write_status(force=True)
            return
        if probed:
            self.stats.mark_changed()
        self.notify.ping()
        self.inbox.ensure_alive()
        self.inbox.refresh()  # keep the queue counts of the status current
        self._write_status()
        self._wait(min(self.pause.time_to_probe(now), 1.0, self.cfg.status_interval))

    # ---------------------------------------------------------------- stop
    def _stop(self, reason: str = "signal") -> int:
        if self.pause.requested and not self.pause.active:
            # a write failed just before the signal: drop the batch (it stays in the inbox)
            code = self._enter_pause()
            if code is not None:
                return code
        self.state = "stopping"
        self._write_status(force=True)
        self.notify.send("STOPPING=1")
        pending = self.batch.pending
        if pending and not self.pause.active and self.cfg.on_stop == "commit":
            code = self._commit("stop")
            if code is not None:
                return code
            if self.pause.requested and (code := self._last_commit_failed(pending)) is not None:
                return code
        elif pending:
            event(logging.INFO, "abandon", pending=pending,
                  note="pending warps stay in the inbox and are folded at the next start")
            self.batch.abandon()
        event(logging.INFO, "stop", reason=reason, signal=self.signals.signal_name,
              **asdict(self.stats.counts))
        self.state = "stopped"
        return EXIT_OK

    def _last_commit_failed(self, pending: int) -> int | None:
        """The commit at stop failed to write: nothing is lost (the inbox keeps it)."""
        req = self.pause.take_request()
        self.stats.error(req.message, write_error=True)
        event(logging.ERROR, "commit-failed", during=req.during, path=req.path,
              errno=req.errno, error=req.error, pending=pending,
              note="stopping anyway: the pending warps stay in the inbox and are "
                   "folded at the next start")
        if self.cfg.on_write_error == "exit":
            self.state = "failed"
            return EXIT_TEMPFAIL
        self.batch.drop_uncommitted()
        return None

    def _abandon_now(self, signal_name: str) -> None:
        """A second signal: abandon whatever is pending (it stays in the inbox) and exit."""
        event(logging.WARNING, "stop", signal=signal_name, action="abandon-now",
              pending=len(self.batch.inflight) if self.batch else 0)
        flush()
        os._exit(EXIT_OK)

    def _shutdown(self) -> None:
        if self.inbox is not None:
            self.inbox.stop()
        if self.state not in ("stopped", "failed"):
            self.state = "failed"
        try:
            self._write_status(force=True)
        except Exception:  # noqa: BLE001 - exiting anyway; the status is informative only
            pass
        if self.batch is not None:
            self.batch.close()
        if self.store is not None:
            try:
                self.store.close()
            except Exception as e:  # noqa: BLE001
                log.error("closing the state failed: %s", e)

    # ---------------------------------------------------------------- status
    def status(self) -> dict:
        """The status file's content (keys: docs/operations.md, "Status file")."""
        now = time.monotonic()
        ib = self.inbox
        return {
            "version": STATUS_VERSION, "pid": os.getpid(), "host": socket.gethostname(),
            "state": self.state, "started": self.started, "updated": utcnow(),
            "uptime_s": round(now - self.t0, 1),
            "state_dir": str(self.state_dir.absolute()), "inbox": str(self.inbox_dir),
            "done": None if self.cfg.delete_done else str(self.done_dir),
            "rejected": str(self.rejected_dir),
            **self.stats.summary(now, now - self.t0),
            "pending": self.batch.pending if self.batch else 0,
            "queue": ib.counts() if ib else {},
            "observer": ib.observer_status() if ib else {"kind": None, "alive": False},
            "paused": self.pause.status(now),
            "bytes_written": self.store.bytes_written if self.store is not None else 0,
        }

    def _write_status(self, force: bool = False) -> None:
        now = time.monotonic()
        if force or self.status_writer.due(now, self.stats.changed):
            self.stats.take_changed()
            self.status_writer.write(self.status(), now)

