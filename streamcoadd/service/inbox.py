"""The daemon's event source: which files in the inbox are complete and may be taken.

This module only *finds* files; what is done with a file lives in :mod:`streamcoadd.service.daemon`
(the same split as watchdog's observer / handler).  It follows the rules of
``notes/durability.md``:

* watchdog events are **hints**: an initial full scan, a periodic reconcile scan and a
  rescan whenever hints were dropped catch everything events miss (inotify queue overflow
  is dropped silently by watchdog; network filesystems deliver no events at all);
* ``created`` *and* ``moved`` events are handled; a file **renamed** into the inbox is
  complete (the Maildir convention) and is ready at once; any other file (created in place,
  found by a scan) is ready only once its size and mtime have stayed unchanged for
  ``stable_seconds``;
* ``*.tmp`` / ``*.part`` / hidden files (rsync's ``.name.XXXXXX``) and anything in a
  sub-directory (``tmp/``, ``done/``, ...) are never taken: only regular files at the top
  level of the inbox matching ``patterns``;
* the watchdog handler never raises (an exception would kill the observer thread) and
  only appends to a bounded hint list; :meth:`Inbox.ensure_alive` restarts a dead observer;
* memory is bounded: at most ``max_tracked`` names are tracked; the rest stay on disk and
  are found by later scans (the inbox is the queue).

Only names and ``stat`` results are kept; no file is opened here.
"""

from __future__ import annotations

import fnmatch
import heapq
import logging
import os
import stat as stat_mod
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path

from watchdog.events import FileSystemEvent, FileSystemEventHandler
from watchdog.observers import Observer
from watchdog.observers.polling import PollingObserver

try:  # Linux only
    from watchdog.observers.inotify import InotifyObserver
except ImportError:
    InotifyObserver = None

log = logging.getLogger("streamcoadd.service.daemon")

DEFAULT_PATTERNS = ("*.fits", "*.fit", "*.fits.gz")
IGNORED_SUFFIXES = (".tmp", ".part", ".partial", ".filepart", ".crdownload", "~", ".swp")

WAITING, READY, TAKEN = "waiting", "ready", "taken"


@dataclass
class Candidate:
    """One tracked inbox file (name only, plus what is needed for the stability check)."""

    name: str
    state: str  # WAITING, READY or TAKEN
    size: int = -1
    mtime_ns: int = -1
    ino: int = -1
    since: float = 0.0  # monotonic time (size, mtime) was last seen to change
    seq: int = 0  # discovery order


def fingerprint(st: os.stat_result) -> tuple[int, int, int, int]:
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


class Hints(FileSystemEventHandler):
    """watchdog handler: turns events into name hints for the inbox (a bounded list, under
    a lock; overflow asks for a rescan instead). Never raises, never blocks."""

    def __init__(self, path: Path, max_hints: int, wake: threading.Event):
        super().__init__()
        self.path = path
        self.max_hints = max(1, int(max_hints))
        self.wake = wake
        self.errors = 0  # handler errors (each asked for a rescan)
        self.dropped = 0  # hints dropped because the list was full
        self._lock = threading.Lock()
        self._hints: deque[tuple[str, bool]] = deque()  # (name, renamed_in)
        self._rescan = True  # the initial full scan

    def on_any_event(self, event: FileSystemEvent) -> None:
        try:
            self._hint(event)
        except BaseException:  # noqa: BLE001 - an exception here would kill the observer
            try:
                self.errors += 1
                log.exception("inbox event handler error (ignored; the reconcile scan covers it)")
                self.request_rescan()
            except BaseException:  # noqa: BLE001
                pass

    def _hint(self, event: FileSystemEvent) -> None:
        if event.is_directory:
            return
        etype = event.event_type
        if etype == "moved":
            name = self._top_level_name(event.dest_path)
            renamed = True
        elif etype in ("created", "modified", "closed"):
            name = self._top_level_name(event.src_path)
            renamed = False
        else:
            return
        if name is None:
            return
        with self._lock:
            if len(self._hints) >= self.max_hints:
                self.dropped += 1
                self._rescan = True
            else:
                self._hints.append((name, renamed))
        self.wake.set()

    def _top_level_name(self, p) -> str | None:
        if not p:
            return None
        if isinstance(p, bytes):
            p = os.fsdecode(p)
        head, name = os.path.split(os.path.abspath(p))
        if head != str(self.path):
            return None
        return name

    def request_rescan(self) -> None:
        with self._lock:
            self._rescan = True
        self.wake.set()

    def drain(self) -> tuple[list[tuple[str, bool]], bool]:
        """The hints since the last call ((name, renamed in)), and whether a full rescan
        was asked for."""
        with self._lock:
            hints = list(self._hints)
            self._hints.clear()
            rescan, self._rescan = self._rescan, False
        return hints, rescan


class Inbox:
    """Candidate warp files in one inbox directory.

    Used from a single consumer thread (the daemon loop) except for the watchdog handler
    (:class:`Hints`), which only touches its own hint list, under its lock.
    """

    def __init__(self, path: str | os.PathLike, *, stable_seconds: float = 5.0,
                 poll: float | None = None, reconcile_interval: float = 60.0,
                 patterns=DEFAULT_PATTERNS, max_tracked: int = 10000, max_hints: int = 10000,
                 wake: threading.Event | None = None):
        self.path = Path(path).absolute()
        self.stable_seconds = float(stable_seconds)
        self.reconcile_interval = float(reconcile_interval)
        self.patterns = tuple(patterns)
        self.max_tracked = max(1, int(max_tracked))
        self.wake = wake or threading.Event()

        self._cands: dict[str, Candidate] = {}
        self._n = {WAITING: 0, READY: 0, TAKEN: 0}
        self._ready: deque[str] = deque()
        self._seq = 0
        self._last_scan = 0.0
        self._backlog = False  # more files on disk than tracked
        self._ignored_logged: set[str] = set()
        self._holds: dict[str, float] = {}  # name -> monotonic time before which it is skipped

        self.scans = 0
        self.files_in_inbox = 0  # matching files seen by the last full scan
        self._now = time.monotonic()
        self.handler = Hints(self.path, max_hints, self.wake)
        self.watcher = Watcher(self.path, self.handler, poll)

    # ------------------------------------------------------------------ observer
    def start(self) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        self.watcher.start()

    def stop(self) -> None:
        self.watcher.stop()

    @property
    def observer(self):
        """The running watchdog observer (None when stopped)."""
        return self.watcher.observer

    @property
    def observer_kind(self) -> str:
        return self.watcher.kind

    @property
    def observer_restarts(self) -> int:
        return self.watcher.restarts

    def observer_alive(self) -> bool:
        return self.watcher.alive()

    def ensure_alive(self) -> bool:
        """Restart the observer if its thread (or an emitter) died. Returns True if it was
        restarted. Missed events are covered by a full rescan."""
        if not self.watcher.restart_if_dead():
            return False
        self.request_rescan()
        return True

    def observer_status(self) -> dict:
        """The ``observer`` block of the daemon's status file."""
        return {"kind": self.observer_kind, "alive": self.observer_alive(),
                "restarts": self.observer_restarts, "handler_errors": self.handler_errors,
                "hints_dropped": self.hints_dropped, "scans": self.scans}

    # ------------------------------------------------------------------ hints
    @property
    def handler_errors(self) -> int:
        return self.handler.errors

    @property
    def hints_dropped(self) -> int:
        return self.handler.dropped

    def request_rescan(self) -> None:
        """Scan the whole directory at the next ``refresh`` (events are only hints)."""
        self.handler.request_rescan()

    # ------------------------------------------------------------------ selection
    def eligible(self, name: str) -> bool:
        """A name the daemon may take once complete (not a temp/hidden/other file)."""
        if name.startswith(".") or name.endswith(IGNORED_SUFFIXES):
            return False
        return any(fnmatch.fnmatchcase(name, p) for p in self.patterns)

    def _note_ignored(self, name: str) -> None:
        if name.startswith(".") or name.endswith(IGNORED_SUFFIXES) or name.endswith(".reason"):
            return
        if name not in self._ignored_logged and len(self._ignored_logged) < 1000:
            self._ignored_logged.add(name)
            log.warning("ignoring %s in the inbox: name does not match %s",
                        name, " ".join(self.patterns))

    def _track(self, name: str, renamed: bool, st: os.stat_result | None = None) -> None:
        from_hint = st is None
        c = self._cands.get(name)
        if c is not None:
            if renamed and c.state == WAITING:
                self._set(c, READY)
            return
        if len(self._cands) >= self.max_tracked:
            self._backlog = True
            return
        hold = self._holds.get(name)
        if hold is not None:
            if self._now < hold:
                return
            del self._holds[name]
        if st is None:
            try:
                st = os.stat(self.path / name)
            except OSError:
                return
        if not stat_mod.S_ISREG(st.st_mode):
            return
        self._seq += 1
        if from_hint:
            self.files_in_inbox += 1  # kept up to date between scans
        c = Candidate(name, WAITING, st.st_size, st.st_mtime_ns, st.st_ino, self._now,
                      self._seq)
        self._cands[name] = c
        self._n[WAITING] += 1
        if renamed:
            self._set(c, READY)

    def _scan(self) -> None:
        """Full scan of the inbox's top level (reconcile). Tracks at most ``max_tracked``
        names: the oldest (by mtime) untracked files first."""
        self.scans += 1
        room = self.max_tracked - len(self._cands)
        found: list[tuple[int, str, os.stat_result]] = []
        n = untracked = 0
        try:
            with os.scandir(self.path) as it:
                for de in it:
                    try:
                        if not de.is_file():  # symlinks to files are taken too
                            continue
                    except OSError:
                        continue
                    if not self.eligible(de.name):
                        self._note_ignored(de.name)
                        continue
                    n += 1
                    if de.name in self._cands:
                        continue
                    hold = self._holds.get(de.name)
                    if hold is not None and self._now < hold:
                        continue
                    try:
                        st = de.stat()
                    except OSError:
                        continue
                    untracked += 1
                    found.append((st.st_mtime_ns, de.name, st))
                    if len(found) > 4 * max(room, 1) + 1000:  # keep memory bounded
                        found = heapq.nsmallest(max(room, 0), found)
        except FileNotFoundError:
            log.error("inbox %s does not exist (recreating it)", self.path)
            self.path.mkdir(parents=True, exist_ok=True)
            return
        self.files_in_inbox = n
        chosen = heapq.nsmallest(max(room, 0), found)
        self._backlog = untracked > len(chosen)
        for _, name, st in chosen:
            self._track(name, False, st)
        # forget tracked names that are gone (deleted or moved away by someone else)
        present_check = [c for c in self._cands.values() if c.state != TAKEN]
        for c in present_check:
            if not (self.path / c.name).exists():
                self._drop(c.name)

    def _set(self, c: Candidate, state: str) -> None:
        self._n[c.state] -= 1
        self._n[state] += 1
        c.state = state
        if state == READY:
            self._ready.append(c.name)

    def _drop(self, name: str) -> None:
        c = self._cands.pop(name, None)
        if c is not None:
            self._n[c.state] -= 1
        # a stale name in _ready is skipped by next_ready()

    def refresh(self, now: float | None = None) -> None:
        """Consume hints, rescan if due, and promote files that became stable."""
        now = time.monotonic() if now is None else now
        self._now = now
        hints, rescan = self.handler.drain()
        for name, renamed in hints:
            if self.eligible(name):
                self._track(name, renamed)
            else:
                self._note_ignored(name)
        due = now - self._last_scan >= self.reconcile_interval
        low_water = self._backlog and len(self._cands) < self.max_tracked // 2
        if rescan or due or low_water:
            self._last_scan = now
            self._scan()
        self._check_stable(now)

    def _check_stable(self, now: float) -> None:
        # Only files whose quiet period is over are stat-ed: any write in between changed
        # the mtime (or the size), which resets the clock.
        if not self._n[WAITING]:
            return
        for c in list(self._cands.values()):
            if c.state != WAITING or now - c.since < self.stable_seconds:
                continue
            try:
                st = os.stat(self.path / c.name)
            except OSError:
                self._drop(c.name)
                continue
            if (st.st_size, st.st_mtime_ns, st.st_ino) != (c.size, c.mtime_ns, c.ino):
                c.size, c.mtime_ns, c.ino, c.since = st.st_size, st.st_mtime_ns, st.st_ino, now
                continue
            self._set(c, READY)

    def next_ready(self) -> str | None:
        """Name of the next complete file (discovery order), marked TAKEN; or None."""
        while self._ready:
            name = self._ready.popleft()
            c = self._cands.get(name)
            if c is None or c.state != READY:
                continue
            self._set(c, TAKEN)
            return name
        return None

    def peek_ready(self) -> str | None:
        """Name of the file :meth:`next_ready` would return next, without taking it."""
        for name in self._ready:
            c = self._cands.get(name)
            if c is not None and c.state == READY:
                return name
        return None

    def forget(self, name: str, hold_seconds: float = 0.0, removed: bool = False) -> None:
        """The file left the inbox (``removed``) or must be looked at afresh. With
        ``hold_seconds`` the name is not taken again before that time (a file that could not
        be moved away)."""
        self._drop(name)
        if removed:
            self.files_in_inbox = max(0, self.files_in_inbox - 1)
        if hold_seconds > 0:
            self._holds[name] = self._now + hold_seconds

    def release(self, name: str) -> None:
        """A TAKEN file goes back to READY (e.g. the daemon stopped before submitting it)."""
        c = self._cands.get(name)
        if c is not None and c.state == TAKEN:
            self._set(c, READY)
            self._ready.pop()
            self._ready.appendleft(name)

    # ------------------------------------------------------------------ accounting
    def counts(self) -> dict:
        n = self._n
        return {"waiting": n[WAITING], "ready": n[READY], "taken": n[TAKEN],
                "in_inbox": max(self.files_in_inbox, len(self._cands)),
                "tracked_max": self.max_tracked,
                "backlog_untracked": self._backlog}

    def has_untaken(self) -> bool:
        """Files waiting (not yet stable) or ready, or more on disk than tracked."""
        return self._backlog or self._n[WAITING] > 0 or self._n[READY] > 0

    def has_waiting(self) -> bool:
        return self._n[WAITING] > 0

    def next_check_in(self, now: float | None = None) -> float | None:
        """Seconds until the earliest waiting file could become stable (None if none)."""
        now = time.monotonic() if now is None else now
        if not self._n[WAITING]:
            return None
        ts = [c.since + self.stable_seconds - now for c in self._cands.values()
              if c.state == WAITING]
        return max(0.0, min(ts)) if ts else None

    def time_to_reconcile(self, now: float | None = None) -> float:
        now = time.monotonic() if now is None else now
        return max(0.0, self._last_scan + self.reconcile_interval - now)


class Watcher:
    """The watchdog observer of one directory: inotify where available (else watchdog's
    default), polling when asked or when inotify is exhausted; restarted when it died."""

    def __init__(self, path: Path, handler: FileSystemEventHandler, poll: float | None):
        self.path = path
        self.handler = handler
        self.poll = poll if poll else None
        self.kind = "polling" if self.poll else "inotify"
        self.observer = None
        self.restarts = 0
        self._last_restart_try = 0.0

    def _new_observer(self):
        if self.poll:
            return PollingObserver(timeout=self.poll)
        if InotifyObserver is not None and sys.platform.startswith("linux"):
            try:
                # full events: a file moved in from an unwatched directory is reported as a
                # move (so: complete), not as a creation
                return InotifyObserver(generate_full_events=True)
            except TypeError:  # a watchdog without generate_full_events
                pass
        return Observer()

    def start(self) -> None:
        obs = self._new_observer()
        obs.schedule(self.handler, str(self.path), recursive=False)
        try:
            obs.start()
        except OSError as e:
            if self.poll:
                raise
            # inotify exhausted (max_user_watches / instances): fall back to polling
            log.warning("inotify observer failed (%s); falling back to polling every %.1f s",
                        e, 2.0)
            self.poll = 2.0
            self.kind = "polling (fallback)"
            obs = self._new_observer()
            obs.schedule(self.handler, str(self.path), recursive=False)
            obs.start()
        self.observer = obs

    def alive(self) -> bool:
        obs = self.observer
        if obs is None or not obs.is_alive():
            return False
        try:
            return all(e.is_alive() for e in list(obs.emitters))
        except Exception:  # noqa: BLE001 - watchdog internals; the thread itself is alive
            return obs.is_alive()

    def restart_if_dead(self) -> bool:
        """Restart a dead observer (at most every 2 s). True if it was restarted."""
        if self.alive():
            return False
        now = time.monotonic()
        if now - self._last_restart_try < 2.0:
            return False
        self._last_restart_try = now
        log.warning("inbox observer is not running; restarting it and rescanning %s", self.path)
        old = self.observer
        if old is not None:
            try:
                old.stop()
            except Exception:  # noqa: BLE001 - replacing it anyway
                pass
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            self.start()
        except Exception as e:  # noqa: BLE001
            log.error("could not restart the inbox observer: %s (scanning only, retrying)", e)
            self.observer = None
        self.restarts += 1
        return True

    def stop(self) -> None:
        obs, self.observer = self.observer, None
        if obs is not None:
            try:
                obs.stop()
                obs.join(timeout=5)
            except Exception:  # noqa: BLE001 - stopping anyway
                pass
