"""Read-only access to a state for analysis code: ``streamcoadd.open_state(path)``.

Objects (see ``docs/analysis.md`` for examples)::

    st = open_state("STATE")                 # State
    st.bands(), st.patches(band), st.tracts()
    tr = st.tract(0)                         # TractView: wcs, patches(band), depth_map(band) ...
    p = st.patch(PatchId(0, 1, 1), "r")      # PatchView: one (patch, band) shard
    p.summary()                              # astropy Table, one row per populated cell
    p.depth_map(), p.weight_map(), p.fwhm_map(), p.ellipticity_map()   # (ny, nx) arrays
    p.stitched()                             # astropy CCDData of the patch, with WCS
    c = p.cell(3, 4)                         # CellView: image, variance, mask, psf, wcs,
    c.to_ccddata(), c.contributors, c.accumulators()

Safe while a daemon writes: every cell is read from an immutable generation file named by
the shard manifest (``docs/state-format.md``), so a cell is always seen whole, and readers
never take a lock that could block the writer. If a commit supersedes a generation between
reading the manifest and opening the file, the manifest is read again. Cells are read
independently: reading one cell opens only the manifest and that cell's file, so two
cells of one patch may come from different commits while a writer is active.

Priority: a reader must not slow the daemon down. ``open_state(path)`` (``priority="auto"``,
the default) lowers the calling process's CPU priority (``SCHED_IDLE``, nice 19) and I/O
priority (idle class) if a writer (``watch`` or ``ingest``) holds the state's writer lock
at that moment; the read-only commands (``finalize``, ``status``, ``plot``, ``verify``) do
the same. ``priority="normal"`` (``--priority normal``) opts out, ``"low"`` always lowers.
Closing the last lowered ``State`` restores the previous priority where the system allows
it (raising it back needs privileges; see ``docs/operations.md``).
"""

from __future__ import annotations

import ctypes
import math
import os
import platform
import threading
import time
from pathlib import Path

import numpy as np
from astropy.table import Table
from astropy.wcs import WCS

from streamcoadd.core.coadd import BIT, CellCoadd, box_wcs, coadd_cell
from streamcoadd.core.errors import StateError, UserError
from streamcoadd.core.fold import GROUPS
from streamcoadd.core.masks import bitmask
from streamcoadd.core.psf import psf_moments
from streamcoadd.core.skymap import Box, CellId, PatchId
from streamcoadd.store.cellfile import count_inputs, read_cell_file, read_cell_summary
from streamcoadd.store.format import Manifest, contributors_table
from streamcoadd.store.state import StateStore
from streamcoadd.store.status_file import read_status

FWHM_PER_SIGMA = 2.0 * math.sqrt(2.0 * math.log(2.0))
AB_ZERO_NJY = 3631e9  # nJy of an AB magnitude 0 source

SUMMARY_COLUMNS = [
    ("cell_x", int), ("cell_y", int), ("generation", int), ("group", "U8"),
    ("n_inputs", int), ("n_fallback", int), ("weight", float), ("variance", float),
    ("psf_ixx", float), ("psf_iyy", float), ("psf_ixy", float), ("psf_flag", bool),
    ("fwhm", float), ("e1", float), ("e2", float), ("e", float), ("limiting_mag", float),
    ("ra", float), ("dec", float), ("last_folded", float),
]


def psf_shape(ixx: float, iyy: float, ixy: float, pixel_scale: float) -> dict:
    """FWHM (arcsec) and distortion ellipticity of second moments (px²).

    ``fwhm = 2 sqrt(2 ln 2) (ixx iyy - ixy²)^(1/4) * pixel_scale`` (the determinant radius,
    exact for a Gaussian); ``e1 = (ixx - iyy) / (ixx + iyy)``, ``e2 = 2 ixy / (ixx + iyy)``,
    ``e = hypot(e1, e2)``, position angle ``theta = atan2(e2, e1) / 2`` (radians from +x,
    counter-clockwise, in tract pixel axes).
    """
    det = ixx * iyy - ixy * ixy
    tr = ixx + iyy
    if not (np.isfinite(det) and det > 0 and tr > 0):
        nan = float("nan")
        return {"fwhm": nan, "e1": nan, "e2": nan, "e": nan, "theta": nan}
    e1, e2 = (ixx - iyy) / tr, 2 * ixy / tr
    return {"fwhm": FWHM_PER_SIGMA * det ** 0.25 * pixel_scale, "e1": e1, "e2": e2,
            "e": math.hypot(e1, e2), "theta": 0.5 * math.atan2(e2, e1)}


def limiting_magnitude(variance: float, psf: np.ndarray, nsigma: float = 5.0) -> float:
    """AB magnitude of a point source detected at ``nsigma`` by PSF-fit photometry on a
    background of per-pixel ``variance`` (nJy²): ``sigma_F = sqrt(variance / sum(psf²))``
    for a PSF normalised to unit sum."""
    psf = np.asarray(psf, float)
    s = psf.sum()
    if not (variance > 0 and np.isfinite(variance) and s > 0):
        return float("nan")
    p = psf / s
    sigma_f = math.sqrt(variance / float((p * p).sum()))
    return -2.5 * math.log10(nsigma * sigma_f / AB_ZERO_NJY)


def stitch_region(cell: CellId, inner: Box, outer: Box, n_side: int) -> Box:
    """The part of a cell that goes into a stitched patch: its inner box, grown to the
    outer box on the sides where the cell is on the patch edge (as ``finalize.stitch``)."""
    return Box(outer.x0 if cell.x == 0 else inner.x0, outer.y0 if cell.y == 0 else inner.y0,
               outer.x1 if cell.x == n_side - 1 else inner.x1,
               outer.y1 if cell.y == n_side - 1 else inner.y1)


class CellView:
    """One populated cell of one band, read from one immutable generation file.

    Nothing is read until first used; then the whole cell file is read once (only this
    cell's file) and every attribute comes from that one read, so image, PSF and
    contributors are always mutually consistent. ``reload()`` looks again for a newer
    generation.
    """

    def __init__(self, patch: "PatchView", cell: CellId, generation: int):
        self._patch = patch
        self.id = cell
        self.band = patch.band
        self.generation = generation
        self._coadd: CellCoadd | None = None
        self._attrs: dict | None = None

    def __repr__(self) -> str:
        return f"<CellView {self.id} band {self.band} generation {self.generation}>"

    @property
    def x(self) -> int:
        return self.id.x

    @property
    def y(self) -> int:
        return self.id.y

    @property
    def path(self) -> Path:
        return self._patch._state.store.cell_path(self.id, self.band, self.generation)

    # ------------------------------------------------------------- geometry (no I/O)
    @property
    def outer_box(self) -> Box:
        return self._patch.geometry.cell_outer_box(self.id)

    @property
    def inner_box(self) -> Box:
        return self._patch.geometry.cell_inner_box(self.id)

    @property
    def wcs(self) -> WCS:
        """Astropy WCS of the arrays (which cover the outer box)."""
        return box_wcs(self._patch.geometry, self.outer_box)

    @property
    def center(self):
        """Sky position of the cell centre pixel (``astropy.coordinates.SkyCoord``)."""
        from astropy.coordinates import SkyCoord

        x, y = self._patch.geometry.cell_centre(self.id)
        ra, dec = self._patch.geometry.wcs().wcs_pix2world([[x, y]], 0)[0]
        return SkyCoord(ra, dec, unit="deg")

    # ------------------------------------------------------------- data
    def _load(self) -> CellCoadd:
        if self._coadd is not None:
            return self._coadd
        st = self._patch._state
        st.check_priority()
        got = st.store.read_current(self.id, self.band, self.generation, read_cell_file)
        if got is None:
            raise StateError(f"{self.id} band {self.band} no longer has any input "
                             "(retracted since the patch was opened)")
        gen, (acc, attrs) = got
        coadd = coadd_cell(acc, self.band, self._patch.geometry, st.fold)
        if coadd is None:
            raise StateError(f"{self.path}: cell file holds no input")
        self.generation, self._attrs, self._coadd = gen, attrs, coadd
        return coadd

    def reload(self) -> "CellView":
        """Forget what was read; the next access reads the current generation."""
        manifest = self._patch._state.store.load_manifest(self.id.patch, self.band)
        gen = manifest and manifest.generation(self.x, self.y)
        if gen is None:
            raise StateError(f"{self.id} band {self.band} has no input any more")
        self.generation, self._coadd, self._attrs = gen, None, None
        return self

    @property
    def coadd(self) -> CellCoadd:
        """The finalized coadd (:class:`streamcoadd.analysis.finalize.CellCoadd`)."""
        return self._load()

    @property
    def image(self) -> np.ndarray:
        """Coadd image, nJy, float64, outer-box shape; NaN where no input has data."""
        return self._load().image

    @property
    def variance(self) -> np.ndarray:
        return self._load().variance

    @property
    def mask(self) -> np.ndarray:
        """int32 canonical mask bits (``streamcoadd.core.masks.CANONICAL_PLANES``)."""
        return self._load().mask

    @property
    def psf(self) -> np.ndarray:
        """Coadd PSF at the cell centre (psf_size x psf_size, unit sum)."""
        return self._load().psf

    @property
    def maskfrac(self) -> np.ndarray:
        return self._load().maskfrac

    @property
    def noise(self) -> np.ndarray:
        return self._load().noise

    @property
    def group(self) -> str:
        """``'good'`` or ``'fallback'``: the input group that makes the coadd."""
        return self._load().group

    @property
    def contributors(self) -> Table:
        """The inputs of the coadd (active group) as an astropy Table."""
        return self._load().contributors

    @property
    def n_inputs(self) -> int:
        return self._load().n_inputs

    def inner(self, plane: np.ndarray) -> np.ndarray:
        """``plane`` (outer-box shape) cut to the inner box."""
        return self._load().inner(plane)

    def psf_shape(self) -> dict:
        """Adaptive moments, FWHM (arcsec) and ellipticity of the coadd PSF."""
        ixx, iyy, ixy, flag = psf_moments(self.psf)
        out = {"ixx": ixx, "iyy": iyy, "ixy": ixy, "flag": flag}
        out.update(psf_shape(ixx, iyy, ixy, self._patch.geometry.pixel_scale))
        return out

    def accumulators(self, group: str | None = None) -> dict:
        """The raw float64 sums of one group (default: the group that makes the coadd):
        ``sum_w``, ``sum_wI``, ``sum_w2var``, ``sum_w_interp``, ``mask_or``, ``noise``,
        ``psf_sum``, ``psf_w``, ``planes`` {name: array}, ``bit_counts`` {bit: array},
        ``contributors`` (Table). Names as in ``docs/state-format.md``."""
        acc = self._load().accumulator
        group = group or self._coadd.group
        if group not in acc.groups or not acc.groups[group].contributors:
            raise KeyError(f"{self.id} band {self.band} has no {group!r} group "
                           f"(groups: {self.groups})")
        g = acc.groups[group]
        return {"sum_w": g.sum_w, "sum_wI": g.sum_wI, "sum_w2var": g.sum_w2var,
                "sum_w_interp": g.sum_w_interp, "mask_or": g.mask_or, "noise": g.noise,
                "psf_sum": g.psf_sum, "psf_w": g.psf_w, "planes": dict(g.planes),
                "bit_counts": dict(g.bit_counts), "contributors": contributors_table(g.contributors)}

    @property
    def groups(self) -> list[str]:
        acc = self._load().accumulator
        return [n for n in GROUPS if n in acc.groups and acc.groups[n].contributors]

    def to_ccddata(self):
        """The coadd as :class:`astropy.nddata.CCDData` (outer box, nJy): ``mask`` is True
        where any mask bit is set, ``flags`` the int32 bits, ``psf`` the coadd PSF,
        ``uncertainty`` the variance."""
        from astropy.nddata import CCDData, VarianceUncertainty

        c = self._load()
        meta = {"TRACT": self.id.patch.tract, "PATCH_X": self.id.patch.x,
                "PATCH_Y": self.id.patch.y, "CELL_X": self.x, "CELL_Y": self.y,
                "BAND": self.band, "NINPUTS": c.n_inputs, "GROUP": c.group,
                "GEN": self.generation}
        return CCDData(c.image, unit="nJy", wcs=self.wcs, mask=c.mask != 0, flags=c.mask,
                       uncertainty=VarianceUncertainty(c.variance, unit="nJy2"), psf=c.psf,
                       meta=meta)


class PatchView:
    """One (patch, band) shard. The manifest is read when the view is made (``refresh()``
    reads it again); every cell is then read from the generation it names."""

    def __init__(self, state: "State", patch: PatchId, band: str):
        self._state = state
        self.id = patch
        self.band = band
        self.geometry = state.skymap.tract(patch.tract)
        n = self.geometry.cells.cells_per_patch
        if not (0 <= patch.x < self.geometry.num_patches[0]
                and 0 <= patch.y < self.geometry.num_patches[1]):
            raise UserError(f"{patch} is outside the tract ({self.geometry.num_patches[0]}x"
                            f"{self.geometry.num_patches[1]} patches)")
        self.shape = (n, n)
        self.directory = state.store.shard_dir(patch, band)
        self.refresh()

    def __repr__(self) -> str:
        return f"<PatchView {self.id} band {self.band}: {len(self.generations)} cell(s)>"

    def refresh(self) -> "PatchView":
        self._state.check_priority()
        m = self._state.store.load_manifest(self.id, self.band)
        self.manifest = m or Manifest.empty(self.id.tract, (self.id.x, self.id.y), self.band)
        self.generations = dict(self.manifest.cells)
        return self

    @property
    def commit(self) -> int:
        return self.manifest.commit

    @property
    def updated(self) -> float | None:
        """Unix time of the last commit of this shard (None if never)."""
        return self.manifest.updated

    @property
    def outer_box(self) -> Box:
        return self.geometry.patch_outer_box(self.id)

    @property
    def inner_box(self) -> Box:
        return self.geometry.patch_inner_box(self.id)

    @property
    def wcs(self) -> WCS:
        """WCS of an array covering the patch outer box (as ``stitched()``)."""
        return box_wcs(self.geometry, self.outer_box)

    @property
    def n_warps(self) -> int:
        """Warps folded into this shard (any cell)."""
        return len(self.manifest.warps)

    def cell_ids(self) -> list[CellId]:
        """Populated cells, sorted by (y, x)."""
        return sorted((CellId(self.id, x, y) for x, y in self.generations),
                      key=lambda c: (c.y, c.x))

    def cell(self, x: int, y: int) -> CellView | None:
        """Cell (x, y) of this patch, or None if it has no input."""
        gen = self.generations.get((x, y))
        if gen is None:
            n = self.shape[0]
            if not (0 <= x < n and 0 <= y < n):
                raise UserError(f"cell {x},{y} is outside the patch ({n}x{n} cells)")
            return None
        return CellView(self, CellId(self.id, x, y), gen)

    def cells(self) -> list[CellView]:
        """Every populated cell (lazy: each reads its file when first used)."""
        return [CellView(self, c, self.generations[(c.x, c.y)]) for c in self.cell_ids()]

    def coadds(self):
        """Iterate over the finalized coadds of the populated cells, one at a time."""
        for c in self.cells():
            yield c.coadd

    # ------------------------------------------------------------- light per-cell reads
    def _read_summary(self, cx: int, cy: int, gen: int, want_contrib: bool = False):
        """What the maps need from one cell file (through the store)."""
        got = self._state.store.read_current(CellId(self.id, cx, cy), self.band, gen,
                                             read_cell_summary)
        if got is None:
            return None
        gen, s = got
        g, h = s["sums"], s["header"]
        inner, outer = Box(*h["inner_box"]), Box(*h["outer_box"])
        sl = inner.slices((outer.x0, outer.y0))
        return dict(gen=gen, group=s["group"], sum_w=g.sum_w[sl], sum_w2var=g.sum_w2var[sl],
                    psf=g.psf_sum / g.psf_w, contributors=g.contributors,
                    n_fallback=s["n_fallback"])

    def summary(self) -> Table:
        """One row per populated cell: inputs, effective weight (median ``sum_w`` over the
        inner box, 1/nJy²), median coadd variance (nJy²), coadd PSF moments (px²), FWHM
        (arcsec), ellipticity ``e1, e2, e``, 5σ point-source limiting AB magnitude, cell
        centre ``ra``/``dec`` (deg), last fold time. Reads a few datasets per cell."""
        rows = []
        scale = self.geometry.pixel_scale
        wcs = self.geometry.wcs()
        for (cx, cy), gen in sorted(self.generations.items(), key=lambda kv: kv[0][::-1]):
            s = self._read_summary(cx, cy, gen)
            if s is None:
                continue
            with np.errstate(divide="ignore", invalid="ignore"):
                var = np.where(s["sum_w"] > 0, s["sum_w2var"] / s["sum_w"] ** 2, np.nan)
            w = float(np.median(s["sum_w"]))
            v = float(np.nanmedian(var)) if np.isfinite(var).any() else float("nan")
            ixx, iyy, ixy, flag = psf_moments(s["psf"])
            shp = psf_shape(ixx, iyy, ixy, scale)
            x, y = self.geometry.cell_centre(CellId(self.id, cx, cy))
            ra, dec = wcs.wcs_pix2world([[x, y]], 0)[0]
            c = s["contributors"]
            rows.append((cx, cy, s["gen"], s["group"], len(c), s["n_fallback"], w, v,
                         ixx, iyy, ixy, bool(flag), shp["fwhm"], shp["e1"], shp["e2"],
                         shp["e"], limiting_magnitude(v, s["psf"]), float(ra), float(dec),
                         max(r.folded_at for r in c) if c else float("nan")))
        names = [n for n, _ in SUMMARY_COLUMNS]
        t = Table(rows=rows, names=names, dtype=[d for _, d in SUMMARY_COLUMNS]) if rows \
            else Table(names=names, dtype=[d for _, d in SUMMARY_COLUMNS])
        for col, unit in (("weight", "1/nJy2"), ("variance", "nJy2"), ("psf_ixx", "pix2"),
                          ("psf_iyy", "pix2"), ("psf_ixy", "pix2"), ("fwhm", "arcsec"),
                          ("limiting_mag", "mag"), ("ra", "deg"), ("dec", "deg"),
                          ("last_folded", "s")):
            t[col].unit = unit
        t.meta.update({"tract": self.id.tract, "patch": (self.id.x, self.id.y),
                       "band": self.band, "commit": self.commit})
        return t

    def _map(self, column: str, table: Table | None = None, fill=np.nan) -> np.ndarray:
        t = self.summary() if table is None else table
        kind = int if column in ("n_inputs", "n_fallback") else float
        out = np.full(self.shape, 0 if kind is int else fill, dtype=kind)
        for r in t:
            out[r["cell_y"], r["cell_x"]] = r[column]
        return out

    def depth_map(self) -> np.ndarray:
        """Number of inputs (of the group that makes the coadd) per cell, int array of shape
        (ny, nx) = (cells_per_patch, cells_per_patch), indexed ``[cell_y, cell_x]``; 0 for
        empty cells. Reads only the manifest and each cell's contributor list."""
        out = np.zeros(self.shape, int)
        for (cx, cy), gen in self.generations.items():
            n = self._count_inputs(cx, cy, gen)
            out[cy, cx] = n
        return out

    def _count_inputs(self, cx: int, cy: int, gen: int) -> int:
        got = self._state.store.read_current(CellId(self.id, cx, cy), self.band, gen,
                                             count_inputs)
        return 0 if got is None else got[1]

    def weight_map(self) -> np.ndarray:
        """Effective weight per cell: median over the inner box of ``sum_w`` (1/nJy²), i.e.
        the sum of the input weights; float array (ny, nx), NaN for empty cells."""
        return self._map("weight")

    def fwhm_map(self) -> np.ndarray:
        """Coadd PSF FWHM per cell (arcsec), NaN for empty cells."""
        return self._map("fwhm")

    def ellipticity_map(self) -> tuple[np.ndarray, np.ndarray]:
        """Coadd PSF ellipticity ``(e1, e2)`` per cell, NaN for empty cells."""
        t = self.summary()
        return self._map("e1", t), self._map("e2", t)

    def limiting_mag_map(self) -> np.ndarray:
        """5σ point-source limiting AB magnitude per cell, NaN for empty cells."""
        return self._map("limiting_mag")

    def contributors(self) -> Table:
        """Contributors of every populated cell (active group), with ``cell_x``,
        ``cell_y`` columns prepended; one row per (cell, input)."""
        parts = []
        for (cx, cy), gen in sorted(self.generations.items(), key=lambda kv: kv[0][::-1]):
            s = self._read_summary(cx, cy, gen)
            if s is None or not len(s["contributors"]):
                continue
            t = contributors_table(s["contributors"])
            t.add_column(cx, name="cell_x", index=0)
            t.add_column(cy, name="cell_y", index=1)
            parts.append(t)
        if not parts:
            return Table(names=["cell_x", "cell_y", "visit", "detector", "weight"],
                         dtype=[int, int, int, int, float])
        from astropy.table import vstack

        t = vstack(parts)
        t["weight"].unit = "1/nJy2"
        return t

    def stitched(self, mask_planes=("NO_DATA",)):
        """The patch as one :class:`astropy.nddata.CCDData` covering the patch outer box:
        each cell fills its inner box (edge cells also their outer border), as
        ``streamcoadd finalize`` writes it. ``data`` float32 nJy (NaN where empty), WCS of
        the box, ``uncertainty`` variance, ``flags`` the int32 mask bits, ``mask`` True
        where one of ``mask_planes`` is set. Reads one cell at a time."""
        from astropy.nddata import CCDData, VarianceUncertainty

        box = self.outer_box
        n_side = self.shape[0]
        planes = {"IMAGE": np.full(box.shape, np.nan, np.float32),
                  "MASK": np.full(box.shape, BIT["NO_DATA"], np.int32),
                  "VARIANCE": np.full(box.shape, np.inf, np.float32)}
        n = 0
        for cell in self.cells():
            try:
                c = cell.coadd
            except StateError:
                continue  # retracted to nothing since the manifest was read
            region = stitch_region(c.cell, c.inner_box, c.outer_box, n_side)
            dst = region.slices((box.x0, box.y0))
            src = region.slices((c.outer_box.x0, c.outer_box.y0))
            planes["IMAGE"][dst] = c.image[src]
            planes["MASK"][dst] = c.mask[src]
            planes["VARIANCE"][dst] = c.variance[src]
            cell._coadd = None  # keep memory bounded: one cell at a time
            n += 1
        bits = bitmask(mask_planes)
        meta = {"TRACT": self.id.tract, "PATCH_X": self.id.x, "PATCH_Y": self.id.y,
                "BAND": self.band, "NCELLS": n, "COMMIT": self.commit,
                "XY0_X": box.x0, "XY0_Y": box.y0}
        return CCDData(planes["IMAGE"], unit="nJy", wcs=self.wcs,
                       uncertainty=VarianceUncertainty(planes["VARIANCE"], unit="nJy2"),
                       mask=(planes["MASK"] & bits) != 0, flags=planes["MASK"], meta=meta)


class TractView:
    """One tract of the skymap: geometry, WCS and its populated patches."""

    def __init__(self, state: "State", tract_id: int):
        self._state = state
        self.id = tract_id
        self.geometry = state.skymap.tract(tract_id)

    def __repr__(self) -> str:
        return f"<TractView {self.id}>"

    @property
    def wcs(self) -> WCS:
        """The tract WCS (0-based tract pixels)."""
        return self.geometry.wcs()

    @property
    def inner_box(self) -> Box:
        return self.geometry.inner_box

    def bands(self) -> list[str]:
        return sorted({b for p, b in self._state.store.shard_keys() if p.tract == self.id})

    def patches(self, band: str) -> list[PatchView]:
        """Populated patches of this tract in ``band``."""
        return [PatchView(self._state, p, band) for p in self._state.patches(band)
                if p.tract == self.id]

    def patch(self, x: int, y: int, band: str) -> PatchView:
        return PatchView(self._state, PatchId(self.id, x, y), band)

    def cell_grid(self) -> tuple[int, int]:
        """Shape (ny, nx) of the tract's map of patch-inner cells."""
        g = self.geometry.cells
        return (self.geometry.num_patches[1] * g.cells_per_patch_inner,
                self.geometry.num_patches[0] * g.cells_per_patch_inner)

    def summary(self, band: str) -> Table:
        """``PatchView.summary()`` of every populated patch of the tract, stacked, with
        ``patch_x``, ``patch_y`` columns and ``inner`` (True for a patch-inner cell: those
        tile the tract without overlap; border cells repeat a neighbour's inner cell)."""
        from astropy.table import vstack

        g = self.geometry.cells
        n, b = g.cells_per_patch, g.cells_in_patch_border
        parts = []
        for p in self.patches(band):
            t = p.summary()
            t.add_column(p.id.x, name="patch_x", index=0)
            t.add_column(p.id.y, name="patch_y", index=1)
            t["inner"] = ((t["cell_x"] >= b) & (t["cell_x"] < n - b)
                          & (t["cell_y"] >= b) & (t["cell_y"] < n - b))
            parts.append(t)
        if not parts:
            names = ["patch_x", "patch_y"] + [c for c, _ in SUMMARY_COLUMNS] + ["inner"]
            dtypes = [int, int] + [d for _, d in SUMMARY_COLUMNS] + [bool]
            return Table(names=names, dtype=dtypes)
        t = vstack(parts, metadata_conflicts="silent")
        t.meta = {"tract": self.id, "band": band}
        return t

    def map_from_summary(self, table: Table, column: str) -> np.ndarray:
        """Place ``column`` of a ``summary()`` table on the tract grid of patch-inner cells
        (shape ``cell_grid()``, row = y): 0 / NaN where no cell."""
        g = self.geometry.cells
        k, b = g.cells_per_patch_inner, g.cells_in_patch_border
        kind = int if column in ("n_inputs", "n_fallback") else float
        out = np.full(self.cell_grid(), 0 if kind is int else np.nan, dtype=kind)
        for r in table:
            ix, iy = int(r["cell_x"]) - b, int(r["cell_y"]) - b
            if 0 <= ix < k and 0 <= iy < k:
                out[int(r["patch_y"]) * k + iy, int(r["patch_x"]) * k + ix] = r[column]
        return out

    def _tract_map(self, band: str, column: str) -> np.ndarray:
        return self.map_from_summary(self.summary(band), column)

    def depth_map(self, band: str) -> np.ndarray:
        """Inputs per cell over the tract (patch-inner cells), shape ``cell_grid()``."""
        return self._tract_map(band, "n_inputs")

    def weight_map(self, band: str) -> np.ndarray:
        return self._tract_map(band, "weight")

    def fwhm_map(self, band: str) -> np.ndarray:
        return self._tract_map(band, "fwhm")


# ---------------------------------------------------------------------------- priority
PRIORITIES = ("auto", "low", "normal")
READER_NICE = 19  # CPU: the lowest priority; a reader runs on what the writer leaves
_IOPRIO_CLASS_SHIFT = 13
_IOPRIO_CLASS_IDLE = 3  # served when the disk has nothing else to do (mq-deadline ages
_IOPRIO_READER = _IOPRIO_CLASS_IDLE << _IOPRIO_CLASS_SHIFT  # such requests: no starvation)
_IOPRIO_WHO_PROCESS = 1  # with a thread id: that thread
_SYS_IOPRIO = {"x86_64": (251, 252), "aarch64": (30, 31), "i686": (289, 290),
               "ppc64le": (273, 274), "s390x": (282, 283), "riscv64": (30, 31)}
_default_priority = "auto"
_lowered = {"depth": 0, "saved": None}
_prio_lock = threading.Lock()


def writer_holds_lock(root: str | Path) -> bool:
    """True if a process holds the state's writer lock (``STATE/lock``, an ``flock``).
    Read from ``/proc/locks``: no lock is taken or tested, so this can never delay a
    writer that is starting. Elsewhere than Linux: the daemon status file says running."""
    lock = Path(root) / "lock"
    try:
        st = os.stat(lock)
    except OSError:
        return False
    key = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
    try:
        with open("/proc/locks") as f:
            return any("FLOCK" in line and key in line.split() for line in f)
    except OSError:
        d = read_status(root)
        return bool(d and d.get("running"))


def _libc_syscall():
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.syscall
    except (OSError, AttributeError):
        return None


def _ioprio(tid: int, value: int | None = None) -> int | None:
    """ioprio_get / ioprio_set for one thread (Linux); None where unsupported."""
    nums = _SYS_IOPRIO.get(platform.machine())
    call = _libc_syscall() if nums else None
    if call is None:
        return None
    if value is None:
        r = call(nums[1], _IOPRIO_WHO_PROCESS, tid)
        return r if r >= 0 else None
    r = call(nums[0], _IOPRIO_WHO_PROCESS, tid, value)
    return value if r == 0 else None


def _threads() -> list[int]:
    """Every thread of this process (nice and ioprio are per thread on Linux; BLAS
    threads started at import would otherwise keep the normal priority)."""
    try:
        return [int(t) for t in os.listdir("/proc/self/task")]
    except OSError:
        return [0]


def _set_all(nice: int | None, ioprio: int | None, policy: int | None = None) -> None:
    for tid in _threads():
        if policy is not None and hasattr(os, "sched_setscheduler"):
            try:  # SCHED_IDLE: runs only on CPU time nothing else wants (weight 3 < nice 19)
                os.sched_setscheduler(tid, policy, os.sched_param(0))
            except OSError:
                pass
        if nice is not None:
            try:
                os.setpriority(os.PRIO_PROCESS, tid, nice)
            except OSError:  # lowering back needs privileges (RLIMIT_NICE / CAP_SYS_NICE)
                pass
        if ioprio is not None:
            _ioprio(tid, ioprio)


def current_priority() -> dict:
    """This thread's ``nice`` and I/O priority (``ioprio`` as the kernel encodes it)."""
    return {"nice": os.getpriority(os.PRIO_PROCESS, 0), "ioprio": _ioprio(0),
            "policy": os.sched_getscheduler(0) if hasattr(os, "sched_getscheduler") else None}


def set_default_priority(priority: str) -> None:
    """The ``priority`` that ``open_state`` uses when none is given (the CLI sets it
    from ``--priority``)."""
    global _default_priority
    if priority not in PRIORITIES:
        raise UserError(f"priority must be one of {', '.join(PRIORITIES)}, not {priority!r}")
    _default_priority = priority


def lower_priority_for(root: str | Path, priority: str | None = None) -> bool:
    """Apply a reader's priority policy for the state at ``root``; returns True if this
    call lowered the process (then :func:`restore_priority` undoes it)."""
    priority = priority or _default_priority
    if priority not in PRIORITIES:
        raise UserError(f"priority must be one of {', '.join(PRIORITIES)}, not {priority!r}")
    if priority == "normal" or (priority == "auto" and not writer_holds_lock(root)):
        return False
    with _prio_lock:
        if _lowered["depth"] == 0:
            saved = current_priority()
            _lowered["saved"] = saved
            _set_all(max(saved["nice"], READER_NICE), _IOPRIO_READER,
                     getattr(os, "SCHED_IDLE", None))
        _lowered["depth"] += 1
    return True


def restore_priority() -> None:
    """Undo one :func:`lower_priority_for`; the last one puts the saved priority back
    (as far as the system allows an unprivileged process to)."""
    with _prio_lock:
        if _lowered["depth"] == 0:
            return
        _lowered["depth"] -= 1
        if _lowered["depth"] == 0 and _lowered["saved"] is not None:
            saved, _lowered["saved"] = _lowered["saved"], None
            _set_all(saved["nice"], saved["ioprio"], saved["policy"])


class State:
    """A state opened for reading."""

    PRIORITY_CHECK_S = 2.0  # "auto": how often reads look again for a running writer

    def __init__(self, path: str | Path, priority: str | None = None):
        self.store = StateStore.open(path, write=False)
        self.root = self.store.root
        self.skymap = self.store.skymap
        self.fold = self.store.fold
        self._priority = priority or _default_priority
        try:
            self._lowered = lower_priority_for(self.root, self._priority)
        except BaseException:
            self.store.close()
            raise
        self._priority_checked = time.monotonic()

    def check_priority(self) -> None:
        """With ``priority="auto"``: a state kept open for long (a notebook) follows the
        writer -- lower the priority once a writer holds the state, restore it (as far as
        allowed) once none does. At most one look (a stat and ``/proc/locks``) per
        ``PRIORITY_CHECK_S`` seconds; called by the reads themselves."""
        if self._priority != "auto":
            return
        now = time.monotonic()
        if now - self._priority_checked < self.PRIORITY_CHECK_S:
            return
        self._priority_checked = now
        busy = writer_holds_lock(self.root)
        if busy and not self._lowered:
            self._lowered = lower_priority_for(self.root, "low")
        elif not busy and self._lowered:
            self._lowered = False
            restore_priority()

    def __repr__(self) -> str:
        return f"<State {self.root} skymap {self.skymap.name!r}>"

    def close(self) -> None:
        self.store.close()
        if getattr(self, "_lowered", False):
            self._lowered = False
            restore_priority()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def bands(self) -> list[str]:
        return sorted({band for _, band in self.store.shard_keys()})

    def patches(self, band: str | None = None) -> list[PatchId]:
        """Patches with at least one committed cell (in ``band`` if given)."""
        return sorted({p for p, b in self.store.shard_keys() if band in (None, b)})

    def tracts(self) -> list[TractView]:
        """Every tract of the skymap."""
        return [TractView(self, t) for t in sorted(self.skymap.tracts)]

    def tract(self, tract_id: int) -> TractView:
        return TractView(self, tract_id)

    def patch(self, patch: PatchId | tuple, band: str) -> PatchView:
        """One (patch, band): ``patch`` is a PatchId or a ``(tract, x, y)`` tuple."""
        if not isinstance(patch, PatchId):
            patch = PatchId(*(int(v) for v in patch))
        return PatchView(self, patch, band)

    def populated_cells(self, band: str, patch: PatchId | None = None) -> list[CellId]:
        self.check_priority()
        out = []
        for p, b in self.store.shard_keys():
            if b != band or patch not in (None, p):
                continue
            manifest = self.store.load_manifest(p, b)
            out += [CellId(p, x, y) for x, y in (manifest.cells if manifest else ())]
        return sorted(out)

    def cell(self, cell: CellId, band: str) -> CellCoadd | None:
        """The current coadd of one cell (reads only that cell), or None if empty."""
        self.check_priority()
        got = self.store.read_cell(cell, band)
        if got is None:
            return None
        acc, _ = got
        return coadd_cell(acc, band, self.skymap.tract(cell.patch.tract), self.fold)

    def depth_map(self, patch: PatchId, band: str) -> np.ndarray:
        """Number of inputs per cell, shape (cells_y, cells_x)."""
        return PatchView(self, patch, band).depth_map()

    def warps(self) -> Table:
        """Every warp the state has seen (the ledger) as a Table."""
        rows = self.store.ledger.warps()
        names = ["content_hash", "tract", "visit", "detector", "band", "path", "status",
                 "n_cells", "weight", "at"]
        return Table(rows=[tuple(r.__dict__.values()) for r in rows], names=names) if rows \
            else Table(names=names, dtype=[str, int, int, int, str, str, str, int, float, float])

    def rejections(self) -> Table:
        """Warps refused (ledger): ``path``, ``reason``, ``at`` (unix s)."""
        rows = self.store.ledger.rejections()
        names = ["path", "reason", "at"]
        return Table(rows=[tuple(r) for r in rows], names=names) if rows \
            else Table(names=names, dtype=[str, str, float])

    def events(self) -> Table:
        """Operator events (retractions, ...) from the ledger: ``kind``, ``detail``,
        ``at`` (unix s)."""
        rows = self.store.ledger.events()
        names = ["kind", "detail", "at"]
        return Table(rows=[tuple(r) for r in rows], names=names) if rows \
            else Table(names=names, dtype=[str, str, float])


def open_state(path: str | Path, priority: str | None = None) -> State:
    """Open a state directory for reading. See ``docs/analysis.md``.

    ``priority``: ``"auto"`` (default) lowers this process's CPU and I/O priority while
    the state has a running writer (the daemon), so that analysis never slows it down;
    ``"normal"`` leaves the priority alone; ``"low"`` always lowers it."""
    return State(path, priority)
