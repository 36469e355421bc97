"""One cell generation as an HDF5 file (layout: ``docs/state-format.md``).

A cell file is written once, closed, fsynced and renamed into place; it is never modified
afterwards, so a reader always sees it whole. Every dataset carries a CRC-32 of its bytes
(attribute ``crc32``), checked on every read.
"""

from __future__ import annotations

import io
import os
import zlib
from pathlib import Path

import h5py
import numpy as np

from .durable import crash_point, fsync_file
from .fold import GROUPS, CellAccumulator, CellSums, Contributor
from .skymap import Box, CellId, PatchId

CELL_FORMAT = "streamcoadd-cell"
CELL_VERSION = 1

CONTRIBUTOR_DTYPE = np.dtype([
    ("visit", "<i8"), ("detector", "<i8"), ("weight", "<f8"),
    ("overlap_fraction", "<f8"), ("good_fraction", "<f8"), ("fallback", "u1"),
    ("psf_ixx", "<f8"), ("psf_iyy", "<f8"), ("psf_ixy", "<f8"), ("psf_flag", "u1"),
    ("content_hash", "S64"), ("folded_at", "<f8"), ("instrument", "S32"),
    ("physical_filter", "S32"), ("mjd", "<f8"),
])

PLANE_DATASETS = ("sum_w", "sum_wI", "sum_w2var", "sum_w_interp", "mask_or")


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


def _dataset(g: h5py.Group, name: str, data: np.ndarray) -> None:
    """Contiguous dataset with a CRC-32 of its bytes in attribute ``crc32`` (half the cost
    of HDF5's Fletcher-32 filter here, and the layout stays plain)."""
    data = np.ascontiguousarray(data)
    d = g.create_dataset(name, data=data)
    d.attrs["crc32"] = np.uint32(zlib.crc32(data))


def _load(d: h5py.Dataset) -> np.ndarray:
    """Read a dataset and check its CRC-32; a mismatch raises ``OSError``."""
    data = d[()]
    want = d.attrs.get("crc32")
    if want is not None and zlib.crc32(np.ascontiguousarray(data)) != int(want):
        raise OSError(f"{d.file.filename}: checksum mismatch in {d.name}; the file is "
                      "corrupt (run 'streamcoadd verify')")
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
            for ds in PLANE_DATASETS:
                _dataset(g, ds, getattr(sums, ds))
            _dataset(g, "noise", sums.noise)
            _dataset(g, "psf_sum", sums.psf_sum)
            g.attrs["psf_w"] = sums.psf_w
            pg = g.create_group("planes")
            for pname, arr in sums.planes.items():
                _dataset(pg, pname, arr)
            bg = g.create_group("bit_counts")
            for bit, arr in sums.bit_counts.items():
                _dataset(bg, str(bit), arr)
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
        if int(attrs.get("version", -1)) != CELL_VERSION:
            raise OSError(f"{path}: cell format version {attrs.get('version')} is not "
                          f"{CELL_VERSION}; upgrade streamcoadd")
        t = int(attrs["tract"])
        px, py = (int(v) for v in attrs["patch"])
        cx, cy = (int(v) for v in attrs["cell"])
        outer = Box(*(int(v) for v in attrs["outer_box"]))
        acc = CellAccumulator(cell=CellId(PatchId(t, px, py), cx, cy), outer=outer)
        for name in GROUPS:
            if name not in f:
                continue
            g = f[name]
            acc.groups[name] = CellSums(
                **{ds: _load(g[ds]) for ds in PLANE_DATASETS},
                noise=_load(g["noise"]), psf_sum=_load(g["psf_sum"]),
                psf_w=float(g.attrs["psf_w"]),
                planes={k: _load(v) for k, v in g["planes"].items()},
                bit_counts={int(k): _load(v) for k, v in g["bit_counts"].items()},
                contributors=contributors_from_array(_load(g["contributors"])))
    return acc, attrs
