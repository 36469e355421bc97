"""An upper bound on ingest throughput from the work the spec makes mandatory per warp,
whatever the accumulator design.

Before a warp can contribute to any cell, streamcoadd must, for every warp:

1. read the file's bytes (``streamcoadd.io.warp_reader.read_bytes``);
2. SHA-256 them: the content hash is the replay / dedup key (``file_hash``);
3. parse and validate the FITS file (``read_warp(..., data=bytes, content_hash=...)``);
4. weight it by 1 / (3-sigma, 2-iteration clipped mean of its good variances), in float64
   (``good_variances`` then ``weight_from_variances``; nothing to do when the primary
   header has ``WEIGHT``).

This script times those four steps separately, single thread (``time.perf_counter``), in
one fresh process after ``retain_freed_memory()`` (as ingest does), on the given warps
(normally already in the page cache). Two further steps are timed for information only,
as ``streamcoadd.pipeline.loader.load_warp`` calls them, and are *not* part of the mandatory sum:
``prepare_warp(..., consume=True, weight=w)`` (bad-pixel interpolation, mask planes) and
the overlap rule (``shard_inputs`` for every patch the warp overlaps).

The first warp pays page faults for fresh memory; it is reported separately, and the
per-step medians are over the other warps. The implied bound is

    upper bound on input Mpix/s = cores x Mpix per warp / mandatory seconds per warp

with cores = ``os.cpu_count()``: perfect parallelism over all cores and *nothing else*
done (no interpolation, no accumulation, no persistence, no second pass). A throughput
target above this bound cannot be met by any design that does the mandatory work.

With ``--state-cells K`` (the number of distinct cells the warps reach), a second,
end-to-end lower bound on the wall time of an ingest of the given warps adds three costs
that no design can avoid either, each measured here at its cheapest:

- importing the core stack the product is built on (numpy, astropy.io.fits, h5py) in a
  fresh Python process;
- adding every input pixel once to the two float64 sums the spec requires (Σw·I,
  Σw²·var), ``tmp = plane·w; acc += tmp`` in cache-sized row blocks: the minimum any
  accumulator design does (ours adds each pixel once per covering cell, ~3.6 times);
- writing the minimum durable state, the two float64 sums over the outer box of each of
  the K cells (K × 2 × outer² × 8 bytes), to a file in ``--write-dir`` and fsyncing it:
  after the last warp is folded, before the ingest can report it durable.

    lower bound on wall = imports + N × (mandatory + accumulate) / cores + durable write

    python3 scripts/bench_bound.py WARP... --skymap config/skymap-lsst.toml --json out.json \
        [--state-cells 676 --write-dir /path/on/the/state/filesystem]
"""

from __future__ import annotations

import time

T_START = time.perf_counter()

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

from streamcoadd.core.config import FoldConfig  # noqa: E402
from streamcoadd.core.fold import (
    good_variances,
    prepare_warp,
    shard_inputs,
    weight_from_variances,
)
from streamcoadd.core.skymap import load_skymap  # noqa: E402
from streamcoadd.core.warp import file_hash  # noqa: E402
from streamcoadd.io.warp_reader import read_bytes as read_bytes
from streamcoadd.io.warp_reader import read_warp
from streamcoadd.pipeline.memory import retain_freed_memory  # noqa: E402

MANDATORY = ("read", "hash", "parse", "weight")
STEPS = ("read", "hash", "parse", "good_variances", "clip", "weight", "prepare", "shard",
         "accumulate")


def time_warp(path: str, skymap, fold: FoldConfig) -> dict:
    """Seconds of each step on one warp (the warp is prepared as the loader does)."""
    pc, tt = time.perf_counter, time.thread_time
    t = {}
    c0 = tt()
    a = pc()
    data = read_bytes(path)
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
    t["accumulate"] = accumulate_once(prepared.image, prepared.variance, w)
    t.update(prepare=g - f, shard=k - g, mpix=mpix, weight_value=w,
             patches=len(inputs), cells=sum(len(v) for v in inputs.values()))
    t["mandatory"] = sum(t[s] for s in MANDATORY)
    t["mandatory_cpu"] = cpu_mandatory  # thread CPU time of the same steps (a cross-check)
    return t


_ACC: dict = {}  # warp-shaped float64 sums, allocated (and faulted in) once
BLOCK_ROWS = 32  # rows per block: a block of tmp stays in the L2 cache


def accumulate_once(image: np.ndarray, variance: np.ndarray, w: float) -> float:
    """Seconds to add one warp's pixels once to two float64 sums, Σw·I and Σw²·var
    (the first call also allocates and faults in the sums; it is the first warp, which
    the medians skip)."""
    if _ACC.get("shape") != image.shape:
        _ACC.update(shape=image.shape, sums=[np.zeros(image.shape) for _ in range(2)],
                    tmp=np.empty((BLOCK_ROWS, image.shape[1])))
    tmp = _ACC["tmp"]
    t0 = time.perf_counter()
    for acc, plane, f in zip(_ACC["sums"], (image, variance), (w, w * w)):
        for y in range(0, plane.shape[0], BLOCK_ROWS):
            n = min(BLOCK_ROWS, plane.shape[0] - y)
            np.multiply(plane[y:y + n], f, out=tmp[:n])
            acc[y:y + n] += tmp[:n]
    return time.perf_counter() - t0


def core_import_s() -> float:
    """Wall seconds to start Python and import numpy, astropy.io.fits and h5py (best of 3)."""
    best = float("inf")
    for _ in range(3):
        t = time.perf_counter()
        subprocess.run([sys.executable, "-c", "import numpy, astropy.io.fits, h5py"],
                       check=True)
        best = min(best, time.perf_counter() - t)
    return best


def durable_write_s(nbytes: int, directory: str) -> float:
    """Seconds to write ``nbytes`` (non-zero data, 8 MB writes) to a new file in
    ``directory`` and fsync it and the directory (best of 2); the file is removed."""
    block = np.random.default_rng(0).random(1 << 20).tobytes()  # 8 MB
    best = float("inf")
    for _ in range(2):
        os.sync()  # nothing else pending to write back
        fd, name = tempfile.mkstemp(dir=directory, prefix="bound-write-")
        try:
            t = time.perf_counter()
            left = nbytes
            while left > 0:
                left -= os.write(fd, block[:min(left, len(block))])
            os.fsync(fd)
            dfd = os.open(directory, os.O_RDONLY)
            os.fsync(dfd)
            os.close(dfd)
            best = min(best, time.perf_counter() - t)
        finally:
            os.close(fd)
            os.unlink(name)
    return best


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


def end_to_end_bound(n: int, out: dict, cells: int, outer: int, write_dir) -> dict:
    """The end-to-end lower bound for ``n`` warps reaching ``cells`` cells of ``outer``
    px (see the module docstring); ``out``: the per-warp results so far."""
    state_bytes = cells * 2 * outer * outer * 8
    imports = core_import_s()
    write = durable_write_s(state_bytes, write_dir or tempfile.gettempdir())
    per_warp = out["mandatory_s"] + out["median_s"]["accumulate"]
    wall = imports + n * per_warp / out["cores"] + write
    return dict(min_state_bytes=state_bytes, core_import_s=imports, durable_write_s=write,
                lower_bound_wall_s=wall,
                lower_bound_mpix_s=n * out["mpix_per_warp"] / wall)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("warps", nargs="+")
    ap.add_argument("--skymap", required=True)
    ap.add_argument("--json", help="write the raw results here (else print them)")
    ap.add_argument("--state-cells", type=int, default=0,
                    help="distinct cells the warps reach: also give the end-to-end bound")
    ap.add_argument("--write-dir", default=None,
                    help="directory on the state's filesystem for the durable write "
                         "(default: the system temporary directory)")
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
    if a.state_cells:
        outer = next(iter(skymap.tracts.values())).cells.outer
        out.update(end_to_end_bound(len(per), out, a.state_cells, outer, a.write_dir))
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
    if "lower_bound_wall_s" in out:
        print(f"End to end, {len(per)} warps: imports {out['core_import_s']:.2f} s + "
              f"{len(per)} x (mandatory + accumulate {m['accumulate']:.3f} s) / {cores} + "
              f"durable write of {out['min_state_bytes'] / 1e9:.2f} GB "
              f"{out['durable_write_s']:.2f} s = lower bound {out['lower_bound_wall_s']:.2f} s"
              f" ({out['lower_bound_mpix_s']:.1f} Mpix/s)", file=sys.stderr)


if __name__ == "__main__":
    main()
