"""One cell generation as an HDF5 file (layout: ``docs/state-format.md``).

A cell file is written once, closed, fsynced and renamed into place; it is never modified
afterwards, so a reader always sees it whole.

Version 3 (written now; state format 2) holds few HDF5 objects and no attributes: a JSON
``header`` dataset (identity, scalars, the layer list and the CRC-32 of every other
dataset, itself followed by its own CRC-32), and per input group ``{g}.f8`` (the dense
float64 planes stacked, (k, H, W)), ``{g}.u2`` (the dense uint16 count planes stacked),
``{g}.sparse`` (the mostly-zero planes of both kinds as one (layer, index, value) table),
``{g}.psf``, ``{g}.contributors`` (rows of :data:`~streamcoadd.store.format.CONTRIBUTOR_SCHEMA`)
and ``{g}.footprints`` (their polygon vertices). Versions 1 and 2 (one dataset per plane,
attributes, CRC per dataset) are still read; their integer counts are derived
(:func:`derive_counts`).
"""

from __future__ import annotations

import ctypes
import dataclasses
import json
import os
import signal
import weakref
import zlib
from pathlib import Path

import h5py
import numpy as np
from h5py import h5a, h5d, h5s, h5t

from streamcoadd.core.errors import StateError
from streamcoadd.core.fold import (
    COUNT_DTYPE,
    GROUPS,
    CellAccumulator,
    CellSums,
    Contributor,
)
from streamcoadd.core.skymap import Box, CellId, PatchId
from streamcoadd.store import durable
from streamcoadd.store.durable import crash_point, fsync_file
from streamcoadd.store.format import (
    CELL_FORMAT,
    CELL_VERSION,
    CONTRIBUTOR_DTYPE,
    CONTRIBUTOR_SCHEMA,
    READABLE_CELL_VERSIONS,
    VERTEX_DTYPE,
    contributor_columns,
)

INDEX_DTYPE = np.dtype("<i4")
SPARSE_DTYPE = np.dtype([("layer", "<u2"), ("index", "<i4"), ("value", "<f8")])
COUNTS_EXACT, COUNTS_DERIVED = "exact", "derived-v1"
_SUMS_FIELDS = {f.name for f in dataclasses.fields(CellSums)}
_CONTRIB_FIELDS = {f.name for f in dataclasses.fields(Contributor)}
# every CellSums field and how the cell file keeps it (tests/test_format.py checks that a
# new field of core.fold.CellSums cannot be forgotten here)
SUMS_FIELDS_STORED = {
    "shape": "header outer_box", "sum_wI": "f8 layer", "sum_w2var": "f8 layer",
    "noise": "f8 layers noise/k", "psf_sum": "{g}.psf", "psf_w": "header",
    "w_full": "header", "w_partial": "f8 layer (absent: None)",
    "interp": "f8 layer (absent: None)", "mask_bits": "derived from bit_counts",
    "planes": "f8 layers planes/NAME", "bit_counts": "u2 layers bit_counts/BIT",
    "contributors": "{g}.contributors + {g}.footprints", "n_full": "header",
    "n_partial": "u2 layer (absent: None)", "n_interp": "u2 layer (absent: None)",
    "plane_counts": "u2 layers plane_counts/NAME", "counted": "header counts",
    "w_peak": "header",
}


class CellFileError(StateError, OSError):
    """A cell file that is not readable as one (corrupt, foreign or too new); an
    ``OSError`` for the writers, a ``StateError`` (with what to do) for the readers."""


def new_sums(**kw) -> CellSums:
    """A CellSums from the fields this version of ``core.fold`` has (others dropped)."""
    return CellSums(**{k: v for k, v in kw.items() if k in _SUMS_FIELDS})


def new_contributor(**kw) -> Contributor:
    return Contributor(**{k: v for k, v in kw.items() if k in _CONTRIB_FIELDS})


# --------------------------------------------------------------------------- contributors

def contributors_to_arrays(rows: list) -> tuple[np.ndarray, np.ndarray]:
    """``(rows as CONTRIBUTOR_DTYPE, vertices (V, 2) float64)`` of contributor objects,
    column by column from :data:`CONTRIBUTOR_SCHEMA`."""
    cols = contributor_columns(rows)
    out = np.zeros(len(rows), CONTRIBUTOR_DTYPE)
    verts = np.zeros((0, 2), VERTEX_DTYPE)
    for c in CONTRIBUTOR_SCHEMA:
        data = cols[c.name]
        if not rows:
            continue
        if c.polygon:
            polys = [np.asarray(p, VERTEX_DTYPE).reshape(-1, 2) for p in data]
            out[f"{c.name}_n"] = [len(p) for p in polys]
            verts = np.concatenate(polys) if polys else verts
        elif c.dtype.startswith("S"):
            width = np.dtype(c.dtype).itemsize
            out[c.name] = [s.encode()[:width] for s in data]
        else:
            out[c.name] = data
    return out, verts


def contributors_from_arrays(arr: np.ndarray, verts: np.ndarray | None) -> list[Contributor]:
    """Contributor objects from stored rows (any version: a column a file lacks takes the
    schema's default); column by column through ``tolist()`` (C speed)."""
    names = arr.dtype.names
    n = len(arr)
    cols = {}
    for c in CONTRIBUTOR_SCHEMA:
        if c.polygon:
            key = f"{c.name}_n"
            if key in names and verts is not None and n:
                ends = np.cumsum(arr[key])
                starts = ends - arr[key]
                vl = verts.tolist()
                cols[c.name] = [tuple(tuple(v) for v in vl[a:b])
                                for a, b in zip(starts.tolist(), ends.tolist())]
            else:
                cols[c.name] = [c.default] * n
        elif c.name not in names:
            cols[c.name] = [c.default] * n
        elif c.dtype.startswith("S"):
            cols[c.name] = [b.decode() for b in arr[c.name].tolist()]
        elif c.dtype == "u1":
            cols[c.name] = [bool(v) for v in arr[c.name].tolist()]
        else:
            cols[c.name] = arr[c.name].tolist()
    keys = [c.name for c in CONTRIBUTOR_SCHEMA if c.name in _CONTRIB_FIELDS]
    return [Contributor(**dict(zip(keys, vals))) for vals in zip(*(cols[k] for k in keys))]


class _EncodedRows:
    """The encoded contributor rows of one CellSums, kept between commits so that a commit
    encodes only the rows appended since the previous one (the fold appends; a retraction
    replaces the list, which starts the encoding afresh)."""

    __slots__ = ("arr", "last", "n", "owner", "rows_list", "verts")

    def __init__(self, owner, rows_list, arr, verts):
        self.owner = weakref.ref(owner)
        self.rows_list, self.n = rows_list, len(rows_list)
        self.last = rows_list[-1] if rows_list else None
        self.arr, self.verts = arr, verts


_encoded: dict[int, _EncodedRows] = {}


def encoded_contributors(sums: CellSums) -> tuple[np.ndarray, np.ndarray]:
    """:func:`contributors_to_arrays` of ``sums.contributors``, incremental: only the
    rows appended to the same list since the last call are encoded (``_EncodedRows``)."""
    rows = sums.contributors
    hit = _encoded.get(id(sums))
    if (hit is not None and hit.owner() is sums and hit.rows_list is rows
            and len(rows) >= hit.n and (hit.n == 0 or rows[hit.n - 1] is hit.last)):
        if len(rows) == hit.n:
            return hit.arr, hit.verts
        arr, verts = contributors_to_arrays(rows[hit.n:])
        arr, verts = np.concatenate([hit.arr, arr]), np.concatenate([hit.verts, verts])
    else:
        arr, verts = contributors_to_arrays(rows)
    if len(_encoded) > 4 * 4096:  # drop entries of collected cells
        for k in [k for k, v in _encoded.items() if v.owner() is None]:
            del _encoded[k]
    _encoded[id(sums)] = _EncodedRows(sums, rows, arr, verts)
    return arr, verts


# --------------------------------------------------------------------------- planes

def encode_plane(plane: np.ndarray) -> tuple[str, object]:
    """The smallest encoding of a 2-D plane: ``("constant", python scalar)``,
    ``("sparse", flat indices of the non-zero pixels)`` or ``("dense", None)``."""
    flat = plane.reshape(-1)
    first = flat[0]
    if (flat == first).all():
        return "constant", first.item()
    nz = np.count_nonzero(flat)
    if nz * SPARSE_DTYPE.itemsize >= flat.size * plane.dtype.itemsize:
        return "dense", None
    return "sparse", np.flatnonzero(flat)


def _layers(sums: CellSums, counts: dict) -> list[tuple[str, np.ndarray]]:
    """Every per-pixel plane of a group, named as in the header's layer list."""
    out = [("sum_wI", sums.sum_wI), ("sum_w2var", sums.sum_w2var)]
    out += [(f"noise/{k}", sums.noise[k]) for k in range(sums.noise.shape[0])]
    for name, arr in (("w_partial", sums.w_partial), ("interp", sums.interp),
                      ("n_partial", counts["n_partial"]), ("n_interp", counts["n_interp"])):
        if arr is not None:
            out.append((name, arr))
    out += [(f"planes/{k}", v) for k, v in sorted(sums.planes.items())]
    out += [(f"plane_counts/{k}", v) for k, v in sorted(counts["plane_counts"].items())]
    out += [(f"bit_counts/{b}", v) for b, v in sorted(sums.bit_counts.items())]
    return out


def _crc(data: np.ndarray) -> int:
    return zlib.crc32(np.ascontiguousarray(data))


def _put(fid, name: str, data: np.ndarray, crcs: dict) -> None:
    """A contiguous dataset without attributes (its CRC-32 goes into the header)."""
    data = np.ascontiguousarray(data)
    space = h5s.create_simple(data.shape) if data.ndim else h5s.create(h5s.SCALAR)
    did = h5d.create(fid, name.encode(), h5t.py_create(data.dtype, logical=True), space)
    if data.size:
        did.write(h5s.ALL, h5s.ALL, data)
    did.close()
    crcs[name] = _crc(data)


def _group_datasets(name: str, sums: CellSums) -> tuple[dict, dict[str, np.ndarray]]:
    """The header entry and the datasets of one input group."""
    layers, dense, sparse = [], {"f8": [], "u2": []}, []
    counts = counts_of(sums)
    for lname, plane in _layers(sums, counts):
        kind = "u2" if plane.dtype.kind in "iu" else "f8"  # counts: COUNT_DTYPE
        enc, arg = encode_plane(plane)
        if enc == "dense":
            arg = len(dense[kind])
            dense[kind].append(plane.astype(kind, copy=False))
        elif enc == "sparse":
            t = np.empty(arg.size, SPARSE_DTYPE)
            t["layer"], t["index"] = len(layers), arg
            t["value"] = plane.reshape(-1)[arg]
            sparse.append(t)
            arg = None
        layers.append([lname, kind, enc, arg])
    rows, verts = encoded_contributors(sums)
    head = {"w_full": float(sums.w_full), "psf_w": float(sums.psf_w),
            "n_full": int(counts["n_full"]),
            "counts": COUNTS_EXACT if counts["counted"] else COUNTS_DERIVED,
            "w_peak": float(getattr(sums, "w_peak", 0.0)),
            "n_noise": int(sums.noise.shape[0]), "n_contributors": len(rows),
            "layers": layers}
    data = {f"{name}.psf": sums.psf_sum, f"{name}.contributors": rows,
            f"{name}.footprints": verts}
    for kind, planes in dense.items():
        if planes:
            data[f"{name}.{kind}"] = np.stack(planes)
    if sparse:
        data[f"{name}.sparse"] = np.concatenate(sparse)
    return head, data


def encode_cell(acc: CellAccumulator, band: str, generation: int, inner: Box) -> bytes:
    """The bytes of a version-3 cell file of ``acc`` (an HDF5 file image built in
    memory with HDF5's core driver: no Python file object is involved, so nothing of
    HDF5 outlives this call, whatever happens to the write that follows)."""
    c, o = acc.cell, acc.outer
    header = {"format": CELL_FORMAT, "version": CELL_VERSION, "band": band,
              "tract": c.patch.tract, "patch": [c.patch.x, c.patch.y], "cell": [c.x, c.y],
              "generation": generation, "outer_box": [o.x0, o.y0, o.x1, o.y1],
              "inner_box": [inner.x0, inner.y0, inner.x1, inner.y1],
              "active_group": acc.active_group() or "", "groups": {}, "crc32": {}}
    datasets = {}
    for name in GROUPS:
        sums = acc.groups.get(name)
        if sums is None or not sums.contributors:
            continue
        header["groups"][name], data = _group_datasets(name, sums)
        datasets.update(data)
    f = h5py.File(f"cell-{os.getpid()}-{id(acc)}.h5", "w", driver="core",
                  backing_store=False, libver="latest")
    try:
        fid = f.id
        for name, data in datasets.items():
            _put(fid, name, data, header["crc32"])
        blob = json.dumps(header).encode()
        blob += b"\n%08x" % zlib.crc32(blob)
        _put(fid, "header", np.frombuffer(blob, np.uint8), {})
        f.flush()
        return f.id.get_file_image()
    finally:
        f.close()


def write_cell_file(path: Path, acc: CellAccumulator, band: str, generation: int,
                    inner: Box) -> None:
    """Write ``acc`` to ``path`` durably: ``path.tmp``, fsync, rename (the caller fsyncs
    the directory once for all the cells of a commit)."""
    write_cell_bytes(path, encode_cell(acc, band, generation, inner))


def write_cell_bytes(path: Path, data: bytes) -> None:
    """``data`` to ``path`` through ``path.tmp``, fsync and rename. Plain writes: on a
    full disk they fail with a clean OSError (ENOSPC) that the commit reports."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as out:
        out.write(data)
    crash_point("cell-tmp-written")
    fsync_file(tmp)
    os.replace(tmp, path)
    crash_point("cell-renamed")


# --------------------------------------------------------------------------- reading

def _open(path: Path) -> h5py.File:
    try:
        return h5py.File(path, "r", locking=False)
    except OSError as e:
        if not Path(path).exists():  # h5py reports a file deleted meanwhile as a stat error
            raise FileNotFoundError(2, "cell generation was superseded", str(path)) from e
        raise CellFileError(f"{path}: not readable as HDF5 ({e}); run 'streamcoadd verify'") \
            from None


def _get(fid, name: str) -> np.ndarray:
    did = h5d.open(fid, name.encode())
    data = np.empty(did.shape, did.dtype)
    if data.size:
        did.read(h5s.ALL, h5s.ALL, data)
    did.close()
    return data


def _read_header_v3(fid, where: str) -> dict:
    raw = _get(fid, "header").tobytes()
    blob, _, crc = raw.rpartition(b"\n")
    if not blob or zlib.crc32(blob) != int(crc or b"0", 16):
        raise CellFileError(f"{where}: header checksum mismatch; the file is corrupt "
                            "(run 'streamcoadd verify')")
    return json.loads(blob)


def _checked(fid, name: str, header: dict, where: str) -> np.ndarray:
    data = _get(fid, name)
    if _crc(data) != header["crc32"].get(name):
        raise CellFileError(f"{where}/{name}: checksum mismatch; the file is corrupt "
                            "(run 'streamcoadd verify')")
    return data


def _read_group_v3(fid, name: str, head: dict, header: dict, shape, where: str,
                   contributors: bool = True) -> CellSums:
    """One group of a version-3 file as a CellSums."""
    present = set(header["crc32"])
    stacks = {k: _checked(fid, f"{name}.{k}", header, where)
              for k in ("f8", "u2") if f"{name}.{k}" in present}
    sparse = (_checked(fid, f"{name}.sparse", header, where)
              if f"{name}.sparse" in present else np.zeros(0, SPARSE_DTYPE))
    bounds = np.searchsorted(sparse["layer"], np.arange(len(head["layers"]) + 1))
    planes = {}
    for i, (lname, kind, enc, arg) in enumerate(head["layers"]):
        if enc == "dense":
            planes[lname] = stacks[kind][arg]
        elif enc == "constant":
            planes[lname] = np.full(shape, arg, kind)
        else:
            out = np.zeros(shape, kind)
            part = sparse[bounds[i]:bounds[i + 1]]
            out.reshape(-1)[part["index"]] = part["value"]
            planes[lname] = out
    k = int(head["n_noise"])
    noise = (np.stack([planes[f"noise/{i}"] for i in range(k)]) if k
             else np.zeros((0, *shape), np.float64))
    rows = []
    if contributors:
        rows = contributors_from_arrays(
            _checked(fid, f"{name}.contributors", header, where),
            _checked(fid, f"{name}.footprints", header, where))

    def sub(prefix, conv=str):
        return {conv(n[len(prefix):]): a for n, a in planes.items() if n.startswith(prefix)}

    return new_sums(
        shape=tuple(shape), sum_wI=planes["sum_wI"], sum_w2var=planes["sum_w2var"],
        noise=noise, psf_sum=_checked(fid, f"{name}.psf", header, where),
        psf_w=float(head["psf_w"]), w_full=float(head["w_full"]),
        w_partial=planes.get("w_partial"), interp=planes.get("interp"),
        planes=sub("planes/"), bit_counts=sub("bit_counts/", int),
        contributors=rows, n_full=head["n_full"], n_partial=planes.get("n_partial"),
        n_interp=planes.get("n_interp"), plane_counts=sub("plane_counts/"),
        counted=head["counts"] == COUNTS_EXACT, w_peak=float(head.get("w_peak", 0.0)))


def load_plane(d: h5py.Dataset) -> np.ndarray:
    """A plane dataset of a version 1 or 2 cell file (any encoding), CRC-32 checked."""
    return _read_v12(d.parent.id, d.name.rsplit("/", 1)[-1], f"{d.file.filename}:{d.name}")


def contributors_to_array(rows: list) -> np.ndarray:
    """The rows of :func:`contributors_to_arrays` (without the polygon vertices)."""
    return contributors_to_arrays(rows)[0]


def contributors_from_array(arr: np.ndarray) -> list[Contributor]:
    """Contributors from rows without polygons (footprints empty)."""
    return contributors_from_arrays(arr, None)


# --------------------------------------------------------------------------- counts

def counts_of(sums: CellSums) -> dict:
    """The integer counts of a group: its own (``core.fold`` keeps them) or, for sums that
    have none (read from a version 1 or 2 file), :func:`derive_counts`."""
    if getattr(sums, "n_full", None) is None:
        return derive_counts(sums)
    return {"n_full": int(sums.n_full), "n_partial": sums.n_partial,
            "n_interp": sums.n_interp, "plane_counts": dict(sums.plane_counts),
            "counted": bool(getattr(sums, "counted", True))}


def derive_counts(sums: CellSums) -> dict:
    """Integer counts of a group that only has float sums (state format 1).

    Exact where the sums allow it: every input covers the whole outer box
    (``w_partial`` is None) -> ``n_full`` = number of inputs, no ``n_partial``; a group
    without interpolated weight has no ``n_interp``; ``bit_counts`` are stored in
    format 1 already. Otherwise (partial coverage, interpolated pixels, propagated
    planes) the number of inputs at a pixel cannot be recovered from a float sum: the
    derived count is the number of inputs ``N`` of the group where the float sum is
    > 0 and 0 elsewhere (an upper bound, zero exactly where format 1 had no data), with
    ``n_full = 0``, and ``counted`` is False: ``core.fold`` and ``core.coadd`` then keep
    deciding coverage and flags by the float tests of format 1 (a retraction rebuilds such
    a cell from its inputs), so the coadd is unchanged."""
    n = len(sums.contributors)
    exact = sums.w_partial is None and sums.interp is None and not sums.planes

    def upper(plane):
        return None if plane is None else np.where(plane > 0, n, 0).astype(COUNT_DTYPE)

    if sums.w_partial is None:
        n_full, n_partial = n, None
    else:
        n_full, n_partial = 0, upper(sums.w_partial + sums.w_full)
    return {"n_full": n_full, "n_partial": n_partial, "n_interp": upper(sums.interp),
            "plane_counts": {k: upper(v) for k, v in sums.planes.items()},
            "counted": exact}


# --------------------------------------------------------------------------- versions 1, 2

def _attrs_of(oid) -> dict:
    """Every attribute of a low-level object (strings as ``str``)."""
    out = {}
    for i in range(h5a.get_num_attrs(oid)):
        aid = h5a.open(oid, index=i)
        arr = np.empty(aid.shape, aid.dtype)
        aid.read(arr, mtype=h5t.py_create(aid.dtype))
        v = arr[()]
        out[aid.name.decode()] = v.decode() if isinstance(v, bytes) else v
    return out


def _read_v12(gid, name: str, where: str, with_encoding: bool = False):
    """A dataset of a version 1/2 file, CRC-32 checked and decoded to its full plane
    (``constant``: full array; ``sparse``: scattered); with its encoding if asked."""
    plane, encoding = _read_v12_enc(gid, name, where)
    return (plane, encoding) if with_encoding else plane


def _read_v12_enc(gid, name: str, where: str) -> tuple[np.ndarray, str]:
    did = h5d.open(gid, name.encode())
    data = np.empty(did.shape, did.dtype)
    if data.size:
        did.read(h5s.ALL, h5s.ALL, data)
    attrs = _attrs_of(did)
    want = attrs.get("crc32")
    if want is not None and zlib.crc32(data) != int(want):
        raise CellFileError(f"{where}/{name}: checksum mismatch; the file is corrupt "
                            "(run 'streamcoadd verify')")
    encoding = attrs.get("encoding", "dense")
    if encoding == "dense":
        return data, encoding
    shape = tuple(int(v) for v in attrs["shape"])
    if encoding == "constant":
        return np.full(shape, data, data.dtype), encoding
    if encoding == "sparse":
        out = np.zeros(shape, data.dtype["value"])
        out.reshape(-1)[data["index"]] = data["value"]
        return out, encoding
    raise CellFileError(f"{where}/{name}: unknown plane encoding {encoding!r}")


def _read_group_v12(g: h5py.Group, shape, where: str) -> CellSums:
    gid = g.id
    sum_w, encoding = _read_v12(gid, "sum_w", where, with_encoding=True)
    full = encoding == "constant"
    interp, encoding = _read_v12(gid, "sum_w_interp", where, with_encoding=True)
    sub = {k: g[k].id for k in ("planes", "bit_counts") if k in g}
    sums = new_sums(
        shape=tuple(shape), sum_wI=_read_v12(gid, "sum_wI", where),
        sum_w2var=_read_v12(gid, "sum_w2var", where),
        noise=_read_v12(gid, "noise", where), psf_sum=_read_v12(gid, "psf_sum", where),
        psf_w=float(_attrs_of(gid)["psf_w"]),
        w_full=float(sum_w.flat[0]) if full else 0.0, w_partial=None if full else sum_w,
        interp=None if encoding == "constant" and not interp.any() else interp,
        planes={k.decode(): _read_v12(sub["planes"], k.decode(), f"{where}/planes")
                for k in sub.get("planes", ())},
        bit_counts={int(k): _read_v12(sub["bit_counts"], k.decode(), f"{where}/bit_counts")
                    .astype(COUNT_DTYPE) for k in sub.get("bit_counts", ())},
        contributors=contributors_from_arrays(_read_v12(gid, "contributors", where), None))
    counts = derive_counts(sums)
    for k, v in counts.items():
        if k in _SUMS_FIELDS:
            setattr(sums, k, v)
    return sums


# --------------------------------------------------------------------------- entry points

def _v12_header(attrs: dict) -> dict:
    return {"format": attrs.get("format"), "version": int(attrs.get("version", -1)),
            "band": str(attrs.get("band")), "tract": int(attrs["tract"]),
            "patch": [int(v) for v in attrs["patch"]], "cell": [int(v) for v in attrs["cell"]],
            "generation": int(attrs["generation"]),
            "outer_box": [int(v) for v in attrs["outer_box"]],
            "inner_box": [int(v) for v in attrs["inner_box"]],
            "active_group": str(attrs.get("active_group", ""))}


def _header(f: h5py.File, path) -> dict:
    if "header" in f:
        header = _read_header_v3(f.id, str(path))
    else:
        header = _v12_header(_attrs_of(f.id))
    if header.get("format") != CELL_FORMAT:
        raise CellFileError(f"{path}: not a streamcoadd cell file")
    if header.get("version") not in READABLE_CELL_VERSIONS:
        raise CellFileError(f"{path}: cell format version {header.get('version')} is not "
                            f"one of {READABLE_CELL_VERSIONS}; upgrade streamcoadd")
    return header


def read_cell_header(path: Path) -> dict:
    """The identity of a cell file: ``format``, ``version``, ``band``, ``tract``,
    ``patch`` [x, y], ``cell`` [x, y], ``generation``, ``outer_box`` and ``inner_box``
    [x0, y0, x1, y1] (tract pixels), ``active_group``; any version."""
    with _open(path) as f:
        return _header(f, path)


def read_cell_file(path: Path, for_coadd: bool = False) -> tuple[CellAccumulator, dict]:
    """Read a cell generation (any readable version); returns the accumulator and the
    header (:func:`read_cell_header`). ``for_coadd``: only the group that makes the coadd.
    Raises ``FileNotFoundError`` (superseded meanwhile) or ``OSError`` (unreadable,
    checksum mismatch)."""
    with _open(path) as f:
        try:
            header = _header(f, path)
            outer = Box(*header["outer_box"])
            t, (px, py), (cx, cy) = header["tract"], header["patch"], header["cell"]
            acc = CellAccumulator(cell=CellId(PatchId(t, px, py), cx, cy), outer=outer)
            names = [header["active_group"]] if for_coadd else GROUPS
            for name in names:
                if header["version"] >= 3 and name in header.get("groups", {}):
                    acc.groups[name] = _read_group_v3(f.id, name, header["groups"][name],
                                                      header, outer.shape, str(path))
                elif header["version"] < 3 and name and name in f:
                    acc.groups[name] = _read_group_v12(f[name], outer.shape,
                                                       f"{path}:/{name}")
        except (KeyError, ValueError, TypeError, IndexError) as e:
            raise CellFileError(f"{path}: malformed cell file ({e}); run "
                                "'streamcoadd verify'") from None
    return acc, header


def read_cell_summary(path: Path) -> dict:
    """What the per-cell maps need: the header, the active ``group``, its CellSums
    (``sums``) and ``n_fallback`` (inputs of the fallback group when ``good`` is active)."""
    acc, header = read_cell_file(path, for_coadd=True)
    group = header["active_group"]
    n_fallback = 0
    if group == "good":
        n_fallback = count_inputs(path, "fallback")
    return {"header": header, "group": group, "sums": acc.groups.get(group),
            "n_fallback": n_fallback}


def count_inputs(path: Path, group: str | None = None) -> int:
    """Number of inputs of ``group`` (default: the active one) of a cell file, from its
    header (version 3) or its contributor dataset's length (1, 2)."""
    with _open(path) as f:
        header = _header(f, path)
        group = group or header["active_group"]
        if header["version"] >= 3:
            return int(header["groups"].get(group, {}).get("n_contributors", 0))
        return len(f[group]["contributors"]) if group and group in f else 0


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
