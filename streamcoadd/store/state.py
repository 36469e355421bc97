"""The durable state directory: shards of immutable cell generations, manifests, ledger.

Layout (``docs/state-format.md`` is the reference)::

    STATE/state.json                          format version, skymap, fold rules
    STATE/ledger.sqlite                       warps seen / rejected / retracted
    STATE/lock                                single-writer flock
    STATE/shards/t{T}/p{X}-{Y}/{band}/manifest.json       the shard's commit point
    STATE/shards/t{T}/p{X}-{Y}/{band}/c{CX}-{CY}.g{G}.h5  one cell generation

(names and versions: :mod:`streamcoadd.store.format`; a migrated state's shard root is
the one its ``state.json`` names.)

Commit protocol for one shard (one writer per shard): write each changed cell as a new
generation file (tmp, fsync, rename); fsync the directory; replace ``manifest.json``
atomically (tmp, fsync, rename, fsync dir) -- that rename is the commit point; then delete
the superseded generations. The manifest lists the current generation of every cell and
the content hash of every warp folded into the shard, which makes a replay skip what is
already durable. Files not named by the manifest are debris of an interrupted commit and
are removed when a writer opens the state.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import time
from collections.abc import Callable
from pathlib import Path

from streamcoadd.core.config import FoldConfig
from streamcoadd.core.errors import (
    StateError,
    StateWriteError,
    UserError,
    write_error_message,
)
from streamcoadd.core.fold import CellAccumulator
from streamcoadd.core.skymap import CellId, PatchId, SkyMap, skymap_from_dict
from streamcoadd.store import format as fmt
from streamcoadd.store.cellfile import (
    read_cell_file,
    write_cell_file,
    write_cells_parallel,
)
from streamcoadd.store.commit import (
    ShardPlan,
    finish_shard_commit,
    plan_shard_commit,
    remove_debris,
)
from streamcoadd.store.durable import (
    fsync_dir,
    makedirs_durable,
    write_atomic,
)
from streamcoadd.store.ledger import Ledger
from streamcoadd.store.shard import Shard

STATE_FORMAT = fmt.STATE_FORMAT
STATE_VERSION = fmt.STATE_VERSION
CELL_RE = fmt.CELL_RE
READ_RETRIES = fmt.READ_RETRIES


class StateLocked(UserError):
    """Another process holds the state's writer lock."""


class ShardConflict(RuntimeError):
    """Another writer committed the shard since it was loaded (shard-locking mode)."""


@contextlib.contextmanager
def _shard_lock(directory: Path):
    """flock(2) on ``directory/shard.lock``: held by a shard-locking writer while it
    commits the shard, and by the state writer while it removes the shard's debris."""
    fd = os.open(directory / "shard.lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _band_dirname(band: str) -> str:
    if not re.fullmatch(r"[A-Za-z0-9_\-]+", band):
        raise UserError(f"band name {band!r} must be letters, digits, '_' or '-'")
    return band


class StateStore:
    """A state directory opened for reading, or for writing by exactly one process."""

    def __init__(self, root: Path, skymap: SkyMap, fold: FoldConfig, meta: fmt.StateMeta,
                 write: bool, shard_locking: bool = False):
        self.root = root
        self.skymap = skymap
        self.fold = fold
        self.meta = meta
        self.version = meta.version
        self.shards_root = root / meta.shards
        self.write = write
        # shard_locking: a worker of a distributed run. No state lock and no ledger
        # writes; each shard commit happens under the shard's own lock, compare-and-swap.
        self.shard_locking = shard_locking
        self._lock_fd = None
        self.shards: dict[tuple[PatchId, str], Shard] = {}
        self.bytes_written = 0  # cell files and manifests written by this process
        self.cache_bytes, self.commit_processes = int(2e9), 1  # see tune()
        if write and not shard_locking:
            self._take_lock()
        self.ledger = Ledger(root / fmt.LEDGER, write=write and not shard_locking)

    # ------------------------------------------------------------------ create / open
    @classmethod
    def create(cls, root: str | Path, skymap: SkyMap, fold: FoldConfig) -> Path:
        root = Path(root)
        if (root / "state.json").exists():
            raise UserError(f"{root}: a state already exists here; choose another directory")
        if root.exists() and any(root.iterdir()):
            raise UserError(f"{root}: directory is not empty; give a new or empty directory")
        (root / fmt.SHARDS).mkdir(parents=True, exist_ok=True)
        meta = fmt.StateMeta(version=STATE_VERSION,
                             created=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                             skymap=skymap.to_dict(), fold=fold.to_dict())
        (root / fmt.SKYMAP_TOML).write_text(skymap.to_toml())
        Ledger(root / fmt.LEDGER, write=True).close()
        write_atomic(root / fmt.STATE_JSON, meta.serialize())
        fsync_dir(root.parent if str(root.parent) else Path("."))
        return root

    @classmethod
    def open(cls, root: str | Path, write: bool = False,
             shard_locking: bool = False) -> StateStore:
        root = Path(root)
        meta = read_state_meta(root)
        if write and meta.version != STATE_VERSION:
            raise StateError(f"{root}: state format version {meta.version} is read-only for "
                             f"this streamcoadd (it writes version {STATE_VERSION}); convert it "
                             f"first with 'streamcoadd migrate {root}'")
        skymap = skymap_from_dict(meta.skymap, f"{root}/{fmt.STATE_JSON}")
        fold = FoldConfig.from_dict(meta.fold)
        store = cls(root, skymap, fold, meta, write, shard_locking)
        if write and not shard_locking:
            store.recover()
        return store

    def close(self) -> None:
        self.ledger.close()
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def _take_lock(self) -> None:
        self._lock_fd = take_writer_lock(self.root)

    # ------------------------------------------------------------------ layout
    def shard_dir(self, patch: PatchId, band: str) -> Path:
        _band_dirname(band)
        return self.shards_root / fmt.shard_relpath(patch.tract, patch.x, patch.y, band)


    def cell_path(self, cell: CellId, band: str, gen: int) -> Path:
        """The file of generation ``gen`` of ``cell`` in ``band``."""
        return self.shard_dir(cell.patch, band) / fmt.cell_filename(cell.x, cell.y, gen)

    def shard_keys(self) -> list[tuple[PatchId, str]]:
        """Every (patch, band) with a committed manifest."""
        out = []
        for m in sorted(self.shards_root.glob(f"{fmt.SHARD_GLOB}/{fmt.MANIFEST}")):
            tract, px, py, band = fmt.parse_shard_relpath(m.parent.parts[-3:])
            out.append((PatchId(tract, px, py), band))
        return out

    def load_manifest(self, patch: PatchId, band: str) -> fmt.Manifest | None:
        """The committed manifest of a shard (None: the shard has never committed).
        :class:`StateError` if it is unreadable or not of this state's version."""
        path = self.shard_dir(patch, band) / fmt.MANIFEST
        try:
            m = fmt.Manifest.parse(path.read_bytes(), str(path))
        except FileNotFoundError:
            return None
        except (fmt.FormatError, OSError) as e:
            raise StateError(f"{e}; run 'streamcoadd verify'") from None
        if m.version != self.version:
            raise StateError(f"{path}: version {m.version} in a version {self.version} "
                             "state; run 'streamcoadd verify'")
        return m

    def read_current(self, cell: CellId, band: str, gen: int | None,
                     read: Callable[[Path], object]) -> tuple[int, object] | None:
        """``read(path)`` of the current generation of ``cell``, starting with ``gen``
        (None: look it up). When a commit supersedes the generation between finding it
        and reading it (``FileNotFoundError``), the manifest is read again and the new
        generation read. Returns ``(generation, result)``, or None when the cell no
        longer has any input. The one "retry when a newer commit replaced the file"
        read of reader, finalize and verify."""
        last = None
        for _ in range(READ_RETRIES):
            if gen is None:
                m = self.load_manifest(cell.patch, band)
                gen = None if m is None else m.generation(cell.x, cell.y)
                if gen is None:
                    if not self.shards_root.is_dir() or read_state_meta(self.root).shards \
                            != self.meta.shards:
                        raise StateError(f"{self.root}: the state was migrated while open; "
                                         "open it again")
                    return None
            try:
                return gen, read(self.cell_path(cell, band, gen))
            except FileNotFoundError as e:  # superseded by a commit meanwhile: look again
                last, gen = e, None
                time.sleep(0.005)
        raise StateError(f"cannot read {cell} band {band}: {last}")

    # ------------------------------------------------------------------ reading
    def read_cell(self, cell: CellId, band: str) -> tuple[CellAccumulator, dict] | None:
        """The committed accumulator of one cell, or None if the cell has no input.
        Reads only the manifest and that cell's file; retries if a commit replaced the
        generation between the two reads."""
        key = (cell.patch, band)
        if self.write and key in self.shards and cell in self.shards[key].cells \
                and cell not in self.shards[key].dirty:
            shard = self.shards[key]
            gen = shard.cell_gens.get((cell.x, cell.y))
            return shard.cells[cell], {"generation": gen}
        got = self.read_current(cell, band, None, read_cell_file)
        return None if got is None else got[1]

    # ------------------------------------------------------------------ writing
    def recover(self) -> list[Path]:
        """Remove debris of interrupted commits: temporary files and cell generations
        that no manifest names. Safe because the manifest rename is the commit point."""
        removed = []
        for d in sorted(self.shards_root.glob(fmt.SHARD_GLOB)):
            if not d.is_dir():
                continue
            # Under the shard's lock: a distributed worker (shard-locking mode) of an
            # earlier run may still be committing this shard; its new generations are
            # not yet named by the manifest and must not be taken for debris.
            with _shard_lock(d):  # (no manifest: every cell file is debris)
                tract, px, py, band = fmt.parse_shard_relpath(d.parts[-3:])
                removed += self._recover_shard(PatchId(tract, px, py), band)
        return removed

    def _recover_shard(self, patch: PatchId, band: str) -> list[Path]:
        manifest = self.load_manifest(patch, band)
        return remove_debris(self.shard_dir(patch, band), manifest)

    def shard(self, patch: PatchId, band: str) -> Shard:
        key = (patch, band)
        shard = self.shards.get(key)
        if shard is None:
            d = self.shard_dir(patch, band)
            shard = Shard(patch=patch, band=band, directory=d)
            manifest = self.load_manifest(patch, band)
            if manifest is not None:
                shard.commit = manifest.commit
                shard.cell_gens = dict(manifest.cells)
                shard.warps = dict(manifest.warps)
            self.shards[key] = shard
        shard.last_used = time.monotonic()
        return shard

    def cached_shard(self, patch: PatchId, band: str) -> Shard | None:
        """The shard's in-memory copy, if this store holds one (nothing is loaded)."""
        return self.shards.get((patch, band))

    def drop_shard(self, patch: PatchId, band: str) -> None:
        """Forget the in-memory copy of one shard, uncommitted work included; the next
        :meth:`shard` reads it from disk again."""
        self.shards.pop((patch, band), None)

    def drop_all_shards(self) -> None:
        """Forget every in-memory shard (a long-lived Dask worker frees its memory)."""
        self.shards.clear()

    def cell_for_write(self, shard: Shard, cell: CellId) -> CellAccumulator:
        acc = shard.cells.get(cell)
        if acc is None:
            gen = shard.cell_gens.get((cell.x, cell.y))
            if gen is None:
                tract = self.skymap.tract(cell.patch.tract)
                acc = CellAccumulator(cell=cell, outer=tract.cell_outer_box(cell))
            else:
                acc, _ = read_cell_file(self.cell_path(cell, shard.band, gen))
            shard.cells[cell] = acc
        shard.dirty.add(cell)
        return acc

    def dirty_bytes(self) -> int:
        return sum(s.dirty_bytes for s in self.shards.values())

    def discard_uncommitted(self) -> None:
        """Forget everything folded in memory since the last commit (after an error in
        the middle of a fold: the inbox still holds those warps)."""
        for key in list(self.shards):
            s = self.shards[key]
            if s.changed:
                del self.shards[key]

    def commit(self) -> None:
        """Make every dirty shard durable (see the module docstring for the protocol).

        The cell files of all changed shards are written first, by ``commit_processes``
        processes (encoding HDF5 is CPU-bound and h5py is single-threaded); then each
        shard's manifest is replaced, one shard after the other."""
        changed = [s for s in self.shards.values() if s.changed]
        try:
            if self.commit_processes > 1 and not self.shard_locking:
                plans = [self._plan_shard(s) for s in changed]
                jobs = [job for plan in plans for job in plan.jobs]
                write_cells_parallel(jobs, self.commit_processes)
                for shard, plan in zip(changed, plans):
                    self._finish_shard(shard, plan)
            else:
                for shard in changed:
                    self._commit_shard(shard)
        except OSError as e:  # disk full, quota, I/O error
            if not self.shard_locking:  # free the space this commit took
                for shard in changed:
                    try:
                        self._recover_shard(shard.patch, shard.band)
                    except OSError:
                        pass
            where = e.filename if isinstance(getattr(e, "filename", None), str) else self.root
            raise StateWriteError(write_error_message(str(where), e), e.errno) from e
        self.trim_cache(self.cache_bytes)

    def tune(self, cache_bytes: int, commit_processes: int | None = None) -> None:
        """Bytes of cells (clean and dirty) to hold in memory; processes that write a
        commit's cell files (1: in this process)."""
        self.cache_bytes = cache_bytes
        if commit_processes is not None:
            self.commit_processes = commit_processes

    def commit_shard(self, shard: Shard) -> None:
        """Commit one shard alone (cells, then manifest); in shard-locking mode (distributed
        workers) under the shard's lock, compare-and-swap on the manifest's commit number
        (:class:`ShardConflict` if another writer committed it meanwhile)."""
        try:
            self._commit_shard(shard)
        except OSError as e:
            raise StateWriteError(write_error_message(str(shard.directory), e), e.errno) from e

    def _commit_shard(self, shard: Shard) -> None:
        makedirs_durable(shard.directory)  # (the shard lock file lives in it)
        if not self.shard_locking:
            return self._write_shard(shard)
        with _shard_lock(shard.directory):
            manifest = self.load_manifest(shard.patch, shard.band)
            on_disk = manifest.commit if manifest else 0
            if on_disk != shard.commit:
                raise ShardConflict(f"{shard.patch} band {shard.band}: committed by another "
                                    f"writer (commit {on_disk}, expected {shard.commit})")
            self._recover_shard(shard.patch, shard.band)
            self._write_shard(shard)

    def _write_shard(self, shard: Shard) -> None:
        plan = self._plan_shard(shard)
        for job in plan.jobs:
            write_cell_file(*job)
        self._finish_shard(shard, plan)

    def _plan_shard(self, shard: Shard) -> ShardPlan:
        return plan_shard_commit(shard, self.skymap.tract(shard.patch.tract))

    def _finish_shard(self, shard: Shard, plan: ShardPlan) -> None:
        self.bytes_written += finish_shard_commit(shard, plan)

    def trim_cache(self, limit: int) -> None:
        """Drop clean cells of the least recently used shards until under ``limit`` bytes."""
        total = sum(s.nbytes for s in self.shards.values())
        for shard in sorted(self.shards.values(), key=lambda s: s.last_used):
            if total <= limit:
                break
            for cell in [c for c in shard.cells if c not in shard.dirty]:
                total -= shard.cells.pop(cell).nbytes


def read_state_meta(root: str | Path) -> fmt.StateMeta:
    """``state.json`` of the state at ``root``; :class:`StateError` with what to do."""
    root = Path(root)
    path = root / fmt.STATE_JSON
    try:
        return fmt.StateMeta.parse(path.read_bytes(), str(path))
    except FileNotFoundError:
        raise StateError(f"{root}: no streamcoadd state here (no state.json); create one "
                         "with 'streamcoadd init STATE --skymap SKYMAP.toml'") from None
    except OSError as e:
        raise StateError(f"{path} is unreadable ({e}); restore it from backup") from None
    except fmt.FormatError as e:
        raise StateError(f"{e}; restore state.json from a backup, or use the streamcoadd "
                         "release that wrote it") from None


def take_writer_lock(root: Path) -> int:
    """Take the state's single-writer lock (``flock`` on ``STATE/lock``, which then holds
    ``pid N``); returns its file descriptor. :class:`StateLocked` if a writer holds it."""
    fd = os.open(Path(root) / fmt.LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "another process"
        os.close(fd)
        raise StateLocked(f"{root}: state is in use by {holder}; only one writer "
                          "(watch, ingest or migrate) may run on a state at a time") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"pid {os.getpid()}\n".encode(), 0)
    return fd


def release_writer_lock(fd: int) -> None:
    os.close(fd)
