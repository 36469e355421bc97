"""SIGTERM / SIGINT / SIGHUP for the daemon: handlers only set flags, which the main loop
reads (every wait of the loop is at most 1 s, so a flag is seen within a second)."""

from __future__ import annotations

import os
import signal
from collections.abc import Callable


class StopSignals:
    """Flags set by signals. The first SIGTERM/SIGINT asks the loop to stop; a second one
    calls ``on_second(signal name)`` (which must not return: it abandons at once)."""

    def __init__(self, on_second: Callable[[str], None]):
        self.stop_requested = False
        self.signal_name: str | None = None
        self._rescan = False
        self._on_second = on_second

    def install(self) -> None:
        signal.signal(signal.SIGTERM, self._on_stop)
        signal.signal(signal.SIGINT, self._on_stop)
        if hasattr(signal, "SIGHUP"):
            signal.signal(signal.SIGHUP, self._on_hup)

    def _on_stop(self, signum, frame) -> None:
        name = signal.Signals(signum).name
        if self.stop_requested:
            self._on_second(name)
            os._exit(0)  # on_second must not return; never fall back into the loop
        # Only set flags here: a handler runs in the main thread between two bytecodes,
        # possibly while that thread holds the (non-reentrant) lock of an Event inside
        # Event.wait -- calling wake.set() from here deadlocked the daemon on SIGTERM now
        # and then.
        self.stop_requested = True
        self.signal_name = name

    def _on_hup(self, signum, frame) -> None:
        self._rescan = True  # same rule: no locks in a handler

    def take_rescan(self) -> bool:
        """Was SIGHUP (rescan the inbox) received since the last call?"""
        asked, self._rescan = self._rescan, False
        return asked
