"""Finalize timings for the benchmark, each run in a fresh process by bench.py.

``cell``: open the state and finalize one cell with the reader API
(``streamcoadd.open_state(STATE).cell(...)``), cold: the shard's files are first evicted
from the page cache with ``posix_fadvise(DONTNEED)`` (they are clean: the commit fsynced
them), so the cell file and manifest are really read from disk. Imports are not timed
(reported separately).

``patch``: the same, then ``streamcoadd finalize STATE --out DIR --patch X,Y`` through the
CLI entry point in-process (imports excluded), also cold.

    python3 scripts/bench_finalize.py cell STATE X,Y CX,CY --json J
    python3 scripts/bench_finalize.py patch STATE X,Y --out DIR --json J [--workers N]
"""

from __future__ import annotations

import json
import os
import resource
import sys
import time
from pathlib import Path

T_START = time.perf_counter()
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import streamcoadd  # noqa: E402
from streamcoadd import open_state  # noqa: E402
from streamcoadd.cli.main import main as cli
from streamcoadd.core.coadd import coadd_cell  # noqa: E402
from streamcoadd.core.skymap import CellId, PatchId  # noqa: E402

T_IMPORTED = time.perf_counter()


def evict(root: Path) -> int:
    """Drop the page cache of every file under ``root``; returns the number of files."""
    n = 0
    for dirpath, _, files in os.walk(root):
        for f in files:
            p = os.path.join(dirpath, f)
            try:
                fd = os.open(p, os.O_RDONLY)
            except OSError:
                continue
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
                n += 1
            finally:
                os.close(fd)
    return n


def parse_pair(s):
    return tuple(int(v) for v in s.split(","))


def main():
    what, state = sys.argv[1], sys.argv[2]
    args = sys.argv[3:]
    out = args[args.index("--json") + 1]
    res = dict(import_s=T_IMPORTED - T_START)
    px, py = parse_pair(args[0])
    shards = Path(state) / "shards"
    res["evicted_files"] = evict(shards)
    if what == "cell":
        cx, cy = parse_pair(args[1])
        t0 = time.perf_counter()
        st = open_state(state)
        t1 = time.perf_counter()
        tract = next(iter(st.skymap.tracts))
        cell = CellId(PatchId(tract, px, py), cx, cy)
        band = st.bands()[0]
        t2 = time.perf_counter()
        got = st.store.read_cell(cell, band)
        t3 = time.perf_counter()
        co = coadd_cell(got[0], band, st.skymap.tract(tract), st.fold)
        t4 = time.perf_counter()
        # the one-call API a user would time, warm now (same process, files cached)
        co2 = st.cell(cell, band)
        t5 = time.perf_counter()
        res.update(open_s=t1 - t0, bands_s=t2 - t1, read_s=t3 - t2, coadd_s=t4 - t3,
                   cold_total_s=t4 - t0, cold_read_plus_coadd_s=t4 - t2,
                   warm_cell_s=t5 - t4, n_inputs=co.n_inputs, same=bool(co2.n_inputs == co.n_inputs))
    else:
        dest = args[args.index("--out") + 1]
        extra = ["--workers", args[args.index("--workers") + 1]] if "--workers" in args else []
        r0 = resource.getrusage(resource.RUSAGE_SELF)
        c0 = resource.getrusage(resource.RUSAGE_CHILDREN)
        t0 = time.perf_counter()
        rc = cli(["finalize", state, "--out", dest, "--patch", f"{px},{py}", *extra])
        t1 = time.perf_counter()
        r1 = resource.getrusage(resource.RUSAGE_SELF)
        c1 = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpu = lambda a, b: (b.ru_utime + b.ru_stime) - (a.ru_utime + a.ru_stime)  # noqa: E731
        # CPU seconds of this process and of its worker processes (they are waited for),
        # and the peak RSS of each (workers: the largest one)
        res.update(patch_s=t1 - t0, rc=rc, cpu_main_s=cpu(r0, r1), cpu_workers_s=cpu(c0, c1),
                   maxrss_main_mb=r1.ru_maxrss / 1024, maxrss_worker_mb=c1.ru_maxrss / 1024,
                   out_bytes=sum(f.stat().st_size for f in Path(dest).glob("*")))
    Path(out).write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
