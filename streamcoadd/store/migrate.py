"""``streamcoadd migrate STATE``: convert a state of format 1 to format 2, crash-safely.

Protocol (``docs/state-format.md``, "Migration"), under the state's writer lock:

1. remove what an interrupted migration left in ``STATE/shards-v2/`` (never read: the
   state is still version 1 while ``state.json`` says so);
2. build the whole version-2 shard tree in ``STATE/shards-v2/``: every cell that a version-1
   manifest names is read (format 1 or 2 cell file), given its integer counts
   (:func:`~streamcoadd.store.cellfile.derive_counts`) and written as a version-3 cell file
   with the same generation number; then the shard's version-2 manifest (same commit
   number, cells and warps). Every file and directory is fsynced;
3. replace ``state.json`` atomically by its version-2 form naming ``shards-v2`` as the shard
   root: **the single commit point** of the migration;
4. delete the version-1 tree ``STATE/shards/``.

A kill -9 before step 3 leaves the version-1 state exactly as it was (plus ``shards-v2/``,
which no version-1 reader opens and the next ``migrate`` rebuilds); after step 3 the state
is version 2 (plus an old ``shards/`` that ``verify`` reports as benign debris and the next
``migrate`` removes). No reader can see a mix: a reader finds the shard root through
``state.json`` and reads only that tree. A reader that opened the state before the switch
keeps reading the version-1 tree until step 4 removes it; it then gets a clear error
("the state was migrated while open; open it again").
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from dataclasses import dataclass, replace
from enum import Enum
from pathlib import Path

from streamcoadd.core.errors import StateError
from streamcoadd.core.skymap import Box
from streamcoadd.store import format as fmt
from streamcoadd.store.cellfile import encode_cell, read_cell_file, write_cell_bytes
from streamcoadd.store.durable import (
    crash_point,
    fsync_dir,
    makedirs_durable,
    write_atomic,
)
from streamcoadd.store.state import (
    read_state_meta,
    release_writer_lock,
    take_writer_lock,
)


class MigrationStatus(str, Enum):
    """``MIGRATED``: converted now; ``ALREADY``: the state was format 2 (leftovers of an
    interrupted migration were removed, if any)."""

    MIGRATED = "migrated"
    ALREADY = "already"


@dataclass(frozen=True)
class MigrationResult:
    """What :func:`migrate_state` did."""

    status: MigrationStatus
    shards: int = 0
    cells: int = 0
    counted_cells: int = 0  # cells whose integer counts are exact (all inputs full)


def migrate_state(path: str | Path,
                  progress: Callable[[str], None] | None = None) -> MigrationResult:
    """Convert the state at ``path`` to format 2 (see the module docstring for the
    protocol and its guarantees). ``progress``: called with one line per shard.
    Raises :class:`StateError` (not a state, unreadable, locked by a writer)."""
    root = Path(path)
    meta = read_state_meta(root)
    lock = take_writer_lock(root)
    try:
        meta = read_state_meta(root)  # (again, under the lock)
        if meta.version == fmt.STATE_VERSION:
            _remove_tree(root / fmt.SHARDS if meta.shards != fmt.SHARDS else None)
            return MigrationResult(MigrationStatus.ALREADY)
        new_root = root / fmt.MIGRATION_DIR
        _remove_tree(new_root)
        shards = cells = counted = 0
        old_root = root / meta.shards
        for d in sorted(p for p in old_root.glob(fmt.SHARD_GLOB) if p.is_dir()):
            n, k = _migrate_shard(d, new_root / d.relative_to(old_root))
            shards, cells, counted = shards + (n >= 0), cells + max(n, 0), counted + k
            if progress is not None and n >= 0:
                progress(f"{d.relative_to(old_root)}: {n} cell(s)")
        makedirs_durable(new_root)
        _fsync_tree(new_root)
        crash_point("migrate-built")
        new_meta = replace(meta, version=fmt.STATE_VERSION, shards=fmt.MIGRATION_DIR,
                           migrated_from=meta.version)
        write_atomic(root / fmt.STATE_JSON, new_meta.serialize(), "migrate-state-json")
        crash_point("migrate-switched")
        _remove_tree(old_root)
        return MigrationResult(MigrationStatus.MIGRATED, shards, cells, counted)
    finally:
        release_writer_lock(lock)


def _migrate_shard(src: Path, dst: Path) -> tuple[int, int]:
    """Write the version-2 form of shard directory ``src`` into ``dst``. Returns (cells
    written, cells with exact counts); (-1, 0) for a shard that never committed."""
    mpath = src / fmt.MANIFEST
    if not mpath.exists():
        return -1, 0
    try:
        m = fmt.Manifest.parse(mpath.read_bytes(), str(mpath))
    except fmt.FormatError as e:
        raise StateError(f"{e}; run 'streamcoadd verify' and repair the state before "
                         "migrating it") from None
    makedirs_durable(dst)
    counted = 0
    for (cx, cy), gen in sorted(m.cells.items()):
        path = src / fmt.cell_filename(cx, cy, gen)
        try:
            acc, header = read_cell_file(path)
        except OSError as e:
            raise StateError(f"{path}: {e}; run 'streamcoadd verify' and repair the state "
                             "before migrating it") from None
        data = encode_cell(acc, header["band"], gen, Box(*header["inner_box"]))
        write_cell_bytes(dst / fmt.cell_filename(cx, cy, gen), data)
        counted += all(g.counted for g in acc.groups.values())
        crash_point("migrate-cell-written")
    fsync_dir(dst)
    write_atomic(dst / fmt.MANIFEST, replace(m, version=fmt.STATE_VERSION).serialize(),
                 "migrate-manifest")
    return len(m.cells), counted


def _fsync_tree(top: Path) -> None:
    """fsync every directory under ``top`` (the files were fsynced when written)."""
    for d in sorted((p for p in top.rglob("*") if p.is_dir()), reverse=True):
        fsync_dir(d)
    fsync_dir(top)
    fsync_dir(top.parent)


def _remove_tree(top: Path | None) -> None:
    if top is not None and top.exists():
        shutil.rmtree(top)
        fsync_dir(top.parent)
