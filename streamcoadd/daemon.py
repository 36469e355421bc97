"""``streamcoadd watch``: the daemon that folds warps as they arrive in an inbox.

The event source (which inbox files are complete) is :class:`streamcoadd.inbox.Inbox`; this
module is what is done with a file (the ingest loop), plus locking, signals, logs and the
status file.  Guarantees (see ``docs/operations.md``):

* **The inbox is the replay log.** A file leaves the inbox only after the core's
  ``Ingestor.commit()`` returned its outcome (folded / no cells: the contribution is durable),
  or at once when it is a duplicate (already durable) or rejected (state untouched).  If the
  process dies at any instant, the next run re-submits what is still in the inbox and the
  core skips what is already durable.
* One daemon per state: the state's exclusive lock is taken before anything else.
* SIGTERM / SIGINT: stop taking files, commit what is pending (``on_stop = "commit"``) or
  leave it in the inbox (``"abandon"``), exit 0.  A second signal abandons at once.
* Memory is bounded: only names of inbox files are tracked (at most ``max_tracked``), and a
  file is read only when it is submitted.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import errno
import json
import logging
import logging.handlers
import os
import shutil
import signal
import socket
import sys
import threading
import time
import traceback
from collections import deque
from dataclasses import dataclass, fields, replace
from pathlib import Path

from .durable import crash_point
from .errors import UserError
from .inbox import DEFAULT_PATTERNS, Inbox, fingerprint
from .metrics import prometheus_text

log = logging.getLogger("streamcoadd.daemon")

STATUS_NAME = "daemon-status.json"

# exit codes (documented in docs/operations.md and used by config/streamcoadd.service)
EXIT_OK = 0
EXIT_ERROR = 2  # configuration / usage / no state: restarting will not help (as the CLI)
EXIT_LOCKED = 4  # another process holds the state's writer lock
EXIT_SOFTWARE = 70  # internal error (a bug); pending warps stay in the inbox
EXIT_TEMPFAIL = 75  # I/O error while committing (disk full, ...): retry later


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
    from .cli import _site_config

    d = _site_config(path)
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
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
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
        tmp = dst.with_name(f".{dst.name}.tmp")
        with open(src, "rb") as fi, open(tmp, "wb") as fo:
            shutil.copyfileobj(fi, fo, 1 << 20)
            fo.flush()
            os.fsync(fo.fileno())
        os.replace(tmp, dst)
        _fsync_dir(dst.parent)
        os.unlink(src)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def status_path(state_dir: str | os.PathLike) -> Path:
    return Path(state_dir) / STATUS_NAME


def read_status(state_dir: str | os.PathLike, path: str | os.PathLike | None = None) -> dict | None:
    """The daemon status (for ``streamcoadd status``), or None if no daemon ever ran.

    Adds ``running``: the recorded process is alive on this host and has not reported
    that it stopped.
    """
    p = Path(path) if path else status_path(state_dir)
    try:
        d = json.loads(p.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None
    alive = (d.get("host") == socket.gethostname() and isinstance(d.get("pid"), int)
             and _pid_alive(d["pid"]))
    d["running"] = bool(alive and d.get("state") not in ("stopped", "failed"))
    return d


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
    lw = d.get("last_warp")
    if lw:
        lines.append(f"  last warp {lw.get('file')} visit {lw.get('visit')} detector "
                     f"{lw.get('detector')}: {lw.get('outcome')} at {lw.get('at')}")
    if d.get("last_error"):
        lines.append(f"  last error: {d['last_error']}")
    return "\n".join(lines)


class _SdNotify:
    """Optional systemd notification (Type=notify, WatchdogSec=); a no-op elsewhere."""

    def __init__(self):
        addr = os.environ.get("NOTIFY_SOCKET")
        self.sock = None
        if addr:
            if addr.startswith("@"):
                addr = "\0" + addr[1:]
            try:
                self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
                self.sock.connect(addr)
                # never stall the daemon on a notify socket nobody reads (a full
                # datagram queue would block send); a dropped ping is harmless
                self.sock.setblocking(False)
            except OSError:
                self.sock = None
        usec = os.environ.get("WATCHDOG_USEC")
        self.watchdog = float(usec) / 1e6 / 2 if usec and usec.isdigit() else None
        self._last = 0.0

    def send(self, msg: str) -> None:
        if self.sock is not None:
            try:
                self.sock.send(msg.encode())
            except OSError:
                pass

    def ping(self) -> None:
        if self.watchdog and time.monotonic() - self._last >= self.watchdog:
            self._last = time.monotonic()
            self.send("WATCHDOG=1")


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
        self.notify = _SdNotify()
        self._last_take = 0.0

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
            self.stop_requested = True
            self.stop_signal = name
            self.wake.set()

        signal.signal(signal.SIGTERM, on_signal)
        signal.signal(signal.SIGINT, on_signal)
        if hasattr(signal, "SIGHUP"):
            signal.signal(signal.SIGHUP, lambda s, f: self.inbox and self.inbox.request_rescan())

    # ---------------------------------------------------------------- main
    def run(self) -> int:
        from .ingest import Ingestor
        from .state import StateStore

        # the lock first: a second daemon must not touch anything
        self.store = StateStore.open(self.state_dir, write=True)
        # a status file write interrupted by a crash left .NAME.PID.tmp: we hold the lock
        for stale in self.status_file.parent.glob(f".{self.status_file.name}.*.tmp"):
            stale.unlink(missing_ok=True)
        try:
            self._check_dirs()
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
            self.notify.ping()
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
        from .errors import WarpRejected

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
        try:
            o = self.ing.submit(path)
        except WarpRejected as e:  # contract: rejections are outcomes, but be lenient
            self._reject(name, fp, e.reason, None)
            return None
        except FileNotFoundError:
            self.inbox.forget(name)
            return None
        except Exception as e:  # noqa: BLE001
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
        try:
            atomic_write_text(target.with_name(target.name + ".reason"), text)
        except OSError as e:
            log.error("cannot write %s.reason: %s", target, e)
        try:
            _move(path, target)
            _fsync_dir(self.rejected_dir)
            _fsync_dir(self.inbox_dir)
            self.inbox.forget(name, removed=True)
        except OSError as e:
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
            outcomes = self.ing.commit()
        except OSError as e:
            self.counts.errors += 1
            self.last_error = f"commit failed: {e}"
            event(logging.ERROR, "commit-failed", error=str(e), errno=errno.errorcode.get(e.errno),
                  pending=n, note="pending warps stay in the inbox and are replayed at restart")
            self.inflight.clear()
            self.state = "failed"
            return EXIT_TEMPFAIL
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

    # ---------------------------------------------------------------- stop
    def _stop(self, reason: str = "signal") -> int:
        self.state = "stopping"
        self._write_status(force=True)
        self.notify.send("STOPPING=1")
        pending = self.ing.pending if self.ing else 0
        if pending and self.cfg.on_stop == "commit":
            code = self._commit("stop")
            if code is not None:
                return code
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


# ---------------------------------------------------------------------------- CLI
def register(subparsers) -> argparse.ArgumentParser:
    """Add the ``watch`` subcommand to the ``streamcoadd`` CLI."""
    p = subparsers.add_parser(
        "watch", help="run the daemon: fold warps as they arrive in an inbox",
        description="Watch INBOX and fold every complete warp file into STATE. Producers "
                    "should write NAME.fits.tmp (or into INBOX/tmp/) and rename; other files "
                    "are taken once their size and mtime are stable. Folded warps move to "
                    "--done, rejected ones to --rejected with NAME.reason. Stop with SIGTERM "
                    "or Ctrl-C (pending warps are committed first). See docs/operations.md.")
    p.add_argument("state", metavar="STATE", help="state directory (created by 'streamcoadd init')")
    p.add_argument("--inbox", metavar="DIR", help="directory to watch (created if missing)")
    p.add_argument("--done", metavar="DIR",
                   help="where folded and duplicate warps go (default: INBOX/../done)")
    p.add_argument("--rejected", metavar="DIR",
                   help="where rejected warps go, with NAME.reason (default: INBOX/../rejected)")
    p.add_argument("--delete-done", action="store_true", default=None,
                   help="delete folded warps instead of moving them to --done")
    p.add_argument("--poll", type=float, metavar="SECONDS",
                   help="poll the inbox every SECONDS instead of inotify (network filesystems)")
    p.add_argument("--stable-seconds", type=float, metavar="S",
                   help="a file not renamed into the inbox is taken once its size and mtime "
                        "did not change for S seconds (default 5)")
    p.add_argument("--reconcile", type=float, metavar="SECONDS", dest="reconcile_interval",
                   help="full rescan of the inbox every SECONDS (default 60)")
    p.add_argument("--until-idle", type=float, metavar="SECONDS",
                   help="exit 0 after SECONDS with nothing to do and nothing pending")
    p.add_argument("--commit-every", type=int, metavar="N",
                   help="make folded warps durable every N warps (default from [run])")
    p.add_argument("--commit-interval", type=float, metavar="S",
                   help="... or at least every S seconds (default from [run])")
    p.add_argument("--idle-commit", type=float, metavar="S",
                   help="commit pending warps once nothing new was taken for S seconds "
                        "(default 1; --commit-every/--commit-interval still apply)")
    p.add_argument("--status-file", metavar="F", help="default STATE/daemon-status.json")
    p.add_argument("--metrics-file", metavar="F",
                   help="also write Prometheus text-format metrics to F (textfile collector)")
    p.add_argument("--log-file", metavar="F", help="also log to F (logrotate-safe)")
    p.add_argument("--log-json", action="store_true", default=None,
                   help="log one JSON object per line")
    p.add_argument("--on-stop", choices=("commit", "abandon"),
                   help="at SIGTERM/SIGINT commit pending warps (default) or leave them in "
                        "the inbox")
    p.add_argument("--config", metavar="TOML",
                   help="settings file with [daemon] and [run] tables "
                        "(default: config/streamcoadd.toml, else built-in defaults)")
    p.set_defaults(func=handler)
    return p


def _run_config(run: dict, args):
    from .config import RunConfig

    rc = RunConfig.from_dict(run) if run else RunConfig()
    over = {}
    if getattr(args, "commit_every", None) is not None:
        if args.commit_every < 1:
            raise UserError("--commit-every must be >= 1")
        over["commit_every"] = args.commit_every
    if getattr(args, "commit_interval", None) is not None:
        if args.commit_interval < 0:
            raise UserError("--commit-interval must be >= 0")
        over["commit_interval"] = args.commit_interval
    return replace(rc, **over) if over else rc


def build_config(args) -> tuple[DaemonConfig, object]:
    cfg, run = load_config(getattr(args, "config", None))
    for name in ("inbox", "done", "rejected", "poll", "stable_seconds", "reconcile_interval",
                 "until_idle", "idle_commit", "status_file", "metrics_file", "log_file",
                 "on_stop", "delete_done"):
        v = getattr(args, name, None)
        if v is not None:
            setattr(cfg, name, v)
    if getattr(args, "log_json", None):
        cfg.log_format = "json"
    cfg.validate()
    return cfg, _run_config(run, args)


def handler(args, make_ingestor=None) -> int:
    try:
        cfg, rc = build_config(args)
        setup_logging(cfg)
    except UserError as e:
        print(f"streamcoadd watch: {e}", file=sys.stderr)
        return EXIT_ERROR
    try:
        from .state import StateLocked
    except ImportError:  # pragma: no cover - before the core exists
        StateLocked = ()
    d = Daemon(Path(args.state), cfg, rc, make_ingestor=make_ingestor)
    try:
        return d.run()
    except StateLocked as e:
        print(f"streamcoadd watch: {e}", file=sys.stderr)
        return EXIT_LOCKED
    except UserError as e:
        print(f"streamcoadd watch: {e}", file=sys.stderr)
        return EXIT_ERROR


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="streamcoadd")
    sub = ap.add_subparsers(dest="command", required=True)
    register(sub)
    args = ap.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    raise SystemExit(main())
