"""How a file leaves the inbox once its outcome is known: to ``done/`` (or deleted) when it
is durable or a duplicate, to ``rejected/`` with a ``NAME.reason`` file when it is refused.

A write error on the way (disk full) does not lose or misfile anything: the file stays in
the inbox and a pause is requested (:mod:`streamcoadd.service.pause`); after the pause it is
looked at again (a durable one is then a duplicate). Temporary files are named
``.NAME.PID.tmp`` so that those of a killed daemon can be recognised and removed at start.
"""

from __future__ import annotations

import errno
import logging
import os
import re
import shutil
from pathlib import Path

from streamcoadd.core.errors import UserError
from streamcoadd.service.inbox import Inbox, fingerprint
from streamcoadd.service.logs import event, log, utcnow
from streamcoadd.service.pause import WritePause, is_write_error
from streamcoadd.service.stats import DaemonStats, WarpEvent
from streamcoadd.store import durable
from streamcoadd.store.durable import (
    atomic_write_text,
    fsync_dir_quietly,
    tmp_sibling,
    unlink_quietly,
)
from streamcoadd.store.status_file import pid_alive

# temporary files the daemon writes in done/ and rejected/: .NAME.PID.tmp
_TMP_RE = re.compile(r"^\..+\.(\d+)\.tmp$")


# ---------------------------------------------------------------------------- file helpers
def move(src: Path, dst: Path) -> None:
    """Rename; across filesystems copy + fsync + rename + unlink."""
    try:
        os.rename(src, dst)
    except OSError as e:
        if e.errno != errno.EXDEV:
            raise
        tmp = tmp_sibling(dst)
        try:
            with open(src, "rb") as fi, open(tmp, "wb") as fo:
                shutil.copyfileobj(fi, fo, 1 << 20)
                fo.flush()
                os.fsync(fo.fileno())
            os.replace(tmp, dst)
        except BaseException:
            unlink_quietly(tmp)  # a partial copy (disk full) must not stay in done/
            raise
        fsync_dir_quietly(dst.parent)
        os.unlink(src)


def unique_target(directory: Path, name: str) -> Path:
    """``directory/name``, or ``name.1``, ``name.2``, ... if taken (never overwrite)."""
    target = directory / name
    k = 0
    while target.exists() or target.with_name(target.name + ".reason").exists():
        k += 1
        target = directory / f"{name}.{k}"
    return target


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


def st_size(path: Path) -> int:
    try:
        return os.stat(path).st_size
    except OSError:
        return 0


# ---------------------------------------------------------------------------- quarantine
class Quarantine:
    """Takes files out of the inbox: :meth:`finish` (durable or duplicate) and
    :meth:`reject`. Every outcome is recorded in ``stats`` and logged as a ``warp`` event.

    Parameters
    ----------
    inbox : Inbox
        The inbox's event source (told when a file left or must be looked at again).
    done_dir, rejected_dir : Path
        Absolute directories; ``done_dir`` is unused with ``delete_done``.
    delete_done : bool
        Delete durable files instead of moving them to ``done_dir``.
    state_dir : Path
        Named in ``.reason`` files.
    pause : WritePause
        Where a write error is reported.
    stats : DaemonStats
        Counts and the last warp.
    """

    def __init__(self, inbox: Inbox, done_dir: Path, rejected_dir: Path, delete_done: bool,
                 state_dir: Path, pause: WritePause, stats: DaemonStats):
        self.inbox = inbox
        self.inbox_dir = inbox.path
        self.done_dir = done_dir
        self.rejected_dir = rejected_dir
        self.delete_done = delete_done
        self.state_dir = state_dir
        self.pause = pause
        self.stats = stats

    @staticmethod
    def prepare_dirs(inbox_dir: Path, done_dir: Path, rejected_dir: Path,
                     delete_done: bool) -> None:
        """Create the directories (``UserError`` when impossible or not writable) and
        remove the temporary files a killed daemon left in them."""
        for name, d in (("done", done_dir), ("rejected", rejected_dir)):
            if d == inbox_dir:
                raise UserError(f"the {name} directory must not be the inbox ({d})")
        for d in (inbox_dir, rejected_dir) + (() if delete_done else (done_dir,)):
            try:
                d.mkdir(parents=True, exist_ok=True)
            except OSError as e:
                raise UserError(f"cannot create directory {d}: {e.strerror}") from None
            if not os.access(d, os.W_OK | os.X_OK):
                raise UserError(f"directory {d} is not writable by this user")
        for d in (rejected_dir, done_dir):
            for f in clean_stale_tmp(d):
                event(logging.INFO, "removed-stale-tmp", file=str(f))

    def sync_dirs(self) -> None:
        """fsync the inbox and done/ (after a batch of :meth:`finish` with ``fsync=False``)."""
        fsync_dir_quietly(self.inbox_dir)
        if not self.delete_done:
            fsync_dir_quietly(self.done_dir)

    def _still_same(self, path: Path, fp: tuple) -> bool:
        try:
            return fingerprint(os.stat(path)) == fp
        except OSError:
            return False

    def finish(self, ev: WarpEvent, fp: tuple, fsync: bool = True) -> None:
        """``ev.file`` is durable (or a duplicate): remove it from the inbox (to done/ or
        deleted). ``fp``: its fingerprint when it was taken."""
        name = ev.file
        path = self.inbox_dir / name
        if not self._still_same(path, fp):
            # replaced or removed while being folded: look at whatever is there afresh
            event(logging.WARNING, "changed", file=name,
                  note="file changed in the inbox while folding; it will be looked at again")
            self.inbox.forget(name)
            self.inbox.request_rescan()
            self._done(ev, logging.INFO)
            return
        try:
            if self.delete_done:
                os.unlink(path)
            else:
                move(path, unique_target(self.done_dir, name))
        except OSError as e:
            if is_write_error(e):
                # durable already; it stays in the inbox and is a duplicate after the pause
                self.inbox.release(name)
                self.pause.request("move-to-done", e, requeued=1, path=self.done_dir,
                                   need=st_size(path))
                self._done(ev, logging.INFO, note="durable; left in the inbox (done/ not "
                           "writable now), reported as a duplicate after the pause")
                return
            self.stats.error(f"cannot move {name} out of the inbox: {e}")
            log.error("%s (it is folded; it will be seen as a duplicate later)",
                      self.stats.last_error)
            self.inbox.forget(name, hold_seconds=60.0)
        else:
            durable.crash_point("daemon-moved-done")
            self.inbox.forget(name, removed=True)
            if fsync:
                self.sync_dirs()
        self._done(ev, logging.INFO)

    def reject(self, ev: WarpEvent, fp: tuple, detail: str | None = None) -> None:
        """Move ``ev.file`` to rejected/ beside ``NAME.reason`` (``ev.reason``, then
        ``detail``, e.g. a traceback)."""
        name = ev.file
        path = self.inbox_dir / name
        if not self._still_same(path, fp):
            self.inbox.forget(name)
            self.inbox.request_rescan()
            event(logging.WARNING, "warp", **ev.fields(), note="file changed or vanished meanwhile")
            return
        target = unique_target(self.rejected_dir, name)
        text = self._reason_text(ev, detail)
        reason_file = target.with_name(target.name + ".reason")
        try:
            atomic_write_text(reason_file, text)
        except OSError as e:
            if is_write_error(e):
                self._defer(ev, e, len(text) + st_size(path), "cannot write to rejected/ now; "
                            "the file stays in the inbox and is rejected after the pause")
                return
            log.error("cannot write %s.reason: %s", target, e)
        try:
            move(path, target)
            fsync_dir_quietly(self.rejected_dir)
            fsync_dir_quietly(self.inbox_dir)
            self.inbox.forget(name, removed=True)
        except OSError as e:
            if is_write_error(e):
                unlink_quietly(reason_file)
                self._defer(ev, e, len(text) + st_size(path), "cannot move it to rejected/ "
                            "now; it stays in the inbox and is rejected after the pause")
                return
            self.stats.error(f"cannot move {name} to {self.rejected_dir}: {e}")
            log.error(self.stats.last_error)
            self.inbox.forget(name, hold_seconds=60.0)
        self._done(ev, logging.WARNING)

    def _reason_text(self, ev: WarpEvent, detail: str | None) -> str:
        text = (f"{ev.reason}\n\nfile: {ev.file}\nrejected: {utcnow()}\n"
                f"state: {self.state_dir}\ndaemon pid: {os.getpid()}\n")
        if ev.visit is not None:
            text += f"visit: {ev.visit}\ndetector: {ev.detector}\n"
        if detail:
            text += "\n" + detail
        return text

    def _defer(self, ev: WarpEvent, e: OSError, need: int, note: str) -> None:
        self.inbox.release(ev.file)
        self.pause.request("quarantine", e, requeued=1, path=self.rejected_dir, need=need)
        event(logging.WARNING, "reject-deferred", file=ev.file, reason=ev.reason, note=note)

    def _done(self, ev: WarpEvent, level: int, **extra) -> None:
        self.stats.record(ev)
        event(level, "warp", **ev.fields(), **extra)
