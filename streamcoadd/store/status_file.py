"""The daemon's status file (``STATE/daemon-status.json``): its name, how it is read back
(``streamcoadd status``, the reader API), and its human summary.

The daemon (``streamcoadd.service.status``) writes it atomically every few seconds; the
keys are documented in ``docs/operations.md`` ("Status file"). ``STATUS_VERSION`` is bumped
when a key changes meaning (new keys do not bump it).
"""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

STATUS_NAME = "daemon-status.json"
STATUS_VERSION = 1


def status_path(state_dir: str | os.PathLike) -> Path:
    """Where the daemon of ``state_dir`` writes its status unless told otherwise."""
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
             and pid_alive(d["pid"]))
    d["running"] = bool(alive and d.get("state") not in ("stopped", "failed"))
    return d


def pid_alive(pid: int) -> bool:
    """Is process ``pid`` alive on this host (also when owned by another user)?"""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


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
             _throughput_line(d.get("throughput", {}))]
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


def _throughput_line(t: dict) -> str:
    line = f"  throughput {t.get('warps_per_min_5min', 0):.1f} warps/min (last 5 min)"
    tw, ww = t.get("time_window"), t.get("warp_window")
    if tw and ww:  # status files of this version; older daemons wrote only the above
        line += (f"; {tw['warps_per_s']:.3g} warps/s, {tw['input_mpix_per_s']:.3g} input "
                 f"Mpix/s over the last {tw['seconds']:g} s; {ww['warps_per_s']:.3g} warps/s, "
                 f"{ww['input_mpix_per_s']:.3g} Mpix/s over the last {ww['warps']} warp(s)")
    return line
