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
from h5py import h5a, h5d, h5g, h5s, h5t

from streamcoadd.core.fold import GROUPS, CellAccumulator, CellSums, Contributor
from streamcoadd.core.skymap import Box, CellId, PatchId
from streamcoadd.store import durable
from streamcoadd.store.durable import crash_point, fsync_file

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
    # column by column through tolist() (C speed): 3x faster than indexing rows, which
    # matters for cells with thousands of inputs (~2 ms per 1000 rows instead of ~6)
    cols = [arr[name].tolist() for name in CONTRIBUTOR_DTYPE.names]
    return [Contributor(visit=v, detector=d, weight=w, overlap_fraction=o, good_fraction=g,
                        fallback=bool(fb), psf_ixx=xx, psf_iyy=yy, psf_ixy=xy,
                        psf_flag=bool(pf), content_hash=h.decode(), folded_at=t,
                        instrument=ins.decode(), physical_filter=pfl.decode(), mjd=m)
            for v, d, w, o, g, fb, xx, yy, xy, pf, h, t, ins, pfl, m in zip(*cols)]


_STR = h5py.string_dtype("utf-8")


def _attr(oid, name: str, value) -> None:
    """Attribute through h5py's low-level API (2x cheaper than ``obj.attrs[name] = v``,
    and a commit writes some 20 000 of them); strings as variable-length UTF-8, as h5py's
    high-level API writes them."""
    arr = np.array(value, dtype=_STR) if isinstance(value, str) else np.asarray(value)
    tid = h5t.py_create(arr.dtype, logical=True)
    space = h5s.create(h5s.SCALAR) if arr.ndim == 0 else h5s.create_simple(arr.shape)
    h5a.create(oid, name.encode(), tid, space).write(arr)


def _dataset(gid, name: str, data: np.ndarray):
    """Contiguous dataset with a CRC-32 of its bytes in attribute ``crc32`` (half the cost
    of HDF5's Fletcher-32 filter here, and the layout stays plain). ``gid``: a low-level
    group or file id; returns the dataset's low-level id."""
    data = np.asarray(data)
    if not data.flags.c_contiguous:
        data = data.copy(order="C")  # (np.ascontiguousarray would make a scalar 1-D)
    space = h5s.create(h5s.SCALAR) if data.ndim == 0 else h5s.create_simple(data.shape)
    did = h5d.create(gid, name.encode(), h5t.py_create(data.dtype, logical=True), space)
    if data.size:
        did.write(h5s.ALL, h5s.ALL, data)
    _attr(did, "crc32", np.uint32(zlib.crc32(data)))
    return did


def encode_plane(plane: np.ndarray) -> tuple[str, np.ndarray]:
    """The smallest encoding of a 2-D plane: ``("constant", scalar)``,
    ``("sparse", table of (index, value))`` or ``("dense", plane)``."""
    flat = plane.reshape(-1)
    first = flat[0]
    if (flat == first).all():
        return "constant", np.array(first, plane.dtype)
    itemsize = plane.dtype.itemsize
    if np.count_nonzero(flat) * (INDEX_DTYPE.itemsize + itemsize) >= flat.size * itemsize:
        return "dense", plane
    index = np.flatnonzero(flat)
    table = np.empty(index.size, [("index", INDEX_DTYPE), ("value", plane.dtype)])
    table["index"] = index
    table["value"] = flat[index]
    return "sparse", table


def _plane(gid, name: str, plane: np.ndarray) -> None:
    encoding, data = encode_plane(plane)
    did = _dataset(gid, name, data)
    if encoding != "dense":
        _attr(did, "encoding", encoding)
        _attr(did, "shape", np.array(plane.shape, np.int64))


def _attrs_of(oid) -> dict:
    """Every attribute of a low-level object (strings as ``str``); 3x cheaper than
    ``dict(obj.attrs)``."""
    out = {}
    for i in range(h5a.get_num_attrs(oid)):
        aid = h5a.open(oid, index=i)
        arr = np.empty(aid.shape, aid.dtype)
        aid.read(arr, mtype=h5t.py_create(aid.dtype))
        v = arr[()]
        out[aid.name.decode()] = v.decode() if isinstance(v, bytes) else v
    return out


def _read_did(did, where: str) -> tuple[np.ndarray, dict]:
    """A dataset's data and attributes through the low-level API, CRC-32 checked; a
    mismatch raises ``OSError``."""
    data = np.empty(did.shape, did.dtype)
    if data.size:
        did.read(h5s.ALL, h5s.ALL, data)
    attrs = _attrs_of(did)
    want = attrs.get("crc32")
    if want is not None and zlib.crc32(data) != int(want):
        raise OSError(f"{where}: checksum mismatch; the file is corrupt "
                      "(run 'streamcoadd verify')")
    return data, attrs


def _read(gid, name: str, where: str) -> tuple[np.ndarray, dict]:
    return _read_did(h5d.open(gid, name.encode()), f"{where}/{name}")


def _decode(data: np.ndarray, attrs: dict, where: str) -> tuple[str, np.ndarray]:
    """``(encoding, plane)``: the plane decoded, except ``constant`` (its scalar)."""
    encoding = attrs.get("encoding", "dense")
    if encoding in ("dense", "constant"):
        return encoding, data
    if encoding == "sparse":
        out = np.zeros(tuple(int(v) for v in attrs["shape"]), data.dtype["value"])
        out.reshape(-1)[data["index"]] = data["value"]
        return encoding, out
    raise OSError(f"{where}: unknown plane encoding {encoding!r}")


def _full(encoding: str, data: np.ndarray, attrs: dict) -> np.ndarray:
    if encoding == "constant":
        return np.full(tuple(int(v) for v in attrs["shape"]), data, data.dtype)
    return data


def _plane_at(gid, name: str, where: str) -> np.ndarray:
    data, attrs = _read(gid, name, where)
    return _full(*_decode(data, attrs, f"{where}/{name}"), attrs)


def _optional_at(gid, name: str, where: str) -> np.ndarray | None:
    """A plane that is None in memory while all zero."""
    data, attrs = _read(gid, name, where)
    encoding, plane = _decode(data, attrs, f"{where}/{name}")
    if encoding == "constant" and plane == 0:
        return None
    return _full(encoding, plane, attrs)


def load_plane(d: h5py.Dataset) -> np.ndarray:
    """Read an encoded plane (an h5py dataset of a cell file) as a full array, checking
    its CRC-32 (``OSError`` on a mismatch)."""
    where = f"{d.file.filename}:{d.name}"
    data, attrs = _read_did(d.id, where)
    return _full(*_decode(data, attrs, where), attrs)


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
        for key, value in {
            "format": CELL_FORMAT, "version": CELL_VERSION, "band": band,
            "tract": c.patch.tract, "patch": (c.patch.x, c.patch.y), "cell": (c.x, c.y),
            "generation": generation,
            "outer_box": (acc.outer.x0, acc.outer.y0, acc.outer.x1, acc.outer.y1),
            "inner_box": (inner.x0, inner.y0, inner.x1, inner.y1),
            "active_group": acc.active_group() or "",
        }.items():
            _attr(f.id, key, value)
        for name in GROUPS:
            sums = acc.groups.get(name)
            if sums is None or not sums.contributors:
                continue
            g = h5g.create(f.id, name.encode())
            if sums.w_partial is None:
                did = _dataset(g, "sum_w", np.array(sums.w_full, np.float64))
                _attr(did, "encoding", "constant")
                _attr(did, "shape", np.array(sums.shape, np.int64))
            else:
                _plane(g, "sum_w", sums.sum_w)
            for ds in ("sum_wI", "sum_w2var", "sum_w_interp", "mask_or"):
                _plane(g, ds, getattr(sums, ds))
            _dataset(g, "noise", sums.noise)
            _dataset(g, "psf_sum", sums.psf_sum)
            _attr(g, "psf_w", np.float64(sums.psf_w))
            pg = h5g.create(g, b"planes")
            for pname, arr in sums.planes.items():
                _plane(pg, pname, arr)
            bg = h5g.create(g, b"bit_counts")
            for bit, arr in sums.bit_counts.items():
                _plane(bg, str(bit), arr)
            _dataset(g, "contributors", contributors_to_array(sums.contributors))
    with open(tmp, "wb") as out:
        out.write(buf.getbuffer())
    crash_point("cell-tmp-written")
    fsync_file(tmp)
    os.replace(tmp, path)
    crash_point("cell-renamed")


def read_cell_file(path: Path, for_coadd: bool = False) -> tuple[CellAccumulator, dict]:
    """Read a cell generation; returns the accumulator and the file attributes.
    ``for_coadd``: only what a coadd needs (the active group, without the per-bit mask
    counts; such an accumulator must not be folded into). Raises ``OSError`` (missing,
    unreadable, or checksum mismatch)."""
    try:
        f = h5py.File(path, "r", locking=False)
    except OSError as e:
        if not Path(path).exists():  # h5py reports a file deleted meanwhile as a stat error
            raise FileNotFoundError(2, "cell generation was superseded", str(path)) from e
        raise
    with f:
        attrs = _attrs_of(f.id)
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
        names = [attrs.get("active_group")] if for_coadd else GROUPS
        for name in names:
            if name and name in f:
                acc.groups[name] = _read_group(f[name], outer.shape, f"{path}:/{name}",
                                               bit_counts=not for_coadd)
    return acc, attrs


def _read_group(g: h5py.Group, shape: tuple[int, int], where: str,
                bit_counts: bool = True) -> CellSums:
    gid = g.id
    sum_w, w_attrs = _read(gid, "sum_w", where)
    encoding, sum_w = _decode(sum_w, w_attrs, f"{where}/sum_w")
    full = encoding == "constant"
    subgroup = {k: g[k].id for k in ("planes", "bit_counts")[:2 if bit_counts else 1]
                if k in g}
    return CellSums(
        shape=tuple(shape), sum_wI=_plane_at(gid, "sum_wI", where),
        sum_w2var=_plane_at(gid, "sum_w2var", where),
        noise=_read(gid, "noise", where)[0], psf_sum=_read(gid, "psf_sum", where)[0],
        psf_w=float(_attrs_of(gid)["psf_w"]),
        w_full=float(sum_w) if full else 0.0, w_partial=None if full else sum_w,
        interp=_optional_at(gid, "sum_w_interp", where),
        # with the counts, mask_or is derived from them (and equal to the stored one)
        mask_bits=None if bit_counts else _optional_at(gid, "mask_or", where),
        planes={k.decode(): _plane_at(subgroup["planes"], k.decode(), f"{where}/planes")
                for k in subgroup.get("planes", ())},
        bit_counts={int(k): _plane_at(subgroup["bit_counts"], k.decode(), f"{where}/bit_counts")
                    for k in subgroup.get("bit_counts", ())},
        contributors=contributors_from_array(_read(gid, "contributors", where)[0]))


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
    parent = os.getpid()
    for k in range(1, processes):
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:  # child: never returns
            os.close(r)
            _child_write(jobs[k::processes], w, parent)
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


def _child_write(jobs: list[tuple], report_fd: int, parent: int) -> None:
    status = 0
    try:
        # Stopping is the parent's business (Ctrl-C and systemd signal the whole group);
        # the child finishes its bounded share, or dies with the parent.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        _die_with_parent(parent)
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


def _die_with_parent(parent: int) -> None:
    try:
        libc = ctypes.CDLL(None)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass
    if os.getppid() != parent:  # the parent died before prctl took effect
        os._exit(1)
