"""Turn accumulators into coadds (pure), and write them as FITS (SPEC §5).

Per cell (arrays of the cell outer shape)::

    image    = sum_wI / sum_w                 nJy
    variance = sum_w2var / sum_w**2           nJy^2
    psf      = psf_sum / psf_w                (psf_size, psf_size)
    maskfrac = sum_w_interp / sum_w           weight fraction that came from interpolation

Mask: the OR of the inputs' kept planes; a propagated plane (``SAT``) where its weight
fraction exceeds its threshold; ``INTRP`` where any weight was interpolated;
``INEXACT_PSF`` where the interpolated fraction exceeds ``inexact_psf_threshold``;
``NO_DATA`` (image NaN, variance inf) where no input has data.
"""

from __future__ import annotations

import io
import json
import math
import multiprocessing
import os
import threading
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path

import numpy as np
from astropy.io import fits
from astropy.table import Table

from streamcoadd.core.coadd import BIT, box_wcs, coadd_planes
from streamcoadd.core.config import FoldConfig
from streamcoadd.core.masks import CANONICAL_PLANES
from streamcoadd.core.skymap import Box, CellId, PatchId, Tract
from streamcoadd.io.lsst_images import (
    CellPlanes,
    ContributionRow,
    InputRow,
    PatchLayout,
    StitchedPlanes,
    day_obs,
    thin_polygon,
    write_cell_coadd,
)
from streamcoadd.store.cellfile import read_cell_file


def _wcs_header(tract: Tract, box: Box) -> fits.Header:
    h = box_wcs(tract, box).to_header()
    h["LTV1"], h["LTV2"] = -box.x0, -box.y0
    return h


def maskdef_table() -> Table:
    names = list(CANONICAL_PLANES)
    return Table({"MASK_NAME": names, "BIT_VALUE": [CANONICAL_PLANES[n] for n in names]})


def file_stem(patch: PatchId, band: str) -> str:
    return f"coadd_t{patch.tract}_p{patch.x}-{patch.y}_{band}"


# ------------------------------------------------------------------ patch finalize
#
# A patch is finalized cell by cell, streaming: each cell's accumulator is read, turned
# into its coadd, written straight into the output files and dropped, so memory stays
# bounded (a few cells) whatever the patch size. The ``CELLS`` table of the cells file is
# fixed-width, one row per cell, so row ``i`` lives at a known file offset and is written
# with one ``pwrite`` of a big-endian record (no astropy, no byte swapping afterwards).
# Work is handed out by rows of cells (same cell y): a row of cells fills one horizontal
# strip of each stitched plane, written with one ``pwrite`` per plane (a shared memory
# map of the file was tried: its page faults cost more than the writes). The headers and
# the small tables (``CELL``, ``VISIT``, ``MASKDEF``) are made by astropy exactly as
# before, so the files are the same bytes as the astropy writers produced (tested against
# the old implementation, tests/finalize_reference.py). Rows of cells are spread over
# worker processes (``fork``: HDF5 reading holds the GIL), and the patch's cell files are
# prefetched into the page cache (``POSIX_FADV_WILLNEED``, asynchronous) a bounded window
# ahead of the workers, so a cold read overlaps the computation.

FITS_BLOCK = 2880
CELLS_FORMAT = "streamcoadd-cells"  # the cells file's layout (SCFORMAT card)
CELLS_FORMAT_VERSION = 2  # 1: VERSION='0.8' and OCELL1/2 = border (before 0.x)
PREFETCH_CELLS = 64  # cell files prefetched ahead of the slowest finished cell
CELL_TABLE_COLUMNS = ["cell_x", "cell_y", "visit", "detector", "overlaps_center",
                      "overlap_fraction", "unmasked_overlap_fraction", "weight",
                      "psf_shape_ixx", "psf_shape_iyy", "psf_shape_ixy", "psf_shape_flag",
                      "fallback"]
CELL_TABLE_DTYPES = [np.int64, np.int64, np.int64, np.int64, bool, np.float64, np.float64,
                     np.float64, np.float64, np.float64, np.float64, bool, bool]
CELL_TABLE_DTYPE = np.dtype(list(zip(CELL_TABLE_COLUMNS, CELL_TABLE_DTYPES)))


def _padded(n: int) -> int:
    return -(-n // FITS_BLOCK) * FITS_BLOCK


def _primary_header(tract: Tract, patch: PatchId, band: str, skymap_name: str,
                    config: FoldConfig) -> fits.Header:
    g = tract.cells
    n = g.cells_per_patch
    origin = tract.cell_grid_origin(patch)
    ph = fits.Header(tract.wcs().to_header())
    # streamcoadd's own layout (docs/file-formats.md), not lsst.cell_coadds' (whose reader
    # needs a VISIT_SUMMARY HDU and other tables): no ``VERSION`` card claiming its format.
    # OCELL1/2 is the outer cell size (inner + 2 borders), as LSST's keyword means.
    ph.update({"SCFORMAT": CELLS_FORMAT, "SCFMTVER": CELLS_FORMAT_VERSION,
               "SKYMAP": skymap_name, "TRACT": patch.tract, "PATCH_X": patch.x,
               "PATCH_Y": patch.y, "FILTER": band, "BAND": band,
               "GRCELL1": g.inner, "GRCELL2": g.inner, "GRSHAPE1": n, "GRSHAPE2": n,
               "GRMIN1": origin[0], "GRMIN2": origin[1], "OCELL1": g.outer,
               "OCELL2": g.outer, "PSFSIZE1": config.psf_size, "PSFSIZE2": config.psf_size,
               "NNOISE": config.noise_realizations, "BUNIT": "nJy"})
    return ph


def cells_row_dtype(outer: int, config: FoldConfig) -> np.dtype:
    """One row of the ``CELLS`` table as a packed big-endian numpy record."""
    p = config.psf_size
    fields = [("cell_id", ">i2", (2,)), ("image", ">f4", (outer, outer)),
              ("mask", ">i4", (outer, outer)), ("variance", ">f4", (outer, outer)),
              ("psf", ">f8", (p, p)), ("maskfrac", ">f4", (outer, outer))]
    fields += [(f"noise_{i:02d}", ">f4", (outer, outer)) for i in range(config.noise_realizations)]
    return np.dtype(fields)


def _cells_hdu_header(tract: Tract, config: FoldConfig) -> fits.BinTableHDU:
    """The ``CELLS`` HDU without rows (its header is what the row data go under)."""
    g = tract.cells
    outer = g.outer
    npx = outer * outer
    dim = f"({outer},{outer})"
    psfdim = f"({config.psf_size},{config.psf_size})"
    cols = [fits.Column("cell_id", "2I"),
            fits.Column("image", f"{npx}E", dim=dim, unit="nJy"),
            fits.Column("mask", f"{npx}J", dim=dim),
            fits.Column("variance", f"{npx}E", dim=dim, unit="nJy2"),
            fits.Column("psf", f"{config.psf_size**2}D", dim=psfdim),
            fits.Column("maskfrac", f"{npx}E", dim=dim)]
    cols += [fits.Column(f"noise_{i:02d}", f"{npx}E", dim=dim, unit="nJy")
             for i in range(config.noise_realizations)]
    hdu = fits.BinTableHDU.from_columns(cols, nrows=0, name="CELLS")
    hdu.header.update({"INBBOX11": g.border, "INBBOX12": g.border + g.inner - 1,
                       "INBBOX21": g.border, "INBBOX22": g.border + g.inner - 1})
    return hdu


def _hdul_headers(hdus: list) -> list[fits.Header]:
    """The headers of ``hdus`` as astropy writes them in one file (``EXTEND`` set in the
    primary; the data given here are placeholders)."""
    fits.HDUList(hdus).update_extend()
    return [h.header for h in hdus]


def _set_card(header: fits.Header, key: str, value) -> None:
    header[key] = value  # fixed-width card: the header keeps its length


def _hbytes(header: fits.Header) -> bytes:
    return header.tostring().encode("ascii")


def _tables_bytes(contrib: np.ndarray, visits: list[tuple]) -> bytes:
    """``CELL`` (``contrib``: records of ``CELL_TABLE_DTYPE``), ``VISIT`` and ``MASKDEF``
    HDUs, as bytes to append to the cells file."""
    if len(contrib):
        cell_table = Table(contrib)
    else:
        cell_table = Table(names=["cell_x", "cell_y", "visit", "detector"],
                           dtype=[int, int, int, int])
    visit_table = Table(rows=visits, names=["visit", "instrument", "physical_filter", "mjd"]) \
        if visits else Table(names=["visit"], dtype=[int])
    prim = fits.PrimaryHDU()
    tail = [fits.table_to_hdu(cell_table), fits.table_to_hdu(visit_table),
            fits.table_to_hdu(maskdef_table())]
    for hdu, name in zip(tail, ["CELL", "VISIT", "MASKDEF"]):
        hdu.name = name
    buf = io.BytesIO()
    fits.HDUList([prim, *tail]).writeto(buf)
    return buf.getvalue()[len(_hbytes(prim.header)):]


def _visit_rows(contrib_visits) -> list[tuple]:
    """Distinct (visit, instrument, physical_filter, mjd), sorted; NaN MJDs (a warp
    without ``MJD-OBS``) compare equal, so a visit is listed once."""
    seen = {}
    for v, inst, filt, mjd in contrib_visits:
        key = (v, inst, filt, "nan" if math.isnan(mjd) else mjd)
        seen.setdefault(key, (v, inst, filt, mjd))
    return [seen[k] for k in sorted(seen, key=lambda k: (k[0], k[1], k[2],
                                                         isinstance(k[3], str),
                                                         0.0 if isinstance(k[3], str) else k[3]))]


def cell_generations(store, patch: PatchId, band: str, cells: list[CellId]) -> list[int | None]:
    """Each cell's generation in the shard's committed manifest, read once (None: not
    in it; :func:`read_for_coadd` then looks again)."""
    manifest = store.load_manifest(patch, band)
    return [None if manifest is None else manifest.generation(c.x, c.y) for c in cells]


def read_for_coadd(store, cell: CellId, band: str, gen: int | None):
    """What a coadd needs of one cell (its accumulator read ``for_coadd``), following a
    commit that superseded ``gen`` meanwhile; None if the cell has no input any more."""
    got = store.read_current(cell, band, gen, partial(read_cell_file, for_coadd=True))
    return None if got is None else got[1][0]


@dataclass
class _PatchJob:
    """Everything a worker needs to finalize a patch (inherited through fork)."""

    store: object  # StateStore, read-only
    band: str
    tract: Tract
    config: FoldConfig
    patch: PatchId
    cells: list[CellId]  # sorted: row i of the CELLS table is cells[i]
    gens: list[int | None]  # the generation of each cell in the manifest read at the start
    paths: list[Path]  # their files (prefetched into the page cache)
    tasks: list[list[int]]  # cell indices of one row of cells (same y), by x
    task_y: list[int]  # the cell row (y) of each task
    cells_fd: int
    data_start: int
    row_dtype: np.dtype
    patch_box: Box
    stitched_fd: int | None  # None: no stitched file
    plane_offsets: dict  # stitched plane name -> file offset of its data

    def read(self, i: int):
        """The accumulator of cell ``i`` (None if it has no input any more)."""
        return read_for_coadd(self.store, self.cells[i], self.band, self.gens[i])


_JOB: _PatchJob | None = None
_BUFFERS: dict = {}  # per process: reused row record and stitched strips


def _buffer(key, shape, dtype) -> np.ndarray:
    b = _BUFFERS.get(key)
    if b is None or b.shape != shape or b.dtype != dtype:
        b = _BUFFERS[key] = np.zeros(shape, dtype)
    return b


def _pwrite_all(fd: int, data, offset: int) -> None:
    mv = memoryview(data).cast("B")
    done = 0
    while done < len(mv):
        done += os.pwrite(fd, mv[done:], offset + done)


def _finalize_strip(t: int) -> list[tuple]:
    """Finalize the cells of task ``t`` of ``_JOB`` (one row of cells): write each cell's
    ``CELLS`` row, and the row's strip of each stitched plane. Returns per cell
    ``(i, contributor rows, visits)``, with ``None`` rows for a cell found empty."""
    job = _JOB
    tract, box = job.tract, job.patch_box
    idx = job.tasks[t]
    strips = None
    if job.stitched_fd is not None:
        strip = _stitch_region(tract, CellId(job.patch, 0, job.task_y[t]))
        strips = {name: _buffer(name, (strip.height, box.width), dtype)
                  for name, dtype, _ in STITCH_PLANES}
        for name, _, fill in STITCH_PLANES:
            strips[name][...] = fill
    row = _buffer("row", (1,), job.row_dtype)
    size = job.row_dtype.itemsize
    n_noise = job.config.noise_realizations
    out = []
    for i in idx:
        cell = job.cells[i]
        acc = job.read(i)
        sums = acc.active() if acc is not None else None
        if sums is None:
            out.append((i, None, None))
            continue
        f = {name: row[name][0] for name in row.dtype.names}  # views into the record
        f["cell_id"][...] = (cell.x, cell.y)
        p = coadd_planes(sums, job.config, out={
            "image": f["image"], "variance": f["variance"], "psf": f["psf"],
            "maskfrac": f["maskfrac"], "noise": [f[f"noise_{k:02d}"] for k in range(n_noise)]})
        f["mask"][...] = p["mask"]
        _pwrite_all(job.cells_fd, row.view(np.uint8), job.data_start + i * size)
        if strips is not None:
            region = _stitch_region(tract, cell)
            outer = tract.cell_outer_box(cell)
            src = region.slices((outer.x0, outer.y0))
            dst = region.slices((box.x0, strip.y0))
            for name, plane in (("IMAGE", "image"), ("MASK", "mask"),
                                ("VARIANCE", "variance"), ("MASKFRAC", "maskfrac")):
                strips[name][dst] = p[plane][src]
        out.append((i, np.array([(cell.x, cell.y, c.visit, c.detector, True,
                                  c.overlap_fraction, c.good_fraction, c.weight, c.psf_ixx,
                                  c.psf_iyy, c.psf_ixy, c.psf_flag, c.fallback)
                                 for c in sums.contributors], CELL_TABLE_DTYPE),
                    [(int(c.visit), str(c.instrument), str(c.physical_filter), float(c.mjd))
                     for c in sums.contributors]))
    if strips is not None:
        for name, _, _ in STITCH_PLANES:
            a = strips[name]
            _pwrite_all(job.stitched_fd, a,
                        job.plane_offsets[name] + (strip.y0 - box.y0) * a.strides[0])
    return out


def _stitch_region(tract: Tract, cell: CellId) -> Box:
    """The part of a cell that goes into the stitched patch: its inner box, grown to the
    outer box on the sides where the cell is on the patch edge (these regions tile the
    patch outer box)."""
    n = tract.cells.cells_per_patch
    inner, outer = tract.cell_inner_box(cell), tract.cell_outer_box(cell)
    return Box(outer.x0 if cell.x == 0 else inner.x0, outer.y0 if cell.y == 0 else inner.y0,
               outer.x1 if cell.x == n - 1 else inner.x1,
               outer.y1 if cell.y == n - 1 else inner.y1)


STITCH_PLANES = (("IMAGE", ">f4", np.nan), ("MASK", ">i4", BIT["NO_DATA"]),
                 ("VARIANCE", ">f4", np.inf), ("MASKFRAC", ">f4", 0.0))


def _stitched_headers(patch: PatchId, band: str, tract: Tract, ncells: int,
                      box: Box) -> list[fits.Header]:
    h = _wcs_header(tract, box)
    ph = fits.Header()
    ph.update({"TRACT": patch.tract, "PATCH_X": patch.x, "PATCH_Y": patch.y, "BAND": band,
               "NCELLS": ncells})
    hdus = [fits.PrimaryHDU(header=ph)]
    for name, dtype, _ in STITCH_PLANES:
        hh = h.copy()
        if name == "IMAGE":
            hh["BUNIT"] = "nJy"
        elif name == "VARIANCE":
            hh["BUNIT"] = "nJy2"
        else:
            for pname, b in CANONICAL_PLANES.items():
                hh[f"HIERARCH MP_{pname}"] = b
        hdus.append(fits.ImageHDU(np.zeros((1, 1), dtype), hh, name=name))
    headers = _hdul_headers(hdus)
    for hh in headers[1:]:
        _set_card(hh, "NAXIS1", box.width)
        _set_card(hh, "NAXIS2", box.height)
    return headers


def _prefetch(paths: list[Path], progress: list, window: int, stop: threading.Event) -> None:
    """Ask the kernel to read the cell files ahead (``WILLNEED`` is asynchronous), at
    most ``window`` files beyond the cells finished so far."""
    for i, path in enumerate(paths):
        while i >= progress[0] + window:
            if stop.wait(0.005):
                return
        if stop.is_set():
            return
        try:
            fd = os.open(path, os.O_RDONLY)
        except OSError:
            continue
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_WILLNEED)
        except OSError:
            pass
        finally:
            os.close(fd)


def default_workers() -> int:
    try:
        n = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        n = os.cpu_count() or 1
    return max(1, min(n, 4))


def _remove(path: Path) -> None:
    try:
        path.unlink()
    except FileNotFoundError:
        pass


# Long because one transaction: the output files, the workers and the prefetch are set up,
# run and torn down under one try/finally, so a failure leaves no partial file behind.
def finalize_patch(store, skymap_name: str, patch: PatchId, band: str, cells: list[CellId],
                   out_stem, stitched: bool = True, workers: int | None = None) -> int:
    """Finalize ``cells`` (populated cells of one patch and band) into
    ``{out_stem}_cells.fits`` and, if ``stitched``, ``{out_stem}_stitched.fits``
    (layouts: ``docs/file-formats.md``), streaming, with ``workers`` processes (default:
    the cores, at most 4). Returns the number of cells written (0: no file written).
    A cell whose input disappeared meanwhile (retraction) is left out."""
    global _JOB
    tract = store.skymap.tract(patch.tract)
    config = store.fold
    cells = sorted(cells)
    gens = cell_generations(store, patch, band, cells)
    paths = [store.cell_path(c, band, g or 0) for c, g in zip(cells, gens)]
    k = len(cells)
    n_side = tract.cells.cells_per_patch
    by_row: dict[int, list[int]] = {}
    for i, c in enumerate(cells):
        by_row.setdefault(c.y, []).append(i)
    rows_y = list(range(n_side)) if stitched else sorted(by_row)
    tasks = [sorted(by_row.get(y, []), key=lambda i: cells[i].x) for y in rows_y]
    workers = default_workers() if workers is None else max(1, int(workers))
    workers = min(workers, max(1, k // 8))  # forking is not worth it for a few cells
    row_dtype = cells_row_dtype(tract.cells.outer, config)
    size = row_dtype.itemsize

    cells_path, stitched_path = Path(f"{out_stem}_cells.fits"), Path(f"{out_stem}_stitched.fits")
    cells_tmp = cells_path.with_name(cells_path.name + ".part")
    stitched_tmp = stitched_path.with_name(stitched_path.name + ".part")
    cells_headers = _hdul_headers([
        fits.PrimaryHDU(header=_primary_header(tract, patch, band, skymap_name, config)),
        _cells_hdu_header(tract, config)])
    _set_card(cells_headers[1], "NAXIS2", k)
    data_start = sum(len(_hbytes(h)) for h in cells_headers)
    box = tract.patch_outer_box(patch)
    st_headers = _stitched_headers(patch, band, tract, k, box) if stitched else []
    offsets, pos = {}, 0
    for hh, (name, _, _) in zip(st_headers, (("", None, None), *STITCH_PLANES)):
        pos += len(_hbytes(hh))
        if name:
            offsets[name] = pos
            pos += _padded(box.width * box.height * 4)
    st_size = pos

    fd = os.open(cells_tmp, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
    sfd = None
    stop = threading.Event()
    pool = thread = None
    n = 0
    ok = False
    try:
        if stitched:
            sfd = os.open(stitched_tmp, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
        _JOB = _PatchJob(store=store, band=band, tract=tract, config=config, patch=patch,
                         cells=cells, gens=gens, paths=paths, tasks=tasks, task_y=rows_y, cells_fd=fd,
                         data_start=data_start, row_dtype=row_dtype, patch_box=box,
                         stitched_fd=sfd, plane_offsets=offsets)
        if workers > 1:
            pool = multiprocessing.get_context("fork").Pool(workers)
            results = pool.imap(_finalize_strip, range(len(tasks)))
        else:
            results = map(_finalize_strip, range(len(tasks)))
        progress = [0]
        if k > 1:
            order = [paths[i] for t in tasks for i in t]
            window = max(PREFETCH_CELLS, (workers + 2) * n_side)
            thread = threading.Thread(target=_prefetch, args=(order, progress, window, stop),
                                      name="finalize-prefetch", daemon=True)
            thread.start()
        got = []
        for r in results:
            got += r
            progress[0] += len(r)
        if pool is not None:
            pool.close()
            pool.join()
            pool = None
        got.sort(key=lambda r: r[0])
        present = [i for i, rows, _ in got if rows is not None]
        n = len(present)
        if n == 0:
            return 0
        if n < k:  # cells emptied meanwhile: close the gaps
            for new, old in enumerate(present):
                if new != old:
                    _pwrite_all(fd, os.pread(fd, size, data_start + old * size),
                                data_start + new * size)
            _set_card(cells_headers[1], "NAXIS2", n)
        end = data_start + n * size
        tail = _tables_bytes(np.concatenate([rows for _, rows, _ in got if rows is not None]),
                             _visit_rows(v for _, _, vs in got if vs for v in set(vs)))
        _pwrite_all(fd, b"".join(_hbytes(h) for h in cells_headers), 0)
        _pwrite_all(fd, b"\0" * (_padded(end) - end) + tail, end)
        os.ftruncate(fd, _padded(end) + len(tail))
        if stitched:
            _set_card(st_headers[0], "NCELLS", n)
            _pwrite_all(sfd, _hbytes(st_headers[0]), 0)
            for hh, (name, _, _) in zip(st_headers[1:], STITCH_PLANES):
                b = _hbytes(hh)
                _pwrite_all(sfd, b, offsets[name] - len(b))
            os.ftruncate(sfd, st_size)  # the zero padding of the last plane
        ok = True
    finally:
        stop.set()
        if pool is not None:
            pool.terminate()
            pool.join()
        if thread is not None:
            thread.join()
        _JOB = None
        os.close(fd)
        if sfd is not None:
            os.close(sfd)
        if ok:
            os.replace(cells_tmp, cells_path)
            if stitched:
                os.replace(stitched_tmp, stitched_path)
        else:
            _remove(cells_tmp)
            _remove(stitched_tmp)
    return n


# ------------------------------------------------------------------ Rubin CellCoadd export
#
# One lsst-images ``CellCoadd`` per patch and band (``streamcoadd.io.lsst_images``): the
# cells are read from the state one at a time, turned into their coadd and copied (inner
# box only: a CellCoadd holds inner cells) into the stitched planes; only the stitched
# planes, the PSF cube and the provenance rows are held (docs/file-formats.md).

LSST_FRACTIONS = ("interpolated", "saturated")  # Rubin mask_fractions names we write


@dataclass(frozen=True)
class ExportedCoadd:
    """One CellCoadd file written by :func:`export_cell_coadd`."""

    path: Path
    patch: PatchId
    patch_id: int  # lsst.skymap sequential id, nx * y + x
    band: str
    n_cells: int  # cells with data
    filters: tuple[tuple[str, str], ...]  # (instrument, physical_filter) of the inputs


def cellcoadd_name(patch: PatchId, band: str) -> str:
    """File name of a patch's CellCoadd: ``coadd_t{T}_p{X}-{Y}_{band}_cellcoadd.fits``."""
    return f"{file_stem(patch, band)}_cellcoadd.fits"


def patch_layout(tract: Tract, patch: PatchId, skymap_name: str):
    """The :class:`~streamcoadd.io.lsst_images.PatchLayout` of a patch: its whole cell
    grid (border cells included), from the cell grid origin."""
    g = tract.cells
    n = g.cells_per_patch
    return PatchLayout(skymap=skymap_name, tract=patch.tract, patch_xy=(patch.x, patch.y),
                       num_patches=tract.num_patches, tract_wcs=tract.wcs(),
                       tract_bbox=tract.inner_box, patch_inner_bbox=tract.patch_inner_box(patch),
                       cell_size=g.inner, n_cells=(n, n),
                       grid_origin=tract.cell_grid_origin(patch))


def fraction_names(config: FoldConfig) -> tuple[str, ...]:
    """The mask fractions a CellCoadd gets: ``interpolated`` (our maskfrac) always,
    ``saturated`` when the fold propagates the ``SAT`` plane's weight."""
    return LSST_FRACTIONS if "SAT" in config.propagate_thresholds else LSST_FRACTIONS[:1]


class _Provenance:
    """Provenance rows of one patch, gathered while its cells stream by."""

    def __init__(self, layout):
        self.layout = layout
        self.inputs: dict[tuple, dict] = {}  # (instrument, visit, detector) -> fields
        self.rows: list = []
        self.fallback_cells: list[str] = []

    def add_cell(self, i: int, j: int, contributors, group: str) -> None:
        if group == "fallback":
            self.fallback_cells.append(f"{i},{j}")
        for c in contributors:
            key = (c.instrument or "unknown", int(c.visit), int(c.detector))
            inp = self.inputs.setdefault(key, {
                "physical_filter": c.physical_filter, "mjd": c.mjd,
                "footprint": tuple(getattr(c, "footprint", ()) or ()),
                "hash": c.content_hash, "folded_at": c.folded_at, "cells": []})
            inp["cells"].append((i, j))
            self.rows.append(ContributionRow(
                cell_i=i, cell_j=j, instrument=key[0], visit=key[1], detector=key[2],
                overlaps_center=False, overlap_fraction=c.overlap_fraction,
                unmasked_fraction=c.good_fraction, weight=c.weight, psf_shape_xx=c.psf_ixx,
                psf_shape_yy=c.psf_iyy, psf_shape_xy=c.psf_ixy, psf_shape_flag=bool(c.psf_flag)))

    def _outline(self, inp: dict) -> tuple[tuple[tuple[float, float], ...], bool]:
        """The input's valid-pixel outline, or (a state without footprints) the convex
        hull of the inner boxes of the cells it contributes to; second: is a fallback."""
        if len(inp["footprint"]) >= 3:
            return inp["footprint"], False
        from scipy.spatial import ConvexHull

        c = self.layout.cell_size
        x0, y0 = self.layout.grid_origin
        pts = np.array([(x0 + j * c + dx - 0.5, y0 + i * c + dy - 0.5)
                        for i, j in inp["cells"] for dx in (0, c) for dy in (0, c)])
        hull = ConvexHull(pts)
        return tuple((float(pts[k, 0]), float(pts[k, 1])) for k in hull.vertices), True

    def tables(self, band: str) -> tuple[list, list, dict]:
        """``(inputs, contributions, metadata)``; ``overlaps_center`` is computed here:
        does the input's polygon contain the cell centre."""
        from lsst.images import Polygon

        inputs, polys, n_fallback, extra = [], {}, 0, {}
        for key, inp in sorted(self.inputs.items()):
            outline, fell_back = self._outline(inp)
            n_fallback += fell_back
            outline = thin_polygon(outline)
            inputs.append(InputRow(instrument=key[0], visit=key[1], detector=key[2],
                                   physical_filter=inp["physical_filter"] or band,
                                   day_obs=day_obs(inp["mjd"]), polygon=outline))
            xy = np.asarray(outline)
            polys[key] = Polygon(x_vertices=xy[:, 0], y_vertices=xy[:, 1])
            extra[f"{key[0]}/{key[1]}/{key[2]}"] = {"content_hash": inp["hash"],
                                                    "folded_at": inp["folded_at"]}
        rows = []
        for r in self.rows:
            x, y = self.layout.cell_centre(r.cell_i, r.cell_j)
            inside = bool(polys[(r.instrument, r.visit, r.detector)].contains(x=x, y=y))
            rows.append(replace(r, overlaps_center=inside))
        metadata = {
            "STREAMCOADD_POLYGONS": "footprint" if n_fallback == 0 else
            f"cell-union for {n_fallback} of {len(inputs)} inputs (state without footprints)",
            "STREAMCOADD_FALLBACK_CELLS": ";".join(self.fallback_cells),
            "STREAMCOADD_INPUTS": json.dumps(extra, sort_keys=True)}
        return inputs, rows, metadata


def _cell_planes(acc, tract: Tract, config: FoldConfig, layout):
    """The inner-box planes of one cell's coadd (``CellPlanes``), or None if empty."""
    sums = acc.active()
    if sums is None:
        return None, None
    p = coadd_planes(sums, config)
    cell = acc.cell
    sl = tract.cell_inner_box(cell).slices((acc.outer.x0, acc.outer.y0))
    fractions = {"interpolated": p["maskfrac"][sl]}
    if "saturated" in fraction_names(config):
        sat = sums.planes.get("SAT")
        sum_w = sums.sum_w[sl]
        with np.errstate(divide="ignore", invalid="ignore"):
            frac = np.zeros(sum_w.shape) if sat is None else np.divide(sat[sl], sum_w)
        fractions["saturated"] = np.where(sum_w > 0, frac, 0.0)
    rec = CellPlanes(i=cell.y, j=cell.x, image=p["image"][sl], variance=p["variance"][sl],
                     mask=p["mask"][sl], psf=p["psf"], mask_fractions=fractions,
                     noise=[n[sl] for n in p["noise"]])
    return rec, sums


def _stream_cells(store, tract: Tract, band: str, cells: list[CellId], layout,
                  prov: _Provenance):
    """Yield each populated cell's ``CellPlanes`` reading one cell file at a time
    (the manifest is read once; a cell superseded meanwhile is re-read through it)."""

    config = store.fold
    patch = cells[0].patch if cells else None
    gens = cell_generations(store, patch, band, cells) if patch else []
    for cell, gen in zip(cells, gens):
        acc = read_for_coadd(store, cell, band, gen)
        if acc is None:
            continue
        rec, sums = _cell_planes(acc, tract, config, layout)
        if rec is None:
            continue
        prov.add_cell(rec.i, rec.j, sums.contributors, acc.active_group())
        yield rec


def export_cell_coadd(store, skymap_name: str, patch: PatchId, band: str,
                      cells: list[CellId], out_dir, compression: str = "lossless") \
        -> ExportedCoadd | None:
    """Write the populated ``cells`` of one patch and band as a Rubin ``CellCoadd``
    (``out_dir / cellcoadd_name(patch, band)``, atomically), streaming the cells from the
    state. Returns what was written, or None when no cell had data (nothing written).
    Needs lsst-images (Python >= 3.12): raises ``UserError`` saying what to install."""
    tract = store.skymap.tract(patch.tract)
    config = store.fold
    layout = patch_layout(tract, patch, skymap_name)
    planes = StitchedPlanes(layout, CANONICAL_PLANES, fraction_names(config),
                            config.noise_realizations, config.psf_size)
    prov = _Provenance(layout)
    for rec in _stream_cells(store, tract, band, sorted(cells), layout, prov):
        planes.add(rec)
    if planes.n_present == 0:
        return None
    inputs, rows, metadata = prov.tables(band)
    cc = planes.to_cell_coadd(band, inputs, rows,
                              {**metadata, "STREAMCOADD_COMPRESSION": str(compression)})
    path = write_cell_coadd(cc, Path(out_dir) / cellcoadd_name(patch, band), compression)
    filters = tuple(sorted({(r.instrument, r.physical_filter) for r in inputs}))
    return ExportedCoadd(path=path, patch=patch, patch_id=layout.patch_id, band=band,
                         n_cells=planes.n_present, filters=filters)
