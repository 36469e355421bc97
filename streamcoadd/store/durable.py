"""Small durability primitives: fsync of files and directories, atomic replace, and
named crash points for fault injection.

Crash points: set ``STREAMCOADD_CRASH_AT=name`` (or ``name:N`` for the N-th time the
point is reached, counting from 1) and the process kills itself with SIGKILL there, as a
power cut or ``kill -9`` would. The torture tests use this to stop at every step of a commit.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path

_hits: dict[str, int] = {}
in_child_writer = False  # set in a forked cell-writer child: a crash takes the parent too


def crash_point(name: str) -> None:
    spec = os.environ.get("STREAMCOADD_CRASH_AT")
    if not spec:
        return
    target, _, nth = spec.partition(":")
    if target != name:
        return
    _hits[name] = _hits.get(name, 0) + 1
    if _hits[name] >= int(nth or 1):
        if in_child_writer:
            os.kill(os.getppid(), signal.SIGKILL)
        os.kill(os.getpid(), signal.SIGKILL)


def fsync_file(path: str | Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: str | Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def makedirs_durable(path: str | Path) -> None:
    """``mkdir -p`` that fsyncs the parent of every directory it creates, so that a new
    directory (a new shard) is still there after a power cut once its files are fsynced."""
    path = Path(path)
    if path.is_dir():
        return
    missing = []
    while not path.is_dir():
        missing.append(path)
        path = path.parent
    for d in reversed(missing):
        try:
            d.mkdir()
        except FileExistsError:
            pass
        fsync_dir(d.parent)


def write_atomic(path: str | Path, data: bytes, crash_name: str | None = None) -> None:
    """Write ``data`` to ``path`` so that a crash leaves either the old or the new file:
    write a ``.tmp`` sibling, fsync it, rename over ``path``, fsync the directory."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    if crash_name:
        crash_point(crash_name + "-tmp-written")
    os.replace(tmp, path)
    fsync_dir(path.parent)


def fsync_dir_quietly(path: Path) -> None:
    """:func:`fsync_dir`, ignoring errors: for best-effort syncs (the daemon's done/ and
    rejected/; a file never leaves the inbox before the state holds it durably)."""
    try:
        fsync_dir(path)
    except OSError:
        pass


def unlink_quietly(path: Path) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


def tmp_sibling(path: Path) -> Path:
    """``.NAME.PID.tmp`` beside ``path``: hidden, and a killed writer's debris is
    recognisable by its PID (the daemon's ``clean_stale_tmp`` removes such files)."""
    return path.with_name(f".{path.name}.{os.getpid()}.tmp")


def atomic_write_text(path: Path, text: str, fsync_dir: bool = False) -> None:
    """tmp + fsync + rename: a reader sees the old file or the new one, never a torn one.

    Unlike :func:`write_atomic` the temporary file is hidden and carries the PID (so
    a killed daemon's debris is recognisable) and is removed when the write fails (a
    partial file must not stay on a full disk); the directory sync is optional."""
    tmp = tmp_sibling(path)
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        unlink_quietly(tmp)
        raise
    if fsync_dir:
        fsync_dir_quietly(path.parent)
