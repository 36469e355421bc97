"""Rubin ``lsst.images.cells.CellCoadd`` files (schema ``cell_coadd-1.0.0``), the format of
Data Preview 2's ``deep_coadd``, written from plain numpy / astropy inputs.

``lsst-images`` needs Python >= 3.12; it is imported inside the functions, so this module
imports everywhere and only the functions that need it say what to install
(:func:`require_lsst`). Layout of what is written: ``docs/file-formats.md``.

Conventions: every coordinate is a 0-based *tract pixel* (as astropy's ``pixel_to_world``
on the tract WCS and lsst-images' logical coordinates); boxes are
:class:`~streamcoadd.core.skymap.Box` (half-open, x first); a cell index is
``(i, j)`` = (row / y, column / x) of the patch cell grid, as Rubin's ``CellIJ``; patch ids
are sequential, ``nx * y + x`` (lsst.skymap).
"""

from __future__ import annotations

import hashlib
import importlib.util
import math
import os
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path

import numpy as np
from astropy.wcs import WCS

from streamcoadd.core.errors import UserError
from streamcoadd.core.skymap import Box
from streamcoadd.io.optional import require

INSTALL_HINT = ("--format lsst-images needs Python >= 3.12 and "
                "pip install 'streamcoadd[rubin]'")
# Fill values of cells without data: streamcoadd's NO_DATA convention (Rubin's legacy
# stitcher used image 0; NaN makes an empty cell impossible to mistake for sky)
MISSING_IMAGE = np.float32(np.nan)
MISSING_VARIANCE = np.float32(np.inf)
MAX_POLYGON_VERTICES = 255  # lsst-images stores the vertex count as uint8


class Compression(str, Enum):
    """How the pixel planes are compressed (FITS tile compression, one tile per cell)."""

    LOSSLESS = "lossless"  # GZIP_2 everywhere (lsst-images' default)
    NONE = "none"  # uncompressed
    LOSSY16 = "lossy16"  # Rubin's RICE_1 q=16 dithered on image, variance, noise


def require_lsst() -> None:
    """Raise :class:`UserError` with one line saying what to install when lsst-images
    (or the ``requests`` it imports when reading) is not importable."""
    require(("lsst.images", "lsst.images.cells"), INSTALL_HINT)
    # lsst-resources imports requests when a CellCoadd is read, without declaring it
    if importlib.util.find_spec("requests") is None:
        raise UserError(f"{INSTALL_HINT} (requests is missing)")


@dataclass(frozen=True)
class PatchLayout:
    """Where a patch's cells lie: the tract, its WCS and the cell grid (tract pixels)."""

    skymap: str
    tract: int
    patch_xy: tuple[int, int]  # (x, y) patch index
    num_patches: tuple[int, int]  # (nx, ny) patches of the tract
    tract_wcs: WCS  # 0-based tract pixels, as Tract.wcs()
    tract_bbox: Box
    patch_inner_bbox: Box
    cell_size: int  # inner cell side, px
    n_cells: tuple[int, int]  # (nx, ny) cells of the grid
    grid_origin: tuple[int, int]  # tract pixel of cell (0, 0)'s inner corner

    @property
    def patch_id(self) -> int:
        """lsst.skymap's sequential patch id, ``nx * y + x``."""
        return sequential_patch_id(self.patch_xy, self.num_patches)

    @property
    def grid_bbox(self) -> Box:
        x0, y0 = self.grid_origin
        return Box(x0, y0, x0 + self.n_cells[0] * self.cell_size,
                   y0 + self.n_cells[1] * self.cell_size)

    def cell_centre(self, i: int, j: int) -> tuple[float, float]:
        """Tract pixel ``(x, y)`` of the centre of cell ``(i, j)``: inner min + size // 2."""
        x0, y0 = self.grid_origin
        c = self.cell_size
        return (x0 + j * c + c // 2, y0 + i * c + c // 2)


@dataclass(frozen=True)
class CellPlanes:
    """One finalized cell: arrays of the cell *inner* box, shape ``(cell_size, cell_size)``.

    ``mask`` holds bits numbered as ``plane_bits`` of :func:`build_cell_coadd` says;
    ``mask_fractions`` maps a Rubin fraction name (``"interpolated"``, ``"saturated"``) to
    a plane; ``psf`` is ``(psf_size, psf_size)``; ``noise`` has one plane per realization.
    Image and noise in nJy, variance in nJy².
    """

    i: int
    j: int
    image: np.ndarray
    variance: np.ndarray
    mask: np.ndarray
    psf: np.ndarray
    mask_fractions: Mapping[str, np.ndarray] = field(default_factory=dict)
    noise: Sequence[np.ndarray] = ()


@dataclass(frozen=True)
class InputRow:
    """One contributing (visit, detector): its outline polygon in tract pixels, ``(x, y)``
    vertices (3 to 255; longer outlines are thinned, see :func:`thin_polygon`)."""

    instrument: str
    visit: int
    detector: int
    physical_filter: str
    day_obs: int  # YYYYMMDD, 0 if unknown
    polygon: tuple[tuple[float, float], ...]


@dataclass(frozen=True)
class ContributionRow:
    """One (cell, input) pair: Rubin's provenance contribution columns."""

    cell_i: int
    cell_j: int
    instrument: str
    visit: int
    detector: int
    overlaps_center: bool
    overlap_fraction: float
    unmasked_fraction: float
    weight: float  # 1/nJy²
    psf_shape_xx: float  # pix²
    psf_shape_yy: float
    psf_shape_xy: float
    psf_shape_flag: bool


def sequential_patch_id(patch_xy: tuple[int, int], num_patches: tuple[int, int]) -> int:
    """lsst.skymap ``getSequentialPatchIndexFromPair``: ``nx * y + x``."""
    x, y = patch_xy
    if not (0 <= x < num_patches[0] and 0 <= y < num_patches[1]):
        raise ValueError(f"patch {patch_xy} outside a {num_patches} patch grid")
    return num_patches[0] * y + x


def day_obs(mjd: float) -> int:
    """Rubin's ``day_obs`` of an observation at ``mjd``: the date (YYYYMMDD) of the
    observing day that starts at 12:00 UTC (dates in UTC-12h); 0 if ``mjd`` is NaN."""
    from astropy.time import Time

    if not math.isfinite(mjd):
        return 0
    return int(Time(mjd - 0.5, format="mjd", scale="utc").strftime("%Y%m%d"))


def thin_polygon(xy: Sequence[tuple[float, float]], limit: int = MAX_POLYGON_VERTICES):
    """At most ``limit`` vertices of a convex outline: every k-th vertex. Dropping a vertex
    of a convex polygon only shrinks it, so the thinned outline stays inside the original
    (a conservative footprint)."""
    xy = tuple(xy)
    if len(xy) <= limit:
        return xy
    step = -(-len(xy) // limit)
    return xy[::step]


def rubin_box(b: Box):
    """``lsst.images.Box`` of a streamcoadd :class:`Box` (lsst-images takes y first)."""
    from lsst.images import Box as LsstBox

    return LsstBox.factory[int(b.y0):int(b.y1), int(b.x0):int(b.x1)]


def rubin_mask_planes(plane_bits: Mapping[str, int]) -> list[tuple[str, int, object]]:
    """``[(our name, our bit, lsst.images.MaskPlane)]`` ordered by our bit, named with
    lsst-images' legacy maps (deep-coadd map last so its descriptions win): SAT ->
    SATURATED, INTRP -> INTERPOLATED, CR -> COSMIC_RAY, EDGE -> DETECTION_EDGE,
    UNMASKEDNAN -> UNMASKED_NAN, ...; a plane no map knows keeps its name."""
    from lsst import images

    lookup: dict = {}
    for get in (images.get_legacy_optional_mask_planes,
                images.get_legacy_difference_image_mask_planes,
                images.get_legacy_visit_image_mask_planes,
                images.get_legacy_non_cell_coadd_mask_planes,
                images.get_legacy_deep_coadd_mask_planes):
        lookup.update(get())
    out, seen = [], set()
    for name, bit in sorted(plane_bits.items(), key=lambda kv: kv[1]):
        plane = lookup.get(name) or images.MaskPlane(name, f"streamcoadd mask plane {name}.")
        if plane.name in seen or not 0 <= bit < 31:
            raise ValueError(f"mask plane {name!r} (bit {bit}) maps to a duplicate Rubin "
                             f"plane or lies outside int32")
        seen.add(plane.name)
        out.append((name, int(bit), plane))
    return out


def make_provenance(inputs: Sequence[InputRow], contributions: Sequence[ContributionRow]):
    """A ``CoaddProvenance`` (None without inputs). Every contribution must have its
    input row: ``CoaddProvenance.subset`` (bbox reads) joins on them."""
    from lsst.images import Polygon
    from lsst.images.cells import CoaddProvenance

    if not inputs:
        if contributions:
            raise ValueError("contributions given without inputs")
        return None
    tin = CoaddProvenance.make_empty_input_table(len(inputs))
    keys = {(r.instrument, int(r.visit), int(r.detector)) for r in inputs}
    if len(keys) != len(inputs):
        raise ValueError("duplicate (instrument, visit, detector) in the provenance inputs")
    for n, r in enumerate(inputs):
        for c in ("instrument", "visit", "detector", "physical_filter", "day_obs"):
            tin[c][n] = getattr(r, c)
        xy = np.asarray(thin_polygon(r.polygon), np.float64).reshape(-1, 2)
        if len(xy) < 3:
            raise ValueError(f"input {r.visit}/{r.detector}: polygon has < 3 vertices")
        tin["polygon"][n] = Polygon(x_vertices=xy[:, 0], y_vertices=xy[:, 1])
    tc = CoaddProvenance.make_empty_contribution_table(len(contributions))
    missing = {(c.instrument, int(c.visit), int(c.detector)) for c in contributions} - keys
    if missing:
        raise ValueError(f"contributions without an input row: {sorted(missing)[:3]}")
    for name in tc.colnames:  # column by column: ~15k rows per LSST patch
        values = [getattr(c, name) for c in contributions]
        tc[name][:] = values if tc[name].dtype == object else np.asarray(values, tc[name].dtype)
    return CoaddProvenance(tin, tc)


class StitchedPlanes:
    """The stitched planes of one CellCoadd under construction, allocated once and filled
    cell by cell (:meth:`add`); :meth:`to_cell_coadd` then makes the ``CellCoadd``.

    Memory: the float32 planes (image, variance, each fraction and noise plane, each
    ``layout.grid_bbox.shape``), a ``ceil(planes / 8)``-byte mask per pixel and the float64
    PSF cube ``(ny, nx, psf_size, psf_size)``; nothing per cell is kept. Cells never added
    are missing: image NaN, variance inf, ``NO_DATA``, no PSF.
    """

    def __init__(self, layout: PatchLayout, plane_bits: Mapping[str, int],
                 fraction_names: Sequence[str] = (), n_noise: int = 0, psf_size: int = 35):
        require_lsst()
        import astropy.units as u
        from lsst.images import Image, Mask, MaskPlane, MaskSchema

        bbox = rubin_box(layout.grid_bbox)
        shape = layout.grid_bbox.shape
        self.layout = layout
        self.planes = rubin_mask_planes(plane_bits)
        if not any(p.name == "NO_DATA" for _, _, p in self.planes):
            self.planes.append(("NO_DATA", -1, MaskPlane("NO_DATA", "No data.")))
        self.schema = MaskSchema([p for _, _, p in self.planes])  # uint8, as Rubin's
        self.image = Image(np.full(shape, MISSING_IMAGE), bbox=bbox, unit=u.nJy)
        self.variance = Image(np.full(shape, MISSING_VARIANCE), bbox=bbox, unit=u.nJy**2)
        self.mask = Mask(0, schema=self.schema, bbox=bbox)
        self.mask.set("NO_DATA")
        self.fractions = {k: Image(np.zeros(shape, np.float32), bbox=bbox)
                          for k in fraction_names}
        self.noise = [Image(np.full(shape, MISSING_IMAGE), bbox=bbox, unit=u.nJy)
                      for _ in range(n_noise)]
        nx, ny = layout.n_cells
        self.psf = np.full((ny, nx, psf_size, psf_size), np.nan, np.float64)
        self.present: set[tuple[int, int]] = set()

    def add(self, rec: CellPlanes) -> None:
        """Copy one cell into the stitched planes (cast to float32 in place)."""
        i, j = int(rec.i), int(rec.j)
        nx, ny = self.layout.n_cells
        if not (0 <= i < ny and 0 <= j < nx) or (i, j) in self.present:
            raise ValueError(f"cell (i={i}, j={j}) outside the {ny}x{nx} grid or given twice")
        if len(rec.noise) != len(self.noise) or not np.all(np.isfinite(rec.psf)):
            raise ValueError(f"cell (i={i}, j={j}): {len(rec.noise)} noise realizations "
                             f"(expected {len(self.noise)}) or a non-finite PSF")
        self.present.add((i, j))
        c = self.layout.cell_size
        ys, xs = slice(i * c, (i + 1) * c), slice(j * c, (j + 1) * c)
        self.image.array[ys, xs] = rec.image
        self.variance.array[ys, xs] = rec.variance
        cell_mask = self.mask.array[ys, xs]  # view (c, c, mask bytes)
        cell_mask[...] = 0
        src = np.asarray(rec.mask)
        for _, our_bit, plane in self.planes:
            if our_bit >= 0:
                b = self.schema.bit(plane.name)
                hit = ((src >> our_bit) & 1).astype(self.schema.dtype)
                cell_mask[..., b.index] |= hit * b.mask
        for k, img in self.fractions.items():
            if k in rec.mask_fractions:
                img.array[ys, xs] = rec.mask_fractions[k]
        for img, a in zip(self.noise, rec.noise):
            img.array[ys, xs] = a
        self.psf[i, j] = rec.psf

    @property
    def n_present(self) -> int:
        return len(self.present)

    def to_cell_coadd(self, band: str, inputs: Sequence[InputRow] = (),
                      contributions: Sequence[ContributionRow] = (),
                      metadata: Mapping[str, object] | None = None):
        """The ``lsst.images.cells.CellCoadd`` over the whole cell grid (shares this
        object's arrays). ``metadata`` values must be str, int, float, bool or None
        (lsst-images stores strict scalars)."""
        from lsst.images import YX, SkyProjection, TractFrame
        from lsst.images.cells import (
            CellCoadd,
            CellGrid,
            CellGridBounds,
            CellIJ,
            CellPointSpreadFunction,
            PatchDefinition,
        )

        layout = self.layout
        bbox = rubin_box(layout.grid_bbox)
        grid = CellGrid(bbox=bbox, cell_shape=YX(y=layout.cell_size, x=layout.cell_size))
        nx, ny = layout.n_cells
        missing = frozenset(CellIJ(i=i, j=j) for i in range(ny) for j in range(nx)
                            if (i, j) not in self.present)
        psf = CellPointSpreadFunction(self.psf, CellGridBounds(grid=grid, bbox=bbox,
                                                               missing=missing))
        frame = TractFrame(skymap=layout.skymap, tract=int(layout.tract),
                           bbox=rubin_box(layout.tract_bbox))
        # astropy's pixel coordinates are 0-based like lsst-images' logical ones
        projection = SkyProjection.from_fits_wcs(layout.tract_wcs, frame, x0=0, y0=0)
        patch = PatchDefinition(id=layout.patch_id,
                                index=YX(y=int(layout.patch_xy[1]), x=int(layout.patch_xy[0])),
                                inner_bbox=rubin_box(layout.patch_inner_bbox), cells=grid)
        cc = CellCoadd(self.image, mask=self.mask, variance=self.variance,
                       mask_fractions=self.fractions, noise_realizations=self.noise,
                       sky_projection=projection, band=band, psf=psf, patch=patch,
                       provenance=make_provenance(inputs, contributions))
        md = dict(metadata or {})
        bad = [k for k, v in md.items()
               if not (v is None or isinstance(v, (bool, int, float, str)))]
        if bad:
            raise TypeError(f"metadata {bad}: only str, int, float, bool or None are stored")
        cc.metadata = md
        return cc


def build_cell_coadd(layout: PatchLayout, band: str, cells: Iterable[CellPlanes], *,
                     plane_bits: Mapping[str, int], fraction_names: Sequence[str] = (),
                     n_noise: int = 0, psf_size: int = 35,
                     inputs: Sequence[InputRow] = (),
                     contributions: Sequence[ContributionRow] = (),
                     metadata: Mapping[str, object] | None = None):
    """Stitch ``cells`` (consumed one at a time) into an in-memory
    ``lsst.images.cells.CellCoadd`` covering the whole cell grid of ``layout``
    (:class:`StitchedPlanes` says what is held)."""
    st = StitchedPlanes(layout, plane_bits, fraction_names, n_noise, psf_size)
    for rec in cells:
        st.add(rec)
    return st.to_cell_coadd(band, inputs, contributions, metadata)


def compression_options(compression: Compression | str, seed_key: str):
    """``(options, seed)`` for ``CellCoadd.write``. Option names are those
    ``CellCoadd.serialize`` uses (``image`` also covers the noise realizations); lossy
    quantization needs a seed, derived from ``seed_key`` as the butler formatter does."""
    from lsst.images.fits import FitsCompressionOptions

    compression = Compression(compression)
    if compression is Compression.LOSSLESS:
        return None, None
    if compression is Compression.NONE:
        return {k: None for k in ("image", "mask", "variance", "mask_fractions", "psf")}, None
    digest = hashlib.md5(seed_key.encode(), usedforsecurity=False).digest()
    seed = 1 + int.from_bytes(digest, "big") % 9999
    lossy = FitsCompressionOptions.LOSSY  # RICE_1, SUBTRACTIVE_DITHER_2, q=16
    return {"image": lossy, "variance": lossy}, seed


def write_cell_coadd(cc, path: str | os.PathLike,
                     compression: Compression | str = Compression.LOSSLESS) -> Path:
    """Write a ``CellCoadd`` to ``path`` (``.fits``) atomically: a temporary file in the
    same directory (its name keeps ``.fits``: lsst-images picks the format from the
    suffix and refuses existing files), fsynced, then renamed over ``path``."""
    path = Path(path)
    if path.suffix != ".fits":
        raise ValueError(f"{path}: CellCoadd files must end in .fits")
    options, seed = compression_options(
        compression, f"{cc.skymap}/{cc.tract}/{cc.patch.id}/{cc.band}")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=".part.fits", dir=path.parent)
    os.close(fd)
    os.unlink(tmp)  # lsst-images refuses an existing file
    try:
        cc.write(tmp, compression_options=options, compression_seed=seed)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def summary_line(path: str | os.PathLike) -> str:
    """One line describing a CellCoadd file, read back with ``CellCoadd.read``."""
    require_lsst()
    from lsst.images.cells import CellCoadd

    cc = CellCoadd.read(str(path))
    size = cc.psf.bounds.grid.grid_size
    n_cells = size.i * size.j
    n_missing = len(cc.psf.bounds.missing)
    n_inputs = len(cc.provenance.inputs) if _has_provenance(cc) else 0
    grid = f"{n_cells - n_missing}/{n_cells} cells with data"
    return (f"{Path(path).name}: CellCoadd {cc.skymap} tract {cc.tract} patch {cc.patch.id} "
            f"band {cc.band}, {cc.image.array.shape[1]}x{cc.image.array.shape[0]} px "
            f"{cc.image.unit}, {grid}, {n_inputs} inputs")


def _has_provenance(cc) -> bool:
    try:
        cc.provenance  # noqa: B018  (raises AttributeError when the coadd has none)
    except AttributeError:
        return False
    return True
