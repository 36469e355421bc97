"""Retraction: remove a visit's contribution from every cell it reached.

The accumulators are sums, so a warp's contribution is subtracted again from the same
warp file (found through the ledger path, ``--file`` or ``--search`` directories, and
checked by content hash), with the weight stored in its contributor row at fold time.
What subtraction alone could not undo is kept in the state: integer counts (inputs with
data, interpolated inputs, inputs per propagated plane and per mask bit) decide coverage
and flags, and every float sum whose count reaches 0 is set to exactly 0; fallback inputs
have their own group (so when the last good input leaves a cell, the fallback inputs take
over exactly as a fresh fold would). A group left with no input is dropped whole.

Where subtracting would lose precision (the retracted weight dominates what remains, see
:func:`~streamcoadd.core.fold.needs_rebuild`), or the cell has no integer counts (written
by state version 1), the cell is rebuilt: its remaining inputs are folded again from
their own files, with their stored weights, into a fresh accumulator. If one of those
files cannot be found, the retraction of that warp is refused before anything changes.

Each warp's retraction is one commit; the ledger row turns ``retracted`` only after it,
so an interrupted retraction is finished by running it again.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path

from streamcoadd.core.errors import UserError, WarpRejected
from streamcoadd.core.fold import (
    CellAccumulator,
    fold_cell,
    needs_rebuild,
    unfold_cell,
)
from streamcoadd.core.skymap import CellId
from streamcoadd.core.warp import file_hash
from streamcoadd.io.warp_reader import read_bytes
from streamcoadd.pipeline.source import RoutedWarp, load_warp
from streamcoadd.store.ledger import WarpRecord
from streamcoadd.store.state import Shard, StateStore


@dataclass
class RetractReport:
    warps: list[WarpRecord] = field(default_factory=list)
    cells: int = 0
    rebuilt: int = 0  # cells rebuilt from their remaining inputs' files


def find_warp_file(rec: WarpRecord, files: list[Path], search: list[Path],
                   why: str = "") -> Path:
    """The file holding ``rec``'s content (checked by sha256); UserError if none."""
    first = Path(rec.path)
    # where the daemon puts folded files by default: a 'done' sibling of the inbox
    candidates = [*files, first, first.parent.parent / "done" / first.name]
    for d in search:
        candidates += [d / Path(rec.path).name, *sorted(d.glob("*.fits"))]
    for c in candidates:
        try:
            if c.is_file() and file_hash(read_bytes(str(c))) == rec.content_hash:
                return c
        except WarpRejected:
            continue
    raise UserError(f"cannot retract{why}: the warp file of visit {rec.visit} detector "
                    f"{rec.detector} (sha256 {rec.content_hash[:12]}..., first seen as "
                    f"{rec.path}) was not found; pass it with --file or the directory "
                    "holding it with --search (keep done/ for retractions); nothing was "
                    "changed for this warp")


def retract(store: StateStore, visit: int, detector: int | None = None,
            tract: int | None = None, reason: str = "", files=(), search=()) -> RetractReport:
    recs = [r for r in store.ledger.warps()
            if r.visit == visit and detector in (None, r.detector)
            and tract in (None, r.tract) and r.status != "retracted"]
    if not recs:
        what = f"visit {visit}" + (f" detector {detector}" if detector is not None else "")
        raise UserError(f"{what} is not in the state (nothing folded to retract)")
    files, search = [Path(f) for f in files], [Path(d) for d in search]
    # every retracted warp's own file first: a missing one refuses the whole operation
    paths = {r.content_hash: find_warp_file(r, files, search) for r in recs
             if r.status == "folded"}
    report = RetractReport()
    for rec in recs:
        if rec.status == "folded":
            _retract_one(store, rec, paths[rec.content_hash], files, search, report)
        store.ledger.set_status(rec.content_hash, "retracted")
        store.ledger.record_event(
            "retract", f"visit {rec.visit} detector {rec.detector} tract {rec.tract} "
                       f"band {rec.band} sha256 {rec.content_hash}: {reason or 'no reason given'}")
        report.warps.append(rec)
    return report


def _retract_one(store: StateStore, rec: WarpRecord, path: Path, files: list[Path],
                 search: list[Path], report: RetractReport) -> None:
    """Subtract one warp from its cells (on copies), rebuild those that need it, then put
    the results in the store and commit. Nothing in the store changes before every file a
    rebuild needs has been found."""
    fold = store.fold
    # the stored weight, not recomputed (nor checked again); routed as at fold time
    routed = load_stored(store, path, rec.content_hash, rec.weight)
    pw = routed.prepared
    # by cell (the band is the warp's): the new accumulator, None if not a contributor
    results: dict[CellId, CellAccumulator | None] = {}
    rebuild: dict[CellId, set[str]] = {}  # cells to rebuild -> their remaining inputs
    shards: list[Shard] = []
    shard_of: dict[CellId, Shard] = {}
    for patch, inputs in routed.inputs.items():
        shard = store.shard(patch, rec.band)
        if rec.content_hash not in shard.warps:
            continue
        shards.append(shard)
        for cin in inputs:
            cell = cin.cell
            if (cell.x, cell.y) not in shard.cell_gens:
                continue
            shard_of[cell] = shard
            new = copy.deepcopy(store.cell_for_write(shard, cell))
            touched = [g for g in new.groups.values()
                       if rec.content_hash in {c.content_hash for c in g.contributors}]
            if not unfold_cell(new, rec.content_hash, pw, cin.centre, fold):
                results[cell] = None  # not a contributor: unchanged
                continue
            results[cell] = new
            if any(needs_rebuild(g) for g in touched):
                rebuild[cell] = new.hashes()
    _rebuild_cells(store, rec, rebuild, results, files, search)
    for cell, new in results.items():
        shard = shard_of[cell]
        if new is None:
            shard.unchanged(cell)
            continue
        shard.replace_cell(cell, new)
        report.cells += 1
    report.rebuilt += len(rebuild)
    for shard in shards:
        shard.remove_warp(rec.content_hash)
    try:
        store.commit()
    except BaseException:
        # a failed commit: forget every uncommitted change so memory matches the disk
        store.discard_uncommitted()
        raise


def _rebuild_cells(store: StateStore, rec: WarpRecord, rebuild: dict, results: dict,
                   files: list[Path], search: list[Path]) -> None:
    """Fold the remaining inputs of each cell in ``rebuild`` again, from their files and
    with their stored weights, into fresh accumulators (replacing ``results``). Each
    remaining warp is read once for all the cells it is needed in."""
    if not rebuild:
        return
    fold = store.fold
    why = (f" visit {rec.visit} detector {rec.detector}: {len(rebuild)} cell(s) must be "
           "rebuilt from their remaining inputs (the retracted weight dominates theirs, "
           "or the cells were written without integer counts)")
    needed = sorted({h for hs in rebuild.values() for h in hs})
    records = {h: store.ledger.get(h) for h in needed}
    paths = {h: find_warp_file(r, files, search, why) for h, r in records.items()}
    fresh = {cell: CellAccumulator(cell=cell, outer=results[cell].outer) for cell in rebuild}
    old_rows = {(key, c.content_hash): c for key in rebuild
                for g in results[key].groups.values() for c in g.contributors}
    for h in needed:
        routed = load_stored(store, paths[h], h, old_weight(old_rows, h))
        for cin in (c for inputs in routed.inputs.values() for c in inputs):
            if h in rebuild.get(cin.cell, ()):
                fold_cell(fresh[cin.cell], cin, routed.prepared, fold)
    for key, acc in fresh.items():
        for g in acc.groups.values():  # keep the original fold times
            for c in g.contributors:
                c.folded_at = old_rows[(key, c.content_hash)].folded_at
        results[key] = acc


def load_stored(store: StateStore, path: Path, content_hash: str, weight: float) -> RoutedWarp:
    """A folded warp loaded again through the pipeline's one source, with the weight
    stored at fold time; its routing is the fold's (same overlap rule, same cells)."""
    routed = load_warp(str(path), store.skymap, store.fold, expect_hash=content_hash,
                       weight=weight)
    if routed.rejection is not None:
        raise UserError(f"cannot retract: {routed.rejection}")
    return routed


def old_weight(rows: dict, content_hash: str) -> float:
    """The weight stored for ``content_hash`` in any of the rebuilt cells' rows."""
    return next(c.weight for (_, h), c in rows.items() if h == content_hash)
