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
  contributor weights; sums are finite;
* every manifest warp is in the ledger (a missing row after a crash is *benign*: the next
  ingest/watch of that file records it without folding it again); every ledger row with
  cells is in some manifest, with the number of cells the ledger says;
* debris: ``*.tmp`` files and cell generations no manifest names (left by an interrupted
  commit; *benign*: removed automatically when a writer next opens the state).

Each problem comes with the exact action that fixes it. Exit status 0 when nothing is
found, 1 otherwise.
"""

from __future__ import annotations

import json
import os
import re
import sqlite3
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np

CELL_RE = re.compile(r"^c(\d+)-(\d+)\.g(\d+)\.h5$")
HASH_RE = re.compile(r"^[0-9a-f]{64}$")


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
        from streamcoadd.store.state import STATE_FORMAT, STATE_VERSION

        root = self.root
        sj = root / "state.json"
        try:
            meta = json.loads(sj.read_text())
        except FileNotFoundError:
            self.add("error", "no-state", root, "no state.json: this is not a streamcoadd state "
                     "(or state.json was deleted)",
                     "if this is the right directory, restore state.json from a backup or "
                     "create it again with 'streamcoadd init' in an empty directory and copy "
                     "shards/ and ledger.sqlite over")
            return self.problems
        except (OSError, ValueError) as e:
            self.add("error", "state-json-unreadable", sj, f"cannot parse: {e}",
                     "restore state.json from a backup; it is written once at init "
                     "(its skymap is also in skymap.toml)")
            return self.problems
        if meta.get("format") != STATE_FORMAT or meta.get("version") != STATE_VERSION:
            self.add("error", "state-version", sj, f"format {meta.get('format')!r} version "
                     f"{meta.get('version')!r} is not {STATE_FORMAT!r} version {STATE_VERSION}",
                     "use the streamcoadd release that wrote this state")
            return self.problems
        try:
            from streamcoadd.core.skymap import skymap_from_dict

            self.skymap = skymap_from_dict(meta["skymap"], str(sj))
        except Exception as e:  # noqa: BLE001
            self.add("error", "state-json-unreadable", sj, f"bad skymap: {e}",
                     "restore state.json from a backup")
            return self.problems
        self.ledger = self.check_ledger()
        for tmp in root.glob("*.tmp"):
            self.debris(tmp, "temporary file of an interrupted atomic write")
        shards_dir = root / "shards"
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
        for d in sorted(p for p in shards_dir.glob("*/*/*") if p.is_dir()):
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
        path = self.root / "ledger.sqlite"
        if not path.exists():
            self.add("error", "ledger-missing", path, "the ledger is missing",
                     "restore it from a backup, or rebuild it: create an empty state with "
                     "'streamcoadd init', copy its ledger.sqlite here, then run "
                     "'streamcoadd ingest STATE' on the original warp files (the shards skip "
                     "what they hold and the ledger rows are written again)")
            return None
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
            self.add("error", "ledger-corrupt", path, f"SQLite cannot read it: {e}",
                     "restore ledger.sqlite from a backup, or rebuild it as for a missing "
                     "ledger (the shard manifests are the truth; the ledger is a summary)")
            return None
        return {r[0]: {"visit": r[1], "detector": r[2], "band": r[3], "path": r[4],
                       "status": r[5], "n_cells": r[6]} for r in rows}

    def check_ledger_vs_shards(self) -> None:
        if self.ledger is None:
            return
        lp = self.root / "ledger.sqlite"
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
    def check_shard(self, d: Path) -> None:
        mpath = d / "manifest.json"
        if not mpath.exists():
            for f in sorted(d.iterdir()):
                if CELL_RE.match(f.name) or f.name.endswith(".tmp"):
                    self.debris(f, "file of a shard whose first commit was interrupted")
            return
        try:
            m = json.loads(mpath.read_text())
            cells, warps = m["cells"], m["warps"]
            if m.get("format") != "streamcoadd-shard":
                raise ValueError(f"format is {m.get('format')!r}, not 'streamcoadd-shard'")
            if m.get("version") != 1:
                raise ValueError(f"version {m.get('version')!r} is not 1")
            tract, (px, py), band = int(m["tract"]), (int(v) for v in m["patch"]), m["band"]
            if not isinstance(cells, dict) or not isinstance(warps, dict):
                raise ValueError("'cells' and 'warps' must be objects")
            gens = {}
            for k, g in cells.items():
                cx, cy = (int(v) for v in k.split("-"))
                if not isinstance(g, int) or g < 1:
                    raise ValueError(f"cell {k}: generation {g!r} is not a positive integer")
                gens[(cx, cy)] = g
            wmap = {}
            for h, vd in warps.items():
                if not HASH_RE.match(h) or len(vd) != 2:
                    raise ValueError(f"warp entry {h!r}: {vd!r} is not sha256: [visit, detector]")
                wmap[h] = (int(vd[0]), int(vd[1]))
            commit = int(m["commit"])
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            self.add("error", "manifest-corrupt", mpath, f"cannot parse: {e}",
                     self._rebuild_action(d, None))
            self.manifest_unreadable = True
            return
        expected = f"t{tract}/p{px}-{py}/{band}"
        if str(d.relative_to(self.root / "shards")) != expected:
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
            name = f"c{cx}-{cy}.g{g}.h5"
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
            if f.name in live or f.name in ("manifest.json", "shard.lock"):
                continue
            if CELL_RE.match(f.name):
                self.debris(f, "cell generation superseded or written by an interrupted commit")
            elif f.name.endswith(".tmp"):
                self.debris(f, "temporary file of an interrupted commit")

    def check_cell(self, path, d, wmap, tract, px, py, band, cx, cy, gen) -> set[str] | None:
        from streamcoadd.store.cellfile import read_cell_file

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
        ident = (int(attrs["tract"]), tuple(int(v) for v in attrs["patch"]),
                 tuple(int(v) for v in attrs["cell"]), str(attrs["band"]), int(attrs["generation"]))
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
        lp = self.root / "ledger.sqlite"
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
    from streamcoadd.store.state import StateStore

    debris = [Path(p.path) for p in verify_state(path) if p.kind == "debris"]
    with StateStore.open(path, write=True):  # runs recover()
        for tmp in Path(path).glob("*.tmp"):
            tmp.unlink(missing_ok=True)
    return [p for p in debris if not p.exists()]


