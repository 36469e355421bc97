"""The contributor row, declared once: name, dtype, unit and description of every field
of a cell's contributor list (:class:`streamcoadd.core.fold.Contributor`).

The store makes its HDF5 compound dtype from it (``streamcoadd.store.format``), analysis
its astropy Tables (:func:`contributors_table`), the docs their table
(:func:`schema_markdown`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from astropy.table import Column as TableColumn
from astropy.table import Table


@dataclass(frozen=True)
class Column:
    """One contributor field: ``dtype`` its HDF5 / numpy type (``S`` strings are UTF-8,
    truncated to the width), ``unit`` an astropy unit string or ``""``. ``polygon``: a
    variable-length tuple of (x, y) vertices, stored outside the fixed-size row (the row
    holds the vertex count ``{name}_n``)."""

    name: str
    dtype: str
    unit: str
    description: str
    default: object = None
    polygon: bool = False


CONTRIBUTOR_SCHEMA: tuple[Column, ...] = (
    Column("visit", "<i8", "", "visit id"),
    Column("detector", "<i8", "", "detector id"),
    Column("weight", "<f8", "1/nJy2", "the input's scalar weight, as folded"),
    Column("overlap_fraction", "<f8", "", "fraction of the cell inner box with valid pixels"),
    Column("good_fraction", "<f8", "", "fraction of the inner box valid and not bad"),
    Column("fallback", "u1", "", "folded into the fallback group (bool)"),
    Column("psf_ixx", "<f8", "pix2", "adaptive second moment xx of the PSF at the cell centre"),
    Column("psf_iyy", "<f8", "pix2", "adaptive second moment yy"),
    Column("psf_ixy", "<f8", "pix2", "adaptive second moment xy"),
    Column("psf_flag", "u1", "", "the moments failed (bool)"),
    Column("content_hash", "S64", "", "sha256 of the warp file (hex)"),
    Column("folded_at", "<f8", "s", "unix time of the fold"),
    Column("instrument", "S32", "", "instrument name", ""),
    Column("physical_filter", "S32", "", "physical filter name", ""),
    Column("mjd", "<f8", "d", "MJD-OBS of the warp (NaN if unknown)", float("nan")),
    Column("psf_sum", "<f8", "", "sum of the input's PSF stamp at the cell centre "
           "(NaN: folded before it was recorded)", float("nan")),
    Column("footprint", "<f8", "pix", "outline polygon of the warp's valid pixels, "
           "tract pixels, (x, y) vertices (empty: not recorded)", (), polygon=True),
)


def contributor_columns(rows: list, known: set[str] | None = None) -> dict[str, list]:
    """Column lists of the schema from contributor objects (a field the object lacks
    takes the column's default)."""
    out = {}
    for c in CONTRIBUTOR_SCHEMA:
        if c.default is None:
            out[c.name] = [getattr(r, c.name) for r in rows]
        else:
            out[c.name] = [getattr(r, c.name, c.default) for r in rows]
    return out


def contributors_table(rows: list):
    """The contributors as an astropy Table, one column per schema field, with units
    and descriptions (``footprint`` as an object column of vertex tuples)."""
    cols = contributor_columns(rows)
    t = Table()
    for c in CONTRIBUTOR_SCHEMA:
        data = cols[c.name]
        if c.polygon:
            arr = np.empty(len(data), object)
            arr[:] = [tuple(v) for v in data] if data else []
        elif c.dtype.startswith("S"):
            arr = np.array(data, dtype=str) if data else np.zeros(0, "U1")
        elif c.dtype == "u1":
            arr = np.array(data, dtype=bool)
        else:
            arr = np.array(data, dtype=c.dtype) if data else np.zeros(0, c.dtype)
        t[c.name] = TableColumn(arr, unit=c.unit or None, description=c.description)
    return t


def schema_markdown() -> str:
    """The contributor schema as a markdown table (for ``docs/state-format.md``)."""
    lines = ["| column | dtype | unit | description |", "|---|---|---|---|"]
    for c in CONTRIBUTOR_SCHEMA:
        dtype = "(V, 2) float64, see below" if c.polygon else c.dtype
        lines.append(f"| `{c.name}` | {dtype} | {c.unit} | {c.description} |")
    return "\n".join(lines)
