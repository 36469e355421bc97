"""One shard, (patch, band), as a writer holds it in memory: its committed manifest and
the cells loaded, changed, or emptied since; changed only through its methods."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from streamcoadd.core.fold import CellAccumulator
from streamcoadd.core.skymap import CellId, PatchId


@dataclass
class Shard:
    """One (patch, band): its committed manifest and the cells held in memory."""

    patch: PatchId
    band: str
    directory: Path
    commit: int = 0
    cell_gens: dict[tuple[int, int], int] = field(default_factory=dict)
    warps: dict[str, tuple[int, int]] = field(default_factory=dict)  # hash -> (visit, det)
    cells: dict[CellId, CellAccumulator] = field(default_factory=dict)
    dirty: set[CellId] = field(default_factory=set)
    pending_warps: dict[str, tuple[int, int]] = field(default_factory=dict)
    removed_warps: set[str] = field(default_factory=set)  # retracted in this commit
    last_used: float = 0.0

    @property
    def changed(self) -> bool:
        return bool(self.dirty or self.pending_warps or self.removed_warps)

    def add_pending(self, content_hash: str, visit: int, detector: int) -> None:
        """A warp folded into this shard in memory: the next commit lists its hash."""
        self.pending_warps[content_hash] = (visit, detector)

    def replace_cell(self, cell: CellId, acc: CellAccumulator) -> None:
        """Put ``acc`` in place of the cell's accumulator; the next commit writes it."""
        self.cells[cell] = acc
        self.dirty.add(cell)

    def unchanged(self, cell: CellId) -> None:
        """The cell was loaded for writing but is not changed: the commit skips it."""
        self.dirty.discard(cell)

    def committed(self, commit: int, cell_gens: dict[tuple[int, int], int],
                  warps: dict[str, tuple[int, int]], emptied: list[CellId]) -> None:
        """The shard's manifest now says this: nothing is pending any more. Emptied cells
        leave memory only now: had the manifest write failed, ``dirty`` would still name
        them and the next commit would write them again."""
        self.commit, self.cell_gens, self.warps = commit, cell_gens, warps
        for cell in emptied:
            self.cells.pop(cell, None)
        self.dirty.clear()
        self.pending_warps = {}
        self.removed_warps = set()

    def remove_warp(self, content_hash: str) -> None:
        """A warp retracted from this shard in memory: the next commit drops its hash."""
        self.pending_warps.pop(content_hash, None)
        self.removed_warps.add(content_hash)

    @property
    def nbytes(self) -> int:
        return sum(c.nbytes for c in self.cells.values())

    @property
    def dirty_bytes(self) -> int:
        return sum(self.cells[c].nbytes for c in self.dirty)
