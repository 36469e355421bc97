"""The state's on-disk format, declared once (reference: ``docs/state-format.md``).

Everything that names a file, a manifest key, a format version or a contributor column lives
here; the other store modules, the reader, finalize and verify go through these names.

* versions: :data:`STATE_VERSION` (``state.json`` and manifests), :data:`CELL_VERSION`
  (cell files), and the versions still read;
* names: :data:`STATE_JSON`, :data:`MANIFEST`, :func:`cell_filename`, :data:`CELL_RE`, ...;
* :class:`Manifest` and :class:`StateMeta`: frozen, versioned, parsed and serialized here;
* :data:`CONTRIBUTOR_SCHEMA`: the contributor row (name, dtype, unit, description), from
  which the HDF5 compound dtype (:data:`CONTRIBUTOR_DTYPE`), the astropy Table
  (:func:`contributors_table`) and the documentation table (:func:`schema_markdown`) are made;
* :data:`MASK_BITS`: the canonical mask bits (``streamcoadd.core.masks``).
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType

import numpy as np

from streamcoadd.core.contributors import (  # noqa: F401 (re-exported)
    CONTRIBUTOR_SCHEMA,
    Column,
    contributor_columns,
    contributors_table,
    schema_markdown,
)
from streamcoadd.core.masks import CANONICAL_PLANES

STATE_FORMAT = "streamcoadd-state"
SHARD_FORMAT = "streamcoadd-shard"
CELL_FORMAT = "streamcoadd-cell"

STATE_VERSION = 2  # state.json and manifest.json written by this streamcoadd
READABLE_STATE_VERSIONS = (1, 2)
CELL_VERSION = 3  # cell files written (1: dense planes, 2: encoded planes, 3: stacked)
READABLE_CELL_VERSIONS = (1, 2, 3)
# the cell file versions each state version may hold
CELL_VERSIONS_OF_STATE = {1: (1, 2), 2: (3,)}

STATE_JSON = "state.json"
SKYMAP_TOML = "skymap.toml"
LEDGER = "ledger.sqlite"
LOCK = "lock"
MANIFEST = "manifest.json"
SHARD_LOCK = "shard.lock"
SHARDS = "shards"  # default shard root of a state (state.json may name another)
MIGRATION_DIR = "shards-v2"  # the shard tree a migration builds (the root once switched)
TMP_SUFFIX = ".tmp"
CELL_RE = re.compile(r"^c(\d+)-(\d+)\.g(\d+)\.h5$")
SHARD_GLOB = "t*/p*/*"  # shard directories under the shard root
HASH_RE = re.compile(r"^[0-9a-f]{64}$")
READ_RETRIES = 50  # reads of a superseded generation before giving up

MASK_BITS: Mapping[str, int] = MappingProxyType(dict(CANONICAL_PLANES))


def cell_filename(cx: int, cy: int, gen: int) -> str:
    """File name of generation ``gen`` of cell (``cx``, ``cy``) in its shard directory."""
    return f"c{cx}-{cy}.g{gen}.h5"


def cell_key(cx: int, cy: int) -> str:
    """The manifest's key of cell (``cx``, ``cy``)."""
    return f"{cx}-{cy}"


def shard_relpath(tract: int, px: int, py: int, band: str) -> str:
    """Shard directory relative to the shard root."""
    return f"t{tract}/p{px}-{py}/{band}"


def parse_shard_relpath(parts: tuple[str, str, str]) -> tuple[int, int, int, str]:
    """``(tract, px, py, band)`` from the last three components of a shard directory."""
    t, p, band = parts
    px, py = (int(v) for v in p[1:].split("-"))
    return int(t[1:]), px, py, band


# --------------------------------------------------------------------------- manifests

class FormatError(ValueError):
    """A manifest or ``state.json`` that does not follow the format."""


@dataclass(frozen=True)
class Manifest:
    """One shard's commit point (``manifest.json``).

    ``cells``: (cx, cy) -> current generation; ``warps``: content hash -> (visit, detector)
    of every warp folded into the shard; ``commit``: number of the last commit;
    ``updated``: its unix time (s)."""

    tract: int
    patch: tuple[int, int]
    band: str
    commit: int = 0
    updated: float | None = None
    cells: Mapping[tuple[int, int], int] = dataclasses.field(default_factory=dict)
    warps: Mapping[str, tuple[int, int]] = dataclasses.field(default_factory=dict)
    version: int = STATE_VERSION

    @classmethod
    def empty(cls, tract: int, patch: tuple[int, int], band: str) -> Manifest:
        return cls(tract=tract, patch=tuple(patch), band=band)

    @classmethod
    def parse(cls, text: str | bytes, where: str = "manifest.json") -> Manifest:
        """Parse and check a manifest; :class:`FormatError` (naming ``where``) if it does
        not follow the format of a readable version."""
        try:
            m = json.loads(text)
            if m.get("format") != SHARD_FORMAT:
                raise FormatError(f"format is {m.get('format')!r}, not {SHARD_FORMAT!r}")
            if m.get("version") not in READABLE_STATE_VERSIONS:
                raise FormatError(f"version {m.get('version')!r} is not one of "
                                  f"{READABLE_STATE_VERSIONS}")
            cells, warps = m["cells"], m["warps"]
            if not isinstance(cells, dict) or not isinstance(warps, dict):
                raise FormatError("'cells' and 'warps' must be objects")
            gens = {}
            for k, g in cells.items():
                cx, cy = (int(v) for v in k.split("-"))
                if not isinstance(g, int) or g < 1:
                    raise FormatError(f"cell {k}: generation {g!r} is not a positive integer")
                gens[(cx, cy)] = g
            wmap = {}
            for h, vd in warps.items():
                if not HASH_RE.match(h) or len(vd) != 2:
                    raise FormatError(f"warp entry {h!r}: {vd!r} is not sha256: "
                                      "[visit, detector]")
                wmap[h] = (int(vd[0]), int(vd[1]))
            px, py = (int(v) for v in m["patch"])
            return cls(tract=int(m["tract"]), patch=(px, py), band=str(m["band"]),
                       commit=int(m["commit"]), updated=m.get("updated"), cells=gens,
                       warps=wmap, version=int(m["version"]))
        except FormatError as e:
            raise FormatError(f"{where}: {e}") from None
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise FormatError(f"{where}: cannot parse: {e}") from None

    def serialize(self) -> bytes:
        return json.dumps({
            "format": SHARD_FORMAT, "version": self.version, "tract": self.tract,
            "patch": list(self.patch), "band": self.band, "commit": self.commit,
            "updated": self.updated,
            "cells": {cell_key(x, y): g for (x, y), g in sorted(self.cells.items())},
            "warps": {h: list(v) for h, v in self.warps.items()},
        }).encode()

    def generation(self, cx: int, cy: int) -> int | None:
        return self.cells.get((cx, cy))


@dataclass(frozen=True)
class StateMeta:
    """``state.json``: written at init, replaced once by a migration.

    ``skymap`` and ``fold`` are the dicts of ``SkyMap.to_dict`` / ``FoldConfig.to_dict``;
    ``shards``: the shard root's name inside the state (``"shards"``; a migrated state
    names the tree the migration built)."""

    version: int
    created: str
    skymap: dict
    fold: dict
    shards: str = SHARDS
    migrated_from: int | None = None

    @classmethod
    def parse(cls, text: str | bytes, where: str = STATE_JSON) -> StateMeta:
        try:
            m = json.loads(text)
        except ValueError as e:
            raise FormatError(f"{where}: cannot parse: {e}") from None
        if not isinstance(m, dict) or m.get("format") != STATE_FORMAT:
            raise FormatError(f"{where}: not a streamcoadd state")
        if m.get("version") not in READABLE_STATE_VERSIONS:
            raise FormatError(f"{where}: state format version {m.get('version')!r} is not "
                              f"one of {READABLE_STATE_VERSIONS}; upgrade streamcoadd")
        try:
            return cls(version=int(m["version"]), created=str(m.get("created", "")),
                       skymap=m["skymap"], fold=m["fold"], shards=str(m.get("shards", SHARDS)),
                       migrated_from=m.get("migrated_from"))
        except KeyError as e:
            raise FormatError(f"{where}: missing key {e}") from None

    def serialize(self) -> bytes:
        d = {"format": STATE_FORMAT, "version": self.version, "created": self.created,
             "skymap": self.skymap, "fold": self.fold}
        if self.version >= 2:
            d["shards"] = self.shards
        if self.migrated_from is not None:
            d["migrated_from"] = self.migrated_from
        return json.dumps(d, indent=2).encode()


# --------------------------------------------------------------------------- contributors
# The schema is declared in the core (the reader and finalize need it without the store);
# the store adds the HDF5 row type: the fixed-size fields, and a vertex count per polygon.

def _row_fields() -> list[tuple[str, str]]:
    out = []
    for c in CONTRIBUTOR_SCHEMA:
        out.append((f"{c.name}_n", "<i4") if c.polygon else (c.name, c.dtype))
    return out


CONTRIBUTOR_DTYPE = np.dtype(_row_fields())
VERTEX_DTYPE = np.dtype("<f8")  # vertices: (V, 2) array, rows in contributor order
