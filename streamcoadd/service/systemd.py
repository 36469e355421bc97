"""systemd integration of the daemon (``Type=notify``, ``WatchdogSec=``): ``READY=1`` once
watching, ``WATCHDOG=1`` pings at half the watchdog period, ``STATUS=`` and ``STOPPING=1``.
A no-op where ``NOTIFY_SOCKET`` is not set."""

from __future__ import annotations

import os
import socket
import time


class SdNotify:
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
        """Send one notification (e.g. ``"READY=1"``); never blocks, never raises."""
        if self.sock is not None:
            try:
                self.sock.send(msg.encode())
            except OSError:
                pass

    def ping(self) -> None:
        """``WATCHDOG=1``, at most every half watchdog period (``watchdog``, s)."""
        if self.watchdog and time.monotonic() - self._last >= self.watchdog:
            self._last = time.monotonic()
            self.send("WATCHDOG=1")
