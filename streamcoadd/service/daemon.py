"""``streamcoadd watch``: the daemon that folds warps as they arrive in an inbox.

The event source (which inbox files are complete) is :class:`streamcoadd.service.inbox.Inbox`; this
module is what is done with a file (the ingest loop), plus locking, signals, logs and the
status file.  Guarantees (see ``docs/operations.md``):

* **The inbox is the replay log.** A file leaves the inbox only after the core's
  ``Ingestor.commit()`` returned its outcome (folded / no cells: the contribution is durable),
  or at once when it is a duplicate (already durable) or rejected (state untouched).  If the
  process dies at any instant, the next run re-submits what is still in the inbox and the
  core skips what is already durable.
* A write error (disk full, quota, I/O error) while committing, recording a rejection or
  moving a file to done/ or rejected/ **pauses** folding: the uncommitted batch is dropped
  from memory (its files stay in the inbox), the status says ``paused``, and a cheap probe
  (free space + a small fsynced test write) is retried with bounded exponential back-off;
  folding resumes by itself once writing works again (``on_write_error = "exit"``: exit 75
  instead, the old behaviour).
* One daemon per state: the state's exclusive lock is taken before anything else.
* SIGTERM / SIGINT: stop taking files, commit what is pending (``on_stop = "commit"``) or
  leave it in the inbox (``"abandon"``), exit 0.  A second signal abandons at once.
* Memory is bounded: only names of inbox files are tracked (at most ``max_tracked``), and a
  file is read only when it is submitted.
"""

from __future__ import annotations

import datetime as _dt
import errno
import json
import logging
import logging.handlers
import os
import re
import shutil
import signal
import socket
import sys
import threading
import time
import traceback
from collections import deque
from dataclasses import dataclass, fields
from pathlib import Path

from streamcoadd.core.errors import UserError
from streamcoadd.service.inbox import DEFAULT_PATTERNS, Inbox, fingerprint
from streamcoadd.service.metrics import prometheus_text
from streamcoadd.service.systemd import SdNotify
from streamcoadd.store.durable import crash_point
from streamcoadd.store.status_file import pid_alive, status_path

log = logging.getLogger("streamcoadd.service.daemon")


# exit codes (documented in docs/operations.md and used by config/streamcoadd.service)
EXIT_OK = 0
EXIT_ERROR = 2  # configuration / usage / no state: restarting will not help (as the CLI)
EXIT_LOCKED = 4  # another process holds the state's writer lock
EXIT_SOFTWARE = 70  # internal error (a bug); pending warps stay in the inbox
EXIT_TEMPFAIL = 75  # write error with on_write_error = "exit" (disk full, ...): retry later

# errors of a *write* that may go away by themselves or by an operator freeing space:
# the daemon pauses on them instead of quarantining a file as an internal error
WRITE_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
# temporary files the daemon writes in done/ and rejected/: .NAME.PID.tmp
_TMP_RE = re.compile(r"^\..+\.(\d+)\.tmp$")


# ---------------------------------------------------------------------------- configuration
@dataclass
class DaemonConfig:
    """The ``[daemon]`` table (``config/streamcoadd.toml``); command-line options override it."""

    inbox: str = ""
    done: str = ""  # default: a sibling of the inbox named "done"
    rejected: str = ""  # default: a sibling of the inbox named "rejected"
    delete_done: bool = False
    patterns: tuple = DEFAULT_PATTERNS
    stable_seconds: float = 5.0
    poll: float = 0.0  # > 0: PollingObserver with this period (network filesystems)
    reconcile_interval: float = 60.0
    max_tracked: int = 10000
    status_file: str = ""  # default: STATE/daemon-status.json
    metrics_file: str = ""  # Prometheus text file; "" = none
    status_interval: float = 5.0
    log_file: str = ""
    log_format: str = "text"  # or "json"
    log_level: str = "INFO"
    on_stop: str = "commit"  # or "abandon"
    until_idle: float = 0.0  # > 0: exit 0 after this many idle seconds
    idle_commit: float = 1.0  # commit a pending batch after this long with nothing to take
    on_write_error: str = "pause"  # or "exit" (status 75, let systemd restart)
    write_retry_initial: float = 5.0  # s before the first probe after a write error
    write_retry_max: float = 60.0  # s, cap of the doubling back-off between probes

    @classmethod
    def from_dict(cls, d: dict) -> "DaemonConfig":
        names = {f.name for f in fields(cls)}
        extra = set(d) - names
        if extra:
            raise UserError(f"unknown [daemon] setting(s): {', '.join(sorted(extra))}; "
                            f"known: {', '.join(sorted(names))}")
        d = dict(d)
        if "patterns" in d:
            d["patterns"] = tuple(d["patterns"])
        return cls(**d)

    def validate(self) -> None:
        if not self.inbox:
            raise UserError("no inbox: give --inbox DIR (or inbox = ... in [daemon])")
        if (self.stable_seconds < 0 or self.poll < 0 or self.reconcile_interval <= 0
                or self.idle_commit < 0 or self.until_idle < 0 or self.max_tracked < 1):
            raise UserError("[daemon] stable_seconds, poll, idle_commit and until_idle must be "
                            ">= 0, reconcile_interval > 0 and max_tracked >= 1")
        if self.on_write_error not in ("pause", "exit"):
            raise UserError(f"[daemon] on_write_error must be 'pause' or 'exit', not "
                            f"{self.on_write_error!r}")
        if not 0 < self.write_retry_initial <= self.write_retry_max:
            raise UserError("[daemon] write_retry_initial must be > 0 and <= write_retry_max")
        if self.on_stop not in ("commit", "abandon"):
            raise UserError(f"[daemon] on_stop must be 'commit' or 'abandon', not {self.on_stop!r}")
        if self.log_format not in ("text", "json"):
            raise UserError(f"[daemon] log_format must be 'text' or 'json', not {self.log_format!r}")
        if not self.patterns:
            raise UserError("[daemon] patterns must not be empty")


def load_config(path: str | None) -> tuple[DaemonConfig, dict]:
    """``[daemon]`` and ``[run]`` tables of the settings file (both optional): ``--config
    FILE``, else ``config/streamcoadd.toml`` of this checkout, else built-in defaults (the
    same rule as every other subcommand)."""
    from streamcoadd.core.config import site_config as site_config

    d = site_config(path)
    return DaemonConfig.from_dict(d.get("daemon", {})), dict(d.get("run", {}))


# ---------------------------------------------------------------------------- logging
class _TextFormatter(logging.Formatter):
    """``2026-01-01T12:00:00.123Z INFO warp file=a.fits visit=1 ... outcome=folded``"""

    def format(self, record):
        ts = _dt.datetime.fromtimestamp(record.created, _dt.timezone.utc)
        msg = record.getMessage()
        kv = getattr(record, "fields", None)
        if kv:
            msg = msg + " " + " ".join(f"{k}={_logfmt(v)}" for k, v in kv.items())
        s = f"{ts.strftime('%Y-%m-%dT%H:%M:%S')}.{ts.microsecond // 1000:03d}Z " \
            f"{record.levelname} {msg}"
        if record.exc_info:
            s += "\n" + self.formatException(record.exc_info)
        return s


def _logfmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        v = f"{v:g}"
    v = str(v)
    if not v or any(ch in v for ch in ' "=\n\t'):
        return json.dumps(v)
    return v


class _JsonFormatter(logging.Formatter):
    """One JSON object per line: ``{"ts": ..., "level": ..., "event": ..., <fields>}``."""

    def format(self, record):
        d = {"ts": _dt.datetime.fromtimestamp(record.created, _dt.timezone.utc)
             .isoformat(timespec="milliseconds").replace("+00:00", "Z"),
             "level": record.levelname, "event": record.getMessage()}
        d.update(getattr(record, "fields", None) or {})
        if record.exc_info:
            d["traceback"] = self.formatException(record.exc_info)
        return json.dumps(d, default=str)


def setup_logging(cfg: DaemonConfig) -> None:
    fmt = _JsonFormatter() if cfg.log_format == "json" else _TextFormatter()
    handlers = [logging.StreamHandler(sys.stderr)]
    if cfg.log_file:
        Path(cfg.log_file).parent.mkdir(parents=True, exist_ok=True)
        # WatchedFileHandler reopens the file after logrotate moved it
        handlers.append(logging.handlers.WatchedFileHandler(cfg.log_file))
    log.handlers.clear()
    for h in handlers:
        h.setFormatter(fmt)
        log.addHandler(h)
    log.setLevel(getattr(logging, cfg.log_level.upper(), logging.INFO))
    log.propagate = False
    # watchdog logs its own warnings (e.g. inotify overflow) through the same handlers
    wd = logging.getLogger("watchdog")
    wd.handlers.clear()
    for h in handlers:
        wd.addHandler(h)
    wd.setLevel(logging.WARNING)
    wd.propagate = False


def event(level: int, name: str, **kv) -> None:
    log.log(level, name, extra={"fields": kv})


# ---------------------------------------------------------------------------- small helpers
def _utcnow() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z")


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write_text(path: Path, text: str, fsync_dir: bool = False) -> None:
    """tmp + fsync + rename: a reader sees the old file or the new one, never a torn one."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        _unlink_quietly(tmp)  # e.g. disk full: leave no partial file behind
        raise
    if fsync_dir:
        _fsync_dir(path.parent)


def _unique_target(directory: Path, name: str) -> Path:
    """``directory/name``, or ``name.1``, ``name.2``, ... if taken (never overwrite)."""
    target = directory / name
    k = 0
    while target.exists() or target.with_name(target.name + ".reason").exists():
        k += 1
        target = directory / f"{name}.{k}"
    return target


def _move(src: Path, dst: Path) -> None:
    """Rename; across filesystems copy + fsync + rename + unlink."""
    try:
        os.rename(src, dst)
    except OSError as e:
        if e.errno != errno.EXDEV:
            raise
        tmp = dst.with_name(f".{dst.name}.{os.getpid()}.tmp")
        try:
            with open(src, "rb") as fi, open(tmp, "wb") as fo:
                shutil.copyfileobj(fi, fo, 1 << 20)
                fo.flush()
                os.fsync(fo.fileno())
            os.replace(tmp, dst)
        except BaseException:
            _unlink_quietly(tmp)  # a partial copy (disk full) must not stay in done/
            raise
        _fsync_dir(dst.parent)
        os.unlink(src)


def _unlink_quietly(path: Path) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


def clean_stale_tmp(directory: Path) -> list[Path]:
    """Remove this daemon's temporary files (``.NAME.PID.tmp``: a ``.reason`` being
    written, a copy across filesystems) left in ``directory`` by a process that died
    (``kill -9``) -- only names of that form whose PID is not alive."""
    removed = []
    try:
        entries = list(os.scandir(directory))
    except OSError:
        return removed
    for de in entries:
        m = _TMP_RE.match(de.name)
        if not m or int(m.group(1)) == os.getpid() or pid_alive(int(m.group(1))):
            continue
        try:
            if de.is_file(follow_symlinks=False):
                os.unlink(de.path)
                removed.append(Path(de.path))
        except OSError:
            pass
    return removed


def is_write_error(e: BaseException) -> bool:
    """A failed write that freeing space (or fixing the disk) cures: the state's
    ``StateWriteError``, or ENOSPC / EDQUOT anywhere."""
    from streamcoadd.core.errors import StateWriteError

    return isinstance(e, StateWriteError) or (isinstance(e, OSError)
                                              and e.errno in WRITE_ERRNOS)


def _free_bytes(directory: Path) -> int | None:
    try:
        st = os.statvfs(directory)
    except OSError:
        return None
    return st.f_bavail * st.f_frsize


def st_size(path: Path) -> int:
    try:
        return os.stat(path).st_size
    except OSError:
        return 0


def _mb(n) -> str:
    return "?" if n is None else f"{n / 1e6:.1f} MB"


def format_status(d: dict | None) -> str:
    """Human summary of :func:`read_status` (a few lines)."""
    if d is None:
        return "daemon: never ran on this state"
    c = d.get("counts", {})
    q = d.get("queue", {})
    head = (f"daemon: {'running' if d['running'] else 'not running'} (state {d.get('state')}, "
            f"pid {d.get('pid')} on {d.get('host')}, started {d.get('started')}, "
            f"updated {d.get('updated')})")
    lines = [head,
             f"  inbox {d.get('inbox')}: {q.get('in_inbox', 0)} file(s), "
             f"{q.get('ready', 0)} ready, {q.get('waiting', 0)} settling, "
             f"{d.get('pending', 0)} folded not yet committed",
             "  " + ", ".join(f"{k} {v}" for k, v in c.items()),
             f"  throughput {d.get('throughput', {}).get('warps_per_min_5min', 0):.1f} warps/min "
             f"(last 5 min)"]
    pz = d.get("paused")
    if pz:
        lines.append(f"  PAUSED (write error) since {pz.get('since')}: {pz.get('during')} "
                     f"could not write {pz.get('path')} ({pz.get('errno') or pz.get('error')}); "
                     f"{pz.get('requeued', 0)} warp(s) left in the inbox; probe "
                     f"#{pz.get('probes', 0) + 1} in {pz.get('next_probe_in_s', 0):.0f} s"
                     + (f" (last: {pz['last_probe']})" if pz.get("last_probe") else "")
                     + ". Free space on that filesystem: folding resumes by itself.")
    lw = d.get("last_warp")
    if lw:
        lines.append(f"  last warp {lw.get('file')} visit {lw.get('visit')} detector "
                     f"{lw.get('detector')}: {lw.get('outcome')} at {lw.get('at')}")
    if d.get("last_error"):
        lines.append(f"  last error: {d['last_error']}")
    return "\n".join(lines)


# ---------------------------------------------------------------------------- the daemon
@dataclass
class _InFlight:
    name: str
    fp: tuple  # (dev, ino, size, mtime_ns) at submit
    outcome: object  # the 'pending' Outcome from submit


@dataclass
class _Counts:
    folded: int = 0
    no_cells: int = 0
    duplicate: int = 0
    rejected: int = 0
    commits: int = 0
    errors: int = 0
    write_errors: int = 0  # write errors that paused folding (disk full, ...)


class Daemon:
    def __init__(self, state_dir: Path, cfg: DaemonConfig, run_config, *, config_source=None,
                 make_ingestor=None):
        self.state_dir = Path(state_dir)
        # make_ingestor(store, run_config) -> an object with the Ingestor contract
        # (submit/commit/needs_commit/pending); None: the single-process Ingestor.
        self.make_ingestor = make_ingestor
        self.cfg = cfg
        self.run_config = run_config
        self.inbox_dir = Path(cfg.inbox).absolute()
        self.done_dir = Path(cfg.done).absolute() if cfg.done else self.inbox_dir.parent / "done"
        self.rejected_dir = (Path(cfg.rejected).absolute() if cfg.rejected
                             else self.inbox_dir.parent / "rejected")
        self.status_file = Path(cfg.status_file) if cfg.status_file \
            else status_path(self.state_dir)
        self.wake = threading.Event()
        self.stop_requested = False
        self.stop_signal = None
        self.counts = _Counts()
        self.inflight: dict[str, _InFlight] = {}
        self.started = _utcnow()
        self.t0 = time.monotonic()
        self.state = "starting"
        self.last_warp = None
        self.last_commit = None
        self.last_error = None
        self._recent = deque(maxlen=100000)  # monotonic times of final outcomes
        self._latency = {"fold_s_sum": 0.0, "fold_count": 0, "commit_s_sum": 0.0}
        self._status_at = 0.0
        self._status_dirty = True
        self.store = None
        self.ing = None
        self.inbox = None
        self.notify = SdNotify()
        self._last_take = 0.0
        # write-error pause: _pause_req is set where the error happens (possibly in the
        # middle of handling a commit's outcomes); the loop then enters the pause
        self._pause_req: dict | None = None
        self.paused: dict | None = None
        self._retry_delay: float | None = None  # back-off, reset by a successful commit

    # ---------------------------------------------------------------- setup
    def _check_dirs(self) -> None:
        for name, d in (("done", self.done_dir), ("rejected", self.rejected_dir)):
            if d == self.inbox_dir:
                raise UserError(f"the {name} directory must not be the inbox ({d})")
        for d in (self.inbox_dir, self.rejected_dir) + (() if self.cfg.delete_done
                                                         else (self.done_dir,)):
            try:
                d.mkdir(parents=True, exist_ok=True)
            except OSError as e:
                raise UserError(f"cannot create directory {d}: {e.strerror}") from None
            if not os.access(d, os.W_OK | os.X_OK):
                raise UserError(f"directory {d} is not writable by this user")

    def _install_signals(self) -> None:
        def on_signal(signum, frame):
            name = signal.Signals(signum).name
            if self.stop_requested:
                # second signal: abandon whatever is pending; it stays in the inbox
                event(logging.WARNING, "stop", signal=name, action="abandon-now",
                      pending=len(self.inflight))
                for h in log.handlers:
                    try:
                        h.flush()
                    except Exception:  # noqa: BLE001
                        pass
                os._exit(EXIT_OK)
            # Only set flags here: a handler runs in the main thread between two bytecodes,
            # possibly while that thread holds the (non-reentrant) lock of self.wake inside
            # Event.wait -- calling wake.set() from here deadlocked the daemon on SIGTERM now
            # and then. Every wait of the main loop is at most 1 s, so the flag is seen
            # within a second.
            self.stop_requested = True
            self.stop_signal = name

        def on_hup(signum, frame):
            self._rescan_requested = True  # same rule: no locks in a handler

        self._rescan_requested = False
        signal.signal(signal.SIGTERM, on_signal)
        signal.signal(signal.SIGINT, on_signal)
        if hasattr(signal, "SIGHUP"):
            signal.signal(signal.SIGHUP, on_hup)

    # ---------------------------------------------------------------- main
    def run(self) -> int:
        from streamcoadd.pipeline.ingest import Ingestor
        from streamcoadd.store.state import StateStore

        # the lock first: a second daemon must not touch anything
        self.store = StateStore.open(self.state_dir, write=True)
        # a status file write interrupted by a crash left .NAME.PID.tmp: we hold the lock
        for stale in self.status_file.parent.glob(f".{self.status_file.name}.*.tmp"):
            stale.unlink(missing_ok=True)
        try:
            self._check_dirs()
            for d in (self.rejected_dir, self.done_dir):
                for f in clean_stale_tmp(d):
                    event(logging.INFO, "removed-stale-tmp", file=str(f))
            self._install_signals()
            self.ing = (self.make_ingestor or Ingestor)(self.store, self.run_config)
            self.inbox = Inbox(self.inbox_dir, stable_seconds=self.cfg.stable_seconds,
                               poll=self.cfg.poll or None,
                               reconcile_interval=self.cfg.reconcile_interval,
                               patterns=self.cfg.patterns, max_tracked=self.cfg.max_tracked,
                               wake=self.wake)
            self.inbox.start()
            event(logging.INFO, "start", pid=os.getpid(), state=str(self.state_dir),
                  inbox=str(self.inbox_dir),
                  done="(delete)" if self.cfg.delete_done else str(self.done_dir),
                  rejected=str(self.rejected_dir), observer=self.inbox.observer_kind,
                  stable_s=self.cfg.stable_seconds,
                  commit_every=getattr(self.run_config, "commit_every", None),
                  commit_interval_s=getattr(self.run_config, "commit_interval", None),
                  status=str(self.status_file))
            self.state = "running"
            self._write_status(force=True)
            self.notify.send(f"READY=1\nMAINPID={os.getpid()}\nSTATUS=watching {self.inbox_dir}")
            code = self._loop()
            return code
        finally:
            self._shutdown()

    def _loop(self) -> int:
        idle_since = None
        until_idle = self.cfg.until_idle
        while True:
            if self.stop_requested:
                return self._stop()
            if self._pause_req is not None:
                code = self._enter_pause()
                if code is not None:
                    return code
            if self.paused is not None:
                self._paused_step()
                idle_since = None
                continue
            self.notify.ping()
            if self._rescan_requested:
                self._rescan_requested = False
                self.inbox.request_rescan()
            self.inbox.ensure_alive()
            self.inbox.refresh()
            name = self.inbox.next_ready()
            if name is not None:
                idle_since = None
                if self.state == "idle":
                    self._set_state("running")
                code = self._take(name)
                if code is not None:
                    return code
                if self._pause_req is not None:
                    continue
                if self.ing.needs_commit():
                    code = self._commit("batch")
                    if code is not None:
                        return code
                self._write_status()
                continue
            # nothing ready now
            now = time.monotonic()
            quiet = now - self._last_take >= self.cfg.idle_commit
            if self.ing.pending and ((quiet and not self.inbox.has_waiting())
                                     or self.ing.needs_commit()):
                code = self._commit("interval" if self.ing.needs_commit() else "idle")
                if code is not None:
                    return code
                continue
            busy = self.ing.pending or self.inbox.has_untaken() or self.inflight
            if busy:
                idle_since = None
            elif idle_since is None:
                idle_since = now
                self._set_state("idle")
            if until_idle and idle_since is not None and now - idle_since >= until_idle:
                # events are hints: one last full scan before concluding there is nothing
                self.inbox.request_rescan()
                self.inbox.refresh()
                if not self.inbox.has_untaken():
                    event(logging.INFO, "idle-exit", idle_s=round(now - idle_since, 1))
                    return self._stop(reason="idle")
                idle_since = None
                continue
            if busy and self.state == "idle":
                self._set_state("running")
            self._write_status()
            timeout = min(1.0, self.cfg.status_interval, self.inbox.time_to_reconcile(now))
            nxt = self.inbox.next_check_in(now)
            if nxt is not None:
                timeout = min(timeout, nxt + 0.01)
            if self.ing.pending:
                timeout = min(timeout, max(0.05, self._last_take + self.cfg.idle_commit - now))
            if until_idle and idle_since is not None:
                timeout = min(timeout, max(0.0, idle_since + until_idle - now) + 0.01)
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
        from streamcoadd.core.errors import WarpRejected

        path = self.inbox_dir / name
        self._last_take = time.monotonic()
        try:
            st = os.stat(path)
        except FileNotFoundError:
            self.inbox.forget(name)
            return None
        fp = fingerprint(st)
        if path.is_symlink():
            target = Path(os.path.realpath(path))
            inbox = Path(os.path.realpath(self.inbox_dir))
            if inbox not in target.parents:
                self._reject(name, fp, f"symbolic link pointing out of the inbox (to {target}); "
                                       "refused: deliver the file itself (write NAME.tmp, "
                                       "rename)", None)
                return None
        nxt = self.inbox.peek_ready()  # read and prepared on a second core meanwhile
        try:
            o = self.ing.submit(path, then=self.inbox_dir / nxt if nxt else None)
        except WarpRejected as e:  # contract: rejections are outcomes, but be lenient
            self._reject(name, fp, e.reason, None)
            return None
        except FileNotFoundError:
            self.inbox.forget(name)
            return None
        except Exception as e:  # noqa: BLE001
            if is_write_error(e):
                # e.g. the ledger could not record a rejection on a full disk: not the
                # file's fault; it stays in the inbox and is looked at after the pause
                self._request_pause("submit", e, requeue=name)
                return None
            return self._internal_error(name, fp, e)
        status = getattr(o, "status", None)
        if status == "pending":
            self.inflight[str(path)] = _InFlight(name, fp, o)
        elif status == "duplicate":
            self._finish(name, fp, o, "duplicate")
        elif status == "rejected":
            self._reject(name, fp, o.reason or "rejected (no reason given)", o)
        elif status in ("folded", "no_cells"):  # an Ingestor that commits by itself
            self._finish(name, fp, o, status)
        else:
            return self._internal_error(name, fp,
                                        RuntimeError(f"unexpected outcome status {status!r}"))
        return None

    def _internal_error(self, name: str, fp, exc: BaseException) -> int | None:
        """A bug, or an unexpected error (I/O, memory) while reading or folding one file.

        The file is quarantined in rejected/ with the traceback (so that a restart does not
        trip on it again). The core drops all uncommitted work when a fold fails half-way:
        then the files of the dropped batch are handed back to the queue and folded again.
        If the in-memory batch cannot be accounted for, abandon it (it stays in the inbox,
        the replay log) and exit non-zero."""
        self.counts.errors += 1
        tb = traceback.format_exc()
        log.error("internal error on %s: %s: %s\n%s", name, type(exc).__name__, exc,
                  tb.rstrip())
        self.last_error = f"{name}: {type(exc).__name__}: {exc}"
        self._reject(name, fp, f"internal error while folding ({type(exc).__name__}: {exc}); "
                               "see the daemon log", None, detail=tb)
        pending = self.ing.pending
        if pending == len(self.inflight):
            return None  # the batch is intact
        if pending == 0:
            event(logging.WARNING, "requeue", files=len(self.inflight),
                  note="uncommitted batch dropped by the core; folding those files again")
            for inf in self.inflight.values():
                self.inbox.release(inf.name)
            self.inflight.clear()
            return None
        event(logging.ERROR, "abort", reason="internal error", pending_abandoned=pending,
              note="pending warps stay in the inbox and are replayed at the next start")
        self.inflight.clear()
        self.state = "failed"
        return EXIT_SOFTWARE

    def _fields(self, name: str, o, outcome: str, reason: str | None = None) -> dict:
        wid = getattr(o, "warp_id", None) if o is not None else None
        d = {"file": name,
             "visit": getattr(wid, "visit", None), "detector": getattr(wid, "detector", None),
             "band": (getattr(o, "band", None) or None) if o is not None else None,
             "cells": (getattr(o, "cells", None) if outcome != "rejected" else None)
             if o is not None else None,
             "ms": round(float(getattr(o, "ms", 0.0) or 0.0), 1) if o is not None else None,
             "outcome": outcome}
        if reason:
            d["reason"] = reason
        return d

    def _record(self, fields_: dict) -> None:
        key = fields_["outcome"]
        if hasattr(self.counts, key):
            setattr(self.counts, key, getattr(self.counts, key) + 1)
        self._recent.append(time.monotonic())
        if fields_.get("ms") and key in ("folded", "no_cells"):
            self._latency["fold_s_sum"] += fields_["ms"] / 1e3
            self._latency["fold_count"] += 1
        self.last_warp = dict(fields_, at=_utcnow())
        self._status_dirty = True

    def _still_same(self, path: Path, fp) -> bool:
        try:
            return fingerprint(os.stat(path)) == fp
        except OSError:
            return False

    def _finish(self, name: str, fp, o, outcome: str, fsync: bool = True) -> None:
        """Durable (or duplicate): remove the file from the inbox (move to done/ or delete)."""
        path = self.inbox_dir / name
        f = self._fields(name, o, outcome)
        if not self._still_same(path, fp):
            # replaced or removed while being folded: look at whatever is there afresh
            event(logging.WARNING, "changed", file=name,
                  note="file changed in the inbox while folding; it will be looked at again")
            self.inbox.forget(name)
            self.inbox.request_rescan()
            self._record(f)
            event(logging.INFO, "warp", **f)
            return
        try:
            if self.cfg.delete_done:
                os.unlink(path)
            else:
                _move(path, _unique_target(self.done_dir, name))
        except OSError as e:
            if is_write_error(e):
                # durable already; it stays in the inbox and is a duplicate after the pause
                self._request_pause("move-to-done", e, requeue=name, path=self.done_dir,
                                    need=st_size(path))
                self._record(f)
                event(logging.INFO, "warp", **f, note="durable; left in the inbox (done/ "
                      "not writable now), reported as a duplicate after the pause")
                return
            self.counts.errors += 1
            self.last_error = f"cannot move {name} out of the inbox: {e}"
            log.error("%s (it is folded; it will be seen as a duplicate later)", self.last_error)
            self.inbox.forget(name, hold_seconds=60.0)
        else:
            crash_point("daemon-moved-done")
            self.inbox.forget(name, removed=True)
            if fsync:
                _fsync_dir(self.inbox_dir)
                if not self.cfg.delete_done:
                    _fsync_dir(self.done_dir)
        self._record(f)
        event(logging.INFO, "warp", **f)

    def _reject(self, name: str, fp, reason: str, o, detail: str | None = None) -> None:
        path = self.inbox_dir / name
        f = self._fields(name, o, "rejected", reason)
        if not self._still_same(path, fp):
            self.inbox.forget(name)
            self.inbox.request_rescan()
            event(logging.WARNING, "warp", **f, note="file changed or vanished meanwhile")
            return
        target = _unique_target(self.rejected_dir, name)
        text = (f"{reason}\n\nfile: {name}\nrejected: {_utcnow()}\n"
                f"state: {self.state_dir}\ndaemon pid: {os.getpid()}\n")
        if f.get("visit") is not None:
            text += f"visit: {f['visit']}\ndetector: {f['detector']}\n"
        if detail:
            text += "\n" + detail
        reason_file = target.with_name(target.name + ".reason")
        try:
            atomic_write_text(reason_file, text)
        except OSError as e:
            if is_write_error(e):
                self._request_pause("quarantine", e, requeue=name, path=self.rejected_dir,
                                    need=len(text) + st_size(path))
                event(logging.WARNING, "reject-deferred", file=name, reason=reason,
                      note="cannot write to rejected/ now; the file stays in the inbox and "
                           "is rejected after the pause")
                return
            log.error("cannot write %s.reason: %s", target, e)
        try:
            _move(path, target)
            _fsync_dir(self.rejected_dir)
            _fsync_dir(self.inbox_dir)
            self.inbox.forget(name, removed=True)
        except OSError as e:
            if is_write_error(e):
                _unlink_quietly(reason_file)
                self._request_pause("quarantine", e, requeue=name, path=self.rejected_dir,
                                    need=len(text) + st_size(path))
                event(logging.WARNING, "reject-deferred", file=name, reason=reason,
                      note="cannot move it to rejected/ now; it stays in the inbox and is "
                           "rejected after the pause")
                return
            self.counts.errors += 1
            self.last_error = f"cannot move {name} to {self.rejected_dir}: {e}"
            log.error(self.last_error)
            self.inbox.forget(name, hold_seconds=60.0)
        self._record(f)
        event(logging.WARNING, "warp", **f)

    # ---------------------------------------------------------------- commit
    def _commit(self, why: str) -> int | None:
        n = self.ing.pending
        t = time.monotonic()
        try:
            need = self.store.dirty_bytes()
        except Exception:  # noqa: BLE001 - an estimate only
            need = 0
        try:
            outcomes = self.ing.commit()
        except OSError as e:  # StateWriteError (disk full, quota, EIO), or any I/O error
            self._request_pause("commit", e, need=need)
            return None
        except Exception as e:  # noqa: BLE001
            self.counts.errors += 1
            self.last_error = f"commit failed: {type(e).__name__}: {e}"
            log.exception("commit failed (pending warps stay in the inbox and are replayed)")
            self.inflight.clear()
            self.state = "failed"
            return EXIT_SOFTWARE
        dt = time.monotonic() - t
        crash_point("daemon-before-done")  # durable, still in the inbox: replayed as duplicate
        self.counts.commits += 1
        self._retry_delay = None  # writing works: the next pause starts its back-off afresh
        self._latency["commit_s_sum"] += dt
        seen = set()
        for o in outcomes or ():
            key = str(getattr(o, "path", ""))
            inf = self.inflight.pop(key, None)
            if inf is None:
                # match on the name (the core may have normalised the path)
                nm = Path(key).name
                for k, v in list(self.inflight.items()):
                    if v.name == nm:
                        inf = self.inflight.pop(k)
                        break
            if inf is None:
                log.warning("commit returned an outcome for an unknown file %s", key)
                continue
            seen.add(inf.name)
            status = getattr(o, "status", "folded")
            if status == "duplicate":
                outcome = "duplicate"
            elif status == "no_cells":
                outcome = "no_cells"
            elif status == "rejected":
                self._reject(inf.name, inf.fp, getattr(o, "reason", None) or "rejected", o)
                continue
            else:
                outcome = "folded"
            if not getattr(o, "ms", None):
                try:
                    o.ms = inf.outcome.ms
                except Exception:  # noqa: BLE001
                    pass
            self._finish(inf.name, inf.fp, o, outcome, fsync=False)
        if seen:
            _fsync_dir(self.inbox_dir)
            if not self.cfg.delete_done:
                _fsync_dir(self.done_dir)
        for k, inf in list(self.inflight.items()):
            # not reported by commit: leave it in the inbox; it is replayed (duplicate) later
            log.warning("commit did not report %s; leaving it in the inbox", inf.name)
            self.inbox.forget(inf.name)
        self.inflight.clear()
        self.last_commit = {"at": _utcnow(), "warps": n, "seconds": round(dt, 3), "why": why}
        event(logging.INFO, "commit", warps=n, seconds=round(dt, 3), why=why)
        self._write_status(force=True)
        return None

    # ---------------------------------------------------------------- write-error pause
    def _request_pause(self, during: str, exc: BaseException, *, requeue: str | None = None,
                       path: Path | None = None, need: int = 0) -> None:
        """A write failed: note it (the first one wins) and put ``requeue`` back in the
        queue; the main loop enters the pause at the next safe point."""
        if requeue is not None:
            self.inbox.release(requeue)
        if self._pause_req is not None:
            self._pause_req["requeued"] += requeue is not None
            return
        cause = exc.__cause__ if isinstance(exc.__cause__, OSError) else exc
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        where = getattr(cause, "filename", None) or getattr(exc, "filename", None)
        if not where:  # StateWriteError: "cannot write SHARD_DIR: reason. The state ..."
            m = re.match(r"cannot write (/.+?): ", first)
            where = m.group(1) if m else None
        where = Path(where) if where else (path or self.state_dir)
        probe_dir = path or self.state_dir
        err = getattr(cause, "errno", None) or getattr(exc, "errno", None)
        first = first.split(". The state is")[0]  # the rest is said by the pause message
        from streamcoadd.core.errors import StateWriteError

        if not isinstance(cause, StateWriteError) and getattr(cause, "strerror", None):
            first = cause.strerror
        ename = errno.errorcode.get(err) if isinstance(err, int) else None
        if ename is None and "database or disk is full" in first:
            ename = "SQLITE_FULL"  # SQLite's word for ENOSPC (it reports no errno)
        self._pause_req = {
            "during": during, "path": str(where), "probe_dirs": sorted({str(self.state_dir),
                                                                      str(probe_dir)}),
            "errno": ename,
            "error": first, "need_bytes": int(need or 0), "requeued": int(requeue is not None),
            "message": f"{during}: cannot write {where}: {first}"}

    def _drop_uncommitted(self) -> int:
        """Forget the folded, uncommitted batch (in memory only); its files go back to the
        queue in their order. The inbox is the replay log: nothing is lost."""
        n = self.ing.pending if self.ing is not None else 0
        try:
            self.store.discard_uncommitted()
        finally:
            if self.ing is not None:
                from streamcoadd.pipeline.ingest import Ingestor

                self.ing = (self.make_ingestor or Ingestor)(self.store, self.run_config)
            names = [inf.name for inf in self.inflight.values()]
            self.inflight.clear()
            for name in reversed(names):
                self.inbox.release(name)
        return n

    def _enter_pause(self) -> int | None:
        req, self._pause_req = self._pause_req, None
        self.counts.write_errors += 1
        self.last_error = req["message"]
        requeued = req.pop("requeued") + self._drop_uncommitted()
        free = {d: _free_bytes(Path(d)) for d in req["probe_dirs"]}
        if self.cfg.on_write_error == "exit":
            event(logging.ERROR, "commit-failed", during=req["during"], path=req["path"],
                  errno=req["errno"], error=req["error"], pending=requeued,
                  note="on_write_error = exit: the warps stay in the inbox and are folded "
                       "at the next start (exit status 75)")
            self.state = "failed"
            return EXIT_TEMPFAIL
        delay = self.cfg.write_retry_initial if self._retry_delay is None \
            else min(self._retry_delay * 2, self.cfg.write_retry_max)
        self._retry_delay = delay
        now = time.monotonic()
        self.paused = dict(req, since=_utcnow(), t0=now, next_at=now + delay, delay=delay,
                           probes=0, requeued=requeued, last_probe=None, free_bytes=free)
        full = req["errno"] in ("ENOSPC", "EDQUOT", "SQLITE_FULL") \
            or "full" in req["error"].lower()
        todo = (f"free space on the filesystem of {req['path']}"
                + (f" (about {_mb(req['need_bytes'])} needed)" if req["need_bytes"] else "")
                if full else f"fix the cause ({req['error']})")
        event(logging.ERROR, "paused", reason="write error", during=req["during"],
              path=req["path"], errno=req["errno"], error=req["error"],
              free=", ".join(f"{d}: {_mb(v)}" for d, v in free.items()),
              message=f"folding is PAUSED: {todo}. The state is consistent (the last commit "
                      f"is intact); the {requeued} warp(s) not yet durable stay in the inbox. "
                      f"The daemon checks every {self.cfg.write_retry_initial:g}-"
                      f"{self.cfg.write_retry_max:g} s and resumes by itself; no restart "
                      "needed (SIGTERM still stops it)")
        self.state = "paused"
        self.notify.send(f"STATUS=paused: cannot write {req['path']} ({req['error']})")
        self._write_status(force=True)
        return None

    def _probe(self) -> tuple[bool, str]:
        """Can the daemon write again? Enough free space for about the failed batch (at
        most half the filesystem) in every directory involved, and a 64 KiB test file
        written, fsynced and removed there."""
        p = self.paused
        for d in map(Path, p["probe_dirs"]):
            try:
                st = os.statvfs(d)
                free, size = st.f_bavail * st.f_frsize, st.f_blocks * st.f_frsize
            except OSError as e:
                return False, f"statvfs {d}: {e.strerror}"
            need = min(p["need_bytes"] + (1 << 20), size // 2)
            if free < need:
                return False, f"{_mb(free)} free in {d}, {_mb(need)} wanted"
            tmp = d / f".streamcoadd-probe.{os.getpid()}.tmp"
            try:
                fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
                try:
                    os.write(fd, b"\0" * (64 << 10))
                    os.fsync(fd)
                finally:
                    os.close(fd)
            except OSError as e:
                return False, f"test write in {d}: {e.strerror or e}"
            finally:
                _unlink_quietly(tmp)
        return True, "ok"

    def _paused_step(self) -> None:
        p = self.paused
        now = time.monotonic()
        if now >= p["next_at"]:
            ok, detail = self._probe()
            p["probes"] += 1
            if ok:
                self._resume(detail)
                return
            p["last_probe"] = detail
            p["delay"] = min(p["delay"] * 2, self.cfg.write_retry_max)
            p["next_at"] = now + p["delay"]
            log.debug("still paused: %s; next probe in %.1f s", detail, p["delay"])
            self._status_dirty = True
        self.notify.ping()
        self.inbox.ensure_alive()
        self.inbox.refresh()  # keep the queue counts of the status current
        self._write_status()
        timeout = min(max(p["next_at"] - now, 0.0), 1.0, self.cfg.status_interval)
        if self.notify.watchdog:
            timeout = min(timeout, self.notify.watchdog)
        self.wake.wait(max(timeout, 0.01))
        self.wake.clear()

    def _resume(self, detail: str) -> None:
        p, self.paused = self.paused, None
        event(logging.INFO, "resumed", paused_s=round(time.monotonic() - p["t0"], 1),
              probes=p["probes"], path=p["path"],
              free=", ".join(f"{d}: {_mb(_free_bytes(Path(d)))}" for d in p["probe_dirs"]),
              note="writing works again; folding the inbox")
        self.state = "running"
        self.inbox.request_rescan()
        self.notify.send("STATUS=running")
        self._write_status(force=True)

    def _pause_status(self, now: float) -> dict | None:
        p = self.paused
        if p is None:
            return None
        return {"reason": "write error", "during": p["during"], "path": p["path"],
                "errno": p["errno"], "error": p["error"], "since": p["since"],
                "paused_s": round(now - p["t0"], 1), "probes": p["probes"],
                "next_probe_in_s": round(max(0.0, p["next_at"] - now), 1),
                "last_probe": p["last_probe"], "requeued": p["requeued"],
                "need_bytes": p["need_bytes"], "free_bytes": p["free_bytes"],
                "message": p["message"]}

    # ---------------------------------------------------------------- stop
    def _stop(self, reason: str = "signal") -> int:
        if self._pause_req is not None and self.paused is None:
            # a write failed just before the signal: drop the batch (it stays in the inbox)
            code = self._enter_pause()
            if code is not None:
                return code
        self.state = "stopping"
        self._write_status(force=True)
        self.notify.send("STOPPING=1")
        pending = self.ing.pending if self.ing else 0
        if pending and self.paused is None and self.cfg.on_stop == "commit":
            code = self._commit("stop")
            if code is not None:
                return code
            if self._pause_req is not None:  # the last commit failed: nothing is lost
                req, self._pause_req = self._pause_req, None
                self.counts.write_errors += 1
                self.last_error = req["message"]
                event(logging.ERROR, "commit-failed", during=req["during"], path=req["path"],
                      errno=req["errno"], error=req["error"], pending=pending,
                      note="stopping anyway: the pending warps stay in the inbox and are "
                           "folded at the next start")
                if self.cfg.on_write_error == "exit":
                    self.state = "failed"
                    return EXIT_TEMPFAIL
                self._drop_uncommitted()
        elif pending:
            event(logging.INFO, "abandon", pending=pending,
                  note="pending warps stay in the inbox and are folded at the next start")
            self.inflight.clear()
        event(logging.INFO, "stop", reason=reason, signal=self.stop_signal,
              **{k: v for k, v in vars(self.counts).items()})
        self.state = "stopped"
        return EXIT_OK

    def _shutdown(self) -> None:
        if self.inbox is not None:
            self.inbox.stop()
        if self.state not in ("stopped", "failed"):
            self.state = "failed"
        try:
            self._write_status(force=True)
        except Exception:  # noqa: BLE001
            pass
        if self.store is not None:
            try:
                self.store.close()
            except Exception as e:  # noqa: BLE001
                log.error("closing the state failed: %s", e)

    # ---------------------------------------------------------------- status
    def status(self) -> dict:
        now = time.monotonic()
        up = now - self.t0
        recent = self._recent
        n60 = sum(1 for t in reversed(recent) if now - t <= 60) if recent else 0
        n300 = sum(1 for t in reversed(recent) if now - t <= 300) if recent else 0
        total = sum(vars(self.counts)[k] for k in ("folded", "no_cells", "duplicate", "rejected"))
        q = self.inbox.counts() if self.inbox else {}
        return {
            "version": 1,
            "pid": os.getpid(), "host": socket.gethostname(),
            "state": self.state, "started": self.started, "updated": _utcnow(),
            "uptime_s": round(up, 1),
            "state_dir": str(self.state_dir.absolute()), "inbox": str(self.inbox_dir),
            "done": None if self.cfg.delete_done else str(self.done_dir),
            "rejected": str(self.rejected_dir),
            "counts": vars(self.counts).copy(),
            "pending": self.ing.pending if self.ing else 0,
            "queue": q,
            "last_warp": self.last_warp, "last_commit": self.last_commit,
            "throughput": {"warps_per_min_1min": float(n60),
                           "warps_per_min_5min": round(n300 / min(5.0, max(up, 1) / 60), 2),
                           "warps_per_s_overall": round(total / max(up, 1e-9), 3)},
            "observer": {"kind": self.inbox.observer_kind if self.inbox else None,
                         "alive": self.inbox.observer_alive() if self.inbox else False,
                         "restarts": self.inbox.observer_restarts if self.inbox else 0,
                         "handler_errors": self.inbox.handler_errors if self.inbox else 0,
                         "hints_dropped": self.inbox.hints_dropped if self.inbox else 0,
                         "scans": self.inbox.scans if self.inbox else 0},
            "last_error": self.last_error,
            "paused": self._pause_status(now),
            "latency": dict(self._latency),
            "bytes_written": self.store.bytes_written if self.store is not None else 0,
        }

    def _write_status(self, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self._status_at < (1.0 if self._status_dirty
                                                  else self.cfg.status_interval):
            return
        self._status_at = now
        self._status_dirty = False
        try:
            status = self.status()
            atomic_write_text(self.status_file, json.dumps(status, indent=1) + "\n")
            if self.cfg.metrics_file:
                atomic_write_text(Path(self.cfg.metrics_file), prometheus_text(status))
        except OSError as e:
            # never fatal (e.g. disk full): the log says it once per minute at most
            if now - getattr(self, "_status_err_at", -1e9) > 60:
                self._status_err_at = now
                log.error("cannot write status file %s: %s", self.status_file, e)

