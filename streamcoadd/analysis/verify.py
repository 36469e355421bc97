"""``streamcoadd verify STATE``: check a state's integrity and say what to do about it.

Reads everything, changes nothing (unless ``--repair``, which only removes debris, exactly as
a writer does when it opens the state). Checks, in order:

* ``state.json`` parses and is a version this streamcoadd knows;
* ``ledger.sqlite`` opens and passes SQLite's ``quick_check``;
* every shard ``manifest.json`` parses, has the documented fields, and matches its directory;
* every cell file a manifest names exists and is fully readable -- every dataset is read, so
  its CRC-32 checksum (attribute ``crc32``) is checked -- and its attributes name that cell
  and generation;
* within each cell: every contributor's ``content_hash`` is one of the manifest's warps with
  the same (visit, detector); no (visit, detector) twice; ``psf_w`` equals the sum of the
  contributor weights; every sum is finite; the integer counts (state format 2) are
  non-negative and ``n_full + n_partial`` is 0 exactly where ``sum_w`` is 0;
* a migration's leftovers (a partly built or a replaced shard tree) are *benign* debris;
* every manifest warp is in the ledger (a missing row after a crash is *benign*: the next
  ingest/watch of that file records it without folding it again); every ledger row with
  cells is in some manifest, with the number of cells the ledger says;
* debris: ``*.tmp`` files and cell generations no manifest names (left by an interrupted
  commit; *benign*: removed automatically when a writer next opens the state).

Each problem comes with the exact action that fixes it. Exit status 0 when nothing is
found, 1 otherwise.
"""

from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from streamcoadd.core.skymap import skymap_from_dict
from streamcoadd.store import format as fmt
from streamcoadd.store.cellfile import read_cell_file
from streamcoadd.store.ledger import LedgerUnreadable, check_integrity
from streamcoadd.store.state import StateStore

CELL_RE = fmt.CELL_RE


@dataclass
class Problem:
    """One finding. ``severity``: ``error`` (the state is damaged or inconsistent) or
    ``benign`` (expected after a crash; fixed automatically by the next writer)."""

    severity: str
    kind: str
    path: str
    message: str
    action: str

    def __str__(self) -> str:
        return f"[{self.severity}] {self.kind}: {self.path}: {self.message}"


class _Checker:
    def __init__(self, root: Path):
        self.root = Path(root)
        self.problems: list[Problem] = []
        self.writer_running = writer_pid(self.root)

    def add(self, severity, kind, path, message, action):
        self.problems.append(Problem(severity, kind, str(path), message, action))

    # ------------------------------------------------------------------ top level
    def run(self) -> list[Problem]:
        root = self.root
        sj = root / fmt.STATE_JSON
        try:
            meta = fmt.StateMeta.parse(sj.read_bytes(), str(sj))
        except FileNotFoundError:
            self.add("error", "no-state", root, "no state.json: this is not a streamcoadd state "
                     "(or state.json was deleted)",
                     "if this is the right directory, restore state.json from a backup or "
                     "create it again with 'streamcoadd init' in an empty directory and copy "
                     "shards/ and ledger.sqlite over")
            return self.problems
        except fmt.FormatError as e:
            version = "version" in str(e) and "not a streamcoadd" not in str(e)
            self.add("error", "state-version" if version else "state-json-unreadable", sj,
                     str(e), "use the streamcoadd release that wrote this state" if version
                     else "restore state.json from a backup; it is written once at init "
                     "(its skymap is also in skymap.toml)")
            return self.problems
        except OSError as e:
            self.add("error", "state-json-unreadable", sj, f"cannot read: {e}",
                     "restore state.json from a backup")
            return self.problems
        self.meta = meta
        try:
            self.skymap = skymap_from_dict(meta.skymap, str(sj))
        except Exception as e:  # noqa: BLE001
            self.add("error", "state-json-unreadable", sj, f"bad skymap: {e}",
                     "restore state.json from a backup")
            return self.problems
        self.ledger = self.check_ledger()
        for tmp in root.glob("*.tmp"):
            self.debris(tmp, "temporary file of an interrupted atomic write")
        shards_dir = root / meta.shards
        for old in {root / fmt.SHARDS, root / fmt.MIGRATION_DIR} - {shards_dir}:
            if old.exists():
                self.debris(old, "shard tree left by a migration (the state uses "
                            f"{meta.shards}/)")
        if not shards_dir.is_dir():
            self.add("error", "no-shards", shards_dir, "the shards directory is missing",
                     "restore it from a backup; without it the state holds no cell")
            return self.problems
        # warp hash -> number of cells holding it, over all shards
        self.cells_per_warp: Counter = Counter()
        # Warps whose cell count is unknown (a cell of their shard could not be read), and
        # whether some manifest could not be read at all: the ledger cross-checks then
        # skip what they cannot judge rather than report follow-on errors.
        self.uncertain: set[str] = set()
        self.manifest_unreadable = False
        self.manifest_warps: dict[str, tuple[int, int]] = {}
        for d in sorted(p for p in shards_dir.glob(fmt.SHARD_GLOB) if p.is_dir()):
            self.check_shard(d)
        for tmp in shards_dir.rglob("*.tmp"):
            if tmp.parent.parent.parent.parent != shards_dir:  # not inside a shard dir
                self.debris(tmp, "temporary file of an interrupted commit")
        self.check_ledger_vs_shards()
        return self.problems

    def debris(self, path, what):
        if self.writer_running:
            return  # a writer is working: its in-progress files are not debris
        self.add("benign", "debris", path, f"{what} (no manifest names it)",
                 "nothing is needed: the next 'streamcoadd ingest' or 'watch' removes it "
                 "when it opens the state; or run 'streamcoadd verify STATE --repair' now")

    # ------------------------------------------------------------------ ledger
    def check_ledger(self) -> dict | None:
        path = self.root / fmt.LEDGER
        if not path.exists():
            self.add("error", "ledger-missing", path, "the ledger is missing",
                     "restore it from a backup, or rebuild it: create an empty state with "
                     "'streamcoadd init', copy its ledger.sqlite here, then run "
                     "'streamcoadd ingest STATE' on the original warp files (the shards skip "
                     "what they hold and the ledger rows are written again)")
            return None
        try:
            return check_integrity(path)
        except LedgerUnreadable as e:
            self.add("error", "ledger-corrupt", path, f"SQLite cannot read it: {e}",
                     "restore ledger.sqlite from a backup, or rebuild it as for a missing "
                     "ledger (the shard manifests are the truth; the ledger is a summary)")
            return None

    def check_ledger_vs_shards(self) -> None:
        if self.ledger is None:
            return
        lp = self.root / fmt.LEDGER
        for h, (v, d) in sorted(self.manifest_warps.items()):
            rec = self.ledger.get(h)
            if rec is None:
                self.add("benign", "ledger-row-missing", lp,
                         f"warp {h[:16]}… (visit {v} detector {d}) is committed in the shards "
                         "but has no ledger row: a crash between the shard commit and the "
                         "ledger write",
                         "nothing is lost: the warp's file is still in the inbox (the daemon "
                         "removes it only after the ledger row) and the next 'streamcoadd "
                         "watch' or 'streamcoadd ingest STATE FILE' records it without "
                         "folding it again")
        for h, rec in sorted(self.ledger.items()):
            if h in self.uncertain or (self.manifest_unreadable and h not in self.manifest_warps):
                continue
            if rec["status"] == "retracted":
                if self.cells_per_warp.get(h):
                    self.add("error", "retracted-still-folded", lp,
                             f"visit {rec['visit']} detector {rec['detector']} is retracted in "
                             f"the ledger but still in {self.cells_per_warp[h]} cell(s)",
                             "run the retraction again ('streamcoadd retract STATE --visit "
                             f"{rec['visit']}'); it skips cells that no longer hold it")
                continue
            n = self.cells_per_warp.get(h, 0)
            if rec["status"] == "folded" and h not in self.manifest_warps:
                self.add("error", "ledger-warp-lost", lp,
                         f"the ledger says visit {rec['visit']} detector {rec['detector']} "
                         f"({rec['path']}) was folded into {rec['n_cells']} cell(s), but no "
                         "shard manifest lists it: its contribution is missing",
                         "if a 'streamcoadd retract' of this visit was interrupted, run it "
                         "again; otherwise delete its ledger row and ingest the file again: sqlite3 "
                         f"{lp} \"DELETE FROM warps WHERE content_hash='{h}'\"; then "
                         f"'streamcoadd ingest {self.root} {rec['path']}'")
            elif rec["n_cells"] != n and (n or rec["status"] == "folded"):
                self.add("error", "ledger-count-mismatch", lp,
                         f"the ledger says visit {rec['visit']} detector {rec['detector']} is in "
                         f"{rec['n_cells']} cell(s) ({rec['status']}); the cells hold it {n} "
                         "time(s)",
                         "if a 'streamcoadd retract' of this visit was interrupted, run it "
                         "again (it finishes the shards still holding it); otherwise the cells "
                         "are the truth and the coadd is right; correct the ledger: "
                         f"sqlite3 {lp} \"UPDATE warps SET n_cells={n}, status="
                         f"'{'folded' if n else 'no_cells'}' WHERE content_hash='{h}'\"")

    # ------------------------------------------------------------------ shards
    # Long because a checklist of independent checks, read top to bottom, each with its own
    # message.
    def check_shard(self, d: Path) -> None:
        mpath = d / fmt.MANIFEST
        if not mpath.exists():
            for f in sorted(d.iterdir()):
                if CELL_RE.match(f.name) or f.name.endswith(".tmp"):
                    self.debris(f, "file of a shard whose first commit was interrupted")
            return
        try:
            m = fmt.Manifest.parse(mpath.read_bytes(), str(mpath))
            if m.version != self.meta.version:
                raise fmt.FormatError(f"version {m.version} in a version "
                                      f"{self.meta.version} state")
        except (OSError, fmt.FormatError) as e:
            self.add("error", "manifest-corrupt", mpath, f"cannot parse: {e}",
                     self._rebuild_action(d, None))
            self.manifest_unreadable = True
            return
        tract, (px, py), band = m.tract, m.patch, m.band
        gens, wmap, commit = dict(m.cells), dict(m.warps), m.commit
        expected = f"t{tract}/p{px}-{py}/{band}"
        if str(d.relative_to(self.root / self.meta.shards)) != expected:
            self.add("error", "manifest-misplaced", mpath, f"describes shard {expected}",
                     "move the shard directory back where it belongs (or restore from backup)")
            return
        try:
            tr = self.skymap.tract(tract)
        except Exception:  # noqa: BLE001
            self.add("error", "manifest-corrupt", mpath, f"tract {tract} is not in the skymap",
                     self._rebuild_action(d, wmap))
            return
        n = tr.cells.cells_per_patch
        if not (0 <= px < tr.num_patches[0] and 0 <= py < tr.num_patches[1]):
            self.add("error", "manifest-corrupt", mpath, f"patch ({px}, {py}) is outside tract "
                     f"{tract}", self._rebuild_action(d, wmap))
            return
        self.manifest_warps.update(wmap)
        live = set()
        in_cells: set[str] = set()
        for (cx, cy), g in sorted(gens.items()):
            name = fmt.cell_filename(cx, cy, g)
            live.add(name)
            path = d / name
            if not (0 <= cx < n and 0 <= cy < n):
                self.add("error", "manifest-corrupt", mpath, f"cell {cx}-{cy} is outside the "
                         f"patch ({n}x{n} cells)", self._rebuild_action(d, wmap))
                continue
            if g > commit:
                self.add("error", "manifest-corrupt", mpath, f"cell {cx}-{cy} generation {g} "
                         f"is newer than the shard's commit {commit}", self._rebuild_action(d, wmap))
            hashes = self.check_cell(path, d, wmap, tract, px, py, band, cx, cy, g)
            if hashes is not None:
                in_cells |= hashes
            else:
                self.uncertain |= set(wmap)
        for f in sorted(d.iterdir()):
            if f.name in live or f.name in (fmt.MANIFEST, fmt.SHARD_LOCK):
                continue
            if CELL_RE.match(f.name):
                self.debris(f, "cell generation superseded or written by an interrupted commit")
            elif f.name.endswith(".tmp"):
                self.debris(f, "temporary file of an interrupted commit")

    # Long because a checklist of independent checks, read top to bottom, each with its own
    # message.
    def check_cell(self, path, d, wmap, tract, px, py, band, cx, cy, gen) -> set[str] | None:
        where = f"cell {cx}-{cy} of {d.relative_to(self.root)}"
        if not path.exists():
            self.add("error", "cell-missing", path, f"the manifest names it but it does not "
                     f"exist ({where})", self._rebuild_action(d, wmap))
            return None
        try:
            acc, attrs = read_cell_file(path)
        except Exception as e:  # noqa: BLE001  (h5py raises OSError, KeyError, ValueError...)
            msg = str(e).splitlines()[0] if str(e) else type(e).__name__
            self.add("error", "cell-corrupt", path, f"unreadable or checksum mismatch: {msg}",
                     self._rebuild_action(d, wmap))
            return None
        ident = (attrs["tract"], tuple(attrs["patch"]), tuple(attrs["cell"]), attrs["band"],
                 attrs["generation"])
        if attrs["version"] not in fmt.CELL_VERSIONS_OF_STATE.get(self.meta.version, ()):
            self.add("error", "cell-version", path, f"cell file version {attrs['version']} in "
                     f"a version {self.meta.version} state", self._rebuild_action(d, wmap))
        if ident != (tract, (px, py), (cx, cy), band, gen):
            self.add("error", "cell-mislabelled", path, f"the file describes {ident}, the "
                     f"manifest expects {(tract, (px, py), (cx, cy), band, gen)}",
                     self._rebuild_action(d, wmap))
            return None
        hashes = set()
        seen_ids: Counter = Counter()
        for gname, g in acc.groups.items():
            wsum = 0.0
            for c in g.contributors:
                hashes.add(c.content_hash)
                seen_ids[(c.visit, c.detector)] += 1
                wsum += c.weight
                if c.content_hash not in wmap:
                    self.add("error", "contributor-not-in-manifest", path,
                             f"{where} holds visit {c.visit} detector {c.detector} "
                             f"({c.content_hash[:16]}…) which the shard manifest does not list",
                             self._rebuild_action(d, wmap))
                elif wmap[c.content_hash] != (c.visit, c.detector):
                    self.add("error", "contributor-mismatch", path,
                             f"{where}: warp {c.content_hash[:16]}… is visit {c.visit} detector "
                             f"{c.detector} in the cell but {wmap[c.content_hash]} in the manifest",
                             self._rebuild_action(d, wmap))
            if g.contributors and not np.isclose(g.psf_w, wsum, rtol=1e-9, atol=0):
                self.add("error", "sums-inconsistent", path,
                         f"{where} group {gname}: psf_w {g.psf_w!r} != sum of contributor "
                         f"weights {wsum!r}", self._rebuild_action(d, wmap))
            finite = all(np.isfinite(a).all() for a in (g.sum_w, g.sum_wI, g.sum_w2var,
                                                         g.sum_w_interp, g.psf_sum, g.noise))
            if not finite:
                self.add("error", "sums-inconsistent", path,
                         f"{where} group {gname}: non-finite accumulator values",
                         self._rebuild_action(d, wmap))
            elif g.contributors and (g.sum_w.min() < 0 or g.sum_w.max() > wsum * (1 + 1e-9)):
                self.add("error", "sums-inconsistent", path,
                         f"{where} group {gname}: sum_w outside [0, total weight]",
                         self._rebuild_action(d, wmap))
            elif (bad := counts_problem(g)) is not None:
                self.add("error", "counts-inconsistent", path, f"{where} group {gname}: {bad}",
                         self._rebuild_action(d, wmap))
        for (v, det), k in seen_ids.items():
            if k > 1:
                self.add("error", "duplicate-contributor", path,
                         f"{where} counts visit {v} detector {det} {k} times",
                         self._rebuild_action(d, wmap))
        for h in hashes:
            self.cells_per_warp[h] += 1
        return hashes

    def _rebuild_action(self, d: Path, wmap: dict | None) -> str:
        """How to rebuild one shard from its input warps."""
        lp = self.root / fmt.LEDGER
        if wmap:
            files = []
            for h, (v, det) in sorted(wmap.items(), key=lambda kv: kv[1]):
                rec = (self.ledger or {}).get(h) if getattr(self, "ledger", None) else None
                files.append(rec["path"] if rec else f"<file of visit {v} detector {det}>")
            hs = ",".join(f"'{h}'" for h in sorted(wmap))
            listing = " ".join(files)
            forget = f"sqlite3 {lp} \"DELETE FROM warps WHERE content_hash IN ({hs})\""
        else:
            listing = "<the warp files of this patch and band>"
            forget = (f"sqlite3 {lp} \"DELETE FROM warps WHERE band='{d.name}'\" "
                      "(restrict it to the warps of this patch if you know them)")
        return ("restore the shard directory from a backup if you have one; otherwise rebuild "
                f"it from its input warps: stop any writer; mv {d} {d}.damaged; {forget}; "
                f"streamcoadd ingest {self.root} {listing} (the other shards skip these warps, "
                "this one folds them again); then run 'streamcoadd verify' again")


def counts_problem(g) -> str | None:
    """What is wrong with a group's integer counts (None: nothing). Counts are
    non-negative, at most the number of inputs, and ``n_full + n_partial`` is 0 exactly
    where ``sum_w`` is 0 (checked only for a group whose counts are complete)."""
    n = len(g.contributors)
    planes = [("n_partial", g.n_partial), ("n_interp", g.n_interp),
              *((f"plane_counts/{k}", v) for k, v in g.plane_counts.items()),
              *((f"bit_counts/{k}", v) for k, v in g.bit_counts.items())]
    if not 0 <= g.n_full <= n:
        return f"n_full {g.n_full} outside [0, {n} inputs]"
    for name, arr in planes:
        if arr is not None and arr.size and (arr.min() < 0 or arr.max() > n):
            return f"{name} outside [0, {n} inputs]"
    if g.counted and not np.array_equal(g.n_data == 0, g.sum_w == 0):
        return "n_full + n_partial is 0 where sum_w is not, or the reverse"
    return None


def writer_pid(root: Path) -> int | None:
    """pid of the process holding the state's writer flock, if any (Linux /proc/locks)."""
    lock = Path(root) / "lock"
    try:
        st = os.stat(lock)
        dev = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
        with open("/proc/locks") as f:
            for line in f:
                parts = line.split()
                if "FLOCK" in parts and dev in parts:
                    return int(parts[parts.index(dev) - 1])
    except (OSError, ValueError, IndexError):
        return None
    return None


def verify_state(path) -> list[Problem]:
    """Every problem found in the state at ``path`` (an empty list when it is clean)."""
    return _Checker(Path(path)).run()


def repair(path) -> list[Path]:
    """Remove debris as a writer does on opening (takes the writer lock, so no writer is
    running), plus leftover ``*.tmp`` files of atomic writes in the state directory itself.
    Returns the files removed."""
    debris = [Path(p.path) for p in verify_state(path) if p.kind == "debris"]
    with StateStore.open(path, write=True):  # runs recover()
        for tmp in Path(path).glob(f"*{fmt.TMP_SUFFIX}"):
            tmp.unlink(missing_ok=True)
    return [p for p in debris if not p.exists()]


