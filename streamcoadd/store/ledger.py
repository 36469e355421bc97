"""The state's ledger: which warps were seen, folded, rejected or retracted (SQLite).

The ledger is written *after* the shards commit a warp, so it is a summary of the
shards' truth plus the history of rejections; after a crash between the two, the replay
finds the warp in the shard manifests, skips the fold and writes the ledger row.
WAL mode keeps readers (``status``) from ever blocking the daemon.
"""

from __future__ import annotations

import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path

from streamcoadd.core.errors import StateWriteError, write_error_message
from streamcoadd.store.durable import crash_point

SCHEMA = """
CREATE TABLE IF NOT EXISTS warps (
    content_hash TEXT PRIMARY KEY,
    tract INTEGER NOT NULL, visit INTEGER NOT NULL, detector INTEGER NOT NULL,
    band TEXT NOT NULL, path TEXT NOT NULL,
    status TEXT NOT NULL,            -- folded | no_cells | retracted
    n_cells INTEGER NOT NULL, weight REAL NOT NULL, at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS warps_id ON warps (tract, visit, detector);
CREATE TABLE IF NOT EXISTS rejections (
    id INTEGER PRIMARY KEY AUTOINCREMENT, path TEXT NOT NULL, reason TEXT NOT NULL,
    at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS events (
    id INTEGER PRIMARY KEY AUTOINCREMENT, kind TEXT NOT NULL, detail TEXT NOT NULL,
    at REAL NOT NULL
);
"""


@dataclass(frozen=True)
class WarpRecord:
    content_hash: str
    tract: int
    visit: int
    detector: int
    band: str
    path: str
    status: str
    n_cells: int
    weight: float
    at: float


class Ledger:
    def __init__(self, path: Path, write: bool):
        self.path = Path(path)
        if write:
            self.db = sqlite3.connect(self.path, timeout=60, isolation_level=None)
            self.db.execute("PRAGMA journal_mode=WAL")
            self.db.execute("PRAGMA synchronous=FULL")
            self.db.executescript(SCHEMA)
        else:
            self.db = sqlite3.connect(f"file:{self.path}?mode=ro", uri=True, timeout=60,
                                      isolation_level=None)

    def close(self) -> None:
        self.db.close()

    def get(self, content_hash: str) -> WarpRecord | None:
        row = self.db.execute("SELECT * FROM warps WHERE content_hash = ?",
                              (content_hash,)).fetchone()
        return WarpRecord(*row) if row else None

    def find_id(self, tract: int, visit: int, detector: int) -> list[WarpRecord]:
        rows = self.db.execute("SELECT * FROM warps WHERE tract = ? AND visit = ? AND "
                               "detector = ?", (tract, visit, detector)).fetchall()
        return [WarpRecord(*r) for r in rows]

    def record_warps(self, records: list[WarpRecord]) -> None:
        """One transaction for a whole commit."""
        if not records:
            return
        crash_point("before-ledger")
        with self._transaction():
            self.db.executemany("INSERT OR REPLACE INTO warps VALUES (?,?,?,?,?,?,?,?,?,?)",
                                [tuple(r.__dict__.values()) for r in records])
        crash_point("ledger-committed")

    def record_rejection(self, path: str, reason: str) -> None:
        with self._transaction():
            self.db.execute("INSERT INTO rejections (path, reason, at) VALUES (?,?,?)",
                            (path, reason, time.time()))

    def record_event(self, kind: str, detail: str) -> None:
        with self._transaction():
            self.db.execute("INSERT INTO events (kind, detail, at) VALUES (?,?,?)",
                            (kind, detail, time.time()))

    def set_status(self, content_hash: str, status: str) -> None:
        with self._transaction():
            self.db.execute("UPDATE warps SET status = ? WHERE content_hash = ?",
                            (status, content_hash))

    def set_path(self, content_hash: str, path: str) -> None:
        """Where the warp file now lives (the daemon moves it to done/): retraction
        needs the file again."""
        with self._transaction():
            self.db.execute("UPDATE warps SET path = ? WHERE content_hash = ?",
                            (path, content_hash))

    def warps(self) -> list[WarpRecord]:
        return [WarpRecord(*r) for r in self.db.execute("SELECT * FROM warps ORDER BY at")]

    def rejections(self) -> list[tuple]:
        return self.db.execute("SELECT path, reason, at FROM rejections ORDER BY id").fetchall()

    def events(self) -> list[tuple]:
        return self.db.execute("SELECT kind, detail, at FROM events ORDER BY id").fetchall()

    def _transaction(self):
        db, path = self.db, self.path

        class _Tx:
            def __enter__(self):
                db.execute("BEGIN IMMEDIATE")

            def __exit__(self, exc_type, exc, tb):
                try:
                    db.execute("COMMIT" if exc_type is None else "ROLLBACK")
                except sqlite3.Error as e:  # COMMIT failed (disk full...)
                    exc = e
                    try:
                        db.execute("ROLLBACK")
                    except sqlite3.Error:
                        pass
                if isinstance(exc, (sqlite3.OperationalError, OSError)):
                    raise StateWriteError(write_error_message(str(path), exc),
                                          getattr(exc, "errno", None)) from exc
                return False

        return _Tx()


class LedgerUnreadable(Exception):
    """SQLite cannot read the ledger, or its integrity check fails."""


def check_integrity(path: Path) -> dict[str, dict]:
    """Open the ledger read-only, run SQLite's ``quick_check`` and return every warp row
    as ``{content_hash: {visit, detector, band, path, status, n_cells}}``. Raises
    :class:`LedgerUnreadable` (with SQLite's message) when either fails."""
    try:
        db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=30)
        try:
            ok = db.execute("PRAGMA quick_check").fetchone()[0]
            if ok != "ok":
                raise sqlite3.DatabaseError(ok)
            rows = db.execute("SELECT content_hash, visit, detector, band, path, status, "
                              "n_cells FROM warps").fetchall()
        finally:
            db.close()
    except sqlite3.Error as e:
        raise LedgerUnreadable(str(e)) from None
    return {r[0]: {"visit": r[1], "detector": r[2], "band": r[3], "path": r[4],
                   "status": r[5], "n_cells": r[6]} for r in rows}
