"""Put ``CellCoadd`` files into a Rubin data butler (``lsst-daf-butler``, SQLite registry).

What :func:`put_coadds` does, in one call:

* creates the repository (``Butler.makeRepo``) if ``REPO/butler.yaml`` is missing;
* registers the dimension records the coadds need, idempotently: the skymap (with a
  sha1 of streamcoadd's skymap description as its hash), the tracts and all their patches
  with their sky regions (as lsst.skymap: the tract box and each patch's *outer* box,
  pixel edges), and each instrument and physical_filter with its band (a band exists in
  the registry only through a physical_filter);
* registers the dataset type (``deep_coadd`` by default; dimensions skymap, tract, patch,
  band; storage class ``CellCoadd``);
* ingests the files byte for byte into a new RUN collection
  ``<collection>/run-<UTC time>-<random>`` and puts that run first in the CHAINED
  collection ``<collection>``, so ``Butler(REPO).get(..., collections=<collection>)``
  returns the newest finalize while older runs stay readable.

Needs Python >= 3.12 and ``lsst-daf-butler`` (imported inside the functions). SQLite
takes one writer at a time: callers serialize calls on one repository.
"""

from __future__ import annotations

import hashlib
import json
import os
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from streamcoadd.core.skymap import Box, SkyMap, Tract
from streamcoadd.io.optional import require

INSTALL_HINT = "--butler needs Python >= 3.12 and pip install 'streamcoadd[rubin]'"
DEFAULT_COLLECTION = "streamcoadd/deep_coadd"
DEFAULT_DATASET_TYPE = "deep_coadd"


def require_butler() -> None:
    """Raise :class:`UserError` with one line saying what to install when
    lsst-daf-butler is not importable."""
    require(("lsst.daf.butler", "lsst.sphgeom"), INSTALL_HINT)


@dataclass(frozen=True)
class CoaddFile:
    """A written CellCoadd file and its data id (``patch``: sequential id ``nx*y + x``)."""

    path: Path
    tract: int
    patch: int
    band: str


@dataclass(frozen=True)
class PutResult:
    """What :func:`put_coadds` did: the new RUN collection and the dataset refs."""

    repo: Path
    run: str
    collection: str
    refs: tuple


def skymap_hash(skymap: SkyMap) -> bytes:
    """sha1 (20 bytes, as lsst.skymap's) of the skymap's description: a skymap of the same
    name but other geometry is refused by the registry."""
    return hashlib.sha1(json.dumps(skymap.to_dict(), sort_keys=True).encode()).digest()


def sky_polygon(tract: Tract, box: Box):
    """``lsst.sphgeom.ConvexPolygon`` of a pixel box's outer edges on the tract WCS
    (corners at pixel centres -/+ 0.5, as lsst.skymap's ``Box2D(Box2I)``)."""
    from lsst.sphgeom import ConvexPolygon, LonLat, UnitVector3d

    xs = np.array([box.x0, box.x1, box.x1, box.x0], float) - 0.5
    ys = np.array([box.y0, box.y0, box.y1, box.y1], float) - 0.5
    sky = tract.wcs().pixel_to_world(xs, ys).icrs
    return ConvexPolygon([UnitVector3d(LonLat.fromDegrees(float(r), float(d)))
                          for r, d in zip(sky.ra.deg, sky.dec.deg)])


def open_repo(repo: str | os.PathLike):
    """A writeable Butler on ``repo``, created first if it has no ``butler.yaml``."""
    require_butler()
    from lsst.daf.butler import Butler

    repo = Path(repo)
    if not (repo / "butler.yaml").exists():
        repo.mkdir(parents=True, exist_ok=True)
        Butler.makeRepo(str(repo))
    return Butler.from_config(str(repo), writeable=True)


def register_dimensions(butler, skymap: SkyMap, tract_ids: Iterable[int],
                        filters: Mapping[str, Mapping[str, str]]) -> None:
    """Insert the skymap, tract, patch, instrument and physical_filter records
    (idempotent; a conflicting definition raises). ``filters``:
    ``{instrument: {physical_filter: band}}``."""
    reg = butler.registry
    nx_max = max(t.num_patches[0] for t in skymap.tracts.values())
    ny_max = max(t.num_patches[1] for t in skymap.tracts.values())
    reg.syncDimensionData("skymap", {
        "name": skymap.name, "hash": skymap_hash(skymap),
        "tract_max": max(skymap.tracts) + 1, "patch_nx_max": nx_max, "patch_ny_max": ny_max})
    for t in sorted(set(tract_ids)):
        tract = skymap.tract(t)
        reg.insertDimensionData("tract", {"skymap": skymap.name, "id": t,
                                          "region": sky_polygon(tract, tract.inner_box)},
                                skip_existing=True)
        nx = tract.num_patches[0]
        rows = [{"skymap": skymap.name, "tract": t, "id": nx * p.y + p.x, "cell_x": p.x,
                 "cell_y": p.y, "region": sky_polygon(tract, tract.patch_outer_box(p))}
                for p in tract.patches()]
        reg.insertDimensionData("patch", *rows, skip_existing=True)
    for inst, pfs in sorted(filters.items()):
        reg.syncDimensionData("instrument", {"name": inst})
        for pf, band in sorted(pfs.items()):
            reg.syncDimensionData("physical_filter", {"instrument": inst, "name": pf,
                                                      "band": band})


def put_coadds(repo: str | os.PathLike, files: Iterable[CoaddFile], *, skymap: SkyMap,
               filters: Mapping[str, Mapping[str, str]],
               collection: str = DEFAULT_COLLECTION,
               dataset_type: str = DEFAULT_DATASET_TYPE,
               transfer: str = "copy") -> PutResult:
    """Ingest CellCoadd files into ``repo`` (module docstring): one new RUN collection,
    made the first child of the CHAINED ``collection``. ``transfer``: butler transfer
    mode (``copy``, ``move``, ``hardlink``, ...); the files are kept byte for byte."""
    files = list(files)
    butler = open_repo(repo)
    from lsst.daf.butler import CollectionType, DatasetRef, DatasetType, FileDataset

    register_dimensions(butler, skymap, [f.tract for f in files], filters)
    dt = DatasetType(dataset_type, dimensions=["skymap", "tract", "patch", "band"],
                     storageClass="CellCoadd", universe=butler.dimensions)
    butler.registry.registerDatasetType(dt)
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S%fZ")
    run = f"{collection}/run-{stamp}-{uuid.uuid4().hex[:6]}"
    butler.collections.register(run, CollectionType.RUN)
    refs = []
    for f in files:
        did = butler.registry.expandDataId(skymap=skymap.name, tract=f.tract, patch=f.patch,
                                           band=f.band)
        ref = DatasetRef(dt, did, run=run)
        butler.ingest(FileDataset(path=str(Path(f.path).resolve()), refs=[ref]),
                      transfer=transfer)
        refs.append(ref)
    butler.collections.register(collection, CollectionType.CHAINED)
    butler.collections.prepend_chain(collection, run)
    return PutResult(repo=Path(repo), run=run, collection=collection, refs=tuple(refs))
