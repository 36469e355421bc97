"""The daemon's log: one line per event, as ``key=value`` text or as JSON objects, on
stderr and optionally a file (logrotate-safe)."""

from __future__ import annotations

import datetime as dt
import json
import logging
import logging.handlers
import sys
from pathlib import Path

log = logging.getLogger("streamcoadd.service.daemon")


def utcnow() -> str:
    """Now, UTC, ISO 8601 to the second (``2026-01-01T12:00:00Z``)."""
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z")


class TextFormatter(logging.Formatter):
    """``2026-01-01T12:00:00.123Z INFO warp file=a.fits visit=1 ... outcome=folded``"""

    def format(self, record: logging.LogRecord) -> str:
        ts = dt.datetime.fromtimestamp(record.created, dt.timezone.utc)
        msg = record.getMessage()
        kv = record.__dict__.get("fields")  # set by event(); absent on plain log calls
        if kv:
            msg = msg + " " + " ".join(f"{k}={logfmt(v)}" for k, v in kv.items())
        s = f"{ts.strftime('%Y-%m-%dT%H:%M:%S')}.{ts.microsecond // 1000:03d}Z " \
            f"{record.levelname} {msg}"
        if record.exc_info:
            s += "\n" + self.formatException(record.exc_info)
        return s


def logfmt(v) -> str:
    """One value of a text log line: quoted (JSON) when it has spaces, quotes or ``=``."""
    if v is None:
        return "-"
    if isinstance(v, float):
        v = f"{v:g}"
    v = str(v)
    if not v or any(ch in v for ch in ' "=\n\t'):
        return json.dumps(v)
    return v


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ``{"ts": ..., "level": ..., "event": ..., <fields>}``."""

    def format(self, record: logging.LogRecord) -> str:
        d = {"ts": dt.datetime.fromtimestamp(record.created, dt.timezone.utc)
             .isoformat(timespec="milliseconds").replace("+00:00", "Z"),
             "level": record.levelname, "event": record.getMessage()}
        d.update(record.__dict__.get("fields") or {})
        if record.exc_info:
            d["traceback"] = self.formatException(record.exc_info)
        return json.dumps(d, default=str)


def setup_logging(log_format: str = "text", log_file: str = "", level: str = "INFO") -> None:
    """Send the daemon's log (and watchdog's warnings) to stderr and ``log_file``."""
    fmt = JsonFormatter() if log_format == "json" else TextFormatter()
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stderr)]
    if log_file:
        Path(log_file).parent.mkdir(parents=True, exist_ok=True)
        # WatchedFileHandler reopens the file after logrotate moved it
        handlers.append(logging.handlers.WatchedFileHandler(log_file))
    log.handlers.clear()
    for h in handlers:
        h.setFormatter(fmt)
        log.addHandler(h)
    log.setLevel(getattr(logging, level.upper(), logging.INFO))
    log.propagate = False
    # watchdog logs its own warnings (e.g. inotify overflow) through the same handlers
    wd = logging.getLogger("watchdog")
    wd.handlers.clear()
    for h in handlers:
        wd.addHandler(h)
    wd.setLevel(logging.WARNING)
    wd.propagate = False


def event(level: int, name: str, **kv) -> None:
    """Log event ``name`` with its fields (``key=value`` / JSON keys)."""
    log.log(level, name, extra={"fields": kv})


def flush() -> None:
    """Flush every handler (before ``os._exit``)."""
    for h in log.handlers:
        try:
            h.flush()
        except Exception:  # noqa: BLE001 - exiting anyway
            pass
