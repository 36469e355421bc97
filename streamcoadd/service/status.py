"""The daemon's status file (format: :mod:`streamcoadd.store.status_file`) and its
Prometheus text-file twin, written atomically every ``status_interval`` seconds (at most
once a second while things change) and at every change of state."""

from __future__ import annotations

import json
import time
from pathlib import Path

from streamcoadd.service.logs import log
from streamcoadd.service.metrics import prometheus_text
from streamcoadd.store.durable import atomic_write_text

ERROR_LOG_INTERVAL = 60.0  # s: a status file that cannot be written is logged this often


class StatusWriter:
    """Writes ``status_file`` (JSON) and, if given, ``metrics_file`` (Prometheus text)."""

    def __init__(self, status_file: Path, metrics_file: Path | None, interval: float):
        self.status_file = status_file
        self.metrics_file = metrics_file
        self.interval = interval
        self._at = 0.0
        self._error_at = -1e9

    def remove_stale_tmp(self) -> None:
        """A status write interrupted by a crash left ``.NAME.PID.tmp`` (call with the
        state's lock held: no other daemon writes there)."""
        for stale in self.status_file.parent.glob(f".{self.status_file.name}.*.tmp"):
            stale.unlink(missing_ok=True)

    def due(self, now: float, changed: bool) -> bool:
        return now - self._at >= (1.0 if changed else self.interval)

    def write(self, status: dict, now: float | None = None) -> None:
        """Write both files now. Never fatal (e.g. disk full): logged once a minute."""
        now = time.monotonic() if now is None else now
        self._at = now
        try:
            atomic_write_text(self.status_file, json.dumps(status, indent=1) + "\n")
            if self.metrics_file is not None:
                atomic_write_text(self.metrics_file, prometheus_text(status))
        except OSError as e:
            if now - self._error_at > ERROR_LOG_INTERVAL:
                self._error_at = now
                log.error("cannot write status file %s: %s", self.status_file, e)
