"""An upper bound on ingest throughput from the work the spec makes mandatory per warp,
whatever the accumulator design.

Before a warp can contribute to any cell, streamcoadd must, for every warp:

1. read the file's bytes (``streamcoadd.warp._read_bytes``);
2. SHA-256 them: the content hash is the replay / dedup key (``file_hash``);
3. parse and validate the FITS file (``read_warp(..., data=bytes, content_hash=...)``);
4. weight it by 1 / (3-sigma, 2-iteration clipped mean of its good variances), in float64
   (``good_variances`` then ``weight_from_variances``; nothing to do when the primary
   header has ``WEIGHT``).

This script times those four steps separately, single thread (``time.perf_counter``), in
one fresh process after ``retain_freed_memory()`` (as ingest does), on the given warps
(normally already in the page cache). Two further steps are timed for information only,
as ``streamcoadd.loader.load_warp`` calls them, and are *not* part of the mandatory sum:
``prepare_warp(..., consume=True, weight=w)`` (bad-pixel interpolation, mask planes) and
the overlap rule (``shard_inputs`` for every patch the warp overlaps).

The first warp pays page faults for fresh memory; it is reported separately, and the
per-step medians are over the other warps. The implied bound is

    upper bound on input Mpix/s = cores x Mpix per warp / mandatory seconds per warp

with cores = ``os.cpu_count()``: perfect parallelism over all cores and *nothing else*
done (no interpolation, no accumulation, no persistence, no second pass). A throughput
target above this bound cannot be met by any design that does the mandatory work.

    python3 scripts/bench_bound.py WARP... --skymap config/skymap-lsst.toml --json out.json
"""

from __future__ import annotations

import time

T_START = time.perf_counter()

import argparse
import json
import os
import resource
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from streamcoadd.config import FoldConfig  # noqa: E402
from streamcoadd.fold import (good_variances, prepare_warp, shard_inputs,  # noqa: E402
                              weight_from_variances)
from streamcoadd.memory import retain_freed_memory  # noqa: E402
from streamcoadd.skymap import load_skymap  # noqa: E402
from streamcoadd.warp import _read_bytes, file_hash, read_warp  # noqa: E402

MANDATORY = ("read", "hash", "parse", "weight")
STEPS = ("read", "hash", "parse", "good_variances", "clip", "weight", "prepare", "shard")


def time_warp(path: str, skymap, fold: FoldConfig) -> dict:
    """Seconds of each step on one warp (the warp is prepared as the loader does)."""
    pc, tt = time.perf_counter, time.thread_time
    t = {}
    c0 = tt()
    a = pc()
    data = _read_bytes(path)
    b = pc()
    h = file_hash(data)
    c = pc()
    warp = read_warp(path, skymap, fold.bad_planes, fold.noise_realizations, data=data,
                     content_hash=h)
    d = pc()
    t.update(read=b - a, hash=c - b, parse=d - c)
    del data  # the parsed arrays are copies (as in load_warp)
    if warp.weight_override is None:
        var = good_variances(warp, fold)
        e = pc()
        w = weight_from_variances(var, path)
        f = pc()
        del var
        t.update(good_variances=e - d, clip=f - e, weight=f - d, weight_from_header=False)
    else:  # header WEIGHT: nothing mandatory to compute
        w = warp.weight_override
        f = pc()
        t.update(good_variances=0.0, clip=0.0, weight=0.0, weight_from_header=True)
    mpix = warp.mask.size / 1e6
    cpu_mandatory = tt() - c0
    prepared = prepare_warp(warp, fold, consume=True, weight=w)
    g = pc()
    tract = skymap.tract(warp.id.tract)
    inputs = {patch: shard_inputs(prepared, tract, patch, fold)
              for patch in tract.patches_overlapping(warp.box)}
    k = pc()
    t.update(prepare=g - f, shard=k - g, mpix=mpix, weight_value=w,
             patches=len(inputs), cells=sum(len(v) for v in inputs.values()))
    t["mandatory"] = sum(t[s] for s in MANDATORY)
    t["mandatory_cpu"] = cpu_mandatory  # thread CPU time of the same steps (a cross-check)
    return t


def summarise(per: list[dict], cores: int) -> dict:
    """Per-step medians over the warps after the first (all of them if there is only one),
    the mandatory sum, and the bound."""
    steady = per[1:] or per
    med = {s: statistics.median(p[s] for p in steady) for s in STEPS}
    mandatory = sum(med[s] for s in MANDATORY)
    mpix = statistics.median(p["mpix"] for p in steady)
    return dict(
        cores=cores, warps=len(per), warps_in_medians=len(steady), mpix_per_warp=mpix,
        median_s=med,
        mandatory_s=mandatory,  # sum of the four step medians
        mandatory_median_of_sums_s=statistics.median(p["mandatory"] for p in steady),
        mandatory_cpu_s=statistics.median(p["mandatory_cpu"] for p in steady),
        informational_s=med["prepare"] + med["shard"],
        bound_mpix_s=cores * mpix / mandatory if mandatory > 0 else float("nan"),
        first_warp_s={s: per[0][s] for s in (*STEPS, "mandatory")},
        weight_from_header=sum(bool(p["weight_from_header"]) for p in per),
    )


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("warps", nargs="+")
    ap.add_argument("--skymap", required=True)
    ap.add_argument("--json", help="write the raw results here (else print them)")
    a = ap.parse_args(argv)
    out = {"import_s": time.perf_counter() - T_START}
    out["malloc_tuning"] = retain_freed_memory()
    skymap = load_skymap(a.skymap)
    fold = FoldConfig()
    cores = os.cpu_count() or 1
    t0 = time.perf_counter()
    per = [time_warp(str(p), skymap, fold) for p in a.warps]
    out["total_s"] = time.perf_counter() - t0
    out.update(summarise(per, cores))
    out["per_warp"] = per
    out["maxrss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    text = json.dumps(out, indent=1)
    if a.json:
        Path(a.json).write_text(text)
    else:
        print(text)
    m = out["median_s"]
    print(f"{len(per)} warps, {out['mpix_per_warp']:.2f} Mpix each; medians over "
          f"{out['warps_in_medians']}: read {m['read']:.3f} s, hash {m['hash']:.3f} s, "
          f"parse {m['parse']:.3f} s, weight {m['weight']:.3f} s (good variances "
          f"{m['good_variances']:.3f} + clip {m['clip']:.3f}) = mandatory "
          f"{out['mandatory_s']:.3f} s; bound {out['bound_mpix_s']:.1f} Mpix/s on {cores} "
          f"cores. Informational: prepare {m['prepare']:.3f} s, shard {m['shard']:.3f} s.",
          file=sys.stderr)


if __name__ == "__main__":
    main()
