#!/usr/bin/env python3
"""Scale-out at a realistic shape (issue 17): detector-sized warps over a multi-patch tract,
folded by plain ``streamcoadd ingest`` and by ``--dask local:N`` for several N.

    python3 scripts/bench_scaling.py                          # 2 cores: plain, local:1, local:2
    python3 scripts/bench_scaling.py --workers 1 2 4 8 16 --patches 8 --warps 128
    python3 scripts/bench_scaling.py --small                  # a quick smoke run (CI)

Warps: ``--size`` x ``--size`` pixels (default 4000, an LSSTCam detector), the valid area a
square rotated by a few degrees (NO_DATA outside it, as a detector resampled onto a tract),
placed at random over a tract of ``--patches`` x ``--patches`` LSST patches (150 px cells,
50 px border, 22 x 22 cells per patch), so most warps cross patch boundaries. Each has
bad columns, cosmic rays, saturated stars with bleed trails, noise, and a Gaussian PSF.

Strong scaling: the same warps for every worker count. Weak scaling: ``--per-worker``
warps per worker. Every run goes through the CLI in a fresh process (imports and cluster
start-up included, as a user runs it), on a fresh state; the states of all runs are
compared cell by cell with the plain ingest (sums equal to 1e-10 relative, masks equal).
The table is printed (markdown) and written as JSON with the machine's description.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from streamcoadd.core.masks import CANONICAL_PLANES  # noqa: E402
from streamcoadd.core.skymap import load_skymap, skymap_from_dict  # noqa: E402
from streamcoadd.io.warp_writer import write_warp  # noqa: E402

BIT = {k: np.int32(1 << v) for k, v in CANONICAL_PLANES.items()}
LSSTCAM_DETECTORS = 189  # science detectors per visit
LSSTCAM_VISIT_S = 36.0  # s between visits (30 s exposure + readout and slew)
RUBIN_CORE_S_PER_PATCH_BAND = 165.0  # DP2 AssembleCellCoadd, RTN-109


def skymap_toml(path: Path, patches: int) -> Path:
    """An LSST-geometry skymap (lsst_cells_v1-like cells) of one P x P-patch tract."""
    lsst = load_skymap(ROOT / "config" / "skymap-lsst.toml").to_dict()
    tract = dict(lsst["tract"][0], id=0, num_patches=[patches, patches])
    path.write_text(skymap_from_dict(dict(lsst, skymap={"name": "bench_scaling"}, tract=[tract])).to_toml())
    return path


def rotated_square(size: int, angle_deg: float) -> np.ndarray:
    """True inside a square of side 0.97 * size rotated by ``angle_deg`` about the centre."""
    c = (size - 1) / 2.0
    y, x = np.ogrid[:size, :size]
    a = math.radians(angle_deg)
    u = (x - c) * math.cos(a) + (y - c) * math.sin(a)
    v = -(x - c) * math.sin(a) + (y - c) * math.cos(a)
    half = 0.485 * size
    return (np.abs(u) <= half) & (np.abs(v) <= half)


def make_detector_warp(args) -> str:
    """Write one detector warp; returns its path (run in a worker process)."""
    out, skymap_path, k, size, seed = args
    tract = load_skymap(skymap_path).tract(0)
    rng = np.random.default_rng([seed, k])
    width = tract.num_patches[0] * load_skymap(skymap_path).cells.patch_inner
    x0, y0 = (int(v) for v in rng.integers(0, width - size, 2))
    valid = rotated_square(size, rng.uniform(-3.0, 3.0))
    sky_var = rng.uniform(400.0, 900.0)  # nJy^2
    image = rng.normal(0.0, math.sqrt(sky_var), (size, size)).astype(np.float32)
    variance = np.full((size, size), sky_var, np.float32)
    mask = np.zeros((size, size), np.int32)
    for col in rng.integers(0, size, 3):  # bad columns, some partial
        y1 = size if rng.random() < 0.5 else int(rng.integers(size // 4, size))
        mask[:y1, col] |= BIT["BAD"]
    n_cr = 400
    ys, xs = rng.integers(0, size - 8, n_cr), rng.integers(0, size - 8, n_cr)
    for d in range(6):  # short diagonal cosmic-ray tracks
        mask[ys + d, xs + d] |= BIT["CR"]
        image[ys + d, xs + d] += 5e3
    for sy, sx in rng.integers(20, size - 60, (12, 2)):  # saturated stars with bleeds
        mask[sy - 3:sy + 40, sx - 1:sx + 2] |= BIT["SAT"]
        image[sy - 3:sy + 40, sx - 1:sx + 2] = 1.2e5
    image[~valid] = np.nan
    variance[~valid] = np.inf
    mask[~valid] = BIT["NO_DATA"]
    yy, xx = np.mgrid[:35, :35] - 17
    sigma = rng.uniform(1.3, 2.1)
    psf = np.exp(-(xx ** 2 + yy ** 2) / (2 * sigma ** 2))
    path = Path(out) / f"det{k:05d}.fits"
    write_warp(path, tract=tract, xy0=(x0, y0), image=image, mask=mask, variance=variance,
               psf=psf / psf.sum(), visit=200000 + k // LSSTCAM_DETECTORS,
               detector=k % LSSTCAM_DETECTORS, band="r", mjd=61000.0 + k * 1e-4)
    return str(path)


def generate(out: Path, skymap_path: Path, n: int, size: int, seed: int, jobs: int) -> list[str]:
    out.mkdir(parents=True, exist_ok=True)
    work = [(str(out), str(skymap_path), k, size, seed) for k in range(n)]
    with ProcessPoolExecutor(jobs) as ex:
        return list(ex.map(make_detector_warp, work))


def cli(*args, timeout: float = 3600) -> float:
    """Run ``streamcoadd ARGS`` in a fresh process; wall seconds."""
    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, "-m", "streamcoadd", *map(str, args)], cwd=ROOT,
                       capture_output=True, text=True, timeout=timeout)
    if r.returncode != 0:
        raise SystemExit(f"streamcoadd {' '.join(map(str, args))} failed:\n{r.stdout}\n{r.stderr}")
    return time.perf_counter() - t0


def run_ingest(state: Path, skymap_path: Path, files: list[str], dask: str | None) -> float:
    if state.exists():
        shutil.rmtree(state)
    cli("init", state, "--skymap", skymap_path)
    extra = ["--dask", dask] if dask else []
    return cli("ingest", state, *files, "--quiet", *extra)


def states_equal(a: Path, b: Path) -> tuple[bool, str]:
    """Every cell of ``a`` equals ``b``'s (sums 1e-10 relative, masks identical)."""
    import streamcoadd

    worst = 0.0
    with streamcoadd.open_state(a) as sa, streamcoadd.open_state(b) as sb:
        for band in sorted(set(sa.bands()) | set(sb.bands())):
            ca_ids, cb_ids = sa.populated_cells(band), sb.populated_cells(band)
            if sorted(map(str, ca_ids)) != sorted(map(str, cb_ids)):
                return False, f"different populated cells ({len(ca_ids)} vs {len(cb_ids)})"
            for cell in ca_ids:
                ca, cb = sa.cell(cell, band), sb.cell(cell, band)
                if not np.array_equal(ca.mask, cb.mask):
                    return False, f"mask differs in {cell}"
                ok = np.isfinite(ca.image)
                d = np.abs(ca.image[ok] - cb.image[ok]) / np.maximum(np.abs(cb.image[ok]), 1e-30)
                worst = max(worst, float(d.max(initial=0.0)))
    return worst <= 1e-10, f"max relative difference {worst:.1e}"


def machine() -> str:
    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{os.cpu_count()} cores, {model}, Python {platform.python_version()}"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--warps", type=int, default=40, help="warps of the strong-scaling run")
    ap.add_argument("--size", type=int, default=4000, help="warp side, px")
    ap.add_argument("--patches", type=int, default=4, help="tract of P x P patches (>= 4)")
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--per-worker", type=int, default=0,
                    help="weak scaling: this many warps per worker (0: skip)")
    ap.add_argument("--no-plain", action="store_true", help="skip plain ingest")
    ap.add_argument("--small", action="store_true", help="smoke run: 6 warps of 1200 px")
    ap.add_argument("--seed", type=int, default=3)
    ap.add_argument("--workdir", help="keep files here (default: a temporary directory)")
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args(argv)
    if args.small:
        args.warps, args.size, args.patches = 6, 1200, 4
    work = Path(args.workdir or tempfile.mkdtemp(prefix="sc-scaling-"))
    work.mkdir(parents=True, exist_ok=True)
    skymap_path = skymap_toml(work / "skymap.toml", args.patches)
    n_max = max(args.warps, args.per_worker * max(args.workers))
    t0 = time.perf_counter()
    files = generate(work / "warps", skymap_path, n_max, args.size, args.seed, os.cpu_count() or 1)
    print(f"generated {n_max} warps of {args.size} px in {time.perf_counter() - t0:.0f} s "
          f"({work})", flush=True)
    mpix = args.size ** 2 / 1e6
    rows = []

    def record(kind: str, workers: int, n: int, seconds: float, same: str) -> None:
        rows.append(dict(kind=kind, workers=workers, warps=n, seconds=round(seconds, 2),
                         mpix_per_s=round(n * mpix / seconds, 2), same=same))
        print(f"{kind:>6} workers={workers:<3} warps={n:<5} {seconds:8.1f} s "
              f"{n * mpix / seconds:8.1f} Mpix/s  {same}", flush=True)

    strong = files[:args.warps]
    ref = work / "state-plain"
    if not args.no_plain:
        record("plain", 1, len(strong), run_ingest(ref, skymap_path, strong, None), "reference")
    for n in args.workers:
        st = work / f"state-dask{n}"
        dt = run_ingest(st, skymap_path, strong, f"local:{n}")
        same = states_equal(st, ref)[1] if ref.exists() else "-"
        record("strong", n, len(strong), dt, same)
        if n != args.workers[0] and not args.no_plain:
            shutil.rmtree(st)
    if args.per_worker:
        for n in args.workers:
            batch = files[:args.per_worker * n]
            record("weak", n, len(batch),
                   run_ingest(work / "state-weak", skymap_path, batch, f"local:{n}"), "-")
    report(rows, args, mpix)
    if args.json:
        Path(args.json).write_text(json.dumps(dict(machine=machine(), size=args.size,
                                                    patches=args.patches, rows=rows), indent=1))
    if not args.workdir:
        shutil.rmtree(work, ignore_errors=True)
    return 0


def report(rows: list[dict], args, mpix: float) -> None:
    print(f"\nMachine: {machine()}; warps {args.size} x {args.size} px ({mpix:.1f} Mpix), "
          f"tract {args.patches} x {args.patches} patches\n")
    print("| run | workers | warps | wall s | input Mpix/s | speed-up vs 1 worker | "
          "parallel efficiency | same as plain |")
    print("|---|---|---|---|---|---|---|---|")
    base = {r["kind"]: r for r in rows if r["workers"] == min(args.workers)}
    for r in rows:
        b = base.get(r["kind"], r)
        if r["kind"] == "weak":
            speed = r["mpix_per_s"] / b["mpix_per_s"]
        else:
            speed = b["seconds"] / r["seconds"]
        eff = speed / (r["workers"] / b["workers"])
        print(f"| {r['kind']} | {r['workers']} | {r['warps']} | {r['seconds']:.1f} | "
              f"{r['mpix_per_s']:.1f} | {speed:.2f}x | {100 * eff:.0f} % | {r['same']} |")
    one = base.get("strong") or rows[0]
    per_core = one["mpix_per_s"] / one["workers"]
    need = LSSTCAM_DETECTORS * mpix / LSSTCAM_VISIT_S / per_core
    print(f"\nPer core: {per_core:.1f} input Mpix/s; LSSTCam ({LSSTCAM_DETECTORS} detectors of "
          f"{mpix:.1f} Mpix every {LSSTCAM_VISIT_S:.0f} s) needs {math.ceil(need)} such cores "
          "in real time.")


if __name__ == "__main__":
    raise SystemExit(main())
