"""``streamcoadd finalize --butler REPO``: a real data butler repository (SQLite registry) in
a temporary directory, created by the product; ``Butler(REPO).get`` returns the newest
coadd after a second finalize (more warps arrived), the older run stays readable, the
dimension records are those lsst.skymap would register.
"""

from __future__ import annotations

import numpy as np
import pytest
from common import SKYMAP_FILE, TRACT, skip_module_without_rubin

skip_module_without_rubin()

from lsst.daf.butler import Butler
from lsst.images import Box as LsstBox
from lsst.sphgeom import LonLat, UnitVector3d
from warpgen import make_warp

from streamcoadd.cli.main import main
from streamcoadd.core.skymap import PatchId

COLLECTION = "streamcoadd/deep_coadd"


def _get(repo, collections=COLLECTION, **kw):
    return Butler(str(repo)).get("deep_coadd", skymap="demo", tract=0, patch=0, band="r",
                                 collections=collections, **kw)


@pytest.fixture(scope="module")
def two_finalizes(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("butler")
    st, repo = tmp / "state", tmp / "repo"
    assert main(["init", str(st), "--skymap", str(SKYMAP_FILE)]) == 0
    make_warp(tmp / "w1" / "a.fits", TRACT, visit=1, detector=0, xy0=(-40, -40),
              shape=(200, 200))
    assert main(["ingest", str(st), "--quiet", str(tmp / "w1")]) == 0
    assert main(["finalize", str(st), "--out", str(tmp / "out1"), "--butler", str(repo)]) == 0
    first = _get(repo)
    run1 = Butler(str(repo)).collections.get_info(COLLECTION).children[0]
    make_warp(tmp / "w2" / "b.fits", TRACT, visit=2, detector=0, xy0=(-30, -30),
              shape=(200, 200))
    assert main(["ingest", str(st), "--quiet", str(tmp / "w2")]) == 0
    assert main(["finalize", str(st), "--out", str(tmp / "out2"), "--butler", str(repo),
                 "--compression", "lossy16"]) == 0
    return {"repo": repo, "first": first, "run1": run1, "out2": tmp / "out2"}


def test_second_finalize_is_what_get_returns(two_finalizes):
    t = two_finalizes
    first, newest = t["first"], _get(t["repo"])
    assert set(first.provenance.inputs["visit"]) == {1}
    assert set(newest.provenance.inputs["visit"]) == {1, 2}
    children = Butler(str(t["repo"])).collections.get_info(COLLECTION).children
    assert len(children) == 2 and children[1] == t["run1"]
    old = _get(t["repo"], collections=t["run1"])  # the older run stays readable
    np.testing.assert_array_equal(old.image.array, first.image.array)
    # the butler keeps our file byte for byte (lossy16 chosen at finalize)
    from lsst.images.cells import CellCoadd

    ours = CellCoadd.read(str(next(t["out2"].glob("*p0-0_r_cellcoadd.fits"))))
    np.testing.assert_array_equal(newest.image.array, ours.image.array)
    assert newest.metadata["STREAMCOADD_COMPRESSION"] == "lossy16"


def test_components_and_subregion(two_finalizes):
    repo = two_finalizes["repo"]
    b = Butler(str(repo))
    full = _get(repo)
    bb = full.image.bbox
    box = LsstBox.factory[bb.y.start + 20:bb.y.start + 70, bb.x.start + 33:bb.x.start + 90]
    sub = b.get("deep_coadd", skymap="demo", tract=0, patch=0, band="r",
                collections=COLLECTION, parameters={"bbox": box})
    np.testing.assert_array_equal(sub.image.array, full.image.array[20:70, 33:90])
    psf = b.get("deep_coadd.psf", skymap="demo", tract=0, patch=0, band="r",
                collections=COLLECTION)
    assert len(psf.bounds.missing) == len(full.psf.bounds.missing)


def test_dimension_records(two_finalizes):
    reg = Butler(str(two_finalizes["repo"])).registry
    sk = list(reg.queryDimensionRecords("skymap", skymap="demo"))
    assert len(sk) == 1 and len(sk[0].hash) == 20
    patches = {r.id: r for r in reg.queryDimensionRecords("patch", skymap="demo", tract=0)}
    assert sorted(patches) == [0, 1, 2, 3]
    wcs = TRACT.wcs()
    for pid, rec in patches.items():
        p = PatchId(0, pid % 2, pid // 2)
        assert (rec.cell_x, rec.cell_y) == (p.x, p.y)
        inner = TRACT.patch_inner_box(p)
        c = wcs.pixel_to_world((inner.x0 + inner.x1) / 2, (inner.y0 + inner.y1) / 2)
        assert rec.region.contains(UnitVector3d(LonLat.fromDegrees(c.ra.deg, c.dec.deg)))
    bands = {r.band for r in reg.queryDimensionRecords("physical_filter")}
    assert "r" in bands
