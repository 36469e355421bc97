"""TODO docstring (store.status_file, split from daemon.py)."""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

STATUS_NAME = "daemon-status.json"


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
             and pid_alive(d["pid"]))
    d["running"] = bool(alive and d.get("state") not in ("stopped", "failed"))
    return d


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
