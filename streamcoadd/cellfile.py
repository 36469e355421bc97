"""One cell generation as an HDF5 file (layout: ``docs/state-format.md``).

A cell file is written once, closed, fsynced and renamed into place; it is never modified
afterwards, so a reader always sees it whole. Every dataset carries a CRC-32 of its bytes
(attribute ``crc32``), checked on every read.

Version 2 stores each image-like plane in the smallest of three encodings (attribute
``encoding``): ``dense`` (the array), ``constant`` (a scalar; typical for ``sum_w``) or
``sparse`` (a table of flat index and value of the non-zero pixels; typical for the
interpolated-weight, mask and per-bit count planes). That makes a cell file about 2.5x
smaller than version 1 (all dense), which version 2 readers still read.
"""

from __future__ import annotations

import ctypes
import io
import os
import signal
import zlib
from pathlib import Path

import h5py
import numpy as np

from . import durable
from .durable import crash_point, fsync_file
from .fold import GROUPS, CellAccumulator, CellSums, Contributor
from .skymap import Box, CellId, PatchId

CELL_FORMAT = "streamcoadd-cell"
CELL_VERSION = 2
READABLE_VERSIONS = (1, 2)

CONTRIBUTOR_DTYPE = np.dtype([
    ("visit", "<i8"), ("detector", "<i8"), ("weight", "<f8"),
    ("overlap_fraction", "<f8"), ("good_fraction", "<f8"), ("fallback", "u1"),
    ("psf_ixx", "<f8"), ("psf_iyy", "<f8"), ("psf_ixy", "<f8"), ("psf_flag", "u1"),
    ("content_hash", "S64"), ("folded_at", "<f8"), ("instrument", "S32"),
    ("physical_filter", "S32"), ("mjd", "<f8"),
])

PLANE_DATASETS = ("sum_w", "sum_wI", "sum_w2var", "sum_w_interp", "mask_or")
INDEX_DTYPE = np.dtype("<i4")


def contributors_to_array(rows: list[Contributor]) -> np.ndarray:
    out = np.zeros(len(rows), CONTRIBUTOR_DTYPE)
    for i, c in enumerate(rows):
        out[i] = (c.visit, c.detector, c.weight, c.overlap_fraction, c.good_fraction,
                  c.fallback, c.psf_ixx, c.psf_iyy, c.psf_ixy, c.psf_flag,
                  c.content_hash.encode(), c.folded_at, c.instrument.encode()[:32],
                  c.physical_filter.encode()[:32], c.mjd)
    return out


def contributors_from_array(arr: np.ndarray) -> list[Contributor]:
    return [Contributor(visit=int(r["visit"]), detector=int(r["detector"]),
                        weight=float(r["weight"]), overlap_fraction=float(r["overlap_fraction"]),
                        good_fraction=float(r["good_fraction"]), fallback=bool(r["fallback"]),
                        psf_ixx=float(r["psf_ixx"]), psf_iyy=float(r["psf_iyy"]),
                        psf_ixy=float(r["psf_ixy"]), psf_flag=bool(r["psf_flag"]),
                        content_hash=r["content_hash"].decode(), folded_at=float(r["folded_at"]),
                        instrument=r["instrument"].decode(),
                        physical_filter=r["physical_filter"].decode(), mjd=float(r["mjd"]))
            for r in arr]


def _dataset(g: h5py.Group, name: str, data: np.ndarray) -> h5py.Dataset:
    """Contiguous dataset with a CRC-32 of its bytes in attribute ``crc32`` (half the cost
    of HDF5's Fletcher-32 filter here, and the layout stays plain)."""
    data = np.asarray(data)
    if not data.flags.c_contiguous:
        data = data.copy(order="C")  # (np.ascontiguousarray would make a scalar 1-D)
    d = g.create_dataset(name, data=data)
    d.attrs["crc32"] = np.uint32(zlib.crc32(data))
    return d


def encode_plane(plane: np.ndarray) -> tuple[str, np.ndarray]:
    """The smallest encoding of a 2-D plane: ``("constant", scalar)``,
    ``("sparse", table of (index, value))`` or ``("dense", plane)``."""
    flat = plane.reshape(-1)
    first = flat[0]
    if (flat == first).all():
        return "constant", np.array(first, plane.dtype)
    index = np.flatnonzero(flat)
    itemsize = plane.dtype.itemsize
    if index.size * (INDEX_DTYPE.itemsize + itemsize) >= flat.size * itemsize:
        return "dense", plane
    table = np.empty(index.size, [("index", INDEX_DTYPE), ("value", plane.dtype)])
    table["index"] = index
    table["value"] = flat[index]
    return "sparse", table


def _plane(g: h5py.Group, name: str, plane: np.ndarray) -> None:
    encoding, data = encode_plane(plane)
    d = _dataset(g, name, data)
    if encoding != "dense":
        d.attrs["encoding"] = encoding
        d.attrs["shape"] = np.array(plane.shape, np.int64)


def _load(d: h5py.Dataset) -> np.ndarray:
    """Read a dataset and check its CRC-32; a mismatch raises ``OSError``."""
    data = d[()]
    want = d.attrs.get("crc32")
    if want is not None and zlib.crc32(np.ascontiguousarray(data)) != int(want):
        raise OSError(f"{d.file.filename}: checksum mismatch in {d.name}; the file is "
                      "corrupt (run 'streamcoadd verify')")
    return data


def _load_plane(d: h5py.Dataset) -> tuple[str, np.ndarray]:
    """Read an encoded plane; returns ``(encoding, plane)`` with the plane decoded
    (for ``constant`` the scalar itself, as a 0-d array)."""
    data = _load(d)
    encoding = d.attrs.get("encoding", "dense")
    if isinstance(encoding, bytes):
        encoding = encoding.decode()
    if encoding == "dense":
        return encoding, data
    shape = tuple(int(v) for v in d.attrs["shape"])
    if encoding == "constant":
        return encoding, np.asarray(data)
    if encoding == "sparse":
        out = np.zeros(shape, data.dtype["value"])
        out.reshape(-1)[data["index"]] = data["value"]
        return encoding, out
    raise OSError(f"{d.file.filename}: unknown encoding {encoding!r} of {d.name}")


def load_plane(d: h5py.Dataset) -> np.ndarray:
    """Read an encoded plane as a full array (any encoding)."""
    encoding, data = _load_plane(d)
    if encoding == "constant":
        return np.full(tuple(int(v) for v in d.attrs["shape"]), data, data.dtype)
    return data


def _optional(d: h5py.Dataset) -> np.ndarray | None:
    """A plane that is None in memory while all zero."""
    encoding, data = _load_plane(d)
    if encoding == "constant":
        return None if data == 0 else np.full(tuple(int(v) for v in d.attrs["shape"]),
                                              data, data.dtype)
    return data


def write_cell_file(path: Path, acc: CellAccumulator, band: str, generation: int,
                    inner: Box) -> None:
    """Write ``acc`` to ``path`` durably: ``path.tmp``, fsync, rename (the caller fsyncs
    the directory once for all the cells of a commit)."""
    tmp = path.with_name(path.name + ".tmp")
    # The file is built in memory and written with plain writes: HDF5 writing into a file
    # on a full disk fails in its destructors (and h5py may segfault); a Python write
    # fails with a clean OSError (ENOSPC) that the commit turns into a clear message.
    buf = io.BytesIO()
    with h5py.File(buf, "w") as f:
        c = acc.cell
        f.attrs.update({
            "format": CELL_FORMAT, "version": CELL_VERSION, "band": band,
            "tract": c.patch.tract, "patch": (c.patch.x, c.patch.y), "cell": (c.x, c.y),
            "generation": generation,
            "outer_box": (acc.outer.x0, acc.outer.y0, acc.outer.x1, acc.outer.y1),
            "inner_box": (inner.x0, inner.y0, inner.x1, inner.y1),
            "active_group": acc.active_group() or "",
        })
        for name in GROUPS:
            sums = acc.groups.get(name)
            if sums is None or not sums.contributors:
                continue
            g = f.create_group(name)
            if sums.w_partial is None:
                d = _dataset(g, "sum_w", np.array(sums.w_full, np.float64))
                d.attrs["encoding"] = "constant"
                d.attrs["shape"] = np.array(sums.shape, np.int64)
            else:
                _plane(g, "sum_w", sums.sum_w)
            for ds in ("sum_wI", "sum_w2var", "sum_w_interp", "mask_or"):
                _plane(g, ds, getattr(sums, ds))
            _dataset(g, "noise", sums.noise)
            _dataset(g, "psf_sum", sums.psf_sum)
            g.attrs["psf_w"] = sums.psf_w
            pg = g.create_group("planes")
            for pname, arr in sums.planes.items():
                _plane(pg, pname, arr)
            bg = g.create_group("bit_counts")
            for bit, arr in sums.bit_counts.items():
                _plane(bg, str(bit), arr)
            _dataset(g, "contributors", contributors_to_array(sums.contributors))
    with open(tmp, "wb") as out:
        out.write(buf.getbuffer())
    crash_point("cell-tmp-written")
    fsync_file(tmp)
    os.replace(tmp, path)
    crash_point("cell-renamed")


def read_cell_file(path: Path) -> tuple[CellAccumulator, dict]:
    """Read a cell generation; returns the accumulator and the file attributes.
    Raises ``OSError`` (missing, unreadable, or checksum mismatch)."""
    try:
        f = h5py.File(path, "r", locking=False)
    except OSError as e:
        if not Path(path).exists():  # h5py reports a file deleted meanwhile as a stat error
            raise FileNotFoundError(2, "cell generation was superseded", str(path)) from e
        raise
    with f:
        attrs = dict(f.attrs)
        if attrs.get("format") != CELL_FORMAT:
            raise OSError(f"{path}: not a streamcoadd cell file")
        if int(attrs.get("version", -1)) not in READABLE_VERSIONS:
            raise OSError(f"{path}: cell format version {attrs.get('version')} is not "
                          f"one of {READABLE_VERSIONS}; upgrade streamcoadd")
        t = int(attrs["tract"])
        px, py = (int(v) for v in attrs["patch"])
        cx, cy = (int(v) for v in attrs["cell"])
        outer = Box(*(int(v) for v in attrs["outer_box"]))
        acc = CellAccumulator(cell=CellId(PatchId(t, px, py), cx, cy), outer=outer)
        for name in GROUPS:
            if name not in f:
                continue
            g = f[name]
            acc.groups[name] = _read_group(g, outer.shape)
    return acc, attrs


def _read_group(g: h5py.Group, shape: tuple[int, int]) -> CellSums:
    encoding, sum_w = _load_plane(g["sum_w"])
    full = encoding == "constant"
    return CellSums(
        shape=tuple(shape), sum_wI=load_plane(g["sum_wI"]), sum_w2var=load_plane(g["sum_w2var"]),
        noise=_load(g["noise"]), psf_sum=_load(g["psf_sum"]), psf_w=float(g.attrs["psf_w"]),
        w_full=float(sum_w) if full else 0.0, w_partial=None if full else sum_w,
        interp=_optional(g["sum_w_interp"]), mask_bits=_optional(g["mask_or"]),
        planes={k: load_plane(v) for k, v in g["planes"].items()},
        bit_counts={int(k): load_plane(v) for k, v in g["bit_counts"].items()},
        contributors=contributors_from_array(_load(g["contributors"])))


def write_cells_parallel(jobs: list[tuple], processes: int = 2) -> None:
    """:func:`write_cell_file` for every job, spread over ``processes`` processes.

    Encoding HDF5 is CPU-bound and h5py serializes every call, so threads cannot share it;
    forked children can (they see the accumulators as they are at the fork, copy-on-write,
    and only read them). Each child writes every ``processes``-th job and exits; the
    parent writes its share and waits. A child dies with its parent (PR_SET_PDEATHSIG),
    and it holds the parent's state lock while it lives, so no new writer can start while
    an orphan still writes. The first error (in any process) is raised as ``OSError``."""
    if processes < 2 or len(jobs) < 2 or not hasattr(os, "fork"):
        for job in jobs:
            write_cell_file(*job)
        return
    children = []
    for k in range(1, processes):
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:  # child: never returns
            os.close(r)
            _child_write(jobs[k::processes], w)
        os.close(w)
        children.append((pid, r))
    error = None
    try:
        for job in jobs[0::processes]:
            write_cell_file(*job)
    except OSError as e:
        error = e
    finally:
        for pid, r in children:
            with os.fdopen(r, "rb") as f:
                report = f.read().decode(errors="replace")
            _, status = os.waitpid(pid, 0)
            if error is None and status != 0:
                errno_, _, text = report.partition(" ")
                error = OSError(int(errno_) if errno_.isdigit() else 5,
                                text or f"cell writer process {pid} failed (status {status})")
    if error is not None:
        raise error


def _child_write(jobs: list[tuple], report_fd: int) -> None:
    status = 0
    try:
        _die_with_parent()
        durable.in_child_writer = True
        for job in jobs:
            write_cell_file(*job)
    except BaseException as e:  # noqa: BLE001  (reported to the parent, which raises)
        status = 1
        errno_ = getattr(e, "errno", None) or 5
        text = getattr(e, "strerror", None) or str(e) or type(e).__name__
        fn = getattr(e, "filename", None)
        os.write(report_fd, f"{errno_} {text}{f': {fn}' if fn else ''}".encode())
    finally:
        os._exit(status)


def _die_with_parent() -> None:
    try:
        libc = ctypes.CDLL(None)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass
    if os.getppid() == 1:  # the parent is already gone
        os._exit(1)
