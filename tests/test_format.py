"""The format module and the version-3 cell file: every field of CellSums and Contributor
round-trips through a real HDF5 file, the schema drives dtype / Table / docs, and a new
field of ``core.fold`` cannot be forgotten by the store."""

from __future__ import annotations

import dataclasses

import h5py
import numpy as np
import pytest

from streamcoadd.core.fold import COUNT_DTYPE, CellAccumulator, CellSums, Contributor
from streamcoadd.core.skymap import Box, CellId, PatchId
from streamcoadd.store import format as fmt
from streamcoadd.store.cellfile import (
    SUMS_FIELDS_STORED,
    encoded_contributors,
    read_cell_file,
    write_cell_file,
)


def test_every_core_field_is_stored():
    assert {f.name for f in dataclasses.fields(CellSums)} <= set(SUMS_FIELDS_STORED)
    assert {f.name for f in dataclasses.fields(Contributor)} == \
        {c.name for c in fmt.CONTRIBUTOR_SCHEMA}


def _contributor(rng, i):
    return Contributor(
        visit=int(rng.integers(2**40)), detector=int(rng.integers(200)),
        weight=float(rng.random()), overlap_fraction=float(rng.random()),
        good_fraction=float(rng.random()), fallback=bool(i % 2), psf_ixx=float(rng.normal()),
        psf_iyy=float(rng.normal()), psf_ixy=float(rng.normal()), psf_flag=bool(i % 3 == 0),
        content_hash=f"{int(rng.integers(2**62)):064x}", folded_at=float(1.7e9 + rng.random()),
        instrument=["LSSTCam", ""][i % 2], physical_filter=f"r_{i}",
        mjd=float(60000 + rng.random()), psf_sum=float(1 + 1e-3 * rng.normal()),
        footprint=tuple((float(x), float(y)) for x, y in rng.normal(size=(i % 7, 2))))


def _sums(rng, shape, n, partial: bool):
    s = CellSums.zeros(shape, 9, 2)
    s.sum_wI[...] = rng.normal(size=shape)
    s.sum_w2var[...] = rng.random(shape)
    s.noise[...] = rng.normal(size=s.noise.shape)
    s.psf_sum[...] = rng.random((9, 9))
    s.psf_w, s.w_full, s.w_peak, s.n_full = 3.5, 2.25, 4.0, 3
    if partial:
        s.w_partial = np.where(rng.random(shape) < 0.5, 0.75, 0.0)
        s.n_partial = (s.w_partial > 0).astype(COUNT_DTYPE)
    sparse = np.zeros(shape)
    sparse[2, 3] = 0.5
    s.interp = sparse
    s.n_interp = (sparse > 0).astype(COUNT_DTYPE)
    s.planes = {"SAT": sparse * 2}
    s.plane_counts = {"SAT": (sparse > 0).astype(COUNT_DTYPE)}
    s.bit_counts = {1: (sparse > 0).astype(COUNT_DTYPE), 5: rng.integers(0, 3, shape).astype(COUNT_DTYPE)}
    s.contributors = [_contributor(rng, i) for i in range(n)]
    s.counted = True
    return s


@pytest.mark.parametrize("partial", [False, True])
def test_cell_file_round_trip_every_field(tmp_path, partial):
    rng = np.random.default_rng(7)
    outer = Box(10, 20, 50, 64)
    acc = CellAccumulator(cell=CellId(PatchId(2, 1, 3), 4, 5), outer=outer)
    acc.groups["good"] = _sums(rng, outer.shape, 13, partial)
    acc.groups["fallback"] = _sums(rng, outer.shape, 2, not partial)
    path = tmp_path / fmt.cell_filename(4, 5, 7)
    write_cell_file(path, acc, "r", 7, Box(15, 25, 45, 59))
    back, header = read_cell_file(path)
    assert header["version"] == fmt.CELL_VERSION and header["generation"] == 7
    assert header["inner_box"] == [15, 25, 45, 59] and header["active_group"] == "good"
    assert back.cell == acc.cell and back.outer == acc.outer
    for name, want in acc.groups.items():
        got = back.groups[name]
        for f in dataclasses.fields(CellSums):
            a, b = getattr(want, f.name), getattr(got, f.name)
            if isinstance(a, dict):
                assert a.keys() == b.keys(), f.name
                for k in a:
                    assert np.array_equal(a[k], b[k]) and a[k].dtype == b[k].dtype, (f.name, k)
            elif isinstance(a, np.ndarray):
                assert np.array_equal(a, b) and a.dtype == b.dtype, f.name
            else:
                assert a == b, f.name
    # few objects, no attributes
    with h5py.File(path, "r") as f:
        assert len(f) <= 13 and not f.attrs
        assert all(not f[k].attrs for k in f)


def test_a_flipped_bit_is_caught(tmp_path):
    rng = np.random.default_rng(1)
    outer = Box(0, 0, 30, 30)
    acc = CellAccumulator(cell=CellId(PatchId(0, 0, 0), 0, 0), outer=outer)
    acc.groups["good"] = _sums(rng, outer.shape, 3, True)
    path = tmp_path / "c0-0.g1.h5"
    write_cell_file(path, acc, "r", 1, outer)
    with h5py.File(path, "r") as f:
        off = f["good.f8"].id.get_offset() + 100
    data = bytearray(path.read_bytes())
    data[off] ^= 0x10
    path.write_bytes(bytes(data))
    with pytest.raises(OSError, match="checksum"):
        read_cell_file(path)


def test_contributors_are_encoded_incrementally():
    rng = np.random.default_rng(3)
    s = CellSums.zeros((4, 4), 3, 0)
    s.contributors = [_contributor(rng, i) for i in range(5)]
    a1, v1 = encoded_contributors(s)
    s.contributors.append(_contributor(rng, 5))
    a2, v2 = encoded_contributors(s)
    assert np.array_equal(a2[:5], a1) and len(a2) == 6
    from streamcoadd.store.cellfile import contributors_to_arrays

    full, verts = contributors_to_arrays(s.contributors)
    assert np.array_equal(a2, full) and np.array_equal(v2, verts)
    s.contributors = s.contributors[1:]  # a retraction replaces the list
    a3, _ = encoded_contributors(s)
    assert np.array_equal(a3, full[1:])


def test_schema_generates_table_and_docs():
    rows = [_contributor(np.random.default_rng(0), i) for i in range(4)]
    t = fmt.contributors_table(rows)
    assert t.colnames == [c.name for c in fmt.CONTRIBUTOR_SCHEMA]
    assert str(t["weight"].unit) == "1 / nJy2" and t["footprint"][3] == rows[3].footprint
    md = fmt.schema_markdown()
    assert all(f"`{c.name}`" in md for c in fmt.CONTRIBUTOR_SCHEMA)


def test_manifest_round_trip_and_errors():
    m = fmt.Manifest(tract=1, patch=(2, 3), band="r", commit=5, updated=1.5,
                     cells={(0, 1): 5, (2, 2): 3}, warps={"a" * 64: (7, 8)})
    assert fmt.Manifest.parse(m.serialize()) == m
    with pytest.raises(fmt.FormatError, match="where.json"):
        fmt.Manifest.parse(b'{"format": "streamcoadd-shard", "version": 9}', "where.json")
