"""Write-error pause: when a write fails in a way that freeing space (or fixing the disk)
cures -- disk full, quota, an I/O error of the state -- the daemon stops folding, keeps the
files in its inbox, and probes with a bounded, doubling back-off until writing works again.

:class:`WritePause` owns that state. A write error is first *requested* where it happens
(possibly in the middle of handling a commit's outcomes); the daemon's loop enters the
pause at its next safe point (:meth:`WritePause.take_request`, :meth:`WritePause.begin`).
"""

from __future__ import annotations

import errno
import logging
import os
import re
import time
from dataclasses import dataclass, replace
from pathlib import Path

from streamcoadd.core.errors import StateWriteError
from streamcoadd.service.logs import event, log, utcnow

# errors of a *write* that may go away by themselves or by an operator freeing space:
# the daemon pauses on them instead of quarantining a file as an internal error
WRITE_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
PROBE_BYTES = 64 << 10  # the fsynced test write of a probe


def is_write_error(e: BaseException) -> bool:
    """A failed write that freeing space (or fixing the disk) cures: the state's
    ``StateWriteError``, or ENOSPC / EDQUOT anywhere."""
    return isinstance(e, StateWriteError) or (isinstance(e, OSError)
                                              and e.errno in WRITE_ERRNOS)


def free_bytes(directory: Path) -> int | None:
    """Bytes available to this user on the filesystem of ``directory`` (None: unknown)."""
    try:
        st = os.statvfs(directory)
    except OSError:
        return None
    return st.f_bavail * st.f_frsize


def mb(n: int | None) -> str:
    return "?" if n is None else f"{n / 1e6:.1f} MB"


@dataclass(frozen=True)
class PauseRequest:
    """A write that failed: what was being done, where, and why.

    ``probe_dirs``: where a probe must be able to write again; ``need_bytes``: about how
    much the failed write needed; ``requeued``: files put back in the queue for it."""

    during: str
    path: str
    probe_dirs: tuple[str, ...]
    errno: str | None
    error: str
    need_bytes: int
    requeued: int
    message: str

    @classmethod
    def of(cls, during: str, exc: BaseException, state_dir: Path, path: Path | None,
           need: int, requeued: int) -> PauseRequest:
        """Describe ``exc`` (an ``OSError``, a ``StateWriteError`` or SQLite's error)."""
        cause = exc.__cause__ if isinstance(exc.__cause__, OSError) else exc
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        where = _attr(cause, "filename") or _attr(exc, "filename")
        if not where:  # StateWriteError: "cannot write SHARD_DIR: reason. The state ..."
            m = re.match(r"cannot write (/.+?): ", first)
            where = m.group(1) if m else None
        where = Path(where) if where else (path or state_dir)
        err = _attr(cause, "errno") or _attr(exc, "errno")
        first = first.split(". The state is")[0]  # the rest is said by the pause message
        if not isinstance(cause, StateWriteError) and _attr(cause, "strerror"):
            first = cause.strerror
        ename = errno.errorcode.get(err) if isinstance(err, int) else None
        if ename is None and "database or disk is full" in first:
            ename = "SQLITE_FULL"  # SQLite's word for ENOSPC (it reports no errno)
        return cls(during, str(where), tuple(sorted({str(state_dir), str(path or state_dir)})),
                   ename, first, int(need or 0), requeued,
                   f"{during}: cannot write {where}: {first}")

    @property
    def disk_full(self) -> bool:
        return self.errno in ("ENOSPC", "EDQUOT", "SQLITE_FULL") or "full" in self.error.lower()


def _attr(e: BaseException, name: str):
    """``OSError``'s ``filename`` / ``errno`` / ``strerror``; None for other exceptions."""
    return getattr(e, name, None) if isinstance(e, OSError) else None


class WritePause:
    """The pause after a write error, its probes and their back-off.

    Parameters
    ----------
    state_dir : Path
        Always probed.
    retry_initial, retry_max : float
        Seconds before the first probe, and the cap of the doubling wait between probes.
    """

    def __init__(self, state_dir: Path, retry_initial: float, retry_max: float):
        self.state_dir = state_dir
        self.retry_initial = retry_initial
        self.retry_max = retry_max
        self._request: PauseRequest | None = None
        self._req: PauseRequest | None = None  # the one being paused on
        self._retry_delay: float | None = None  # back-off, reset by a successful write
        self._since = ""
        self._t0 = self._next_at = self._delay = 0.0
        self._probes = 0
        self._last_probe: str | None = None
        self._free: dict[str, int | None] = {}

    # ------------------------------------------------------------ requests
    def request(self, during: str, exc: BaseException, *, requeued: int = 0,
                path: Path | None = None, need: int = 0) -> None:
        """A write failed (the first one wins; later ones only add their requeued files)."""
        if self._request is not None:
            self._request = replace(self._request, requeued=self._request.requeued + requeued)
            return
        self._request = PauseRequest.of(during, exc, self.state_dir, path, need, requeued)

    @property
    def requested(self) -> bool:
        return self._request is not None

    def take_request(self) -> PauseRequest:
        """The pending request, cleared."""
        req, self._request = self._request, None
        assert req is not None, "take_request without a request"
        return req

    def writes_work(self) -> None:
        """A durable write succeeded: the next pause starts its back-off afresh."""
        self._retry_delay = None

    # ------------------------------------------------------------ the pause
    @property
    def active(self) -> bool:
        return self._req is not None

    def begin(self, req: PauseRequest, requeued: int) -> None:
        """Enter the pause on ``req`` (``requeued``: files not yet durable, back in the
        inbox); logs the one ``paused`` event saying what to do."""
        delay = self.retry_initial if self._retry_delay is None \
            else min(self._retry_delay * 2, self.retry_max)
        self._retry_delay = delay
        now = time.monotonic()
        self._req = replace(req, requeued=requeued)
        self._since, self._t0, self._next_at, self._delay = utcnow(), now, now + delay, delay
        self._probes, self._last_probe = 0, None
        self._free = {d: free_bytes(Path(d)) for d in req.probe_dirs}
        todo = (f"free space on the filesystem of {req.path}"
                + (f" (about {mb(req.need_bytes)} needed)" if req.need_bytes else "")
                if req.disk_full else f"fix the cause ({req.error})")
        event(logging.ERROR, "paused", reason="write error", during=req.during,
              path=req.path, errno=req.errno, error=req.error,
              free=", ".join(f"{d}: {mb(v)}" for d, v in self._free.items()),
              message=f"folding is PAUSED: {todo}. The state is consistent (the last commit "
                      f"is intact); the {requeued} warp(s) not yet durable stay in the inbox. "
                      f"The daemon checks every {self.retry_initial:g}-{self.retry_max:g} s "
                      "and resumes by itself; no restart needed (SIGTERM still stops it)")

    def step(self, now: float) -> tuple[bool, bool]:
        """Probe if one is due. Returns (probed, writes work again)."""
        if now < self._next_at:
            return False, False
        ok, detail = self._probe()
        self._probes += 1
        if ok:
            return True, True
        self._last_probe = detail
        self._delay = min(self._delay * 2, self.retry_max)
        self._next_at = now + self._delay
        log.debug("still paused: %s; next probe in %.1f s", detail, self._delay)
        return True, False

    def time_to_probe(self, now: float) -> float:
        return max(self._next_at - now, 0.0)

    def end(self) -> None:
        """Writing works again: log ``resumed`` and leave the pause."""
        req, self._req = self._req, None
        event(logging.INFO, "resumed", paused_s=round(time.monotonic() - self._t0, 1),
              probes=self._probes, path=req.path,
              free=", ".join(f"{d}: {mb(free_bytes(Path(d)))}" for d in req.probe_dirs),
              note="writing works again; folding the inbox")

    def _probe(self) -> tuple[bool, str]:
        """Can the daemon write again? Enough free space for about the failed batch (at
        most half the filesystem) in every directory involved, and a 64 KiB test file
        written, fsynced and removed there."""
        for d in map(Path, self._req.probe_dirs):
            try:
                st = os.statvfs(d)
                free, size = st.f_bavail * st.f_frsize, st.f_blocks * st.f_frsize
            except OSError as e:
                return False, f"statvfs {d}: {e.strerror}"
            need = min(self._req.need_bytes + (1 << 20), size // 2)
            if free < need:
                return False, f"{mb(free)} free in {d}, {mb(need)} wanted"
            tmp = d / f".streamcoadd-probe.{os.getpid()}.tmp"
            try:
                fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
                try:
                    os.write(fd, b"\0" * PROBE_BYTES)
                    os.fsync(fd)
                finally:
                    os.close(fd)
            except OSError as e:
                return False, f"test write in {d}: {e.strerror or e}"
            finally:
                try:
                    os.unlink(tmp)
                except OSError:
                    pass
        return True, "ok"

    def status(self, now: float) -> dict | None:
        """The ``paused`` block of the status file (None when not paused)."""
        req = self._req
        if req is None:
            return None
        return {"reason": "write error", "during": req.during, "path": req.path,
                "errno": req.errno, "error": req.error, "since": self._since,
                "paused_s": round(now - self._t0, 1), "probes": self._probes,
                "next_probe_in_s": round(max(0.0, self._next_at - now), 1),
                "last_probe": self._last_probe, "requeued": req.requeued,
                "need_bytes": req.need_bytes, "free_bytes": self._free,
                "message": req.message}
