#!/usr/bin/env python3
"""Speedup of Dask scale-out: 2 workers over 1 on a multi-patch warp set.

    PYTHONPATH=. python3 scripts/bench_dask.py                 # default set, 3 repeats
    PYTHONPATH=. python3 scripts/bench_dask.py --warps 96 --workers 1 2 --json out.json

For each run a fresh state is made and the same warps are ingested by:
  - ``single``: the single-process ``Ingestor`` (the plain ``streamcoadd ingest``),
  - ``dask:N``: ``run_distributed`` on a LocalCluster of N single-threaded worker
    processes, started and warmed up (imports) before the clock starts.
Every distributed state is checked against the single-process one (per cell: same
contributors, sums to 1e-10 relative). Reported: wall time (best and median of the
repeats), warps/s, the speedup of each N over 1 worker, the parallel efficiency, and the
machine's load average (this bench is only meaningful on an otherwise idle machine: other
processes take the cores the workers need).

The default set: a 4x4-patch tract of LSST-sized cells (150 px inner + 50 px border,
4x4 inner cells per patch, so 6x6 = 36 cells of 250x250 px per patch) and 128 warps of
700x700 px placed at random, each feeding 1-4 patches, like detector warps; batches of
32 warps. See docs/scale-out.md for the cost model these numbers calibrate.

On a machine shared with other jobs the second worker may get no second core: the load
average is printed, and ``nice -n -10`` (root) gives the bench the cores it measures.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

BENCH_SKYMAP = """\
[skymap]
name = "bench"

[cells]
inner = 150
border = 50
cells_per_patch_inner = 4
cells_in_patch_border = 1

[[tract]]
id = 0
ra = 150.0
dec = 2.2
pixel_scale = 0.2
num_patches = [{n}, {n}]
"""


def make_warps(outdir: Path, skymap_path: Path, n: int, size: int, seed: int = 7) -> list[Path]:
    from streamcoadd.core.masks import CANONICAL_PLANES
    from streamcoadd.core.skymap import load_skymap
    from streamcoadd.io.warp_writer import write_warp

    sm = load_skymap(skymap_path)
    tract = sm.tract(0)
    rng = np.random.default_rng(seed)
    width = tract.num_patches[0] * sm.cells.patch_inner
    yy, xx = np.mgrid[:21, :21] - 10
    psf = np.exp(-(xx ** 2 + yy ** 2) / (2 * 1.7 ** 2))
    psf /= psf.sum()
    cr = 1 << CANONICAL_PLANES["CR"]
    outdir.mkdir(parents=True, exist_ok=True)
    paths = []
    for k in range(n):
        x0, y0 = (int(v) for v in rng.integers(-size // 4, width - 3 * size // 4, 2))
        img = rng.normal(10.0, 1.0, (size, size)).astype(np.float32)
        var = np.full((size, size), rng.uniform(0.5, 2.0), np.float32)
        mask = np.zeros((size, size), np.int32)
        mask[rng.integers(0, size, 200), rng.integers(0, size, 200)] |= cr
        paths.append(write_warp(outdir / f"w{k:04d}.fits", tract=tract, xy0=(x0, y0),
                                image=img, mask=mask, variance=var, psf=psf,
                                visit=100000 + k, detector=k % 189, band="r"))
    return paths


def new_state(path: Path, skymap_path: Path) -> Path:
    from streamcoadd.core.config import FoldConfig
    from streamcoadd.core.skymap import load_skymap
    from streamcoadd.store.state import StateStore

    if path.exists():
        shutil.rmtree(path)
    return StateStore.create(path, load_skymap(skymap_path), FoldConfig())


def run_single(state: Path, files, rc) -> float:
    from streamcoadd.pipeline.ingest import LocalIngestor
    from streamcoadd.store.state import StateStore

    t0 = time.perf_counter()
    with StateStore.open(state, write=True) as store, LocalIngestor(store, rc) as ing:
        for i, f in enumerate(files):  # as 'streamcoadd ingest': the next file prefetched
            ing.submit(f, then=files[i + 1] if i + 1 < len(files) else None)
            if ing.needs_commit():
                ing.commit()
        ing.commit()
    return time.perf_counter() - t0


def _cpu_seconds() -> float:
    import resource

    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def run_dask(state: Path, files, rc, client, batch) -> tuple[float, dict]:
    from dataclasses import asdict

    from streamcoadd.pipeline.dask_executor import run_distributed

    cpu0 = sum(client.run(_cpu_seconds).values()) + _cpu_seconds()
    t0 = time.perf_counter()
    run = run_distributed(state, files, client=client, run_config=rc, batch=batch)
    dt = time.perf_counter() - t0
    cpu = sum(client.run(_cpu_seconds).values()) + _cpu_seconds() - cpu0
    bad = [o for o in run.outcomes if o.status not in ("folded", "no_cells")]
    if bad:
        raise SystemExit(f"unexpected outcomes: {[(o.path, o.status, o.reason) for o in bad]}")
    stats = asdict(run.stats)
    stats["workers"] = len(stats["workers"])
    stats["cpu_seconds"] = cpu  # workers + coordinator (incl. the LocalCluster scheduler)
    return dt, stats


def calibrate(state: Path, files) -> dict:
    """Unit costs of the cost model (docs/scale-out.md), measured in this process:
    q = coordinator per warp (read + sha256 + header probe), R = read + validate + prepare
    one warp on a worker, f = fold one warp into one cell, c = commit one cell generation
    (HDF5 write, fsync, rename; per shard also manifest and directory fsyncs)."""
    from streamcoadd.core.warp import file_hash
    from streamcoadd.io.warp_reader import read_bytes
    from streamcoadd.pipeline.fold_step import fold_into_shard
    from streamcoadd.pipeline.source import contributing_patches, load_warp, probe_warp
    from streamcoadd.store.state import StateStore

    q = R = f = c = 0.0
    cells = shards = 0
    with StateStore.open(state, write=True) as store:
        fold = store.fold
        for path in files:
            t0 = time.perf_counter()
            data = read_bytes(str(path))
            h = file_hash(data)
            p = probe_warp(str(path), data, store.skymap, fold)
            tract = store.skymap.tract(p.warp_id.tract)
            patches = contributing_patches(tract, p.box, fold)
            t1 = time.perf_counter()
            routed = load_warp(str(path), store.skymap, fold, expect_hash=h, patches=patches)
            pw = routed.prepared.with_products()
            t2 = time.perf_counter()
            for patch in patches:
                shard = store.shard(patch, p.band)
                if h not in shard.warps:
                    cells += fold_into_shard(store, shard, routed.inputs[patch], pw)
            t3 = time.perf_counter()
            q, R, f = q + t1 - t0, R + t2 - t1, f + t3 - t2
            shards += len(patches)
        dirty = sum(len(store.shard(pt, b).dirty) for pt, b in
                    {(pt, "r") for pt in store.skymap.tract(0).patches()})
        t0 = time.perf_counter()
        store.commit()
        c = (time.perf_counter() - t0) / max(dirty, 1)
    n = len(files)
    return {"q": q / n, "R": R / n, "f": f / max(cells, 1), "c": c, "cells_per_warp": cells / n,
            "shards_per_warp": shards / n, "cells": dirty}


def predict(cal: dict, n_warps: int, stats: dict, workers: int) -> float:
    """Model wall time of a distributed run from the unit costs and the run's own counts
    (warps read by workers, cell generations written): the worker work divided by the
    workers, plus the coordinator's serial part. Ignores the idle tail of the last wave."""
    work = (stats["warps_read"] * cal["R"] + n_warps * cal["cells_per_warp"] * cal["f"]
            + stats["cells_written"] * cal["c"])
    return work / workers + n_warps * cal["q"]


def start_cluster(n: int):
    import logging

    import distributed

    logging.getLogger("distributed").setLevel(logging.ERROR)

    cluster = distributed.LocalCluster(n_workers=n, threads_per_worker=1, processes=True,
                                       dashboard_address=None, silence_logs=50)
    client = distributed.Client(cluster)
    client.wait_for_workers(n)
    client.run(lambda: __import__("streamcoadd.pipeline.dask_executor") and None)  # warm imports
    return cluster, client


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--warps", type=int, default=128)
    ap.add_argument("--size", type=int, default=700, help="warp side, px")
    ap.add_argument("--skymap", help="skymap TOML (default: the bench skymap, --patches)")
    ap.add_argument("--patches", type=int, default=4,
                    help="bench skymap: N x N patches of 6 x 6 cells of 150 + 2 x 50 px")
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--commit-every", type=int, default=32,
                    help="single: warps per commit; dask: warps per shard task (idle shard)")
    ap.add_argument("--no-single", action="store_true", help="skip the single-process run")
    ap.add_argument("--no-check", action="store_true", help="skip the state comparison")
    ap.add_argument("--workdir", help="keep files here (default: a temporary directory)")
    ap.add_argument("--json", help="write the results here")
    ap.add_argument("--small", action="store_true",
                    help="a quick check: 24 warps of 400 px, 2x2 patches, one repeat")
    args = ap.parse_args()
    if args.small:
        args.warps, args.size, args.patches, args.repeat = 24, 400, 2, 1

    from streamcoadd.core.config import RunConfig

    work = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="bench_dask_"))
    work.mkdir(parents=True, exist_ok=True)
    skymap = Path(args.skymap) if args.skymap else work / "skymap-bench.toml"
    if not args.skymap:
        skymap.write_text(BENCH_SKYMAP.replace("{n}", str(args.patches)))
    t0 = time.perf_counter()
    files = make_warps(work / "warps", skymap, args.warps, args.size)
    print(f"{len(files)} warps of {args.size}x{args.size} px written in "
          f"{time.perf_counter() - t0:.1f} s under {work}", flush=True)
    rc = RunConfig(commit_every=args.commit_every, commit_interval=1e9)

    results: dict[str, dict] = {}
    ref = None
    cal = calibrate(new_state(work / "state-calibrate", skymap), files)
    print(f"  unit costs: coordinator q = {cal['q'] * 1e3:.1f} ms/warp, read+prepare R = "
          f"{cal['R'] * 1e3:.0f} ms/warp, fold f = {cal['f'] * 1e3:.2f} ms/cell, commit c = "
          f"{cal['c'] * 1e3:.1f} ms/cell; {cal['cells_per_warp']:.0f} cells and "
          f"{cal['shards_per_warp']:.2f} shards per warp", flush=True)
    # All clusters up front, then the runs interleaved (single, dask:1, dask:2, single, ...)
    # so that a change in the machine's background load hits every configuration alike.
    clusters = {n: start_cluster(n) for n in args.workers}
    try:
        names = ([] if args.no_single else ["single"]) + [f"dask:{n}" for n in args.workers]
        for name in names:
            results[name] = {"times": [], "stats": None}
        for r in range(args.repeat):
            for name in names:
                state = new_state(work / f"state-{name.replace(':', '')}", skymap)
                if name == "single":
                    cpu0 = _cpu_seconds()
                    dt = run_single(state, files, rc)
                    cpu = _cpu_seconds() - cpu0
                    ref = state
                    results[name]["stats"] = {"cpu_seconds": cpu}
                    print(f"  single      run {r + 1}: {dt:6.2f} s  ({cpu:.1f} CPU-s)",
                          flush=True)
                else:
                    n = int(name.split(":")[1])
                    dt, stats = run_dask(state, files, rc, clusters[n][1], args.commit_every)
                    results[name]["stats"] = stats
                    print(f"  dask:{n:<2}     run {r + 1}: {dt:6.2f} s  ({stats['tasks']} tasks, "
                          f"{stats['task_seconds']:.1f} task-s, {stats['cpu_seconds']:.1f} "
                          f"CPU-s, {stats['workers']} worker(s), {stats['shard_cached']} shard "
                          f"cache hits, {stats['warps_read']} warp reads)", flush=True)
                results[name]["times"].append(dt)
    finally:
        for cluster, client in clusters.values():
            client.close()
            cluster.close()
    for n in args.workers:
        stats = results[f"dask:{n}"]["stats"]
        if ref is not None and not args.no_check:
            sys.path.insert(0, str(ROOT / "tests"))
            from test_distributed import assert_same_state

            ncell = assert_same_state(ref, work / f"state-dask{n}")
            print(f"  dask:{n} state == single-process state ({ncell} cells, 1e-10)")
        stats["predicted_s"] = predict(cal, len(files), stats, n)
        print(f"  dask:{n} model: {stats['predicted_s']:.2f} s ({stats['warps_read']} warp "
              f"reads, {stats['cells_written']} cell generations written)")

    print()
    print(f"{'run':<10} {'best s':>8} {'median s':>9} {'warps/s':>8} {'CPU-s':>7} "
          f"{'speedup':>8} {'efficiency':>10}")
    base = results.get("dask:1")
    for name, r in results.items():
        best, med = min(r["times"]), statistics.median(r["times"])
        r.update(best=best, median=med, warps_per_s=len(files) / best)
        cpu = (r["stats"] or {}).get("cpu_seconds", float("nan"))
        line = f"{name:<10} {best:8.2f} {med:9.2f} {len(files) / best:8.2f} {cpu:7.1f}"
        if base and name.startswith("dask:"):
            n = int(name.split(":")[1])
            r["speedup_vs_1"] = min(base["times"]) / best
            r["speedup_vs_1_median"] = statistics.median(base["times"]) / med
            line += f" {r['speedup_vs_1']:7.2f}x {r['speedup_vs_1'] / n:9.0%}"
        print(line)
    load = os.getloadavg()
    print(f"\nload average at the end: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f} on "
          f"{os.cpu_count()} CPU(s)")
    if "dask:2" in results and base:
        s = results["dask:2"]["speedup_vs_1"]
        print(f"speedup 2 workers / 1 worker: {s:.2f}x (best of {args.repeat}), "
              f"{results['dask:2']['speedup_vs_1_median']:.2f}x (median); target >= 1.6x")
    if args.json:
        Path(args.json).write_text(json.dumps({
            "warps": len(files), "size": args.size, "skymap": str(skymap), "unit_costs": cal,
            "commit_every": args.commit_every, "loadavg": load, "cpus": os.cpu_count(),
            "results": results}, indent=2, default=str))
    if not args.workdir:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
