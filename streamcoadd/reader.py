"""Read-only access to a state for analysis code: ``streamcoadd.open_state(path)``.

Safe while a daemon writes: every cell is read from an immutable generation file named by
the shard manifest, so a cell is always seen whole and readers never block the writer.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from astropy.table import Table

from .finalize import CellCoadd, coadd_cell
from .skymap import CellId, PatchId
from .state import StateStore


class State:
    """A state opened for reading."""

    def __init__(self, path: str | Path):
        self.store = StateStore.open(path, write=False)
        self.root = self.store.root
        self.skymap = self.store.skymap
        self.fold = self.store.fold

    def close(self) -> None:
        self.store.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def bands(self) -> list[str]:
        return sorted({band for _, band in self.store.shard_keys()})

    def patches(self, band: str | None = None) -> list[PatchId]:
        """Patches with at least one committed cell (in ``band`` if given)."""
        return sorted({p for p, b in self.store.shard_keys() if band in (None, b)})

    def populated_cells(self, band: str, patch: PatchId | None = None) -> list[CellId]:
        out = []
        for p, b in self.store.shard_keys():
            if b != band or patch not in (None, p):
                continue
            manifest = self.store.read_manifest(p, b) or {"cells": {}}
            for key in manifest["cells"]:
                x, y = (int(v) for v in key.split("-"))
                out.append(CellId(p, x, y))
        return sorted(out)

    def cell(self, cell: CellId, band: str) -> CellCoadd | None:
        """The current coadd of one cell (reads only that cell), or None if empty."""
        got = self.store.read_cell(cell, band)
        if got is None:
            return None
        acc, _ = got
        return coadd_cell(acc, band, self.skymap.tract(cell.patch.tract), self.fold)

    def depth_map(self, patch: PatchId, band: str) -> np.ndarray:
        """Number of inputs per cell, shape (cells_y, cells_x) (reads every cell)."""
        n = self.skymap.tract(patch.tract).cells.cells_per_patch
        out = np.zeros((n, n), int)
        for c in self.populated_cells(band, patch):
            coadd = self.cell(c, band)
            out[c.y, c.x] = coadd.n_inputs if coadd else 0
        return out

    def warps(self) -> Table:
        """Every warp the state has seen (the ledger) as a Table."""
        rows = self.store.ledger.warps()
        names = ["content_hash", "tract", "visit", "detector", "band", "path", "status",
                 "n_cells", "weight", "at"]
        return Table(rows=[tuple(r.__dict__.values()) for r in rows], names=names) if rows \
            else Table(names=names, dtype=[str, int, int, int, str, str, str, int, float, float])


def open_state(path: str | Path) -> State:
    """Open a state directory for reading. See ``docs/analysis.md``."""
    return State(path)
