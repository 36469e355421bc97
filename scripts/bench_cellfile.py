"""Commit encode time of one cell file, this checkout against another (``--old PATH``: a
checkout to import streamcoadd from, e.g. a ``git worktree`` of commit 14661a2, state
format 1). Each side runs in its own interpreter; prints ms per cell (median of repeats)
for an LSST-size cell (outer 250 x 250 px): every input covering the whole box, a sparse
interpolated plane, two mask bits, one propagated plane, ``N`` contributors.

    python scripts/bench_cellfile.py --old /tmp/oldsrc
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

CHILD = r"""
import json, sys, time, tempfile, pathlib
import numpy as np
from streamcoadd.core.fold import CellAccumulator, CellSums, Contributor
from streamcoadd.core.skymap import Box, CellId, PatchId
from streamcoadd.store import cellfile
n_rows, repeats = int(sys.argv[1]), int(sys.argv[2])
rng = np.random.default_rng(0)
shape = (250, 250)
s = CellSums.zeros(shape, 35, 1)
s.sum_wI[...] = rng.normal(size=shape); s.sum_w2var[...] = rng.random(shape)
s.noise[...] = rng.normal(size=s.noise.shape); s.psf_sum[...] = rng.random((35, 35))
s.w_full = s.psf_w = float(n_rows)
sp = np.zeros(shape); sp.reshape(-1)[rng.choice(shape[0] * shape[1], 600)] = 0.3
s.interp = sp; s.planes = {"SAT": sp.copy()}
s.bit_counts = {1: (sp > 0).astype(np.int32), 5: (rng.random(shape) < 0.01).astype(np.int32)}
fields = {f for f in CellSums.__dataclass_fields__}
if "n_full" in fields:
    s.n_full, s.n_interp, s.plane_counts = n_rows, (sp > 0).astype(np.int32), {"SAT": (sp > 0).astype(np.int32)}
    s.counted = True
cf = set(Contributor.__dataclass_fields__)
def row(i):
    kw = dict(visit=i, detector=i % 189, weight=1.0, overlap_fraction=1.0, good_fraction=0.9,
              fallback=False, psf_ixx=2.0, psf_iyy=2.1, psf_ixy=0.1, psf_flag=False,
              content_hash=f"{i:064x}", folded_at=1.7e9, instrument="LSSTCam",
              physical_filter="r_57", mjd=60000.0)
    if "footprint" in cf:
        kw.update(psf_sum=1.0, footprint=((0.0, 0.0), (4000.0, 0.0), (4000.0, 4000.0), (0.0, 4000.0)))
    return Contributor(**kw)
s.contributors = [row(i) for i in range(n_rows)]
acc = CellAccumulator(cell=CellId(PatchId(0, 1, 1), 2, 2), outer=Box(0, 0, 250, 250))
acc.groups["good"] = s
d = pathlib.Path(tempfile.mkdtemp())
if sys.argv[3] == "nosync":  # the encode alone (the fsync is the disk's, not the format's)
    cellfile.fsync_file = lambda p: None
times = []
for k in range(repeats):
    s.contributors.append(row(n_rows + k))  # one more input per commit, as in a stream
    t = time.perf_counter()
    cellfile.write_cell_file(d / f"c2-2.g{k + 1}.h5", acc, "r", k + 1, Box(50, 50, 200, 200))
    times.append(time.perf_counter() - t)
size = (d / f"c2-2.g{repeats}.h5").stat().st_size
import h5py
with h5py.File(d / f"c2-2.g{repeats}.h5", "r") as f:
    objs = []; f.visititems(lambda n, o: objs.append(o))
    nattr = len(f.attrs) + sum(len(o.attrs) for o in objs)
    nds = sum(isinstance(o, h5py.Dataset) for o in objs)
print(json.dumps({"ms": 1e3 * float(np.median(times)), "bytes": size, "datasets": nds,
                  "attributes": nattr}))
"""


def run(pythonpath: str, n_rows: int, repeats: int, sync: bool) -> dict:
    env = dict(os.environ, PYTHONPATH=pythonpath)
    p = subprocess.run([sys.executable, "-c", CHILD, str(n_rows), str(repeats),
                        "sync" if sync else "nosync"], env=env,
                       capture_output=True, text=True, check=True, cwd="/")
    return json.loads(p.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--old", help="checkout of the previous format to compare with")
    ap.add_argument("--rows", type=int, nargs="+", default=[30, 1000, 10000])
    ap.add_argument("--repeats", type=int, default=20)
    a = ap.parse_args(argv)
    print("| contributors | format | encode+write ms/cell (no fsync) | with fsync | bytes | "
          "datasets | attributes |")
    print("|---|---|---|---|---|---|---|")
    for n in a.rows:
        sides = [("old", a.old)] if a.old else []
        for name, path in [*sides, ("new", str(ROOT))]:
            r = run(path, n, a.repeats, False)
            rs = run(path, n, a.repeats, True)
            print(f"| {n} | {name} | {r['ms']:.2f} | {rs['ms']:.2f} | {r['bytes']} | "
                  f"{r['datasets']} | {r['attributes']} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
