"""Cell-based skymap geometry: tracts, patches and cells.

All boxes are in integer *tract pixel* coordinates (0-based, x along columns, y along
rows), half-open: ``x0 <= x < x1``.  The geometry follows LSST's ``CellTractBuilder``:

* patch ``(i, j)`` inner box starts at ``(i * P, j * P)`` with ``P = cells_per_patch_inner *
  cell_inner``; its outer box is the inner box grown by ``cells_in_patch_border * cell_inner +
  cell_border`` on every side and is **not** clipped to the tract (patch 0 starts at negative x);
* the cells of a patch tile the patch outer box eroded by ``cell_border``; each cell has an
  inner box of ``cell_inner`` px and an outer box grown by ``cell_border``.

Identifiers and boxes are frozen dataclasses so indices never travel as loose tuples.
"""

from __future__ import annotations

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from astropy.wcs import WCS

from streamcoadd.core.errors import UserError


@dataclass(frozen=True, order=True)
class Box:
    """Half-open integer pixel box ``[x0, x1) x [y0, y1)`` in tract pixels."""

    x0: int
    y0: int
    x1: int
    y1: int

    @property
    def width(self) -> int:
        return self.x1 - self.x0

    @property
    def height(self) -> int:
        return self.y1 - self.y0

    @property
    def shape(self) -> tuple[int, int]:
        """numpy shape ``(height, width)``."""
        return (self.height, self.width)

    @property
    def empty(self) -> bool:
        return self.width <= 0 or self.height <= 0

    def grown(self, n: int) -> "Box":
        return Box(self.x0 - n, self.y0 - n, self.x1 + n, self.y1 + n)

    def intersection(self, other: "Box") -> "Box":
        return Box(max(self.x0, other.x0), max(self.y0, other.y0),
                   min(self.x1, other.x1), min(self.y1, other.y1))

    def overlaps(self, other: "Box") -> bool:
        return not self.intersection(other).empty

    def contains(self, other: "Box") -> bool:
        return (self.x0 <= other.x0 and self.y0 <= other.y0
                and other.x1 <= self.x1 and other.y1 <= self.y1)

    def slices(self, origin: tuple[int, int] = (0, 0)) -> tuple[slice, slice]:
        """numpy ``(rows, cols)`` slices of this box in an array whose pixel (0, 0) is at
        tract pixel ``origin = (x, y)``."""
        ox, oy = origin
        return (slice(self.y0 - oy, self.y1 - oy), slice(self.x0 - ox, self.x1 - ox))


@dataclass(frozen=True, order=True)
class PatchId:
    tract: int
    x: int
    y: int

    def __str__(self) -> str:
        return f"tract {self.tract} patch {self.x},{self.y}"


@dataclass(frozen=True, order=True)
class CellId:
    patch: PatchId
    x: int
    y: int

    def __str__(self) -> str:
        return f"{self.patch} cell {self.x},{self.y}"


@dataclass(frozen=True)
class CellGeometry:
    """The sizes that make a skymap cell-based (pixels)."""

    inner: int = 150
    border: int = 50
    cells_per_patch_inner: int = 20
    cells_in_patch_border: int = 1

    @property
    def patch_inner(self) -> int:
        return self.inner * self.cells_per_patch_inner

    @property
    def patch_border(self) -> int:
        return self.inner * self.cells_in_patch_border + self.border

    @property
    def cells_per_patch(self) -> int:
        """Cells along one side of a patch (inner plus border cells)."""
        return self.cells_per_patch_inner + 2 * self.cells_in_patch_border

    @property
    def outer(self) -> int:
        return self.inner + 2 * self.border


@dataclass(frozen=True)
class Tract:
    """One tangent-plane projection with a grid of patches."""

    id: int
    ra: float  # deg, tract centre
    dec: float  # deg
    pixel_scale: float  # arcsec / px
    num_patches: tuple[int, int]  # (nx, ny)
    cells: CellGeometry

    @property
    def inner_box(self) -> Box:
        p = self.cells.patch_inner
        return Box(0, 0, self.num_patches[0] * p, self.num_patches[1] * p)

    def wcs(self) -> WCS:
        """The tract's TAN WCS for 0-based tract pixel coordinates (CRPIX is 1-based)."""
        box = self.inner_box
        w = WCS(naxis=2)
        w.wcs.ctype = ["RA---TAN", "DEC--TAN"]
        w.wcs.cunit = ["deg", "deg"]
        w.wcs.crval = [self.ra, self.dec]
        w.wcs.crpix = [(box.width - 1) / 2 + 1, (box.height - 1) / 2 + 1]
        s = self.pixel_scale / 3600.0
        w.wcs.cd = [[-s, 0.0], [0.0, s]]
        w.wcs.radesys = "ICRS"
        return w

    def patches(self) -> Iterator[PatchId]:
        for y in range(self.num_patches[1]):
            for x in range(self.num_patches[0]):
                yield PatchId(self.id, x, y)

    def patch_inner_box(self, patch: PatchId) -> Box:
        p = self.cells.patch_inner
        return Box(patch.x * p, patch.y * p, (patch.x + 1) * p, (patch.y + 1) * p)

    def patch_outer_box(self, patch: PatchId) -> Box:
        return self.patch_inner_box(patch).grown(self.cells.patch_border)

    def cell_grid_origin(self, patch: PatchId) -> tuple[int, int]:
        """Tract pixel of the inner-box corner of cell (0, 0) of ``patch``."""
        b = self.patch_outer_box(patch).grown(-self.cells.border)
        return (b.x0, b.y0)

    def cell_inner_box(self, cell: CellId) -> Box:
        ox, oy = self.cell_grid_origin(cell.patch)
        n = self.cells.inner
        return Box(ox + cell.x * n, oy + cell.y * n, ox + (cell.x + 1) * n, oy + (cell.y + 1) * n)

    def cell_outer_box(self, cell: CellId) -> Box:
        return self.cell_inner_box(cell).grown(self.cells.border)

    def cell_centre(self, cell: CellId) -> tuple[int, int]:
        """Centre pixel (x, y): inner minimum + inner // 2, as LSST (75 for 150 px)."""
        b = self.cell_inner_box(cell)
        return (b.x0 + self.cells.inner // 2, b.y0 + self.cells.inner // 2)

    def cells_of(self, patch: PatchId) -> Iterator[CellId]:
        n = self.cells.cells_per_patch
        for y in range(n):
            for x in range(n):
                yield CellId(patch, x, y)

    def patches_overlapping(self, box: Box) -> list[PatchId]:
        """Patches whose outer box overlaps ``box``."""
        return [p for p in self.patches() if self.patch_outer_box(p).overlaps(box)]

    def cells_overlapping(self, patch: PatchId, box: Box) -> list[CellId]:
        """Cells of ``patch`` whose inner box overlaps ``box``."""
        g = self.cells
        ox, oy = self.cell_grid_origin(patch)
        n = g.cells_per_patch
        xs = range(max(0, (box.x0 - ox) // g.inner), min(n, -(-(box.x1 - ox) // g.inner)))
        ys = range(max(0, (box.y0 - oy) // g.inner), min(n, -(-(box.y1 - oy) // g.inner)))
        return [CellId(patch, x, y) for y in ys for x in xs]


@dataclass(frozen=True)
class SkyMap:
    name: str
    cells: CellGeometry
    tracts: dict[int, Tract] = field(hash=False)

    def tract(self, tract_id: int) -> Tract:
        try:
            return self.tracts[tract_id]
        except KeyError:
            known = ", ".join(str(t) for t in sorted(self.tracts))
            raise UserError(f"tract {tract_id} is not in skymap {self.name!r} "
                            f"(tracts: {known})") from None

    def to_dict(self) -> dict:
        c = self.cells
        return {
            "skymap": {"name": self.name},
            "cells": {"inner": c.inner, "border": c.border,
                      "cells_per_patch_inner": c.cells_per_patch_inner,
                      "cells_in_patch_border": c.cells_in_patch_border},
            "tract": [{"id": t.id, "ra": t.ra, "dec": t.dec, "pixel_scale": t.pixel_scale,
                       "num_patches": list(t.num_patches)} for t in self.tracts.values()],
        }

    def to_toml(self) -> str:
        d = self.to_dict()
        c = d["cells"]
        lines = [f'[skymap]\nname = "{self.name}"\n', "[cells]"]
        lines += [f"{k} = {v}" for k, v in c.items()]
        for t in d["tract"]:
            lines += ["", "[[tract]]", f"id = {t['id']}", f"ra = {t['ra']!r}",
                      f"dec = {t['dec']!r}", f"pixel_scale = {t['pixel_scale']!r}",
                      f"num_patches = [{t['num_patches'][0]}, {t['num_patches'][1]}]"]
        return "\n".join(lines) + "\n"


def skymap_from_dict(d: dict, source: str = "skymap") -> SkyMap:
    """Build a :class:`SkyMap` from the parsed TOML structure (see ``config/*.toml``)."""
    if "cells" not in d:
        raise UserError(f"{source}: skymap is not cell-based (no [cells] table giving "
                        "inner, border, cells_per_patch_inner, cells_in_patch_border)")
    c = d["cells"]
    try:
        geom = CellGeometry(inner=int(c["inner"]), border=int(c.get("border", 50)),
                            cells_per_patch_inner=int(c["cells_per_patch_inner"]),
                            cells_in_patch_border=int(c.get("cells_in_patch_border", 1)))
    except KeyError as e:
        raise UserError(f"{source}: skymap is not cell-based: [cells] lacks {e.args[0]}") from None
    if geom.inner <= 0 or geom.border < 0 or geom.cells_per_patch_inner <= 0 \
            or geom.cells_in_patch_border < 0:
        raise UserError(f"{source}: [cells] sizes must be positive (border may be 0)")
    if geom.inner % 2:
        raise UserError(f"{source}: [cells] inner must be even so the cell centre is a pixel")
    tracts = {}
    for t in d.get("tract", []):
        try:
            tr = Tract(id=int(t["id"]), ra=float(t["ra"]), dec=float(t["dec"]),
                       pixel_scale=float(t.get("pixel_scale", 0.2)),
                       num_patches=(int(t["num_patches"][0]), int(t["num_patches"][1])),
                       cells=geom)
        except (KeyError, IndexError, TypeError, ValueError) as e:
            raise UserError(f"{source}: bad [[tract]] entry {t!r}: {e}") from None
        if tr.id in tracts:
            raise UserError(f"{source}: tract {tr.id} defined twice")
        if not (tr.pixel_scale > 0 and -90 < tr.dec < 90 and min(tr.num_patches) > 0):
            raise UserError(f"{source}: tract {tr.id} has a non-positive pixel scale or "
                            "patch count, or a pole/out-of-range dec")
        tracts[tr.id] = tr
    if not tracts:
        raise UserError(f"{source}: no [[tract]] defined")
    name = str(d.get("skymap", {}).get("name", "skymap"))
    return SkyMap(name=name, cells=geom, tracts=tracts)


def load_skymap(path: str | Path) -> SkyMap:
    """Read a skymap TOML file (format: ``docs/file-formats.md``)."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            d = tomllib.load(f)
    except FileNotFoundError:
        raise UserError(f"{path}: skymap file not found") from None
    except tomllib.TOMLDecodeError as e:
        raise UserError(f"{path}: not valid TOML: {e}") from None
    return skymap_from_dict(d, str(path))
