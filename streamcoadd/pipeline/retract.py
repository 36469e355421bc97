"""Retraction: remove a visit's contribution from every cell it reached.

The accumulators are sums, so a warp's contribution is subtracted again from the same
warp file (found through the ledger path, ``--file`` or ``--search`` directories, and
checked by content hash). What subtraction alone could not undo is kept in the state:
fallback inputs have their own group (so when the last good input leaves a cell, the
fallback inputs take over exactly as a fresh fold would), and the mask OR is kept as
per-bit input counts. A group left with no input is dropped whole.

Each shard commits its part atomically; the ledger row turns ``retracted`` only when
every shard is done, so an interrupted retraction is finished by running it again.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from streamcoadd.core.errors import UserError, WarpRejected
from streamcoadd.core.fold import cell_input, prepare_warp, unfold_cell
from streamcoadd.core.warp import file_hash
from streamcoadd.io.warp_reader import read_bytes as read_bytes
from streamcoadd.io.warp_reader import read_warp
from streamcoadd.store.ledger import WarpRecord
from streamcoadd.store.state import StateStore


@dataclass
class RetractReport:
    warps: list[WarpRecord] = field(default_factory=list)
    cells: int = 0


def find_warp_file(rec: WarpRecord, files: list[Path], search: list[Path]) -> Path:
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
    raise UserError(f"cannot retract visit {rec.visit} detector {rec.detector}: its warp file "
                    f"(sha256 {rec.content_hash[:12]}..., first seen as {rec.path}) was not found; "
                    "pass it with --file or the directory holding it with --search "
                    "(keep done/ for retractions)")


def retract(store: StateStore, visit: int, detector: int | None = None,
            tract: int | None = None, reason: str = "", files=(), search=()) -> RetractReport:
    recs = [r for r in store.ledger.warps()
            if r.visit == visit and detector in (None, r.detector)
            and tract in (None, r.tract) and r.status != "retracted"]
    if not recs:
        what = f"visit {visit}" + (f" detector {detector}" if detector is not None else "")
        raise UserError(f"{what} is not in the state (nothing folded to retract)")
    report = RetractReport()
    fold = store.fold
    for rec in recs:
        if rec.status == "folded":
            path = find_warp_file(rec, [Path(f) for f in files], [Path(d) for d in search])
            warp = read_warp(path, store.skymap, fold.bad_planes, fold.noise_realizations)
            pw = prepare_warp(warp, fold)
            tract_ = store.skymap.tract(rec.tract)
            for patch in tract_.patches_overlapping(warp.box):
                shard = store.shard(patch, rec.band)
                if rec.content_hash not in shard.warps:
                    continue
                for cell in tract_.cells_overlapping(patch, warp.box):
                    key = (cell.x, cell.y)
                    if key not in shard.cell_gens:
                        continue
                    cin = cell_input(pw, tract_, cell, fold)
                    if cin is None:
                        continue
                    acc = store.cell_for_write(shard, cell)
                    if unfold_cell(acc, rec.content_hash, pw, cin.centre, fold):
                        report.cells += 1
                    else:
                        shard.dirty.discard(cell)
                shard.removed_warps.add(rec.content_hash)
            store.commit()
        store.ledger.set_status(rec.content_hash, "retracted")
        store.ledger.record_event(
            "retract", f"visit {rec.visit} detector {rec.detector} tract {rec.tract} "
                       f"band {rec.band} sha256 {rec.content_hash}: {reason or 'no reason given'}")
        report.warps.append(rec)
    return report
