"""What the daemon counts: outcomes, latencies, the last warp and commit, and its
throughput in steady state (warps/s and input Mpix/s over a sliding window)."""

from __future__ import annotations

import time
from collections import deque
from dataclasses import asdict, dataclass

from streamcoadd.service.logs import utcnow

OUTCOMES = ("folded", "no_cells", "duplicate", "rejected")


@dataclass(frozen=True)
class WarpEvent:
    """One file's final outcome, as logged (the ``warp`` event) and counted."""

    file: str
    outcome: str  # one of OUTCOMES
    visit: int | None = None
    detector: int | None = None
    band: str | None = None
    cells: int | None = None
    ms: float | None = None  # wall time of the ingestor's submit, milliseconds
    reason: str = ""

    @classmethod
    def of(cls, name: str, o, outcome: str, reason: str = "",
           ms: float | None = None) -> WarpEvent:
        """From the ingestor's outcome record ``o`` (None when there is none); ``ms``
        replaces ``o.ms`` (the final outcome of a commit may not carry it)."""
        if o is None:
            return cls(name, outcome, reason=reason)
        wid = o.warp_id
        return cls(name, outcome,
                   visit=wid.visit if wid is not None else None,
                   detector=wid.detector if wid is not None else None,
                   band=o.band or None, cells=None if outcome == "rejected" else o.cells,
                   ms=round(float(ms if ms is not None else o.ms or 0.0), 1), reason=reason)

    def fields(self) -> dict:
        """The log fields, in this order (the text log is read by people and tests)."""
        d = {"file": self.file, "visit": self.visit, "detector": self.detector,
             "band": self.band, "cells": self.cells, "ms": self.ms, "outcome": self.outcome}
        if self.reason:
            d["reason"] = self.reason
        return d


@dataclass
class Counts:
    folded: int = 0
    no_cells: int = 0
    duplicate: int = 0
    rejected: int = 0
    commits: int = 0
    errors: int = 0
    write_errors: int = 0  # write errors that paused folding (disk full, ...)


class Throughput:
    """Warps/s and input Mpix/s of folded warps, over the last ``seconds`` and over the
    last ``warps`` warps. A warp counts once it is durable; its span starts when it was
    taken from the inbox (fold start) and ends when its commit returned. Its input pixels
    come with the ingestor's outcome (``Outcome.pixels``, H * W of the IMAGE plane)."""

    def __init__(self, seconds: float = 60.0, warps: int = 32):
        self.seconds = float(seconds)
        self.warps = int(warps)
        self._done: deque[tuple[float, float, int]] = deque()  # (t_start, t_done, pixels)
        self.total_warps = 0
        self.total_pixels = 0

    def add(self, t_start: float, t_done: float, pixels: int) -> None:
        """A warp taken at ``t_start`` became durable at ``t_done`` (monotonic s)."""
        self._done.append((t_start, t_done, int(pixels)))
        self.total_warps += 1
        self.total_pixels += int(pixels)
        self._trim(t_done)

    def _trim(self, now: float) -> None:
        # keep what either window may need: the last `warps` records, and those of the
        # last `seconds`
        d = self._done
        while len(d) > self.warps and d[0][1] < now - self.seconds:
            d.popleft()

    def summary(self, now: float, uptime: float) -> dict:
        """``time_window`` and ``warp_window`` blocks of the status file."""
        self._trim(now)
        span = min(self.seconds, max(uptime, 1e-9))
        recent = [r for r in self._done if r[1] > now - span]
        last = list(self._done)[-self.warps:]
        wspan = (last[-1][1] - min(r[0] for r in last)) if last else 0.0
        return {"time_window": _rates(self.seconds, recent, span),
                "warp_window": dict(_rates(None, last, wspan), size=self.warps),
                "folded_warps_total": self.total_warps,
                "input_mpix_total": round(self.total_pixels / 1e6, 6)}


def _rates(seconds: float | None, recs: list, span: float) -> dict:
    n = len(recs)
    mpix = sum(r[2] for r in recs) / 1e6
    d = {"warps": n, "input_mpix": round(mpix, 6), "span_s": round(span, 6),
         "warps_per_s": round(n / span, 6) if span > 0 else 0.0,
         "input_mpix_per_s": round(mpix / span, 6) if span > 0 else 0.0}
    if seconds is not None:
        d = {"seconds": seconds, **d}
    return d


class DaemonStats:
    """The daemon's counters and recent history (owned by the daemon; the quarantine
    records outcomes through :meth:`record`)."""

    def __init__(self, throughput_window: float = 60.0, throughput_warps: int = 32):
        self.counts = Counts()
        self.last_warp: dict | None = None
        self.last_commit: dict | None = None
        self.last_error: str | None = None
        self.throughput = Throughput(throughput_window, throughput_warps)
        self.latency = {"fold_s_sum": 0.0, "fold_count": 0, "commit_s_sum": 0.0}
        self._recent: deque[float] = deque(maxlen=100000)  # monotonic times of final outcomes
        self._changed = True  # since the status file was last written

    def record(self, ev: WarpEvent) -> None:
        """A file's final outcome."""
        if ev.outcome in OUTCOMES:
            setattr(self.counts, ev.outcome, getattr(self.counts, ev.outcome) + 1)
        self._recent.append(time.monotonic())
        if ev.ms and ev.outcome in ("folded", "no_cells"):
            self.latency["fold_s_sum"] += ev.ms / 1e3
            self.latency["fold_count"] += 1
        self.last_warp = dict(ev.fields(), at=utcnow())
        self._changed = True

    def commit(self, warps: int, seconds: float, why: str) -> None:
        """A durable commit of ``warps`` warps took ``seconds``."""
        self.counts.commits += 1
        self.latency["commit_s_sum"] += seconds
        self.last_commit = {"at": utcnow(), "warps": warps, "seconds": round(seconds, 3),
                            "why": why}
        self._changed = True

    def error(self, message: str, write_error: bool = False) -> None:
        """An internal error (or, with ``write_error``, a write error that paused)."""
        if write_error:
            self.counts.write_errors += 1
        else:
            self.counts.errors += 1
        self.last_error = message
        self._changed = True

    def mark_changed(self) -> None:
        """Something the status file shows changed (write it soon)."""
        self._changed = True

    @property
    def changed(self) -> bool:
        """Did anything the status file shows change since :meth:`take_changed`?"""
        return self._changed

    def take_changed(self) -> bool:
        """Did anything change since the last call?"""
        changed, self._changed = self._changed, False
        return changed

    def summary(self, now: float, uptime: float) -> dict:
        """The counting part of the status file."""
        n60 = sum(1 for t in self._recent if now - t <= 60)
        n300 = sum(1 for t in self._recent if now - t <= 300)
        total = sum(getattr(self.counts, k) for k in OUTCOMES)
        return {"counts": asdict(self.counts), "last_warp": self.last_warp,
                "last_commit": self.last_commit,
                "throughput": {"warps_per_min_1min": float(n60),
                               "warps_per_min_5min": round(n300 / min(5.0, max(uptime, 1) / 60), 2),
                               "warps_per_s_overall": round(total / max(uptime, 1e-9), 3),
                               **self.throughput.summary(now, uptime)},
                "last_error": self.last_error, "latency": dict(self.latency)}
