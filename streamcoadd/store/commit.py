"""One shard's commit, in two steps around the cell files' writing (which the store may
spread over processes): plan the new generation, then, once its cell files are durable,
replace the manifest -- the commit point -- and delete the superseded generations.

The protocol is in ``docs/state-format.md`` ("Durability protocol"); its crash points are
named here (``cells-durable``, ``manifest-committed``, ``old-generation-deleted``).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

from streamcoadd.core.skymap import CellId, Tract
from streamcoadd.store import format as fmt
from streamcoadd.store.cellfile import encoded_contributors
from streamcoadd.store.durable import (
    crash_point,
    fsync_dir,
    makedirs_durable,
    write_atomic,
)
from streamcoadd.store.shard import Shard


@dataclass
class ShardPlan:
    """What one shard's commit writes: ``jobs`` are ``write_cell_file`` arguments
    ``(path, accumulator, band, generation, inner box)``."""

    gen: int
    cell_gens: dict[tuple[int, int], int]
    jobs: list[tuple] = field(default_factory=list)
    superseded: list[Path] = field(default_factory=list)
    emptied: list[CellId] = field(default_factory=list)


def plan_shard_commit(shard: Shard, tract: Tract) -> ShardPlan:
    """The cell files a commit of ``shard`` writes (new generation ``commit + 1``)."""
    d = shard.directory
    makedirs_durable(d)  # a new shard's directory entry must survive a power cut
    gen = shard.commit + 1
    plan = ShardPlan(gen=gen, cell_gens=dict(shard.cell_gens))
    for cell in sorted(shard.dirty):
        acc = shard.cells[cell]
        key = (cell.x, cell.y)
        if key in plan.cell_gens:
            plan.superseded.append(d / fmt.cell_filename(cell.x, cell.y, plan.cell_gens[key]))
        if acc.groups:
            for sums in acc.groups.values():  # (in this process: see cellfile)
                encoded_contributors(sums)
            path = d / fmt.cell_filename(cell.x, cell.y, gen)
            plan.jobs.append((path, acc, shard.band, gen, tract.cell_inner_box(cell)))
            plan.cell_gens[key] = gen
        else:  # emptied by a retraction
            plan.cell_gens.pop(key, None)
            plan.emptied.append(cell)
    return plan


def finish_shard_commit(shard: Shard, plan: ShardPlan) -> int:
    """After the plan's cell files are written: fsync the directory, replace the manifest
    (the commit point), update ``shard`` to what is now committed, then delete the
    superseded generations. Returns the bytes written (cell files and manifest)."""
    d = shard.directory
    written = sum(job[0].stat().st_size for job in plan.jobs)
    fsync_dir(d)
    crash_point("cells-durable")
    warps = {h: v for h, v in {**shard.warps, **shard.pending_warps}.items()
             if h not in shard.removed_warps}
    manifest = fmt.Manifest(
        tract=shard.patch.tract, patch=(shard.patch.x, shard.patch.y), band=shard.band,
        commit=plan.gen, updated=time.time(), cells=plan.cell_gens, warps=warps)
    blob = manifest.serialize()
    write_atomic(d / fmt.MANIFEST, blob, "manifest")
    crash_point("manifest-committed")
    shard.committed(plan.gen, plan.cell_gens, warps, plan.emptied)
    for f in plan.superseded:
        try:
            f.unlink()
        except FileNotFoundError:
            pass
        crash_point("old-generation-deleted")
    return written + len(blob)


def remove_debris(directory: Path, manifest: fmt.Manifest | None) -> list[Path]:
    """Delete what an interrupted commit of the shard in ``directory`` left: temporary
    files and cell generations ``manifest`` does not name (safe: the manifest rename is
    the commit point). Returns the files removed."""
    live = set() if manifest is None else {
        fmt.cell_filename(x, y, g) for (x, y), g in manifest.cells.items()}
    removed = []
    for f in list(directory.iterdir()):
        if (fmt.CELL_RE.match(f.name) or f.name.endswith(fmt.TMP_SUFFIX)) \
                and f.name not in live:
            f.unlink()
            removed.append(f)
            crash_point("debris-removed")
    return removed
